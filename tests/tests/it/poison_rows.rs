//! No value the database can hold stops a service, against the real broker and database: a
//! hook disabled until `infinity` is disabled for good while the consumer delivers everything
//! else; times at `infinity` written before migration 0191 render as unknown and new ones are
//! refused by the database; and a task of the consumer that dies (here: a store that panics, as
//! a decode did) stops the consumer with an error naming it, with `/readyz` not ready meanwhile.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use hookline_cistate::{
    Bucket, Build, CiStore, Hook, HookEdit, HookFailure, HookState, Namespace, NewHook, OrderEntry,
    ParkedDelivery, ParkedEntry, Pipeline, Project, RateLimitOverride, RenderSnapshot, Runner,
    StoreError, User,
};
use hookline_consumer::dead_letter;
use hookline_consumer::{Consumer, ConsumerError};
use hookline_schemas::{BuildStatus, Codec, SchemaVersion};
use hookline_tests::process::ConsumerProcess;
use hookline_tests::world::{World, inline_event, legacy_event};
use hookline_tests::{Receiver, poll_until, service_bin, unique_name};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);

/// The reported case on the real binary: a hook disabled until `infinity` (an operator's way of
/// turning it off for good) and an event for its project. Before, the consumer's main path
/// panicked decoding the hook, the process exited 0 and nothing was delivered for any project.
/// Now the hook is disabled for good (its delivery dead-lettered as `hook_disabled`), the
/// project's other hook and every other project are delivered, and the consumer keeps running.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hook_disabled_until_infinity_is_disabled_for_good_and_the_rest_is_delivered() {
    let world = World::new(1).await;
    let schema = world.store_schema().await;
    let (off, on, other) = (
        Receiver::start().await,
        Receiver::start().await,
        Receiver::start().await,
    );
    let a = world.build(81_000).await;
    let b = world.build(82_000).await;
    let disabled = world.hook(a.project.id, &off.url, None).await;
    world.hook(a.project.id, &on.url, None).await;
    world.hook(b.project.id, &other.url, None).await;
    sqlx::query("UPDATE web_hooks SET disabled_until = 'infinity' WHERE id = $1")
        .bind(disabled.id)
        .execute(world.store.pool())
        .await
        .unwrap();
    world
        .send(&inline_event(&a, BuildStatus::Running), SchemaVersion::V2)
        .await;
    world
        .send(&inline_event(&b, BuildStatus::Running), SchemaVersion::V2)
        .await;

    let process = ConsumerProcess::new(
        &service_bin("hookline-consumer").to_string_lossy(),
        &world,
        &unique_name("group"),
        &schema,
    );
    let base = process.base_url();
    let (mut child, logs) = process.spawn_logged();
    for (receiver, what) in [
        (&on, "the project's other hook"),
        (&other, "another project"),
    ] {
        poll_until(&format!("a delivery to {what}"), WAIT, || async {
            (receiver.count() > 0).then_some(())
        })
        .await;
    }
    let config = world.config();
    let letter = poll_until("the disabled hook's dead letter", WAIT, || async {
        dead_letter::list(&config)
            .await
            .ok()?
            .into_iter()
            .find(|l| l.reason == "hook_disabled")
    })
    .await;
    assert!(
        letter.detail.contains("disabled"),
        "the reason says why: {}",
        letter.detail
    );
    assert_eq!(off.count(), 0, "the hook disabled for good got nothing");
    let hook = world.store.hook(disabled.id).await.unwrap().unwrap();
    assert_eq!(hook.state(Utc::now()), HookState::PermanentlyDisabled);
    assert!(
        child.try_wait().unwrap().is_none(),
        "the consumer keeps running: {:?}",
        logs.lock().unwrap()
    );
    let ready = reqwest::get(format!("{base}/readyz")).await.unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let logged = logs.lock().unwrap().clone();
    assert!(!logged.iter().any(|l| l.contains("panicked")), "{logged:?}");
    child.kill().await.unwrap();
}

