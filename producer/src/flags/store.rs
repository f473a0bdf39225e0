//! Where gates live: the [`FlagStore`] trait, and the in-memory and JSON-file stores (the
//! PostgreSQL store is in [`super::pg`]). Every change is kept as history: who, when, which gate,
//! old and new value.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::gates::{Change, Gates};
use crate::error::ProducerError;

/// One recorded change of one gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEntry {
    pub flag: String,
    pub who: String,
    pub at: DateTime<Utc>,
    pub gate: String,
    pub old: Option<String>,
    pub new: Option<String>,
}

#[async_trait]
pub trait FlagStore: Send + Sync + Debug {
    /// The gates of every flag that has been stored. A flag absent here has its default.
    async fn load(&self) -> Result<BTreeMap<String, Gates>, ProducerError>;
    /// Applies `change` to `flag` atomically, records what changed, and returns the new gates.
    async fn update(&self, flag: &str, who: &str, change: &Change) -> Result<Gates, ProducerError>;
    /// Forgets the flag (it falls back to its default); records every gate it closed. False
    /// when nothing was stored.
    async fn delete(&self, flag: &str, who: &str) -> Result<bool, ProducerError>;
    /// Changes of `flag`, oldest first.
    async fn history(&self, flag: &str) -> Result<Vec<HistoryEntry>, ProducerError>;
}

/// What the memory and file stores hold.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct FlagState {
    pub flags: BTreeMap<String, Gates>,
    pub history: Vec<HistoryEntry>,
}

impl FlagState {
    fn update(&mut self, flag: &str, who: &str, change: &Change) -> Gates {
        let old = self.flags.get(flag).cloned().unwrap_or_default();
        let new = old.apply(change);
        self.record(flag, who, &old, &new);
        self.flags.insert(flag.to_owned(), new.clone());
        new
    }

    fn delete(&mut self, flag: &str, who: &str) -> bool {
        match self.flags.remove(flag) {
            Some(old) => {
                self.record(flag, who, &old, &Gates::default());
                true
            }
            None => false,
        }
    }

    fn record(&mut self, flag: &str, who: &str, old: &Gates, new: &Gates) {
        let at = Utc::now();
        self.history
            .extend(old.diff(new).into_iter().map(|d| HistoryEntry {
                flag: flag.to_owned(),
                who: who.to_owned(),
                at,
                gate: d.gate,
                old: d.old,
                new: d.new,
            }));
    }

    fn history(&self, flag: &str) -> Vec<HistoryEntry> {
        self.history
            .iter()
            .filter(|h| h.flag == flag)
            .cloned()
            .collect()
    }
}

/// Gates in memory: the demo and tests.
#[derive(Debug, Default)]
pub struct MemoryFlagStore {
    state: Mutex<FlagState>,
}

