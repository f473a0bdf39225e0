//! The HTTP API of `hookline-producer serve`.
//!
//! | route | answers |
//! |---|---|
//! | `POST /v1/transitions` | one transition (JSON object): `202` once Kafka acknowledged it |
//! | `POST /v1/transitions/batch` | a JSON array of transitions: `202` when every one was acknowledged (or skipped) |
//! | `GET /metrics` | Prometheus text (bearer token unless `--metrics-public`) |
//! | `GET /healthz` | `200` while the process runs (open) |
//! | `GET /readyz` | `200` when Kafka and the store answer, else `503` (open) |
//! | `GET /openapi.json` | the OpenAPI 3.1 document of the routes above but `/metrics` ([`crate::openapi`]) (open) |
//!
//! A transition: `{"build_id": 42, "status": "running", "occurred_at": "2026-...Z",
//! "event_id": "<uuid>", "facts": {"started_at", "finished_at", "duration", "queued_duration",
//! "failure_reason"}}`; only `build_id` and `status` are required (`occurred_at` defaults to now,
//! `facts` to the build row); `failure_reason` is one of GitLab's ([`crate::bounds`]).
//!
//! What is refused, in the order it is checked, as JSON `{"error": "...", "field": "..."}`:
//! `401` (with `WWW-Authenticate: Bearer`) without an accepted bearer token; `415` unless
//! `Content-Type: application/json`; `413` a body over `--body-limit`; `408` a body that did not
//! arrive within `--body-timeout`; `400` bytes that are not JSON; `422` JSON of the wrong type or
//! shape, a duplicate key, an unknown or invalid field (always named in `field`); `404` an
//! unknown build; `413` an event over `--max-event-bytes` or a CI state field over its bound
//! (named in `error`); `409` an `event_id` used before for a different transition; `422` an event
//! Kafka refuses for good; `503` with `Retry-After` when Kafka or the store is unavailable.
//! Nothing gets `202` unless Kafka acknowledged it, and nothing answers `500` but a bug. A batch
//! that is not fully acknowledged answers with the status of its worst failure and a per-item
//! `results` list; retry the items without `202` (with their `event_id`, so the retried events
//! keep their identity).
//!
//! A transition that sends no hook by design (the build's user is blocked: GitLab sends no hooks
//! for blocked users) is answered `200 {"skipped": "user_blocked", "build_id": .., "message": ..}`:
//! a success, so the client does not retry, but not `202`, because no event exists. In a batch
//! such an item is `{"status": 200, "skipped": "user_blocked"}`, does not count as a failure, and
//! is counted in the body's `skipped`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hookline_cistate::CiStore;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::ConnectionLimits;
use crate::api::{
    ApiError, Shape, TransitionBody, emitted_json, parse_json, retry_after_header, skipped_json,
};
use crate::auth::{self, ApiTokens};
use crate::config::ServeConfig;
use crate::emit::{Emission, Emitter, EmitterConfig};
use crate::error::ProducerError;
use crate::event_ids::{self, EventIds, PgEventIds};
use crate::flags::Flags;
use crate::metrics::ProducerMetrics;
#[allow(unused_imports)] // named only inside #[utoipa::path] attributes
use crate::openapi::{BatchAnswer, BatchRefusal, EmittedAnswer, ErrorAnswer, SkippedAnswer};
use hookline_shell::supervise::Supervisor;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct AppState {
    pub emitter: Emitter,
    /// Sent as `Retry-After` with 503.
    pub retry_after: Duration,
    /// Largest request body, in bytes.
    pub body_limit: usize,
    /// Most transitions in one batch.
    pub batch_limit: usize,
    /// The bearer tokens the API takes; `None` serves it without authentication (`--no-auth`).
    pub tokens: Option<Arc<ApiTokens>>,
    /// Serve `/metrics` without a token.
    pub metrics_public: bool,
    /// The listener's limits: connections, time to first byte, head, body (408 after it) and
    /// idle timeouts.
    pub connections: ConnectionLimits,
    /// `/readyz`'s last answer, reused for a second: the probe is open.
    pub ready: Arc<hookline_shell::ready_cache::ReadyCache>,
    /// The service's tasks: `/readyz` answers 503 once one of them died ([`run`] sets it).
    pub tasks: Supervisor,
}

impl AppState {
    /// Defaults as `serve` has them, without authentication (the caller sets `tokens`).
    pub fn new(emitter: Emitter) -> Self {
        Self {
            emitter,
            retry_after: Duration::from_secs(5),
            body_limit: 1024 * 1024,
            batch_limit: 1000,
            tokens: None,
            metrics_public: false,
            connections: ConnectionLimits::default(),
            ready: Default::default(),
            tasks: Supervisor::new(CancellationToken::new()),
        }
    }
}

