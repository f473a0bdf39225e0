//! Every listener is bounded, tested against the real binaries (`hookline-producer serve`,
//! `hookline-producer relay`, `hookline-consumer serve` with its hooks API): connections that
//! never send a byte are closed, a request head trickled in is cut, a body trickled in gets 408,
//! a cap full of silent connections does not keep `/healthz` out, and requests work afterwards.
//! The limits are given by their `HOOKLINE_*` variables, the same on every service.
//!
//! Nothing asserts how fast a client is cut off, only that it is, within a bound far above the
//! configured timeouts (`EVENTUALLY`), so a busy machine cannot make these tests flaky; a server
//! that never cuts a client off reaches the bound.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use hookline_tests::{
    create_topic, database_url, free_port, kafka_brokers, poll_until, service_bin, unique_name,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// Far above every limit below: only a server that never cuts a client off reaches it.
const EVENTUALLY: Duration = Duration::from_secs(60);
/// Connections the services serve at once here.
const CAP: usize = 4;

/// The limits every service is started with, by the variables every service reads.
const LIMITS: [(&str, &str); 5] = [
    ("HOOKLINE_MAX_CONNECTIONS", "4"),
    ("HOOKLINE_FIRST_BYTE_TIMEOUT", "1s"),
    ("HOOKLINE_HEADER_TIMEOUT", "1s"),
    ("HOOKLINE_BODY_TIMEOUT", "1s"),
    ("HOOKLINE_IDLE_TIMEOUT", "2s"),
];

/// A service process, killed when dropped.
struct Service {
    addr: SocketAddr,
    _child: Child,
    _dir: TempDir,
}

/// A directory removed when dropped (token files).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("hookline-listeners"));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    /// A file only its owner may read.
    fn secret(&self, name: &str, content: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, content).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `bin args...` on a free port of loopback, with the test's broker, database and limits
