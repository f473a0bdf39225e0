//! Documented promises that had no test of their own, each against the real broker, database
//! and loopback receivers: `Retry-After` honoured by the running consumer, one
//! `X-Gitlab-Event-UUID` for every hook of an event, `hook_disables_total`, the dead-letter reason
//! `bad_retry_record`, `--commit-interval`, the producer's `--batch-limit`, and both services
//! through a PostgreSQL outage.

use std::sync::Arc;
use std::time::Duration;

use hookline_cistate::fixtures::write_snapshot;
use hookline_cistate::{CiStore, PgOptions, PgStore};
use hookline_consumer::Outcome;
use hookline_consumer::config::ConsumerConfig;
use hookline_consumer::dead_letter;
use hookline_consumer::server::ServeConfig;
use hookline_producer::{AppState, EmitterConfig, Flags};
use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::pg_gate::PgGate;
use hookline_tests::producer::Producer;
use hookline_tests::world::{World, inline_event};
use hookline_tests::{Answer, Receiver, create_topic, kafka_brokers, pg_store, poll_until};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

/// docs/gitlab-compatibility.md, "Where hookline deliberately differs": `Retry-After` can
/// lengthen a wait, never shorten it. The schedule here is 20 ms; the receiver asks for 2 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_running_consumer_waits_as_long_as_retry_after_asks() {
    let world = World::new(1).await;
    let snapshot = world.build(71_000).await;
    let receiver = Receiver::start().await;
    receiver.script([Answer::RetryAfter(503, 2), Answer::Status(200)]);
    world.hook(snapshot.project.id, &receiver.url, None).await;
    let running = world.start(world.config()).await;
    world
        .send(
            &inline_event(&snapshot, BuildStatus::Running),
            SchemaVersion::V2,
        )
        .await;
    poll_until("the retried delivery", WAIT, || async {
        (receiver.count() == 2).then_some(())
    })
    .await;
    let got = receiver.received();
    let waited = got[1].at - got[0].at;
    // The first request is recorded before it is answered, so the consumer's wait starts after
    // this instant: the gap can only be longer than what was asked.
    assert!(
        waited >= Duration::from_secs(2),
        "retried after {waited:?}, Retry-After asked for 2 s"
    );
    assert_eq!(got[1].status, 200);
    running.stop().await;
}

/// `X-Gitlab-Event-UUID` is the event's id for every hook and every attempt; the
/// `Idempotency-Key` differs per hook. A hook's 4th consecutive failure disables it and counts in
/// `hook_disables_total`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_event_uuid_for_every_hook_and_a_fourth_failure_counts_a_disable() {
    let world = World::new(1).await;
    let snapshot = world.build(72_000).await;
    let ok = Receiver::start().await;
    let failing = Receiver::start().await;
    failing.answer_always(Answer::Status(503));
    let ok_hook = world.hook(snapshot.project.id, &ok.url, None).await;
    let failing_hook = world.hook(snapshot.project.id, &failing.url, None).await;
    let running = world.start(world.config()).await;
    assert_eq!(running.metrics.hook_disables(), 0);

    let event = inline_event(&snapshot, BuildStatus::Running);
    world.send(&event, SchemaVersion::V2).await;
    // The world's schedule has three retries: four attempts, four failures.
    poll_until("the failing hook's dead letter", WAIT, || async {
        (running.metrics.dead_letters(Some("retries_exhausted")) == 1).then_some(())
    })
    .await;
    poll_until("the delivery to the working hook", WAIT, || async {
        (ok.count() == 1).then_some(())
    })
    .await;
    let id = event.event_id.to_string();
    let mut keys = std::collections::HashSet::new();
    for r in ok.received().iter().chain(failing.received().iter()) {
        assert_eq!(r.header("x-gitlab-event-uuid"), Some(id.as_str()));
        keys.insert(r.header("idempotency-key").unwrap().to_owned());
    }
    assert_eq!(failing.count(), 4);
    assert_eq!(keys.len(), 2, "one Idempotency-Key per hook");

    assert_eq!(running.metrics.hook_disables(), 1);
    assert!(
        running
            .metrics
            .encode()
            .contains("hookline_consumer_hook_disables_total 1"),
        "exported as documented"
    );
    let failing_now = world.store.hook(failing_hook.id).await.unwrap().unwrap();
    assert!(matches!(
        failing_now.state(chrono::Utc::now()),
        hookline_cistate::HookState::TemporarilyDisabled(_)
    ));
    let ok_now = world.store.hook(ok_hook.id).await.unwrap().unwrap();
    assert_eq!(
        ok_now.state(chrono::Utc::now()),
        hookline_cistate::HookState::Executable
    );
    running.stop().await;
}

