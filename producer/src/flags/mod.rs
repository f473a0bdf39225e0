//! Rollout flags: definitions in code, Flipper-compatible gates, stores, and the cached
//! evaluator the emit path asks.
//!
//! ```text
//! feature CLI --change--> FlagStore (pg.rs | store.rs: file, memory) <--reload every N s-- Flags
//!                                                                    emit: Flags::enabled_for_project
//! ```
//!
//! - [`definition`]: the declared flags (`execute_build_hooks_inline`, default off).
//! - [`gates`]: gates, percentages, the Flipper formula, changes and their diffs.
//! - [`store`], [`pg`]: where gates and their history live.
//!
//! Evaluation never waits on the store: [`Flags`] keeps the last loaded gates and a background
//! task refreshes them, so a store outage keeps the last known rollout instead of flipping it.

pub mod definition;
pub mod gates;
pub mod pg;
pub mod store;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

pub use definition::{DEFINITIONS, FlagDefinition, INLINE_FLAG, lookup};
pub use gates::{Change, Decision, Gates, Percentage, actor_bucket, project_actor};
pub use pg::PgFlagStore;
pub use store::{FileFlagStore, FlagStore, HistoryEntry, MemoryFlagStore};

use crate::error::ProducerError;
use hookline_shell::supervise::Supervisor;

/// The cached flag evaluator. Clones share one cache.
#[derive(Debug, Clone)]
pub struct Flags {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<dyn FlagStore>,
    gates: RwLock<Arc<BTreeMap<String, Gates>>>,
}

impl Flags {
    /// Flags in memory with no gate set (every flag at its default); change them with
    /// [`Flags::set`]. Needs no database and no runtime.
    pub fn in_memory() -> Flags {
        Self::with_gates(Arc::new(MemoryFlagStore::new()), BTreeMap::new())
    }

    fn with_gates(store: Arc<dyn FlagStore>, gates: BTreeMap<String, Gates>) -> Flags {
        Flags {
            inner: Arc::new(Inner {
                store,
                gates: RwLock::new(Arc::new(gates)),
            }),
        }
    }

    /// Loads the gates from `store` now, then reloads them every `reload_every` in the
    /// background for as long as any clone of the returned `Flags` lives.
    pub async fn load(
        store: Arc<dyn FlagStore>,
        reload_every: Duration,
    ) -> Result<Flags, ProducerError> {
        let gates = store.load().await?;
        let flags = Self::with_gates(store, gates);
        let weak = Arc::downgrade(&flags.inner);
        tokio::spawn(reload_loop(weak, reload_every));
        Ok(flags)
    }

    /// [`load`](Self::load), with the reloads a task of `supervisor`: a reloader that dies
    /// (a panic) stops the service instead of freezing the rollout where it was.
    pub async fn load_supervised(
        store: Arc<dyn FlagStore>,
        reload_every: Duration,
        supervisor: &Supervisor,
    ) -> Result<Flags, ProducerError> {
        let gates = store.load().await?;
        let flags = Self::with_gates(store, gates);
        let weak = Arc::downgrade(&flags.inner);
        let stop = supervisor.stop().clone();
        supervisor.spawn("flag reloader", async move {
            tokio::select! {
                _ = reload_loop(weak, reload_every) => {}
                _ = stop.cancelled() => {}
            }
            Ok::<(), std::convert::Infallible>(())
        });
        Ok(flags)
    }

    pub fn store(&self) -> &Arc<dyn FlagStore> {
        &self.inner.store
    }

    /// Reads the store again now.
    pub async fn reload(&self) -> Result<(), ProducerError> {
        let gates = self.inner.store.load().await?;
        self.replace(gates);
        Ok(())
    }

    fn replace(&self, gates: BTreeMap<String, Gates>) {
        *self.inner.gates.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(gates);
    }

    fn current(&self) -> Arc<BTreeMap<String, Gates>> {
        self.inner
            .gates
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Changes a flag in the store and in this cache at once.
    pub async fn set(&self, flag: &str, who: &str, change: Change) -> Result<Gates, ProducerError> {
        lookup(flag)?;
        let gates = self.inner.store.update(flag, who, &change).await?;
        let mut all = (*self.current()).clone();
        all.insert(flag.to_owned(), gates.clone());
        self.replace(all);
        Ok(gates)
    }

    /// The stored gates of `flag`, `None` while it has its default.
    pub fn gates(&self, flag: &str) -> Result<Option<Gates>, ProducerError> {
        lookup(flag)?;
        Ok(self.current().get(flag).cloned())
    }

    /// Evaluates `flag` for a project (Flipper id `Project:<id>`): the gate that decided, or
    /// `None` while nothing is stored for the flag (its default applies). Unknown flags are errors.
    pub fn decide_for_project(
        &self,
        flag: &str,
        project_id: i64,
    ) -> Result<Option<Decision>, ProducerError> {
        lookup(flag)?;
        Ok(self
            .current()
            .get(flag)
            .map(|gates| gates.evaluate(flag, Some(&project_actor(project_id)), &mut rand::rng())))
    }

    /// Is `flag` on for the project?
    pub fn enabled_for_project(&self, flag: &str, project_id: i64) -> Result<bool, ProducerError> {
        let definition = lookup(flag)?;
        Ok(self
            .decide_for_project(flag, project_id)?
            .map_or(definition.default, Decision::is_on))
    }

    /// Is inline rendering on for the project? (The one flag the emit path asks.)
    pub fn inline_for_project(&self, project_id: i64) -> bool {
        self.enabled_for_project(INLINE_FLAG, project_id)
            .unwrap_or(false)
    }
}

async fn reload_loop(flags: Weak<Inner>, every: Duration) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        ticker.tick().await;
        let Some(inner) = flags.upgrade() else { return };
        let flags = Flags { inner };
        if let Err(error) = flags.reload().await {
            // Keep the last known gates: a store blip must not flip a rollout.
            tracing::warn!(%error, "reloading feature flags failed; keeping the last known gates");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn in_memory_flags_start_at_the_default_and_follow_set() {
        let flags = Flags::in_memory();
        assert!(!flags.inline_for_project(42));
        flags
            .set(
                INLINE_FLAG,
                "test",
                Change::PercentageOfActors(Percentage::FULL),
            )
            .await
            .unwrap();
        assert!(flags.inline_for_project(42));
        flags
            .set(INLINE_FLAG, "test", Change::Boolean(false))
            .await
            .unwrap();
        assert!(!flags.inline_for_project(42));
        assert!(
            flags
                .set("nope", "test", Change::Boolean(true))
                .await
                .is_err()
        );
        assert!(flags.enabled_for_project("nope", 1).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn loaded_flags_see_changes_made_elsewhere_after_the_reload_interval() {
        let store: Arc<dyn FlagStore> = Arc::new(MemoryFlagStore::new());
        let flags = Flags::load(store.clone(), Duration::from_secs(5))
            .await
            .unwrap();
        store
            .update(INLINE_FLAG, "ops", &Change::Boolean(true))
            .await
            .unwrap();
        assert!(!flags.inline_for_project(1), "not before a reload");
        tokio::time::sleep(Duration::from_secs(6)).await;
        assert!(flags.inline_for_project(1), "seen within one interval");
    }
}
