//! librdkafka's log lines and error events, at the level they deserve.
//!
//! librdkafka reports every failed connection to a broker at its ERROR level, and again through
//! the client's error callback, once per retry: a broker lost for good in a three-node cluster
//! (which the cluster rides out once the broker is fenced, about ten seconds later) produced tens
//! of ERROR lines per client. An operator paged on ERROR would be woken for nothing. Here those
//! transient transport failures are logged at WARN, at most one line per broker per
//! [`INTERVAL`], carrying how many were left out since the last one; ERROR stays for what needs
//! a person (a fatal client error, anything librdkafka reports that is not a transport blip).

use std::collections::HashMap;
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};

/// At most one line per key (a broker, an error) within this interval.
pub const INTERVAL: Duration = Duration::from_secs(30);

/// Admits one event per key per interval and counts the ones it holds back.
#[derive(Debug)]
pub struct RateLimiter {
    interval: Duration,
    keys: Mutex<HashMap<String, Held>>,
}

#[derive(Debug)]
struct Held {
    last_logged: Instant,
    left_out: u64,
}

impl RateLimiter {
    pub fn new(interval: Duration) -> RateLimiter {
        RateLimiter {
            interval,
            keys: Mutex::new(HashMap::new()),
        }
    }

    /// `Some(n)` when an event of `key` may be logged now, `n` being how many of its events were
    /// left out since its last line; `None` when this one is to be left out (and is counted).
    pub fn admit(&self, key: &str, now: Instant) -> Option<u64> {
        let mut keys = self.keys.lock().unwrap_or_else(|e| e.into_inner());
        match keys.get_mut(key) {
            Some(held) if now.duration_since(held.last_logged) < self.interval => {
                held.left_out += 1;
                None
            }
            Some(held) => {
                let left_out = std::mem::take(&mut held.left_out);
                held.last_logged = now;
                Some(left_out)
            }
            None => {
                keys.insert(
                    key.to_owned(),
                    Held {
                        last_logged: now,
                        left_out: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        RateLimiter::new(INTERVAL)
    }
}

/// Error codes of a connection that failed or a broker that went away: the client reconnects by
/// itself, and the cluster moves leadership off a broker that stays away.
fn transient(code: RDKafkaErrorCode) -> bool {
    matches!(
        code,
        RDKafkaErrorCode::BrokerTransportFailure
            | RDKafkaErrorCode::AllBrokersDown
            | RDKafkaErrorCode::Resolve
            | RDKafkaErrorCode::OperationTimedOut
            | RDKafkaErrorCode::RequestTimedOut
            | RDKafkaErrorCode::NetworkException
            | RDKafkaErrorCode::NotCoordinator
            | RDKafkaErrorCode::CoordinatorNotAvailable
            | RDKafkaErrorCode::CoordinatorLoadInProgress
            | RDKafkaErrorCode::LeaderNotAvailable
            | RDKafkaErrorCode::NotLeaderForPartition
            | RDKafkaErrorCode::NotEnoughReplicas
            | RDKafkaErrorCode::NotEnoughReplicasAfterAppend
            // A topic created a moment ago, not yet in every broker's metadata.
            | RDKafkaErrorCode::UnknownTopicOrPartition
    )
}

/// Whether `error` is a transport failure or a leadership move the client rides out itself.
pub fn is_transient(error: &KafkaError) -> bool {
    error.rdkafka_error_code().is_some_and(transient)
}

/// librdkafka names the broker a line is about at its start, after the thread's name in log
/// lines: `[thrd:127.0.0.1:9092/2]: 127.0.0.1:9092/2: Connect to ...`, `GroupCoordinator: ...`.
/// That name keys the rate limit, so a log line and the error event of the same failure share
/// one; lines without a name share the key `-`.
fn broker_of(message: &str) -> &str {
    let message = match message.strip_prefix("[thrd:") {
        Some(rest) => rest.split_once("]: ").map_or(rest, |(_, after)| after),
        None => message,
    };
    match message.split_once(": ") {
        Some((head, _)) if !head.contains(' ') => head,
        _ => "-",
    }
}

/// One limiter for the whole process: a consumer runs several clients (main and retry
/// consumers, the hand-off producer), and one dead broker is one line per interval, not one per
/// client.
static SHARED: LazyLock<RateLimiter> = LazyLock::new(RateLimiter::default);

/// The logging half of a Kafka client context: what [`ClientContext::log`] and
/// [`ClientContext::error`] do in every hookline client.
#[derive(Debug)]
pub struct KafkaLog {
    limiter: &'static RateLimiter,
}

impl Default for KafkaLog {
    fn default() -> Self {
        KafkaLog { limiter: &SHARED }
    }
}

impl KafkaLog {
    /// A line librdkafka logged. Its `FAIL` facility is a broker connection failing (refused,
    /// reset, timed out): transient, WARN, rate-limited per broker. Other errors stay ERROR.
    pub fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning
                if facility == "FAIL" =>
            {
                self.transient(broker_of(message), facility, message);
            }
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility, "{message}");
            }
            RDKafkaLogLevel::Warning => tracing::warn!(target: "librdkafka", facility, "{message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility, "{message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(target: "librdkafka", facility, "{message}"),
        }
    }

    /// An error event of the client (not tied to one record). Transport failures and leadership
    /// moves are WARN, rate-limited per broker; anything else, a fatal error above all, is ERROR.
    pub fn error(&self, error: &KafkaError, reason: &str) {
        if is_transient(error) {
            self.transient(broker_of(reason), "ERROR", &format!("{error}: {reason}"));
        } else {
            tracing::error!(target: "librdkafka", %error, reason, "kafka client error");
        }
    }

    fn transient(&self, key: &str, facility: &str, message: &str) -> bool {
        match self.limiter.admit(key, Instant::now()) {
            Some(left_out) => {
                tracing::warn!(
                    target: "librdkafka",
                    broker = key,
                    facility,
                    left_out,
                    every_s = self.limiter.interval.as_secs(),
                    "kafka transport failure, retried by the client: {message}"
                );
                true
            }
            None => false,
        }
    }
}

/// A client context that only logs, through [`KafkaLog`]: for producers, admin clients and
/// short-lived metadata readers.
#[derive(Debug, Default)]
pub struct KafkaLogContext {
    pub log: KafkaLog,
}

impl ClientContext for KafkaLogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        self.log.log(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        self.log.error(&error, reason);
    }
}

impl ConsumerContext for KafkaLogContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_key_per_interval_with_the_count_left_out() {
        let limiter = RateLimiter::new(Duration::from_secs(30));
        let t0 = Instant::now();
        assert_eq!(limiter.admit("b1", t0), Some(0));
        assert_eq!(limiter.admit("b1", t0 + Duration::from_secs(1)), None);
        assert_eq!(limiter.admit("b1", t0 + Duration::from_secs(29)), None);
        // Another broker is not held back by the first.
        assert_eq!(limiter.admit("b2", t0 + Duration::from_secs(2)), Some(0));
        assert_eq!(limiter.admit("b1", t0 + Duration::from_secs(30)), Some(2));
        assert_eq!(limiter.admit("b1", t0 + Duration::from_secs(61)), Some(0));
    }

