//! The vocabulary between the simulated CI and what it feeds: a transition as sent, the
//! receiving side's answer and the [`Sink`] that takes transitions (the `Witness` told the truth
//! of each one is in [`crate::facts`], beside the facts it is given).

use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_schemas::{BuildStatus, PayloadTiming, TransitionFacts};
use uuid::Uuid;

use crate::error::CliError;

/// One transition, after its state was committed: what the sink sends on.
#[derive(Debug, Clone, PartialEq)]
pub struct TransitionSent {
    pub event_id: Uuid,
    pub build_id: i64,
    pub project_id: i64,
    pub pipeline_id: i64,
    pub status: BuildStatus,
    pub occurred_at: DateTime<Utc>,
    pub facts: TransitionFacts,
}

/// What the receiving side said about a transition it took.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Accepted {
    /// How the payload was timed, when the sink knows.
    pub timing: Option<PayloadTiming>,
    /// The producer's render time (inline only).
    pub render_time: Option<Duration>,
    pub payload_bytes: Option<usize>,
}

/// Where transitions go: the in-process producer (demo) or a producer's HTTP API (simulate).
#[async_trait]
pub trait Sink: Send + Sync {
    async fn send(&self, transition: &TransitionSent) -> Result<Accepted, CliError>;
}
