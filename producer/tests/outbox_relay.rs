//! Why the outbox exists, proven against a real broker (a private one, stopped once for 10 s)
//! and the real PostgreSQL:
//!
//! - `the_outbox_relay_loses_nothing_under_sigkills_and_a_broker_stop`: 20,000 transitions
//!   written to the outbox in the state change's own transaction while the real
//!   `hookline-producer relay` is SIGKILLed 5 times at seeded random moments and the broker is
//!   stopped for 10 s: every row reaches Kafka, repeats carry the row's own `event_id`, and each
//!   build's events are in commit order.
//! - `a_client_that_crashes_between_commit_and_post_loses_transitions`: the same load and the
//!   same chaos through the HTTP API, with a CI client (a child process) that commits, then
//!   POSTs, and is SIGKILLed 5 times (once while Kafka is away): what it committed but had not
//!   handed over is lost.
//!
//! Both print one `outbox-scenario` line with their counts (docs/measurements.md quotes them).
//!
//! `outbox_latency_and_throughput` (ignored; run it on purpose, ideally with a release relay in
//! `HOOKLINE_RELAY_BIN`) measures commit-to-Kafka latency at 1,000 transitions/s on the shared
//! test broker, and the relay's throughput draining a backlog of 20,000 rows.
//! `HOOKLINE_TEST_SEED` replays a run's chaos plan.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{Build, Outbox, OutboxTransition, PgOptions, PgStore, write_build};
use hookline_producer::flags::PgFlagStore;
use hookline_producer::{Change, EmitterConfig, Flags, INLINE_FLAG};
use hookline_schemas::{BuildEvent, BuildStatus, Codec};
use hookline_tests::producer::Producer;
use hookline_tests::{PrivateBroker, database_url, free_port, unique_name};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::json;
use tokio::process::{Child, Command};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_hookline-producer");
const TRANSITIONS: usize = 20_000;
const STATUSES: [BuildStatus; 4] = [
    BuildStatus::Created,
    BuildStatus::Pending,
    BuildStatus::Running,
    BuildStatus::Success,
];
const BUILDS: usize = TRANSITIONS / STATUSES.len();
const PROJECTS: usize = 4;
/// Writers at once, as a CI's many workers; each takes every `WRITERS`th build.
const WRITERS: usize = 4;
/// Transitions per second over all writers: the feed lasts 40 s, and the chaos happens within it.
const RATE: f64 = 500.0;
const KILLS: usize = 5;
const BROKER_DOWN: Duration = Duration::from_secs(10);

/// When the chaos happens, drawn from the seed: kill moments and the broker stop, as offsets
/// from the start of the feed, and for the HTTP client one kill this long after the broker is
/// down (`scripts/kafka` serializes its commands machine-wide, so a stop can take a while).
#[derive(Debug)]
struct Chaos {
    seed: u64,
    kills: Vec<Duration>,
    broker_stop: Duration,
    kill_after_stop: Option<Duration>,
}

