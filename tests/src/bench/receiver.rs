//! The benchmark's webhook receiver: a real HTTP server on loopback that answers 200 at once and
//! books each request's arrival time and `X-Gitlab-Event-UUID` (absent for the bare loop's
//! POSTs). It does one short lock per request and keeps no bodies, so it is cheap next to what it
//! measures, also for a million requests.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One request: when it arrived and which event it carried.
#[derive(Debug, Clone, Copy)]
pub struct Arrival {
    pub at: Instant,
    pub event: Option<Uuid>,
}

/// The running receiver.
#[derive(Debug)]
pub struct BenchReceiver {
    /// The hook URL: `http://127.0.0.1:<port>/hook`.
    pub url: String,
    arrivals: Arc<Mutex<Vec<Arrival>>>,
    /// Requests answered by the slow route (`/slow/<ms>`), which are not booked as arrivals.
    slow: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl BenchReceiver {
    pub async fn start() -> std::io::Result<BenchReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let arrivals = Arc::new(Mutex::new(Vec::with_capacity(1 << 16)));
        let slow = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(arrivals.clone())
            .merge(
                Router::new()
                    .route("/slow/{ms}", post(receive_slowly))
                    .with_state(slow.clone()),
            );
        let cancelled = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(cancelled.cancelled_owned())
                .await
                .ok();
        });
        Ok(BenchReceiver {
            url,
            arrivals,
            slow,
            stop,
        })
    }

    /// A hook URL whose requests are answered 200 after `delay` (a slow but healthy receiver),
    /// counted in [`BenchReceiver::slow_count`] and not booked as arrivals.
    pub fn slow_url(&self, delay: std::time::Duration) -> String {
        let base = self.url.trim_end_matches("/hook");
        format!("{base}/slow/{}", delay.as_millis())
    }

    /// Requests the slow route has answered so far.
    pub fn slow_count(&self) -> usize {
        self.slow.load(Ordering::Relaxed)
    }

    /// Requests received so far.
    pub fn count(&self) -> usize {
        self.lock().len()
    }

    /// The arrivals from index `from` on.
    pub fn since(&self, from: usize) -> Vec<Arrival> {
        self.lock()[from..].to_vec()
    }

    /// Forgets every arrival (between measurements, so a million of them are not kept).
    pub fn clear(&self) {
        let mut arrivals = self.lock();
        arrivals.clear();
        arrivals.shrink_to(1 << 16);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arrival>> {
        self.arrivals.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for BenchReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn receive(
    State(arrivals): State<Arc<Mutex<Vec<Arrival>>>>,
    headers: HeaderMap,
    _body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let event = headers
        .get("x-gitlab-event-uuid")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    arrivals
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Arrival { at, event });
    StatusCode::OK
}

async fn receive_slowly(
    State(slow): State<Arc<AtomicUsize>>,
    Path(ms): Path<u64>,
    _body: Bytes,
) -> StatusCode {
    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    slow.fetch_add(1, Ordering::Relaxed);
    StatusCode::OK
}

/// Deliveries per second over `arrivals`, from the first to the last.
pub fn rate(arrivals: &[Arrival]) -> f64 {
    match (arrivals.first(), arrivals.last()) {
        (Some(first), Some(last)) if arrivals.len() > 1 => {
            (arrivals.len() - 1) as f64 / (last.at - first.at).as_secs_f64().max(1e-9)
        }
        _ => 0.0,
    }
}
