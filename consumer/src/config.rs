//! The consumer's options, typed and documented once. `main.rs` maps each to a flag and a
//! `HOOKLINE_*` variable; tests build them in code and shrink the durations.

use std::time::Duration;

use crate::ConsumerError;
use crate::deliver::DeliverConfig;
pub use crate::delivery_log::DeliveryLogConfig;
pub use crate::order::Ordering;
pub use crate::rate_limit::RateLimitConfig;
use crate::schedule::RetrySchedule;

pub use crate::schedule::DEFAULT_RETRY_SCHEDULE;

/// Everything [`crate::Consumer`] needs besides the store and the codec.
#[derive(Debug, Clone)]
pub struct ConsumerConfig {
    /// Kafka bootstrap servers.
    pub brokers: String,
    /// Consumer group of the main topic. The retry worker joins `<group_id>.retry`.
    pub group_id: String,
    /// Topic of `BuildEvent`s (key = build id).
    pub topic: String,
    /// The one retry topic, holding delivery tasks with their due times. Default `<topic>.retry`.
    pub retry_topic: String,
    /// The dead-letter topic. Default `<topic>.dlq`.
    pub dlq_topic: String,
    /// librdkafka settings passed through to every client (TLS, SASL, tuning).
    pub kafka: Vec<(String, String)>,
    /// Records per path (main topic, retry topic) being worked on or finished but not yet covered
    /// by a confirmed commit: the backpressure bound, and so the bound on records delivered again
    /// after a crash. Also the number of deliveries in flight at once, every hook together.
    pub max_in_flight: usize,
    /// Deliveries in flight at once to one hook: a slow receiver holds this many slots and no
    /// more (see `fair`).
    pub hook_in_flight: usize,
    /// Deliveries in flight at once to one receiver (scheme, host and port), whatever the hooks
    /// pointing at it.
    pub host_in_flight: usize,
    /// The longest a delivery waits (or is estimated to wait) for its hook's slot before it is
    /// handed on to the retry topic, due when the hook can take it, so that its record does not
    /// hold the window.
    pub hook_wait: Duration,
    /// Records taken from the client per batch (one snapshot query and one hook lookup per batch).
    pub poll_batch: usize,
    /// Delays between attempts; its length is the number of retries.
    pub retry_schedule: RetrySchedule,
    /// The longest a retry record is held in memory waiting to be due; a record due later is put
    /// back at the end of the retry topic, so the retry topic's offsets keep moving.
    pub retry_hold: Duration,
    /// Per-(hook, build) order across retries: `Strict` (the default) queues a build's later
    /// events behind its delivery waiting for a retry; `Relaxed` lets them go ahead.
    pub ordering: Ordering,
    /// The HTTP stage.
    pub deliver: DeliverConfig,
    /// How long a project's hook list is reused before it is read again.
    pub hook_cache_ttl: Duration,
    /// How often offsets are committed. Zero (the default) commits as records finish, one commit
    /// at a time (finishes during a commit go in the next), so a crash re-delivers at most
    /// `max_in_flight` records per path; a longer interval saves broker writes and returns
    /// in-flight room as records finish, at the price of re-delivering what finished since the
    /// last commit.
    pub commit_interval: Duration,
    /// On shutdown, how long in-flight work may take to finish before it is abandoned (and
    /// re-delivered by whoever owns the partition next).
    pub drain_timeout: Duration,
    /// A stable identity of this instance in its groups (Kafka static membership,
    /// `group.instance.id`): a restarted instance with the same id takes its partitions back at
    /// once, without a rebalance. Unique per running instance; `None` joins dynamically.
    pub instance_id: Option<String>,
    /// How long the group waits for a member that stopped heartbeating before it gives the
    /// member's partitions to others (`session.timeout.ms`).
    pub session_timeout: Duration,
    /// Create the retry and dead-letter topics at start when they are missing.
    pub create_topics: bool,
    /// Partitions of the retry and dead-letter topics when they are created; `None`: as many as
    /// the main topic.
    pub retry_partitions: Option<i32>,
    /// The default rate limit per root namespace and the buckets' depth (overrides per namespace
    /// live in the store).
    pub rate_limit: RateLimitConfig,
    /// The delivery log: on by default, written only with a PostgreSQL store.
    pub delivery_log: DeliveryLogConfig,
}

/// The default `hook_in_flight`: what a small receiver handles comfortably at once, and a sixteenth
/// of the default window, so a slow hook leaves fifteen sixteenths to everyone else.
pub const DEFAULT_HOOK_IN_FLIGHT: usize = 16;
/// The default `host_in_flight`: a receiver behind several hooks (a chat service, a team's
/// gateway) may take a quarter of the default window.
pub const DEFAULT_HOST_IN_FLIGHT: usize = 64;
/// The default `hook_wait`.
pub const DEFAULT_HOOK_WAIT: Duration = Duration::from_secs(1);

/// The default session timeout: a killed instance without a stable identity has its partitions
/// back in the group this long after it died. librdkafka's default is 45 s; 15 s still rides out
/// a network blip of several heartbeats (3 s apart) without a needless rebalance.
pub const DEFAULT_SESSION_TIMEOUT: Duration = Duration::from_secs(15);

/// librdkafka settings the consumer sets itself, after the pass-through options, and refuses
/// among them: at-least-once rests on each.
pub(crate) const FIXED_KAFKA_SETTINGS: &[(&str, &str)] = &[
    (
        "enable.auto.commit",
        "the consumer commits itself, with the finished records past each offset in the metadata",
    ),
    (
        "auto.commit.enable",
        "the consumer commits itself, with the finished records past each offset in the metadata",
    ),
    (
        "enable.auto.offset.store",
        "an offset is committed only once every delivery of the records below it is finished",
    ),
    (
        "enable.idempotence",
        "a retry or dead-letter hand-off is written once",
    ),
    (
        "acks",
        "a hand-off counts only once every in-sync replica has it",
    ),
    (
        "request.required.acks",
        "a hand-off counts only once every in-sync replica has it",
    ),
];