impl Chaos {
    fn draw(kill_during_outage: bool) -> Chaos {
        let seed = std::env::var("HOOKLINE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| rand::rng().random());
        let mut rng = StdRng::seed_from_u64(seed);
        let broker_stop = Duration::from_millis(rng.random_range(5_000..20_000));
        // A client loses what it committed while the network (here: Kafka) is away.
        let kill_after_stop =
            kill_during_outage.then(|| Duration::from_millis(rng.random_range(1_000..8_000)));
        let random = KILLS - usize::from(kill_during_outage);
        let mut kills: Vec<Duration> = (0..random)
            .map(|_| Duration::from_millis(rng.random_range(1_000..38_000)))
            .collect();
        kills.sort();
        Chaos {
            seed,
            kills,
            broker_stop,
            kill_after_stop,
        }
    }
}

/// A private broker with the events topic, and the CI state in a schema of its own.
struct Scene {
    broker: Arc<PrivateBroker>,
    topic: String,
    schema: String,
    store: PgStore,
    builds: Vec<Build>,
}

impl Scene {
    async fn new() -> Scene {
        let broker = Arc::new(
            tokio::task::spawn_blocking(PrivateBroker::start)
                .await
                .unwrap(),
        );
        let topic = unique_name("outbox_events");
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", &broker.bootstrap)
            .create()
            .unwrap();
        for result in admin
            .create_topics(
                &[NewTopic::new(&topic, 4, TopicReplication::Fixed(1))],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await
            .expect("create topic")
        {
            result.expect("topic created");
        }
        let schema = unique_name("outbox");
        let store = PgStore::connect(&PgOptions {
            max_connections: (WRITERS + 2) as u32,
            ..PgOptions::new(database_url()).schema(schema.clone())
        })
        .await
        .expect("database");
        for p in 0..PROJECTS {
            write_snapshot(&store, &sample(p as i64 * 1_000_000))
                .await
                .unwrap();
        }
        let builds = builds();
        // Half the projects render inline: both timings go through the relay.
        let flags = Flags::load(
            Arc::new(PgFlagStore::new(store.pool().clone())),
            Duration::from_secs(5),
        )
        .await
        .expect("flags");
        flags
            .set(
                INLINE_FLAG,
                "test",
                Change::PercentageOfActors("50".parse().unwrap()),
            )
            .await
            .expect("set flag");
        Scene {
            broker,
            topic,
            schema,
            store,
            builds,
        }
    }

    /// Stops the broker at `chaos.broker_stop` for 10 s, then starts it again; `while_down`
    /// runs once the broker is down.
    fn broker_outage(
        &self,
        chaos: &Chaos,
        started: Instant,
        while_down: impl std::future::Future<Output = ()>,
    ) -> impl std::future::Future<Output = ()> {
        let at = started + chaos.broker_stop;
        let broker = self.broker.clone();
        async move {
            tokio::time::sleep_until(at.into()).await;
            let stop = broker.clone();
            tokio::task::spawn_blocking(move || stop.stop())
                .await
                .unwrap();
            eprintln!("broker stopped at {:?}", started.elapsed());
            tokio::join!(tokio::time::sleep(BROKER_DOWN), while_down);
            tokio::task::spawn_blocking(move || broker.restart())
                .await
                .unwrap();
            eprintln!("broker back at {:?}", started.elapsed());
        }
    }
}

/// The scenario's builds (the same in the test and in its client process).
fn builds() -> Vec<Build> {
    let mut builds = Vec::with_capacity(BUILDS);
    for p in 0..PROJECTS {
        let snapshot = sample(p as i64 * 1_000_000);
        for i in 0..BUILDS / PROJECTS {
            let mut build = snapshot.build.clone();
            build.id += i as i64;
            build.started_at = None;
            build.finished_at = None;
            build.duration = None;
            build.failure_reason = None;
            builds.push(build);
        }
    }
    builds
}

/// The build as it is after `status`.
fn at_status(build: &Build, status: BuildStatus) -> Build {
    let mut b = build.clone();
    b.status = status.as_str().to_owned();
    let now = chrono::Utc::now();
    if status == BuildStatus::Running {
        b.started_at = Some(now);
    }
    if status.is_finished() {
        b.started_at = Some(now - chrono::Duration::seconds(3));
        b.finished_at = Some(now);
        b.duration = Some(3.0);
    }
    b
}

/// What Kafka holds for the expected events.
#[derive(Debug, Default)]
struct Verdict {
    records: usize,
    distinct: usize,
    missing: usize,
    duplicates: usize,
    /// Records whose event id nobody expected, or whose build or status differs from the
    /// event id's transition.
    foreign: usize,
    /// Builds with an event (its id's first appearance) after a later transition of the build.
    out_of_order: usize,
}

/// Reads every record of `topic` and compares it with `expected` (event id -> build, index of
/// the transition in the build's commit order).
fn verdict(brokers: &str, topic: &str, expected: &HashMap<Uuid, (i64, usize)>) -> Verdict {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in 0..4 {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(30))
            .expect("watermarks");
        ends.insert(p, high);
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let codec = Codec::embedded();
    let mut next: HashMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
    let mut events: Vec<BuildEvent> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while next.iter().any(|(p, n)| *n < ends[p]) {
        assert!(
            Instant::now() < deadline,
            "reading {topic}: at {next:?} of {ends:?}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message.expect("consume");
        next.insert(message.partition(), message.offset() + 1);
        let event = futures::executor::block_on(codec.decode(message.payload().unwrap()))
            .expect("every record decodes")
            .event;
        events.push(event);
    }
    // One build's records are in one partition, in the order read.
    let mut seen: HashMap<Uuid, BuildStatus> = HashMap::new();
    let mut last_index: HashMap<i64, usize> = HashMap::new();
    let mut verdict = Verdict {
        records: events.len(),
        ..Verdict::default()
    };
    let mut disordered = std::collections::HashSet::new();
    for event in &events {
        let Some(&(build, index)) = expected.get(&event.event_id) else {
            verdict.foreign += 1;
            continue;
        };
        if build != event.build_id || STATUSES[index] != event.status {
            verdict.foreign += 1;
        }
        if seen.insert(event.event_id, event.status).is_some() {
            verdict.duplicates += 1;
            continue;
        }
        // A gap is a missing transition (counted above); going back is disorder.
        if last_index.get(&build).is_some_and(|last| index <= *last) {
            disordered.insert(build);
        }
        last_index.insert(build, index);
    }
    verdict.distinct = seen.len();
    verdict.missing = expected.keys().filter(|id| !seen.contains_key(id)).count();
    verdict.out_of_order = disordered.len();
    verdict
}

/// Feeds the transitions at `rate` per second: writer `w` of `writers` takes builds
/// `w, w + writers, ...`, ten builds
/// at a time through their four statuses, except the transitions in `skip` (committed by an
/// earlier incarnation). `commit` commits one and returns its event id.
async fn feed<F, Fut>(
    builds: &[Build],
    skip: Arc<std::collections::HashSet<(i64, usize)>>,
    writers: usize,
    rate: f64,
    commit: F,
) -> HashMap<Uuid, (i64, usize)>
where
    F: Fn(Build, BuildStatus) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Uuid> + Send,
{
    let interval = Duration::from_secs_f64(writers as f64 / rate);
    let mut tasks = Vec::new();
    for w in 0..writers {
        let mine: Vec<Build> = builds.iter().skip(w).step_by(writers).cloned().collect();
        let commit = commit.clone();
        let skip = skip.clone();
        tasks.push(tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            let mut ids = Vec::new();
            for group in mine.chunks(10) {
                for (index, status) in STATUSES.iter().enumerate() {
                    for build in group {
                        if skip.contains(&(build.id, index)) {
                            continue;
                        }
                        ticks.tick().await;
                        let id = commit(at_status(build, *status), *status).await;
                        ids.push((id, (build.id, index)));
                    }
                }
            }
            ids
        }));
    }
    let mut expected = HashMap::new();
    for task in tasks {
        expected.extend(task.await.expect("writer"));
    }
    expected
}

/// Its logs go to the test's stderr only with `CHILD_LOG` set (e.g. `CHILD_LOG=warn`): a broker
/// stop makes librdkafka complain every few hundred milliseconds.
fn relay_process(scene: &Scene, port: u16) -> Child {
    let log = std::env::var("CHILD_LOG").ok();
    Command::new(BIN)
        .args(["relay", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--poll-interval", "200ms", "--depth-interval", "500ms"])
        .args(["--delivery-timeout", "3s"])
        .env("HOOKLINE_KAFKA_BROKERS", &scene.broker.bootstrap)
        .env("HOOKLINE_TOPIC", &scene.topic)
        .env("HOOKLINE_DATABASE_URL", database_url())
        .env("HOOKLINE_DATABASE_SCHEMA", &scene.schema)
        .env("RUST_LOG", log.as_deref().unwrap_or("error"))
        .stdout(Stdio::null())
        .stderr(if log.is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .kill_on_drop(true)
        .spawn()
        .expect("start hookline-producer relay")
}

/// SIGKILLs the process in `slot` at each of `chaos.kills` and starts a new one at once.
async fn kill_and_restart(
    chaos: &Chaos,
    started: Instant,
    slot: Arc<tokio::sync::Mutex<Option<Child>>>,
    restart: impl Fn() -> Option<Child>,
) -> usize {
    let mut killed = 0;
    for at in &chaos.kills {
        tokio::time::sleep_until((started + *at).into()).await;
        if kill(&slot, started, &restart).await {
            killed += 1;
        }
    }
    killed
}

/// SIGKILLs the process in `slot`, if it still runs, and starts a new one; whether it killed.
async fn kill(
    slot: &tokio::sync::Mutex<Option<Child>>,
    started: Instant,
    restart: impl Fn() -> Option<Child>,
) -> bool {
    let mut guard = slot.lock().await;
    let Some(child) = guard.as_mut() else {
        return false;
    };
    // A client that already finished cannot be killed any more.
    if child.try_wait().expect("child status").is_some() {
        return false;
    }
    child.start_kill().expect("SIGKILL");
    child.wait().await.expect("reaped");
    eprintln!("SIGKILL at {:?}", started.elapsed());
    *guard = restart();
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_outbox_relay_loses_nothing_under_sigkills_and_a_broker_stop() {
    let test_started = Instant::now();
    let scene = Scene::new().await;
    let chaos = Chaos::draw(false);
    eprintln!("outbox scenario: {chaos:?}");
    let port = free_port();
    let relay = Arc::new(tokio::sync::Mutex::new(Some(relay_process(&scene, port))));

    let started = Instant::now();
    let pool = scene.store.pool().clone();
    let feeding = feed(
        &scene.builds,
        Arc::default(),
        WRITERS,
        RATE,
        move |build, status| {
            let pool = pool.clone();
            async move {
                let mut tx = pool.begin().await.expect("begin");
                write_build(&mut *tx, &build).await.expect("build row");
                let id = Outbox::record(&mut *tx, &OutboxTransition::new(build.id, status))
                    .await
                    .expect("outbox row");
                tx.commit().await.expect("commit");
                id
            }
        },
    );
    let restart = || Some(relay_process(&scene, port));
    let (expected, killed, ()) = tokio::join!(
        feeding,
        kill_and_restart(&chaos, started, relay.clone(), restart),
        scene.broker_outage(&chaos, started, async {})
    );
    let fed = started.elapsed();
    assert_eq!(expected.len(), TRANSITIONS);
    assert_eq!(killed, KILLS, "every kill hit a running relay");

    // Drained: nothing left in the outbox (bound fixed in advance).
    let drain_started = Instant::now();
    hookline_tests::poll_until("the outbox to drain", Duration::from_secs(120), || async {
        let depth = Outbox::depth(scene.store.pool()).await.ok()?;
        (depth.rows == 0).then_some(())
    })
    .await;
    let drained = drain_started.elapsed();
    let depth = Outbox::depth(scene.store.pool()).await.unwrap();
    if let Some(child) = relay.lock().await.as_mut() {
        child.start_kill().ok();
    }
    let v = tokio::task::spawn_blocking({
        let brokers = scene.broker.bootstrap.clone();
        let topic = scene.topic.clone();
        move || verdict(&brokers, &topic, &expected)
    })
    .await
    .unwrap();
    println!(
        "outbox-scenario {}",
        json!({
            "via": "outbox", "seed": chaos.seed, "transitions_committed": TRANSITIONS,
            "records": v.records, "distinct": v.distinct, "missing": v.missing,
            "duplicates": v.duplicates, "foreign": v.foreign, "out_of_order_builds": v.out_of_order,
            "dead_rows": depth.dead, "relay_kills": killed,
            "feed_s": fed.as_secs_f64(), "drain_after_feed_s": drained.as_secs_f64(),
            "test_s": test_started.elapsed().as_secs_f64(),
        })
    );
    assert_eq!(
        v.missing, 0,
        "every committed transition reaches Kafka: {v:?}"
    );
    assert_eq!(v.distinct, TRANSITIONS, "{v:?}");
    assert_eq!(
        v.foreign, 0,
        "repeats carry their row's own event id: {v:?}"
    );
    assert_eq!(
        v.out_of_order, 0,
        "each build's events in commit order: {v:?}"
    );
    assert_eq!(depth.dead, 0, "no row was buried");
}

/// The HTTP client's writers: each waits for Kafka's ack before its next transition (the outbox
/// writers only for their commit), so more of them keep the same rate.
const CLIENT_WRITERS: usize = 16;
const CLIENT_SCHEMA: &str = "HOOKLINE_CRASH_CLIENT_SCHEMA";
const CLIENT_PRODUCER: &str = "HOOKLINE_CRASH_CLIENT_PRODUCER";

/// The CI client of the HTTP scenario as a process of its own: this test binary again, running
/// only [`crash_client_child`].
fn client_process(scene: &Scene, producer_url: &str) -> Child {
    Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "crash_client_child", "--ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CLIENT_SCHEMA, &scene.schema)
        .env(CLIENT_PRODUCER, producer_url)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start the CI client")
}

/// The CI client of the HTTP scenario (run by the test above as a child process; does nothing
/// otherwise). Like a CI that notifies after commit: each transition commits the build row and
/// a ledger row (the test's record of what the CI committed), then POSTs the transition until
/// it gets `202`. Started again after a SIGKILL, it goes on with the next transitions: what the
/// killed process had committed but not handed over is never sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "the CI client process of a_client_that_crashes_between_commit_and_post_loses_transitions"]
async fn crash_client_child() {
    let (Ok(schema), Ok(producer)) = (std::env::var(CLIENT_SCHEMA), std::env::var(CLIENT_PRODUCER))
    else {
        return;
    };
    let store = PgStore::connect(&PgOptions {
        max_connections: (CLIENT_WRITERS + 1) as u32,
        ..PgOptions::new(database_url()).schema(schema)
    })
    .await
    .expect("database");
    let pool = store.pool().clone();
    let committed: Vec<(i64, i32)> = sqlx::query_as("SELECT build_id, idx FROM crash_ledger")
        .fetch_all(&pool)
        .await
        .expect("ledger");
    let skip: std::collections::HashSet<(i64, usize)> = committed
        .into_iter()
        .map(|(b, i)| (b, i as usize))
        .collect();
    let client = reqwest::Client::new();
    let url = format!("{producer}/v1/transitions");
    feed(
        &builds(),
        Arc::new(skip),
        CLIENT_WRITERS,
        RATE,
        move |build, status| {
            let pool = pool.clone();
            let client = client.clone();
            let url = url.clone();
            async move {
                let event_id = Uuid::new_v4();
                let index = STATUSES.iter().position(|s| *s == status).unwrap() as i32;
                let mut tx = pool.begin().await.expect("begin");
                write_build(&mut *tx, &build).await.expect("build row");
                sqlx::query(
                    "INSERT INTO crash_ledger (event_id, build_id, idx) VALUES ($1, $2, $3)",
                )
                .bind(event_id)
                .bind(build.id)
                .bind(index)
                .execute(&mut *tx)
                .await
                .expect("ledger row");
                tx.commit().await.expect("commit");
                let body = json!({"build_id": build.id, "status": status, "event_id": event_id});
                loop {
                    match client.post(&url).json(&body).send().await {
                        Ok(r) if r.status().as_u16() == 202 => break,
                        Ok(r) if r.status().as_u16() != 503 => {
                            panic!("transition refused: {}", r.status())
                        }
                        _ => tokio::time::sleep(Duration::from_millis(500)).await,
                    }
                }
                event_id
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_crashes_between_commit_and_post_loses_transitions() {
    let test_started = Instant::now();
    let scene = Scene::new().await;
    sqlx::query(
        "CREATE TABLE crash_ledger (event_id UUID PRIMARY KEY, build_id BIGINT NOT NULL, idx INT NOT NULL)",
    )
    .execute(scene.store.pool())
    .await
    .expect("ledger table");
    let chaos = Chaos::draw(true);
    eprintln!("HTTP scenario: {chaos:?}");
    let mut config = EmitterConfig::new(&scene.broker.bootstrap);
    config.topic = scene.topic.clone();
    config.delivery_timeout = Duration::from_secs(3);
    let flags = Flags::load(
        Arc::new(PgFlagStore::new(scene.store.pool().clone())),
        Duration::from_secs(5),
    )
    .await
    .expect("flags");
    let producer = Producer::start(config, Arc::new(scene.store.clone()), flags, |state| {
        hookline_producer::AppState {
            retry_after: Duration::from_secs(1),
            ..state
        }
    })
    .await;
    let client = Arc::new(tokio::sync::Mutex::new(Some(client_process(
        &scene,
        &producer.url,
    ))));
    let started = Instant::now();
    let restart = || Some(client_process(&scene, &producer.url));
    let kill_while_down = async {
        let wait = chaos.kill_after_stop.expect("drawn for the HTTP scenario");
        tokio::time::sleep(wait).await;
        kill(&client, started, restart).await
    };
    let killed_while_down = std::sync::atomic::AtomicUsize::new(0);
    let (killed, ()) = tokio::join!(
        kill_and_restart(&chaos, started, client.clone(), restart),
        scene.broker_outage(&chaos, started, async {
            if kill_while_down.await {
                killed_while_down.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        })
    );
    let killed = killed + killed_while_down.into_inner();
    assert!(killed >= 1, "the client was killed at least once");
    hookline_tests::poll_until("the CI client to finish", Duration::from_secs(180), || {
        let client = client.clone();
        async move {
            let mut guard = client.lock().await;
            let status = guard.as_mut()?.try_wait().expect("client status")?;
            assert!(status.success(), "the client failed: {status}");
            Some(())
        }
    })
    .await;
    let fed = started.elapsed();
    producer.stop().await;
    let ledger: Vec<(Uuid, i64, i32)> =
        sqlx::query_as("SELECT event_id, build_id, idx FROM crash_ledger")
            .fetch_all(scene.store.pool())
            .await
            .expect("ledger");
    let expected: HashMap<Uuid, (i64, usize)> = ledger
        .into_iter()
        .map(|(id, build, idx)| (id, (build, idx as usize)))
        .collect();
    let committed = expected.len();
    let v = tokio::task::spawn_blocking({
        let brokers = scene.broker.bootstrap.clone();
        let topic = scene.topic.clone();
        move || verdict(&brokers, &topic, &expected)
    })
    .await
    .unwrap();
    println!(
        "outbox-scenario {}",
        json!({
            "via": "http", "seed": chaos.seed, "transitions_committed": committed,
            "records": v.records, "distinct": v.distinct, "missing": v.missing,
            "duplicates": v.duplicates, "foreign": v.foreign, "out_of_order_builds": v.out_of_order,
            "client_kills": killed, "feed_s": fed.as_secs_f64(),
            "test_s": test_started.elapsed().as_secs_f64(),
        })
    );
    assert_eq!(
        committed, TRANSITIONS,
        "the CI committed every transition once"
    );
    assert!(
        v.missing > 0,
        "a client killed between commit and POST (one kill lands while Kafka is away) loses what it committed: {v:?}"
    );
}

/// Enough writers that the commits keep up with 1,000/s on a busy machine.
const BENCH_WRITERS: usize = 16;

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "a measurement, not a check: run it on purpose (see docs/measurements.md)"]
async fn outbox_latency_and_throughput() {
    let bin = std::env::var("HOOKLINE_RELAY_BIN").unwrap_or_else(|_| BIN.to_owned());
    let brokers = hookline_tests::kafka_brokers();
    let topic = unique_name("outbox_bench");
    hookline_tests::create_topic(&topic, 4).await;
    let schema = unique_name("outbox_bench");
    let store = PgStore::connect(&PgOptions {
        max_connections: (BENCH_WRITERS + 2) as u32,
        ..PgOptions::new(database_url()).schema(schema.clone())
    })
    .await
    .expect("database");
    for p in 0..PROJECTS {
        write_snapshot(&store, &sample(p as i64 * 1_000_000))
            .await
            .unwrap();
    }
    let relay = |port: u16| {
        Command::new(&bin)
            .args(["relay", "--listen", &format!("127.0.0.1:{port}")])
            .env("HOOKLINE_KAFKA_BROKERS", &brokers)
            .env("HOOKLINE_TOPIC", &topic)
            .env("HOOKLINE_DATABASE_URL", database_url())
            .env("HOOKLINE_DATABASE_SCHEMA", &schema)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start the relay")
    };
    let port = free_port();
    let mut running = relay(port);

    // The reader: when each event id arrived, from a consumer that waits at most 5 ms per fetch.
    let (arrived_tx, mut arrived_rx) = tokio::sync::mpsc::unbounded_channel::<(Uuid, Instant)>();
    let stop_reading = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (brokers, topic, stop) = (brokers.clone(), topic.clone(), stop_reading.clone());
        std::thread::spawn(move || {
            let consumer: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", &brokers)
                .set("group.id", unique_name("bench"))
                .set("fetch.wait.max.ms", "5")
                .create()
                .unwrap();
            let mut assignment = TopicPartitionList::new();
            for p in 0..4 {
                assignment
                    .add_partition_offset(&topic, p, Offset::Beginning)
                    .unwrap();
            }
            consumer.assign(&assignment).unwrap();
            let codec = Codec::embedded();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                    let at = Instant::now();
                    let event = futures::executor::block_on(codec.decode(m.payload().unwrap()))
                        .unwrap()
                        .event;
                    let _ = arrived_tx.send((event.event_id, at));
                }
            }
        })
    };

    // Latency: 20,000 transitions at 1,000/s, each committed in its own transaction.
    let committed: Arc<std::sync::Mutex<HashMap<Uuid, Instant>>> = Arc::default();
    let pool = store.pool().clone();
    let log = committed.clone();
    let started = Instant::now();
    let expected = feed(
        &builds(),
        Arc::default(),
        BENCH_WRITERS,
        1_000.0,
        move |build, status| {
            let pool = pool.clone();
            let log = log.clone();
            async move {
                let mut tx = pool.begin().await.unwrap();
                write_build(&mut *tx, &build).await.unwrap();
                let id = Outbox::record(&mut *tx, &OutboxTransition::new(build.id, status))
                    .await
                    .unwrap();
                tx.commit().await.unwrap();
                log.lock().unwrap().insert(id, Instant::now());
                id
            }
        },
    )
    .await;
    let fed = started.elapsed();
    let mut latencies = Vec::with_capacity(expected.len());
    let deadline = Instant::now() + Duration::from_secs(60);
    while latencies.len() < expected.len() && Instant::now() < deadline {
        let Ok(Some((id, at))) =
            tokio::time::timeout(Duration::from_secs(1), arrived_rx.recv()).await
        else {
            continue;
        };
        if let Some(commit) = committed.lock().unwrap().get(&id) {
            latencies.push(at.duration_since(*commit).as_secs_f64() * 1e3);
        }
    }
    assert_eq!(latencies.len(), expected.len(), "every event arrived");
    latencies.sort_by(f64::total_cmp);
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // Throughput: 20,000 rows waiting (relay stopped), then one relay drains them.
    running.start_kill().unwrap();
    running.wait().await.unwrap();
    sqlx::query(
        "SELECT hookline_outbox_record(b.id, 'running') FROM builds b, generate_series(1, 4)",
    )
    .execute(store.pool())
    .await
    .unwrap();
    let backlog = Outbox::depth(store.pool()).await.unwrap().rows;
    let drain_started = Instant::now();
    let _running = relay(free_port());
    hookline_tests::poll_until("the backlog to drain", Duration::from_secs(300), || async {
        (Outbox::depth(store.pool()).await.ok()?.rows == 0).then_some(())
    })
    .await;
    let drain = drain_started.elapsed();
    stop_reading.store(true, std::sync::atomic::Ordering::Relaxed);
    reader.join().unwrap();
    println!(
        "outbox-bench {}",
        json!({
            "relay_bin": bin, "transitions": expected.len(), "feed_s": fed.as_secs_f64(),
            "rate_per_s": expected.len() as f64 / fed.as_secs_f64(),
            "commit_to_consumed_ms_p50": percentile(&latencies, 0.50),
            "commit_to_consumed_ms_p99": percentile(&latencies, 0.99),
            "commit_to_consumed_ms_max": latencies.last(),
            "backlog_rows": backlog, "drain_s": drain.as_secs_f64(),
            "drain_rows_per_s": backlog as f64 / drain.as_secs_f64(),
        })
    );
    for line in metrics
        .lines()
        .filter(|l| l.starts_with("hookline_relay_commit_to_ack"))
    {
        println!("{line}");
    }
}
