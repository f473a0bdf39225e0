//! The API's vocabulary: what a client sends (a transition, its facts), how the body is read
//! (every error names its field), and what is answered (an emitted event, a skip, an error as
//! `{"error", "field"?}` with its status). The routes and handlers are in `ingest`.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use hookline_schemas::{BuildStatus, TransitionFacts};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use uuid::Uuid;

use crate::bounds;
use crate::emit::{Emitted, TransitionRequest};
use hookline_cistate::NoHook;

use crate::error::EmitError;

/// A request error, as JSON `{"error": .., "field": ..}` with the right status.
#[derive(Debug)]
pub enum ApiError {
    /// The body is not JSON (400).
    Malformed(String),
    /// A field is missing, unknown, duplicated, of the wrong type or invalid (422).
    Invalid {
        field: String,
        message: String,
    },
    /// Kafka refused the event for good (422, no field: the event as a whole).
    Refused(String),
    /// The body is over `--body-limit`, or the event over `--max-event-bytes` (413).
    TooLarge(String),
    NotFound(String),
    /// The event id was used before for a different transition (409).
    Conflict {
        field: String,
        message: String,
    },
    /// No valid bearer token (401 with `WWW-Authenticate: Bearer`).
    Unauthorized(String),
    /// The body is not declared as `application/json` (415).
    UnsupportedMediaType(String),
    /// Without authentication, a `Host` that is not loopback (421): DNS rebinding protection.
    MisdirectedHost(String),
    Unavailable {
        message: String,
        retry_after: Duration,
    },
    Internal(String),
}

impl ApiError {
    pub(crate) fn status(&self) -> StatusCode {
        match self {
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid { .. } | ApiError::Refused(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } => StatusCode::CONFLICT,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::MisdirectedHost(_) => StatusCode::MISDIRECTED_REQUEST,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub(crate) fn from_emit(error: &EmitError, retry_after: Duration) -> Self {
        match error {
            EmitError::UnknownBuild(_) => ApiError::NotFound(error.to_string()),
            EmitError::Unavailable(_) => ApiError::Unavailable {
                message: error.to_string(),
                retry_after,
            },
            EmitError::TooLarge(_) => ApiError::TooLarge(error.to_string()),
            EmitError::Refused(_) => ApiError::Refused(error.to_string()),
            EmitError::Conflict(_) => ApiError::Conflict {
                field: "event_id".into(),
                message: error.to_string(),
            },
            EmitError::Rejected(_) => ApiError::Internal(error.to_string()),
            // The handlers answer skips with 200 before asking for an error; should one get
            // here, it still must not read as retryable.
        }
    }

    fn body(&self) -> Value {
        match self {
            ApiError::Invalid { field, message } | ApiError::Conflict { field, message } => {
                json!({ "error": message, "field": field })
            }
            ApiError::Malformed(m)
            | ApiError::Refused(m)
            | ApiError::TooLarge(m)
            | ApiError::NotFound(m)
            | ApiError::Unauthorized(m)
            | ApiError::UnsupportedMediaType(m)
            | ApiError::MisdirectedHost(m)
            | ApiError::Internal(m) => json!({ "error": m }),
            ApiError::Unavailable { message, .. } => json!({ "error": message }),
        }
    }
}

pub(crate) fn retry_after_header(after: Duration) -> HeaderValue {
    HeaderValue::from(after.as_secs().max(1))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        match &self {
            ApiError::Unavailable { retry_after, .. } => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, retry_after_header(*retry_after));
            }
            ApiError::Unauthorized(_) => {
                response.headers_mut().insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"hookline\""),
                );
            }
            _ => {}
        }
        response
    }
}

/// The JSON shape a body must have beyond what serde checks: serde fills a struct from an array
/// too (`[1000000, "running"]`, `"facts": []`), and the API takes objects only.
pub trait Shape {
    fn check_shape(value: &Value) -> Result<(), ApiError>;
}

pub(crate) fn object_expected(field: String, value: &Value) -> ApiError {
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    };
    ApiError::Invalid {
        message: format!("invalid type: {kind}, expected an object"),
        field,
    }
}

impl TransitionBody {
    fn check_shape_at(value: &Value, at: &str) -> Result<(), ApiError> {
        let Value::Object(body) = value else {
            let field = at.strip_suffix('.').unwrap_or("body");
            return Err(object_expected(field.to_owned(), value));
        };
        match body.get("facts") {
            None | Some(Value::Null) | Some(Value::Object(_)) => Ok(()),
            Some(other) => Err(object_expected(format!("{at}facts"), other)),
        }
    }
}

impl Shape for TransitionBody {
    fn check_shape(value: &Value) -> Result<(), ApiError> {
        TransitionBody::check_shape_at(value, "")
    }
}

impl Shape for Vec<TransitionBody> {
    fn check_shape(value: &Value) -> Result<(), ApiError> {
        match value {
            Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, item)| TransitionBody::check_shape_at(item, &format!("[{i}]."))),
            // Not an array: serde names it.
            _ => Ok(()),
        }
    }
}

