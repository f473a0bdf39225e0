//! Waiting without hanging: every wait of the consumer either ends, is abandoned at shutdown, or
//! shows up as a stall.
//!
//! - [`Abandoned`]: shutdown's drain bound ran out, the work stops unfinished (and its offset is
//!   not stored, so it is done again by whoever owns the partition next).
//! - `pause`: a sleep that shutdown can cut short.
//! - `wait_out`: the one "try, back off, try again" loop, for dependencies whose outage the
//!   consumer rides out (schema registry, CI store, Kafka hand-offs). A wait that lasts past a
//!   minute sets `hookline_consumer_stalled_seconds{reason}` and logs a warning once a minute, so
//!   no loop retries forever without a visible signal. What is *not* worth waiting for (a record
//!   too large, a refused topic) is the caller's to classify: its try returns `Ok` with that
//!   outcome and the loop ends.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::metrics::{ConsumerMetrics, Stall};

/// Shutdown's drain bound ran out: the work was dropped unfinished, so its offset must not be
/// stored (whoever owns the partition next does it again).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Abandoned;

/// Back-off before try `try_number + 1` of something that failed: 50 ms doubling to 6.4 s.
pub(crate) fn backoff(try_number: u32) -> Duration {
    Duration::from_millis(50u64.saturating_mul(1 << try_number.min(7)))
}

/// Sleeps `d`, or returns `Err(Abandoned)` if `abandon` fires first.
pub(crate) async fn pause(d: Duration, abandon: &CancellationToken) -> Result<(), Abandoned> {
    tokio::select! {
        _ = abandon.cancelled() => Err(Abandoned),
        _ = tokio::time::sleep(d) => Ok(()),
    }
}

/// Calls `try_once` until it returns `Ok`, backing off between failures; the wait counts as a
/// `reason` stall while it lasts. `Err(Abandoned)` when `abandon` fires first (also during a
/// try, which is then dropped).
pub(crate) async fn wait_out<T, E, F, Fut>(
    metrics: &ConsumerMetrics,
    reason: Stall,
    what: &str,
    abandon: &CancellationToken,
    mut try_once: F,
) -> Result<T, Abandoned>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let mut stall = None;
    for try_number in 0.. {
        let result = tokio::select! {
            _ = abandon.cancelled() => return Err(Abandoned),
            result = try_once() => result,
        };
        let error = match result {
            Ok(value) => return Ok(value),
            Err(error) => error,
        };
        if try_number == 0 {
            tracing::warn!(reason = reason.as_str(), %error, "{what}: waiting");
        } else {
            tracing::debug!(reason = reason.as_str(), %error, try_number, "{what}: still waiting");
        }
        stall
            .get_or_insert_with(|| metrics.stall(reason))
            .still(&error);
        pause(backoff(try_number), abandon).await?;
    }
    unreachable!("the loop only ends by returning")
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    #[test]
    fn backoff_doubles_and_is_capped() {
        assert_eq!(backoff(0), Duration::from_millis(50));
        assert_eq!(backoff(3), Duration::from_millis(400));
        assert_eq!(backoff(7), Duration::from_millis(6400));
        assert_eq!(backoff(30), Duration::from_millis(6400));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_past_a_minute_shows_as_a_stall_and_clears_when_it_ends() {
        let metrics = ConsumerMetrics::new();
        let tries = AtomicU32::new(0);
        let abandon = CancellationToken::new();
        let waiting = wait_out(&metrics, Stall::Store, "store", &abandon, || async {
            let n = tries.fetch_add(1, Ordering::Relaxed);
            if n < 20 { Err("down") } else { Ok(n) }
        });
        let watcher = async {
            // Twenty failures back off for about 100 s in all: well past a minute.
            let mut seen = 0;
            for _ in 0..200 {
                tokio::time::sleep(Duration::from_secs(1)).await;
                seen = seen.max(metrics.stalled_seconds(Stall::Store));
            }
            seen
        };
        let (result, seen) = tokio::join!(waiting, watcher);
        assert_eq!(result, Ok(20));
        assert!(seen >= 60, "the gauge showed at most {seen} s");
        assert_eq!(
            metrics.stalled_seconds(Stall::Store),
            0,
            "cleared when done"
        );
        assert_eq!(
            metrics.stalled_seconds(Stall::Handoff),
            0,
            "other reasons untouched"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_abandons_a_wait() {
        let metrics = ConsumerMetrics::new();
        let abandon = CancellationToken::new();
        let cancel = abandon.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(5)).await;
            cancel.cancel();
        });
        let result: Result<(), _> = wait_out(&metrics, Stall::Handoff, "x", &abandon, || async {
            Err::<(), _>("refused")
        })
        .await;
        assert_eq!(result, Err(Abandoned));
    }
}
