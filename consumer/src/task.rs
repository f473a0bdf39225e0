//! A delivery task: one event's body for one hook, with the attempts made so far. This is what
//! travels on the retry topic and what a dead-lettered delivery keeps, as Kafka headers around
//! the exact body bytes (so a retry or a replay sends the same bytes as the first attempt).

use bytes::Bytes;
use chrono::{DateTime, TimeZone, Utc};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use uuid::Uuid;

pub const H_EVENT_ID: &str = "hookline-event-id";
pub const H_BUILD_ID: &str = "hookline-build-id";
pub const H_PROJECT_ID: &str = "hookline-project-id";
pub const H_HOOK_ID: &str = "hookline-hook-id";
pub const H_ATTEMPTS: &str = "hookline-attempts";
pub const H_OCCURRED_AT: &str = "hookline-occurred-at-us";
pub const H_DUE_AT: &str = "hookline-due-at-ms";
pub const H_LAST_ERROR: &str = "hookline-last-error";
/// Where the event came from (the main-topic record), carried through retries so a dead letter
/// can always point back at it.
pub const H_SOURCE_TOPIC: &str = "hookline-source-topic";
pub const H_SOURCE_PARTITION: &str = "hookline-source-partition";
pub const H_SOURCE_OFFSET: &str = "hookline-source-offset";
/// A replay of one delivery through the main topic: only this hook gets the event.
pub const H_ONLY_HOOK: &str = "hookline-only-hook";
/// A delivery re-driven from the dead-letter topic by an operator (`dlq replay`): a deliberate
/// re-send of an old event, outside the per-(hook, build) order.
pub const H_REPLAYED: &str = "hookline-replayed";
/// A delivery re-sent by an operator from the delivery log (`hooks resend`): logged with the
/// trigger `resend`.
pub const H_RESEND: &str = "hookline-resend";
/// The attempt whose rate-limit token was reserved when the namespace's limit deferred it (see
/// `rate_limit`): that attempt goes out when due without taking another.
pub const H_RATE_TOKEN_FOR: &str = "hookline-rate-token-for";

/// A record's place in Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Source {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl Source {
    pub fn of<M: rdkafka::Message>(msg: &M) -> Self {
        Source {
            topic: msg.topic().to_owned(),
            partition: msg.partition(),
            offset: msg.offset(),
        }
    }

    pub fn header_pairs(&self) -> [(&'static str, String); 3] {
        [
            (H_SOURCE_TOPIC, self.topic.clone()),
            (H_SOURCE_PARTITION, self.partition.to_string()),
            (H_SOURCE_OFFSET, self.offset.to_string()),
        ]
    }

    /// The source named by `headers`, if all three are there and readable.
    pub fn from_headers<H: Headers>(headers: Option<&H>) -> Option<Self> {
        Some(Source {
            topic: header(headers, H_SOURCE_TOPIC)?,
            partition: header(headers, H_SOURCE_PARTITION)?.parse().ok()?,
            offset: header(headers, H_SOURCE_OFFSET)?.parse().ok()?,
        })
    }
}

/// One (event, hook) delivery.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryTask {
    /// `X-Gitlab-Event-UUID`; with the hook's uuid it makes the `Idempotency-Key`.
    pub event_id: Uuid,
    pub build_id: i64,
    pub project_id: i64,
    pub hook_id: i64,
    /// HTTP attempts made so far (0 before the first one).
    pub attempts: u32,
    /// When the transition happened: the start of the event-to-delivery latency.
    pub occurred_at: DateTime<Utc>,
    /// The exact body to POST.
    pub body: Bytes,
    /// Why the last attempt failed, for logs and dead letters.
    pub last_error: Option<String>,
    /// The main-topic record of the event (absent in tasks written before it was carried).
    pub source: Option<Source>,
    /// Re-driven from the dead-letter topic: not held by, nor holding, the build's order.
    pub replayed: bool,
    /// Re-sent from the delivery log (also `replayed`): its attempts are logged as `resend`.
    pub resend: bool,
    /// The attempt (1-based) whose rate-limit token is already reserved: set when the root
    /// namespace's limit deferred the task, so it does not pay twice.
    pub rate_token_for: Option<u32>,
}