/// The router, without a socket: tests drive it directly.
///
/// The transition routes check the token first (401), then the content type (415), then the
/// body; `/metrics` checks the token unless `metrics_public`; `/healthz` and `/readyz` are open
/// (they reveal nothing and orchestrators probe them without credentials).
pub fn app(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/transitions", post(transition))
        .route("/v1/transitions/batch", post(batch))
        .route_layer(middleware::from_fn(auth::require_json))
        .route_layer(middleware::from_fn_with_state(
            state.tokens.clone(),
            auth::require_token,
        ));
    let mut metrics_route = Router::new().route("/metrics", get(metrics));
    if !state.metrics_public {
        metrics_route = metrics_route.route_layer(middleware::from_fn_with_state(
            state.tokens.clone(),
            auth::require_token,
        ));
    }
    let open = state.tokens.is_none();
    let router = Router::new()
        .merge(api)
        .merge(metrics_route)
        .route("/healthz", get(healthz))
        .route("/readyz", get(ready))
        .route("/openapi.json", get(openapi_json))
        .layer(DefaultBodyLimit::max(state.body_limit));
    // Without tokens every route checks that the request was meant for loopback (DNS
    // rebinding: a browser sends the attacker's host name).
    let router = if open {
        router.layer(middleware::from_fn(auth::require_loopback_host))
    } else {
        router
    };
    router.with_state(state)
}

/// Connects the stores and Kafka, listens, and serves until `shutdown` is cancelled.
pub async fn serve(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ProducerError> {
    config.validate()?;
    hookline_shell::secret_file::allow_readable(config.allow_readable_secret_files);
    // The producer decodes no events today; the cap is set all the same, so that no code path
    // added later can be made to allocate what a record claims.
    hookline_schemas::codec::cap_allocation(config.kafka.max_event_bytes);
    // Before connecting to anything: a bad token file is an operator's error to fix first.
    let tokens = match &config.api_token_file {
        Some(path) => {
            let tokens = ApiTokens::from_file(path)?;
            // A rotated file takes effect without a restart.
            tokens.watch(path.clone(), shutdown.clone());
            Some(Arc::new(tokens))
        }
        None => {
            tracing::warn!(listen = %config.listen, "--no-auth: the API takes transitions from anyone who can reach this loopback address (requests must name a loopback Host)");
            None
        }
    };
    let pg = config.store.pg_store_for_service().await?;
    let flag_store = config.store.flag_store(Some(&pg)).await?;
    // Every task of the service: the first that dies stops it with an error (a non-zero exit).
    let supervisor = Supervisor::new(shutdown.child_token());
    let flags =
        Flags::load_supervised(flag_store, config.flags_reload_interval, &supervisor).await?;
    let metrics = Arc::new(ProducerMetrics::new());
    let event_ids: Arc<dyn EventIds> = Arc::new(PgEventIds::new(pg.pool().clone()));
    let store: Arc<dyn CiStore> = Arc::new(pg);
    let emitter_config = EmitterConfig {
        event_ids: Some(event_ids.clone()),
        ..config.kafka.emitter_config()
    };
    let emitter = Emitter::new(emitter_config, store, flags, metrics).await?;
    let pruning = event_ids::prune_periodically(
        event_ids,
        config.event_id_retention,
        Duration::from_secs(3600),
        supervisor.stop().clone(),
    );
    supervisor.spawn_service("event-id pruner", async move {
        pruning.await;
        Ok::<(), std::convert::Infallible>(())
    });
    emitter.check_topic_limit().await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| ProducerError::io(format!("listening on {}", config.listen), e))?;
    if let Some(tokens) = &tokens {
        tracing::info!(
            tokens = tokens.len(),
            metrics_public = config.metrics_public,
            "API requires a bearer token"
        );
    }
    let state = AppState {
        emitter,
        retry_after: config.retry_after,
        body_limit: config.body_limit,
        batch_limit: config.batch_limit,
        tokens,
        metrics_public: config.metrics_public,
        connections: config.listener.limits().map_err(ProducerError::Invalid)?,
        ready: Default::default(),
        tasks: supervisor.clone(),
    };
    run_supervised(listener, state, supervisor, config.shutdown_timeout).await
}

/// Serves `state` on `listener` until `shutdown`; then stops accepting, lets in-flight requests
/// finish (each is waiting for its ack) for at most `drain`, and flushes the producer.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<(), ProducerError> {
    run_supervised(
        listener,
        state,
        Supervisor::new(shutdown.child_token()),
        drain,
    )
    .await
}

/// [`run`] among the other tasks of `supervisor` (`serve`'s event-id pruner and flag reloader):
/// serves until its stop (shutdown, or a task that died), drains, flushes, and returns the
/// failure of a task that died as [`ProducerError::TaskFailed`].
pub async fn run_supervised(
    listener: TcpListener,
    mut state: AppState,
    supervisor: Supervisor,
    drain: Duration,
) -> Result<(), ProducerError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, topic = state.emitter.topic(), "producer listening");
    }
    state.tasks = supervisor.clone();
    let emitter = state.emitter.clone();
    let stop = supervisor.stop().clone();
    let limits = state.connections;
    let router = app(state);
    let until = stop.clone();
    let mut server = supervisor.spawn_service("HTTP API", async move {
        hookline_shell::server::serve(listener, router, limits, until)
            .await
            .map_err(|e| format!("serving HTTP: {e}"))
    });
    let served = tokio::select! {
        _ = &mut server => true,
        _ = stop.cancelled() => false,
    };
    let started = tokio::time::Instant::now();
    tracing::info!(?drain, "shutting down: finishing in-flight transitions");
    if !served && tokio::time::timeout(drain, &mut server).await.is_err() {
        tracing::warn!(
            ?drain,
            "drain bound reached; in-flight requests are abandoned unanswered"
        );
        server.abort();
    }
    let left = drain
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(100));
    let flushed = emitter.flush(left).await;
    stop.cancel();
    supervisor.wait().await?;
    flushed?;
    tracing::info!("producer stopped");
    Ok(())
}

