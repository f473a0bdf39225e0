//! The producer's metrics: what an operator watches during a rollout (events by timing, the cost
//! of inline rendering, produce errors, skipped transitions, flag decisions). One [`Registry`] per instance and no
//! global recorder, so several producers in one process (tests, the demo) keep separate values.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::error::EmitError;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimingLabels {
    pub timing: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SkipLabels {
    pub reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FlagLabels {
    pub flag: String,
    pub result: String,
}

fn seconds_histogram() -> Histogram {
    // 1 µs .. ~16 s
    Histogram::new(exponential_buckets(1e-6, 2.5, 19))
}

#[derive(Debug)]
pub struct ProducerMetrics {
    registry: Registry,
    events_emitted: Family<TimingLabels, Counter>,
    emit_seconds: Family<TimingLabels, Histogram>,
    render_seconds: Histogram,
    payload_bytes: Histogram,
    produce_errors: Family<ErrorLabels, Counter>,
    late_acks: Counter,
    events_skipped: Family<SkipLabels, Counter>,
    flag_evaluations: Family<FlagLabels, Counter>,
}

impl Default for ProducerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProducerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hookline_producer");
        let events_emitted = Family::<TimingLabels, Counter>::default();
        registry.register(
            "events_emitted",
            "Events acknowledged by Kafka, by payload timing (inline or deferred)",
            events_emitted.clone(),
        );
        let emit_seconds = Family::<TimingLabels, Histogram>::new_with_constructor(
            seconds_histogram as fn() -> Histogram,
        );
        registry.register(
            "emit_duration_seconds",
            "From the transition's arrival to Kafka's acknowledgement, by payload timing",
            emit_seconds.clone(),
        );
        let render_seconds = seconds_histogram();
        registry.register(
            "render_duration_seconds",
            "Time spent rendering Job Hooks inline (the producer's cost of inline)",
            render_seconds.clone(),
        );
        let payload_bytes = Histogram::new(exponential_buckets(256.0, 2.0, 14));
        registry.register(
            "payload_bytes",
            "Size of the Job Hook payloads rendered inline",
            payload_bytes.clone(),
        );
        let produce_errors = Family::<ErrorLabels, Counter>::default();
        registry.register(
            "produce_errors",
            "Transitions that were not emitted, by reason",
            produce_errors.clone(),
        );
        let late_acks = Counter::default();
        registry.register(
            "late_acks",
            "Events Kafka acknowledged after their request was answered 503 (the delivery timeout ran out while they were in flight): written, and a client retry may write them again",
            late_acks.clone(),
        );
        let events_skipped = Family::<SkipLabels, Counter>::default();
        registry.register(
            "events_skipped",
            "Transitions that send no hook by design (no event emitted), by reason",
            events_skipped.clone(),
        );
        let flag_evaluations = Family::<FlagLabels, Counter>::default();
        registry.register(
            "flag_evaluations",
            "Feature flag evaluations by flag and result (on or off)",
            flag_evaluations.clone(),
        );
        // Every series with a known label value is present at 0 from the start: an alert's
        // `increase()` sees the first event, and the tables of docs/operating.md are checked
        // against a live scrape (tests/tests/it/monitoring.rs). Flag names come from the flag
        // store: they appear with the first evaluation.
        for timing in ["inline", "deferred"] {
            let labels = TimingLabels {
                timing: timing.to_owned(),
            };
            let _ = events_emitted.get_or_create(&labels);
            let _ = emit_seconds.get_or_create(&labels);
        }
        for kind in EmitError::KINDS {
            let _ = produce_errors.get_or_create(&ErrorLabels {
                kind: kind.to_owned(),
            });
        }
        let _ = events_skipped.get_or_create(&SkipLabels {
            reason: "user_blocked".to_owned(),
        });
        Self {
            registry,
            events_emitted,
            emit_seconds,
            render_seconds,
            payload_bytes,
            produce_errors,
            late_acks,
            events_skipped,
            flag_evaluations,
        }
    }

    /// An event acknowledged after its request was refused.
    pub fn late_ack(&self) {
        self.late_acks.inc();
    }

    /// Events acknowledged after their request was refused, so far.
    pub fn late_acks(&self) -> u64 {
        self.late_acks.get()
    }

    pub fn emitted(&self, timing: &str, took: Duration) {
        let labels = TimingLabels {
            timing: timing.to_owned(),
        };
        self.events_emitted.get_or_create(&labels).inc();
        self.emit_seconds
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
    }

    pub fn rendered(&self, took: Duration, bytes: usize) {
        self.render_seconds.observe(took.as_secs_f64());
        self.payload_bytes.observe(bytes as f64);
    }

    pub fn produce_error(&self, kind: &str) {
        self.produce_errors
            .get_or_create(&ErrorLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    pub fn skipped(&self, reason: &str) {
        self.events_skipped
            .get_or_create(&SkipLabels {
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Transitions skipped for `reason` so far (`user_blocked`).
    pub fn events_skipped(&self, reason: &str) -> u64 {
        self.events_skipped
            .get_or_create(&SkipLabels {
                reason: reason.to_owned(),
            })
            .get()
    }

    pub fn flag_evaluated(&self, flag: &str, on: bool) {
        let labels = FlagLabels {
            flag: flag.to_owned(),
            result: if on { "on" } else { "off" }.to_owned(),
        };
        self.flag_evaluations.get_or_create(&labels).inc();
    }

    /// Events acknowledged with this timing so far.
    pub fn events_emitted(&self, timing: &str) -> u64 {
        self.events_emitted
            .get_or_create(&TimingLabels {
                timing: timing.to_owned(),
            })
            .get()
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The value of one exposed series, e.g. `hookline_producer_render_duration_seconds_count`.
    pub fn value(&self, series: &str) -> Option<f64> {
        self.encode().lines().find_map(|line| {
            line.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instances_keep_separate_values() {
        let a = ProducerMetrics::new();
        let b = ProducerMetrics::new();
        a.emitted("inline", Duration::from_millis(3));
        a.rendered(Duration::from_micros(40), 2000);
        a.flag_evaluated("execute_build_hooks_inline", true);
        assert_eq!(a.events_emitted("inline"), 1);
        assert_eq!(b.events_emitted("inline"), 0);
        assert_eq!(
            a.value("hookline_producer_render_duration_seconds_count"),
            Some(1.0)
        );
        assert_eq!(
            a.value("hookline_producer_flag_evaluations_total{flag=\"execute_build_hooks_inline\",result=\"on\"}"),
            Some(1.0)
        );
        assert_eq!(
            b.value("hookline_producer_render_duration_seconds_count"),
            Some(0.0)
        );
    }
}
