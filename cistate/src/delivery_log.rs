//! The delivery log (table `delivery_log`, migration `0140_delivery_log.sql`): one row per
//! attempt to deliver to a hook, as GitLab keeps `web_hook_logs`, for the operator asking "did
//! they get it, and what did they answer".
//!
//! Two sides, one table:
//! - writing: [`append`] a batch of [`DeliveryLogEntry`] (the consumer batches attempts off the
//!   delivery path and drops rows with a counter when the database is slow, never blocking a
//!   delivery);
//! - reading: [`recent`] for `hooks log` and the hooks API's events route.
//!
//! The entry is already redacted and cut to GitLab's limits when it reaches this module: the
//! consumer, which knows the secrets, masks them.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgExecutor;
use uuid::Uuid;

use crate::store::StoreError;

/// Why an attempt was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogTrigger {
    /// A delivery of a consumed event, on the main or the retry path.
    Delivery,
    /// The hooks API's or CLI's test of a hook.
    Test,
    /// An operator's resend of a logged event.
    Resend,
}

impl LogTrigger {
    pub fn as_str(self) -> &'static str {
        match self {
            LogTrigger::Delivery => "delivery",
            LogTrigger::Test => "test",
            LogTrigger::Resend => "resend",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "delivery" => Some(LogTrigger::Delivery),
            "test" => Some(LogTrigger::Test),
            "resend" => Some(LogTrigger::Resend),
            _ => None,
        }
    }
}

/// One attempt, redacted and cut to the log's limits.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeliveryLogEntry {
    /// Assigned by the database; 0 on an entry not yet written.
    pub id: i64,
    pub attempted_at: DateTime<Utc>,
    pub hook_id: i64,
    pub project_id: i64,
    pub build_id: Option<i64>,
    pub event_id: Uuid,
    pub idempotency_key: String,
    pub trigger: LogTrigger,
    /// 1 for the first attempt.
    pub attempt: i32,
    /// Credentials masked.
    pub url: String,
    /// Header name to value, secrets redacted.
    pub request_headers: serde_json::Value,
    /// `None` past the body size limit; the digest and size are always kept.
    pub request_body: Option<String>,
    /// Lower-case hex SHA-256 of the whole request body.
    pub request_body_sha256: String,
    pub request_body_size: i32,
    /// `None` when no response came: `internal_error` says why.
    pub response_status: Option<i32>,
    pub internal_error: Option<String>,
    pub response_headers: Option<serde_json::Value>,
    pub response_body: Option<String>,
    pub duration_ms: i32,
}

/// Writes a batch of entries in one statement.
pub async fn append<'e>(
    db: impl PgExecutor<'e>,
    entries: &[DeliveryLogEntry],
) -> Result<u64, StoreError> {
    if entries.is_empty() {
        return Ok(0);
    }
    let mut q = sqlx::QueryBuilder::new(
        "INSERT INTO delivery_log (attempted_at, hook_id, project_id, build_id, event_id, \
         idempotency_key, trigger, attempt, url, request_headers, request_body, \
         request_body_sha256, request_body_size, response_status, internal_error, \
         response_headers, response_body, duration_ms) ",
    );
    q.push_values(entries, |mut row, e| {
        row.push_bind(e.attempted_at)
            .push_bind(e.hook_id)
            .push_bind(e.project_id)
            .push_bind(e.build_id)
            .push_bind(e.event_id)
            .push_bind(&e.idempotency_key)
            .push_bind(e.trigger.as_str())
            .push_bind(e.attempt)
            .push_bind(&e.url)
            .push_bind(&e.request_headers)
            .push_bind(&e.request_body)
            .push_bind(&e.request_body_sha256)
            .push_bind(e.request_body_size)
            .push_bind(e.response_status)
            .push_bind(&e.internal_error)
            .push_bind(&e.response_headers)
            .push_bind(&e.response_body)
            .push_bind(e.duration_ms);
    });
    Ok(q.build().execute(db).await?.rows_affected())
}
