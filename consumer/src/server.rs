//! `hookline-consumer serve`: the consumer plus `/metrics`, `/healthz` and `/readyz`, and the
//! hooks API ([`crate::api`]) when an admin token is configured.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use hookline_cistate::{CiStore, MemoryStore, PgOptions, PgStore, SecretKeys};
use hookline_schemas::codec::REGISTRY_ATTEMPTS;
use hookline_schemas::{Codec, CodecError, RegistryError, SchemaVersion};
use hookline_shell::ready_cache::ReadyCache;
use hookline_shell::server::Limits;
use hookline_shell::supervise::Supervisor;
use rdkafka::producer::Producer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::api::{self, AdminToken, ApiState};
use crate::hook_admin::HookAdmin;
use crate::kafka::HandoffProducer;
use crate::{Consumer, ConsumerConfig, ConsumerError, ConsumerMetrics};

/// What `serve` needs besides the consumer's own options.
#[derive(Debug, Clone)]
pub struct ServeConfig {
    pub consumer: ConsumerConfig,
    /// PostgreSQL URL of the CI state store, or `memory` for an empty in-memory store.
    pub database_url: String,
    /// A PostgreSQL schema to use instead of `public` (created if missing).
    pub database_schema: Option<String>,
    /// Where `/metrics`, `/healthz` and `/readyz` listen.
    pub listen: SocketAddr,
    /// The listener's limits: connections, time to first byte, head, body and idle timeouts.
    pub listener: Limits,
    /// The largest event a producer writes: the most the Avro decoder allocates for a field a
    /// record claims (see [`hookline_schemas::codec::cap_allocation`]).
    pub max_event_bytes: usize,
    /// Base URL of a Confluent-compatible schema registry to fetch writer schemas from, by the
    /// id in each record (cached). `None`: the embedded registry (`schemas/avro/manifest.json`).
    pub schema_registry_url: Option<String>,
    /// The hooks API's admin token (`--admin-token-file`), an operator credential. `None`: the
    /// API is not served.
    pub admin_token: Option<AdminToken>,
    /// The file the admin token was read from: re-read when it changes or on SIGHUP.
    pub admin_token_file: Option<std::path::PathBuf>,
    /// The keys hook secrets are sealed with at rest (`--secrets-key-file`); `None` stores them
    /// in plaintext, as before (said at start).
    pub secrets: Option<Arc<SecretKeys>>,
}

/// The consumer's codec: the embedded registry's without a URL; with one, a client of that
/// Confluent-compatible registry, which reads every record by fetching its writer schema by id
/// (once per id). Startup registers the reader's version (v2), so a registry that does not answer
/// is found now (after a few attempts). Once running, a registry that does not answer holds the
/// batch until it does; an id it does not know is dead-lettered.
pub async fn open_codec(registry_url: Option<&str>) -> Result<Codec, ConsumerError> {
    Codec::for_registry(registry_url, SchemaVersion::V2)
        .await
        .map_err(|e| {
            let url = registry_url.unwrap_or_default();
            if let CodecError::Registry(RegistryError::InvalidUrl(_)) = e {
                return ConsumerError::Config(e.to_string());
            }
            ConsumerError::SchemaRegistry(if e.is_transient() {
                format!("{url} unreachable (gave up after {REGISTRY_ATTEMPTS} attempts): {e}")
            } else {
                format!("{url}: {e}")
            })
        })
}

/// Opens the store named by `url`: `memory` or a PostgreSQL URL (migrations are applied), in
/// `schema` if one is given.
pub async fn open_store(
    url: &str,
    schema: Option<&str>,
    attempts: usize,
) -> Result<Arc<dyn CiStore>, ConsumerError> {
    open_store_sealed(url, schema, attempts, None).await
}

/// [`open_store`], hook secrets sealed with `secrets` (PostgreSQL only: the in-memory store
/// keeps nothing at rest).
pub async fn open_store_sealed(
    url: &str,
    schema: Option<&str>,
    attempts: usize,
    secrets: Option<Arc<SecretKeys>>,
) -> Result<Arc<dyn CiStore>, ConsumerError> {
    Ok(match open_pg(url, schema, attempts, secrets).await? {
        Some(pg) => Arc::new(pg),
        None => Arc::new(MemoryStore::new()),
    })
}

