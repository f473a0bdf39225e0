//! The HTTP API of `hookline-producer serve`.
//!
//! | route | answers |
//! |---|---|
//! | `POST /v1/transitions` | one transition (JSON object): `202` once Kafka acknowledged it |
//! | `POST /v1/transitions/batch` | a JSON array of transitions: `202` when every one was acknowledged (or skipped) |
//! | `GET /metrics` | Prometheus text |
//! | `GET /healthz` | `200` while the process runs |
//! | `GET /readyz` | `200` when Kafka and the store answer, else `503` |
//!
//! A transition: `{"build_id": 42, "status": "running", "occurred_at": "2026-...Z",
//! "event_id": "<uuid>", "facts": {"started_at", "finished_at", "duration", "queued_duration",
//! "failure_reason"}}`; only `build_id` and `status` are required (`occurred_at` defaults to now,
//! `facts` to the build row). Errors are JSON `{"error": "...", "field": "..."}`: `400` malformed
//! JSON, `422` an invalid or unknown field (named), `413` a body over the limit, `404` an unknown
//! build, `503` with `Retry-After` when Kafka or the store is unavailable. Nothing gets `202`
//! unless Kafka acknowledged it. A batch that is not fully acknowledged answers with the status of
//! its worst failure and a per-item `results` list; retry the items without `202` (with their
//! `event_id`, so the retried events keep their identity).
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
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use hookline_cistate::CiStore;
use hookline_schemas::{BuildStatus, TransitionFacts};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::config::ServeConfig;
use crate::emit::{Emitted, Emitter, TransitionRequest};
use crate::error::{EmitError, ProducerError, SkipReason};
use crate::flags::Flags;
use crate::metrics::ProducerMetrics;

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
}

impl AppState {
    pub fn new(emitter: Emitter) -> Self {
        Self {
            emitter,
            retry_after: Duration::from_secs(5),
            body_limit: 1024 * 1024,
            batch_limit: 1000,
        }
    }
}

/// The router, without a socket: tests drive it directly.
pub fn app(state: AppState) -> Router {
    Router::new()
        .route("/v1/transitions", post(transition))
        .route("/v1/transitions/batch", post(batch))
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .layer(DefaultBodyLimit::max(state.body_limit))
        .with_state(state)
}

/// Connects the stores and Kafka, listens, and serves until `shutdown` is cancelled.
pub async fn serve(config: ServeConfig, shutdown: CancellationToken) -> Result<(), ProducerError> {
    config.validate()?;
    let pg = config.store.pg_store().await?;
    let flag_store = config.store.flag_store(Some(&pg)).await?;
    let flags = Flags::load(flag_store, config.flags_reload_interval).await?;
    let metrics = Arc::new(ProducerMetrics::new());
    let store: Arc<dyn CiStore> = Arc::new(pg);
    let emitter = Emitter::new(config.kafka.emitter_config(), store, flags, metrics).await?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| ProducerError::io(format!("listening on {}", config.listen), e))?;
    let state = AppState {
        emitter,
        retry_after: config.retry_after,
        body_limit: config.body_limit,
        batch_limit: config.batch_limit,
    };
    run(listener, state, shutdown, config.shutdown_timeout).await
}

/// Serves `state` on `listener` until `shutdown`; then stops accepting, lets in-flight requests
/// finish (each is waiting for its ack) for at most `drain`, and flushes the producer.
pub async fn run(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
    drain: Duration,
) -> Result<(), ProducerError> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, topic = state.emitter.topic(), "producer listening");
    }
    let emitter = state.emitter.clone();
    let stop = shutdown.clone();
    let mut server = tokio::spawn(async move {
        axum::serve(listener, app(state))
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
    });
    let finished = |joined: Result<std::io::Result<()>, tokio::task::JoinError>| match joined {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(ProducerError::io("serving HTTP", e)),
        Err(e) => Err(ProducerError::io("serving HTTP", std::io::Error::other(e))),
    };
    tokio::select! {
        joined = &mut server => return finished(joined),
        _ = shutdown.cancelled() => {}
    }
    let started = tokio::time::Instant::now();
    tracing::info!(?drain, "shutting down: finishing in-flight transitions");
    match tokio::time::timeout(drain, &mut server).await {
        Ok(joined) => finished(joined)?,
        Err(_) => {
            tracing::warn!(
                ?drain,
                "drain bound reached; in-flight requests are abandoned unanswered"
            );
            server.abort();
        }
    }
    let left = drain
        .saturating_sub(started.elapsed())
        .max(Duration::from_millis(100));
    emitter.flush(left).await?;
    tracing::info!("producer stopped");
    Ok(())
}

