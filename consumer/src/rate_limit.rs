//! Rate limits per root namespace: a token bucket per top-level namespace, shared by every
//! consumer instance, that *defers* deliveries past the limit instead of dropping them.
//!
//! GitLab limits webhook calls per top-level namespace per minute and drops the excess (the
//! receiver never learns of it). hookline hands the excess to the retry topic, due when the
//! namespace's next token comes: every delivery still goes out, spread over time, and other
//! namespaces never wait behind it (the main path only hands the task off and moves on).
//!
//! # A PostgreSQL bucket, not a per-partition share
//!
//! A Kafka-partition-local scheme (each partition's owner allowed 1/partitions of the rate)
//! needs no shared state, but a namespace's builds are spread over partitions by build id, so a
//! namespace whose builds happen to land on few partitions gets only a fraction of its limit,
//! and the share changes with every rebalance and partition count. The bucket lives in
//! PostgreSQL instead (the store every instance already uses): one row per limited namespace
//! holding GCRA's theoretical arrival time, taken from with one atomic `INSERT .. ON CONFLICT DO
//! UPDATE .. RETURNING` on the database's clock (`hookline_cistate::rate_limit`). The limit is
//! exact across instances; the cost is one round trip per delivery of a *limited* namespace
//! (none for the others), serialised per namespace by its row lock. Leasing several tokens per
//! round trip would cut that cost but lets an instance sit on tokens another one needs; it is
//! not done.
//!
//! # Reserved, not raced for
//!
//! A token that is not there yet is reserved: the bucket moves on and the delivery is deferred
//! to its own slot, carrying the attempt it paid for (`DeliveryTask::rate_token_for`), so it
//! goes out when due without taking another token. A backlog therefore drains at the limit in
//! arrival order instead of every deferred delivery waking at once to race for the next token.
//! A new attempt (after a failure) pays again, as GitLab counts every call.
//!
//! # What is read, and how often
//!
//! The overrides (`hookline-consumer rate-limits`) are read at most every [`OVERRIDES_TTL`];
//! a project's root namespace (`projects.namespace_id`) is cached for [`NAMESPACE_TTL`]. With no
//! default limit and no override nothing is read at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use hookline_cistate::{Bucket, CiStore, StoreError};
use tokio_util::sync::CancellationToken;

use crate::metrics::{ConsumerMetrics, Stall};
use crate::shutdown::{Abandoned, wait_out};
use crate::task::DeliveryTask;

/// How long the per-namespace overrides are reused: a `rate-limits set` takes effect within it.
pub const OVERRIDES_TTL: Duration = Duration::from_secs(10);
/// How long a project's root namespace is reused (a project rarely moves).
pub const NAMESPACE_TTL: Duration = Duration::from_secs(300);

/// The default limit and the bucket's depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimitConfig {
    /// Deliveries per minute per root namespace without an override; `None`: no limit.
    pub per_minute: Option<u32>,
    /// How much time's worth of tokens a full bucket holds: the burst a quiet namespace may send
    /// at once. The default, a minute, lets the whole per-minute allowance out at once, as
    /// GitLab's per-minute window does.
    pub burst: Duration,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_minute: None,
            burst: Duration::from_secs(60),
        }
    }
}

type Overrides = Arc<HashMap<i64, Option<u32>>>;

/// The limits as this instance knows them, read through short caches.
#[derive(Debug)]
pub struct RateLimiter {
    config: RateLimitConfig,
    store: Arc<dyn CiStore>,
    overrides: Mutex<Option<(Instant, Overrides)>>,
    namespaces: Mutex<HashMap<i64, (Instant, Option<i64>)>>,
}

/// What the limiter says of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Attempt it now.
    Go,
    /// Its token is reserved for `until`: defer it until then.
    DeferUntil(DateTime<Utc>),
}

impl RateLimiter {
    pub fn new(config: RateLimitConfig, store: Arc<dyn CiStore>) -> Self {
        Self {
            config,
            store,
            overrides: Mutex::new(None),
            namespaces: Mutex::new(HashMap::new()),
        }
    }

    async fn overrides(&self) -> Result<Overrides, StoreError> {
        if let Some((at, cached)) = &*lock(&self.overrides)
            && at.elapsed() < OVERRIDES_TTL
        {
            return Ok(cached.clone());
        }
        let fresh: Overrides = Arc::new(
            self.store
                .rate_limit_overrides()
                .await?
                .into_iter()
                .map(|o| (o.namespace_id, o.per_minute))
                .collect(),
        );
        *lock(&self.overrides) = Some((Instant::now(), fresh.clone()));
        Ok(fresh)
    }

    async fn namespace(&self, project_id: i64) -> Result<Option<i64>, StoreError> {
        if let Some((at, namespace)) = lock(&self.namespaces).get(&project_id)
            && at.elapsed() < NAMESPACE_TTL
        {
            return Ok(*namespace);
        }
        let namespace = self.store.project_namespace(project_id).await?;
        let mut cache = lock(&self.namespaces);
        cache.retain(|_, (at, _)| at.elapsed() < NAMESPACE_TTL);
        cache.insert(project_id, (Instant::now(), namespace));
        Ok(namespace)
    }

    /// The bucket that limits `project_id`'s deliveries, with its namespace; `None`: no limit.
    pub async fn bucket(&self, project_id: i64) -> Result<Option<(i64, Bucket)>, StoreError> {
        let overrides = self.overrides().await?;
        if self.config.per_minute.is_none() && overrides.values().all(Option::is_none) {
            return Ok(None);
        }
        // A project the store does not know has no namespace to be limited by.
        let Some(namespace) = self.namespace(project_id).await? else {
            return Ok(None);
        };
        let per_minute = match overrides.get(&namespace) {
            Some(own) => *own,
            None => self.config.per_minute,
        };
        Ok(per_minute.map(|n| (namespace, Bucket::per_minute(n, self.config.burst))))
    }

    /// Whether the next attempt of `task` may go now. The store being down holds the delivery,
    /// as it holds every other step that needs the store (counted as a `store` stall).
    pub(crate) async fn admit(
        &self,
        metrics: &ConsumerMetrics,
        task: &DeliveryTask,
        abandon: &CancellationToken,
    ) -> Result<Admission, Abandoned> {
        if task.rate_token_for == Some(task.attempts + 1) {
            // Deferred here before: its token was reserved then.
            return Ok(Admission::Go);
        }
        let wait = wait_out(
            metrics,
            Stall::Store,
            "store unavailable; the rate limit cannot be read",
            abandon,
            || async {
                match self.bucket(task.project_id).await? {
                    None => Ok(Duration::ZERO),
                    Some((namespace, bucket)) => {
                        self.store.take_rate_token(namespace, bucket).await
                    }
                }
            },
        )
        .await?;
        if wait.is_zero() {
            return Ok(Admission::Go);
        }
        let wait = chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
        Ok(Admission::DeferUntil(Utc::now() + wait))
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding it leaves at worst a stale cache entry.
    m.lock().unwrap_or_else(|p| p.into_inner())
}