/// Builds Kafka headers from string pairs.
pub fn headers<'a>(pairs: impl IntoIterator<Item = (&'a str, String)>) -> OwnedHeaders {
    pairs
        .into_iter()
        .fold(OwnedHeaders::new(), |h, (key, value)| {
            h.insert(Header {
                key,
                value: Some(value.as_bytes()),
            })
        })
}

/// The last value of header `key`, as text.
pub fn header<H: Headers>(headers: Option<&H>, key: &str) -> Option<String> {
    headers?
        .iter()
        .filter(|h| h.key == key)
        .last()
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

impl DeliveryTask {
    /// The headers describing this task (not its due time).
    pub fn header_pairs(&self) -> Vec<(&'static str, String)> {
        let mut pairs = vec![
            (H_EVENT_ID, self.event_id.to_string()),
            (H_BUILD_ID, self.build_id.to_string()),
            (H_PROJECT_ID, self.project_id.to_string()),
            (H_HOOK_ID, self.hook_id.to_string()),
            (H_ATTEMPTS, self.attempts.to_string()),
            (
                H_OCCURRED_AT,
                self.occurred_at.timestamp_micros().to_string(),
            ),
        ];
        if let Some(e) = &self.last_error {
            pairs.push((H_LAST_ERROR, e.clone()));
        }
        if let Some(source) = &self.source {
            pairs.extend(source.header_pairs());
        }
        if self.replayed {
            pairs.push((H_REPLAYED, "1".to_owned()));
        }
        if self.resend {
            pairs.push((H_RESEND, "1".to_owned()));
        }
        if let Some(attempt) = self.rate_token_for {
            pairs.push((H_RATE_TOKEN_FOR, attempt.to_string()));
        }
        pairs
    }

    /// Reads a task back from a record's headers and value.
    pub fn from_headers<H: Headers>(headers: Option<&H>, body: &[u8]) -> Result<Self, String> {
        fn get<H: Headers, T: std::str::FromStr>(
            headers: Option<&H>,
            key: &str,
        ) -> Result<T, String> {
            let text = header(headers, key).ok_or_else(|| format!("header {key} missing"))?;
            text.parse()
                .map_err(|_| format!("header {key} is not valid: {text:?}"))
        }
        let micros: i64 = get(headers, H_OCCURRED_AT)?;
        Ok(DeliveryTask {
            event_id: get(headers, H_EVENT_ID)?,
            build_id: get(headers, H_BUILD_ID)?,
            project_id: get(headers, H_PROJECT_ID)?,
            hook_id: get(headers, H_HOOK_ID)?,
            attempts: get(headers, H_ATTEMPTS)?,
            occurred_at: Utc
                .timestamp_micros(micros)
                .single()
                .ok_or_else(|| format!("header {H_OCCURRED_AT} out of range"))?,
            body: Bytes::copy_from_slice(body),
            last_error: header(headers, H_LAST_ERROR),
            source: Source::from_headers(headers),
            replayed: header(headers, H_REPLAYED).is_some(),
            resend: header(headers, H_RESEND).is_some(),
            rate_token_for: header(headers, H_RATE_TOKEN_FOR).and_then(|a| a.parse().ok()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_survives_the_header_round_trip() {
        let task = DeliveryTask {
            event_id: Uuid::new_v4(),
            build_id: 7,
            project_id: 3,
            hook_id: 11,
            attempts: 2,
            occurred_at: Utc.timestamp_micros(1_700_000_000_123_456).unwrap(),
            body: Bytes::from_static(b"{\"object_kind\":\"build\"}"),
            last_error: Some("HTTP 500".into()),
            source: Some(Source {
                topic: "build-events".into(),
                partition: 3,
                offset: 41,
            }),
            replayed: true,
            resend: true,
            rate_token_for: Some(3),
        };
        let h = headers(task.header_pairs());
        assert_eq!(
            DeliveryTask::from_headers(Some(&h), &task.body).unwrap(),
            task
        );
    }

    #[test]
    fn a_missing_header_is_named() {
        let h = headers([(H_EVENT_ID, Uuid::new_v4().to_string())]);
        let err = DeliveryTask::from_headers(Some(&h), b"{}").unwrap_err();
        assert!(err.contains("missing"), "{err}");
    }
}
