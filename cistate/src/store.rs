//! The CI state store: one trait, two implementations ([`crate::pg::PgStore`],
//! [`crate::memory::MemoryStore`]).
//!
//! Reads are what hookline does on its hot paths: one render snapshot per build, loaded in one
//! round trip, or many in one batched query. Writes exist for the CI system's side (the
//! simulator, tests) and for hook management and health.

use std::collections::HashMap;

use async_trait::async_trait;
use chrono::{DateTime, Utc};

use uuid::Uuid;

use crate::model::{
    Build, Hook, HookEdit, HookFailure, Namespace, NewHook, OrderEntry, ParkedDelivery,
    ParkedEntry, Pipeline, Project, RenderSnapshot, Runner, User,
};
use crate::rate_limit::{Bucket, RateLimitOverride};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or failed: retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A write referred to a row that does not exist, or broke a constraint.
    #[error("invalid write: {0}")]
    Invalid(String),
    #[error("migrations failed: {0}")]
    Migrate(String),
    /// A stored hook secret cannot be opened (sealed with a key the secrets key file does not
    /// hold, no key file, or altered): fix `--secrets-key-file`.
    #[error("hook secret: {0}")]
    Secret(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Database(db)
                if db.is_foreign_key_violation()
                    || db.is_unique_violation()
                    || db.is_check_violation() =>
            {
                StoreError::Invalid(db.to_string())
            }
            _ => StoreError::Unavailable(e.to_string()),
        }
    }
}

#[async_trait]
pub trait CiStore: Send + Sync + std::fmt::Debug {
    /// The render snapshot of one build; `None` when the build does not exist.
    async fn snapshot(&self, build_id: i64) -> Result<Option<RenderSnapshot>, StoreError> {
        Ok(self.snapshots(&[build_id]).await?.remove(&build_id))
    }
    /// The snapshots of many builds in one query; missing builds are absent from the map.
    async fn snapshots(
        &self,
        build_ids: &[i64],
    ) -> Result<HashMap<i64, RenderSnapshot>, StoreError>;

    async fn upsert_namespace(&self, namespace: &Namespace) -> Result<(), StoreError>;
    async fn upsert_project(&self, project: &Project) -> Result<(), StoreError>;
    async fn upsert_user(&self, user: &User) -> Result<(), StoreError>;
    async fn upsert_runner(&self, runner: &Runner) -> Result<(), StoreError>;
    async fn upsert_pipeline(&self, pipeline: &Pipeline) -> Result<(), StoreError>;
    async fn upsert_build(&self, build: &Build) -> Result<(), StoreError>;

