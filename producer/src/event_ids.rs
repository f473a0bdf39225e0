//! The ids of recent events, each with a digest of the transition it carried, so an id is never
//! used for two different transitions.
//!
//! A receiver de-duplicates on the `Idempotency-Key`, which is derived from the event id: a
//! second transition sent under a reused id would be silently dropped there. So before emitting,
//! the emitter looks the id up: unknown, it emits and records it; known with the same digest, the
//! request is a retry whose answer was lost, and it gets the first emission's partition and
//! offset without a new event; known with another digest, it is refused (`409`).
//!
//! The digest covers what the client sent (build, status, `occurred_at`, facts), not what the
//! emitter filled in (a default `occurred_at` is "now" and differs on every retry).
//!
//! Rows are kept for a retention window (`--event-id-retention`, 7 days) and pruned by
//! [`prune_periodically`]. Two requests with the same new id at the same moment can both emit
//! (the look-up and the record are not one transaction); the first record wins, and the
//! receiver's de-duplication covers the identical case.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, SecondsFormat, Utc};
use hookline_schemas::{BuildStatus, PayloadTiming, TransitionFacts};
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What is kept of one emitted event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub event_id: Uuid,
    pub digest: [u8; 32],
    pub partition: i32,
    pub offset: i64,
    pub timing: PayloadTiming,
    pub payload_bytes: usize,
}

/// The digest of a transition as the client sent it.
pub fn digest(
    build_id: i64,
    status: BuildStatus,
    occurred_at: Option<DateTime<Utc>>,
    facts: Option<&TransitionFacts>,
) -> [u8; 32] {
    let time = |t: Option<DateTime<Utc>>| t.map(|t| t.to_rfc3339_opts(SecondsFormat::Nanos, true));
    // A fixed field order and one spelling per timestamp: equal transitions, equal bytes.
    let canonical = serde_json::json!([
        build_id,
        status.as_str(),
        time(occurred_at),
        facts.map(|f| serde_json::json!([
            time(f.started_at),
            time(f.finished_at),
            f.duration,
            f.queued_duration,
            f.failure_reason,
        ])),
    ]);
    Sha256::digest(canonical.to_string().as_bytes()).into()
}

/// Where the recent ids are kept.
#[async_trait]
pub trait EventIds: Send + Sync + fmt::Debug {
    /// The records of those of `ids` that are known.
    async fn lookup(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Recorded>, String>;
    /// Records emitted events; an id already recorded keeps its first record.
    async fn record(&self, records: &[Recorded]) -> Result<(), String>;
    /// Forgets records older than `retention`; returns how many.
    async fn prune(&self, retention: Duration) -> Result<u64, String>;
}

/// In PostgreSQL (`producer_event_ids`, migration `0110`), shared by every producer instance.
#[derive(Debug, Clone)]
pub struct PgEventIds {
    pool: PgPool,
}

impl PgEventIds {
    /// Uses a pool whose database has the migrations applied (`PgStore::connect` does that).
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }
}

fn timing_name(timing: PayloadTiming) -> &'static str {
    timing.as_str()
}

fn timing_of(name: &str) -> PayloadTiming {
    if name == PayloadTiming::Inline.as_str() {
        PayloadTiming::Inline
    } else {
        PayloadTiming::Deferred
    }
}

#[async_trait]
impl EventIds for PgEventIds {
    async fn lookup(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Recorded>, String> {
        if ids.is_empty() {
            return Ok(HashMap::new());
        }
        let rows = sqlx::query(
            "SELECT event_id, digest, partition, \"offset\", timing, payload_bytes \
             FROM producer_event_ids WHERE event_id = ANY($1)",
        )
        .bind(ids)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| format!("event id store: {e}"))?;
        rows.iter()
            .map(|row| {
                let digest: Vec<u8> = row.try_get("digest")?;
                let timing: String = row.try_get("timing")?;
                let payload_bytes: i32 = row.try_get("payload_bytes")?;
                let record = Recorded {
                    event_id: row.try_get("event_id")?,
                    digest: digest.try_into().unwrap_or([0; 32]),
                    partition: row.try_get("partition")?,
                    offset: row.try_get("offset")?,
                    timing: timing_of(&timing),
                    payload_bytes: payload_bytes.max(0) as usize,
                };
                Ok((record.event_id, record))
            })
            .collect::<Result<_, sqlx::Error>>()
            .map_err(|e| format!("event id store: {e}"))
    }

