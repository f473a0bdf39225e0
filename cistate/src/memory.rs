//! The in-memory store: the embedded default for `hookline demo` and fast tests.

use std::collections::{BTreeMap, HashMap};
use std::sync::RwLock;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use uuid::Uuid;

use crate::model::{
    Build, Hook, HookEdit, HookFailure, Namespace, NewHook, OrderEntry, ParkedDelivery,
    ParkedEntry, Pipeline, Project, RenderSnapshot, Runner, User,
};
use crate::rate_limit::{Bucket, RateLimitOverride, gcra};
use crate::render::truncate_to_micros;
use crate::store::{CiStore, StoreError};

#[derive(Debug, Default)]
struct State {
    namespaces: HashMap<i64, Namespace>,
    projects: HashMap<i64, Project>,
    users: HashMap<i64, User>,
    runners: HashMap<i64, Runner>,
    pipelines: HashMap<i64, Pipeline>,
    builds: HashMap<i64, Build>,
    hooks: BTreeMap<i64, Hook>,
    next_hook_id: i64,
    /// (hook, build) -> its order queue, with the time each entry was settled.
    order: HashMap<(i64, i64), Vec<QueuedEntry>>,
    next_order_seq: i64,
    /// (hook, build, event) -> the record parked on that entry.
    parked: HashMap<(i64, i64, Uuid), ParkedDelivery>,
}

/// Per-namespace limits and buckets, by namespace id.
#[derive(Debug, Default)]
struct RateLimits {
    /// Its own limit (`None`: no limit).
    overrides: HashMap<i64, Option<u32>>,
    /// Its bucket's theoretical arrival time.
    buckets: HashMap<i64, DateTime<Utc>>,
    /// Each hook's test bucket, by hook id.
    hook_tests: HashMap<i64, DateTime<Utc>>,
}

/// An entry of an order queue and when it was settled.
type QueuedEntry = (OrderEntry, Option<DateTime<Utc>>);

#[derive(Debug, Default)]
pub struct MemoryStore {
    state: RwLock<State>,
    rate_limits: std::sync::Mutex<RateLimits>,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }
}

fn missing(what: &str, id: i64) -> StoreError {
    StoreError::Invalid(format!("{what} {id} does not exist"))
}

/// Keeps timestamps at PostgreSQL's precision so both stores render the same bytes.
fn micros(t: Option<DateTime<Utc>>) -> Option<DateTime<Utc>> {
    t.map(truncate_to_micros)
}

#[async_trait]
impl CiStore for MemoryStore {
    async fn snapshots(
        &self,
        build_ids: &[i64],
    ) -> Result<HashMap<i64, RenderSnapshot>, StoreError> {
        let state = self.state.read().unwrap();
        let mut out = HashMap::with_capacity(build_ids.len());
        for id in build_ids {
            let Some(build) = state.builds.get(id) else {
                continue;
            };
            // Writes check references, so a present build has all of its rows.
            let pipeline = &state.pipelines[&build.pipeline_id];
            let project = &state.projects[&build.project_id];
            out.insert(
                *id,
                RenderSnapshot {
                    build: build.clone(),
                    pipeline: pipeline.clone(),
                    project: project.clone(),
                    namespace: state.namespaces[&project.namespace_id].clone(),
                    user: state.users[&build.user_id].clone(),
                    runner: build.runner_id.and_then(|r| state.runners.get(&r).cloned()),
                },
            );
        }
        Ok(out)
    }

    async fn upsert_namespace(&self, namespace: &Namespace) -> Result<(), StoreError> {
        let mut state = self.state.write().unwrap();
        state.namespaces.insert(namespace.id, namespace.clone());
        Ok(())
    }

    async fn upsert_project(&self, project: &Project) -> Result<(), StoreError> {
        let mut state = self.state.write().unwrap();
        if !state.namespaces.contains_key(&project.namespace_id) {
            return Err(missing("namespace", project.namespace_id));
        }
        state.projects.insert(project.id, project.clone());
        Ok(())
    }

    async fn upsert_user(&self, user: &User) -> Result<(), StoreError> {
        self.state
            .write()
            .unwrap()
            .users
            .insert(user.id, user.clone());
        Ok(())
    }

    async fn upsert_runner(&self, runner: &Runner) -> Result<(), StoreError> {
        self.state
            .write()
            .unwrap()
            .runners
            .insert(runner.id, runner.clone());
        Ok(())
    }

