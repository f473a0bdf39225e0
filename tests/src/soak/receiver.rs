//! The soak's webhook receiver: a real HTTP server on loopback that books every request in the
//! [`Ledger`] by `X-Gitlab-Event-UUID`, hook (its path, `/h/<slot>`) and `Idempotency-Key`, and
//! answers 503 for the outage's hooks while the outage is on.
//!
//! Like a careful receiver it reads what it gets: it verifies the Standard Webhooks signature
//! with its hook's secret and reads the Job Hook's `build_id` and `build_status`, which the
//! ledger holds against the transition planned under that event id.
//!
//! It does as little else as it can per request (one short lock), so it is never the
//! bottleneck the soak measures.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use hookline_consumer::sign::{SigningSecret, verify};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::ledger::{Ledger, Slot};

/// The signing secret of hook `slot`: neighbouring hooks have different ones, so a body signed
/// with another hook's secret fails.
pub fn secret_of(slot: Slot) -> &'static str {
    const SECRETS: [&str; 2] = [
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "whsec_91j9x4vuGSou/ey3NTUtYgiElD3Y9Djp",
    ];
    SECRETS[slot as usize % SECRETS.len()]
}

/// What the receiver and the driver share.
#[derive(Debug)]
pub struct Books {
    pub ledger: Mutex<Ledger>,
    /// On while the outage lasts.
    pub outage: AtomicBool,
    /// Which hooks the outage refuses.
    pub outage_slots: Vec<bool>,
    /// The disruption in force (0 before the first): duplicates are attributed to it.
    pub epoch: AtomicUsize,
    /// The signing secrets, by slot ([`secret_of`]).
    secrets: Vec<SigningSecret>,
}

impl Books {
    pub fn new(ledger: Ledger, outage_slots: Vec<bool>) -> Books {
        Books {
            ledger: Mutex::new(ledger),
            outage: AtomicBool::new(false),
            secrets: (0..outage_slots.len() as Slot)
                .map(|slot| SigningSecret::parse(secret_of(slot)).expect("a valid whsec_ secret"))
                .collect(),
            outage_slots,
            epoch: AtomicUsize::new(0),
        }
    }

    pub fn ledger(&self) -> std::sync::MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn refuses(&self, slot: Slot) -> bool {
        self.outage.load(Ordering::Relaxed)
            && self
                .outage_slots
                .get(slot as usize)
                .copied()
                .unwrap_or(false)
    }
}

/// The running receiver.
#[derive(Debug)]
pub struct SoakReceiver {
    /// `http://127.0.0.1:<port>`; hook `slot` is `<base>/h/<slot>`.
    pub base: String,
    stop: CancellationToken,
}

impl SoakReceiver {
    pub async fn start(books: Arc<Books>) -> std::io::Result<SoakReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/h/{slot}", post(receive))
            .with_state(books);
        let cancelled = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(cancelled.cancelled_owned())
                .await
                .ok();
        });
        Ok(SoakReceiver { base, stop })
    }

    pub fn hook_url(&self, slot: Slot) -> String {
        format!("{}/h/{slot}", self.base)
    }
}

impl Drop for SoakReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn uuid_header(headers: &HeaderMap, name: &str) -> Option<Uuid> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| Uuid::parse_str(v.trim()).ok())
}

/// The Job Hook fields the soak checks.
#[derive(serde::Deserialize)]
struct JobFacts {
    build_id: i64,
    build_status: String,
}

fn signed(books: &Books, slot: Slot, headers: &HeaderMap, body: &[u8]) -> bool {
    let text = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(secret), Some(id), Some(timestamp), Some(signature)) = (
        books.secrets.get(slot as usize),
        text("webhook-id"),
        text("webhook-timestamp"),
        text("webhook-signature"),
    ) else {
        return false;
    };
    let now = chrono::Utc::now().timestamp();
    verify(secret, id, timestamp, signature, body, now).is_ok()
}

async fn receive(
    State(books): State<Arc<Books>>,
    Path(slot): Path<Slot>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let Some(event) = uuid_header(&headers, "x-gitlab-event-uuid") else {
        books.ledger().unreadable();
        return StatusCode::BAD_REQUEST;
    };
    let key = uuid_header(&headers, "idempotency-key");
    let signed = signed(&books, slot, &headers, &body);
    let facts: Option<JobFacts> = serde_json::from_slice(&body).ok();
    let refuse = books.refuses(slot);
    let epoch = books.epoch.load(Ordering::Relaxed);
    books.ledger().request(
        event,
        slot,
        key,
        !refuse,
        epoch,
        facts
            .as_ref()
            .map(|f| (f.build_id, f.build_status.as_str())),
        signed,
    );
    if refuse {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    }
}
