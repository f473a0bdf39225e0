//! Webhook receivers: the demo's, which feeds every delivery to the [`Ledger`], and the sample
//! receiver of the compose stack (`hookline receiver`), which logs what it gets.
//!
//! Both are real HTTP servers (axum), so the consumer's real HTTP path, headers and signing are
//! what is measured. Both verify Standard Webhooks signatures with the consumer's own
//! `hookline_consumer::sign::verify`, which is pinned to the specification's reference vector.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use chrono::Utc;
use hookline_consumer::sign::{SigningSecret, verify};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::error::CliError;
use crate::ledger::{Delivery, Ledger, SignatureCheck, Verdict};

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// Checks the Standard Webhooks headers of a delivery against the hook's secret.
pub fn check_signature(
    secret: Option<&SigningSecret>,
    headers: &HeaderMap,
    body: &[u8],
) -> SignatureCheck {
    let Some(secret) = secret else {
        return SignatureCheck::NotSigned;
    };
    let (Some(id), Some(ts), Some(sig)) = (
        header(headers, "webhook-id"),
        header(headers, "webhook-timestamp"),
        header(headers, "webhook-signature"),
    ) else {
        return SignatureCheck::Invalid;
    };
    match verify(secret, id, ts, sig, body, Utc::now().timestamp()) {
        Ok(()) => SignatureCheck::Valid,
        Err(_) => SignatureCheck::Invalid,
    }
}

#[derive(Clone)]
struct LedgerState {
    ledger: Arc<Ledger>,
    secrets: Arc<HashMap<i64, SigningSecret>>,
    warmup: Arc<Notify>,
}

/// The demo's receiver: `POST /hooks/{endpoint}` records the delivery for that endpoint;
/// `POST /warmup` only says that the pipeline delivers (the demo waits for it before it starts).
fn ledger_app(state: LedgerState) -> Router {
    Router::new()
        .route("/hooks/{endpoint}", post(receive_for_ledger))
        .route(
            "/warmup",
            post(|State(state): State<LedgerState>| async move {
                state.warmup.notify_one();
                StatusCode::OK
            }),
        )
        .with_state(state)
}

