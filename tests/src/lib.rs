//! Shared helpers for the integration tests, which run against a real Kafka broker and a real
//! PostgreSQL started by `scripts/test` (see docs/DEVELOPING.md). Each test gets its own topics
//! and its own database schema, so tests run in parallel.
//!
//! - [`kafka_brokers`], [`database_url`]: where the services are (`HOOKLINE_TEST_KAFKA`,
//!   `HOOKLINE_TEST_DATABASE_URL`); a test fails with a clear message when they are unset.
//! - [`unique_name`], [`create_topic`]: per-test topics through the admin API.
//! - [`pg_store`]: a `PgStore` in a fresh schema.
//! - [`Receiver`]: a real HTTP webhook receiver on loopback whose answers can change mid-test.
//! - [`poll_until`]: wait for a condition with a timeout instead of sleeping.
//! - [`world`]: a consumer test's world (topics, store, hooks, events, a running consumer).
//! - [`process`]: `hookline-consumer serve` as a child process for a world.
//! - [`producer`]: the producer's API in-process on a loopback port.
//! - [`registry_url`]: the real Confluent-compatible schema registry (`HOOKLINE_TEST_REGISTRY`,
//!   Apicurio started by `scripts/registry`); its tests fail without it in CI, skip locally.
//! - [`fake_registry`]: a Confluent-compatible schema registry stand-in on loopback, for the
//!   misbehaviour the real one cannot show.
//! - [`pg_gate`]: a gate in front of the shared PostgreSQL that a test closes to act an outage.
//! - [`ordering`]: a receiver that fails chosen (build, status) pairs and shows each build's
//!   statuses in arrival order.
//! - [`soak`]: the soak driver behind `scripts/soak` (binary `soak`): the real binaries, a private
//!   broker and database, kills and restarts, every (event, hook) pair counted.
//! - [`mod@bench`]: the benchmark behind `scripts/bench` (binary `bench`).

pub mod bench;
pub mod fake_registry;
pub mod ordering;
pub mod pg_gate;
pub mod process;
pub mod producer;
pub mod soak;
pub mod world;

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use hookline_cistate::{PgOptions, PgStore};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The Confluent API (`.../apis/ccompat/v7`) of the real schema registry that `scripts/test`
/// starts. `None` (the test returns, saying so) when `HOOKLINE_TEST_REGISTRY` is unset outside
/// CI: engineers running a module by hand with only Kafka and PostgreSQL up are not failed by
/// it. With `CI=true` an unset variable fails the test: CI must run them.
pub fn registry_url() -> Option<String> {
    match std::env::var("HOOKLINE_TEST_REGISTRY") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") => panic!(
            "HOOKLINE_TEST_REGISTRY is not set: run the integration tests with scripts/test, which starts the schema registry (scripts/registry)"
        ),
        _ => {
            eprintln!(
                "skipped: HOOKLINE_TEST_REGISTRY is not set (start one with scripts/registry start; export HOOKLINE_TEST_REGISTRY=$(scripts/registry url))"
            );
            None
        }
    }
}

/// The bootstrap servers of the real test broker.
pub fn kafka_brokers() -> String {
    std::env::var("HOOKLINE_TEST_KAFKA").unwrap_or_else(|_| {
        panic!("HOOKLINE_TEST_KAFKA is not set: run the integration tests with scripts/test, which starts Kafka and PostgreSQL")
    })
}

/// The URL of the real test database.
pub fn database_url() -> String {
    std::env::var("HOOKLINE_TEST_DATABASE_URL").unwrap_or_else(|_| {
        panic!("HOOKLINE_TEST_DATABASE_URL is not set: run the integration tests with scripts/test, which starts Kafka and PostgreSQL")
    })
}

/// `prefix` plus a short random suffix: a topic, schema or group name no other test uses.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}_{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

pub fn admin() -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .create()
        .expect("admin client")
}