    #[test]
    fn the_broker_is_named_by_the_lines_head() {
        assert_eq!(
            broker_of("127.0.0.1:39303/3: Connect to ipv4#127.0.0.1:39303 failed"),
            "127.0.0.1:39303/3"
        );
        assert_eq!(
            broker_of(
                "[thrd:127.0.0.1:39303/3]: 127.0.0.1:39303/3: Connect to ipv4#127.0.0.1:39303 failed"
            ),
            "127.0.0.1:39303/3"
        );
        assert_eq!(
            broker_of("[thrd:GroupCoordinator]: GroupCoordinator: 127.0.0.1:39302: Connect to"),
            "GroupCoordinator"
        );
        assert_eq!(
            broker_of("GroupCoordinator: 127.0.0.1:39303: Disconnected"),
            "GroupCoordinator"
        );
        assert_eq!(broker_of("3/3 brokers are down"), "-");
    }

    #[test]
    fn transport_failures_are_transient_and_fatal_errors_are_not() {
        assert!(is_transient(&KafkaError::Global(
            RDKafkaErrorCode::BrokerTransportFailure
        )));
        assert!(is_transient(&KafkaError::MessageConsumption(
            RDKafkaErrorCode::NotCoordinator
        )));
        assert!(!is_transient(&KafkaError::Global(RDKafkaErrorCode::Fatal)));
        assert!(!is_transient(&KafkaError::MessageConsumptionFatal(
            RDKafkaErrorCode::FencedInstanceId
        )));
    }
}
