//! The outbox relay's bounds, with the real `hookline-producer relay` binary, the real
//! PostgreSQL and a real broker:
//!
//! - SIGTERM while a batch waits for a hung broker: the relay exits within `--shutdown-timeout`,
//!   long before the batch's delivery timeout, and the rows it abandoned are published by the
//!   next relay.
//! - Three relays on one outbox at once: every row published exactly once, each build's events
//!   in commit order.
//! - The store going away under a running relay: it waits, stays up, and publishes every row
//!   once the store is back.
//! - A row whose event is over `--max-event-bytes`: set aside (never published, never holding
//!   the outbox), while other builds' rows go out.
//!
//! What is asserted is what a CI owner sees (rows on the topic, rows left in the outbox, the
//! process running or gone), not how the relay schedules its batches.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{CiStore, Outbox, OutboxTransition, PgOptions, PgStore, write_build};
use hookline_producer::flags::PgFlagStore;
use hookline_producer::{Change, Flags, INLINE_FLAG};
use hookline_schemas::{BuildEvent, BuildStatus, Codec};
use hookline_tests::pg_gate::PgGate;
use hookline_tests::{PrivateBroker, database_url, free_port, kafka_brokers, unique_name};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio::process::{Child, Command};
use uuid::Uuid;

const BIN: &str = env!("CARGO_BIN_EXE_hookline-producer");
const PARTITIONS: i32 = 4;
const WAIT: Duration = Duration::from_secs(90);
const STATUSES: [BuildStatus; 4] = [
    BuildStatus::Created,
    BuildStatus::Pending,
    BuildStatus::Running,
    BuildStatus::Success,
];

/// A topic on `brokers` and the CI state in a schema of its own: `builds` builds of the sample
/// project.
struct Scene {
    brokers: String,
    topic: String,
    schema: String,
    store: PgStore,
    build_ids: Vec<i64>,
}