/// Deserialises `bytes` in two steps, so the status says whose fault an error is: bytes that
/// are not JSON are `400`; JSON with a duplicate key, or of the wrong type or shape for `T`, is
/// `422` naming the field.
pub fn parse_json<T: DeserializeOwned + Shape>(bytes: &[u8]) -> Result<T, ApiError> {
    let value = strict::parse(bytes)?;
    T::check_shape(&value)?;
    serde_path_to_error::deserialize(value).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        let message = inner.to_string();
        ApiError::Invalid {
            field: field_name(&path, &message),
            message,
        }
    })
}

/// JSON text to a [`Value`], refusing duplicate keys (serde_json keeps the last one silently,
/// so a body could say two things and be read as one of them).
///
/// Linear in the body: each value knows its place as a link to its parent's (a key or an index),
/// and the path is written out only for the duplicate that is reported. (Writing each value's
/// whole path as it was read made a body with one long key over a long array quadratic: a 1 MiB
/// body took seconds of a worker thread.)
mod strict {
    use std::cell::RefCell;
    use std::fmt;

    use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use serde_json::{Map, Value};

    use super::ApiError;

    pub fn parse(bytes: &[u8]) -> Result<Value, ApiError> {
        let duplicate = RefCell::new(None);
        let mut de = serde_json::Deserializer::from_slice(bytes);
        let parsed = Strict {
            at: At::Root,
            duplicate: &duplicate,
        }
        .deserialize(&mut de)
        .and_then(|value| de.end().map(|()| value));
        match parsed {
            Ok(value) => Ok(value),
            Err(error) => Err(match duplicate.into_inner() {
                Some(field) => ApiError::Invalid {
                    message: format!("duplicate key {:?}", shortened(&field)),
                    field,
                },
                None => ApiError::Malformed(format!("malformed JSON: {error}")),
            }),
        }
    }

    /// A field path in a message: a key can be as long as the body, and the message need not be.
    fn shortened(path: &str) -> String {
        const KEEP: usize = 200;
        match path.char_indices().nth(KEEP) {
            None => path.to_owned(),
            Some((cut, _)) => format!("{}... ({} bytes)", &path[..cut], path.len()),
        }
    }

    /// Where a value is: the body itself, a key of an object, or an index of an array.
    #[derive(Clone, Copy)]
    enum At<'a> {
        Root,
        Key(&'a At<'a>, &'a str),
        Index(&'a At<'a>, usize),
    }

    impl At<'_> {
        /// `facts.started_at`, `[3].facts`: the form the API names fields in.
        fn path(&self) -> String {
            let mut steps = Vec::new();
            let mut at = self;
            loop {
                match at {
                    At::Root => break,
                    At::Key(parent, key) => {
                        steps.push(Step::Key(key));
                        at = parent;
                    }
                    At::Index(parent, index) => {
                        steps.push(Step::Index(*index));
                        at = parent;
                    }
                }
            }
            let mut path = String::new();
            for step in steps.iter().rev() {
                match step {
                    Step::Key(key) => {
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(key);
                    }
                    Step::Index(index) => path.push_str(&format!("[{index}]")),
                }
            }
            path
        }
    }

    enum Step<'a> {
        Key(&'a str),
        Index(usize),
    }

    /// A JSON value at `at`; records the first duplicate key's path in `duplicate`.
    struct Strict<'a> {
        at: At<'a>,
        duplicate: &'a RefCell<Option<String>>,
    }

    impl<'de> DeserializeSeed<'de> for Strict<'_> {
        type Value = Value;

        fn deserialize<D: de::Deserializer<'de>>(self, d: D) -> Result<Value, D::Error> {
            d.deserialize_any(self)
        }
    }

    impl<'de> Visitor<'de> for Strict<'_> {
        type Value = Value;

        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON value")
        }

        fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
            Ok(Value::Bool(v))
        }

        fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
            Ok(v.into())
        }

        fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
            Ok(v.into())
        }

        fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
            Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
        }

        fn visit_str<E>(self, v: &str) -> Result<Value, E> {
            Ok(Value::String(v.to_owned()))
        }

        fn visit_string<E>(self, v: String) -> Result<Value, E> {
            Ok(Value::String(v))
        }

        fn visit_unit<E>(self) -> Result<Value, E> {
            Ok(Value::Null)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element_seed(Strict {
                at: At::Index(&self.at, items.len()),
                duplicate: self.duplicate,
            })? {
                items.push(item);
            }
            Ok(Value::Array(items))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
            let mut object = Map::new();
            while let Some(key) = map.next_key::<String>()? {
                if object.contains_key(&key) {
                    *self.duplicate.borrow_mut() = Some(At::Key(&self.at, &key).path());
                    return Err(de::Error::custom("duplicate key"));
                }
                let value = map.next_value_seed(Strict {
                    at: At::Key(&self.at, &key),
                    duplicate: self.duplicate,
                })?;
                object.insert(key, value);
            }
            Ok(Value::Object(object))
        }
    }
}

