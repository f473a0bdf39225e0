//! `BuildEvent`: one transition of one build, and its Avro form.

use std::fmt;
use std::str::FromStr;

use apache_avro::Schema;
use apache_avro::types::Value;
use chrono::{DateTime, TimeZone, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::codec::CodecError;

/// The Avro schema versions of `BuildEvent` this build of hookline knows. Every published
/// version stays here and in `avro/`: old data is decoded with the schema that wrote it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SchemaVersion {
    /// Legacy: identity and transition facts only, never a payload.
    V1,
    /// Adds `payload` and `payload_timing`.
    V2,
}

impl SchemaVersion {
    pub const ALL: [SchemaVersion; 2] = [SchemaVersion::V1, SchemaVersion::V2];
    pub const LATEST: SchemaVersion = SchemaVersion::V2;

    pub fn number(self) -> u32 {
        match self {
            SchemaVersion::V1 => 1,
            SchemaVersion::V2 => 2,
        }
    }

    pub fn from_number(n: u32) -> Option<Self> {
        Self::ALL.into_iter().find(|v| v.number() == n)
    }

    /// The `.avsc` text of this version, as committed.
    pub fn schema_text(self) -> &'static str {
        match self {
            SchemaVersion::V1 => include_str!("../avro/build_event.v1.avsc"),
            SchemaVersion::V2 => include_str!("../avro/build_event.v2.avsc"),
        }
    }

    /// The parsed schema. Parsing the committed files cannot fail: a test pins that.
    pub fn schema(self) -> Schema {
        Schema::parse_str(self.schema_text()).expect("committed .avsc files parse")
    }
}

/// Build statuses that send a Job Hook (GitLab sends none for preparing, manual, scheduled,
/// skipped, waiting_for_resource or canceling).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BuildStatus {
    Created,
    Pending,
    Running,
    Success,
    Failed,
    Canceled,
}

impl BuildStatus {
    /// In the order of the Avro enum's symbols.
    pub const ALL: [BuildStatus; 6] = [
        BuildStatus::Created,
        BuildStatus::Pending,
        BuildStatus::Running,
        BuildStatus::Success,
        BuildStatus::Failed,
        BuildStatus::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            BuildStatus::Created => "created",
            BuildStatus::Pending => "pending",
            BuildStatus::Running => "running",
            BuildStatus::Success => "success",
            BuildStatus::Failed => "failed",
            BuildStatus::Canceled => "canceled",
        }
    }

    pub fn is_finished(self) -> bool {
        matches!(
            self,
            BuildStatus::Success | BuildStatus::Failed | BuildStatus::Canceled
        )
    }

    fn index(self) -> u32 {
        Self::ALL.iter().position(|s| *s == self).unwrap_or(0) as u32
    }
}

impl fmt::Display for BuildStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error for a status name hookline does not deliver hooks for.
#[derive(Debug, thiserror::Error)]
#[error(
    "unknown build status {0:?}: expected one of created, pending, running, success, failed, canceled"
)]
pub struct UnknownStatus(pub String);

impl FromStr for BuildStatus {
    type Err = UnknownStatus;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|v| v.as_str() == s)
            .ok_or_else(|| UnknownStatus(s.to_owned()))
    }
}

/// When the Job Hook body was rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PayloadTiming {
    /// Rendered by the producer at the transition and embedded in the event.
    Inline,
    /// Not embedded: the consumer renders it from the build's current state.
    Deferred,
}

impl PayloadTiming {
    pub fn as_str(self) -> &'static str {
        match self {
            PayloadTiming::Inline => "inline",
            PayloadTiming::Deferred => "deferred",
        }
    }
}

impl fmt::Display for PayloadTiming {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The transition's own facts: what the build row said at the moment of the transition. A
/// deferred render pins these over the build's current state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TransitionFacts {
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Seconds the build ran.
    pub duration: Option<f64>,
    /// Seconds the build waited in the queue.
    pub queued_duration: Option<f64>,
    pub failure_reason: Option<String>,
}

