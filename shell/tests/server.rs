//! The bounded server on a real socket: what its limits do to silent, slow and panicking
//! traffic. Each test sets the limit it is not about far above its bound (`EVENTUALLY`), so
//! passing shows the limit under test did the work.

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use hookline_shell::server::{Limits, serve};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// Far above the limits under test, far below the others.
const EVENTUALLY: Duration = Duration::from_secs(60);
const NEVER: Duration = Duration::from_secs(3600);

async fn start(limits: Limits) -> (SocketAddr, CancellationToken) {
    let app = Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/echo",
            axum::routing::post(|body: axum::body::Bytes| async move { body }),
        )
        .route(
            "/panic",
            get(|| async {
                let poison: Option<&str> = std::hint::black_box(None);
                poison.expect("a value no handler expected")
            }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, app, limits, stop.clone()));
    (addr, stop)
}

/// Sends `request` and reads until the server closes the connection.
async fn exchange(addr: SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    closed(&mut stream).await
}

async fn closed(stream: &mut TcpStream) -> String {
    let reading = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&seen).into_owned(),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(EVENTUALLY, reading)
        .await
        .expect("the connection was never closed")
}

/// Every slot held by a connection that says nothing, and each may wait for an hour: a client
/// with a request still gets in, because the connection idle longest makes room for it.
#[tokio::test]
async fn a_cap_full_of_silent_connections_makes_room_for_a_request() {
    let (addr, _stop) = start(Limits {
        max_connections: 2,
        first_byte_timeout: NEVER,
        header_timeout: NEVER,
        idle_timeout: NEVER,
        ..Limits::default()
    })
    .await;
    let mut oldest = TcpStream::connect(addr).await.unwrap();
    // Accepted in this order: the first is the one idle longest.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let _newer = TcpStream::connect(addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let answer = exchange(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(
        closed(&mut oldest).await,
        "",
        "the oldest made room, unanswered"
    );
}

/// A connection that never sends a byte is closed after the first-byte timeout, not the idle
/// timeout of a kept-alive connection.
#[tokio::test]
async fn a_silent_connection_is_closed_at_the_first_byte_timeout() {
    let (addr, _stop) = start(Limits {
        first_byte_timeout: Duration::from_millis(200),
        idle_timeout: NEVER,
        ..Limits::default()
    })
    .await;
    let mut silent = TcpStream::connect(addr).await.unwrap();
    assert_eq!(closed(&mut silent).await, "");
    // A kept-alive connection that was served waits for its idle timeout instead.
    let mut kept = TcpStream::connect(addr).await.unwrap();
    kept.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut buf = [0u8; 256];
    let n = kept.read(&mut buf).await.unwrap();
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"));
    let still_open = tokio::time::timeout(Duration::from_secs(2), kept.read(&mut buf)).await;
    assert!(
        still_open.is_err(),
        "closed like a silent one: {still_open:?}"
    );
}

/// A handler that panics answers 500; the server, and the next request, go on.
#[tokio::test]
async fn a_panicking_handler_answers_500_and_the_server_goes_on() {
    let (addr, _stop) = start(Limits::default()).await;
    let answer = exchange(
        addr,
        "GET /panic HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 500"), "{answer}");
    let answer = exchange(
        addr,
        "GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A body that does not arrive within the body timeout: 408 naming the option, whatever the
/// handler made of the failed read, and the connection is closed.
#[tokio::test]
async fn a_body_that_does_not_arrive_gets_408() {
    let (addr, _stop) = start(Limits {
        body_timeout: Duration::from_millis(300),
        idle_timeout: NEVER,
        ..Limits::default()
    })
    .await;
    let answer = exchange(
        addr,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n{",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--body-timeout"), "{answer}");
    let answer = exchange(
        addr,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\nhi",
    )
    .await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("hi"),
        "{answer}"
    );
}