/// Creates a topic with `partitions` partitions on the test broker and waits until it exists.
pub async fn create_topic(name: &str, partitions: i32) {
    let results = admin()
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(-1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("creating topic {topic}: {code}"));
    }
}

/// A `PgStore` in a schema of its own, migrated.
///
/// Connected the way the services connect at start ([`PgStore::connect_patiently`]): a server
/// that does not answer within one pool's acquire timeout (10 s) is asked again with a growing
/// pause, a few times, before the test fails. A single 10 s chance failed a whole bench run
/// (each part opens a store of its own) on a machine whose two shared cores were saturated,
/// although a bench holds at most about 20 of the server's 300 connections: a connect that
/// cannot finish in 10 s there is a stall, not a refusal. When it still fails, the message says
/// how full the server was, if it answered at all.
pub async fn pg_store() -> PgStore {
    let options = PgOptions {
        max_connections: 5,
        ..PgOptions::new(database_url()).schema(unique_name("t"))
    };
    match PgStore::connect_patiently(&options, 4).await {
        Ok(store) => store,
        Err(error) => panic!(
            "connect to the test database: {error} (the server: {})",
            pg_server_state().await
        ),
    }
}

/// How many client connections the test server holds, of how many it allows, for a failure's
/// message: "not answering" when a single connection cannot be made either.
pub async fn pg_server_state() -> String {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(1)
        .acquire_timeout(Duration::from_secs(10))
        .connect(&database_url())
        .await;
    let Ok(pool) = pool else {
        return "not answering".into();
    };
    let state: Result<(i64, String), _> = sqlx::query_as(
        "SELECT count(*) FILTER (WHERE backend_type = 'client backend'), \
                current_setting('max_connections') FROM pg_stat_activity",
    )
    .fetch_one(&pool)
    .await;
    pool.close().await;
    match state {
        Ok((clients, max)) => format!("{clients} client connections of max_connections {max}"),
        Err(error) => format!("answering, but not its state: {error}"),
    }
}

/// Where the service binaries are: `HOOKLINE_TEST_BIN_DIR`, else the profile directory this
/// test binary was built in (`target/<profile>/deps/it-*` -> `target/<profile>/`).
pub fn service_bin(name: &str) -> std::path::PathBuf {
    let dir = std::env::var_os("HOOKLINE_TEST_BIN_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            let exe = std::env::current_exe().expect("test binary path");
            exe.parent()
                .and_then(|deps| deps.parent())
                .expect("target/<profile>")
                .to_path_buf()
        });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it (cargo build -p hookline-producer -p hookline-consumer) or set HOOKLINE_TEST_BIN_DIR",
        path.display()
    );
    path
}

/// Waits until `check` returns `Some`, polling every 20 ms, and panics with `what` after
/// `timeout`.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// One request a [`Receiver`] got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// The status it answered.
    pub status: StatusCode,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).expect("receiver got JSON")
    }
}

/// How a [`Receiver`] answers the next request.
#[derive(Debug, Clone)]
pub enum Answer {
    Status(u16),
    /// Answer with a status and a `Retry-After` header (seconds).
    RetryAfter(u16, u64),
    /// Never answer (the client times out).
    Hang,
}

#[derive(Default)]
struct ReceiverState {
    received: Vec<Received>,
    /// Answers used one per request, in order; then `default`.
    script: std::collections::VecDeque<Answer>,
    default: Option<Answer>,
}

/// A real HTTP server on 127.0.0.1 that records every request and answers as told.
#[derive(Clone)]
pub struct Receiver {
    pub url: String,
    state: Arc<Mutex<ReceiverState>>,
    shutdown: CancellationToken,
}

impl Receiver {
    /// Starts a receiver that answers 200 until told otherwise.
    pub async fn start() -> Receiver {
        let state = Arc::new(Mutex::new(ReceiverState::default()));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let app = Router::new().fallback(receive).with_state(state.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
                .ok();
        });
        Receiver {
            url,
            state,
            shutdown,
        }
    }

    /// Answers the next requests with these, in order, then with the default.
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        self.state.lock().unwrap().script.extend(answers);
    }

    /// Answers every request not covered by a script with `answer`.
    pub fn answer_always(&self, answer: Answer) {
        self.state.lock().unwrap().default = Some(answer);
    }

    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }

    pub fn count(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    pub fn stop(&self) {
        self.shutdown.cancel();
    }
}

