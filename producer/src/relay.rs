//! `hookline-producer relay`: publishes the transactional outbox (`hookline_outbox`, see
//! [`hookline_cistate::outbox`]) to Kafka.
//!
//! ```text
//! CI transaction: UPDATE builds ...; hookline_outbox_record(..); COMMIT --NOTIFY--> relay wakes
//! relay worker:   BEGIN; claim a batch (FOR UPDATE SKIP LOCKED, id order)
//!                 -> each row checked as the HTTP API checks a body (api.rs)
//!                 -> Emitter::emit_batch: flag, inline render, encode, produce, ack (emit.rs)
//!                 -> DELETE the acknowledged rows, bury the unpublishable ones; COMMIT
//! ```
//!
//! At least once: a row is deleted in the transaction that claimed it, after Kafka acknowledged
//! its event. A relay that dies before that commit releases its locks with its connection, and
//! the next claim publishes the rows again with the same `event_id` (receivers de-duplicate by
//! `Idempotency-Key`, which derives from it).
//!
//! Order: a build's rows are claimed by one relay at a time, oldest first (the claim query), and
//! within a batch they are produced in waves: the first row of every build, then, once those are
//! acknowledged, the second, and so on. A build whose row was not acknowledged sends nothing more
//! in that batch, so its later events never reach Kafka before it does, even when a batch fails
//! half way. Rows that can never be published (unknown build, facts the API would refuse, an
//! event over `--max-event-bytes`) move to `hookline_outbox_dead` with the reason; the build's
//! later rows go on.
//!
//! Retries: a batch that Kafka or the store did not take is rolled back (its rows stay) and
//! tried again after a back-off that doubles from 100 ms to 5 s, forever: the outbox depth and
//! the oldest row's age, both metrics, show it.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use chrono::Utc;
use hookline_cistate::outbox::Moment;
use hookline_cistate::outbox::{CHANNEL, Depth};
use hookline_cistate::{CiStore, Outbox, OutboxRow};
use hookline_shell::parse_duration;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use serde_json::json;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiError, TransitionBody, parse_json};
use crate::config::{KafkaOptions, StoreOptions};
use crate::emit::{Emission, Emitter, TransitionRequest};
use crate::error::{EmitError, ProducerError};
use crate::flags::Flags;
use crate::metrics::ProducerMetrics;