/// A JSON body whose errors name the field: `422 {"field": "status", ...}` instead of axum's
/// plain-text rejection. (A body that does not arrive within `--body-timeout` is answered 408 by
/// the server, [`hookline_shell::server`].)
pub struct FieldJson<T>(pub T);

impl<T> FromRequest<AppState> for FieldJson<T>
where
    T: DeserializeOwned + Shape,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge(
                    "the request body is over the configured limit (--body-limit)".into(),
                )
            } else {
                ApiError::Malformed(rejection.body_text())
            }
        })?;
        parse_json(&bytes).map(FieldJson)
    }
}

#[utoipa::path(
    post,
    path = "/v1/transitions",
    tag = "transitions",
    request_body(content = TransitionBody, content_type = "application/json"),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "Kafka acknowledged the event", body = EmittedAnswer),
        (status = 200, description = "no event by design (the build's user is blocked); do not retry", body = SkippedAnswer),
        (status = 400, description = "the body is not JSON", body = ErrorAnswer),
        (status = 401, description = "no accepted bearer token", body = ErrorAnswer,
            headers(("WWW-Authenticate" = String, description = "Bearer realm=\"hookline\""))),
        (status = 404, description = "unknown build", body = ErrorAnswer),
        (status = 408, description = "the body did not arrive within --body-timeout", body = ErrorAnswer),
        (status = 409, description = "the event_id was used before for a different transition", body = ErrorAnswer),
        (status = 413, description = "the body is over --body-limit, the event over --max-event-bytes or a CI state field over its bound", body = ErrorAnswer),
        (status = 415, description = "the body is not declared as application/json", body = ErrorAnswer),
        (status = 422, description = "JSON of the wrong type or shape, a duplicate key, an unknown or invalid field (named in field), or an event Kafka refuses for good", body = ErrorAnswer),
        (status = 503, description = "Kafka or the store is unavailable; retry after Retry-After seconds", body = ErrorAnswer,
            headers(("Retry-After" = u64, description = "seconds"))),
    )
)]
pub(crate) async fn transition(
    State(state): State<AppState>,
    FieldJson(body): FieldJson<TransitionBody>,
) -> Result<Response, ApiError> {
    let request = body.into_request("")?;
    match state.emitter.emit(request).await {
        Ok(Emission::Emitted(emitted)) => {
            Ok((StatusCode::ACCEPTED, axum::Json(emitted_json(&emitted))).into_response())
        }
        Ok(Emission::Skipped { build_id, reason }) => {
            Ok((StatusCode::OK, axum::Json(skipped_json(build_id, reason))).into_response())
        }
        Err(error) => Err(ApiError::from_emit(&error, state.retry_after)),
    }
}

