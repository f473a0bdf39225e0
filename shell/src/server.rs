//! The one HTTP/1.1 server under every hookline listener (the producer's API, the relay's
//! probes, the consumer's metrics, probes and hooks API): a connection cap and the timeouts
//! that keep silent, slow or idle clients from holding connections.
//!
//! ```text
//! accept (at most max_connections at once; when all are taken, the connection idle longest
//!        is closed to make room, sparing those just accepted, or the next client waits in the
//!        listen backlog)
//!   -> new: no byte yet                dropped after first_byte_timeout (short: nobody is served yet)
//!   -> first byte of a request's head  dropped if the head is not complete within header_timeout
//!   -> request handed to the router    its body must arrive within body_timeout (else 408, closed)
//!   -> response written                kept alive: closed gracefully after idle_timeout without
//!                                      the next request's first byte
//! ```
//!
//! hyper's own `header_read_timeout` starts when a connection begins waiting for a request, so
//! it would also bound keep-alive idleness, with one number for several things. Here a small
//! wrapper around the socket notes when request bytes arrive, and a per-connection watcher
//! tells the phases apart. A handler that panics answers 500 and the server goes on. HTTP/2 is
//! not served: the clients are CI systems posting JSON, scrapers and probes.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderValue, Request, Response, StatusCode, header};
use bytes::Bytes;
use futures::FutureExt;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::parse_duration;
use crate::supervise::panic_message;

/// The limits on a listener's client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// From the accept to the first byte of the first request.
    pub first_byte_timeout: Duration,
    /// From a request's first byte to the end of its head (request line and headers).
    pub header_timeout: Duration,
    /// From the end of a request's head to the end of its body.
    pub body_timeout: Duration,
    /// From the end of a response to the next request's first byte.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            first_byte_timeout: Duration::from_secs(5),
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// Refuses a limit that would turn a bound off (zero).
    pub fn validate(&self) -> Result<(), String> {
        let zero = [
            ("--max-connections", self.max_connections == 0),
            ("--first-byte-timeout", self.first_byte_timeout.is_zero()),
            ("--header-timeout", self.header_timeout.is_zero()),
            ("--body-timeout", self.body_timeout.is_zero()),
            ("--idle-timeout", self.idle_timeout.is_zero()),
        ];
        match zero.iter().find(|(_, zero)| *zero) {
            Some((flag, _)) => Err(format!(
                "{flag} must be above 0: it bounds what a client can hold on this listener"
            )),
            None => Ok(()),
        }
    }
}

/// The listener's limits as options: the same flags and `HOOKLINE_*` variables on every service
/// (`hookline-producer serve`, `hookline-producer relay`, `hookline-consumer serve`).
#[derive(clap::Args, Debug, Clone)]
pub struct ListenerArgs {
    /// Most client connections served at once on the listener. When all are taken, the
    /// connection idle longest is closed to make room; with none idle, new clients wait in the
    /// listen backlog.
    #[arg(long, env = "HOOKLINE_MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,
    /// How long a new connection may take to send the first byte of its first request; then it
    /// is closed (short: a connection that says nothing holds a slot for nothing).
    #[arg(long, env = "HOOKLINE_FIRST_BYTE_TIMEOUT", default_value = "5s", value_parser = parse_duration)]
    pub first_byte_timeout: Duration,
    /// How long a client may take to send a request's head (request line and headers) once its
    /// first byte came; then the connection is closed.
    #[arg(long, env = "HOOKLINE_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub header_timeout: Duration,
    /// How long a client may take to send a whole request body after its head; then 408 and the
    /// connection is closed.
    #[arg(long, env = "HOOKLINE_BODY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub body_timeout: Duration,
    /// How long a kept-alive connection may stay idle between requests before it is closed.
    #[arg(long, env = "HOOKLINE_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
}

impl ListenerArgs {
    /// The limits, checked.
    pub fn limits(&self) -> Result<Limits, String> {
        let limits = Limits {
            max_connections: self.max_connections,
            first_byte_timeout: self.first_byte_timeout,
            header_timeout: self.header_timeout,
            body_timeout: self.body_timeout,
            idle_timeout: self.idle_timeout,
        };
        limits.validate()?;
        Ok(limits)
    }
}