impl MemoryFlagStore {
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, FlagState> {
        // A panic while holding the lock cannot leave the state half-written (every update is
        // computed before it is stored), so a poisoned lock is still safe to use.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[async_trait]
impl FlagStore for MemoryFlagStore {
    async fn load(&self) -> Result<BTreeMap<String, Gates>, ProducerError> {
        Ok(self.state().flags.clone())
    }
    async fn update(&self, flag: &str, who: &str, change: &Change) -> Result<Gates, ProducerError> {
        Ok(self.state().update(flag, who, change))
    }
    async fn delete(&self, flag: &str, who: &str) -> Result<bool, ProducerError> {
        Ok(self.state().delete(flag, who))
    }
    async fn history(&self, flag: &str) -> Result<Vec<HistoryEntry>, ProducerError> {
        Ok(self.state().history(flag))
    }
}

/// Gates in a JSON file, for the embedded mode. Every read goes to the file, so a producer
/// polling it sees changes the CLI made from another process. Writes replace the file
/// atomically (write a temporary file, then rename); two CLIs writing at the same instant can
/// lose one change, which is acceptable for a single-operator embedded setup.
#[derive(Debug)]
pub struct FileFlagStore {
    path: PathBuf,
    /// Serialises this process's read-modify-write cycles.
    lock: tokio::sync::Mutex<()>,
}

impl FileFlagStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            lock: tokio::sync::Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn read(&self) -> Result<FlagState, ProducerError> {
        match tokio::fs::read(&self.path).await {
            Ok(bytes) if bytes.iter().all(u8::is_ascii_whitespace) => Ok(FlagState::default()),
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| {
                ProducerError::Invalid(format!("flags file {}: {e}", self.path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(FlagState::default()),
            Err(e) => Err(ProducerError::io(
                format!("reading flags file {}", self.path.display()),
                e,
            )),
        }
    }

    async fn write(&self, state: &FlagState) -> Result<(), ProducerError> {
        let bytes = serde_json::to_vec_pretty(state)
            .map_err(|e| ProducerError::Invalid(format!("serialising flags: {e}")))?;
        let tmp = self
            .path
            .with_extension(format!("tmp{}", std::process::id()));
        let context = || format!("writing flags file {}", self.path.display());
        tokio::fs::write(&tmp, bytes)
            .await
            .map_err(|e| ProducerError::io(context(), e))?;
        tokio::fs::rename(&tmp, &self.path)
            .await
            .map_err(|e| ProducerError::io(context(), e))
    }
}

#[async_trait]
impl FlagStore for FileFlagStore {
    async fn load(&self) -> Result<BTreeMap<String, Gates>, ProducerError> {
        Ok(self.read().await?.flags)
    }
    async fn update(&self, flag: &str, who: &str, change: &Change) -> Result<Gates, ProducerError> {
        let _guard = self.lock.lock().await;
        let mut state = self.read().await?;
        let gates = state.update(flag, who, change);
        self.write(&state).await?;
        Ok(gates)
    }
    async fn delete(&self, flag: &str, who: &str) -> Result<bool, ProducerError> {
        let _guard = self.lock.lock().await;
        let mut state = self.read().await?;
        let deleted = state.delete(flag, who);
        if deleted {
            self.write(&state).await?;
        }
        Ok(deleted)
    }
    async fn history(&self, flag: &str) -> Result<Vec<HistoryEntry>, ProducerError> {
        Ok(self.read().await?.history(flag))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::flags::{INLINE_FLAG, Percentage};

    async fn exercise(store: &dyn FlagStore) {
        let quarter: Percentage = "25".parse().unwrap();
        store
            .update(INLINE_FLAG, "ada", &Change::PercentageOfActors(quarter))
            .await
            .unwrap();
        store
            .update(
                INLINE_FLAG,
                "bob",
                &Change::Actors {
                    enable: true,
                    actors: vec!["Project:7".into()],
                },
            )
            .await
            .unwrap();
        let loaded = store.load().await.unwrap();
        assert_eq!(loaded[INLINE_FLAG].percentage_of_actors, Some(quarter));
        assert!(loaded[INLINE_FLAG].actors.contains("Project:7"));
        let cleared = store
            .update(INLINE_FLAG, "carol", &Change::Boolean(false))
            .await
            .unwrap();
        assert!(cleared.is_closed());
        let history = store.history(INLINE_FLAG).await.unwrap();
        let lines: Vec<_> = history
            .iter()
            .map(|h| format!("{} {} {:?}->{:?}", h.who, h.gate, h.old, h.new))
            .collect();
        assert_eq!(
            lines,
            [
                "ada percentage_of_actors None->Some(\"25\")",
                "bob actors None->Some(\"Project:7\")",
                "carol actors Some(\"Project:7\")->None",
                "carol percentage_of_actors Some(\"25\")->None",
            ]
        );
        assert!(store.delete(INLINE_FLAG, "dan").await.unwrap());
        assert!(!store.delete(INLINE_FLAG, "dan").await.unwrap());
        assert!(store.load().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn memory_store_applies_changes_and_keeps_history() {
        exercise(&MemoryFlagStore::new()).await;
    }

    #[tokio::test]
    async fn file_store_applies_changes_and_keeps_history_across_instances() {
        let path =
            std::env::temp_dir().join(format!("hookline-flags-{}.json", uuid::Uuid::new_v4()));
        exercise(&FileFlagStore::new(&path)).await;
        FileFlagStore::new(&path)
            .update(INLINE_FLAG, "eve", &Change::Boolean(true))
            .await
            .unwrap();
        // A second instance (another process, in production) reads what the first wrote.
        let other = FileFlagStore::new(&path);
        assert!(other.load().await.unwrap()[INLINE_FLAG].boolean);
        assert_eq!(other.history(INLINE_FLAG).await.unwrap().len(), 5);
        std::fs::remove_file(&path).ok();
    }

    #[tokio::test]
    async fn a_corrupt_flags_file_is_an_error_not_an_empty_store() {
        let path =
            std::env::temp_dir().join(format!("hookline-flags-{}.json", uuid::Uuid::new_v4()));
        std::fs::write(&path, b"{not json").unwrap();
        let err = FileFlagStore::new(&path).load().await.unwrap_err();
        assert!(err.to_string().contains("flags file"), "{err}");
        std::fs::remove_file(&path).ok();
    }
}