impl ConsumerConfig {
    /// Defaults for `brokers` and `group_id`, on the `build-events` topic.
    pub fn new(brokers: impl Into<String>, group_id: impl Into<String>) -> Self {
        let topic = "build-events".to_owned();
        Self {
            brokers: brokers.into(),
            group_id: group_id.into(),
            retry_topic: format!("{topic}.retry"),
            dlq_topic: format!("{topic}.dlq"),
            topic,
            kafka: Vec::new(),
            max_in_flight: 256,
            hook_in_flight: DEFAULT_HOOK_IN_FLIGHT,
            host_in_flight: DEFAULT_HOST_IN_FLIGHT,
            hook_wait: DEFAULT_HOOK_WAIT,
            poll_batch: 128,
            retry_schedule: RetrySchedule::default(),
            retry_hold: Duration::from_secs(30),
            ordering: Ordering::Strict,
            deliver: DeliverConfig::default(),
            hook_cache_ttl: Duration::from_secs(5),
            commit_interval: Duration::ZERO,
            drain_timeout: Duration::from_secs(15),
            instance_id: None,
            session_timeout: DEFAULT_SESSION_TIMEOUT,
            create_topics: true,
            retry_partitions: None,
            rate_limit: RateLimitConfig::default(),
            delivery_log: DeliveryLogConfig::default(),
        }
    }

    /// Sets the main topic and derives the retry and dead-letter topics from it.
    pub fn with_topic(mut self, topic: impl Into<String>) -> Self {
        self.topic = topic.into();
        self.retry_topic = format!("{}.retry", self.topic);
        self.dlq_topic = format!("{}.dlq", self.topic);
        self
    }

    /// The retry worker's consumer group.
    pub fn retry_group_id(&self) -> String {
        format!("{}.retry", self.group_id)
    }

    /// Checks values and combinations that would make the consumer misbehave.
    pub fn validate(&self) -> Result<(), ConsumerError> {
        let bad = |m: String| Err(ConsumerError::Config(m));
        if self.brokers.trim().is_empty() {
            return bad("brokers must not be empty".into());
        }
        if self.group_id.trim().is_empty() {
            return bad("group id must not be empty".into());
        }
        let topics = [&self.topic, &self.retry_topic, &self.dlq_topic];
        if topics.iter().any(|t| t.is_empty()) {
            return bad("topic names must not be empty".into());
        }
        if self.topic == self.retry_topic
            || self.topic == self.dlq_topic
            || self.retry_topic == self.dlq_topic
        {
            return bad(format!(
                "main, retry and dead-letter topics must differ (got {}, {}, {})",
                self.topic, self.retry_topic, self.dlq_topic
            ));
        }
        if self.max_in_flight == 0 || self.poll_batch == 0 {
            return bad("max in-flight and poll batch must be at least 1".into());
        }
        if self.hook_in_flight == 0 || self.host_in_flight == 0 {
            return bad("hook and host in-flight limits must be at least 1".into());
        }
        if self.hook_wait.is_zero() {
            return bad("hook wait must be above zero".into());
        }
        if self.retry_hold.is_zero() {
            return bad("retry hold must be above zero".into());
        }
        // The retry worker holds records for up to `retry_hold` while the main consumer's client
        // keeps polling; more than librdkafka's default max.poll.interval.ms (300 s) would get
        // the retry worker thrown out of its group while it waits.
        if self.retry_hold > Duration::from_secs(240) {
            return bad(format!(
                "retry hold {:?} must stay below 240 s (the Kafka poll interval)",
                self.retry_hold
            ));
        }
        if self
            .instance_id
            .as_ref()
            .is_some_and(|id| id.trim().is_empty())
        {
            return bad("instance id must not be empty when set".into());
        }
        if self.retry_partitions.is_some_and(|n| n < 1) {
            return bad("retry partitions must be at least 1".into());
        }
        // Kafka brokers accept 6 s to 30 min by default (group.min/max.session.timeout.ms).
        if self.session_timeout < Duration::from_secs(6) {
            return bad(format!(
                "session timeout {:?} is below the brokers' default minimum of 6 s",
                self.session_timeout
            ));
        }
        if self.rate_limit.per_minute == Some(0) {
            return bad(
                "rate limit per minute must be at least 1 (leave it unset for none)".into(),
            );
        }
        if self.rate_limit.burst.is_zero() {
            return bad("rate limit burst must be above zero".into());
        }
        if self.delivery_log.enabled && self.delivery_log.retention < Duration::from_secs(86_400) {
            return bad(format!(
                "delivery log retention {:?} must be at least a day (partitions are daily)",
                self.delivery_log.retention
            ));
        }
        if self.deliver.timeout.is_zero() {
            return bad("delivery timeout must be above zero".into());
        }
        self.check_kafka_options()
    }

    /// Refuses pass-through options that would change what at-least-once rests on (offset
    /// storage and commits, the hand-off producer's idempotence and acks); every command that
    /// talks to Kafka checks them.
    pub fn check_kafka_options(&self) -> Result<(), ConsumerError> {
        hookline_shell::refuse_fixed_kafka_options(&self.kafka, FIXED_KAFKA_SETTINGS)
            .map_err(ConsumerError::Config)
    }
}
