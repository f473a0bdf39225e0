//! `BuildEvent`: one transition of one build, as plain data (its Avro form is in `avro`).

use std::fmt;
use std::str::FromStr;

use apache_avro::Schema;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

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

    pub(crate) fn index(self) -> u32 {
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