/// Serves `router` on `listener` within `limits` until `shutdown`; then stops accepting, closes
/// idle connections and waits for in-flight requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let open = Arc::new(Open::default());
    let connections = TaskTracker::new();
    // How long a new connection is spared when room is made: enough to get its request in.
    let grace =
        (limits.first_byte_timeout / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    'accept: loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(100)) => continue,
                        _ = shutdown.cancelled() => break 'accept,
                    }
                }
            },
            _ = shutdown.cancelled() => break 'accept,
        };
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => permit,
            // Every slot is taken: a connection with no request in progress makes room (the one
            // idle longest), so clients that say nothing cannot lock out one that has a
            // request. A connection younger than the grace is spared (its request may be on
            // its way), and with none to spare this one waits, looking again every grace.
            Err(_) => loop {
                if open.evict_idlest(grace) {
                    tracing::debug!(%peer, "connection limit reached: the connection idle longest was closed to make room");
                }
                tokio::select! {
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => break permit,
                        Err(_) => break 'accept,
                    },
                    _ = tokio::time::sleep(grace) => {}
                    _ = shutdown.cancelled() => break 'accept,
                }
            },
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        let (id, activity) = open.insert();
        let open = open.clone();
        connections.spawn(async move {
            connection(stream, router, limits, activity, shutdown).await;
            open.remove(id);
            tracing::trace!(%peer, "connection closed");
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// The open connections, so that one can be closed to make room when all slots are taken.
#[derive(Debug, Default)]
struct Open {
    connections: Mutex<(u64, HashMap<u64, Arc<Activity>>)>,
}

impl Open {
    fn lock(&self) -> std::sync::MutexGuard<'_, (u64, HashMap<u64, Arc<Activity>>)> {
        self.connections.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert(&self) -> (u64, Arc<Activity>) {
        let activity = Arc::new(Activity::new());
        let mut open = self.lock();
        open.0 += 1;
        let id = open.0;
        open.1.insert(id, activity.clone());
        (id, activity)
    }

    fn remove(&self, id: u64) {
        self.lock().1.remove(&id);
    }

    /// Asks the connection idle longest (no request being handled, idle at least `spared`) to
    /// close; false when there is none.
    fn evict_idlest(&self, spared: Duration) -> bool {
        let open = self.lock();
        let idlest = open
            .1
            .values()
            .filter(|a| a.in_flight.load(Ordering::Acquire) == 0 && !a.evict.is_cancelled())
            .map(|a| (a.times().idle_since, a))
            .filter(|(since, _)| since.elapsed() >= spared)
            .min_by_key(|(since, _)| *since)
            .map(|(_, a)| a);
        match idlest {
            Some(activity) => {
                activity.evict.cancel();
                true
            }
            None => false,
        }
    }
}

/// What the watcher knows about one connection.
#[derive(Debug)]
struct Activity {
    /// Requests handed to the router and not answered yet.
    in_flight: AtomicUsize,
    times: Mutex<Times>,
    /// Cancelled to close the connection to make room for another.
    evict: CancellationToken,
}

#[derive(Debug, Clone, Copy)]
struct Times {
    /// When the connection last became idle (accepted, or a response finished).
    idle_since: Instant,
    /// The first byte read since then: a request's head is arriving.
    first_byte: Option<Instant>,
    /// A request was answered on this connection: it is kept alive, not new.
    served: bool,
}

impl Activity {
    fn new() -> Self {
        Self {
            in_flight: AtomicUsize::new(0),
            times: Mutex::new(Times {
                idle_since: Instant::now(),
                first_byte: None,
                served: false,
            }),
            evict: CancellationToken::new(),
        }
    }

    fn times(&self) -> std::sync::MutexGuard<'_, Times> {
        self.times.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn read_some(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            let mut times = self.times();
            times.first_byte.get_or_insert_with(Instant::now);
        }
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }
}

/// A request being handled; idle again when the last one is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        if self.0.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.times() = Times {
                idle_since: Instant::now(),
                first_byte: None,
                served: true,
            };
        }
    }
}

/// The socket, noting when bytes arrive.
struct Watched {
    stream: TcpStream,
    activity: Arc<Activity>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.stream).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// A request body that must end within the body timeout: past it, reading fails and the
/// server answers 408 whatever the handler made of the failure.
struct TimedBody {
    inner: Incoming,
    deadline: Pin<Box<Sleep>>,
    expired: Arc<AtomicBool>,
}

impl http_body::Body for TimedBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        if self.deadline.as_mut().poll(cx).is_ready() {
            self.expired.store(true, Ordering::Release);
            return Poll::Ready(Some(Err("the request body did not arrive in time".into())));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        http_body::Body::is_end_stream(&self.inner)
    }

    fn size_hint(&self) -> SizeHint {
        http_body::Body::size_hint(&self.inner)
    }
}

