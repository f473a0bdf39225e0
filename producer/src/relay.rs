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
use tokio_util::task::TaskTracker;

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
        }
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
fn request_of(row: &OutboxRow) -> Result<TransitionRequest, String> {
    let body = json!({
        "build_id": row.build_id,
        "status": row.status,
        "occurred_at": row.occurred_at,
        "event_id": row.event_id,
        "facts": row.facts,
    });
    let checked = parse_json::<TransitionBody>(body.to_string().as_bytes())
        .and_then(|body| body.into_request(""));
    checked.map_err(|error| match error {
        ApiError::Invalid { field, message } => format!("{field}: {message}"),
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
    let mut tx = pool.begin().await?;
    let rows = Outbox::claim(&mut *tx, batch_size).await?;
    let mut outcome = BatchOutcome {
        claimed: rows.len(),
        ..BatchOutcome::default()
    };
    if rows.is_empty() {
        tx.commit().await?;
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
        let results = emitter.emit_batch(requests).await;
        let now = Utc::now();
        for (row, result) in sent.into_iter().zip(results) {
            match result {
                Ok(Emission::Emitted(_)) | Ok(Emission::Skipped { .. }) => {
                    done.push(row.id);
                    acked_at.push((row.created_at, now));
                }
                Err(error) if is_transient(&error) => {
                    stopped.push(row.build_id);
                    outcome.unavailable.get_or_insert_with(|| error.to_string());
                }
                Err(error) => dead.push((row.id, error.kind(), error.to_string())),
            }
        }
    }
    Outbox::delete(&mut *tx, &done).await?;
    for (id, _, reason) in &dead {
        Outbox::bury(&mut *tx, *id, reason).await?;
    }
    tx.commit().await?;
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
/// take. Also keeps the depth gauges current. Returns when every worker has stopped.
pub async fn run(
    pool: PgPool,
    emitter: Emitter,
    settings: RelaySettings,
    metrics: Arc<RelayMetrics>,
    shutdown: CancellationToken,
) {
    let (wake, woken) = watch::channel(0u64);
    let tasks = TaskTracker::new();
    tasks.spawn(listen(pool.clone(), wake, shutdown.clone()));
    tasks.spawn(sample_depth(
        pool.clone(),
        metrics.clone(),
        settings.depth_interval,
        shutdown.clone(),
    ));
    for worker in 0..settings.workers {
        tasks.spawn(work(
            worker,
            pool.clone(),
            emitter.clone(),
            settings,
            metrics.clone(),
            woken.clone(),
            shutdown.clone(),
        ));
    }
    tasks.close();
    tasks.wait().await;
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
    let mut backoff = FIRST_BACKOFF;
    while !shutdown.is_cancelled() {
        // Marked before the claim: a notification for a row committed after the claim's
        // snapshot wakes the wait below at once.
        woken.borrow_and_update();
        let wait = match relay_batch(&pool, &emitter, settings.batch_size, &metrics).await {
            Ok(outcome) if outcome.unavailable.is_some() => {
                metrics.error("kafka");
                tracing::warn!(
                    worker,
                    left = outcome.left,
                    relayed = outcome.relayed,
                    reason = outcome.unavailable.as_deref().unwrap_or_default(),
                    retry_in_ms = backoff.as_millis() as u64,
                    "outbox rows not acknowledged; they stay and are tried again"
                );
                Some(backoff)
            }
            Ok(outcome) if outcome.claimed > 0 => {
                backoff = FIRST_BACKOFF;
                tracing::debug!(worker, ?outcome, "outbox batch relayed");
                None
            }
            Ok(_) => {
                backoff = FIRST_BACKOFF;
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = woken.changed() => {}
                    _ = tokio::time::sleep(settings.poll_interval) => {}
                }
                None
            }
            Err(error) => {
                metrics.error("store");
                tracing::warn!(worker, %error, retry_in_ms = backoff.as_millis() as u64, "outbox batch failed; its rows stay and are tried again");
                Some(backoff)
            }
        };
        if let Some(wait) = wait {
            backoff = (backoff * 2).min(Duration::from_secs(5));
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = tokio::time::sleep(wait) => {}
            }
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
}

/// `/metrics` (the relay's and the emitter's), `/healthz`, `/readyz` (Kafka and the store).
fn app(emitter: Emitter, metrics: Arc<RelayMetrics>) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(HttpState { emitter, metrics })
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
    let server_stop = shutdown.clone();
    let router = app(emitter.clone(), metrics.clone());
    let limits = config.listener.limits().map_err(ProducerError::Invalid)?;
    let server = tokio::spawn(hookline_shell::server::serve(
        listener,
        router,
        limits,
        server_stop,
    ));
    let settings = RelaySettings {
        batch_size: config.batch_size,
        workers: config.workers,
        poll_interval: config.poll_interval,
        depth_interval: config.depth_interval,
    };
    let workers = tokio::spawn(run(
        pool,
        emitter.clone(),
        settings,
        metrics,
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    tracing::info!(drain = ?config.shutdown_timeout, "shutting down: finishing the batches in flight");
    if tokio::time::timeout(config.shutdown_timeout, workers)
        .await
        .is_err()
    {
        tracing::warn!(
            "drain bound reached; batches in flight are rolled back and published again by the next relay"
        );
    }
    server.abort();
    emitter.flush(Duration::from_secs(1)).await?;
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
            occurred_at: Utc::now(),
            facts: Some(facts),
            created_at: Utc::now(),
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
}