/// A request error, as JSON with the right status.
#[derive(Debug)]
pub enum ApiError {
    /// The body is not JSON.
    Malformed(String),
    /// A field is missing, unknown or invalid.
    Invalid {
        field: String,
        message: String,
    },
    TooLarge,
    NotFound(String),
    Unavailable {
        message: String,
        retry_after: Duration,
    },
    Internal(String),
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
            ApiError::Invalid { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn from_emit(error: &EmitError, retry_after: Duration) -> Self {
        match error {
            EmitError::UnknownBuild(_) => ApiError::NotFound(error.to_string()),
            EmitError::Unavailable(_) => ApiError::Unavailable {
                message: error.to_string(),
                retry_after,
            },
            EmitError::Rejected(_) => ApiError::Internal(error.to_string()),
            // The handlers answer skips with 200 before asking for an error; should one get
            // here, it still must not read as retryable.
            EmitError::Skipped { .. } => ApiError::Internal(error.to_string()),
        }
    }

    fn body(&self) -> Value {
        match self {
            ApiError::Invalid { field, message } => json!({ "error": message, "field": field }),
            ApiError::TooLarge => json!({ "error": "request body is over the configured limit" }),
            ApiError::Malformed(m) | ApiError::NotFound(m) | ApiError::Internal(m) => {
                json!({ "error": m })
            }
            ApiError::Unavailable { message, .. } => json!({ "error": message }),
        }
    }
}

fn retry_after_header(after: Duration) -> HeaderValue {
    HeaderValue::from(after.as_secs().max(1))
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status(), axum::Json(self.body())).into_response();
        if let ApiError::Unavailable { retry_after, .. } = &self {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, retry_after_header(*retry_after));
        }
        response
    }
}

/// A JSON body whose errors name the field: `422 {"field": "status", ...}` instead of axum's
/// plain-text rejection.
pub struct FieldJson<T>(pub T);

impl<S, T> FromRequest<S> for FieldJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::TooLarge
            } else {
                ApiError::Malformed(rejection.body_text())
            }
        })?;
        parse_json(&bytes).map(FieldJson)
    }
}

/// Deserialises `bytes`, naming the path of the field that failed.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => ApiError::Invalid {
                field: field_name(&path, &inner.to_string()),
                message: inner.to_string(),
            },
            _ => ApiError::Malformed(format!("malformed JSON: {inner}")),
        }
    })?;
    de.end()
        .map_err(|e| ApiError::Malformed(format!("malformed JSON: {e}")))?;
    Ok(value)
}

/// serde reports a missing field at its parent's path, with the name only in the message.
fn field_name(path: &str, message: &str) -> String {
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    match (path, missing) {
        (".", Some(name)) => name.to_owned(),
        (parent, Some(name)) => format!("{parent}.{name}"),
        (path, None) => path.to_owned(),
    }
}

/// One transition as the API takes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitionBody {
    pub build_id: i64,
    pub status: BuildStatus,
    #[serde(default)]
    pub occurred_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub event_id: Option<Uuid>,
    #[serde(default)]
    pub facts: Option<FactsBody>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FactsBody {
    #[serde(default)]
    pub started_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub finished_at: Option<DateTime<Utc>>,
    #[serde(default)]
    pub duration: Option<f64>,
    #[serde(default)]
    pub queued_duration: Option<f64>,
    #[serde(default)]
    pub failure_reason: Option<String>,
}

