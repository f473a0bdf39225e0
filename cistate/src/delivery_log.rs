//! The delivery log (table `delivery_log`, migration `0140_delivery_log.sql`): one row per
//! attempt to deliver to a hook, as GitLab keeps `web_hook_logs`, for the operator asking "did
//! they get it, and what did they answer".
//!
//! Three sides, one table:
//! - writing: [`append`] a batch of [`DeliveryLogEntry`] (the consumer batches attempts off the
//!   delivery path and drops rows with a counter when the database is slow, never blocking a
//!   delivery);
//! - reading: [`recent`] (filtered by [`DeliveryLogQuery`], newest first, paged) for
//!   `hooks log` and the hooks API's events route; [`get`] and [`find`] for one entry (resend);
//! - retention: [`ensure_partitions`] creates the coming days' partitions, [`prune`] drops the
//!   days past the retention. Partitions are named `delivery_log_pYYYYMMDD` (UTC days).
//!
//! The entry is already redacted and cut to GitLab's limits when it reaches this module: the
//! consumer, which knows the secrets, masks them.

use chrono::{DateTime, Days, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{PgExecutor, PgPool, Row};
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
///
/// One statement whatever the batch's size: each column travels as one array and `UNNEST` turns
/// them back into rows. A multi-row `VALUES` list would be a new statement (18 parameters a row)
/// for every batch size, parsed and planned each time by the server that also serves the CI
/// state; this one is prepared once per connection.
pub async fn append<'e>(
    db: impl PgExecutor<'e>,
    entries: &[DeliveryLogEntry],
) -> Result<u64, StoreError> {
    if entries.is_empty() {
        return Ok(0);
    }
    fn column<'a, T>(
        entries: &'a [DeliveryLogEntry],
        f: impl Fn(&'a DeliveryLogEntry) -> T,
    ) -> Vec<T> {
        entries.iter().map(f).collect()
    }
    let result = sqlx::query(
        "INSERT INTO delivery_log (attempted_at, hook_id, project_id, build_id, event_id, \
         idempotency_key, trigger, attempt, url, request_headers, request_body, \
         request_body_sha256, request_body_size, response_status, internal_error, \
         response_headers, response_body, duration_ms) \
         SELECT * FROM UNNEST($1::timestamptz[], $2::bigint[], $3::bigint[], $4::bigint[], \
         $5::uuid[], $6::text[], $7::text[], $8::int[], $9::text[], $10::jsonb[], $11::text[], \
         $12::text[], $13::int[], $14::int[], $15::text[], $16::jsonb[], $17::text[], $18::int[])",
    )
    .bind(column(entries, |e| e.attempted_at))
    .bind(column(entries, |e| e.hook_id))
    .bind(column(entries, |e| e.project_id))
    .bind(column(entries, |e| e.build_id))
    .bind(column(entries, |e| e.event_id))
    .bind(column(entries, |e| e.idempotency_key.as_str()))
    .bind(column(entries, |e| e.trigger.as_str()))
    .bind(column(entries, |e| e.attempt))
    .bind(column(entries, |e| e.url.as_str()))
    .bind(column(entries, |e| &e.request_headers))
    .bind(column(entries, |e| e.request_body.as_deref()))
    .bind(column(entries, |e| e.request_body_sha256.as_str()))
    .bind(column(entries, |e| e.request_body_size))
    .bind(column(entries, |e| e.response_status))
    .bind(column(entries, |e| e.internal_error.as_deref()))
    .bind(column(entries, |e| e.response_headers.as_ref()))
    .bind(column(entries, |e| e.response_body.as_deref()))
    .bind(column(entries, |e| e.duration_ms))
    .execute(db)
    .await?;
    Ok(result.rows_affected())
}