/// A retry-topic record without the task headers the consumer writes is dead-lettered as
/// `bad_retry_record` with its bytes, and does not hold the retry path up.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unreadable_retry_record_is_dead_lettered_as_bad_retry_record() {
    let world = World::new(1).await;
    let snapshot = world.build(73_000).await;
    let receiver = Receiver::start().await;
    receiver.script([Answer::Status(500)]);
    world.hook(snapshot.project.id, &receiver.url, None).await;
    let config = world.config();
    let running = world.start(config.clone()).await;

    world
        .producer
        .send(
            FutureRecord::to(&config.retry_topic)
                .key("stray")
                .payload(&b"no task headers"[..]),
            Timeout::After(Duration::from_secs(10)),
        )
        .await
        .map_err(|(e, _)| e)
        .unwrap();
    // A real retry after it still goes through.
    world
        .send(
            &inline_event(&snapshot, BuildStatus::Running),
            SchemaVersion::V2,
        )
        .await;
    poll_until("the bad_retry_record dead letter", WAIT, || async {
        (running.metrics.dead_letters(Some("bad_retry_record")) == 1).then_some(())
    })
    .await;
    poll_until("the retried delivery", WAIT, || async {
        (running.metrics.deliveries(Outcome::Delivered) == 1).then_some(())
    })
    .await;
    let letters = dead_letter::list(&config).await.unwrap();
    let letter = letters
        .iter()
        .find(|l| l.reason == "bad_retry_record")
        .expect("listed");
    assert_eq!(letter.value, b"no task headers");
    running.stop().await;
}

/// The main group's committed offset of partition 0.
fn committed(brokers: &str, group: &str, topic: &str) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    match got.find_partition(topic, 0).unwrap().offset() {
        Offset::Offset(n) => Some(n),
        _ => None,
    }
}

/// `--commit-interval 0` commits after every finished record; a longer interval leaves the
/// stored offset uncommitted until the interval (here longer than the test) or the shutdown.
/// The second instance must deliver only the second record: the first one's commit held.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_interval_is_honoured() {
    let world = World::new(1).await;
    let snapshot = world.build(74_000).await;
    let receiver = Receiver::start().await;
    world.hook(snapshot.project.id, &receiver.url, None).await;

    let every = world.config();
    let running = world.start(every.clone()).await;
    world
        .send(
            &inline_event(&snapshot, BuildStatus::Running),
            SchemaVersion::V2,
        )
        .await;
    poll_until("a commit right after the record", WAIT, || async {
        let (brokers, group, topic) = (
            every.brokers.clone(),
            every.group_id.clone(),
            every.topic.clone(),
        );
        let offset = tokio::task::spawn_blocking(move || committed(&brokers, &group, &topic))
            .await
            .unwrap();
        (offset == Some(1)).then_some(())
    })
    .await;
    running.stop().await;

    // The same group again, from its committed offset (1), committing hourly.
    let mut hourly = world.config();
    hourly.group_id = every.group_id.clone();
    hourly.commit_interval = Duration::from_secs(3600);
    let running = world.start(hourly.clone()).await;
    world
        .send(
            &inline_event(&snapshot, BuildStatus::Success),
            SchemaVersion::V2,
        )
        .await;
    poll_until("the second delivery", WAIT, || async {
        (running.metrics.deliveries(Outcome::Delivered) == 1).then_some(())
    })
    .await;
    // Offsets are stored once the delivery is settled, just after it is counted; give that
    // and a would-be commit ample time, then look: nothing may have been committed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (brokers, group, topic) = (
        hourly.brokers.clone(),
        hourly.group_id.clone(),
        hourly.topic.clone(),
    );
    let before_stop = tokio::task::spawn_blocking({
        let (brokers, group, topic) = (brokers.clone(), group.clone(), topic.clone());
        move || committed(&brokers, &group, &topic)
    })
    .await
    .unwrap();
    assert_eq!(before_stop, Some(1), "committed before the hour was up");
    assert_eq!(receiver.count(), 2, "each record delivered once");
    running.stop().await;
    let after_stop = tokio::task::spawn_blocking(move || committed(&brokers, &group, &topic))
        .await
        .unwrap();
    assert_eq!(after_stop, Some(2), "the shutdown commits what was stored");
}

