//! The Avro form of a `BuildEvent`: the mapping between the Rust type and Avro values of every
//! schema version. Framing, schema ids and resolution between versions are the codec's.

use apache_avro::types::Value;
use chrono::{DateTime, TimeZone, Utc};
use uuid::Uuid;

use crate::event::{
    BuildEvent, BuildStatus, PayloadTiming, SchemaVersion, TransitionFacts, UnknownStatus,
};

/// A datum that does not have the shape of a `BuildEvent` (what is wrong, in words).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ShapeError(pub String);

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
    pub(crate) fn from_avro(value: Value) -> Result<Self, ShapeError> {
        let Value::Record(fields) = value else {
            return Err(ShapeError("top-level value is not a record".into()));
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
                        Value::String(s) => {
                            Uuid::parse_str(&s).map_err(|e| ShapeError(format!("event_id: {e}")))?
                        }
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
                        Value::Enum(_, symbol) => symbol
                            .parse()
                            .map_err(|e: UnknownStatus| ShapeError(e.to_string()))?,
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
            return Err(ShapeError("a required field is missing".into()));
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

fn shape(field: &str, value: &Value) -> ShapeError {
    ShapeError(format!("field {field} has an unexpected value {value:?}"))
}

fn long(field: &str, value: Value) -> Result<i64, ShapeError> {
    match value {
        Value::Long(v) => Ok(v),
        Value::Int(v) => Ok(v.into()),
        other => Err(shape(field, &other)),
    }
}

fn micros(field: &str, value: Value) -> Result<DateTime<Utc>, ShapeError> {
    let us = match value {
        Value::TimestampMicros(v) | Value::Long(v) => v,
        other => return Err(shape(field, &other)),
    };
    Utc.timestamp_micros(us)
        .single()
        .ok_or_else(|| ShapeError(format!("field {field}: timestamp {us} out of range")))
}

fn opt_micros(field: &str, value: Value) -> Result<Option<DateTime<Utc>>, ShapeError> {
    match value {
        Value::Null => Ok(None),
        v => micros(field, v).map(Some),
    }
}

fn opt_double(field: &str, value: Value) -> Result<Option<f64>, ShapeError> {
    match value {
        Value::Null => Ok(None),
        Value::Double(v) => Ok(Some(v)),
        Value::Float(v) => Ok(Some(v.into())),
        other => Err(shape(field, &other)),
    }
}
