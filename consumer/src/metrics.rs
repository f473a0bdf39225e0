//! The consumer's Prometheus metrics, in a registry per instance so tests (and several consumers
//! in one process, as in the demo) read their own values.

use std::sync::Mutex;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// What became of one delivery attempt (or of a task that never reached an attempt).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// 2xx.
    Delivered,
    /// Failed, handed to the retry topic.
    Retried,
    /// Failed for good (4xx, refused URL) and dead-lettered.
    Final,
    /// Failed after the last retry and dead-lettered.
    Exhausted,
    /// Not attempted: the hook is backing off, or its root namespace is over its rate limit;
    /// rescheduled to when it may be called again (the reason counted in `deferred`).
    Deferred,
    /// Not attempted: the hook is permanently disabled; dead-lettered.
    HookDisabled,
    /// Not attempted: the hook was removed meanwhile; nothing left to deliver to.
    HookRemoved,
    /// Its hand-off (retry or dead letter) was refused by Kafka for good: a compact dead letter
    /// referring to the event's record was written instead (or, if that was refused too, the
    /// loss was counted in `handoffs_lost`).
    HandoffRefused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Delivered => "delivered",
            Outcome::Retried => "retried",
            Outcome::Final => "final",
            Outcome::Exhausted => "exhausted",
            Outcome::Deferred => "deferred",
            Outcome::HookDisabled => "hook_disabled",
            Outcome::HookRemoved => "hook_removed",
            Outcome::HandoffRefused => "handoff_refused",
        }
    }

    const ALL: [Outcome; 8] = [
        Outcome::Delivered,
        Outcome::Retried,
        Outcome::Final,
        Outcome::Exhausted,
        Outcome::Deferred,
        Outcome::HookDisabled,
        Outcome::HookRemoved,
        Outcome::HandoffRefused,
    ];
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PartitionLabels {
    topic: String,
    partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PathLabels {
    path: &'static str,
}

/// Every metric of one consumer instance.
#[derive(Debug)]
pub struct ConsumerMetrics {
    registry: Mutex<Registry>,
    deliveries: Family<OutcomeLabels, Counter>,
    attempt_seconds: Histogram,
    event_to_delivery_seconds: Histogram,
    stale_renders: Counter,
    events_skipped: Family<ReasonLabels, Counter>,
    retries_scheduled: Counter,
    dead_letters: Family<ReasonLabels, Counter>,
    hook_disables: Counter,
    in_flight: Gauge,
    consumer_lag: Family<PartitionLabels, Gauge>,
    assignments: Family<PathLabels, Counter>,
    fetch_pauses: Family<PathLabels, Counter>,
    stalled_seconds: Family<StallLabels, Gauge>,
    stalls: Mutex<Vec<(u64, Stall, tokio::time::Instant)>>,
    stall_ids: std::sync::atomic::AtomicU64,
    handoffs_lost: Counter,
    delivery_log_written: Counter,
    delivery_log_dropped: Counter,
    ordering: Family<ActionLabels, Counter>,
    deferred: Family<ReasonLabels, Counter>,
    retries_dropped: Family<ReasonLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

/// A wait that can outlast a dependency's outage; its label on `stalled_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stall {
    /// Waiting for the schema registry to decode a record.
    SchemaRegistry,
    /// Waiting for the CI state store (hooks, snapshots).
    Store,
    /// Waiting for Kafka to acknowledge a hand-off to the retry or dead-letter topic.
    Handoff,
    /// Waiting for an offset commit to be confirmed.
    Commit,
    /// Waiting for in-flight room: every permit is held by unfinished or uncommitted records.
    InFlightFull,
    /// Waiting for Kafka at start to check (or create) the retry and dead-letter topics.
    Topics,
}

impl Stall {
    pub fn as_str(self) -> &'static str {
        match self {
            Stall::SchemaRegistry => "schema_registry",
            Stall::Store => "store",
            Stall::Handoff => "handoff",
            Stall::Commit => "commit",
            Stall::InFlightFull => "in_flight_full",
            Stall::Topics => "topics",
        }
    }

    const ALL: [Stall; 6] = [
        Stall::SchemaRegistry,
        Stall::Store,
        Stall::Handoff,
        Stall::Commit,
        Stall::InFlightFull,
        Stall::Topics,
    ];
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StallLabels {
    reason: &'static str,
}

/// One ongoing wait, counted in `stalled_seconds` until dropped.
#[derive(Debug)]
pub(crate) struct StallGuard<'a> {
    metrics: &'a ConsumerMetrics,
    id: u64,
    reason: Stall,
    since: tokio::time::Instant,
    warned_at: Duration,
}