/// The PostgreSQL store named by `url`, or `None` for `memory`.
pub async fn open_pg(
    url: &str,
    schema: Option<&str>,
    attempts: usize,
    secrets: Option<Arc<SecretKeys>>,
) -> Result<Option<PgStore>, ConsumerError> {
    if url == "memory" {
        return Ok(None);
    }
    let mut options = PgOptions::new(url);
    if let Some(schema) = schema {
        options = options.schema(schema);
    }
    Ok(Some(
        PgStore::connect_patiently(&options, attempts)
            .await?
            .with_secrets(secrets),
    ))
}

/// Says at start how hook secrets are kept, and refuses to start when stored secrets cannot be
/// opened (sealed without a key file, or with a key the file does not hold): every delivery to
/// those hooks would wait on them.
pub async fn check_secrets(store: &PgStore) -> Result<(), ConsumerError> {
    let census = store.secrets_census().await?;
    match store.secrets() {
        None => {
            if !census.sealed.is_empty() {
                let ids: Vec<&str> = census.sealed.iter().map(|(k, _)| k.as_str()).collect();
                return Err(ConsumerError::Config(format!(
                    "hook secrets in the store are sealed (key ids: {}) but no --secrets-key-file is given",
                    ids.join(", ")
                )));
            }
            warn!(
                plaintext = census.plaintext,
                "hook URLs, tokens and signing secrets are stored in plaintext: no --secrets-key-file"
            );
        }
        Some(keys) => {
            let missing: Vec<&str> = census
                .sealed
                .iter()
                .map(|(k, _)| k.as_str())
                .filter(|k| !keys.holds(k))
                .collect();
            if !missing.is_empty() {
                return Err(ConsumerError::Config(format!(
                    "hook secrets in the store are sealed with key ids the secrets key file does not hold: {}",
                    missing.join(", ")
                )));
            }
            info!(
                key = keys.current_id(),
                plaintext = census.plaintext,
                "hook secrets are sealed at rest; plaintext ones are sealed on their next write (or `hookline-consumer secrets reencrypt`)"
            );
        }
    }
    Ok(())
}

#[derive(Clone)]
struct AppState {
    metrics: Arc<ConsumerMetrics>,
    store: Arc<dyn CiStore>,
    kafka: HandoffProducer,
    /// The topics readiness asks about: the consumer's own, not the cluster's every topic.
    topics: Arc<Vec<String>>,
    ready: Arc<ReadyCache>,
    tasks: Supervisor,
}

/// The operational endpoints, without a socket (tests call it directly). `kafka` is any client
/// of the consumer's cluster: readiness asks it for the metadata of `topics` (the main, retry
/// and dead-letter topics). `tasks`: the consumer's ([`Consumer::supervisor`]); not ready once
/// one of them died.
pub fn app(
    metrics: Arc<ConsumerMetrics>,
    store: Arc<dyn CiStore>,
    kafka: HandoffProducer,
    topics: Vec<String>,
    tasks: Supervisor,
) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .with_state(AppState {
            metrics,
            store,
            kafka,
            topics: Arc::new(topics),
            ready: Arc::new(ReadyCache::default()),
            tasks,
        })
}

async fn metrics_text(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.metrics.encode(),
    )
}

/// Ready when every task of the consumer runs and the store and Kafka answer: without the store
/// no legacy event can be rendered and no hook read; without Kafka nothing is consumed and no
/// retry can be handed off; with a task dead the process is on its way out. The endpoint is
/// open, so the store's and Kafka's answer is reused for a second ([`ReadyCache`]) and Kafka is
/// asked only about the consumer's own topics.
async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    if let Err(e) = state.tasks.check() {
        return (StatusCode::SERVICE_UNAVAILABLE, e);
    }
    let answer = state.ready.get(|| check_ready(&state)).await;
    match answer {
        Ok(()) => (StatusCode::OK, "ready".to_owned()),
        Err(reason) => (StatusCode::SERVICE_UNAVAILABLE, reason),
    }
}