/// `hookline-producer relay`.
#[derive(clap::Args, Debug, Clone)]
pub struct RelayConfig {
    #[command(flatten)]
    pub kafka: KafkaOptions,
    #[command(flatten)]
    pub store: StoreOptions,
    /// Address /metrics, /healthz and /readyz listen on (no token: keep it on a private network).
    #[arg(long, env = "HOOKLINE_LISTEN", default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// The listener's limits: connections, time to first byte, head, body and idle timeouts.
    #[command(flatten)]
    pub listener: hookline_shell::server::ListenerArgs,
    /// Most rows claimed, published and deleted in one transaction.
    #[arg(long, env = "HOOKLINE_RELAY_BATCH_SIZE", default_value_t = 500)]
    pub batch_size: i64,
    /// Batches in flight at once in this relay (each its own transaction and connection).
    #[arg(long, env = "HOOKLINE_RELAY_WORKERS", default_value_t = 2)]
    pub workers: usize,
    /// How often the outbox is read when no notification came (LISTEN/NOTIFY wakes the relay at
    /// once; this bounds the delay when a notification is lost, e.g. while reconnecting).
    #[arg(long, env = "HOOKLINE_RELAY_POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// How often the outbox depth and the oldest row's age are measured for /metrics.
    #[arg(long, env = "HOOKLINE_RELAY_DEPTH_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub depth_interval: Duration,
    /// How often the flags are re-read from their store.
    #[arg(long, env = "HOOKLINE_FLAGS_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub flags_reload_interval: Duration,
    /// On shutdown, how long the batches in flight may take to finish; then they are abandoned
    /// (rolled back: their rows are published again by the next relay).
    #[arg(long, env = "HOOKLINE_SHUTDOWN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

impl RelayConfig {
    pub fn validate(&self) -> Result<(), ProducerError> {
        self.kafka.validate()?;
        self.listener.limits().map_err(ProducerError::Invalid)?;
        if self.batch_size < 1 || self.workers == 0 {
            return Err(ProducerError::Invalid(
                "--batch-size and --workers must be above 0".into(),
            ));
        }
        if self.poll_interval.is_zero()
            || self.depth_interval.is_zero()
            || self.flags_reload_interval.is_zero()
        {
            return Err(ProducerError::Invalid(
                "--poll-interval, --depth-interval and --flags-reload-interval must be above 0"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// How the workers run, apart from where.
#[derive(Debug, Clone, Copy)]
pub struct RelaySettings {
    pub batch_size: i64,
    pub workers: usize,
    pub poll_interval: Duration,
    pub depth_interval: Duration,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            batch_size: 500,
            workers: 2,
            poll_interval: Duration::from_secs(1),
            depth_interval: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: String,
}

/// The relay's own metrics (the emitter's `hookline_producer_*` are exposed next to them).
#[derive(Debug)]
pub struct RelayMetrics {
    registry: Registry,
    relayed: Counter,
    dead: Family<KindLabels, Counter>,
    errors: Family<KindLabels, Counter>,
    depth: Gauge,
    oldest_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    dead_rows: Gauge,
    commit_to_ack: Histogram,
    workers_running: Gauge,
    claimed: Family<WokenByLabels, Counter>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WokenByLabels {
    woken_by: &'static str,
}

impl Default for RelayMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl RelayMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("hookline_relay");
        let relayed = Counter::default();
        registry.register(
            "rows_relayed",
            "Outbox rows whose event Kafka acknowledged (or that send no hook by design), deleted",
            relayed.clone(),
        );
        let dead = Family::<KindLabels, Counter>::default();
        registry.register(
            "rows_dead",
            "Outbox rows moved to hookline_outbox_dead, by reason kind",
            dead.clone(),
        );
        let errors = Family::<KindLabels, Counter>::default();
        registry.register(
            "errors",
            "Batches rolled back to be tried again, by kind (kafka, store)",
            errors.clone(),
        );
        let depth = Gauge::default();
        registry.register(
            "outbox_depth",
            "Rows waiting in hookline_outbox (alert when it keeps growing)",
            depth.clone(),
        );
        let oldest_age = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest row waiting in hookline_outbox (alert above a few seconds)",
            oldest_age.clone(),
        );
        let dead_rows = Gauge::default();
        registry.register(
            "outbox_dead_rows",
            "Rows in hookline_outbox_dead",
            dead_rows.clone(),
        );
        // 1 ms .. ~30 s
        let commit_to_ack = Histogram::new(exponential_buckets(0.001, 2.0, 16));
        registry.register(
            "commit_to_ack_seconds",
            "From the row's insert (clock_timestamp(), database clock) to Kafka's acknowledgement",
            commit_to_ack.clone(),
        );
        let workers_running = Gauge::default();
        registry.register(
            "workers_running",
            "Relay workers running (/readyz answers 503 while fewer than --workers run)",
            workers_running.clone(),
        );
        let claimed = Family::<WokenByLabels, Counter>::default();
        registry.register(
            "rows_claimed",
            "Outbox rows claimed, by what started the claim (rows found by `poll` had their notification missed)",
            claimed.clone(),
        );
        for woken_by in WokenBy::ALL {
            let _ = claimed.get_or_create(&WokenByLabels {
                woken_by: woken_by.as_str(),
            });
        }
        // Present at 0 from the start, so `increase()` in an alert sees the first one. The dead
        // kinds: a row that does not parse, and every emit error that is not transient.
        for kind in [
            "invalid",
            "unknown_build",
            "too_large",
            "refused",
            "rejected",
            "conflict",
        ] {
            let _ = dead.get_or_create(&KindLabels {
                kind: kind.to_owned(),
            });
        }
        for kind in ["kafka", "store"] {
            let _ = errors.get_or_create(&KindLabels {
                kind: kind.to_owned(),
            });
        }
        Self {
            registry,
            relayed,
            dead,
            errors,
            depth,
            oldest_age,
            dead_rows,
            commit_to_ack,
            workers_running,
            claimed,
        }
    }

    fn claimed(&self, woken_by: WokenBy, rows: usize) {
        self.claimed
            .get_or_create(&WokenByLabels {
                woken_by: woken_by.as_str(),
            })
            .inc_by(rows as u64);
    }

    /// Counts a worker as running until the guard is dropped, also when its task unwinds.
    fn worker_running(&self) -> WorkerRunning {
        self.workers_running.inc();
        WorkerRunning(self.workers_running.clone())
    }

    /// Relay workers running now.
    pub fn workers_running(&self) -> i64 {
        self.workers_running.get()
    }

    fn depth(&self, depth: Depth) {
        self.depth.set(depth.rows);
        self.oldest_age.set(depth.oldest_age_secs);
        self.dead_rows.set(depth.dead);
    }

    fn error(&self, kind: &str) {
        self.errors
            .get_or_create(&KindLabels {
                kind: kind.to_owned(),
            })
            .inc();
    }

    /// Rows relayed so far by this relay.
    pub fn relayed(&self) -> u64 {
        self.relayed.get()
    }

    /// The Prometheus text of the relay's metrics.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// A running worker, counted in `hookline_relay_workers_running` until dropped.
struct WorkerRunning(Gauge);

impl Drop for WorkerRunning {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// What one batch did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BatchOutcome {
    /// Rows claimed (after dropping the rows of builds another relay holds).
    pub claimed: usize,
    /// Rows deleted after their event was acknowledged or skipped by design.
    pub relayed: usize,
    /// Rows moved to the dead table.
    pub dead: usize,
    /// Rows left for the next batch because Kafka or the store did not take them now.
    pub left: usize,
    /// Why rows were left, when they were.
    pub unavailable: Option<String>,
    /// Where the batch's time went: BEGIN and the claim; publishing (waves of produce and
    /// ack); deleting, burying and COMMIT.
    pub claim_time: Duration,
    pub publish_time: Duration,
    pub commit_time: Duration,
    /// Waves produced (a build's rows go one per wave, each after the previous one's ack).
    pub waves: usize,
    /// Age of the oldest claimed row when the claim returned (database clock to this one).
    pub oldest_age: Duration,
}

/// Why a batch could not run at all.
#[derive(Debug, thiserror::Error)]
#[error("outbox store: {0}")]
pub struct StoreFailed(String);

impl From<hookline_cistate::StoreError> for StoreFailed {
    fn from(e: hookline_cistate::StoreError) -> Self {
        StoreFailed(e.to_string())
    }
}

impl From<sqlx::Error> for StoreFailed {
    fn from(e: sqlx::Error) -> Self {
        StoreFailed(e.to_string())
    }
}

/// The request a row stands for, checked as the HTTP API checks a body; the reason otherwise.
/// Only this row's values go into it, so a row that cannot be published spoils nothing else.
fn request_of(row: &OutboxRow) -> Result<TransitionRequest, String> {
    let occurred_at = match &row.occurred_at {
        Moment::At(at) => *at,
        Moment::NotATime(text) => {
            return Err(format!(
                "occurred_at: {text} is not a moment an event can carry"
            ));
        }
    };
    // The facts go in as stored, so the API's own parser reads them: a value it refuses (a
    // number no f64 holds, a duplicate key) is this row's reason, not a failed batch.
    let body = format!(
        r#"{{"build_id":{},"status":{},"occurred_at":{},"event_id":"{}","facts":{}}}"#,
        row.build_id,
        json!(row.status),
        json!(occurred_at),
        row.event_id,
        row.facts.as_deref().unwrap_or("null"),
    );
    let checked =
        parse_json::<TransitionBody>(body.as_bytes()).and_then(|body| body.into_request(""));
    checked.map_err(|error| match error {
        ApiError::Invalid { field, message } => format!("{field}: {message}"),
        // Every part but the facts is written here as valid JSON.
        ApiError::Malformed(message) => format!("facts: {message}"),
        other => format!("{other:?}"),
    })
}

/// Whether retrying can help: only an unavailable Kafka or store.
fn is_transient(error: &EmitError) -> bool {
    matches!(error, EmitError::Unavailable(_))
}

/// Claims up to `batch_size` rows, publishes them in per-build waves, deletes what Kafka
/// acknowledged and buries what can never be published, in one transaction.
pub async fn relay_batch(
    pool: &PgPool,
    emitter: &Emitter,
    batch_size: i64,
    metrics: &RelayMetrics,
) -> Result<BatchOutcome, StoreFailed> {
    let started = std::time::Instant::now();
    let mut tx = pool.begin().await?;
    let rows = Outbox::claim(&mut *tx, batch_size).await?;
    let claimed = std::time::Instant::now();
    let claimed_at = Utc::now();
    let mut outcome = BatchOutcome {
        claimed: rows.len(),
        claim_time: claimed - started,
        oldest_age: rows
            .iter()
            .filter_map(|r| r.created_at.at())
            .min()
            .and_then(|oldest| (claimed_at - oldest).to_std().ok())
            .unwrap_or_default(),
        ..BatchOutcome::default()
    };
    if rows.is_empty() {
        tx.commit().await?;
        outcome.commit_time = claimed.elapsed();
        return Ok(outcome);
    }
    // Each build's rows, oldest first; the builds in order of their oldest row.
    let mut by_build: BTreeMap<i64, Vec<&OutboxRow>> = BTreeMap::new();
    let mut build_order: Vec<i64> = Vec::new();
    for row in &rows {
        let queue = by_build.entry(row.build_id).or_default();
        if queue.is_empty() {
            build_order.push(row.build_id);
        }
        queue.push(row);
    }
    let mut next: HashMap<i64, usize> = HashMap::new();
    let mut stopped: Vec<i64> = Vec::new();
    let mut done: Vec<i64> = Vec::new();
    let mut acked_at: Vec<(chrono::DateTime<Utc>, chrono::DateTime<Utc>)> = Vec::new();
    let mut dead: Vec<(i64, &'static str, String)> = Vec::new();
    loop {
        // The next row of every build still going: its oldest row not yet published.
        let mut wave: Vec<&OutboxRow> = Vec::new();
        for build in &build_order {
            if stopped.contains(build) {
                continue;
            }
            let i = next.entry(*build).or_insert(0);
            if let Some(row) = by_build[build].get(*i) {
                wave.push(row);
                *i += 1;
            }
        }
        if wave.is_empty() {
            break;
        }
        let mut requests = Vec::with_capacity(wave.len());
        let mut sent: Vec<&OutboxRow> = Vec::with_capacity(wave.len());
        for row in wave {
            match request_of(row) {
                Ok(request) => {
                    requests.push(request);
                    sent.push(row);
                }
                Err(reason) => dead.push((row.id, "invalid", reason)),
            }
        }
        if requests.is_empty() {
            continue;
        }
        outcome.waves += 1;
        let results = emitter.emit_batch(requests).await;
        let now = Utc::now();
        for (row, result) in sent.into_iter().zip(results) {
            match result {
                Ok(Emission::Emitted(_)) | Ok(Emission::Skipped { .. }) => {
                    done.push(row.id);
                    if let Some(created) = row.created_at.at() {
                        acked_at.push((created, now));
                    }
                }
                Err(error) if is_transient(&error) => {
                    stopped.push(row.build_id);
                    outcome.unavailable.get_or_insert_with(|| error.to_string());
                }
                Err(error) => dead.push((row.id, error.kind(), error.to_string())),
            }
        }
    }
    let published = std::time::Instant::now();
    outcome.publish_time = published - claimed;
    Outbox::delete(&mut *tx, &done).await?;
    for (id, _, reason) in &dead {
        Outbox::bury(&mut *tx, *id, reason).await?;
    }
    tx.commit().await?;
    outcome.commit_time = published.elapsed();
    for (created, acked) in acked_at {
        let age = (acked - created).to_std().unwrap_or_default();
        metrics.commit_to_ack.observe(age.as_secs_f64());
    }
    metrics.relayed.inc_by(done.len() as u64);
    for (id, kind, reason) in &dead {
        tracing::warn!(
            outbox_id = id,
            kind,
            reason,
            "outbox row cannot be published: moved to hookline_outbox_dead"
        );
        metrics
            .dead
            .get_or_create(&KindLabels {
                kind: (*kind).to_owned(),
            })
            .inc();
    }
    outcome.relayed = done.len();
    outcome.dead = dead.len();
    outcome.left = outcome.claimed - outcome.relayed - outcome.dead;
    Ok(outcome)
}

/// Runs `settings.workers` workers over the outbox in `pool` until `shutdown`: each wakes on a
/// notification or every `poll_interval`, and claims batches until the outbox has no rows it may
/// take. Also keeps the depth gauges current. Returns when every task has stopped: `Ok` after
/// `shutdown`, the error naming the task when one ended before it (a panic is a bug: the rest
/// are stopped, within `drain`, so the process can exit non-zero and be restarted).
pub async fn run(
    pool: PgPool,
    emitter: Emitter,
    settings: RelaySettings,
    metrics: Arc<RelayMetrics>,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<(), TaskDied> {
    let (wake, woken) = watch::channel(0u64);
    let mut tasks = Tasks::new(shutdown.clone());
    tasks.spawn(
        "outbox listener".into(),
        listen(pool.clone(), wake, shutdown.clone()),
    );
    tasks.spawn(
        "outbox depth sampler".into(),
        sample_depth(
            pool.clone(),
            metrics.clone(),
            settings.depth_interval,
            shutdown.clone(),
        ),
    );
    for worker in 0..settings.workers {
        tasks.spawn(
            format!("relay worker {worker}"),
            work(
                worker,
                pool.clone(),
                emitter.clone(),
                settings,
                metrics.clone(),
                woken.clone(),
                shutdown.clone(),
            ),
        );
    }
    tasks.wait(drain).await
}

/// A task of the relay ended before shutdown.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{task} {how}; the relay stops (the rows it held are published again by the next relay)")]
pub struct TaskDied {
    pub task: String,
    /// `panicked: <message>` or `stopped by itself`.
    pub how: String,
}

/// The relay's tasks, each meant to run until shutdown. One that ends before it (a panic, a
/// return) fails the relay: the others are told to stop through the token and get `drain` to
/// finish their batch, and [`Tasks::wait`] names it.
///
/// Only `spawn(name, task)` and `wait(drain)` are used, the shape of a service supervisor, so
/// the relay can move to a shared one without touching its tasks.
struct Tasks {
    set: tokio::task::JoinSet<()>,
    names: HashMap<tokio::task::Id, String>,
    stop: CancellationToken,
}

impl Tasks {
    fn new(stop: CancellationToken) -> Tasks {
        Tasks {
            set: tokio::task::JoinSet::new(),
            names: HashMap::new(),
            stop,
        }
    }

    fn spawn(&mut self, name: String, task: impl Future<Output = ()> + Send + 'static) {
        let handle = self.set.spawn(task);
        self.names.insert(handle.id(), name);
    }

    async fn wait(mut self, drain: Duration) -> Result<(), TaskDied> {
        let mut died: Option<TaskDied> = None;
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            if deadline.is_none() && self.stop.is_cancelled() {
                tracing::info!(
                    ?drain,
                    "stopping: the batches in flight get the drain bound to finish"
                );
                deadline = Some(tokio::time::Instant::now() + drain);
            }
            let ended = tokio::select! {
                ended = self.set.join_next_with_id() => ended,
                _ = self.stop.cancelled(), if deadline.is_none() => continue,
                _ = sleep_until_some(deadline) => {
                    tracing::warn!(
                        tasks = self.set.len(),
                        "drain bound reached; batches in flight are rolled back and published again by the next relay"
                    );
                    // Aborted at their next await; a batch's transaction is rolled back.
                    self.set.shutdown().await;
                    break;
                }
            };
            let Some(ended) = ended else { break };
            let (id, how) = match ended {
                Ok(_) if self.stop.is_cancelled() => continue,
                Ok((id, ())) => (id, "stopped by itself".to_owned()),
                Err(error) if error.is_cancelled() => continue,
                Err(error) => {
                    let id = error.id();
                    let message = panic_message(error.into_panic());
                    (id, format!("panicked: {message}"))
                }
            };
            let task = self
                .names
                .get(&id)
                .cloned()
                .unwrap_or_else(|| format!("task {id}"));
            tracing::error!(task, how, "a relay task ended; the relay stops");
            died.get_or_insert(TaskDied { task, how });
            self.stop.cancel();
        }
        died.map_or(Ok(()), Err)
    }
}

/// Sleeps until `deadline`, or for ever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn panic_message(payload: Box<dyn std::any::Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(message) => *message,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "(no message)".to_owned(), |m| (*m).to_owned()),
    }
}

async fn work(
    worker: usize,
    pool: PgPool,
    emitter: Emitter,
    settings: RelaySettings,
    metrics: Arc<RelayMetrics>,
    mut woken: watch::Receiver<u64>,
    shutdown: CancellationToken,
) {
    const FIRST_BACKOFF: Duration = Duration::from_millis(100);
    let _running = metrics.worker_running();
    let mut backoff = FIRST_BACKOFF;
    let mut woken_by = WokenBy::Start;
    while !shutdown.is_cancelled() {
        // Marked before the claim: a notification for a row committed after the claim's
        // snapshot wakes the wait below at once.
        woken.borrow_and_update();
        let wait = match relay_batch(&pool, &emitter, settings.batch_size, &metrics).await {
            Ok(outcome) => {
                metrics.claimed(woken_by, outcome.claimed);
                if outcome.claimed > 0 {
                    tracing::debug!(
                        worker,
                        woken_by = woken_by.as_str(),
                        rows = outcome.claimed,
                        relayed = outcome.relayed,
                        dead = outcome.dead,
                        left = outcome.left,
                        waves = outcome.waves,
                        oldest_age_ms = outcome.oldest_age.as_secs_f64() * 1e3,
                        claim_ms = outcome.claim_time.as_secs_f64() * 1e3,
                        publish_ms = outcome.publish_time.as_secs_f64() * 1e3,
                        commit_ms = outcome.commit_time.as_secs_f64() * 1e3,
                        "outbox batch"
                    );
                }
                if let Some(reason) = &outcome.unavailable {
                    metrics.error("kafka");
                    tracing::warn!(
                        worker,
                        left = outcome.left,
                        relayed = outcome.relayed,
                        reason,
                        retry_in_ms = backoff.as_millis() as u64,
                        "outbox rows not acknowledged; they stay and are tried again"
                    );
                    Some(backoff)
                } else if outcome.claimed > 0 {
                    backoff = FIRST_BACKOFF;
                    woken_by = WokenBy::PreviousBatch;
                    None
                } else {
                    backoff = FIRST_BACKOFF;
                    woken_by = tokio::select! {
                        _ = shutdown.cancelled() => WokenBy::Start,
                        _ = woken.changed() => WokenBy::Notification,
                        _ = tokio::time::sleep(settings.poll_interval) => WokenBy::Poll,
                    };
                    None
                }
            }
            Err(error) => {
                metrics.error("store");
                tracing::warn!(worker, %error, retry_in_ms = backoff.as_millis() as u64, "outbox batch failed; its rows stay and are tried again");
                Some(backoff)
            }
        };
        if let Some(wait) = wait {
            backoff = (backoff * 2).min(Duration::from_secs(5));
            woken_by = WokenBy::Retry;
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// What started a worker's claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WokenBy {
    /// The worker's first claim.
    Start,
    /// A NOTIFY from a commit.
    Notification,
    /// The polling fallback: rows found this way had their notification missed.
    Poll,
    /// The previous batch found rows, so the worker looked again at once.
    PreviousBatch,
    /// A back-off after a failed batch.
    Retry,
}

impl WokenBy {
    const ALL: [WokenBy; 5] = [
        WokenBy::Start,
        WokenBy::Notification,
        WokenBy::Poll,
        WokenBy::PreviousBatch,
        WokenBy::Retry,
    ];

    fn as_str(self) -> &'static str {
        match self {
            WokenBy::Start => "start",
            WokenBy::Notification => "notification",
            WokenBy::Poll => "poll",
            WokenBy::PreviousBatch => "previous_batch",
            WokenBy::Retry => "retry",
        }
    }
}

/// LISTENs on the outbox channel and bumps `wake` on every notification; reconnects (with the
/// polling fallback covering the gap) when the connection drops.
async fn listen(pool: PgPool, wake: watch::Sender<u64>, shutdown: CancellationToken) {
    let mut listener: Option<PgListener> = None;
    while !shutdown.is_cancelled() {
        let Some(connected) = listener.as_mut() else {
            match PgListener::connect_with(&pool).await {
                Ok(mut l) => match l.listen(CHANNEL).await {
                    Ok(()) => {
                        listener = Some(l);
                        // Rows may have been committed while nobody listened.
                        wake.send_modify(|n| *n += 1);
                    }
                    Err(error) => {
                        tracing::warn!(%error, "LISTEN failed; polling until it works");
                        pause(&shutdown, Duration::from_secs(1)).await;
                    }
                },
                Err(error) => {
                    tracing::warn!(%error, "cannot connect to LISTEN; polling until it works");
                    pause(&shutdown, Duration::from_secs(1)).await;
                }
            }
            continue;
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            received = connected.try_recv() => match received {
                Ok(Some(_)) => wake.send_modify(|n| *n += 1),
                // The connection was lost; the next try_recv reconnects and re-LISTENs.
                Ok(None) => {
                    tracing::warn!("LISTEN connection lost; reconnecting");
                    wake.send_modify(|n| *n += 1);
                }
                Err(error) => {
                    tracing::warn!(%error, "LISTEN failed; reconnecting");
                    listener = None;
                    pause(&shutdown, Duration::from_millis(500)).await;
                }
            }
        }
    }
}

async fn sample_depth(
    pool: PgPool,
    metrics: Arc<RelayMetrics>,
    every: Duration,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        match Outbox::depth(&pool).await {
            Ok(depth) => metrics.depth(depth),
            Err(error) => tracing::warn!(%error, "outbox depth not measured"),
        }
        pause(&shutdown, every).await;
    }
}

async fn pause(shutdown: &CancellationToken, wait: Duration) {
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(wait) => {}
    }
}

#[derive(Clone)]
struct HttpState {
    emitter: Emitter,
    metrics: Arc<RelayMetrics>,
    workers: usize,
}

/// `/metrics` (the relay's and the emitter's), `/healthz`, `/readyz` (every worker running,
/// Kafka and the store).
pub fn app(emitter: Emitter, metrics: Arc<RelayMetrics>, workers: usize) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(HttpState {
            emitter,
            metrics,
            workers,
        })
}

async fn metrics_text(State(state): State<HttpState>) -> Response {
    // Two registries, one exposition: only the last may end with `# EOF`.
    let relay = state.metrics.encode();
    let body = relay
        .trim_end()
        .strip_suffix("# EOF")
        .unwrap_or(&relay)
        .to_owned()
        + &state.emitter.metrics().encode();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

async fn ready(State(state): State<HttpState>) -> Response {
    // A relay whose workers are gone publishes nothing, however well Kafka and the store answer.
    let running = state.metrics.workers_running();
    if running < state.workers as i64 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: {running} of {} relay workers running",
                state.workers
            ),
        )
            .into_response();
    }
    match state.emitter.check_ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}"),
        )
            .into_response(),
    }
}