    async fn add_hook(&self, hook: &NewHook) -> Result<Hook, StoreError>;
    async fn hook(&self, id: i64) -> Result<Option<Hook>, StoreError>;
    /// All hooks, or a project's, ordered by id.
    async fn list_hooks(&self, project_id: Option<i64>) -> Result<Vec<Hook>, StoreError>;
    /// The hooks of a project subscribed to job events, whatever their health.
    async fn job_hooks(&self, project_id: i64) -> Result<Vec<Hook>, StoreError>;
    /// Applies `edit` to the hook's settings; `None` when there is no such hook.
    async fn update_hook(&self, id: i64, edit: &HookEdit) -> Result<Option<Hook>, StoreError>;
    async fn remove_hook(&self, id: i64) -> Result<bool, StoreError>;
    /// Clears the hook's failures (re-enables it). False when there is no such hook.
    async fn enable_hook(&self, id: i64) -> Result<bool, StoreError>;
    /// Records a delivery that failed at `now`: GitLab's auto-disable rule
    /// ([`Hook::health_after_failure`]) if the hook is executable at `now`, nothing otherwise
    /// (GitLab's `backoff!` returns early for a hook that is not executable). One conditional
    /// update, correct with several consumers failing at once.
    async fn record_hook_failure(
        &self,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<HookFailure, StoreError>;
    /// Disables the hook for good (its receiver answered 410 Gone), as its 40th failure would;
    /// [`CiStore::enable_hook`] turns it on again. False when there is no such hook.
    async fn disable_hook(&self, id: i64) -> Result<bool, StoreError>;
    /// Records a successful delivery: resets the failure count and any back-off.
    async fn record_hook_success(&self, id: i64) -> Result<(), StoreError>;

    /// The order queue of one (hook, build), pending and settled entries, in order
    /// (`occurred_at`, then `seq`).
    async fn order_entries(
        &self,
        hook_id: i64,
        build_id: i64,
    ) -> Result<Vec<OrderEntry>, StoreError>;
    /// The (hook, build) pairs among `build_ids` that have an order queue (pending or settled
    /// entries): one query for a batch of events, so builds without one need no other read.
    async fn order_queued_pairs(&self, build_ids: &[i64]) -> Result<Vec<(i64, i64)>, StoreError>;
    /// Puts a delivery in the (hook, build) order queue as pending; nothing if it is there
    /// already (pending or settled).
    async fn order_hold(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
        occurred_at: DateTime<Utc>,
    ) -> Result<(), StoreError>;
    /// Marks a delivery of the queue settled (delivered, dead-lettered, collapsed) and forgets
    /// its parked record; nothing if it is not in the queue. When it was first in the queue and
    /// the entry now first is parked, returns that one: the caller writes it back to the retry
    /// topic, then calls [`CiStore::order_unpark`]. Serialised per (hook, build) with
    /// [`CiStore::order_park`], so a parked entry is always seen by the settlement before it.
    async fn order_settle(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
    ) -> Result<Option<ParkedEntry>, StoreError>;
    /// Parks a pending delivery's record on its entry, if an earlier entry of the queue is still
    /// pending. False (nothing written) when it is first in the queue, settled, or not in it: the
    /// caller reads the queue again.
    async fn order_park(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
        delivery: &ParkedDelivery,
    ) -> Result<bool, StoreError>;
    /// Forgets a parked record once it is back on the retry topic.
    async fn order_unpark(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
    ) -> Result<(), StoreError>;
    /// Parked entries first in their queue whose queue saw no settlement since `quiet_since`:
    /// left there by an instance that stopped between a settlement and the write-back (at most
    /// `limit`).
    async fn order_stranded(
        &self,
        quiet_since: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<ParkedEntry>, StoreError>;
    /// Forgets settled entries older than `before`, and entries of hooks that no longer exist.
    async fn order_prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;

    /// Cheap liveness check for readiness probes.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Whether the project is in the store (`hooks add` refuses unknown projects).
    async fn project_exists(&self, project_id: i64) -> Result<bool, StoreError>;

    // Rate limits per root namespace: see `crate::rate_limit`.

    /// The root namespace of a project; `None` when the project is not in the store.
    async fn project_namespace(&self, project_id: i64) -> Result<Option<i64>, StoreError>;
    /// Every namespace's own limit, by namespace id.
    async fn rate_limit_overrides(&self) -> Result<Vec<RateLimitOverride>, StoreError>;
    /// Sets a namespace's own limit (`None`: no limit for it).
    async fn set_rate_limit(
        &self,
        namespace_id: i64,
        per_minute: Option<u32>,
    ) -> Result<(), StoreError>;
    /// Forgets a namespace's own limit (the default applies again). False when it had none.
    async fn clear_rate_limit(&self, namespace_id: i64) -> Result<bool, StoreError>;
    /// Takes, or reserves, one token of the namespace's bucket ([`crate::rate_limit::gcra`]):
    /// how long to wait for it (zero: now). Atomic across every consumer sharing the store.
    async fn take_rate_token(
        &self,
        namespace_id: i64,
        bucket: Bucket,
    ) -> Result<std::time::Duration, StoreError>;
    /// Takes one token of the namespace's bucket only if it is there now ([`crate::rate_limit::gcra_now`]):
    /// zero when taken, else how long until one is (nothing reserved). For calls refused over
    /// the limit rather than deferred (a hook's test).
    async fn try_take_rate_token(
        &self,
        namespace_id: i64,
        bucket: Bucket,
    ) -> Result<std::time::Duration, StoreError>;
    /// The same for a hook's own test bucket (GitLab: 5 tests a minute per hook), shared by
    /// every consumer instance.
    async fn take_hook_test_token(
        &self,
        hook_id: i64,
        bucket: Bucket,
    ) -> Result<std::time::Duration, StoreError>;
    /// The project's most recent build (highest id), for a hook's test delivery.
    async fn latest_build(&self, project_id: i64) -> Result<Option<i64>, StoreError>;

    /// The PostgreSQL pool behind the store, for the services' own tables (the delivery log);
    /// `None` for a store without one (the in-memory store).
    fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        None
    }
}