async fn receive_for_ledger(
    State(state): State<LedgerState>,
    Path(endpoint): Path<i64>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    if state
        .ledger
        .refuses(endpoint, header(&headers, "idempotency-key"))
    {
        // A first attempt picked to fail (`--receiver-failure-percent`): not a delivery.
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let signature = check_signature(state.secrets.get(&endpoint), &headers, &body);
    let event_id = header(&headers, "x-gitlab-event-uuid").and_then(|v| Uuid::parse_str(v).ok());
    let verdict = state.ledger.record(Delivery {
        hook_id: endpoint,
        event_id,
        idempotency_key: header(&headers, "idempotency-key").map(str::to_owned),
        signature,
        body: body.to_vec(),
        received_at: Utc::now(),
    });
    if verdict == Verdict::Unexpected {
        tracing::warn!(endpoint, event_id = ?event_id, "delivery for no known event and hook");
    }
    StatusCode::OK
}

/// Starts the demo receiver on 127.0.0.1 and a free port; returns its base URL. Endpoint URLs
/// are `{base}/hooks/{endpoint}`; a delivery to `{base}/warmup` notifies `warmup`.
pub async fn serve_ledger(
    ledger: Arc<Ledger>,
    secrets: HashMap<i64, SigningSecret>,
    warmup: Arc<Notify>,
    shutdown: CancellationToken,
) -> Result<String, CliError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| CliError::Unavailable(format!("binding the demo receiver: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| CliError::Unavailable(e.to_string()))?;
    let app = ledger_app(LedgerState {
        ledger,
        secrets: Arc::new(secrets),
        warmup,
    });
    tokio::spawn(async move {
        if let Err(error) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(%error, "demo receiver stopped");
        }
    });
    Ok(format!("http://{addr}"))
}

/// Options of the sample receiver.
#[derive(Debug, Clone)]
pub struct SampleConfig {
    pub listen: SocketAddr,
    /// `whsec_...`: verify signatures with it.
    pub secret: Option<String>,
    /// The listener's limits (the same server as the services').
    pub limits: hookline_shell::server::Limits,
}

/// What the sample receiver has seen, served at `GET /stats`.
#[derive(Debug, Default, Clone, Serialize)]
pub struct SampleStats {
    pub deliveries: u64,
    pub bad_signatures: u64,
    pub unsigned: u64,
    pub not_json: u64,
    pub by_status: BTreeMap<String, u64>,
}

#[derive(Clone)]
struct SampleState {
    secret: Option<Arc<SigningSecret>>,
    stats: Arc<Mutex<SampleStats>>,
}

fn sample_app(state: SampleState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/stats", get(sample_stats))
        .fallback(post(receive_sample))
        .with_state(state)
}

async fn sample_stats(State(state): State<SampleState>) -> axum::Json<SampleStats> {
    axum::Json(
        state
            .stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone(),
    )
}

async fn receive_sample(
    State(state): State<SampleState>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let signature = check_signature(state.secret.as_deref(), &headers, &body);
    let parsed: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let field = |name: &str| parsed.as_ref().and_then(|v| v.get(name)).cloned();
    let build_status = field("build_status")
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_else(|| "?".into());
    {
        let mut stats = state.stats.lock().unwrap_or_else(|p| p.into_inner());
        stats.deliveries += 1;
        stats.bad_signatures += u64::from(signature == SignatureCheck::Invalid);
        stats.unsigned += u64::from(signature == SignatureCheck::NotSigned);
        stats.not_json += u64::from(parsed.is_none());
        *stats.by_status.entry(build_status.clone()).or_default() += 1;
    }
    tracing::info!(
        event = header(&headers, "x-gitlab-event").unwrap_or("-"),
        event_uuid = header(&headers, "x-gitlab-event-uuid").unwrap_or("-"),
        idempotency_key = header(&headers, "idempotency-key").unwrap_or("-"),
        build_id = field("build_id").and_then(|v| v.as_i64()),
        project_id = field("project_id").and_then(|v| v.as_i64()),
        build_status,
        signature = ?signature,
        bytes = body.len(),
        "delivery received"
    );
    match signature {
        // A receiver refuses what it cannot authenticate; the consumer will retry it, and the
        // log says why.
        SignatureCheck::Invalid => StatusCode::UNAUTHORIZED,
        _ => StatusCode::OK,
    }
}

/// Runs the sample receiver until `shutdown`.
pub async fn run_sample(config: SampleConfig, shutdown: CancellationToken) -> Result<(), CliError> {
    let secret = config
        .secret
        .as_deref()
        .map(SigningSecret::parse)
        .transpose()
        .map_err(|e| CliError::Usage(format!("--secret: {e}")))?
        .map(Arc::new);
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| CliError::Unavailable(format!("binding {}: {e}", config.listen)))?;
    tracing::info!(listen = %config.listen, verifies_signatures = secret.is_some(), "sample receiver listening");
    let app = sample_app(SampleState {
        secret,
        stats: Arc::default(),
    });
    hookline_shell::server::serve(listener, app, config.limits, shutdown)
        .await
        .map_err(|e| CliError::Unavailable(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_consumer::sign::sign;

    const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

    fn signed(body: &[u8], secret: &str) -> HeaderMap {
        let key = SigningSecret::parse(secret).unwrap();
        let ts = Utc::now().timestamp();
        let mut h = HeaderMap::new();
        h.insert("webhook-id", "msg_1".parse().unwrap());
        h.insert("webhook-timestamp", ts.to_string().parse().unwrap());
        h.insert(
            "webhook-signature",
            sign(&key, "msg_1", ts, body).parse().unwrap(),
        );
        h
    }

    #[test]
    fn a_signature_verifies_only_with_the_right_secret_and_body() {
        let key = SigningSecret::parse(SECRET).unwrap();
        let headers = signed(b"{}", SECRET);
        assert_eq!(
            check_signature(Some(&key), &headers, b"{}"),
            SignatureCheck::Valid
        );
        assert_eq!(
            check_signature(Some(&key), &headers, b"{ }"),
            SignatureCheck::Invalid
        );
        let other = signed(b"{}", "whsec_b3RoZXI=");
        assert_eq!(
            check_signature(Some(&key), &other, b"{}"),
            SignatureCheck::Invalid
        );
        assert_eq!(
            check_signature(Some(&key), &HeaderMap::new(), b"{}"),
            SignatureCheck::Invalid
        );
        assert_eq!(
            check_signature(None, &headers, b"{}"),
            SignatureCheck::NotSigned
        );
    }
}