/// A wait this long is reported: a warning (then one per further minute) and the gauge.
pub const STALL_WARN_AFTER: Duration = Duration::from_secs(60);

impl StallGuard<'_> {
    /// Refreshes the gauge and warns once a minute past [`STALL_WARN_AFTER`]; `detail` says
    /// what the wait is for (the last error).
    pub(crate) fn still(&mut self, detail: &dyn std::fmt::Display) {
        self.metrics.refresh_stall(self.reason);
        let waited = self.since.elapsed();
        if waited >= STALL_WARN_AFTER && waited >= self.warned_at + STALL_WARN_AFTER {
            self.warned_at = waited;
            tracing::warn!(reason = self.reason.as_str(), waited_s = waited.as_secs(), %detail, "stalled: still waiting");
        }
    }
}

impl Drop for StallGuard<'_> {
    fn drop(&mut self) {
        let mut stalls = self
            .metrics
            .stalls
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        stalls.retain(|(id, ..)| *id != self.id);
        drop(stalls);
        self.metrics.refresh_stall(self.reason);
    }
}

impl Default for ConsumerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ConsumerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hookline_consumer");
        let deliveries = Family::<OutcomeLabels, Counter>::default();
        // 1 ms .. ~33 s.
        let attempt_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        // 1 ms .. ~9 h: a delivery after the last retry is still an event-to-delivery latency.
        let event_to_delivery_seconds = Histogram::new(exponential_buckets(0.001, 2.5, 22));
        let stale_renders = Counter::default();
        let events_skipped = Family::<ReasonLabels, Counter>::default();
        let retries_scheduled = Counter::default();
        let dead_letters = Family::<ReasonLabels, Counter>::default();
        let hook_disables = Counter::default();
        let in_flight = Gauge::default();
        let consumer_lag = Family::<PartitionLabels, Gauge>::default();
        let assignments = Family::<PathLabels, Counter>::default();
        let fetch_pauses = Family::<PathLabels, Counter>::default();
        let stalled_seconds = Family::<StallLabels, Gauge>::default();
        for reason in Stall::ALL {
            // Present at 0 from the start, so an alert on it has a series to watch.
            let _ = stalled_seconds.get_or_create(&StallLabels {
                reason: reason.as_str(),
            });
        }
        let handoffs_lost = Counter::default();
        let delivery_log_written = Counter::default();
        let delivery_log_dropped = Counter::default();
        let ordering = Family::<ActionLabels, Counter>::default();
        // Every series with a known label value is present at 0 from the start too: an alert's
        // `increase()` sees the first event, and the tables of docs/operating.md are checked
        // against a live scrape (tests/tests/it/monitoring.rs). Dead-letter reasons are preset by the consumer
        // (`preset_dead_letters`); lag appears per assigned partition.
        for outcome in Outcome::ALL {
            let _ = deliveries.get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            });
        }
        let _ = events_skipped.get_or_create(&ReasonLabels {
            reason: "user_blocked".to_owned(),
        });
        for path in ["main", "retry"] {
            let _ = assignments.get_or_create(&PathLabels { path });
            let _ = fetch_pauses.get_or_create(&PathLabels { path });
        }
        for action in [
            "held",
            "queued",
            "parked",
            "redriven",
            "swept",
            "collapsed",
            "already_settled",
            "unreadable",
        ] {
            let _ = ordering.get_or_create(&ActionLabels { action });
        }
        let deferred = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "deferred",
            "Deliveries not attempted yet and handed to the retry topic for later, by reason: rate_limit (the root namespace's bucket is empty: due when its token comes), hook_backoff (the hook is temporarily disabled). Neither is a failure",
            deferred.clone(),
        );
        let retries_dropped = Family::<ReasonLabels, Counter>::default();
        // Present at 0 from the start, so an alert on them has a series to watch.
        for reason in ["rate_limit", "hook_backoff"] {
            let _ = deferred.get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            });
        }
        let _ = retries_dropped.get_or_create(&ReasonLabels {
            reason: "user_blocked".to_owned(),
        });
        registry.register(
            "retries_dropped",
            "Retries not sent and not dead-lettered, by reason: user_blocked (the build's user was blocked after the first attempt)",
            retries_dropped.clone(),
        );
        registry.register(
            "ordering",
            "Strict ordering per (hook, build), by action: held (a delivery waits for a retry and holds its build's later events), queued (an event queued behind one), parked (a queued record not at its turn, parked in the store), redriven (a parked record written back to the retry topic as its turn came), swept (a parked record left first in a quiet queue by a stopped instance, written back by the sweep), collapsed (a queued event not sent: a later one of its build supersedes it, on a --collapse hook), already_settled (a record read again whose delivery was already settled), unreadable (a parked record that could not be read back; its queue moved on without it)",
            ordering.clone(),
        );
        registry.register(
            "deliveries",
            "Delivery attempts and tasks by outcome",
            deliveries.clone(),
        );
        registry.register(
            "delivery_attempt_seconds",
            "Duration of one HTTP delivery attempt",
            attempt_seconds.clone(),
        );
        registry.register(
            "event_to_delivery_seconds",
            "Time from the build transition (event occurred_at) to its successful delivery",
            event_to_delivery_seconds.clone(),
        );
        registry.register(
            "stale_renders",
            "Deferred renders whose build had moved on to another status",
            stale_renders.clone(),
        );
        registry.register(
            "events_skipped",
            "Events delivered to no hook by design (the build's user is blocked), by reason",
            events_skipped.clone(),
        );
        registry.register(
            "retries_scheduled",
            "Delivery tasks handed to the retry topic",
            retries_scheduled.clone(),
        );
        registry.register(
            "dead_letters",
            "Records and deliveries written to the dead-letter topic, by reason",
            dead_letters.clone(),
        );
        registry.register(
            "hook_disables",
            "Hooks disabled by a delivery failure (temporarily or for good)",
            hook_disables.clone(),
        );
        registry.register(
            "in_flight",
            "Records being processed (main and retry paths)",
            in_flight.clone(),
        );
        registry.register(
            "consumer_lag",
            "Messages behind the high watermark, per partition (librdkafka statistics)",
            consumer_lag.clone(),
        );
        registry.register(
            "assignments",
            "Partition assignments received, by path (main, retry): one at start, then one per rebalance that assigns partitions",
            assignments.clone(),
        );
        registry.register(
            "fetch_pauses",
            "Times dispatch paused fetching for want of in-flight room, by path (main, retry)",
            fetch_pauses.clone(),
        );
        registry.register(
            "stalled_seconds",
            "How long the longest ongoing wait of each kind has lasted (0: none): schema_registry, store, handoff, commit, in_flight_full, topics",
            stalled_seconds.clone(),
        );
        registry.register(
            "handoffs_lost",
            "Hand-offs Kafka refused for good whose compact dead letter was refused too (logged with every identifier)",
            handoffs_lost.clone(),
        );
        registry.register(
            "delivery_log_written",
            "Delivery-log rows written to the database",
            delivery_log_written.clone(),
        );
        registry.register(
            "delivery_log_dropped",
            "Delivery-log rows dropped: the writer's buffer was full, or the database failed or was too slow to take a batch (deliveries are never held up for the log)",
            delivery_log_dropped.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            delivery_log_written,
            delivery_log_dropped,
            deliveries,
            attempt_seconds,
            event_to_delivery_seconds,
            stale_renders,
            events_skipped,
            retries_scheduled,
            dead_letters,
            hook_disables,
            in_flight,
            consumer_lag,
            assignments,
            fetch_pauses,
            stalled_seconds,
            stalls: Mutex::new(Vec::new()),
            stall_ids: std::sync::atomic::AtomicU64::new(0),
            handoffs_lost,
            ordering,
            deferred,
            retries_dropped,
        }
    }

    pub(crate) fn defer(&self, reason: &str) {
        self.deferred
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Deferrals counted so far for `reason` (`rate_limit`, `hook_backoff`).
    pub fn deferred(&self, reason: &str) -> u64 {
        self.deferred
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .get()
    }

    pub(crate) fn retry_dropped(&self, reason: &str) {
        self.retries_dropped
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Retries dropped so far for `reason` (`user_blocked`).
    pub fn retries_dropped(&self, reason: &str) -> u64 {
        self.retries_dropped
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .get()
    }

    /// Delivery-log rows written so far.
    pub fn delivery_log_written(&self) -> u64 {
        self.delivery_log_written.get()
    }

    /// Delivery-log rows dropped so far.
    pub fn delivery_log_dropped(&self) -> u64 {
        self.delivery_log_dropped.get()
    }

    pub(crate) fn delivery_log_wrote(&self, rows: u64) {
        self.delivery_log_written.inc_by(rows);
    }

    pub(crate) fn delivery_log_dropped_rows(&self, rows: u64) {
        self.delivery_log_dropped.inc_by(rows);
    }

    pub(crate) fn order_action(&self, action: &'static str) {
        self.ordering.get_or_create(&ActionLabels { action }).inc();
    }

    /// Strict-ordering actions counted so far (`held`, `queued`, `parked`, `redriven`, `swept`,
    /// `collapsed`, `already_settled`, `unreadable`).
    pub fn ordering(&self, action: &'static str) -> u64 {
        self.ordering.get_or_create(&ActionLabels { action }).get()
    }

    /// Starts counting a wait for `reason`; it ends when the guard is dropped.
    pub(crate) fn stall(&self, reason: Stall) -> StallGuard<'_> {
        let id = self
            .stall_ids
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let since = tokio::time::Instant::now();
        self.stalls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((id, reason, since));
        StallGuard {
            metrics: self,
            id,
            reason,
            since,
            warned_at: Duration::ZERO,
        }
    }

    /// Sets the gauge of `reason` to its longest ongoing wait.
    fn refresh_stall(&self, reason: Stall) {
        let longest = self
            .stalls
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(_, r, _)| *r == reason)
            .map(|(_, _, since)| since.elapsed().as_secs())
            .max()
            .unwrap_or(0);
        self.stalled_seconds
            .get_or_create(&StallLabels {
                reason: reason.as_str(),
            })
            .set(i64::try_from(longest).unwrap_or(i64::MAX));
    }

    /// Seconds the longest ongoing wait for `reason` has lasted, as last refreshed.
    pub fn stalled_seconds(&self, reason: Stall) -> i64 {
        self.stalled_seconds
            .get_or_create(&StallLabels {
                reason: reason.as_str(),
            })
            .get()
    }

    pub fn handoffs_lost(&self) -> u64 {
        self.handoffs_lost.get()
    }

    pub(crate) fn handoff_lost(&self) {
        self.handoffs_lost.inc();
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &registry);
        out
    }

    pub fn deliveries(&self, outcome: Outcome) -> u64 {
        self.deliveries
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .get()
    }

    pub fn stale_renders(&self) -> u64 {
        self.stale_renders.get()
    }

    /// Events skipped for `reason` (`user_blocked`).
    pub fn events_skipped(&self, reason: &str) -> u64 {
        self.events_skipped
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .get()
    }

    pub fn retries_scheduled(&self) -> u64 {
        self.retries_scheduled.get()
    }

    /// Dead letters with `reason`, or all of them.
    pub fn dead_letters(&self, reason: Option<&str>) -> u64 {
        match reason {
            Some(reason) => self
                .dead_letters
                .get_or_create(&ReasonLabels {
                    reason: reason.to_owned(),
                })
                .get(),
            None => {
                // Family has no iterator; the exposition does.
                self.encode()
                    .lines()
                    .filter(|l| l.starts_with("hookline_consumer_dead_letters_total{"))
                    .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
                    .sum()
            }
        }
    }

    pub fn hook_disables(&self) -> u64 {
        self.hook_disables.get()
    }

    pub fn in_flight(&self) -> i64 {
        self.in_flight.get()
    }

    pub(crate) fn delivery(&self, outcome: Outcome) {
        self.deliveries
            .get_or_create(&OutcomeLabels {
                outcome: outcome.as_str(),
            })
            .inc();
    }

    pub(crate) fn attempt_took(&self, latency: Duration) {
        self.attempt_seconds.observe(latency.as_secs_f64());
    }

    pub(crate) fn delivered_after(&self, since_event: Duration) {
        self.event_to_delivery_seconds
            .observe(since_event.as_secs_f64());
    }

    pub(crate) fn stale_render(&self) {
        self.stale_renders.inc();
    }

    pub(crate) fn event_skipped(&self, reason: &str) {
        self.events_skipped
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn retry_scheduled(&self) {
        self.retries_scheduled.inc();
    }

    /// Presents the dead-letter series of `reasons` at 0 (those known before any record is read).
    pub(crate) fn preset_dead_letters<'a>(&self, reasons: impl IntoIterator<Item = &'a str>) {
        for reason in reasons {
            let _ = self.dead_letters.get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            });
        }
    }

    pub(crate) fn dead_letter(&self, reason: &str) {
        self.dead_letters
            .get_or_create(&ReasonLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    pub(crate) fn hook_disabled(&self) {
        self.hook_disables.inc();
    }

    /// Partition assignments received by `path` (`main` or `retry`): 1 after the first join,
    /// one more per rebalance.
    pub fn assignments(&self, path: &'static str) -> u64 {
        self.assignments.get_or_create(&PathLabels { path }).get()
    }

    /// Times `path` (`main` or `retry`) paused fetching for want of in-flight room.
    pub fn fetch_pauses(&self, path: &'static str) -> u64 {
        self.fetch_pauses.get_or_create(&PathLabels { path }).get()
    }

    pub(crate) fn assigned(&self, path: &'static str) {
        self.assignments.get_or_create(&PathLabels { path }).inc();
    }

    pub(crate) fn fetch_paused(&self, path: &'static str) {
        self.fetch_pauses.get_or_create(&PathLabels { path }).inc();
    }

    pub(crate) fn in_flight_gauge(&self) -> &Gauge {
        &self.in_flight
    }

    pub(crate) fn set_lag(&self, topic: &str, partition: i32, lag: i64) {
        self.consumer_lag
            .get_or_create(&PartitionLabels {
                topic: topic.to_owned(),
                partition: partition.to_string(),
            })
            .set(lag);
    }
}

#[cfg(test)]
mod rate_limit_series_tests {
    use super::*;

    #[test]
    fn deferral_and_dropped_retry_series_are_there_at_zero_from_the_start() {
        let text = ConsumerMetrics::new().encode();
        for series in [
            r#"hookline_consumer_deferred_total{reason="rate_limit"} 0"#,
            r#"hookline_consumer_deferred_total{reason="hook_backoff"} 0"#,
            r#"hookline_consumer_retries_dropped_total{reason="user_blocked"} 0"#,
        ] {
            assert!(
                text.lines().any(|l| l == series),
                "{series} missing:\n{text}"
            );
        }
    }
}
