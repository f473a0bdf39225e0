//! The transactional outbox (table `hookline_outbox`, migration `0120_outbox.sql`): the CI
//! system records a transition in the same transaction as the build's state change, so a
//! committed state change always has its transition, and `hookline-producer relay` publishes it.
//!
//! Two sides, one table:
//! - the CI's: [`Outbox::record`] on its own `sqlx` transaction (or the SQL function
//!   `hookline_outbox_record(build_id, status[, facts[, occurred_at]])`, or a plain `INSERT`);
//! - the relay's: [`Outbox::claim`] a batch in id order with `FOR UPDATE SKIP LOCKED`, then
//!   [`Outbox::delete`] what Kafka acknowledged and [`Outbox::bury`] what can never be
//!   published, and commit. A relay that dies before its commit leaves its rows to the next.
//!
//! Order: a build's rows are published oldest first, and by one relay at a time. A claim skips
//! rows other relays hold, and then drops every row of its own that has an older row of the
//! same build it does not hold: that older row is in another relay's hands, and this build
//! waits until that relay has committed.

use std::collections::{HashMap, HashSet};
use std::ops::DerefMut;

use chrono::{DateTime, Utc};
use hookline_schemas::{BuildStatus, TransitionFacts};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgExecutor, Row};
use uuid::Uuid;

use crate::store::StoreError;

/// The `LISTEN` channel the insert trigger notifies at commit.
pub const CHANNEL: &str = "hookline_outbox";

/// A transition as the CI system records it.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxTransition {
    pub build_id: i64,
    pub status: BuildStatus,
    /// When it happened; the transaction's start (`now()`) when `None`.
    pub occurred_at: Option<DateTime<Utc>>,
    /// The facts at the transition; `None` reads them from the build row as this transaction
    /// sees it (write the build row first).
    pub facts: Option<TransitionFacts>,
}

impl OutboxTransition {
    pub fn new(build_id: i64, status: BuildStatus) -> Self {
        Self {
            build_id,
            status,
            occurred_at: None,
            facts: None,
        }
    }
}

/// One row as the relay claims it. Nothing in it is decoded in a way that can fail or panic:
/// a value the relay cannot use (a time of `infinity`, facts no `f64` can hold) stays in the
/// row as the database prints it, and the relay sets that row aside on its own.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRow {
    pub id: i64,
    pub event_id: Uuid,
    pub build_id: i64,
    /// As written; the relay parses it (a CHECK constraint keeps it to the six known names).
    pub status: String,
    pub occurred_at: Moment,
    /// The facts as JSON text, as stored (`NULL`: read from the build row when the relay
    /// publishes); the relay parses them row by row.
    pub facts: Option<String>,
    /// When the row was inserted (`clock_timestamp()`, close to the CI's commit).
    pub created_at: Moment,
}

/// A `timestamptz` as the relay reads it: a time, or the value as PostgreSQL prints it when it
/// is none an event can carry (`infinity`, `-infinity`, or beyond the year 250,000, where
/// chrono and Avro's microseconds end). Migration 0201 refuses such values in new rows; rows
/// written before it may still hold them.
#[derive(Debug, Clone, PartialEq)]
pub enum Moment {
    At(DateTime<Utc>),
    NotATime(String),
}

impl Moment {
    pub fn at(&self) -> Option<DateTime<Utc>> {
        match self {
            Moment::At(at) => Some(*at),
            Moment::NotATime(_) => None,
        }
    }
}

/// What is waiting in the outbox.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Depth {
    pub rows: i64,
    /// Age of the oldest row in seconds (0 when empty), by the database's clock.
    pub oldest_age_secs: f64,
    /// Rows moved to `hookline_outbox_dead`.
    pub dead: i64,
}

/// The outbox's SQL, for both sides.
#[derive(Debug, Clone, Copy)]
pub struct Outbox;

/// Times outside +-8e12 s from 1970 (about the year 250,000) come back as NULL with their
/// text beside them: sqlx's chrono decode panics on `infinity` and past chrono's range, and
/// Avro's timestamp-micros ends near there too.
///
/// Only the lock is in SQL; which claimed rows may go (none with an older row of its build
/// outside the claim) is decided by [`Outbox::claim`] from [`OLDER_SQL`]'s answer. The one
/// query that did both (an anti join of the table against the claimed set) was planned, with
/// the statistics of a near-empty outbox, as nested loops cubic in the outbox's depth: a
/// 5,000- or 20,000-row backlog kept every claim running for minutes with nothing published.
const CLAIM_SQL: &str = r#"
SELECT id, event_id, build_id, status,
       CASE WHEN extract(epoch FROM occurred_at) BETWEEN -8e12 AND 8e12
            THEN occurred_at END AS occurred_at,
       occurred_at::text AS occurred_at_text,
       facts::text AS facts,
       CASE WHEN extract(epoch FROM created_at) BETWEEN -8e12 AND 8e12
            THEN created_at END AS created_at,
       created_at::text AS created_at_text
FROM hookline_outbox
ORDER BY id
LIMIT $1
FOR UPDATE SKIP LOCKED
"#;

/// The rows of the claimed builds older than the newest claimed row: one index range per
/// build, linear whatever the plan.
const OLDER_SQL: &str = r#"
SELECT build_id, id FROM hookline_outbox WHERE build_id = ANY($1) AND id < $2
"#;

