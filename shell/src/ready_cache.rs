//! A readiness probe's answer, reused for a moment: `/readyz` is open (orchestrators probe it
//! without credentials) and each real check costs a database round trip and a Kafka metadata
//! request, so a flood of probes must not turn into a flood of those. Concurrent probes while a
//! check runs wait for that one check instead of starting their own.

use std::future::Future;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

/// How long an answer is reused by default.
pub const DEFAULT_TTL: Duration = Duration::from_secs(1);

/// The last answer and when it was made.
#[derive(Debug)]
pub struct ReadyCache {
    ttl: Duration,
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl ReadyCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            last: Mutex::new(None),
        }
    }

    /// The cached answer while it is younger than the TTL, else `check`'s (then cached).
    pub async fn get<F, Fut>(&self, check: F) -> Result<(), String>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(), String>>,
    {
        // Held across the check: probes arriving meanwhile get its answer, not a check each.
        let mut last = self.last.lock().await;
        if let Some((at, answer)) = &*last
            && at.elapsed() < self.ttl
        {
            return answer.clone();
        }
        let answer = check().await;
        *last = Some((Instant::now(), answer.clone()));
        answer
    }
}

impl Default for ReadyCache {
    fn default() -> Self {
        Self::new(DEFAULT_TTL)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test]
    async fn many_probes_cost_one_check_per_ttl() {
        let cache = Arc::new(ReadyCache::new(Duration::from_millis(200)));
        let checks = Arc::new(AtomicUsize::new(0));
        let probe = |cache: Arc<ReadyCache>, checks: Arc<AtomicUsize>| async move {
            cache
                .get(|| async move {
                    checks.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    Err("kafka: down".to_owned())
                })
                .await
        };
        let answers = futures_join(
            (0..50)
                .map(|_| tokio::spawn(probe(cache.clone(), checks.clone())))
                .collect(),
        )
        .await;
        assert!(
            answers
                .iter()
                .all(|a| a.as_ref().err().map(String::as_str) == Some("kafka: down"))
        );
        assert_eq!(checks.load(Ordering::SeqCst), 1);
        tokio::time::sleep(Duration::from_millis(250)).await;
        let _ = probe(cache.clone(), checks.clone()).await;
        assert_eq!(
            checks.load(Ordering::SeqCst),
            2,
            "a stale answer is checked again"
        );
    }

    async fn futures_join(
        handles: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    ) -> Vec<Result<(), String>> {
        let mut out = Vec::new();
        for h in handles {
            out.push(h.await.unwrap());
        }
        out
    }
}