/// Connects the store and Kafka, serves /metrics, /healthz and /readyz, and relays until
/// `shutdown`; then lets the batches in flight finish within `--shutdown-timeout`.
pub async fn relay(config: RelayConfig, shutdown: CancellationToken) -> Result<(), ProducerError> {
    config.validate()?;
    hookline_schemas::codec::cap_allocation(config.kafka.max_event_bytes);
    let pg = config.store.pg_store_for_service().await?;
    let pool = pg.pool().clone();
    let flag_store = config.store.flag_store(Some(&pg)).await?;
    let flags = Flags::load(flag_store, config.flags_reload_interval).await?;
    let store: Arc<dyn CiStore> = Arc::new(pg);
    // No event id store: the outbox row is the event's identity, and a row is published again
    // only when its deletion was lost, which the id store could not see either.
    let mut emitter_config = config.kafka.emitter_config();
    // A claim is already a batch, and the next one waits for its acks: librdkafka's own wait
    // for more records (serve's 5 ms) would only add latency. --kafka-option still overrides it.
    emitter_config
        .kafka
        .insert(0, ("linger.ms".to_owned(), "1".to_owned()));
    let emitter = Emitter::new(
        emitter_config,
        store,
        flags,
        Arc::new(ProducerMetrics::new()),
    )
    .await?;
    emitter.check_topic_limit().await?;
    let metrics = Arc::new(RelayMetrics::new());
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| ProducerError::io(format!("listening on {}", config.listen), e))?;
    tracing::info!(
        addr = %config.listen,
        topic = emitter.topic(),
        workers = config.workers,
        batch_size = config.batch_size,
        "outbox relay running"
    );
    // The tasks stop on the caller's shutdown, and also when one of them fails.
    let stop = shutdown.child_token();
    let router = app(emitter.clone(), metrics.clone(), config.workers);
    let limits = config.listener.limits().map_err(ProducerError::Invalid)?;
    let server = tokio::spawn(hookline_shell::server::serve(
        listener,
        router,
        limits,
        stop.clone(),
    ));
    let settings = RelaySettings {
        batch_size: config.batch_size,
        workers: config.workers,
        poll_interval: config.poll_interval,
        depth_interval: config.depth_interval,
    };
    let ended = run(
        pool,
        emitter.clone(),
        settings,
        metrics,
        stop.clone(),
        config.shutdown_timeout,
    )
    .await;
    stop.cancel();
    server.abort();
    let flushed = emitter.flush(Duration::from_secs(1)).await;
    ended.map_err(|died| ProducerError::Stopped(died.to_string()))?;
    flushed?;
    tracing::info!("relay stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn row(status: &str, facts: serde_json::Value) -> OutboxRow {
        OutboxRow {
            id: 1,
            event_id: Uuid::new_v4(),
            build_id: 7,
            status: status.to_owned(),
            occurred_at: Moment::At(Utc::now()),
            facts: Some(facts.to_string()),
            created_at: Moment::At(Utc::now()),
        }
    }

    #[test]
    fn a_row_is_checked_as_the_api_checks_a_body() {
        let ok = row(
            "failed",
            json!({"started_at": "2026-12-01T10:00:00.123456+00:00", "finished_at": null,
                   "duration": 3.5, "queued_duration": null, "failure_reason": "script_failure"}),
        );
        let request = request_of(&ok).unwrap();
        assert_eq!(request.event_id, Some(ok.event_id));
        assert_eq!(request.build_id, 7);
        assert_eq!(request.facts.unwrap().duration, Some(3.5));

        for (facts, field) in [
            (json!({"duration": -1}), "facts.duration"),
            (
                json!({"failure_reason": "bad luck"}),
                "facts.failure_reason",
            ),
            (json!({"colour": "red"}), "facts"),
        ] {
            let reason = request_of(&row("failed", facts.clone())).unwrap_err();
            assert!(reason.starts_with(field), "{facts}: {reason}");
        }
    }

    fn row_with(occurred_at: Moment, facts: Option<&str>) -> OutboxRow {
        OutboxRow {
            occurred_at,
            facts: facts.map(str::to_owned),
            ..row("running", json!({}))
        }
    }

    #[test]
    fn a_row_the_relay_cannot_read_has_a_reason_of_its_own() {
        let reason = request_of(&row_with(Moment::NotATime("infinity".into()), None)).unwrap_err();
        assert_eq!(
            reason,
            "occurred_at: infinity is not a moment an event can carry"
        );
        // 1e400 as PostgreSQL prints it back: a 401-digit integer.
        let huge = format!(r#"{{"duration": 1{}}}"#, "0".repeat(400));
        let reason = request_of(&row_with(Moment::At(Utc::now()), Some(&huge))).unwrap_err();
        assert!(reason.starts_with("facts: "), "{reason}");
        assert!(reason.contains("out of range"), "{reason}");
        for facts in ["[1, 2]", r#""text""#, r#"{"duration": "3"}"#] {
            let reason = request_of(&row_with(Moment::At(Utc::now()), Some(facts))).unwrap_err();
            assert!(reason.starts_with("facts"), "{facts}: {reason}");
        }
        // No facts: read from the build row when the event is made.
        let request = request_of(&row_with(Moment::At(Utc::now()), None)).unwrap();
        assert_eq!(request.facts, None);
    }

    /// A task that runs until `stop`, counted as a running worker meanwhile.
    fn worker(
        metrics: &Arc<RelayMetrics>,
        stop: &CancellationToken,
    ) -> impl Future<Output = ()> + use<> {
        let (metrics, stop) = (metrics.clone(), stop.clone());
        async move {
            let _running = metrics.worker_running();
            stop.cancelled().await;
        }
    }

    #[tokio::test]
    async fn a_task_that_panics_stops_the_relay_and_is_named() {
        let stop = CancellationToken::new();
        let metrics = Arc::new(RelayMetrics::new());
        let mut tasks = Tasks::new(stop.clone());
        tasks.spawn("relay worker 0".into(), worker(&metrics, &stop));
        let counted = metrics.clone();
        tasks.spawn("relay worker 1".into(), async move {
            let _running = counted.worker_running();
            tokio::time::sleep(Duration::from_millis(20)).await;
            panic!("a bug");
        });
        let died = tasks.wait(Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(died.task, "relay worker 1");
        assert_eq!(died.how, "panicked: a bug");
        assert!(stop.is_cancelled(), "the other tasks were told to stop");
        assert_eq!(metrics.workers_running(), 0, "every worker has ended");
        assert!(died.to_string().contains("relay worker 1 panicked: a bug"));
    }

    #[tokio::test]
    async fn a_task_that_returns_before_shutdown_stops_the_relay() {
        let stop = CancellationToken::new();
        let metrics = Arc::new(RelayMetrics::new());
        let mut tasks = Tasks::new(stop.clone());
        tasks.spawn("relay worker 0".into(), worker(&metrics, &stop));
        tasks.spawn("outbox listener".into(), async {});
        let died = tasks.wait(Duration::from_secs(10)).await.unwrap_err();
        assert_eq!(
            (died.task.as_str(), died.how.as_str()),
            ("outbox listener", "stopped by itself")
        );
    }

    #[tokio::test]
    async fn tasks_that_end_on_shutdown_are_no_failure() {
        let stop = CancellationToken::new();
        let metrics = Arc::new(RelayMetrics::new());
        let mut tasks = Tasks::new(stop.clone());
        for n in 0..3 {
            tasks.spawn(format!("relay worker {n}"), worker(&metrics, &stop));
        }
        tokio::task::yield_now().await;
        assert_eq!(metrics.workers_running(), 3);
        stop.cancel();
        tasks.wait(Duration::from_secs(10)).await.unwrap();
        assert_eq!(metrics.workers_running(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_still_busy_after_the_drain_bound_is_abandoned() {
        let stop = CancellationToken::new();
        let mut tasks = Tasks::new(stop.clone());
        tasks.spawn("relay worker 0".into(), std::future::pending());
        stop.cancel();
        let started = tokio::time::Instant::now();
        tasks.wait(Duration::from_secs(30)).await.unwrap();
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test]
    async fn readyz_is_503_while_a_worker_is_not_running() {
        use tower::ServiceExt;
        let emitter = Emitter::new(
            crate::EmitterConfig::new("127.0.0.1:9"),
            Arc::new(hookline_cistate::MemoryStore::new()),
            Flags::in_memory(),
            Arc::new(ProducerMetrics::new()),
        )
        .await
        .unwrap();
        let metrics = Arc::new(RelayMetrics::new());
        let running = metrics.worker_running();
        let ask = || async {
            let response = app(emitter.clone(), metrics.clone(), 2)
                .oneshot(
                    axum::http::Request::get("/readyz")
                        .body(axum::body::Body::empty())
                        .unwrap(),
                )
                .await
                .unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 1 << 16)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        };
        assert_eq!(
            ask().await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: 1 of 2 relay workers running".to_owned()
            )
        );
        drop(running);
        assert_eq!(
            ask().await,
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "not ready: 0 of 2 relay workers running".to_owned()
            )
        );
        // Both running: the answer is Kafka's and the store's (no broker here).
        let _both = (metrics.worker_running(), metrics.worker_running());
        let (status, body) = ask().await;
        assert!(!body.contains("relay workers"), "{status} {body}");
    }
}