/// [`append`] in a transaction whose statements the server cancels after `timeout` (waiting
/// for a lock included): the batch is then not written, and the caller counts it dropped.
pub async fn append_within(
    db: &PgPool,
    entries: &[DeliveryLogEntry],
    timeout: std::time::Duration,
) -> Result<u64, StoreError> {
    let mut tx = db.begin().await?;
    // Both settings last until the transaction ends. The log is best effort already (rows are
    // dropped rather than delay a delivery), so its commits need not wait for the WAL to reach
    // the disk: a server crash may lose the last moments of rows, never leave one half written.
    sqlx::query(
        "SELECT set_config('statement_timeout', $1, true), \
         set_config('synchronous_commit', 'off', true)",
    )
    .bind(timeout.as_millis().max(1).to_string())
    .execute(&mut *tx)
    .await?;
    let written = append(&mut *tx, entries).await?;
    tx.commit().await?;
    Ok(written)
}

/// Writes one entry and returns its id (an operator's test or resend, whose caller shows it).
pub async fn insert<'e>(
    db: impl PgExecutor<'e>,
    entry: &DeliveryLogEntry,
) -> Result<i64, StoreError> {
    let e = entry;
    Ok(sqlx::query_scalar(
        "INSERT INTO delivery_log (attempted_at, hook_id, project_id, build_id, event_id, \
         idempotency_key, trigger, attempt, url, request_headers, request_body, \
         request_body_sha256, request_body_size, response_status, internal_error, \
         response_headers, response_body, duration_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
         RETURNING id",
    )
    .bind(e.attempted_at)
    .bind(e.hook_id)
    .bind(e.project_id)
    .bind(e.build_id)
    .bind(e.event_id)
    .bind(&e.idempotency_key)
    .bind(e.trigger.as_str())
    .bind(e.attempt)
    .bind(&e.url)
    .bind(&e.request_headers)
    .bind(&e.request_body)
    .bind(&e.request_body_sha256)
    .bind(e.request_body_size)
    .bind(e.response_status)
    .bind(&e.internal_error)
    .bind(&e.response_headers)
    .bind(&e.response_body)
    .bind(e.duration_ms)
    .fetch_one(db)
    .await?)
}

/// Which response statuses to show, as GitLab's hook events API filters them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusFilter {
    /// 2xx.
    Successful,
    /// 4xx.
    ClientFailure,
    /// 5xx.
    ServerFailure,
    /// Exactly these codes.
    Codes(Vec<i32>),
}

/// What [`recent`] returns: one hook's entries, newest first.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DeliveryLogQuery {
    pub hook_id: i64,
    /// Only attempts that did not get a 2xx (no answer at all included).
    pub failed_only: bool,
    /// Only attempts of this event.
    pub event_id: Option<Uuid>,
    /// Only answers with these statuses (attempts without an answer never match).
    pub status: Option<StatusFilter>,
    /// Only entries older than this one (keyset paging: pass the last id of the previous page).
    pub before_id: Option<i64>,
    /// 1-based page of `limit` entries (offset paging, as GitLab's `page`); ignored when 0.
    pub page: u32,
    /// Entries per page; 0 means [`DEFAULT_LIMIT`], and at most [`MAX_LIMIT`].
    pub limit: u32,
}

/// Entries per page when the query names none (GitLab's `per_page` default).
pub const DEFAULT_LIMIT: u32 = 20;
/// The most entries one page returns (GitLab's `per_page` maximum).
pub const MAX_LIMIT: u32 = 100;

const COLUMNS: &str = "id, attempted_at, hook_id, project_id, build_id, event_id, idempotency_key, \
     trigger, attempt, url, request_headers, request_body, request_body_sha256, \
     request_body_size, response_status, internal_error, response_headers, response_body, \
     duration_ms";