/// serde reports a missing field at its parent's path, with the name only in the message; the
/// body itself (`null` where an object belongs) is named `body`.
fn field_name(path: &str, message: &str) -> String {
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    match (path, missing) {
        (".", Some(name)) => name.to_owned(),
        (".", None) => "body".to_owned(),
        (parent, Some(name)) => format!("{parent}.{name}"),
        (path, None) => path.to_owned(),
    }
}

/// A status by name only: serde's derived enum would also take `{"running": null}`.
fn status_name<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BuildStatus, D::Error> {
    use serde::de::{Error, Unexpected};
    let name = String::deserialize(d)?;
    BuildStatus::ALL
        .into_iter()
        .find(|s| s.as_str() == name)
        .ok_or_else(|| {
            D::Error::invalid_value(
                Unexpected::Str(&name),
                &"one of created, pending, running, success, failed, canceled",
            )
        })
}

/// One transition as the API takes it. (The `schema` attributes describe it in the OpenAPI
/// document; the checks themselves are serde's and `into_request`'s.)
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TransitionBody {
    #[schema(minimum = 1)]
    pub build_id: i64,
    #[serde(deserialize_with = "status_name")]
    #[schema(value_type = crate::openapi::StatusName)]
    pub status: BuildStatus,
    /// When the build reached the status; now when absent.
    #[serde(default)]
    pub occurred_at: Option<DateTime<Utc>>,
    /// The event's identity; send the same one when retrying.
    #[serde(default)]
    pub event_id: Option<Uuid>,
    /// The facts at the transition; read from the build row when absent.
    #[serde(default)]
    pub facts: Option<FactsBody>,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FactsBody {
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    /// Not before `started_at`.
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    /// Seconds.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub duration: Option<f64>,
    /// Seconds.
    #[serde(default)]
    #[schema(minimum = 0)]
    pub queued_duration: Option<f64>,
    /// One of GitLab's job failure reasons.
    #[serde(default)]
    #[schema(schema_with = failure_reason_schema)]
    pub failure_reason: Option<String>,
}

/// `failure_reason` in the OpenAPI document: GitLab's names ([`bounds::FAILURE_REASONS`]), or
/// null.
fn failure_reason_schema() -> utoipa::openapi::schema::Object {
    use utoipa::openapi::schema::{ObjectBuilder, SchemaType, Type};
    ObjectBuilder::new()
        .schema_type(SchemaType::from_iter([Type::String, Type::Null]))
        .enum_values(Some(
            bounds::FAILURE_REASONS
                .iter()
                .map(|r| Value::from(*r))
                .chain([Value::Null]),
        ))
        .build()
}

impl TransitionBody {
    /// Checks what serde cannot; `at` prefixes field names in a batch (`[3].`).
    pub(crate) fn into_request(self, at: &str) -> Result<TransitionRequest, ApiError> {
        let invalid = |field: &str, message: &str| ApiError::Invalid {
            field: format!("{at}{field}"),
            message: message.to_owned(),
        };
        if self.build_id <= 0 {
            return Err(invalid("build_id", "build_id must be a positive integer"));
        }
        let facts = match self.facts {
            None => None,
            Some(f) => {
                for (name, value) in [
                    ("facts.duration", f.duration),
                    ("facts.queued_duration", f.queued_duration),
                ] {
                    if value.is_some_and(|v| !v.is_finite() || v < 0.0) {
                        return Err(invalid(name, "durations are seconds, zero or more"));
                    }
                }
                if let Some(reason) = &f.failure_reason
                    && !bounds::is_failure_reason(reason)
                {
                    return Err(invalid(
                        "facts.failure_reason",
                        "not a GitLab job failure reason (script_failure, runner_system_failure, stuck_or_timeout_failure, ..., or unknown_failure)",
                    ));
                }
                if let (Some(start), Some(finish)) = (f.started_at, f.finished_at)
                    && finish < start
                {
                    return Err(invalid(
                        "facts.finished_at",
                        "finished_at is before started_at",
                    ));
                }
                Some(TransitionFacts {
                    started_at: f.started_at,
                    finished_at: f.finished_at,
                    duration: f.duration,
                    queued_duration: f.queued_duration,
                    failure_reason: f.failure_reason,
                })
            }
        };
        Ok(TransitionRequest {
            build_id: self.build_id,
            status: self.status,
            occurred_at: self.occurred_at,
            facts,
            event_id: self.event_id,
        })
    }
}

pub(crate) fn emitted_json(emitted: &Emitted) -> Value {
    let mut json = json!({
        "event_id": emitted.event_id,
        "timing": emitted.timing.as_str(),
        "partition": emitted.partition,
        "offset": emitted.offset,
        "render_time_us": emitted.render_time.map(|d| d.as_micros() as u64),
        "payload_bytes": emitted.payload_bytes,
    });
    if emitted.repeated {
        // A retry of a transition already emitted: these are its first partition and offset.
        json["repeated"] = json!(true);
    }
    json
}

pub(crate) fn skipped_json(build_id: i64, reason: NoHook) -> Value {
    json!({
        "skipped": reason.as_str(),
        "build_id": build_id,
        "message": format!("no event emitted: {reason}; GitLab sends no hooks for it"),
    })
}
