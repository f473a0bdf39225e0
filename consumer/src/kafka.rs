//! The Kafka clients of the consumer: their settings, the consumer context (rebalances and
//! statistics), and subscribing a path's consumer with its offset tracking.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use hookline_shell::kafka_log::{KafkaLog, KafkaLogContext};
use std::time::Duration;

use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, warn};

use crate::ConsumerError;
use crate::config::ConsumerConfig;
use crate::metrics::ConsumerMetrics;
use crate::offsets::{Committed, Offsets};

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
        // What librdkafka fetches ahead is bounded in bytes (its default is 64 MB); the intake
        // itself takes at most `--max-in-flight` records, so a deep backlog waits here, and this
        // bound is what keeps the consumer's memory flat whatever the lag. Per partition and
        // fetch librdkafka's 1 MB stays: a backlog written one transition at a time sits in
        // small batches that compress little, and smaller fetches starved the consumer (2,754
        // deliveries/s at 64 KB against 5,119/s with the defaults on the same backlog).
        .set("queued.max.messages.kbytes", QUEUED_KBYTES)
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
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    // Set after the pass-through on purpose: at-least-once rests on committing only finished
    // records, and only the consumer's own commits say which records past an offset are
    // finished (librdkafka's would drop that, see `offsets`).
    c.set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false");
    c
}

/// `queued.max.messages.kbytes`: what librdkafka may hold fetched ahead, per consumer.
const QUEUED_KBYTES: &str = "16384";

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
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            // The newest description of the partitions that go, so their next owner skips what
            // finished here. Not waited for: the rebalance must go on (a lost commit costs
            // duplicates, never a delivery).
            let last = self.offsets.revoke(tpl);
            if last.count() > 0
                && let Err(error) = consumer.commit(&last, CommitMode::Async)
            {
                debug!(%error, "last commit of revoked partitions not sent");
            }
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
                self.offsets.confirmed_by_client(offsets);
            }
            Err(error) => debug!(%error, "offset commit failed; the next one covers it"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.metrics.assigned(self.path);
            self.offsets.assign(committed(consumer, tpl));
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

/// How long reading the committed offsets of newly assigned partitions may take before they are
/// treated as undescribed (every record from the committed offset on is delivered).
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

/// The committed offset and metadata of each assigned partition. Read here, before the
/// partitions' records are dispatched, so the first record of each is judged by them; a read
/// that fails describes nothing (the records are delivered, as without the metadata).
fn committed(consumer: &BaseConsumer<Ctx>, tpl: &TopicPartitionList) -> Vec<Committed> {
    let read = consumer.committed_offsets(tpl.clone(), COMMITTED_TIMEOUT);
    if let Err(error) = &read {
        warn!(%error, "cannot read the committed offsets of assigned partitions; records past them are delivered again");
    }
    let read = read.ok();
    tpl.elements()
        .into_iter()
        .map(|e| {
            let found = read
                .as_ref()
                .and_then(|r| r.find_partition(e.topic(), e.partition()));
            let (offset, metadata) = match found {
                Some(c) if c.error().is_ok() => {
                    let offset = match c.offset() {
                        Offset::Offset(o) => o,
                        _ => -1,
                    };
                    // rust-rdkafka panics on metadata that is not UTF-8 (another client's):
                    // that is simply not a description.
                    let metadata = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        c.metadata().to_owned()
                    }))
                    .ok();
                    (offset, metadata)
                }
                _ => (-1, None),
            };
            Committed {
                topic: e.topic().to_owned(),
                partition: e.partition(),
                offset,
                metadata,
            }
        })
        .collect()
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
    let offsets = Arc::new(Offsets::new(!config.commit_interval.is_zero()));

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
            ("enable.auto.commit", "true"),
            ("enable.auto.offset.store", "true"),
            ("enable.idempotence", "false"),
            ("acks", "1"),
            ("fetch.wait.max.ms", "50"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .to_vec();
        let consumer = client_config(&config, "g");
        assert_eq!(consumer.get("enable.auto.commit"), Some("false"));
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