    async fn record(&self, records: &[Recorded]) -> Result<(), String> {
        if records.is_empty() {
            return Ok(());
        }
        let ids: Vec<Uuid> = records.iter().map(|r| r.event_id).collect();
        let digests: Vec<Vec<u8>> = records.iter().map(|r| r.digest.to_vec()).collect();
        let partitions: Vec<i32> = records.iter().map(|r| r.partition).collect();
        let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
        let timings: Vec<&str> = records.iter().map(|r| timing_name(r.timing)).collect();
        let sizes: Vec<i32> = records
            .iter()
            .map(|r| i32::try_from(r.payload_bytes).unwrap_or(i32::MAX))
            .collect();
        sqlx::query(
            "INSERT INTO producer_event_ids (event_id, digest, partition, \"offset\", timing, payload_bytes) \
             SELECT * FROM UNNEST($1::uuid[], $2::bytea[], $3::int[], $4::bigint[], $5::text[], $6::int[]) \
             ON CONFLICT (event_id) DO NOTHING",
        )
        .bind(&ids)
        .bind(&digests)
        .bind(&partitions)
        .bind(&offsets)
        .bind(&timings)
        .bind(&sizes)
        .execute(&self.pool)
        .await
        .map_err(|e| format!("event id store: {e}"))?;
        Ok(())
    }

    async fn prune(&self, retention: Duration) -> Result<u64, String> {
        let done = sqlx::query(
            "DELETE FROM producer_event_ids WHERE emitted_at < now() - $1 * interval '1 millisecond'",
        )
        .bind(retention.as_millis() as f64)
        .execute(&self.pool)
        .await
        .map_err(|e| format!("event id store: {e}"))?;
        Ok(done.rows_affected())
    }
}

/// In memory, for tests and embedded use: one process's ids only.
#[derive(Debug, Default)]
pub struct MemoryEventIds {
    records: Mutex<HashMap<Uuid, (std::time::Instant, Recorded)>>,
}

impl MemoryEventIds {
    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, (std::time::Instant, Recorded)>> {
        self.records.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl EventIds for MemoryEventIds {
    async fn lookup(&self, ids: &[Uuid]) -> Result<HashMap<Uuid, Recorded>, String> {
        let records = self.records();
        Ok(ids
            .iter()
            .filter_map(|id| records.get(id).map(|(_, r)| (*id, r.clone())))
            .collect())
    }

    async fn record(&self, records: &[Recorded]) -> Result<(), String> {
        let mut known = self.records();
        for record in records {
            known
                .entry(record.event_id)
                .or_insert_with(|| (std::time::Instant::now(), record.clone()));
        }
        Ok(())
    }

    async fn prune(&self, retention: Duration) -> Result<u64, String> {
        let mut known = self.records();
        let before = known.len();
        known.retain(|_, (at, _)| at.elapsed() < retention);
        Ok((before - known.len()) as u64)
    }
}

/// Prunes now and then every `every` until `shutdown`.
pub async fn prune_periodically(
    ids: Arc<dyn EventIds>,
    retention: Duration,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        match ids.prune(retention).await {
            Ok(0) => {}
            Ok(pruned) => tracing::debug!(pruned, "old event ids pruned"),
            Err(error) => tracing::warn!(%error, "pruning old event ids failed; retried later"),
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = shutdown.cancelled() => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recorded(id: Uuid, digest: u8, offset: i64) -> Recorded {
        Recorded {
            event_id: id,
            digest: [digest; 32],
            partition: 0,
            offset,
            timing: PayloadTiming::Deferred,
            payload_bytes: 0,
        }
    }

    #[tokio::test]
    async fn the_first_record_of_an_id_wins_until_it_is_pruned() {
        let store = MemoryEventIds::default();
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        store.record(&[recorded(a, 1, 10)]).await.unwrap();
        store
            .record(&[recorded(a, 2, 11), recorded(b, 3, 12)])
            .await
            .unwrap();
        let known = store.lookup(&[a, b, Uuid::new_v4()]).await.unwrap();
        assert_eq!(known.len(), 2);
        assert_eq!((known[&a].digest[0], known[&a].offset), (1, 10));
        assert_eq!(store.prune(Duration::from_secs(3600)).await.unwrap(), 0);
        assert_eq!(store.prune(Duration::ZERO).await.unwrap(), 2);
        assert!(store.lookup(&[a, b]).await.unwrap().is_empty());
    }

    #[test]
    fn the_digest_covers_what_the_client_sent_and_nothing_else() {
        let at: DateTime<Utc> = "2026-11-27T20:21:00.5Z".parse().unwrap();
        let same_instant: DateTime<Utc> = "2026-11-27T21:21:00.500+01:00".parse().unwrap();
        let facts = TransitionFacts {
            failure_reason: Some("script_failure".into()),
            ..TransitionFacts::default()
        };
        let base = digest(7, BuildStatus::Failed, Some(at), Some(&facts));
        assert_eq!(
            base,
            digest(7, BuildStatus::Failed, Some(same_instant), Some(&facts))
        );
        assert_ne!(base, digest(8, BuildStatus::Failed, Some(at), Some(&facts)));
        assert_ne!(
            base,
            digest(7, BuildStatus::Success, Some(at), Some(&facts))
        );
        assert_ne!(base, digest(7, BuildStatus::Failed, None, Some(&facts)));
        assert_ne!(base, digest(7, BuildStatus::Failed, Some(at), None));
        let other = TransitionFacts {
            failure_reason: Some("api_failure".into()),
            ..facts.clone()
        };
        assert_ne!(base, digest(7, BuildStatus::Failed, Some(at), Some(&other)));
    }
}