async fn check_ready(state: &AppState) -> Result<(), String> {
    state
        .store
        .ping()
        .await
        .map_err(|e| format!("store: {e}"))?;
    for topic in state.topics.iter() {
        let kafka = state.kafka.clone();
        let name = topic.clone();
        let metadata = tokio::task::spawn_blocking(move || {
            kafka
                .client()
                .fetch_metadata(Some(&name), Duration::from_secs(2))
                .map(|m| m.topics().iter().map(|t| t.error()).collect::<Vec<_>>())
        })
        .await
        .map_err(|e| format!("kafka probe: {e}"))?
        .map_err(|e| format!("kafka: {e}"))?;
        if let Some(Some(code)) = metadata.first() {
            return Err(format!("kafka: topic {topic}: {code:?}"));
        }
    }
    Ok(())
}

/// Runs the consumer and its HTTP endpoints until `shutdown`; then drains and returns.
pub async fn serve(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ConsumerError> {
    // Before anything connects, so a refused option is the one error an operator sees.
    config.consumer.validate()?;
    config.listener.validate().map_err(ConsumerError::Config)?;
    if config.max_event_bytes < 1000 {
        return Err(ConsumerError::Config(
            "--max-event-bytes must be at least 1000 (librdkafka's smallest message.max.bytes)"
                .into(),
        ));
    }
    let cap = hookline_schemas::codec::cap_allocation(config.max_event_bytes);
    if cap != config.max_event_bytes {
        tracing::warn!(
            cap,
            max_event_bytes = config.max_event_bytes,
            "the Avro allocation cap was set before; it stays"
        );
    }
    let codec = open_codec(config.schema_registry_url.as_deref()).await?;
    // A service started beside its database waits for it a little; a command does not.
    let pg = open_pg(
        &config.database_url,
        config.database_schema.as_deref(),
        hookline_cistate::pg::CONNECT_ATTEMPTS,
        config.secrets.clone(),
    )
    .await?;
    let store: Arc<dyn CiStore> = match pg {
        Some(pg) => {
            check_secrets(&pg).await?;
            Arc::new(pg)
        }
        None => Arc::new(MemoryStore::new()),
    };
    let topics = vec![
        config.consumer.topic.clone(),
        config.consumer.retry_topic.clone(),
        config.consumer.dlq_topic.clone(),
    ];
    let consumer = Consumer::new(config.consumer, store.clone(), codec).await?;
    let listener = TcpListener::bind(config.listen).await?;
    let listen = listener.local_addr()?;
    let api_state = config.admin_token.map(|token| {
        let ops = consumer.hook_ops();
        ApiState {
            admin: HookAdmin::new(store.clone()).with_guard(ops.deliverer.guard().cloned()),
            ops,
            token,
        }
    });
    if let (Some(state), Some(path)) = (&api_state, config.admin_token_file.clone()) {
        state.token.watch(path, shutdown.clone());
    }
    if api_state.is_some() {
        info!(%listen, "serving /metrics, /healthz, /readyz, /openapi.json and the hooks API under /api/v4 (the admin token is an operator credential: every project's hooks)");
    } else {
        info!(%listen, "serving /metrics, /healthz, /readyz, /openapi.json; the hooks API is off (no --admin-token-file)");
    }
    let tasks = consumer.supervisor();
    let routes = app(
        consumer.metrics(),
        store,
        consumer.kafka_client(),
        topics,
        tasks.clone(),
    )
    .merge(api::router(api_state));
    // Stops with the consumer: at shutdown, or when one of its tasks died.
    let (limits, stop) = (config.listener, tasks.stop().clone());
    tasks.spawn_service("HTTP listener", async move {
        hookline_shell::server::serve(listener, routes, limits, stop).await
    });
    consumer.run(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn an_unreachable_registry_fails_startup_after_retries() {
        let url = format!("http://127.0.0.1:{}", hookline_tests::free_port());
        let error = open_codec(Some(&url)).await.unwrap_err();
        assert!(
            matches!(&error, ConsumerError::SchemaRegistry(m) if m.contains("unreachable")),
            "{error}"
        );
        assert!(open_codec(None).await.is_ok());
    }
}