fn json_answer(status: StatusCode, message: &str) -> Response<Body> {
    let body = serde_json::json!({ "error": message }).to_string();
    let mut response = Response::new(Body::from(body));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// 408 for a body that did not arrive in time; the connection is closed after it (the rest of
/// the body may still be on its way, or never come).
fn body_timeout_answer(limit: Duration) -> Response<Body> {
    let mut response = json_answer(
        StatusCode::REQUEST_TIMEOUT,
        &format!("the request body did not arrive within {limit:?} (--body-timeout)"),
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

/// Why the watcher ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// A new connection sent nothing within the first-byte timeout: drop it.
    Silent,
    /// A request's head did not complete in time: drop the connection.
    Headers,
    /// No request began within the idle timeout: close once nothing is in flight.
    Idle,
    /// Closed to make room for another connection.
    Evicted,
}

/// Returns when the connection overstays one of its timeouts, or is asked to make room.
async fn watch(activity: &Activity, limits: Limits, closing: bool) -> Expired {
    // Checks a few times per timeout: cutting a slow client a little late is harmless.
    let shortest = limits
        .first_byte_timeout
        .min(limits.header_timeout)
        .min(limits.idle_timeout);
    let tick = (shortest / 4).clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(tick) => {}
            _ = activity.evict.cancelled(), if !closing => return Expired::Evicted,
        }
        if activity.in_flight.load(Ordering::Acquire) > 0 {
            continue;
        }
        let times = *activity.times();
        match times.first_byte {
            Some(first) if first.elapsed() >= limits.header_timeout => return Expired::Headers,
            None if !times.served && times.idle_since.elapsed() >= limits.first_byte_timeout => {
                return Expired::Silent;
            }
            None if times.served && times.idle_since.elapsed() >= limits.idle_timeout => {
                return Expired::Idle;
            }
            _ => {}
        }
    }
}

async fn connection(
    stream: TcpStream,
    router: Router,
    limits: Limits,
    activity: Arc<Activity>,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let tracked = activity.clone();
    let router = TowerToHyperService::new(router);
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let handling = tracked.begin();
        let expired = Arc::new(AtomicBool::new(false));
        let request = request.map(|inner| TimedBody {
            inner,
            deadline: Box::pin(tokio::time::sleep(limits.body_timeout)),
            expired: expired.clone(),
        });
        let call = hyper::service::Service::call(&router, request);
        async move {
            let answered = AssertUnwindSafe(call).catch_unwind().await;
            drop(handling);
            let response = match answered {
                Ok(Ok(response)) => response,
                Ok(Err(never)) => match never {},
                Err(panic) => {
                    let what = panic_message(panic.as_ref());
                    tracing::error!(panic = %what, "request handler panicked; answered 500");
                    json_answer(StatusCode::INTERNAL_SERVER_ERROR, "internal error")
                }
            };
            if expired.load(Ordering::Acquire) {
                tracing::debug!(timeout = ?limits.body_timeout, "request body too slow; 408 and the connection is closed");
                return Ok::<_, Infallible>(body_timeout_answer(limits.body_timeout));
            }
            Ok(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        // The watcher bounds the head; hyper's own timer would also cut kept-alive connections
        // at its 30 s default, whatever --header-timeout says.
        .header_read_timeout(None)
        .keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    // Set once the connection was asked to close gracefully: a client that does not read its
    // last response gets one more idle timeout, then the connection is dropped.
    let mut closing: Option<Instant> = None;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            expired = watch(&activity, limits, closing.is_some()) => match expired {
                Expired::Silent => {
                    tracing::debug!(timeout = ?limits.first_byte_timeout, "connection sent nothing; dropped");
                    return;
                }
                Expired::Headers => {
                    tracing::debug!(timeout = ?limits.header_timeout, "request head too slow; connection dropped");
                    return;
                }
                Expired::Evicted if activity.in_flight.load(Ordering::Acquire) == 0 => return,
                Expired::Evicted | Expired::Idle => match closing {
                    None => {
                        conn.as_mut().graceful_shutdown();
                        closing = Some(Instant::now());
                    }
                    Some(since) if since.elapsed() >= limits.idle_timeout => return,
                    Some(_) => {}
                },
            },
            _ = shutdown.cancelled(), if closing.is_none() => {
                conn.as_mut().graceful_shutdown();
                closing = Some(Instant::now());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_limit_is_refused_by_its_flag() {
        assert!(Limits::default().validate().is_ok());
        let limits = Limits {
            first_byte_timeout: Duration::ZERO,
            ..Limits::default()
        };
        let error = limits.validate().unwrap_err();
        assert!(error.starts_with("--first-byte-timeout"), "{error}");
        let limits = Limits {
            max_connections: 0,
            ..Limits::default()
        };
        assert!(
            limits
                .validate()
                .unwrap_err()
                .starts_with("--max-connections")
        );
    }

    #[test]
    fn the_idlest_connection_without_a_request_is_evicted() {
        let open = Open::default();
        let (_, oldest) = open.insert();
        let (_, busy) = open.insert();
        let (_, newest) = open.insert();
        {
            let mut times = busy.times();
            times.idle_since -= Duration::from_secs(60);
        }
        let _request = busy.begin();
        {
            let mut times = oldest.times();
            times.idle_since -= Duration::from_secs(30);
        }
        assert!(
            !open.evict_idlest(Duration::from_secs(45)),
            "none idle that long"
        );
        assert!(open.evict_idlest(Duration::ZERO));
        assert!(oldest.evict.is_cancelled());
        assert!(
            !busy.evict.is_cancelled(),
            "a connection handling a request stays"
        );
        assert!(open.evict_idlest(Duration::ZERO));
        assert!(newest.evict.is_cancelled());
        assert!(
            !open.evict_idlest(Duration::ZERO),
            "only a busy connection is left"
        );
    }
}