    async fn upsert_pipeline(&self, pipeline: &Pipeline) -> Result<(), StoreError> {
        let mut state = self.state.write().unwrap();
        if !state.projects.contains_key(&pipeline.project_id) {
            return Err(missing("project", pipeline.project_id));
        }
        if !state.users.contains_key(&pipeline.user_id) {
            return Err(missing("user", pipeline.user_id));
        }
        let mut pipeline = pipeline.clone();
        pipeline.started_at = micros(pipeline.started_at);
        pipeline.finished_at = micros(pipeline.finished_at);
        state.pipelines.insert(pipeline.id, pipeline);
        Ok(())
    }

    async fn upsert_build(&self, build: &Build) -> Result<(), StoreError> {
        let mut state = self.state.write().unwrap();
        if !state.pipelines.contains_key(&build.pipeline_id) {
            return Err(missing("pipeline", build.pipeline_id));
        }
        if !state.projects.contains_key(&build.project_id) {
            return Err(missing("project", build.project_id));
        }
        if !state.users.contains_key(&build.user_id) {
            return Err(missing("user", build.user_id));
        }
        if let Some(r) = build.runner_id.filter(|r| !state.runners.contains_key(r)) {
            return Err(missing("runner", r));
        }
        let mut build = build.clone();
        build.created_at = truncate_to_micros(build.created_at);
        build.queued_at = micros(build.queued_at);
        build.started_at = micros(build.started_at);
        build.finished_at = micros(build.finished_at);
        state.builds.insert(build.id, build);
        Ok(())
    }

    async fn add_hook(&self, hook: &NewHook) -> Result<Hook, StoreError> {
        let mut state = self.state.write().unwrap();
        state.next_hook_id += 1;
        let hook = Hook {
            id: state.next_hook_id,
            uuid: Uuid::new_v4(),
            project_id: hook.project_id,
            url: hook.url.clone(),
            token: hook.token.clone(),
            signing_secret: hook.signing_secret.clone(),
            job_events: hook.job_events,
            recent_failures: 0,
            disabled_until: None,
            collapse: hook.collapse,
            created_at: Some(Utc::now()),
        };
        state.hooks.insert(hook.id, hook.clone());
        Ok(hook)
    }

    async fn hook(&self, id: i64) -> Result<Option<Hook>, StoreError> {
        Ok(self.state.read().unwrap().hooks.get(&id).cloned())
    }

    async fn list_hooks(&self, project_id: Option<i64>) -> Result<Vec<Hook>, StoreError> {
        let state = self.state.read().unwrap();
        Ok(state
            .hooks
            .values()
            .filter(|h| project_id.is_none_or(|p| h.project_id == p))
            .cloned()
            .collect())
    }

    async fn job_hooks(&self, project_id: i64) -> Result<Vec<Hook>, StoreError> {
        let state = self.state.read().unwrap();
        Ok(state
            .hooks
            .values()
            .filter(|h| h.project_id == project_id && h.job_events)
            .cloned()
            .collect())
    }

    async fn update_hook(&self, id: i64, edit: &HookEdit) -> Result<Option<Hook>, StoreError> {
        let mut state = self.state.write().unwrap();
        let Some(h) = state.hooks.get_mut(&id) else {
            return Ok(None);
        };
        if let Some(url) = &edit.url {
            h.url = url.clone();
        }
        if let Some(token) = &edit.token {
            h.token = token.clone();
        }
        if let Some(secret) = &edit.signing_secret {
            h.signing_secret = secret.clone();
        }
        if let Some(job_events) = edit.job_events {
            h.job_events = job_events;
        }
        if let Some(collapse) = edit.collapse {
            h.collapse = collapse;
        }
        Ok(Some(h.clone()))
    }

    async fn remove_hook(&self, id: i64) -> Result<bool, StoreError> {
        Ok(self.state.write().unwrap().hooks.remove(&id).is_some())
    }

    async fn enable_hook(&self, id: i64) -> Result<bool, StoreError> {
        let mut state = self.state.write().unwrap();
        Ok(match state.hooks.get_mut(&id) {
            Some(h) => {
                h.recent_failures = 0;
                h.disabled_until = None;
                true
            }
            None => false,
        })
    }

    async fn disable_hook(&self, id: i64) -> Result<bool, StoreError> {
        let mut state = self.state.write().unwrap();
        Ok(match state.hooks.get_mut(&id) {
            Some(h) => {
                h.recent_failures = crate::model::PERMANENT_FAILURES;
                h.disabled_until = None;
                true
            }
            None => false,
        })
    }