async fn receive(
    State(state): State<Arc<Mutex<ReceiverState>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let answer = {
        let mut s = state.lock().unwrap();
        s.script
            .pop_front()
            .or_else(|| s.default.clone())
            .unwrap_or(Answer::Status(200))
    };
    let status = match &answer {
        Answer::Status(code) | Answer::RetryAfter(code, _) => StatusCode::from_u16(*code).unwrap(),
        Answer::Hang => StatusCode::REQUEST_TIMEOUT,
    };
    state.lock().unwrap().received.push(Received {
        headers,
        body,
        at: Instant::now(),
        status,
    });
    match answer {
        Answer::Status(_) => status.into_response(),
        Answer::RetryAfter(_, secs) => {
            (status, [("retry-after", secs.to_string())]).into_response()
        }
        Answer::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

/// A Kafka broker of a test's own, for tests that stop, kill or restart the broker: the shared
/// test broker serves every other test running at the same time and must not go away.
///
/// Started through `scripts/kafka` (`HOOKLINE_KAFKA_CTL`) on two free ports with a run
/// directory of its own; stopped and its data deleted on drop.
pub struct PrivateBroker {
    pub bootstrap: String,
    env: Vec<(String, String)>,
    run_dir: std::path::PathBuf,
}

impl PrivateBroker {
    pub fn start() -> PrivateBroker {
        let port = free_port();
        let controller_port = free_port();
        let run_dir = std::env::temp_dir().join(unique_name("hookline-kafka"));
        let broker = PrivateBroker {
            bootstrap: format!("127.0.0.1:{port}"),
            env: vec![
                ("HOOKLINE_KAFKA_PORT".into(), port.to_string()),
                (
                    "HOOKLINE_KAFKA_CONTROLLER_PORT".into(),
                    controller_port.to_string(),
                ),
                (
                    "HOOKLINE_KAFKA_RUN_DIR".into(),
                    run_dir.display().to_string(),
                ),
            ],
            run_dir,
        };
        broker.ctl(&["start"]);
        broker
    }

    /// Stops the broker cleanly, keeping its data.
    pub fn stop(&self) {
        self.ctl(&["stop", "--keep-data"]);
    }

    /// Kills the broker (SIGKILL), keeping its data.
    pub fn kill(&self) {
        self.ctl(&["kill"]);
    }

    /// Freezes the broker (SIGSTOP): its connections stay open and nothing is answered, as a
    /// hung broker or a long GC pause; [`PrivateBroker::resume`] lets it go on.
    pub fn pause(&self) {
        self.ctl(&["pause"]);
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) {
        self.ctl(&["resume"]);
    }

    /// Starts the stopped or killed broker again with its data.
    pub fn restart(&self) {
        self.ctl(&["start", "--keep-data"]);
    }

    fn ctl(&self, args: &[&str]) {
        let ctl = std::env::var("HOOKLINE_KAFKA_CTL").unwrap_or_else(|_| {
            panic!("HOOKLINE_KAFKA_CTL is not set: run the integration tests with scripts/test")
        });
        let output = std::process::Command::new(&ctl)
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("run scripts/kafka");
        assert!(
            output.status.success(),
            "scripts/kafka {args:?} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for PrivateBroker {
    fn drop(&mut self) {
        if let Ok(ctl) = std::env::var("HOOKLINE_KAFKA_CTL") {
            let _ = std::process::Command::new(ctl)
                .arg("stop")
                .envs(self.env.iter().map(|(k, v)| (k, v)))
                .output();
        }
        // `stop` deletes the data; the config and logs go too.
        let _ = std::fs::remove_dir_all(&self.run_dir);
    }
}

/// A TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}