fn moment(row: &PgRow, column: &str) -> Result<Moment, sqlx::Error> {
    Ok(match row.try_get::<Option<DateTime<Utc>>, _>(column)? {
        Some(at) => Moment::At(at),
        None => Moment::NotATime(row.try_get(format!("{column}_text").as_str())?),
    })
}

impl Outbox {
    /// Records `transition` in the caller's transaction (`Outbox::record(&mut *tx, &t)`) and
    /// returns its event id. It becomes visible to the relay when the transaction commits, and
    /// vanishes with it on rollback. Write the build row before this call: without facts, they
    /// are read from it, and the build row's lock orders one build's rows by commit.
    pub async fn record<'c>(
        executor: impl PgExecutor<'c>,
        transition: &OutboxTransition,
    ) -> Result<Uuid, StoreError> {
        let facts = transition
            .facts
            .as_ref()
            .map(serde_json::to_value)
            .transpose()
            .map_err(|e| StoreError::Invalid(format!("facts: {e}")))?;
        let row = sqlx::query(
            "SELECT hookline_outbox_record($1, $2, $3, COALESCE($4, now())) AS event_id",
        )
        .bind(transition.build_id)
        .bind(transition.status.as_str())
        .bind(facts)
        .bind(transition.occurred_at)
        .fetch_one(executor)
        .await?;
        Ok(row.try_get("event_id")?)
    }

    /// Locks and returns up to `limit` rows in id order that no other relay holds, without the
    /// rows of builds whose older rows another relay holds (see the module's ordering note).
    /// The locks last until the caller's transaction ends.
    pub async fn claim(
        mut conn: impl DerefMut<Target = PgConnection>,
        limit: i64,
    ) -> Result<Vec<OutboxRow>, StoreError> {
        let rows = sqlx::query(CLAIM_SQL)
            .bind(limit)
            .fetch_all(&mut *conn)
            .await?;
        let rows: Vec<OutboxRow> = rows
            .iter()
            .map(|r| {
                Ok(OutboxRow {
                    id: r.try_get("id")?,
                    event_id: r.try_get("event_id")?,
                    build_id: r.try_get("build_id")?,
                    status: r.try_get("status")?,
                    occurred_at: moment(r, "occurred_at")?,
                    facts: r.try_get("facts")?,
                    created_at: moment(r, "created_at")?,
                })
            })
            .collect::<Result<_, sqlx::Error>>()?;
        let Some(newest) = rows.iter().map(|r| r.id).max() else {
            return Ok(rows);
        };
        let mut builds: Vec<i64> = rows.iter().map(|r| r.build_id).collect();
        builds.sort_unstable();
        builds.dedup();
        let older: Vec<(i64, i64)> = sqlx::query_as(OLDER_SQL)
            .bind(&builds)
            .bind(newest)
            .fetch_all(&mut *conn)
            .await?;
        // A row another relay holds (or one this claim's snapshot cannot see yet): the build's
        // claimed rows after it wait for a later claim.
        let claimed: HashSet<i64> = rows.iter().map(|r| r.id).collect();
        let mut first_held: HashMap<i64, i64> = HashMap::new();
        for (build, id) in older {
            if !claimed.contains(&id) {
                let held = first_held.entry(build).or_insert(id);
                *held = (*held).min(id);
            }
        }
        Ok(rows
            .into_iter()
            .filter(|r| first_held.get(&r.build_id).is_none_or(|held| *held > r.id))
            .collect())
    }

    /// Deletes published rows.
    pub async fn delete<'c>(executor: impl PgExecutor<'c>, ids: &[i64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        sqlx::query("DELETE FROM hookline_outbox WHERE id = ANY($1)")
            .bind(ids)
            .execute(executor)
            .await?;
        Ok(())
    }

    /// Moves a row that can never be published to `hookline_outbox_dead` with the reason.
    pub async fn bury<'c>(
        executor: impl PgExecutor<'c>,
        id: i64,
        reason: &str,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "WITH gone AS (DELETE FROM hookline_outbox WHERE id = $1 RETURNING *)
             INSERT INTO hookline_outbox_dead
                 (id, event_id, build_id, status, occurred_at, facts, created_at, reason)
             SELECT id, event_id, build_id, status, occurred_at, facts, created_at, $2 FROM gone",
        )
        .bind(id)
        .bind(reason)
        .execute(executor)
        .await?;
        Ok(())
    }

    /// Rows waiting, the oldest one's age, and the dead rows.
    pub async fn depth<'c>(executor: impl PgExecutor<'c>) -> Result<Depth, StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT count(*) FROM hookline_outbox) AS rows,
                    COALESCE((SELECT EXTRACT(EPOCH FROM clock_timestamp() - min(created_at))::float8
                              FROM hookline_outbox WHERE isfinite(created_at)), 0) AS oldest,
                    (SELECT count(*) FROM hookline_outbox_dead) AS dead",
        )
        .fetch_one(executor)
        .await?;
        Ok(Depth {
            rows: row.try_get("rows")?,
            oldest_age_secs: row.try_get("oldest")?,
            dead: row.try_get("dead")?,
        })
    }
}