#[utoipa::path(
    post,
    path = "/v1/transitions/batch",
    tag = "transitions",
    request_body(content = Vec<TransitionBody>, content_type = "application/json",
        description = "1 to --batch-limit transitions"),
    security(("bearer" = [])),
    responses(
        (status = 202, description = "every item was acknowledged by Kafka or skipped", body = BatchAnswer),
        (status = 400, description = "the body is not JSON", body = ErrorAnswer),
        (status = 401, description = "no accepted bearer token", body = ErrorAnswer,
            headers(("WWW-Authenticate" = String, description = "Bearer realm=\"hookline\""))),
        (status = 404, description = "an item's build is unknown (the worst item's status)", body = BatchRefusal),
        (status = 408, description = "the body did not arrive within --body-timeout", body = ErrorAnswer),
        (status = 409, description = "an item's event_id was used before for a different transition", body = BatchRefusal),
        (status = 413, description = "the body is over --body-limit, or an item over its bounds", body = BatchRefusal),
        (status = 415, description = "the body is not declared as application/json", body = ErrorAnswer),
        (status = 422, description = "the batch or an item is invalid (named in field), or Kafka refused an item for good", body = BatchRefusal),
        (status = 503, description = "Kafka or the store is unavailable for an item; retry the items without 202", body = BatchRefusal,
            headers(("Retry-After" = u64, description = "seconds"))),
    )
)]
pub(crate) async fn batch(
    State(state): State<AppState>,
    FieldJson(bodies): FieldJson<Vec<TransitionBody>>,
) -> Result<Response, ApiError> {
    if bodies.is_empty() || bodies.len() > state.batch_limit {
        return Err(ApiError::Invalid {
            field: "body".into(),
            message: format!(
                "a batch holds 1 to {} transitions, not {}",
                state.batch_limit,
                bodies.len()
            ),
        });
    }
    let requests = bodies
        .into_iter()
        .enumerate()
        .map(|(i, body)| body.into_request(&format!("[{i}].")))
        .collect::<Result<Vec<_>, _>>()?;
    let results = state.emitter.emit_batch(requests).await;
    let mut worst: Option<ApiError> = None;
    let mut accepted = 0;
    let mut skipped = 0;
    let items: Vec<Value> = results
        .iter()
        .map(|result| match result {
            Ok(Emission::Emitted(emitted)) => {
                accepted += 1;
                let mut item = emitted_json(emitted);
                item["status"] = json!(202);
                item
            }
            Ok(Emission::Skipped { build_id, reason }) => {
                skipped += 1;
                let mut item = skipped_json(*build_id, *reason);
                item["status"] = json!(200);
                item
            }
            Err(error) => {
                let api = ApiError::from_emit(error, state.retry_after);
                let item = json!({ "status": api.status().as_u16(), "error": error.to_string() });
                // 503 beats 500 beats 404: the status tells the client whether retrying helps.
                let rank = |e: &ApiError| match e {
                    ApiError::Unavailable { .. } => 3,
                    ApiError::Internal(_) => 2,
                    _ => 1,
                };
                if worst.as_ref().is_none_or(|w| rank(&api) > rank(w)) {
                    worst = Some(api);
                }
                item
            }
        })
        .collect();
    let body = json!({ "accepted": accepted, "skipped": skipped, "results": items });
    Ok(match worst {
        None => (StatusCode::ACCEPTED, axum::Json(body)).into_response(),
        Some(error) => {
            let mut response = (error.status(), axum::Json(body)).into_response();
            if let ApiError::Unavailable { retry_after, .. } = error {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, retry_after_header(retry_after));
            }
            response
        }
    })
}

async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        state.emitter.metrics().encode(),
    )
        .into_response()
}

/// Liveness: `200 ok` while the process runs.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "probes",
    responses((status = 200, description = "the process runs", body = String, content_type = "text/plain"))
)]
pub(crate) async fn healthz() -> &'static str {
    "ok"
}

/// The OpenAPI 3.1 document of the routes above (open, like the probes).
async fn openapi_json() -> Response {
    axum::Json(document()).into_response()
}

#[utoipa::path(
    get,
    path = "/readyz",
    tag = "probes",
    responses(
        (status = 200, description = "Kafka and the store answer", body = String, content_type = "text/plain"),
        (status = 503, description = "Kafka or the store does not answer; the body says which", body = String, content_type = "text/plain"),
    )
)]
pub(crate) async fn ready(State(state): State<AppState>) -> Response {
    if let Err(reason) = state.tasks.check() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}"),
        )
            .into_response();
    }
    // The probe is open: one real check (a store round trip, the topic's metadata) a second at
    // most, however many probes come.
    match state.ready.get(|| state.emitter.check_ready()).await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}"),
        )
            .into_response(),
    }
}

// The OpenAPI document of the routes above (answer shapes in `openapi`).

/// The bearer token scheme of the transition routes.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The producer API's document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "hookline producer",
        description = "CI build transitions in, BuildEvents on Kafka out. Nothing is answered 202 unless Kafka acknowledged it.",
    ),
    paths(
        crate::ingest::transition,
        crate::ingest::batch,
        crate::ingest::healthz,
        crate::ingest::ready
    ),
    components(schemas(
        crate::api::TransitionBody,
        crate::api::FactsBody,
        crate::openapi::StatusName,
        crate::openapi::TimingName,
        EmittedAnswer,
        SkippedAnswer,
        ErrorAnswer,
        crate::openapi::BatchItem,
        BatchAnswer,
        BatchRefusal
    )),
    modifiers(&BearerAuth)
)]
pub struct ApiDoc;