/// One hook's entries matching `query`, newest first.
pub async fn recent<'e>(
    db: impl PgExecutor<'e>,
    query: &DeliveryLogQuery,
) -> Result<Vec<DeliveryLogEntry>, StoreError> {
    let limit = match query.limit {
        0 => DEFAULT_LIMIT,
        n => n.min(MAX_LIMIT),
    };
    let mut q = sqlx::QueryBuilder::new(format!(
        "SELECT {COLUMNS} FROM delivery_log WHERE hook_id = "
    ));
    q.push_bind(query.hook_id);
    if query.failed_only {
        q.push(" AND (response_status IS NULL OR response_status NOT BETWEEN 200 AND 299)");
    }
    if let Some(event_id) = query.event_id {
        q.push(" AND event_id = ").push_bind(event_id);
    }
    match &query.status {
        None => {}
        Some(StatusFilter::Successful) => {
            q.push(" AND response_status BETWEEN 200 AND 299");
        }
        Some(StatusFilter::ClientFailure) => {
            q.push(" AND response_status BETWEEN 400 AND 499");
        }
        Some(StatusFilter::ServerFailure) => {
            q.push(" AND response_status BETWEEN 500 AND 599");
        }
        Some(StatusFilter::Codes(codes)) => {
            q.push(" AND response_status = ANY(")
                .push_bind(codes.clone())
                .push(")");
        }
    }
    if let Some(before) = query.before_id {
        q.push(" AND id < ").push_bind(before);
    }
    // The (hook_id, attempted_at DESC) index serves this order; ids grow with time within a
    // writer, so `before_id` pages follow it.
    q.push(" ORDER BY attempted_at DESC, id DESC LIMIT ")
        .push_bind(i64::from(limit));
    if query.page > 1 {
        q.push(" OFFSET ")
            .push_bind(i64::from(query.page - 1) * i64::from(limit));
    }
    let rows = q.build().fetch_all(db).await?;
    rows.iter().map(entry).collect()
}

/// One entry of one hook; `None` when there is none with that id for that hook.
pub async fn get<'e>(
    db: impl PgExecutor<'e>,
    hook_id: i64,
    log_id: i64,
) -> Result<Option<DeliveryLogEntry>, StoreError> {
    let row = sqlx::query(&format!(
        "SELECT {COLUMNS} FROM delivery_log WHERE hook_id = $1 AND id = $2"
    ))
    .bind(hook_id)
    .bind(log_id)
    .fetch_optional(db)
    .await?;
    row.as_ref().map(entry).transpose()
}

/// One entry by its id alone, whatever the hook (`hooks resend LOG_ID`).
pub async fn find<'e>(
    db: impl PgExecutor<'e>,
    log_id: i64,
) -> Result<Option<DeliveryLogEntry>, StoreError> {
    let row = sqlx::query(&format!("SELECT {COLUMNS} FROM delivery_log WHERE id = $1"))
        .bind(log_id)
        .fetch_optional(db)
        .await?;
    row.as_ref().map(entry).transpose()
}