impl TransitionBody {
    /// Checks what serde cannot; `at` prefixes field names in a batch (`[3].`).
    fn into_request(self, at: &str) -> Result<TransitionRequest, ApiError> {
        let invalid = |field: &str, message: &str| ApiError::Invalid {
            field: format!("{at}{field}"),
            message: message.to_owned(),
        };
        if self.build_id <= 0 {
            return Err(invalid("build_id", "build_id must be a positive integer"));
        }
        let facts = match self.facts {
            None => None,
            Some(f) => {
                for (name, value) in [
                    ("facts.duration", f.duration),
                    ("facts.queued_duration", f.queued_duration),
                ] {
                    if value.is_some_and(|v| !v.is_finite() || v < 0.0) {
                        return Err(invalid(name, "durations are seconds, zero or more"));
                    }
                }
                if let (Some(start), Some(finish)) = (f.started_at, f.finished_at)
                    && finish < start
                {
                    return Err(invalid(
                        "facts.finished_at",
                        "finished_at is before started_at",
                    ));
                }
                Some(TransitionFacts {
                    started_at: f.started_at,
                    finished_at: f.finished_at,
                    duration: f.duration,
                    queued_duration: f.queued_duration,
                    failure_reason: f.failure_reason,
                })
            }
        };
        Ok(TransitionRequest {
            build_id: self.build_id,
            status: self.status,
            occurred_at: self.occurred_at,
            facts,
            event_id: self.event_id,
        })
    }
}

fn emitted_json(emitted: &Emitted) -> Value {
    json!({
        "event_id": emitted.event_id,
        "timing": emitted.timing.as_str(),
        "partition": emitted.partition,
        "offset": emitted.offset,
        "render_time_us": emitted.render_time.map(|d| d.as_micros() as u64),
        "payload_bytes": emitted.payload_bytes,
    })
}

fn skipped_json(build_id: i64, reason: SkipReason) -> Value {
    json!({
        "skipped": reason.as_str(),
        "build_id": build_id,
        "message": format!("no event emitted: {reason}; GitLab sends no hooks for it"),
    })
}

async fn transition(
    State(state): State<AppState>,
    FieldJson(body): FieldJson<TransitionBody>,
) -> Result<Response, ApiError> {
    let request = body.into_request("")?;
    match state.emitter.emit(request).await {
        Ok(emitted) => {
            Ok((StatusCode::ACCEPTED, axum::Json(emitted_json(&emitted))).into_response())
        }
        Err(EmitError::Skipped { build_id, reason }) => {
            Ok((StatusCode::OK, axum::Json(skipped_json(build_id, reason))).into_response())
        }
        Err(error) => Err(ApiError::from_emit(&error, state.retry_after)),
    }
}

async fn batch(
    State(state): State<AppState>,
    FieldJson(bodies): FieldJson<Vec<TransitionBody>>,
) -> Result<Response, ApiError> {
    if bodies.is_empty() || bodies.len() > state.batch_limit {
        return Err(ApiError::Invalid {
            field: "".into(),
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
            Ok(emitted) => {
                accepted += 1;
                let mut item = emitted_json(emitted);
                item["status"] = json!(202);
                item
            }
            Err(EmitError::Skipped { build_id, reason }) => {
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

async fn ready(State(state): State<AppState>) -> Response {
    match state.emitter.check_ready().await {
        Ok(()) => (StatusCode::OK, "ready").into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}"),
        )
            .into_response(),
    }
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
        let mut config = EmitterConfig::new("127.0.0.1:9");
        config.delivery_timeout = Duration::from_millis(300);
        let emitter = Emitter::new(
            config,
            store,
            Flags::in_memory(),
            Arc::new(ProducerMetrics::new()),
        )
        .await
        .unwrap();
        app(AppState {
            body_limit,
            ..AppState::new(emitter)
        })
    }

    async fn post(app: Router, path: &str, body: impl Into<Body>) -> (StatusCode, Value) {
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(body.into())
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
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
        assert!(
            !text.contains("hookline_producer_produce_errors_total{"),
            "{text}"
        );
        assert!(
            !text.contains("hookline_producer_flag_evaluations_total{"),
            "{text}"
        );
    }
}
