//! The shapes of the API's answers and the routes its OpenAPI 3.1 document describes (served at
//! `GET /openapi.json`).
//!
//! # Layout
//!
//! ```text
//! ingest.rs handlers (#[utoipa::path]: method, path, statuses, headers)
//!   + api.rs request types (TransitionBody, FactsBody: #[derive(ToSchema)])
//!   + the answer shapes below (the handlers build them as JSON values)
//!   --> ingest::ApiDoc::openapi() --> GET /openapi.json
//! ```
//!
//! This module imports nothing of the crate: the document itself (`ingest::ApiDoc`) lives beside
//! the router that serves it, so the handlers, their document and the route stay one place.
//!
//! The handlers answer with `serde_json::Value`s built in `api.rs`, so the answers' shapes are
//! written down here, once, as types that exist only for the document; the schemathesis check
//! (`scripts/schemathesis`) holds the live producer to them. `/metrics` is left out: it is
//! Prometheus text behind its own token rule, not part of the transition contract.

use serde::Serialize;
use utoipa::ToSchema;
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
