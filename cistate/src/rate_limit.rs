//! Rate limits per root namespace (tables `namespace_rate_limits` and `rate_limit_buckets`,
//! migration `0170_rate_limits.sql`): the operator's per-namespace overrides and the token
//! buckets every consumer instance takes from.
//!
//! A bucket is kept as GCRA's *theoretical arrival time* (`tat`), one timestamp per namespace:
//! taking a token moves it on by one emission interval (a minute divided by the limit), and the
//! token is there now when `tat` stays within the bucket's depth of now. It is one atomic
//! `UPDATE ... RETURNING` in PostgreSQL, with no refill job. A token that is not there yet is
//! *reserved*, not refused: the call still moves `tat` on and says how long to wait, so a
//! deferred delivery comes back at its own slot and does not race the others for the next token
//! ([`gcra`] is the arithmetic, shared by both stores).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// A namespace's own limit, over the consumer's default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimitOverride {
    pub namespace_id: i64,
    /// Deliveries per minute; `None`: no limit for this namespace.
    pub per_minute: Option<u32>,
}

/// One token bucket's shape: a token every `interval`, at most `depth`'s worth of them at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    /// A minute divided by the limit.
    pub interval: Duration,
    /// How much time's worth of tokens a full bucket holds (the burst), at least one interval.
    pub depth: Duration,
}

impl Bucket {
    /// `per_minute` tokens a minute, a full bucket holding `burst`'s worth (at least one).
    pub fn per_minute(per_minute: u32, burst: Duration) -> Self {
        let interval = Duration::from_secs(60) / per_minute.max(1);
        Bucket {
            interval,
            depth: burst.max(interval),
        }
    }
}

/// GCRA: takes (or reserves) one token of a bucket whose theoretical arrival time is `tat` (none:
/// a full bucket) at `now`. Returns the new `tat` and how long to wait for the token (zero: it is
/// there now).
pub fn gcra(
    tat: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    bucket: Bucket,
) -> (DateTime<Utc>, Duration) {
    let interval = chrono::Duration::from_std(bucket.interval).unwrap_or(chrono::Duration::MAX);
    let depth = chrono::Duration::from_std(bucket.depth).unwrap_or(chrono::Duration::MAX);
    let next = tat.map_or(now, |t| t.max(now)) + interval;
    let wait = (next - depth - now).to_std().unwrap_or_default();
    (next, wait)
}

/// GCRA without reserving: takes a token only if one is there now. Returns the new `tat` when
/// taken, or how long until one is there (nothing changes then). For the operator's own calls
/// (a hook's test), which are refused when over the limit rather than deferred.
pub fn gcra_now(
    tat: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    bucket: Bucket,
) -> Result<DateTime<Utc>, Duration> {
    let (next, wait) = gcra(tat, now, bucket);
    if wait.is_zero() { Ok(next) } else { Err(wait) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn a_full_bucket_gives_its_depth_at_once_then_one_token_per_interval() {
        let now = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
        // 60 a minute, 5 s deep: 5 at once, then one a second.
        let bucket = Bucket::per_minute(60, Duration::from_secs(5));
        let mut tat = None;
        let mut waits = vec![];
        for _ in 0..8 {
            let (next, wait) = gcra(tat, now, bucket);
            tat = Some(next);
            waits.push(wait.as_secs());
        }
        assert_eq!(
            waits,
            [0, 0, 0, 0, 0, 1, 2, 3],
            "reserved slots, one second apart"
        );
        // Ten seconds later the bucket is full again: the reservations are spent by then.
        let later = now + chrono::Duration::seconds(13);
        let (_, wait) = gcra(tat, later, bucket);
        assert_eq!(wait, Duration::ZERO);
    }

    #[test]
    fn without_reserving_a_refused_take_changes_nothing() {
        let now = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
        // GitLab's test limit: 5 a minute, all 5 at once.
        let bucket = Bucket::per_minute(5, Duration::from_secs(60));
        let mut tat = None;
        for _ in 0..5 {
            tat = Some(gcra_now(tat, now, bucket).unwrap());
        }
        let wait = gcra_now(tat, now, bucket).unwrap_err();
        assert_eq!(wait, Duration::from_secs(12));
        assert_eq!(
            gcra_now(tat, now, bucket).unwrap_err(),
            wait,
            "nothing was reserved"
        );
        let later = now + chrono::Duration::seconds(12);
        assert!(gcra_now(tat, later, bucket).is_ok());
    }

    #[test]
    fn the_depth_is_at_least_one_token() {
        let bucket = Bucket::per_minute(6, Duration::from_secs(1));
        assert_eq!(bucket.interval, Duration::from_secs(10));
        assert_eq!(bucket.depth, Duration::from_secs(10));
        let now = Utc::now();
        let (tat, first) = gcra(None, now, bucket);
        assert_eq!(first, Duration::ZERO);
        assert_eq!(gcra(Some(tat), now, bucket).1, Duration::from_secs(10));
    }
}