/// `--batch-limit N`: a batch of more than N, or of none, is refused with 422 naming the body;
/// N itself is accepted.
#[tokio::test]
async fn batches_over_the_limit_or_empty_are_refused() {
    let topic = hookline_tests::unique_name("batch");
    create_topic(&topic, 1).await;
    let snapshot = hookline_cistate::fixtures::sample(75_000);
    let store = pg_store().await;
    write_snapshot(&store, &snapshot).await.unwrap();
    let store: Arc<dyn CiStore> = Arc::new(store);
    let mut config = EmitterConfig::new(kafka_brokers());
    config.topic = topic;
    let producer = Producer::start(config, store, Flags::in_memory(), |state| AppState {
        batch_limit: 3,
        ..state
    })
    .await;
    let item = json!({"build_id": snapshot.build.id, "status": "running"});
    let post = |items: Vec<serde_json::Value>| {
        let url = format!("{}/v1/transitions/batch", producer.url);
        async move {
            let response = reqwest::Client::new()
                .post(url)
                .header("content-type", "application/json")
                .body(serde_json::Value::Array(items).to_string())
                .send()
                .await
                .unwrap();
            let status = response.status().as_u16();
            (status, response.json::<serde_json::Value>().await.unwrap())
        }
    };
    for n in [4, 0] {
        let (status, body) = post(vec![item.clone(); n]).await;
        assert_eq!(status, 422, "{n} items: {body}");
        assert_eq!(body["field"], "body");
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .contains(&format!("a batch holds 1 to 3 transitions, not {n}")),
            "{body}"
        );
    }
    assert_eq!(producer.metrics.events_emitted("deferred"), 0);
    let (status, body) = post(vec![item; 3]).await;
    assert_eq!(status, 202, "{body}");
    producer.stop().await;
}

async fn status_of(url: String) -> Option<(u16, String)> {
    let response = reqwest::get(url).await.ok()?;
    Some((response.status().as_u16(), response.text().await.ok()?))
}