impl Scene {
    async fn new(brokers: &str, builds: i64) -> Scene {
        let topic = unique_name("relay_events");
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .unwrap();
        for result in admin
            .create_topics(
                &[NewTopic::new(
                    &topic,
                    PARTITIONS,
                    TopicReplication::Fixed(-1),
                )],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await
            .expect("create topic")
        {
            result.expect("topic created");
        }
        let schema = unique_name("relay");
        let store = PgStore::connect(&PgOptions {
            max_connections: 8,
            ..PgOptions::new(database_url()).schema(schema.clone())
        })
        .await
        .expect("database");
        let snapshot = sample(0);
        write_snapshot(&store, &snapshot).await.unwrap();
        let mut build_ids = Vec::new();
        for i in 0..builds {
            let mut build = snapshot.build.clone();
            build.id += i;
            store.upsert_build(&build).await.unwrap();
            build_ids.push(build.id);
        }
        Scene {
            brokers: brokers.to_owned(),
            topic,
            schema,
            store,
            build_ids,
        }
    }

    /// `hookline-producer relay` on this scene, with `more` options; its store through
    /// `database_url` (a gate, or the database itself).
    fn relay(&self, database_url: &str, more: &[&str]) -> Child {
        let log = std::env::var("CHILD_LOG").ok();
        Command::new(BIN)
            .args(["relay", "--listen", &format!("127.0.0.1:{}", free_port())])
            .args(["--poll-interval", "200ms"])
            .args(more.iter().copied())
            .env("HOOKLINE_KAFKA_BROKERS", &self.brokers)
            .env("HOOKLINE_TOPIC", &self.topic)
            .env("HOOKLINE_DATABASE_URL", database_url)
            .env("HOOKLINE_DATABASE_SCHEMA", &self.schema)
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

    /// Commits `status` for `build_id`: the build row and its outbox row in one transaction, as
    /// a CI does. Returns the row's event id.
    async fn commit(&self, build_id: i64, status: BuildStatus) -> Uuid {
        let mut build = sample(0).build;
        build.id = build_id;
        build.status = status.as_str().to_owned();
        let mut tx = self.store.pool().begin().await.unwrap();
        write_build(&mut *tx, &build).await.unwrap();
        let id = Outbox::record(&mut *tx, &OutboxTransition::new(build_id, status))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        id
    }

    async fn outbox_rows(&self) -> i64 {
        Outbox::depth(self.store.pool()).await.unwrap().rows
    }

    /// Waits until the outbox is empty.
    async fn drained(&self, within: Duration) {
        hookline_tests::poll_until("the outbox drained", within, || async {
            (self.outbox_rows().await == 0).then_some(())
        })
        .await;
    }

    /// Every record of the topic, decoded, partition by partition in offset order.
    async fn records(&self) -> Vec<BuildEvent> {
        let (brokers, topic) = (self.brokers.clone(), self.topic.clone());
        tokio::task::spawn_blocking(move || read_all(&brokers, &topic))
            .await
            .unwrap()
    }
}

fn read_all(brokers: &str, topic: &str) -> Vec<BuildEvent> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in 0..PARTITIONS {
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
    let mut by_partition: HashMap<i32, Vec<BuildEvent>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
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
        by_partition
            .entry(message.partition())
            .or_default()
            .push(event);
    }
    (0..PARTITIONS)
        .flat_map(|p| by_partition.remove(&p).unwrap_or_default())
        .collect()
}

/// Each expected event on the topic exactly once, and each build's events in commit order
/// (`expected`: event id -> (build, its index among the build's commits)).
fn assert_once_in_order(records: &[BuildEvent], expected: &HashMap<Uuid, (i64, usize)>) {
    let mut seen = HashMap::new();
    let mut last: HashMap<i64, usize> = HashMap::new();
    for event in records {
        let (build, index) = *expected
            .get(&event.event_id)
            .unwrap_or_else(|| panic!("an event nobody committed: {event:?}"));
        assert_eq!(event.build_id, build);
        assert!(
            seen.insert(event.event_id, ()).is_none(),
            "{} published twice",
            event.event_id
        );
        if let Some(before) = last.insert(build, index) {
            assert!(
                before < index,
                "build {build}: commit {index} published after commit {before}"
            );
        }
    }
    assert_eq!(seen.len(), expected.len(), "events missing from the topic");
}

/// SIGTERM, then the time until the process is gone and how it ended.
async fn terminate(child: &mut Child, within: Duration) -> (Duration, std::process::ExitStatus) {
    let pid = child.id().expect("running");
    let sent = Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let status = tokio::time::timeout(within, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the relay still runs {within:?} after SIGTERM"))
        .unwrap();
    (sent.elapsed(), status)
}

/// Locks rows of this scene's outbox: a relay holds a claimed batch (FOR UPDATE) while it
/// waits for Kafka's acks.
async fn batch_in_flight(scene: &Scene) -> bool {
    sqlx::query_scalar::<_, i64>(
        "SELECT count(*) FROM pg_locks l
         JOIN pg_class c ON c.oid = l.relation
         JOIN pg_namespace n ON n.oid = c.relnamespace
         WHERE n.nspname = $1 AND c.relname = 'hookline_outbox' AND l.mode = 'RowShareLock'",
    )
    .bind(&scene.schema)
    .fetch_one(scene.store.pool())
    .await
    .unwrap()
        > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_while_a_batch_waits_for_a_hung_broker_exits_within_the_shutdown_timeout() {
    let broker = Arc::new(
        tokio::task::spawn_blocking(PrivateBroker::start)
            .await
            .unwrap(),
    );
    let scene = Scene::new(&broker.bootstrap, 10).await;
    let shutdown = Duration::from_secs(2);
    let mut relay = scene.relay(
        &database_url(),
        &["--shutdown-timeout", "2s", "--delivery-timeout", "60s"],
    );
    let mut expected = HashMap::new();
    for &b in &scene.build_ids {
        expected.insert(scene.commit(b, BuildStatus::Created).await, (b, 0));
    }
    scene.drained(WAIT).await;

    // The broker hangs; the next rows are claimed and wait for acks that do not come.
    let pause = broker.clone();
    tokio::task::spawn_blocking(move || pause.pause())
        .await
        .unwrap();
    for &b in &scene.build_ids {
        expected.insert(scene.commit(b, BuildStatus::Pending).await, (b, 1));
    }
    hookline_tests::poll_until("a batch waiting for Kafka", WAIT, || async {
        batch_in_flight(&scene).await.then_some(())
    })
    .await;
    // Bounded by the shutdown timeout plus the time to close, far below the 60 s the batch
    // itself would wait for its acks.
    // (Its exit status is not asserted: today it exits 1, reporting the failed final flush of
    // the records it abandoned, although abandoning them at the bound is the documented end.)
    let (took, status) = terminate(&mut relay, shutdown + Duration::from_secs(15)).await;
    eprintln!("relay: SIGTERM to exit {took:?} (shutdown timeout {shutdown:?}), {status}");
    assert_eq!(
        scene.outbox_rows().await,
        scene.build_ids.len() as i64,
        "the abandoned batch's rows are still in the outbox"
    );

    let resume = broker.clone();
    tokio::task::spawn_blocking(move || resume.resume())
        .await
        .unwrap();
    let mut next = scene.relay(&database_url(), &[]);
    scene.drained(WAIT).await;
    terminate(&mut next, Duration::from_secs(60)).await;
    // The abandoned rows may have reached the broker before it hung (published again: the
    // duplicates the README describes); every row is there, each build in commit order.
    let records = scene.records().await;
    let mut first = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for event in records {
        if seen.insert(event.event_id) {
            first.push(event);
        }
    }
    assert_once_in_order(&first, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_relays_at_once_publish_every_row_once_in_commit_order() {
    let scene = Arc::new(Scene::new(&kafka_brokers(), 60).await);
    let mut relays: Vec<Child> = (0..3)
        .map(|_| scene.relay(&database_url(), &["--batch-size", "20"]))
        .collect();
    // Four writers, each committing its builds' transitions in order, interleaved.
    let mut writers = Vec::new();
    for w in 0..4 {
        let scene = scene.clone();
        writers.push(tokio::spawn(async move {
            let mine: Vec<i64> = scene.build_ids.iter().skip(w).step_by(4).copied().collect();
            let mut ids = Vec::new();
            for (index, status) in STATUSES.iter().enumerate() {
                for &b in &mine {
                    ids.push((scene.commit(b, *status).await, (b, index)));
                }
            }
            ids
        }));
    }
    let mut expected = HashMap::new();
    for w in writers {
        expected.extend(w.await.unwrap());
    }
    scene.drained(WAIT).await;
    for relay in &mut relays {
        assert!(
            relay.try_wait().unwrap().is_none(),
            "a relay exited on its own"
        );
        terminate(relay, Duration::from_secs(60)).await;
    }
    assert_once_in_order(&scene.records().await, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_store_outage_under_the_relay_is_waited_out_and_every_row_goes_out() {
    let scene = Scene::new(&kafka_brokers(), 20).await;
    let gate = PgGate::start().await;
    let mut relay = scene.relay(&gate.url(), &[]);
    let mut expected = HashMap::new();
    for &b in &scene.build_ids {
        expected.insert(scene.commit(b, BuildStatus::Created).await, (b, 0));
    }
    scene.drained(WAIT).await;

    // The relay loses its database; the CI keeps committing (it has its own connection).
    gate.close();
    for (index, status) in STATUSES.iter().enumerate().skip(1) {
        for &b in &scene.build_ids {
            expected.insert(scene.commit(b, *status).await, (b, index));
        }
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay exited while its store was away"
    );
    assert_eq!(
        scene.outbox_rows().await,
        3 * scene.build_ids.len() as i64,
        "nothing published while the store is away"
    );
    gate.open();
    scene.drained(WAIT).await;
    assert!(relay.try_wait().unwrap().is_none());
    terminate(&mut relay, Duration::from_secs(60)).await;
    assert_once_in_order(&scene.records().await, &expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_over_max_event_bytes_is_set_aside_and_other_builds_go_on() {
    let scene = Scene::new(&kafka_brokers(), 1).await;
    // A second project whose pipeline carries a long commit message (within its own bound):
    // its inline Job Hooks are over the relay's --max-event-bytes.
    let mut big = sample(1_000_000);
    big.pipeline.commit_message = "A long commit message. ".repeat(400);
    write_snapshot(&scene.store, &big).await.unwrap();
    let flags = Flags::load(
        Arc::new(PgFlagStore::new(scene.store.pool().clone())),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    flags
        .set(INLINE_FLAG, "test", Change::Boolean(true))
        .await
        .unwrap();
    let small = scene.build_ids[0];
    let mut relay = scene.relay(&database_url(), &["--max-event-bytes", "4000"]);
    let mut expected = HashMap::new();
    let mut oversized = Vec::new();
    for (index, status) in STATUSES.iter().enumerate() {
        oversized.push(
            Outbox::record(
                scene.store.pool(),
                &OutboxTransition::new(big.build.id, *status),
            )
            .await
            .unwrap(),
        );
        expected.insert(scene.commit(small, *status).await, (small, index));
    }
    scene.drained(WAIT).await;
    assert!(
        relay.try_wait().unwrap().is_none(),
        "the relay exited over a row it cannot publish"
    );
    terminate(&mut relay, Duration::from_secs(60)).await;
    // The small build's events all went out, in order; none of the big one's.
    assert_once_in_order(&scene.records().await, &expected);
    let dead: Vec<(Uuid, String)> =
        sqlx::query_as("SELECT event_id, reason FROM hookline_outbox_dead ORDER BY id")
            .fetch_all(scene.store.pool())
            .await
            .unwrap();
    assert_eq!(
        dead.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        oversized,
        "{dead:?}"
    );
    assert!(
        dead.iter().all(|(_, reason)| !reason.is_empty()),
        "{dead:?}"
    );
}