/// ([`LIMITS`], then `limits` over them).
async fn start(
    bin: &str,
    args: &[&str],
    topic: &str,
    dir: TempDir,
    limits: &[(&str, &str)],
) -> Service {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let child = Command::new(service_bin(bin))
        .args(args)
        .args(["--listen", &addr.to_string()])
        .env("HOOKLINE_KAFKA_BROKERS", kafka_brokers())
        .env("HOOKLINE_TOPIC", topic)
        .env("HOOKLINE_DATABASE_URL", database_url())
        .env("HOOKLINE_DATABASE_SCHEMA", unique_name("listen"))
        .envs(LIMITS)
        .envs(limits.iter().copied())
        .env(
            "RUST_LOG",
            std::env::var("CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap_or_else(|e| panic!("start {bin}: {e}"));
    let service = Service {
        addr,
        _child: child,
        _dir: dir,
    };
    poll_until(&format!("{bin} /healthz"), EVENTUALLY, || async {
        (get(addr, "/healthz").await == Some(200)).then_some(())
    })
    .await;
    service
}

async fn producer() -> Service {
    producer_within(&[]).await
}

async fn producer_within(limits: &[(&str, &str)]) -> Service {
    let topic = unique_name("listen");
    create_topic(&topic, 1).await;
    let dir = TempDir::new();
    let tokens = dir.secret("tokens", "listener-test-token-0123456789\n");
    start(
        "hookline-producer",
        &["serve", "--api-token-file", tokens.to_str().unwrap()],
        &topic,
        dir,
        limits,
    )
    .await
}

async fn relay() -> Service {
    let topic = unique_name("listen");
    create_topic(&topic, 1).await;
    start("hookline-producer", &["relay"], &topic, TempDir::new(), &[]).await
}

const ADMIN_TOKEN: &str = "listener-test-admin-token-0123456789";

async fn consumer() -> Service {
    let topic = unique_name("listen");
    create_topic(&topic, 1).await;
    let dir = TempDir::new();
    let token = dir.secret("admin", ADMIN_TOKEN);
    let group = unique_name("group");
    start(
        "hookline-consumer",
        &[
            "serve",
            "--group-id",
            &group,
            "--admin-token-file",
            token.to_str().unwrap(),
        ],
        &topic,
        dir,
        &[],
    )
    .await
}

/// A GET's status, or `None` when no answer came within `EVENTUALLY`.
async fn get(addr: SocketAddr, path: &str) -> Option<u16> {
    let response = reqwest::Client::new()
        .get(format!("http://{addr}{path}"))
        .timeout(EVENTUALLY)
        .send()
        .await
        .ok()?;
    Some(response.status().as_u16())
}

/// Reads until the server closes the connection; what it sent before. Panics at `EVENTUALLY`.
async fn until_closed(read: &mut (impl AsyncReadExt + Unpin), what: &str) -> String {
    let reading = async {
        let mut seen = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            match read.read(&mut buf).await {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&seen).into_owned(),
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(EVENTUALLY, reading)
        .await
        .unwrap_or_else(|_| panic!("{what}: the connection was never closed"))
}

/// Connections that never send a byte, more than the cap: every one is closed.
async fn silent_connections_are_closed(addr: SocketAddr, service: &str) {
    let mut silent = Vec::new();
    for _ in 0..CAP * 3 {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    let closing = silent.into_iter().map(|mut stream| async move {
        until_closed(&mut stream, &format!("{service}: a silent connection")).await
    });
    for seen in futures::future::join_all(closing).await {
        assert!(
            seen.is_empty(),
            "{service}: answered nothing asked: {seen:?}"
        );
    }
}

/// A request head sent one header line at a time, forever: cut off, unanswered.
async fn trickled_heads_are_cut(addr: SocketAddr, service: &str) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    let writer = tokio::spawn(async move {
        let _ = write
            .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await;
        for i in 0.. {
            let line = format!("X-Slow-{i}: still coming\r\n");
            if write.write_all(line.as_bytes()).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let seen = until_closed(&mut read, &format!("{service}: a trickled head")).await;
    writer.abort();
    assert!(
        seen.is_empty(),
        "{service}: answered a head never finished: {seen:?}"
    );
}

/// A body sent a byte at a time: 408 naming the option, and the connection closed.
async fn trickled_bodies_get_408(addr: SocketAddr, service: &str, head: &str) {
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = stream.into_split();
    write
        .write_all(
            format!("{head}Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{")
                .as_bytes(),
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
    let seen = until_closed(&mut read, &format!("{service}: a trickled body")).await;
    writer.abort();
    assert!(seen.starts_with("HTTP/1.1 408"), "{service}: {seen}");
    assert!(seen.contains("--body-timeout"), "{service}: {seen}");
}

/// Every slot held by a connection that says nothing: `/healthz` is still answered.
async fn a_full_cap_does_not_keep_probes_out(addr: SocketAddr, service: &str) {
    let mut silent = Vec::new();
    for _ in 0..CAP {
        silent.push(TcpStream::connect(addr).await.unwrap());
    }
    assert_eq!(
        get(addr, "/healthz").await,
        Some(200),
        "{service}: /healthz while the cap is full"
    );
    drop(silent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_producer_api_is_bounded() {
    let service = producer().await;
    let addr = service.addr;
    silent_connections_are_closed(addr, "producer").await;
    trickled_heads_are_cut(addr, "producer").await;
    let head = "POST /v1/transitions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer listener-test-token-0123456789\r\n";
    trickled_bodies_get_408(addr, "producer", head).await;
    a_full_cap_does_not_keep_probes_out(addr, "producer").await;
    assert_eq!(get(addr, "/healthz").await, Some(200), "afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_relay_listener_is_bounded() {
    let service = relay().await;
    let addr = service.addr;
    silent_connections_are_closed(addr, "relay").await;
    trickled_heads_are_cut(addr, "relay").await;
    a_full_cap_does_not_keep_probes_out(addr, "relay").await;
    assert_eq!(get(addr, "/healthz").await, Some(200), "afterwards");
    assert_eq!(get(addr, "/metrics").await, Some(200), "afterwards");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_consumer_listener_and_hooks_api_are_bounded() {
    let service = consumer().await;
    let addr = service.addr;
    silent_connections_are_closed(addr, "consumer").await;
    trickled_heads_are_cut(addr, "consumer").await;
    let head = format!(
        "POST /api/v4/projects/1/hooks HTTP/1.1\r\nHost: x\r\nPRIVATE-TOKEN: {ADMIN_TOKEN}\r\n"
    );
    trickled_bodies_get_408(addr, "consumer", &head).await;
    a_full_cap_does_not_keep_probes_out(addr, "consumer").await;
    assert_eq!(get(addr, "/healthz").await, Some(200), "afterwards");
    let hooks = reqwest::Client::new()
        .get(format!("http://{addr}/api/v4/projects/1/hooks"))
        .header("PRIVATE-TOKEN", ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    // No such project in this store: the API looked and said so.
    assert_eq!(hooks.status().as_u16(), 404, "the hooks API afterwards");
}

/// `{"facts":{"<500 KB key>":[0,0,...]}}`, just under the default 1 MiB body limit: the body
/// whose duplicate-key check took seconds of a worker thread.
fn adversarial_body() -> String {
    let key = "k".repeat(500_000);
    let zeros = vec!["0"; 270_000].join(",");
    format!(r#"{{"facts":{{"{key}":[{zeros}]}}}}"#)
}

/// Several 1 MiB adversarial bodies at once, twice over, on the real producer: each is refused
/// (422, naming the field), and `/healthz` is answered all along. Parsing was quadratic in such
/// a body, seconds of a worker thread each: a few at once stalled `/healthz` for all of that.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn adversarial_json_is_refused_and_the_producer_answers_meanwhile() {
    // Far above what answering takes, far below what a few quadratic parses took.
    const PROBE_BOUND: Duration = Duration::from_secs(10);
    // Room for every request below: what is measured is the parse, not the connection cap.
    let service = producer_within(&[("HOOKLINE_MAX_CONNECTIONS", "64")]).await;
    let addr = service.addr;
    let body = adversarial_body();
    assert!(
        body.len() > 1_000_000 && body.len() < 1024 * 1024,
        "{}",
        body.len()
    );
    let client = reqwest::Client::new();
    let flooding = async {
        for _ in 0..2 {
            let posts = (0..8).map(|_| {
                client
                    .post(format!("http://{addr}/v1/transitions"))
                    .bearer_auth("listener-test-token-0123456789")
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .timeout(EVENTUALLY)
                    .send()
            });
            for answer in futures::future::join_all(posts).await {
                let answer = answer.expect("answered");
                assert_eq!(answer.status().as_u16(), 422);
                let refusal: serde_json::Value = answer.json().await.unwrap();
                let field = refusal["field"].as_str().unwrap_or_default();
                assert!(
                    field.starts_with("facts"),
                    "{}",
                    &field[..field.len().min(80)]
                );
            }
        }
    };
    // A new connection per probe, as an orchestrator's probe makes.
    let prober = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let probing = async {
        let mut answered = 0;
        loop {
            let probe = prober
                .get(format!("http://{addr}/healthz"))
                .timeout(PROBE_BOUND)
                .send()
                .await
                .expect("/healthz answered while adversarial bodies were being handled");
            assert_eq!(probe.status().as_u16(), 200);
            answered += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
            if answered > 1_000_000 {
                return;
            }
        }
    };
    tokio::select! {
        _ = flooding => {}
        _ = probing => unreachable!("probes go on until the flood ends"),
    }
    assert_eq!(get(addr, "/healthz").await, Some(200));
}