/// One transition of one build: the record value on the `build-events` topic (key: build id).
#[derive(Debug, Clone, PartialEq)]
pub struct BuildEvent {
    /// Stable identity of the transition: `X-Gitlab-Event-UUID` and the base of idempotency keys.
    pub event_id: Uuid,
    pub build_id: i64,
    pub project_id: i64,
    pub pipeline_id: i64,
    pub status: BuildStatus,
    /// Timestamps travel as Avro timestamp-micros: finer precision is dropped on encode.
    pub occurred_at: DateTime<Utc>,
    pub facts: TransitionFacts,
    /// The exact Job Hook body, when rendered inline. Always `None` in v1 data.
    pub payload: Option<Vec<u8>>,
    pub payload_timing: PayloadTiming,
}

impl BuildEvent {
    /// The Avro value of this event under `version`. v1 cannot carry a payload: writing an
    /// inline event as v1 drops it, which is what an old producer would have sent.
    pub(crate) fn to_avro(&self, version: SchemaVersion) -> Value {
        let mut fields = vec![
            ("event_id".to_owned(), Value::Uuid(self.event_id)),
            ("build_id".to_owned(), Value::Long(self.build_id)),
            ("project_id".to_owned(), Value::Long(self.project_id)),
            ("pipeline_id".to_owned(), Value::Long(self.pipeline_id)),
            (
                "status".to_owned(),
                Value::Enum(self.status.index(), self.status.as_str().to_owned()),
            ),
            (
                "occurred_at".to_owned(),
                Value::TimestampMicros(self.occurred_at.timestamp_micros()),
            ),
            (
                "started_at".to_owned(),
                optional(
                    self.facts
                        .started_at
                        .map(|t| Value::TimestampMicros(t.timestamp_micros())),
                ),
            ),
            (
                "finished_at".to_owned(),
                optional(
                    self.facts
                        .finished_at
                        .map(|t| Value::TimestampMicros(t.timestamp_micros())),
                ),
            ),
            (
                "duration".to_owned(),
                optional(self.facts.duration.map(Value::Double)),
            ),
            (
                "queued_duration".to_owned(),
                optional(self.facts.queued_duration.map(Value::Double)),
            ),
            (
                "failure_reason".to_owned(),
                optional(self.facts.failure_reason.clone().map(Value::String)),
            ),
        ];
        if version >= SchemaVersion::V2 {
            fields.push((
                "payload".to_owned(),
                optional(self.payload.clone().map(Value::Bytes)),
            ));
            let timing = match self.payload_timing {
                PayloadTiming::Inline => Value::Enum(0, "inline".to_owned()),
                PayloadTiming::Deferred => Value::Enum(1, "deferred".to_owned()),
            };
            fields.push((
                "payload_timing".to_owned(),
                Value::Union(1, Box::new(timing)),
            ));
        }
        Value::Record(fields)
    }