    async fn record_hook_failure(
        &self,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<HookFailure, StoreError> {
        let mut state = self.state.write().unwrap();
        let Some(h) = state.hooks.get_mut(&id) else {
            return Ok(HookFailure::Gone);
        };
        if h.state(now) != crate::model::HookState::Executable {
            return Ok(HookFailure::NotExecutable(h.clone()));
        }
        let (failures, until) = Hook::health_after_failure(h.recent_failures, now);
        h.recent_failures = failures;
        h.disabled_until = until.map(truncate_to_micros);
        Ok(HookFailure::Counted(h.clone()))
    }

    async fn record_hook_success(&self, id: i64) -> Result<(), StoreError> {
        self.enable_hook(id).await.map(|_| ())
    }

    async fn order_entries(
        &self,
        hook_id: i64,
        build_id: i64,
    ) -> Result<Vec<OrderEntry>, StoreError> {
        let state = self.state.read().unwrap();
        let mut entries: Vec<OrderEntry> = state
            .order
            .get(&(hook_id, build_id))
            .map(|q| q.iter().map(|(e, _)| e.clone()).collect())
            .unwrap_or_default();
        entries.sort_by_key(|e| (e.occurred_at, e.seq));
        Ok(entries)
    }

    async fn order_queued_pairs(&self, build_ids: &[i64]) -> Result<Vec<(i64, i64)>, StoreError> {
        let state = self.state.read().unwrap();
        Ok(state
            .order
            .keys()
            .filter(|(_, build_id)| build_ids.contains(build_id))
            .copied()
            .collect())
    }

    async fn order_hold(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
        occurred_at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        let mut state = self.state.write().unwrap();
        state.next_order_seq += 1;
        let seq = state.next_order_seq;
        let queue = state.order.entry((hook_id, build_id)).or_default();
        if !queue.iter().any(|(e, _)| e.event_id == event_id) {
            queue.push((
                OrderEntry {
                    event_id,
                    occurred_at: truncate_to_micros(occurred_at),
                    seq,
                    settled: false,
                },
                None,
            ));
        }
        Ok(())
    }

    async fn order_settle(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
    ) -> Result<Option<ParkedEntry>, StoreError> {
        let mut state = self.state.write().unwrap();
        let state = &mut *state;
        state.parked.remove(&(hook_id, build_id, event_id));
        let Some(queue) = state.order.get_mut(&(hook_id, build_id)) else {
            return Ok(None);
        };
        queue.sort_by_key(|(e, _)| (e.occurred_at, e.seq));
        let was_first = queue
            .iter()
            .find(|(e, _)| !e.settled)
            .is_some_and(|(e, _)| e.event_id == event_id);
        for (entry, at) in queue.iter_mut() {
            if entry.event_id == event_id && !entry.settled {
                entry.settled = true;
                *at = Some(Utc::now());
            }
        }
        if !was_first {
            return Ok(None);
        }
        let Some((next, _)) = queue.iter().find(|(e, _)| !e.settled) else {
            return Ok(None);
        };
        Ok(state
            .parked
            .get(&(hook_id, build_id, next.event_id))
            .map(|delivery| ParkedEntry {
                hook_id,
                build_id,
                event_id: next.event_id,
                delivery: delivery.clone(),
            }))
    }

    async fn order_park(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
        delivery: &ParkedDelivery,
    ) -> Result<bool, StoreError> {
        let mut state = self.state.write().unwrap();
        let state = &mut *state;
        let Some(queue) = state.order.get_mut(&(hook_id, build_id)) else {
            return Ok(false);
        };
        queue.sort_by_key(|(e, _)| (e.occurred_at, e.seq));
        let mut pending = queue.iter().filter(|(e, _)| !e.settled);
        let behind_another = pending.next().is_some_and(|(e, _)| e.event_id != event_id)
            && pending.any(|(e, _)| e.event_id == event_id);
        if behind_another {
            state
                .parked
                .insert((hook_id, build_id, event_id), delivery.clone());
        }
        Ok(behind_another)
    }

    async fn order_unpark(
        &self,
        hook_id: i64,
        build_id: i64,
        event_id: Uuid,
    ) -> Result<(), StoreError> {
        let mut state = self.state.write().unwrap();
        state.parked.remove(&(hook_id, build_id, event_id));
        Ok(())
    }

    async fn order_stranded(
        &self,
        quiet_since: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<ParkedEntry>, StoreError> {
        let state = self.state.read().unwrap();
        let mut stranded = Vec::new();
        for (&(hook_id, build_id), queue) in &state.order {
            let mut queue = queue.clone();
            queue.sort_by_key(|(e, _)| (e.occurred_at, e.seq));
            if queue
                .iter()
                .any(|(_, at)| at.is_some_and(|at| at >= quiet_since))
            {
                continue;
            }
            let Some((first, _)) = queue.iter().find(|(e, _)| !e.settled) else {
                continue;
            };
            if let Some(delivery) = state.parked.get(&(hook_id, build_id, first.event_id)) {
                stranded.push(ParkedEntry {
                    hook_id,
                    build_id,
                    event_id: first.event_id,
                    delivery: delivery.clone(),
                });
            }
        }
        stranded.truncate(usize::try_from(limit).unwrap_or(0));
        Ok(stranded)
    }

    async fn order_prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let mut state = self.state.write().unwrap();
        let state = &mut *state;
        let mut pruned = 0;
        for (&(hook_id, build_id), queue) in state.order.iter_mut() {
            let hook_exists = state.hooks.contains_key(&hook_id);
            let parked = &state.parked;
            let before_len = queue.len();
            // A parked record of a removed hook stays, to be dead-lettered once it is first.
            queue.retain(|(e, at)| {
                (hook_exists || parked.contains_key(&(hook_id, build_id, e.event_id)))
                    && at.is_none_or(|at| at >= before)
            });
            pruned += (before_len - queue.len()) as u64;
        }
        state.order.retain(|_, q| !q.is_empty());
        Ok(pruned)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        Ok(())
    }

    async fn latest_build(&self, project_id: i64) -> Result<Option<i64>, StoreError> {
        let state = self.state.read().unwrap();
        Ok(state
            .builds
            .values()
            .filter(|b| b.project_id == project_id)
            .map(|b| b.id)
            .max())
    }

    async fn project_exists(&self, project_id: i64) -> Result<bool, StoreError> {
        Ok(self
            .state
            .read()
            .unwrap()
            .projects
            .contains_key(&project_id))
    }

    async fn project_namespace(&self, project_id: i64) -> Result<Option<i64>, StoreError> {
        let state = self.state.read().unwrap();
        Ok(state.projects.get(&project_id).map(|p| p.namespace_id))
    }

    async fn rate_limit_overrides(&self) -> Result<Vec<RateLimitOverride>, StoreError> {
        let limits = self.rate_limits.lock().unwrap();
        let mut out: Vec<_> = limits
            .overrides
            .iter()
            .map(|(&namespace_id, &per_minute)| RateLimitOverride {
                namespace_id,
                per_minute,
            })
            .collect();
        out.sort_by_key(|o| o.namespace_id);
        Ok(out)
    }

    async fn set_rate_limit(
        &self,
        namespace_id: i64,
        per_minute: Option<u32>,
    ) -> Result<(), StoreError> {
        if per_minute == Some(0) {
            return Err(StoreError::Invalid("a rate limit is at least 1".into()));
        }
        self.rate_limits
            .lock()
            .unwrap()
            .overrides
            .insert(namespace_id, per_minute);
        Ok(())
    }

    async fn clear_rate_limit(&self, namespace_id: i64) -> Result<bool, StoreError> {
        Ok(self
            .rate_limits
            .lock()
            .unwrap()
            .overrides
            .remove(&namespace_id)
            .is_some())
    }

    async fn take_rate_token(
        &self,
        namespace_id: i64,
        bucket: Bucket,
    ) -> Result<std::time::Duration, StoreError> {
        let mut limits = self.rate_limits.lock().unwrap();
        let tat = limits.buckets.get(&namespace_id).copied();
        let (next, wait) = gcra(tat, Utc::now(), bucket);
        limits.buckets.insert(namespace_id, next);
        Ok(wait)
    }

    async fn try_take_rate_token(
        &self,
        namespace_id: i64,
        bucket: Bucket,
    ) -> Result<std::time::Duration, StoreError> {
        let mut limits = self.rate_limits.lock().unwrap();
        let tat = limits.buckets.get(&namespace_id).copied();
        match crate::rate_limit::gcra_now(tat, Utc::now(), bucket) {
            Ok(next) => {
                limits.buckets.insert(namespace_id, next);
                Ok(std::time::Duration::ZERO)
            }
            Err(wait) => Ok(wait),
        }
    }

    async fn take_hook_test_token(
        &self,
        hook_id: i64,
        bucket: Bucket,
    ) -> Result<std::time::Duration, StoreError> {
        let mut limits = self.rate_limits.lock().unwrap();
        let tat = limits.hook_tests.get(&hook_id).copied();
        match crate::rate_limit::gcra_now(tat, Utc::now(), bucket) {
            Ok(next) => {
                limits.hook_tests.insert(hook_id, next);
                Ok(std::time::Duration::ZERO)
            }
            Err(wait) => Ok(wait),
        }
    }
}
