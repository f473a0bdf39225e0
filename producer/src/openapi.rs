//! The API's OpenAPI 3.1 document, served at `GET /openapi.json`.
//!
//! # Layout
//!
//! ```text
//! ingest.rs handlers (#[utoipa::path]: method, path, statuses, headers)
//!   + api.rs request types (TransitionBody, FactsBody: #[derive(ToSchema)])
//!   + the answer shapes below (the handlers build them as JSON values)
//!   --> ApiDoc::openapi() --> GET /openapi.json
//! ```
//!
//! The handlers answer with `serde_json::Value`s built in `api.rs`, so the answers' shapes are
//! written down here, once, as types that exist only for the document; the schemathesis check
//! (`scripts/schemathesis`) holds the live producer to them. `/metrics` is left out: it is
//! Prometheus text behind its own token rule, not part of the transition contract.

use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use uuid::Uuid;

/// The routes the document describes, as `(method, path)`; the router serves these and also
/// `GET /metrics` and `GET /openapi.json`.
pub const DOCUMENTED_ROUTES: &[(&str, &str)] = &[
    ("post", "/v1/transitions"),
    ("post", "/v1/transitions/batch"),
    ("get", "/healthz"),
    ("get", "/readyz"),
];

/// A build status by name.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum StatusName {
    Created,
    Pending,
    Running,
    Success,
    Failed,
    Canceled,
}

/// Where the Job Hook is rendered: in the event (`inline`) or by the consumer (`deferred`).
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum TimingName {
    Inline,
    Deferred,
}

/// `202`: Kafka acknowledged the event.
#[derive(Debug, Serialize, ToSchema)]
pub struct EmittedAnswer {
    pub event_id: Uuid,
    pub timing: TimingName,
    pub partition: i32,
    pub offset: i64,
    /// Microseconds spent rendering the Job Hook inline; `null` when deferred.
    pub render_time_us: Option<u64>,
    /// Bytes of the inline Job Hook; `null` when deferred.
    pub payload_bytes: Option<u64>,
    /// Present (`true`) when this answers a retry of a transition already emitted: the
    /// partition and offset are the first emission's.
    #[schema(required = false)]
    pub repeated: Option<bool>,
}

/// `200`: no event exists, by design (GitLab sends no hooks for it); do not retry.
#[derive(Debug, Serialize, ToSchema)]
pub struct SkippedAnswer {
    /// Why, e.g. `user_blocked`.
    pub skipped: String,
    pub build_id: i64,
    pub message: String,
}

/// Every refusal: what is wrong and, for a field's fault, which field (`facts.duration`,
/// `[3].build_id` in a batch).
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorAnswer {
    pub error: String,
    #[schema(required = false)]
    pub field: Option<String>,
}

/// One item of a batch's `results`, in the order sent.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchItem {
    /// This item's own status: `202` emitted, `200` skipped, else the error's.
    pub status: u16,
    #[schema(required = false)]
    pub event_id: Option<Uuid>,
    #[schema(required = false)]
    pub timing: Option<TimingName>,
    #[schema(required = false)]
    pub partition: Option<i32>,
    #[schema(required = false)]
    pub offset: Option<i64>,
    #[schema(required = false)]
    pub render_time_us: Option<u64>,
    #[schema(required = false)]
    pub payload_bytes: Option<u64>,
    #[schema(required = false)]
    pub repeated: Option<bool>,
    #[schema(required = false)]
    pub skipped: Option<String>,
    #[schema(required = false)]
    pub build_id: Option<i64>,
    #[schema(required = false)]
    pub message: Option<String>,
    #[schema(required = false)]
    pub error: Option<String>,
}

/// A batch that reached Kafka: counts and one result per item. Its status is `202` when every
/// item was acknowledged or skipped, else the worst item's.
#[derive(Debug, Serialize, ToSchema)]
pub struct BatchAnswer {
    pub accepted: u64,
    pub skipped: u64,
    pub results: Vec<BatchItem>,
}

/// A batch refused as a whole (`{"error", "field"?}`) or answered item by item.
#[derive(Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum BatchRefusal {
    Refused(ErrorAnswer),
    Items(BatchAnswer),
}

/// The bearer token scheme of the transition routes.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The producer API's document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "hookline producer",
        description = "CI build transitions in, BuildEvents on Kafka out. Nothing is answered 202 unless Kafka acknowledged it.",
    ),
    paths(
        crate::ingest::transition,
        crate::ingest::batch,
        crate::ingest::healthz,
        crate::ingest::ready
    ),
    components(schemas(
        crate::api::TransitionBody,
        crate::api::FactsBody,
        StatusName,
        TimingName,
        EmittedAnswer,
        SkippedAnswer,
        ErrorAnswer,
        BatchItem,
        BatchAnswer,
        BatchRefusal
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// The document as served, with the running version.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    fn json() -> Value {
        serde_json::to_value(document()).unwrap()
    }

    #[test]
    fn the_document_is_openapi_3_1_with_its_required_keys() {
        let doc = json();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1."),
            "{}",
            doc["openapi"]
        );
        assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
        assert!(doc["paths"].is_object());
        // Every $ref resolves to a component schema.
        let text = doc.to_string();
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().unwrap();
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "dangling $ref {name}"
            );
        }
        // Each operation has responses, and the transition routes name the bearer scheme.
        for (method, path) in DOCUMENTED_ROUTES {
            let op = &doc["paths"][path][method];
            assert!(op["responses"].is_object(), "{method} {path}");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }

    #[test]
    fn unknown_request_fields_are_refused_in_the_schema_as_by_the_api() {
        let doc = json();
        for name in ["TransitionBody", "FactsBody"] {
            assert_eq!(
                doc["components"]["schemas"][name]["additionalProperties"],
                Value::Bool(false),
                "{name}"
            );
        }
    }
}