    /// Reads an event from an Avro value already resolved to any known reader version.
    pub(crate) fn from_avro(value: Value) -> Result<Self, CodecError> {
        let Value::Record(fields) = value else {
            return Err(CodecError::Shape("top-level value is not a record".into()));
        };
        let mut event = BuildEvent {
            event_id: Uuid::nil(),
            build_id: 0,
            project_id: 0,
            pipeline_id: 0,
            status: BuildStatus::Created,
            occurred_at: DateTime::<Utc>::UNIX_EPOCH,
            facts: TransitionFacts::default(),
            payload: None,
            payload_timing: PayloadTiming::Deferred,
        };
        let mut seen = 0u32;
        for (name, value) in fields {
            let value = unwrap_union(value);
            match name.as_str() {
                "event_id" => {
                    event.event_id = match value {
                        Value::Uuid(u) => u,
                        Value::String(s) => Uuid::parse_str(&s)
                            .map_err(|e| CodecError::Shape(format!("event_id: {e}")))?,
                        other => return Err(shape("event_id", &other)),
                    };
                    seen |= 1;
                }
                "build_id" => {
                    event.build_id = long(&name, value)?;
                    seen |= 2;
                }
                "project_id" => {
                    event.project_id = long(&name, value)?;
                    seen |= 4;
                }
                "pipeline_id" => {
                    event.pipeline_id = long(&name, value)?;
                    seen |= 8;
                }
                "status" => {
                    event.status = match value {
                        Value::Enum(_, symbol) => {
                            symbol.parse().map_err(|e: crate::event::UnknownStatus| {
                                CodecError::Shape(e.to_string())
                            })?
                        }
                        other => return Err(shape("status", &other)),
                    };
                    seen |= 16;
                }
                "occurred_at" => {
                    event.occurred_at = micros(&name, value)?;
                    seen |= 32;
                }
                "started_at" => event.facts.started_at = opt_micros(&name, value)?,
                "finished_at" => event.facts.finished_at = opt_micros(&name, value)?,
                "duration" => event.facts.duration = opt_double(&name, value)?,
                "queued_duration" => event.facts.queued_duration = opt_double(&name, value)?,
                "failure_reason" => {
                    event.facts.failure_reason = match value {
                        Value::Null => None,
                        Value::String(s) => Some(s),
                        other => return Err(shape("failure_reason", &other)),
                    }
                }
                "payload" => {
                    event.payload = match value {
                        Value::Null => None,
                        Value::Bytes(b) => Some(b),
                        other => return Err(shape("payload", &other)),
                    }
                }
                "payload_timing" => {
                    event.payload_timing = match value {
                        Value::Null => PayloadTiming::Deferred,
                        Value::Enum(_, s) if s == "inline" => PayloadTiming::Inline,
                        Value::Enum(_, s) if s == "deferred" => PayloadTiming::Deferred,
                        other => return Err(shape("payload_timing", &other)),
                    }
                }
                // A field from a newer writer that this reader does not know: resolution has
                // already dropped it, so reaching here means a reader schema we ship added one.
                _ => {}
            }
        }
        if seen != 63 {
            return Err(CodecError::Shape("a required field is missing".into()));
        }
        Ok(event)
    }
}

fn optional(value: Option<Value>) -> Value {
    match value {
        None => Value::Union(0, Box::new(Value::Null)),
        Some(v) => Value::Union(1, Box::new(v)),
    }
}

fn unwrap_union(value: Value) -> Value {
    match value {
        Value::Union(_, inner) => *inner,
        other => other,
    }
}

fn shape(field: &str, value: &Value) -> CodecError {
    CodecError::Shape(format!("field {field} has an unexpected value {value:?}"))
}

fn long(field: &str, value: Value) -> Result<i64, CodecError> {
    match value {
        Value::Long(v) => Ok(v),
        Value::Int(v) => Ok(v.into()),
        other => Err(shape(field, &other)),
    }
}

fn micros(field: &str, value: Value) -> Result<DateTime<Utc>, CodecError> {
    let us = match value {
        Value::TimestampMicros(v) | Value::Long(v) => v,
        other => return Err(shape(field, &other)),
    };
    Utc.timestamp_micros(us)
        .single()
        .ok_or_else(|| CodecError::Shape(format!("field {field}: timestamp {us} out of range")))
}

fn opt_micros(field: &str, value: Value) -> Result<Option<DateTime<Utc>>, CodecError> {
    match value {
        Value::Null => Ok(None),
        v => micros(field, v).map(Some),
    }
}

fn opt_double(field: &str, value: Value) -> Result<Option<f64>, CodecError> {
    match value {
        Value::Null => Ok(None),
        Value::Double(v) => Ok(Some(v)),
        Value::Float(v) => Ok(Some(v.into())),
        other => Err(shape(field, &other)),
    }
}
