//! The HTTP/1.1 server under the API: a connection limit and the timeouts that keep slow or
//! idle clients from holding connections.
//!
//! ```text
//! accept (at most max_connections at once; more wait in the listen backlog)
//!   -> idle: no request byte yet          closed gracefully after idle_timeout
//!   -> first byte of a request's headers  dropped if the headers are not complete within header_timeout
//!   -> request being handled              the body must arrive within body_timeout (408, in ingest.rs)
//!   -> response written                   idle again (keep-alive)
//! ```
//!
//! hyper's own `header_read_timeout` starts when a connection begins waiting for a request, so
//! it would also bound keep-alive idleness, with one number for two things. Here a small wrapper
//! around the socket notes when request bytes arrive, and a per-connection watcher tells the
//! two phases apart. HTTP/2 is not served: the API's clients are CI systems posting JSON.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The limits on client connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From a request's first byte to the end of its headers.
    pub header_timeout: Duration,
    /// From the end of a response (or the accept) to the next request's first byte.
    pub idle_timeout: Duration,
    /// Connections served at once.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
        }
    }
}

/// Serves `router` on `listener` until `shutdown`; then stops accepting, closes idle
/// connections and waits for in-flight requests (the caller bounds that wait).
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let permits = Arc::new(Semaphore::new(limits.max_connections));
    let connections = TaskTracker::new();
    loop {
        let permit = tokio::select! {
            permit = permits.clone().acquire_owned() => match permit {
                Ok(permit) => permit,
                Err(_) => break,
            },
            _ = shutdown.cancelled() => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors and the like: wait rather than spin.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        connections.spawn(async move {
            connection(stream, router, limits, shutdown).await;
            tracing::trace!(%peer, "connection closed");
            drop(permit);
        });
    }
    connections.close();
    connections.wait().await;
    Ok(())
}

/// What the watcher knows about one connection.
#[derive(Debug)]
struct Activity {
    /// Requests handed to the router and not answered yet.
    in_flight: AtomicUsize,
    times: Mutex<Times>,
}

#[derive(Debug, Clone, Copy)]
struct Times {
    /// When the connection last became idle (accepted, or a response finished).
    idle_since: Instant,
    /// The first byte read since then: a request's headers are arriving.
    first_byte: Option<Instant>,
}

impl Activity {
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

/// Why the watcher ends a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expired {
    /// No request began within the idle timeout: close once nothing is in flight.
    Idle,
    /// A request's headers did not complete in time: drop the connection.
    Headers,
}

/// Returns when the connection overstays one of its timeouts.
async fn watch(activity: &Activity, limits: ConnectionLimits) -> Expired {
    // Checks a few times per timeout: cutting a slow client a little late is harmless.
    let tick = (limits.header_timeout.min(limits.idle_timeout) / 4)
        .clamp(Duration::from_millis(10), Duration::from_secs(1));
    loop {
        tokio::time::sleep(tick).await;
        if activity.in_flight.load(Ordering::Acquire) > 0 {
            continue;
        }
        let times = *activity.times();
        match times.first_byte {
            Some(first) if first.elapsed() >= limits.header_timeout => return Expired::Headers,
            None if times.idle_since.elapsed() >= limits.idle_timeout => return Expired::Idle,
            _ => {}
        }
    }
}

async fn connection(
    stream: TcpStream,
    router: Router,
    limits: ConnectionLimits,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        times: Mutex::new(Times {
            idle_since: Instant::now(),
            first_byte: None,
        }),
    });
    let io = TokioIo::new(Watched {
        stream,
        activity: activity.clone(),
    });
    let tracked = activity.clone();
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let handling = tracked.begin();
        let call =
            hyper::service::Service::call(&TowerToHyperService::new(router.clone()), request);
        async move {
            let response = call.await;
            drop(handling);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.timer(TokioTimer::new()).keep_alive(true);
    let conn = builder.serve_connection(io, service);
    tokio::pin!(conn);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(error) = result {
                    tracing::debug!(%error, "connection ended with an error");
                }
                return;
            }
            expired = watch(&activity, limits) => match expired {
                Expired::Idle if !closing => {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                Expired::Idle => {}
                Expired::Headers => {
                    tracing::debug!(timeout = ?limits.header_timeout, "request headers too slow; connection dropped");
                    return;
                }
            },
            _ = shutdown.cancelled(), if !closing => {
                conn.as_mut().graceful_shutdown();
                closing = true;
            }
        }
    }
}
