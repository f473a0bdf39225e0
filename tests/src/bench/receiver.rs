//! The benchmark's webhook receiver: a real HTTP server on loopback that answers 200 at once and
//! books each request's arrival time and `X-Gitlab-Event-UUID` (absent for the bare loop's
//! POSTs). It does one short lock per request and keeps no bodies, so it is cheap next to what it
//! measures, also for a million requests.
//!
//! Rates and "everything arrived" count *events*, not requests: at-least-once may deliver an
//! event twice, and a consumer that repeated some events while losing others must not reach the
//! expected count or look faster for it ([`first_arrivals`], [`BenchReceiver::distinct`]).

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

/// What the receiver booked since the last [`BenchReceiver::clear`].
#[derive(Debug, Default)]
struct Book {
    arrivals: Vec<Arrival>,
    /// Events seen, so repeats are known as they come.
    events: std::collections::HashSet<Uuid>,
    /// Arrivals that were not a repeat of an event.
    distinct: usize,
}

/// The running receiver.
#[derive(Debug)]
pub struct BenchReceiver {
    /// The hook URL: `http://127.0.0.1:<port>/hook`.
    pub url: String,
    book: Arc<Mutex<Book>>,
    /// Requests answered by the slow route (`/slow/<ms>`), which are not booked as arrivals.
    slow: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl BenchReceiver {
    pub async fn start() -> std::io::Result<BenchReceiver> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/hook", listener.local_addr()?);
        let book = Arc::new(Mutex::new(Book {
            arrivals: Vec::with_capacity(1 << 16),
            ..Book::default()
        }));
        let slow = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let app = Router::new()
            .route("/hook", post(receive))
            .with_state(book.clone())
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
            book,
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

    /// Requests received so far (repeats included).
    pub fn count(&self) -> usize {
        self.lock().arrivals.len()
    }

    /// Distinct deliveries so far: distinct events, plus every request without an event id (the
    /// bare loop's, one per record).
    pub fn distinct(&self) -> usize {
        self.lock().distinct
    }

    /// The arrivals from index `from` on.
    pub fn since(&self, from: usize) -> Vec<Arrival> {
        self.lock().arrivals[from..].to_vec()
    }

    /// Forgets every arrival (between measurements, so a million of them are not kept).
    pub fn clear(&self) {
        let mut book = self.lock();
        book.arrivals.clear();
        book.arrivals.shrink_to(1 << 16);
        book.events = Default::default();
        book.distinct = 0;
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Book> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for BenchReceiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn receive(
    State(book): State<Arc<Mutex<Book>>>,
    headers: HeaderMap,
    _body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let event = headers
        .get("x-gitlab-event-uuid")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    let mut book = book.lock().unwrap_or_else(|e| e.into_inner());
    if event.is_none_or(|e| book.events.insert(e)) {
        book.distinct += 1;
    }
    book.arrivals.push(Arrival { at, event });
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

/// The first arrival of each event, in arrival order (requests without an event id are all
/// kept); and how many repeats were left out.
pub fn first_arrivals(arrivals: &[Arrival]) -> (Vec<Arrival>, usize) {
    let mut events = std::collections::HashSet::with_capacity(arrivals.len());
    let first: Vec<Arrival> = arrivals
        .iter()
        .filter(|a| a.event.is_none_or(|e| events.insert(e)))
        .copied()
        .collect();
    let repeats = arrivals.len() - first.len();
    (first, repeats)
}

/// Distinct deliveries per second over `arrivals` ([`first_arrivals`]), from the first to the
/// last.
pub fn rate(arrivals: &[Arrival]) -> f64 {
    let (arrivals, _) = first_arrivals(arrivals);
    let arrivals = &arrivals[..];
    match (arrivals.first(), arrivals.last()) {
        (Some(first), Some(last)) if arrivals.len() > 1 => {
            (arrivals.len() - 1) as f64 / (last.at - first.at).as_secs_f64().max(1e-9)
        }
        _ => 0.0,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_repeated_event_counts_once_and_does_not_raise_the_rate() {
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let arrivals = [
            Arrival {
                at: at(0),
                event: Some(a),
            },
            Arrival {
                at: at(500),
                event: Some(a),
            },
            Arrival {
                at: at(1000),
                event: Some(b),
            },
            Arrival {
                at: at(1000),
                event: Some(b),
            },
        ];
        let (first, repeats) = first_arrivals(&arrivals);
        assert_eq!((first.len(), repeats), (2, 2));
        // Two distinct events a second apart: 1/s, not the 3/s the four requests would give.
        assert!((rate(&arrivals) - 1.0).abs() < 1e-9, "{}", rate(&arrivals));
        let bare = [
            Arrival {
                at: at(0),
                event: None,
            },
            Arrival {
                at: at(1000),
                event: None,
            },
        ];
        assert_eq!(first_arrivals(&bare).0.len(), 2);
    }
}