/// The document as served, with the running version.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::emit::EmitterConfig;
    use axum::body::Body;
    use hookline_cistate::MemoryStore;
    use tower::ServiceExt;

    /// An app whose Kafka is unreachable: enough for every answer given before producing.
    async fn offline_app(body_limit: usize) -> Router {
        offline_app_over(body_limit, Arc::new(MemoryStore::new())).await
    }

    async fn offline_app_over(body_limit: usize, store: Arc<dyn CiStore>) -> Router {
        app(AppState {
            body_limit,
            ..offline_state(store, EmitterConfig::new("127.0.0.1:9"), Flags::in_memory()).await
        })
    }

    pub(crate) async fn offline_state(
        store: Arc<dyn CiStore>,
        mut config: EmitterConfig,
        flags: Flags,
    ) -> AppState {
        config.delivery_timeout = Duration::from_millis(300);
        let emitter = Emitter::new(config, store, flags, Arc::new(ProducerMetrics::new()))
            .await
            .unwrap();
        AppState::new(emitter)
    }

    async fn post(app: Router, path: &str, body: impl Into<Body>) -> (StatusCode, Value) {
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap();
        send(app, request).await
    }

    async fn send(app: Router, request: Request) -> (StatusCode, Value) {
        let (status, _, json) = send_with_headers(app, request).await;
        (status, json)
    }

    async fn send_with_headers(
        app: Router,
        request: Request,
    ) -> (StatusCode, axum::http::HeaderMap, Value) {
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            headers,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    /// Each of these answered 400 without a field, or was accepted, before typed errors.
    #[tokio::test]
    async fn well_formed_json_of_the_wrong_type_or_shape_is_422_naming_the_field() {
        let cases = [
            (r#"{"build_id": 1000000, "status": 3}"#, "status"),
            (r#"{"build_id": 1000000, "status": null}"#, "status"),
            (r#"{"build_id": 1000000, "status": true}"#, "status"),
            (r#"{"build_id": 1000000, "status": []}"#, "status"),
            (r#"{"build_id": 1000000, "status": {}}"#, "status"),
            (
                r#"{"build_id": 1000000, "status": {"running": null}}"#,
                "status",
            ),
            (r#"{"build_id": 1.5, "status": "running"}"#, "build_id"),
            (r#"{"build_id": null, "status": "running"}"#, "build_id"),
            (
                r#"{"build_id": 1, "status": "running", "facts": []}"#,
                "facts",
            ),
            (
                r#"{"build_id": 1, "status": "running", "facts": 3}"#,
                "facts",
            ),
            (r#"[1000000, "running"]"#, "body"),
            (
                r#"{"build_id": 1, "status": "running", "event_id": 7}"#,
                "event_id",
            ),
            (
                r#"{"build_id": 1, "status": "failed", "facts": {"failure_reason": 3}}"#,
                "facts.failure_reason",
            ),
            ("null", "body"),
            ("true", "body"),
            ("[]", "body"),
            ("3", "body"),
            (r#""running""#, "body"),
            ("{}", "build_id"),
        ];
        for (body, field) in cases {
            let (status, json) = post(offline_app(1024).await, "/v1/transitions", body).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {json}");
            assert_eq!(json["field"], field, "{body}: {json}");
        }
        for (body, field) in [
            (r#"{"build_id": 1}"#, "body"),
            (
                r#"[{"build_id": 1, "status": "running"}, [1, "running"]]"#,
                "[1]",
            ),
            (
                r#"[{"build_id": 1, "status": "running", "facts": [null]}]"#,
                "[0].facts",
            ),
        ] {
            let (status, json) = post(offline_app(1024).await, "/v1/transitions/batch", body).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {json}");
            assert_eq!(json["field"], field, "{body}: {json}");
        }
    }

    #[tokio::test]
    async fn a_duplicate_key_is_422_naming_it() {
        let cases = [
            (
                "/v1/transitions",
                r#"{"build_id": 1, "status": "running", "status": "failed"}"#,
                "status",
            ),
            (
                "/v1/transitions",
                r#"{"build_id": 1, "status": "failed", "facts": {"duration": 1, "duration": 2}}"#,
                "facts.duration",
            ),
            (
                "/v1/transitions/batch",
                r#"[{"build_id": 1, "status": "running"}, {"build_id": 1, "build_id": 2, "status": "running"}]"#,
                "[1].build_id",
            ),
        ];
        for (path, body, field) in cases {
            let (status, json) = post(offline_app(1024).await, path, body).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {json}");
            assert_eq!(json["field"], field, "{body}: {json}");
            assert!(
                json["error"].as_str().unwrap().contains("duplicate"),
                "{json}"
            );
        }
    }

    /// Bodies of about 1 MiB built to make a duplicate-key check slow (one 500 KB key over a
    /// long array, or over many keys, or repeated): refused with the field named, each read once
    /// (the time is printed, not asserted: `--nocapture` shows it).
    #[tokio::test]
    async fn adversarial_megabyte_bodies_are_refused_naming_the_field() {
        let key = "k".repeat(500_000);
        let zeros = vec!["0"; 270_000].join(",");
        let keys = (0..40_000)
            .map(|i| format!(r#""{i}":0"#))
            .collect::<Vec<_>>()
            .join(",");
        let cases = [
            (
                format!(r#"{{"facts":{{"{key}":[{zeros}]}}}}"#),
                format!("facts.{key}"),
                "unknown field",
            ),
            (
                format!(r#"{{"facts":{{"{key}":{{{keys}}}}}}}"#),
                format!("facts.{key}"),
                "unknown field",
            ),
            (
                format!(r#"{{"facts":{{"{key}":0,"{key}":0}}}}"#),
                format!("facts.{key}"),
                "duplicate key",
            ),
        ];
        for (body, field, error) in cases {
            assert!(body.len() < 1024 * 1024, "{}", body.len());
            let started = std::time::Instant::now();
            let (status, json) =
                post(offline_app(1024 * 1024).await, "/v1/transitions", body).await;
            eprintln!("{error}: answered in {:?}", started.elapsed());
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
            let named = json["field"].as_str().unwrap();
            assert!(
                named.starts_with("facts"),
                "{}",
                &named[..named.len().min(80)]
            );
            if error == "duplicate key" {
                assert_eq!(named, field, "the duplicate's whole path");
            }
            let message = json["error"].as_str().unwrap();
            assert!(
                message.contains(error),
                "{}",
                &message[..message.len().min(200)]
            );
            if error == "duplicate key" {
                assert!(message.len() < 300, "the message names a long key shortly");
            }
        }
    }

    #[tokio::test]
    async fn only_bytes_that_are_not_json_are_400() {
        for body in [
            &b"{not json"[..],
            b"",
            b"{\"build_id\": 1,",
            b"\xff\xfe",
            b"{\"build_id\": 1, \"status\": \"running\"} trailing",
        ] {
            let (status, json) =
                post(offline_app(1024).await, "/v1/transitions", body.to_vec()).await;
            assert_eq!(status, StatusCode::BAD_REQUEST, "{body:?}: {json}");
            assert!(json.get("field").is_none(), "{json}");
        }
    }

    #[tokio::test]
    async fn a_failure_reason_outside_gitlabs_list_is_422() {
        let reason = "x".repeat(1_040_000);
        let body = json!({"build_id": 77, "status": "failed", "facts": {"failure_reason": reason}});
        let (status, json) = post(
            offline_app(2 << 20).await,
            "/v1/transitions",
            body.to_string(),
        )
        .await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{}",
            json["error"]
        );
        assert_eq!(json["field"], "facts.failure_reason");
        // A known reason passes validation: the build is then looked up (and unknown here).
        for reason in ["script_failure", "unknown_failure"] {
            let body =
                json!({"build_id": 77, "status": "failed", "facts": {"failure_reason": reason}});
            let (status, json) =
                post(offline_app(1024).await, "/v1/transitions", body.to_string()).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{reason}: {json}");
        }
    }

    /// Kafka is unreachable here: a 413 proves the event was refused before producing.
    #[tokio::test]
    async fn an_event_over_max_event_bytes_or_a_field_over_its_bound_is_413_naming_it() {
        let store = Arc::new(MemoryStore::new());
        let snapshot = crate::bounds::tests::worst_case_snapshot();
        hookline_cistate::fixtures::write_snapshot(store.as_ref(), &snapshot)
            .await
            .unwrap();
        let flags = Flags::in_memory();
        flags
            .set(crate::INLINE_FLAG, "test", crate::Change::Boolean(true))
            .await
            .unwrap();
        let mut config = EmitterConfig::new("127.0.0.1:9");
        config.max_event_bytes = 100_000;
        let app = app(offline_state(store.clone(), config, flags.clone()).await);
        let body = json!({"build_id": snapshot.build.id, "status": "running"}).to_string();
        let (status, json) = post(app, "/v1/transitions", body.clone()).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
        let error = json["error"].as_str().unwrap();
        assert!(
            error.contains("--max-event-bytes") && error.contains("100000"),
            "{error}"
        );

        let mut over = snapshot.clone();
        over.pipeline.commit_message.push('!');
        hookline_cistate::fixtures::write_snapshot(store.as_ref(), &over)
            .await
            .unwrap();
        let bounded =
            super::app(offline_state(store, EmitterConfig::new("127.0.0.1:9"), flags).await);
        let (status, json) = post(bounded, "/v1/transitions", body).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
        assert!(
            json["error"]
                .as_str()
                .unwrap()
                .contains("pipeline.commit_message"),
            "{json}"
        );
    }

    fn with_tokens(mut state: AppState, metrics_public: bool) -> Router {
        state.tokens = Some(Arc::new(
            ApiTokens::new(&["old-token-0123456789", "new-token-0123456789"]).unwrap(),
        ));
        state.metrics_public = metrics_public;
        app(state)
    }

    async fn token_app(metrics_public: bool) -> Router {
        let store = Arc::new(MemoryStore::new());
        with_tokens(
            offline_state(store, EmitterConfig::new("127.0.0.1:9"), Flags::in_memory()).await,
            metrics_public,
        )
    }

    fn transition_request(token: Option<&str>, content_type: Option<&str>) -> Request {
        let mut request = Request::post("/v1/transitions");
        if let Some(token) = token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        if let Some(content_type) = content_type {
            request = request.header("content-type", content_type);
        }
        request
            .body(Body::from(r#"{"build_id": 77, "status": "running"}"#))
            .unwrap()
    }

    #[tokio::test]
    async fn without_an_accepted_bearer_token_the_api_is_401() {
        let app = token_app(false).await;
        for token in [None, Some("wrong-token-0123456789"), Some("")] {
            let (status, headers, json) = send_with_headers(
                app.clone(),
                transition_request(token, Some("application/json")),
            )
            .await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{token:?}: {json}");
            assert_eq!(
                headers[header::WWW_AUTHENTICATE],
                "Bearer realm=\"hookline\""
            );
            assert!(json["error"].is_string(), "{json}");
        }
        // Both tokens of a rotation are accepted (the build is then unknown: 404).
        for token in ["old-token-0123456789", "new-token-0123456789"] {
            let (status, json) = send(
                app.clone(),
                transition_request(Some(token), Some("application/json")),
            )
            .await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{json}");
        }
        let lowercase = Request::post("/v1/transitions/batch")
            .header("authorization", "bearer new-token-0123456789")
            .header("content-type", "application/json")
            .body(Body::from("[]"))
            .unwrap();
        assert_eq!(
            send(app.clone(), lowercase).await.0,
            StatusCode::UNPROCESSABLE_ENTITY
        );

        // Probes stay open; /metrics follows --metrics-public.
        let get = |path: &str, token: Option<&str>| {
            let mut request = Request::get(path);
            if let Some(token) = token {
                request = request.header("authorization", format!("Bearer {token}"));
            }
            request.body(Body::empty()).unwrap()
        };
        assert_eq!(
            send(app.clone(), get("/healthz", None)).await.0,
            StatusCode::OK
        );
        assert_eq!(
            send(app.clone(), get("/readyz", None)).await.0,
            StatusCode::SERVICE_UNAVAILABLE,
            "answered (Kafka is unreachable here), not refused"
        );
        assert_eq!(
            send(app.clone(), get("/metrics", None)).await.0,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            send(app.clone(), get("/metrics", Some("old-token-0123456789")))
                .await
                .0,
            StatusCode::OK
        );
        let public = token_app(true).await;
        assert_eq!(send(public, get("/metrics", None)).await.0, StatusCode::OK);
    }

    #[tokio::test]
    async fn a_body_not_declared_as_json_is_415() {
        let app = offline_app(1024).await;
        for content_type in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("application/jsonp"),
        ] {
            let (status, json) = send(app.clone(), transition_request(None, content_type)).await;
            assert_eq!(
                status,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{content_type:?}: {json}"
            );
        }
        for content_type in [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
        ] {
            let (status, json) =
                send(app.clone(), transition_request(None, Some(content_type))).await;
            assert_eq!(status, StatusCode::NOT_FOUND, "{content_type}: {json}");
        }
        // The token is checked first: an unauthenticated client learns nothing more.
        let app = token_app(false).await;
        let (status, _) = send(app, transition_request(None, Some("text/plain"))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn invalid_fields_are_422_naming_the_field() {
        let cases = [
            (r#"{"build_id": 1, "status": "exploded"}"#, "status"),
            (r#"{"status": "running"}"#, "build_id"),
            (r#"{"build_id": "one", "status": "running"}"#, "build_id"),
            (
                r#"{"build_id": 1, "status": "running", "colour": "red"}"#,
                "colour",
            ),
            (
                r#"{"build_id": 1, "status": "running", "occurred_at": "yesterday"}"#,
                "occurred_at",
            ),
            (
                r#"{"build_id": 1, "status": "failed", "facts": {"duration": -3}}"#,
                "facts.duration",
            ),
            (
                r#"{"build_id": 1, "status": "failed", "facts": {"duration": "long"}}"#,
                "facts.duration",
            ),
            (r#"{"build_id": -4, "status": "running"}"#, "build_id"),
        ];
        for (body, field) in cases {
            let (status, json) = post(offline_app(1024).await, "/v1/transitions", body).await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}: {json}");
            assert_eq!(json["field"], field, "{body}: {json}");
        }
        let (status, json) = post(
            offline_app(1024).await,
            "/v1/transitions/batch",
            r#"[{"build_id": 1, "status": "running"}, {"build_id": 2, "status": "nope"}]"#,
        )
        .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
        assert_eq!(json["field"], "[1].status");
    }

    #[tokio::test]
    async fn malformed_json_is_400_and_an_oversized_body_is_413() {
        let (status, _) = post(offline_app(1024).await, "/v1/transitions", "{not json").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        let big = format!(
            r#"{{"build_id": 1, "status": "running", "event_id": "{}"}}"#,
            "x".repeat(2000)
        );
        let (status, json) = post(offline_app(1024).await, "/v1/transitions", big).await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{json}");
    }

    #[tokio::test]
    async fn an_unknown_build_is_404() {
        let (status, json) = post(
            offline_app(1024).await,
            "/v1/transitions",
            r#"{"build_id": 77, "status": "running"}"#,
        )
        .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(json["error"].as_str().unwrap().contains("77"));
    }

    /// Kafka is unreachable here, so a 200 proves the skip happened before producing: no event
    /// was even attempted.
    #[tokio::test]
    async fn a_blocked_users_build_is_answered_200_skipped_and_emits_nothing() {
        let store = Arc::new(MemoryStore::new());
        let mut blocked = hookline_cistate::fixtures::sample(0);
        blocked.user.blocked = true;
        hookline_cistate::fixtures::write_snapshot(store.as_ref(), &blocked)
            .await
            .unwrap();
        let app = offline_app_over(1024, store).await;
        let one = json!({"build_id": blocked.build.id, "status": "running"}).to_string();
        let (status, json) = post(app.clone(), "/v1/transitions", one).await;
        assert_eq!(status, StatusCode::OK, "{json}");
        assert_eq!(json["skipped"], "user_blocked");
        assert_eq!(json["build_id"], blocked.build.id);
        assert!(json.get("event_id").is_none(), "no event exists: {json}");

        let both = json!([
            {"build_id": blocked.build.id, "status": "created"},
            {"build_id": blocked.build.id, "status": "pending"},
        ])
        .to_string();
        let (status, json) = post(app.clone(), "/v1/transitions/batch", both).await;
        assert_eq!(status, StatusCode::ACCEPTED, "nothing failed: {json}");
        assert_eq!(
            (json["accepted"].as_u64(), json["skipped"].as_u64()),
            (Some(0), Some(2))
        );
        assert_eq!(json["results"][1]["status"], 200);
        assert_eq!(json["results"][1]["skipped"], "user_blocked");

        let request = Request::get("/metrics").body(Body::empty()).unwrap();
        // No tokens in this state (AppState::new): /metrics is open.
        let response = app.oneshot(request).await.unwrap();
        let text = String::from_utf8(
            axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap()
                .to_vec(),
        )
        .unwrap();
        assert!(
            text.contains("hookline_producer_events_skipped_total{reason=\"user_blocked\"} 3"),
            "{text}"
        );
        // Every kind is present from the start, at 0.
        assert!(
            text.lines()
                .filter(|l| l.starts_with("hookline_producer_produce_errors_total{"))
                .all(|l| l.ends_with(" 0")),
            "{text}"
        );
        assert!(
            !text.contains("hookline_producer_flag_evaluations_total{"),
            "{text}"
        );
    }

    /// The served document and the router agree: every documented (method, path) is routed, no
    /// other method is on those paths, and the document has nothing else. `/metrics` and
    /// `/openapi.json` are routed and left out of it on purpose.
    #[tokio::test]
    async fn the_openapi_document_describes_the_routes_the_router_serves() {
        use crate::openapi::DOCUMENTED_ROUTES;
        let app = offline_app(1024).await;
        let request = Request::get("/openapi.json").body(Body::empty()).unwrap();
        let (status, doc) = send(app.clone(), request).await;
        assert_eq!(status, StatusCode::OK);
        let mut documented: Vec<(String, String)> = doc["paths"]
            .as_object()
            .unwrap()
            .iter()
            .flat_map(|(path, ops)| {
                ops.as_object()
                    .unwrap()
                    .keys()
                    .filter(|k| ["get", "post", "put", "patch", "delete"].contains(&k.as_str()))
                    .map(move |method| (method.clone(), path.clone()))
            })
            .collect();
        documented.sort();
        let mut expected: Vec<(String, String)> = DOCUMENTED_ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        expected.sort();
        assert_eq!(documented, expected);

        for (method, path) in DOCUMENTED_ROUTES {
            for other in ["get", "post", "put", "delete"] {
                let request = Request::builder()
                    .method(other.to_uppercase().as_str())
                    .uri(*path)
                    .header("content-type", "application/json")
                    .body(Body::from("{}"))
                    .unwrap();
                let status = app.clone().oneshot(request).await.unwrap().status();
                if other == *method {
                    assert_ne!(status, StatusCode::NOT_FOUND, "{method} {path} is routed");
                    assert_ne!(
                        status,
                        StatusCode::METHOD_NOT_ALLOWED,
                        "{method} {path} is routed"
                    );
                } else {
                    assert_eq!(
                        status,
                        StatusCode::METHOD_NOT_ALLOWED,
                        "{other} {path} is not routed, as the document says"
                    );
                }
            }
        }
        let request = Request::get("/v1/undocumented")
            .body(Body::empty())
            .unwrap();
        assert_eq!(
            app.oneshot(request).await.unwrap().status(),
            StatusCode::NOT_FOUND
        );
    }
}

#[cfg(test)]
mod openapi_tests {
    use super::*;
    use crate::openapi::DOCUMENTED_ROUTES;
    use serde_json::Value;

    fn json() -> Value {
        serde_json::to_value(document()).unwrap()
    }

    #[test]
    fn the_document_is_openapi_3_1_with_its_required_keys() {
        let doc = json();
        assert!(
            doc["openapi"].as_str().unwrap().starts_with("3.1."),
            "{}",
            doc["openapi"]
        );
        assert!(doc["info"]["title"].is_string() && doc["info"]["version"].is_string());
        assert!(doc["paths"].is_object());
        // Every $ref resolves to a component schema.
        let text = doc.to_string();
        for piece in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = piece.split('"').next().unwrap();
            assert!(
                doc["components"]["schemas"][name].is_object(),
                "dangling $ref {name}"
            );
        }
        // Each operation has responses, and the transition routes name the bearer scheme.
        for (method, path) in DOCUMENTED_ROUTES {
            let op = &doc["paths"][path][method];
            assert!(op["responses"].is_object(), "{method} {path}");
        }
        assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    }

    #[test]
    fn unknown_request_fields_are_refused_in_the_schema_as_by_the_api() {
        let doc = json();
        for name in ["TransitionBody", "FactsBody"] {
            assert_eq!(
                doc["components"]["schemas"][name]["additionalProperties"],
                Value::Bool(false),
                "{name}"
            );
        }
    }
}
