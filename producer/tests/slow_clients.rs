//! Slow and idle clients against a real socket: cut off by the header, body and idle timeouts,
//! while other clients are served. No Kafka is needed: every answer here comes before producing.
//!
//! Nothing here asserts how fast a client is cut off, only that it is, within a bound far above
//! the configured timeouts, so a busy machine cannot make these tests flaky.

use std::sync::Arc;
use std::time::Duration;

use hookline_cistate::MemoryStore;
use hookline_producer::{
    AppState, ConnectionLimits, Emitter, EmitterConfig, Flags, ProducerMetrics, run,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// Far above every timeout below: only a server that never cuts a client off reaches it.
const EVENTUALLY: Duration = Duration::from_secs(60);

struct Server {
    addr: std::net::SocketAddr,
    shutdown: CancellationToken,
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn start(max_connections: usize) -> Server {
    let mut config = EmitterConfig::new("127.0.0.1:9");
    config.delivery_timeout = Duration::from_millis(300);
    let emitter = Emitter::new(
        config,
        Arc::new(MemoryStore::new()),
        Flags::in_memory(),
        Arc::new(ProducerMetrics::new()),
    )
    .await
    .unwrap();
    let state = AppState {
        connections: ConnectionLimits {
            max_connections,
            first_byte_timeout: Duration::from_millis(800),
            header_timeout: Duration::from_millis(800),
            body_timeout: Duration::from_millis(800),
            idle_timeout: Duration::from_millis(1500),
        },
        ..AppState::new(emitter)
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    tokio::spawn(run(
        listener,
        state,
        shutdown.clone(),
        Duration::from_secs(5),
    ));
    Server { addr, shutdown }
}

/// Reads until the server closes the connection; what it sent before.
async fn until_closed(stream: &mut tokio::net::tcp::OwnedReadHalf) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return String::from_utf8_lossy(&seen).into_owned(),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
        }
    }
}

/// A client that sends a request's head one header line at a time, forever; returns once the
/// server has closed the connection.
async fn trickle_headers(addr: std::net::SocketAddr) -> String {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = write
            .write_all(b"POST /v1/transitions HTTP/1.1\r\nHost: localhost\r\n")
            .await;
        for i in 0.. {
            if write
                .write_all(format!("X-Slow-{i}: still coming\r\n").as_bytes())
                .await
                .is_err()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let seen = until_closed(&mut read).await;
    writer.abort();
    seen
}

async fn get_healthz(addr: std::net::SocketAddr) -> u16 {
    reqwest::Client::new()
        .get(format!("http://{addr}/healthz"))
        .send()
        .await
        .expect("healthz answered")
        .status()
        .as_u16()
}

/// Both connection slots are held by clients trickling their headers; a third client waits
/// until the header timeout frees a slot, and is then served.
#[tokio::test]
async fn clients_trickling_headers_are_cut_off_and_the_next_client_is_served() {
    let server = start(2).await;
    let slow = [
        tokio::spawn(trickle_headers(server.addr)),
        tokio::spawn(trickle_headers(server.addr)),
    ];
    let served = tokio::time::timeout(EVENTUALLY, get_healthz(server.addr))
        .await
        .expect("the third client was never served");
    assert_eq!(served, 200);
    for client in slow {
        let seen = tokio::time::timeout(EVENTUALLY, client)
            .await
            .expect("a client trickling headers was never cut off")
            .unwrap();
        assert!(
            seen.is_empty(),
            "no answer to a head never finished: {seen:?}"
        );
    }
}

#[tokio::test]
async fn a_body_that_trickles_in_gets_408_and_the_connection_closes() {
    let server = start(16).await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(
            b"POST /v1/transitions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
        )
        .await
        .unwrap();
    let writer = tokio::spawn(async move {
        for _ in 0..99 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            if write.write_all(b" ").await.is_err() {
                return;
            }
        }
    });
    let seen = tokio::time::timeout(EVENTUALLY, until_closed(&mut read))
        .await
        .expect("a trickling body was never cut off");
    writer.abort();
    assert!(seen.starts_with("HTTP/1.1 408"), "{seen}");
    assert!(seen.contains("--body-timeout"), "{seen}");
    // Meanwhile and after, others are served.
    assert_eq!(get_healthz(server.addr).await, 200);
}

#[tokio::test]
async fn an_idle_connection_is_closed_after_its_requests() {
    let server = start(16).await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    // Then nothing: the connection is kept alive for a while, then closed.
    let seen = tokio::time::timeout(EVENTUALLY, until_closed(&mut read))
        .await
        .expect("an idle kept-alive connection was never closed");
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    assert_eq!(seen.matches("HTTP/1.1").count(), 1, "{seen}");

    // A connection that never sends anything is closed too.
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(EVENTUALLY, silent.read(&mut buf))
        .await
        .expect("a silent connection was never closed");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
}