/// Times at `infinity` in the CI state: a database migrated before 0191 may hold them, and
/// they read as unknown (a legacy event's render has them null); the database now refuses new
/// ones, naming the constraint.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn times_at_infinity_read_as_unknown_and_new_ones_are_refused() {
    let world = World::new(1).await;
    let pool = world.store.pool().clone();
    let snapshot = world.build(83_000).await;
    // The constraints refuse the poison: the write fails, naming what it broke.
    let refused = sqlx::query("UPDATE builds SET started_at = 'infinity' WHERE id = $1")
        .bind(snapshot.build.id)
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("builds_started_at_finite"),
        "{refused}"
    );
    for (table, set) in [
        ("pipelines", "finished_at = '-infinity'"),
        ("builds", "duration = 'NaN'"),
        ("builds", "queued_duration = -1"),
    ] {
        let statement = format!("UPDATE {table} SET {set}");
        assert!(
            sqlx::query(&statement).execute(&pool).await.is_err(),
            "{statement} is refused"
        );
    }

    // A row written before the constraints: drop them in this schema, write, and migrate
    // again (0191 runs again on rows it refuses: it must still migrate).
    for statement in [
        "ALTER TABLE builds DROP CONSTRAINT builds_started_at_finite",
        "ALTER TABLE builds DROP CONSTRAINT builds_finished_at_finite",
        "ALTER TABLE builds DROP CONSTRAINT builds_created_at_finite",
        "ALTER TABLE builds DROP CONSTRAINT builds_queued_at_finite",
        "ALTER TABLE builds DROP CONSTRAINT builds_duration_finite",
        "ALTER TABLE builds DROP CONSTRAINT builds_queued_duration_finite",
        "ALTER TABLE pipelines DROP CONSTRAINT pipelines_started_at_finite",
        "ALTER TABLE pipelines DROP CONSTRAINT pipelines_finished_at_finite",
        "ALTER TABLE web_hooks DROP CONSTRAINT web_hooks_created_at_finite",
        "ALTER TABLE delivery_order DROP CONSTRAINT delivery_order_occurred_at_finite",
        "ALTER TABLE delivery_order DROP CONSTRAINT delivery_order_settled_at_finite",
        "ALTER TABLE feature_flag_history DROP CONSTRAINT feature_flag_history_changed_at_finite",
        "ALTER TABLE rate_limit_buckets DROP CONSTRAINT rate_limit_buckets_tat_finite",
        "DELETE FROM _sqlx_migrations WHERE version = 191",
    ] {
        sqlx::query(statement).execute(&pool).await.unwrap();
    }
    sqlx::query(
        "UPDATE builds SET started_at = 'infinity', finished_at = '-infinity',
             created_at = 'infinity' WHERE id = $1",
    )
    .bind(snapshot.build.id)
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query("UPDATE pipelines SET started_at = 'infinity' WHERE id = $1")
        .bind(snapshot.pipeline.id)
        .execute(&pool)
        .await
        .unwrap();
    hookline_cistate::pg::MIGRATOR.run(&pool).await.unwrap();
    let validated: Vec<(String, bool)> = sqlx::query_as(
        "SELECT conname::text, convalidated FROM pg_constraint
         WHERE connamespace = current_schema()::regnamespace AND conname LIKE 'builds_%_finite'
         ORDER BY conname",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(validated.len(), 6, "{validated:?}");
    for (name, valid) in &validated {
        let holds_poison = name == "builds_started_at_finite"
            || name == "builds_finished_at_finite"
            || name == "builds_created_at_finite";
        assert_eq!(*valid, !holds_poison, "{name}");
    }

    // The old row reads: unknown times, the creation time as the latest there is.
    let read = world
        .store
        .snapshot(snapshot.build.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(read.build.started_at, None);
    assert_eq!(read.build.finished_at, None);
    assert_eq!(read.pipeline.started_at, None);
    assert_eq!(read.build.created_at, DateTime::<Utc>::MAX_UTC);

    // And the consumer renders a legacy event from it, and delivers it.
    let receiver = Receiver::start().await;
    world.hook(snapshot.project.id, &receiver.url, None).await;
    let mut event = legacy_event(&snapshot, BuildStatus::Pending);
    event.facts.started_at = None;
    world.send(&event, SchemaVersion::V2).await;
    let running = world.start(world.config()).await;
    let delivered = poll_until("the render of the old row", WAIT, || async {
        receiver.received().into_iter().next()
    })
    .await;
    let body = delivered.json();
    assert_eq!(body["build_id"], snapshot.build.id);
    assert!(body["build_started_at"].is_null(), "{body}");
    running.stop().await;
}

/// A store that panics in one operation, as a decode of a poison value did.
#[derive(Debug)]
struct PanicsIn {
    inner: Arc<dyn CiStore>,
    operation: &'static str,
}

impl PanicsIn {
    fn check(&self, operation: &str) {
        if self.operation == operation {
            panic!("poison value in {operation}");
        }
    }
}

#[async_trait]
impl CiStore for PanicsIn {
    async fn snapshots(&self, ids: &[i64]) -> Result<HashMap<i64, RenderSnapshot>, StoreError> {
        self.check("snapshots");
        self.inner.snapshots(ids).await
    }
    async fn upsert_namespace(&self, n: &Namespace) -> Result<(), StoreError> {
        self.inner.upsert_namespace(n).await
    }
    async fn upsert_project(&self, p: &Project) -> Result<(), StoreError> {
        self.inner.upsert_project(p).await
    }
    async fn upsert_user(&self, u: &User) -> Result<(), StoreError> {
        self.inner.upsert_user(u).await
    }
    async fn upsert_runner(&self, r: &Runner) -> Result<(), StoreError> {
        self.inner.upsert_runner(r).await
    }
    async fn upsert_pipeline(&self, p: &Pipeline) -> Result<(), StoreError> {
        self.inner.upsert_pipeline(p).await
    }
    async fn upsert_build(&self, b: &Build) -> Result<(), StoreError> {
        self.inner.upsert_build(b).await
    }
    async fn add_hook(&self, h: &NewHook) -> Result<Hook, StoreError> {
        self.inner.add_hook(h).await
    }
    async fn hook(&self, id: i64) -> Result<Option<Hook>, StoreError> {
        self.check("hook");
        self.inner.hook(id).await
    }
    async fn list_hooks(&self, project: Option<i64>) -> Result<Vec<Hook>, StoreError> {
        self.inner.list_hooks(project).await
    }
    async fn job_hooks(&self, project: i64) -> Result<Vec<Hook>, StoreError> {
        self.check("job_hooks");
        self.inner.job_hooks(project).await
    }
    async fn update_hook(&self, id: i64, edit: &HookEdit) -> Result<Option<Hook>, StoreError> {
        self.inner.update_hook(id, edit).await
    }
    async fn remove_hook(&self, id: i64) -> Result<bool, StoreError> {
        self.inner.remove_hook(id).await
    }
    async fn enable_hook(&self, id: i64) -> Result<bool, StoreError> {
        self.inner.enable_hook(id).await
    }
    async fn disable_hook(&self, id: i64) -> Result<bool, StoreError> {
        self.inner.disable_hook(id).await
    }
    async fn record_hook_failure(
        &self,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<HookFailure, StoreError> {
        self.inner.record_hook_failure(id, now).await
    }
    async fn record_hook_success(&self, id: i64) -> Result<(), StoreError> {
        self.inner.record_hook_success(id).await
    }
    async fn order_entries(&self, hook: i64, build: i64) -> Result<Vec<OrderEntry>, StoreError> {
        self.inner.order_entries(hook, build).await
    }
    async fn order_queued_pairs(&self, builds: &[i64]) -> Result<Vec<(i64, i64)>, StoreError> {
        self.inner.order_queued_pairs(builds).await
    }
    async fn order_hold(
        &self,
        hook: i64,
        build: i64,
        event: uuid::Uuid,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        self.inner.order_hold(hook, build, event, at).await
    }
    async fn order_settle(
        &self,
        hook: i64,
        build: i64,
        event: uuid::Uuid,
    ) -> Result<Option<ParkedEntry>, StoreError> {
        self.inner.order_settle(hook, build, event).await
    }
    async fn order_park(
        &self,
        hook: i64,
        build: i64,
        event: uuid::Uuid,
        delivery: &ParkedDelivery,
    ) -> Result<bool, StoreError> {
        self.inner.order_park(hook, build, event, delivery).await
    }
    async fn order_unpark(
        &self,
        hook: i64,
        build: i64,
        event: uuid::Uuid,
    ) -> Result<(), StoreError> {
        self.inner.order_unpark(hook, build, event).await
    }
    async fn order_stranded(
        &self,
        quiet_since: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<ParkedEntry>, StoreError> {
        self.check("order_stranded");
        self.inner.order_stranded(quiet_since, limit).await
    }
    async fn order_prune(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.check("order_prune");
        self.inner.order_prune(before).await
    }
    async fn ping(&self) -> Result<(), StoreError> {
        self.inner.ping().await
    }
    async fn latest_build(&self, project: i64) -> Result<Option<i64>, StoreError> {
        self.inner.latest_build(project).await
    }
    fn pg_pool(&self) -> Option<&sqlx::PgPool> {
        self.inner.pg_pool()
    }
    async fn project_exists(&self, project: i64) -> Result<bool, StoreError> {
        self.inner.project_exists(project).await
    }
    async fn project_namespace(&self, project: i64) -> Result<Option<i64>, StoreError> {
        self.inner.project_namespace(project).await
    }
    async fn rate_limit_overrides(&self) -> Result<Vec<RateLimitOverride>, StoreError> {
        self.inner.rate_limit_overrides().await
    }
    async fn set_rate_limit(&self, ns: i64, per_minute: Option<u32>) -> Result<(), StoreError> {
        self.inner.set_rate_limit(ns, per_minute).await
    }
    async fn clear_rate_limit(&self, ns: i64) -> Result<bool, StoreError> {
        self.inner.clear_rate_limit(ns).await
    }
    async fn take_rate_token(&self, ns: i64, bucket: Bucket) -> Result<Duration, StoreError> {
        self.inner.take_rate_token(ns, bucket).await
    }
    async fn try_take_rate_token(&self, ns: i64, bucket: Bucket) -> Result<Duration, StoreError> {
        self.inner.try_take_rate_token(ns, bucket).await
    }
    async fn take_hook_test_token(
        &self,
        hook_id: i64,
        bucket: Bucket,
    ) -> Result<Duration, StoreError> {
        self.inner.take_hook_test_token(hook_id, bucket).await
    }
}

/// A task of the consumer that panics stops the consumer: both paths drain, `run` returns the
/// failure naming the task (the binary prints it and exits non-zero), and `/readyz` is not ready
/// from the moment it died. Before, a panicking path was logged and the run ended `Ok` (exit
/// status 0), and the pruner's and sweeper's deaths went unnoticed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_task_that_panics_stops_the_consumer_with_its_name() {
    for (operation, task) in [
        ("job_hooks", "main path"),
        ("order_prune", "order-queue pruner"),
        ("order_stranded", "order-queue sweeper"),
    ] {
        let world = World::new(1).await;
        let snapshot = world.build(84_000).await;
        let receiver = Receiver::start().await;
        world.hook(snapshot.project.id, &receiver.url, None).await;
        world
            .send(
                &inline_event(&snapshot, BuildStatus::Running),
                SchemaVersion::V2,
            )
            .await;
        let store: Arc<dyn CiStore> = Arc::new(PanicsIn {
            inner: world.store.clone(),
            operation,
        });
        let consumer = Consumer::new(world.config(), store.clone(), Codec::embedded())
            .await
            .unwrap();
        let tasks = consumer.supervisor();
        let app = hookline_consumer::server::app(
            consumer.metrics(),
            store,
            consumer.kafka_client(),
            vec![world.topic.clone()],
            tasks.clone(),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let http_stop = CancellationToken::new();
        tokio::spawn(hookline_shell::server::serve(
            listener,
            app,
            Default::default(),
            http_stop.clone(),
        ));
        // Never cancelled: only the task's death may stop the consumer.
        let shutdown = CancellationToken::new();
        let ended = tokio::time::timeout(WAIT, consumer.run(shutdown))
            .await
            .unwrap_or_else(|_| panic!("{operation}: the consumer ran on after {task} died"));
        let Err(ConsumerError::TaskFailed(failure)) = ended else {
            panic!("{operation}: {ended:?}");
        };
        assert_eq!(failure.task, task);
        assert!(
            failure.how.starts_with("panicked: poison value in"),
            "{failure}"
        );
        let message = ConsumerError::TaskFailed(failure).to_string();
        assert!(message.contains(task), "{message}");
        let ready = reqwest::get(format!("http://{addr}/readyz")).await.unwrap();
        assert_eq!(ready.status().as_u16(), 503, "{operation}");
        assert!(ready.text().await.unwrap().contains(task));
        http_stop.cancel();
    }
}