/// While PostgreSQL is away (every connection cut, new ones refused), the producer answers a
/// transition `503` with `Retry-After`, and both services' `/readyz` say `503` naming the store
/// while `/healthz` stays `200`; when it is back, both are ready again and the producer accepts
/// the same transition, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn both_services_answer_503_while_postgresql_is_away_and_recover() {
    let gate = PgGate::start().await;
    let schema = hookline_tests::unique_name("outage");
    let store = PgStore::connect(&PgOptions::new(gate.url()).schema(schema.clone()))
        .await
        .unwrap();
    let snapshot = hookline_cistate::fixtures::sample(76_000);
    write_snapshot(&store, &snapshot).await.unwrap();
    let topic = hookline_tests::unique_name("outage");
    create_topic(&topic, 1).await;
    let mut config = EmitterConfig::new(kafka_brokers());
    config.topic = topic.clone();
    let producer = Producer::start(config, Arc::new(store), Flags::in_memory(), |state| {
        AppState {
            retry_after: Duration::from_secs(3),
            ..state
        }
    })
    .await;

    let port = hookline_tests::free_port();
    let mut consumer = ConsumerConfig::new(kafka_brokers(), hookline_tests::unique_name("group"))
        .with_topic(&topic);
    consumer.kafka = vec![("session.timeout.ms".into(), "6000".into())];
    let shutdown = CancellationToken::new();
    let serving = tokio::spawn(hookline_consumer::serve(
        ServeConfig {
            consumer,
            database_url: gate.url(),
            database_schema: Some(schema),
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            listener: Default::default(),
            max_event_bytes: hookline_schemas::codec::DEFAULT_MAX_EVENT_BYTES,
            schema_registry_url: None,
            admin_token: None,
            admin_token_file: None,
            secrets: None,
        },
        shutdown.clone(),
    ));
    let consumer_url = format!("http://127.0.0.1:{port}");
    for base in [producer.url.clone(), consumer_url.clone()] {
        poll_until("/readyz 200", WAIT, || async {
            status_of(format!("{base}/readyz"))
                .await
                .filter(|(s, _)| *s == 200)
        })
        .await;
    }
    let transition = json!({
        "build_id": snapshot.build.id,
        "status": "running",
        "event_id": uuid::Uuid::new_v4(),
    })
    .to_string();
    let post = || async {
        let response = reqwest::Client::new()
            .post(format!("{}/v1/transitions", producer.url))
            .header("content-type", "application/json")
            .body(transition.clone())
            .send()
            .await
            .unwrap();
        let retry_after = response
            .headers()
            .get("retry-after")
            .map(|v| v.to_str().unwrap().to_owned());
        (response.status().as_u16(), retry_after)
    };

    gate.close();
    for base in [producer.url.clone(), consumer_url.clone()] {
        let (_, body) = poll_until("/readyz 503 naming the store", WAIT, || async {
            status_of(format!("{base}/readyz"))
                .await
                .filter(|(s, _)| *s == 503)
        })
        .await;
        assert!(body.contains("store"), "{base}: {body}");
        assert_eq!(
            status_of(format!("{base}/healthz")).await.map(|(s, _)| s),
            Some(200),
            "{base}: alive, only not ready"
        );
    }
    assert_eq!(post().await, (503, Some("3".to_owned())));
    assert_eq!(producer.metrics.events_emitted("deferred"), 0);

    gate.open();
    for base in [producer.url.clone(), consumer_url.clone()] {
        poll_until("/readyz 200 again", WAIT, || async {
            status_of(format!("{base}/readyz"))
                .await
                .filter(|(s, _)| *s == 200)
        })
        .await;
    }
    assert_eq!(post().await.0, 202, "the same transition, accepted now");
    shutdown.cancel();
    serving.await.unwrap().unwrap();
    producer.stop().await;
}

/// `--shutdown-timeout`: a transition in flight when the producer is told to stop (SIGTERM) is
/// still answered, then the producer stops. The request is known to be in flight because the
/// server asked for its body (`Expect: 100-continue`); its body arrives after the stop began.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_transition_in_flight_at_shutdown_is_still_answered() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let topic = hookline_tests::unique_name("drain");
    create_topic(&topic, 1).await;
    let snapshot = hookline_cistate::fixtures::sample(77_000);
    let store = pg_store().await;
    write_snapshot(&store, &snapshot).await.unwrap();
    let mut config = EmitterConfig::new(kafka_brokers());
    config.topic = topic;
    let producer = Producer::start(config, Arc::new(store), Flags::in_memory(), |s| s).await;

    let body = json!({"build_id": snapshot.build.id, "status": "running"}).to_string();
    let mut conn = tokio::net::TcpStream::connect(producer.url.trim_start_matches("http://"))
        .await
        .unwrap();
    conn.write_all(
        format!(
            "POST /v1/transitions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nExpect: 100-continue\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    while !String::from_utf8_lossy(&answer).contains("\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, conn.read(&mut chunk))
            .await
            .expect("the server asks for the body")
            .unwrap();
        assert!(n > 0, "closed before asking for the body");
        answer.extend_from_slice(&chunk[..n]);
    }
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 100"),
        "{}",
        String::from_utf8_lossy(&answer)
    );

    producer.begin_stop();
    conn.write_all(body.as_bytes()).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, conn.read_to_end(&mut rest))
        .await
        .expect("answered within the bound")
        .unwrap();
    let rest = String::from_utf8_lossy(&rest);
    assert!(rest.starts_with("HTTP/1.1 202"), "{rest}");
    assert_eq!(producer.metrics.events_emitted("deferred"), 1);
    producer.stop().await;
}