fn entry(row: &PgRow) -> Result<DeliveryLogEntry, StoreError> {
    let trigger: String = row.try_get("trigger")?;
    Ok(DeliveryLogEntry {
        id: row.try_get("id")?,
        attempted_at: row
            .try_get::<crate::StoredTime, _>("attempted_at")?
            .saturating(),
        hook_id: row.try_get("hook_id")?,
        project_id: row.try_get("project_id")?,
        build_id: row.try_get("build_id")?,
        event_id: row.try_get("event_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        trigger: LogTrigger::parse(&trigger)
            .ok_or_else(|| StoreError::Invalid(format!("unknown log trigger {trigger:?}")))?,
        attempt: row.try_get("attempt")?,
        url: row.try_get("url")?,
        request_headers: row.try_get("request_headers")?,
        request_body: row.try_get("request_body")?,
        request_body_sha256: row.try_get("request_body_sha256")?,
        request_body_size: row.try_get("request_body_size")?,
        response_status: row.try_get("response_status")?,
        internal_error: row.try_get("internal_error")?,
        response_headers: row.try_get("response_headers")?,
        response_body: row.try_get("response_body")?,
        duration_ms: row.try_get("duration_ms")?,
    })
}

/// The name of the partition holding `day` (UTC).
pub fn partition_name(day: NaiveDate) -> String {
    format!("delivery_log_p{}", day.format("%Y%m%d"))
}

/// Creates the partition of `day` if it is missing. Rows of that day already in the default
/// partition (written while the partition did not exist) are moved into it first: PostgreSQL
/// refuses to create a partition whose rows sit in the default one. Several consumers may do
/// this at once: an advisory lock per day makes them take turns, and the second finds the table.
/// True when this call created it.
pub async fn create_partition(db: &PgPool, day: NaiveDate) -> Result<bool, StoreError> {
    let name = partition_name(day);
    let from = day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc();
    let to = from + chrono::Duration::days(1);
    let mut tx = db.begin().await?;
    // Never queue long behind other locks: inserts would queue behind this DDL in turn.
    sqlx::query("SET LOCAL lock_timeout = '5s'")
        .execute(&mut *tx)
        .await?;
    // Keyed by the day (and the schema, through current_schema) so other days go on at once.
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext(current_schema() || $1))")
        .bind(&name)
        .execute(&mut *tx)
        .await?;
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(&name)
        .fetch_one(&mut *tx)
        .await?;
    if exists {
        return Ok(false);
    }
    // DDL takes no bind parameters: the bounds are formatted from typed dates, never from input.
    let (from_lit, to_lit) = (from.to_rfc3339(), to.to_rfc3339());
    sqlx::query(&format!(
        "CREATE TABLE {name} (LIKE delivery_log INCLUDING DEFAULTS INCLUDING CONSTRAINTS \
         INCLUDING COMPRESSION INCLUDING STORAGE)"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "WITH moved AS (DELETE FROM delivery_log_default \
         WHERE attempted_at >= '{from_lit}' AND attempted_at < '{to_lit}' RETURNING *) \
         INSERT INTO {name} SELECT * FROM moved"
    ))
    .execute(&mut *tx)
    .await?;
    sqlx::query(&format!(
        "ALTER TABLE delivery_log ATTACH PARTITION {name} \
         FOR VALUES FROM ('{from_lit}') TO ('{to_lit}')"
    ))
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Creates the partitions of `today` and the `days_ahead` days after it; returns how many were
/// created.
pub async fn ensure_partitions(
    db: &PgPool,
    today: NaiveDate,
    days_ahead: u32,
) -> Result<u32, StoreError> {
    let mut created = 0;
    for n in 0..=days_ahead {
        let day = today
            .checked_add_days(Days::new(n.into()))
            .ok_or_else(|| StoreError::Invalid(format!("no day {n} days after {today}")))?;
        if create_partition(db, day).await? {
            created += 1;
        }
    }
    Ok(created)
}

/// What [`prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Daily partitions dropped.
    pub partitions: u32,
    /// Rows deleted from the default partition.
    pub default_rows: u64,
}

/// Drops the daily partitions of days before `keep_from` (whole days, UTC), and deletes the
/// default partition's rows older than it.
pub async fn prune(db: &PgPool, keep_from: NaiveDate) -> Result<Pruned, StoreError> {
    let children: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i \
         JOIN pg_class c ON c.oid = i.inhrelid \
         WHERE i.inhparent = 'delivery_log'::regclass",
    )
    .fetch_all(db)
    .await?;
    let mut pruned = Pruned::default();
    for child in children {
        let Some(day) = child
            .strip_prefix("delivery_log_p")
            .and_then(|d| NaiveDate::parse_from_str(d, "%Y%m%d").ok())
        else {
            continue;
        };
        if day < keep_from {
            // Dropping a partition locks the whole table briefly; wait for it 5 s at most.
            let mut tx = db.begin().await?;
            sqlx::query("SET LOCAL lock_timeout = '5s'")
                .execute(&mut *tx)
                .await?;
            sqlx::query(&format!("DROP TABLE IF EXISTS {child}"))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            pruned.partitions += 1;
        }
    }
    let cutoff = keep_from
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    pruned.default_rows = sqlx::query("DELETE FROM delivery_log_default WHERE attempted_at < $1")
        .bind(cutoff)
        .execute(db)
        .await?
        .rows_affected();
    Ok(pruned)
}
