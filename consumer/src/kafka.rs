//! The Kafka clients of the consumer: their settings, the consumer context (rebalances and
//! statistics), and subscribing a path's consumer with its offset tracking.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hookline_shell::kafka_log::{KafkaLog, KafkaLogContext};
use rdkafka::TopicPartitionList;
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use tracing::{debug, warn};

use crate::ConsumerError;
use crate::config::ConsumerConfig;
use crate::metrics::ConsumerMetrics;
use crate::offsets::Offsets;

/// Settings every client gets: the brokers, then the pass-through settings (which may override).
pub(crate) fn base_config(config: &ConsumerConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

/// A consumer of `group` with at-least-once offset handling.
pub(crate) fn client_config(config: &ConsumerConfig, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        // Topics are created at start (see `topics`), never as a side effect of subscribing.
        .set("allow.auto.create.topics", "false")
        .set("statistics.interval.ms", "1000")
        // Prefetch bounded in bytes, small next to librdkafka's 64 MB default: the intake takes
        // at most `--max-in-flight` records at a time, so a deep backlog would only sit in this
        // queue, and the consumer's memory would grow with the lag instead of staying flat.
        // 4 MB still holds tens of thousands of compressed events (seconds of work).
        .set("queued.max.messages.kbytes", "4096")
        .set("fetch.max.bytes", "4194304")
        // Per partition and fetch, in compressed bytes: zstd packs similar Job Hooks 20 to 30
        // times, so librdkafka's 1 MB default decompresses into tens of MB per partition. With
        // it, draining a 100k backlog peaked at 300 MB RSS against 50 MB for 10k; with 64 KB,
        // 50 MB for both (`scripts/bench --only memory`), and a fetch still brings hundreds of
        // events per partition.
        .set("fetch.message.max.bytes", "65536")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        );
    if let Some(id) = &config.instance_id {
        // Static membership: a restarted instance with the same identity takes its partitions
        // back at once, without a rebalance and without waiting for its dead self to expire.
        // The id is unique within a group; the main and retry groups are different groups.
        c.set("group.instance.id", id);
    }
    if !config.commit_interval.is_zero() {
        c.set(
            "auto.commit.interval.ms",
            config.commit_interval.as_millis().to_string(),
        );
    }
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    // Set after the pass-through on purpose: at-least-once rests on storing offsets only for
    // finished records, and permits come back through auto-commit when a commit goes unanswered.
    c.set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    c
}

/// The idempotent producer for retry and dead-letter hand-offs.
pub(crate) fn producer_config(config: &ConsumerConfig) -> ClientConfig {
    let mut c = base_config(config);
    // Set after the pass-through on purpose (and refused among it, see
    // `config::FIXED_KAFKA_SETTINGS`): a hand-off must be acked by all in-sync replicas, once.
    c.set("enable.idempotence", "true").set("acks", "all");
    c
}

/// The consumer context: rebalances update the offset trackers; statistics feed the lag gauge;
/// librdkafka's logs go through [`KafkaLog`] (transport failures at WARN, rate-limited).
pub(crate) struct Ctx {
    offsets: Arc<Offsets>,
    metrics: Arc<ConsumerMetrics>,
    path: &'static str,
    pub(crate) log: KafkaLog,
}

impl ClientContext for Ctx {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics.set_lag(topic, *partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.offsets.revoke(tpl);
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                debug!(partitions = offsets.count(), "offsets committed");
                self.offsets.confirmed(offsets);
            }
            Err(error) => debug!(%error, "offset commit failed; the next one covers it"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.metrics.assigned(self.path);
            self.offsets.assign(tpl);
            // librdkafka keeps a partition's pause across a revoke and a new assignment: set it
            // to what the intake wants now (see `intake`).
            let result = if self.offsets.paused.load(Ordering::Relaxed) {
                consumer.pause(tpl)
            } else {
                consumer.resume(tpl)
            };
            if let Err(error) = result {
                warn!(%error, "cannot set the fetch state of assigned partitions");
            }
        }
    }
}

pub(crate) type KafkaConsumer = StreamConsumer<Ctx>;

/// The hand-off producer (and the dead-letter tools' writer), logging like the consumers.
pub type HandoffProducer = rdkafka::producer::FutureProducer<KafkaLogContext>;

/// A path's consumer and the offset tracking its context feeds.
pub(crate) struct Subscription {
    pub(crate) consumer: Arc<KafkaConsumer>,
    pub(crate) offsets: Arc<Offsets>,
}

/// Creates a consumer of `group`, subscribed to `topic`.
pub(crate) fn subscribe(
    config: &ConsumerConfig,
    group: &str,
    topic: &str,
    path: &'static str,
    metrics: &Arc<ConsumerMetrics>,
) -> Result<Subscription, ConsumerError> {
    let offsets = Arc::new(Offsets::new(config.commit_interval.is_zero()));

    let consumer: KafkaConsumer = client_config(config, group).create_with_context(Ctx {
        offsets: offsets.clone(),
        metrics: metrics.clone(),
        path,
        log: KafkaLog::default(),
    })?;
    consumer.subscribe(&[topic])?;
    Ok(Subscription {
        consumer: Arc::new(consumer),
        offsets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pass_through_options_cannot_turn_off_at_least_once() {
        let mut config = ConsumerConfig::new("127.0.0.1:9", "g");
        config.kafka = [
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "true"),
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("fetch.wait.max.ms", "50"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec();
        let consumer = client_config(&config, "g");
        assert_eq!(consumer.get("enable.auto.commit"), Some("true"));
        assert_eq!(consumer.get("enable.auto.offset.store"), Some("false"));
        assert_eq!(consumer.get("fetch.wait.max.ms"), Some("50"));
        let producer = producer_config(&config);
        assert_eq!(producer.get("enable.idempotence"), Some("true"));
        assert_eq!(producer.get("acks"), Some("all"));
        for (key, value) in config.kafka.clone() {
            let mut one = ConsumerConfig::new("127.0.0.1:9", "g");
            one.kafka = vec![(key.clone(), value)];
            let refused = one.validate().is_err();
            assert_eq!(refused, key != "fetch.wait.max.ms", "{key}");
        }
    }
}