/// Services started before their database (a deployment bringing everything up at once) wait
/// for it instead of exiting: both processes stay up while PostgreSQL cannot be reached and are
/// ready once it can, without a restart. A database that never comes ends the wait with its
/// error after a bounded number of attempts; a refusal that asking again would not cure ends it
/// at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn services_started_before_postgresql_wait_for_it() {
    let gate = PgGate::start().await;
    gate.close();
    let schema = hookline_tests::unique_name("late_db");
    let topic = hookline_tests::unique_name("late_db");
    create_topic(&topic, 1).await;
    let producer_port = hookline_tests::free_port();
    let consumer_port = hookline_tests::free_port();
    let mut producer =
        tokio::process::Command::new(hookline_tests::service_bin("hookline-producer"))
            .args([
                "serve",
                "--no-auth",
                "--listen",
                &format!("127.0.0.1:{producer_port}"),
            ])
            .args(["--brokers", &kafka_brokers(), "--topic", &topic])
            .env("HOOKLINE_DATABASE_URL", gate.url())
            .env("HOOKLINE_DATABASE_SCHEMA", &schema)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start hookline-producer");
    let mut consumer =
        tokio::process::Command::new(hookline_tests::service_bin("hookline-consumer"))
            .args(["serve", "--listen", &format!("127.0.0.1:{consumer_port}")])
            .args(["--brokers", &kafka_brokers(), "--topic", &topic])
            .args(["--group-id", &hookline_tests::unique_name("group")])
            .env("HOOKLINE_DATABASE_URL", gate.url())
            .env("HOOKLINE_DATABASE_SCHEMA", &schema)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start hookline-consumer");

    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(producer.try_wait().unwrap().is_none(), "the producer waits");
    assert!(consumer.try_wait().unwrap().is_none(), "the consumer waits");
    gate.open();
    for port in [producer_port, consumer_port] {
        poll_until("/readyz 200 once PostgreSQL is reachable", WAIT, || async {
            status_of(format!("http://127.0.0.1:{port}/readyz"))
                .await
                .filter(|(s, _)| *s == 200)
        })
        .await;
    }
    producer.kill().await.unwrap();
    consumer.kill().await.unwrap();

    // Never reachable: the error, after the attempts asked for.
    gate.close();
    let started = std::time::Instant::now();
    let error = PgStore::connect_patiently(&PgOptions::new(gate.url()).schema(&schema), 3)
        .await
        .expect_err("the database stays away");
    assert!(
        matches!(error, hookline_cistate::StoreError::Unavailable(_)),
        "{error}"
    );
    // Two pauses between three attempts, the first at least 250 ms.
    assert!(started.elapsed() >= Duration::from_millis(250));
    // A refusal is not asked again: a schema name the store refuses, a database or a role the
    // server does not know.
    gate.open();
    let url = gate.url();
    let (base, _database) = url.rsplit_once('/').unwrap();
    for (what, refused) in [
        (
            "schema name",
            PgOptions::new(url.clone()).schema("no-dashes"),
        ),
        (
            "database",
            PgOptions::new(format!("{base}/no_such_database")),
        ),
        (
            "role",
            PgOptions::new(url.replacen("://hookline:", "://no_such_role:", 1)),
        ),
    ] {
        assert_ne!(
            (refused.url.as_str(), refused.schema.as_deref()),
            (url.as_str(), None)
        );
        let (started, before) = (std::time::Instant::now(), gate.connections());
        let error = PgStore::connect_patiently(&refused, 8)
            .await
            .expect_err("refused");
        assert!(
            matches!(error, hookline_cistate::StoreError::Invalid(_)),
            "an unknown {what}: {error}"
        );
        // Asked once: at most one connection reached the server (none for a schema name refused
        // before connecting), where the 8 attempts asked for would make 8. And well within the
        // ~17 s those attempts' pauses would take at the least (a bound a loaded machine keeps).
        let connections = gate.connections() - before;
        assert!(
            connections <= 1,
            "an unknown {what} was asked {connections} times"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "an unknown {what} is not retried"
        );
    }
}
