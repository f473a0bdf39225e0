//! The producer's promises under failure and the numbers operators watch, against real brokers
//! and the real PostgreSQL:
//!
//! - a broker stopped (or killed) mid-run and started again: every `202` is an event on the topic
//!   (zero acknowledged-but-lost), the outage is answered `503` with `Retry-After`, and the same
//!   producer answers `202` again once the broker is back. These run on a private broker.
//! - builds of blocked users send no hooks: the producer emits nothing for them (`200 skipped`),
//!   and the consumer skips deferred events whose build's user was blocked after the transition.
//! - `/metrics` counts events by timing, render time, payload bytes and flag evaluations exactly.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{CiStore, RenderSnapshot};
use hookline_producer::{AppState, Change, EmitterConfig, Flags, INLINE_FLAG};
use hookline_schemas::Codec;
use hookline_tests::producer::Producer;
use hookline_tests::world::World;
use hookline_tests::{PrivateBroker, Receiver, kafka_brokers, pg_store, poll_until, unique_name};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{Value, json};
use tokio::sync::Mutex;
use uuid::Uuid;

const RETRY_AFTER_SECS: u64 = 7;

/// The producer API in-process, as these tests run it.
async fn start_producer(
    brokers: &str,
    topic: &str,
    store: Arc<dyn CiStore>,
    flags: Flags,
    create_partitions: Option<i32>,
    delivery_timeout: Duration,
) -> Producer {
    let mut config = EmitterConfig::new(brokers);
    config.topic = topic.to_owned();
    config.delivery_timeout = delivery_timeout;
    config.create_topic_partitions = create_partitions;
    Producer::start(config, store, flags, |state| AppState {
        retry_after: Duration::from_secs(RETRY_AFTER_SECS),
        ..state
    })
    .await
}

/// One answer of the API.
#[derive(Debug, Clone)]
struct Answer {
    status: u16,
    retry_after: Option<String>,
    json: Value,
}

async fn post(client: &reqwest::Client, url: &str, body: String) -> Answer {
    let response = client
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("the producer answers");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let json = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        retry_after,
        json,
    }
}

/// Writes the sample world at each base and returns the snapshots.
async fn builds(store: &dyn CiStore, bases: &[i64]) -> Vec<RenderSnapshot> {
    let mut out = Vec::new();
    for base in bases {
        let snapshot = sample(*base);
        write_snapshot(store, &snapshot)
            .await
            .expect("write snapshot");
        out.push(snapshot);
    }
    out
}

/// Flags with inline rendering on for exactly these projects.
async fn inline_for(projects: &[i64]) -> Flags {
    let flags = Flags::in_memory();
    flags
        .set(
            INLINE_FLAG,
            "test",
            Change::Actors {
                enable: true,
                actors: projects.iter().map(|p| format!("Project:{p}")).collect(),
            },
        )
        .await
        .expect("set flag");
    flags
}

/// Every event id on `topic` (all partitions, from the beginning up to the high watermarks),
/// with repeats.
fn event_ids_on(brokers: &str, topic: &str) -> Vec<Uuid> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let metadata = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic)
        .map_or(0, |t| t.partitions().len() as i32);
    assert!(partitions > 0, "topic {topic} has no partitions");
    let mut ends = HashMap::new();
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        let (_, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .expect("watermarks");
        ends.insert(p, high);
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let codec = Codec::embedded();
    let mut next: HashMap<i32, i64> = ends.keys().map(|p| (*p, 0)).collect();
    let mut ids = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while next.iter().any(|(p, n)| *n < ends[p]) {
        assert!(
            Instant::now() < deadline,
            "reading {topic} back: at {next:?} of {ends:?}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(500)) else {
            continue;
        };
        let message = message.expect("consume");
        next.insert(message.partition(), message.offset() + 1);
        let bytes = message.payload().expect("value");
        let event = futures::executor::block_on(codec.decode(bytes))
            .expect("every record decodes")
            .event;
        ids.push(event.event_id);
    }
    ids
}

/// How the broker goes away.
#[derive(Debug, Clone, Copy)]
enum Outage {
    /// SIGTERM: a clean shutdown.
    Stop,
    /// SIGKILL.
    Kill,
}

/// Where the run was when a request started.
const UP: u8 = 0;
const GOING_DOWN: u8 = 1;
const RESTARTING: u8 = 2;
const RESTARTED: u8 = 3;

/// One request of the run.
#[derive(Debug)]
struct Sent {
    event_id: Uuid,
    phase_at_start: u8,
    answer: Answer,
}

/// Private brokers are heavy (a JVM each): run the outage tests one at a time.
static PRIVATE_BROKERS: Mutex<()> = Mutex::const_new(());

const REQUESTS: usize = 400;
const CONCURRENCY: usize = 8;
/// Requests kept back until the broker is back, so the run always ends with some.
const AFTER_RESTART: usize = 100;

/// A client posts `REQUESTS` transitions, `CONCURRENCY` at a time at a steady rate, while the
/// broker goes away after the first 60 answers and comes back once the outage has been answered
/// `503` at least 8 times; the last `AFTER_RESTART` requests wait for the broker to be back. The
/// producer is never restarted. Then the topic is read back and matched by event id.
async fn outage_loses_no_acknowledged_event(outage: Outage) {
    let _one_at_a_time = PRIVATE_BROKERS.lock().await;
    let broker = Arc::new(
        tokio::task::spawn_blocking(PrivateBroker::start)
            .await
            .expect("start a private broker"),
    );
    let store = pg_store().await;
    let snapshots = builds(&store, &[0, 200_000, 400_000, 600_000]).await;
    // Half the builds render inline, so both timings ride through the outage.
    let flags = inline_for(&[snapshots[0].project.id, snapshots[1].project.id]).await;
    let topic = unique_name("reliability");
    let producer = start_producer(
        &broker.bootstrap,
        &topic,
        Arc::new(store),
        flags,
        Some(2),
        Duration::from_secs(3),
    )
    .await;
    let url = format!("{}/v1/transitions", producer.url);
    let client = reqwest::Client::new();
    let warm = json!({"build_id": snapshots[0].build.id, "status": "created"}).to_string();
    poll_until(
        "the private broker accepts events",
        Duration::from_secs(60),
        || async { (post(&client, &url, warm.clone()).await.status == 202).then_some(()) },
    )
    .await;

    let (phase, phase_rx) = tokio::sync::watch::channel(UP);
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let unavailable = Arc::new(AtomicUsize::new(0));
    // One request every 60 ms at most: a steady client, so the budget of requests spans the
    // whole outage instead of being spent while the broker is still shutting down.
    let pace = Arc::new(Mutex::new({
        let mut ticker = tokio::time::interval(Duration::from_millis(60));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker
    }));
    let build_ids: Vec<i64> = snapshots.iter().map(|s| s.build.id).collect();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (mut phase, next, answered, unavailable, pace) = (
                phase_rx.clone(),
                next.clone(),
                answered.clone(),
                unavailable.clone(),
                pace.clone(),
            );
            let (client, url, build_ids) = (client.clone(), url.clone(), build_ids.clone());
            tokio::spawn(async move {
                let mut sent = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    if i >= REQUESTS {
                        return sent;
                    }
                    if i >= REQUESTS - AFTER_RESTART {
                        // However long the outage lasts, these are sent once the broker is back.
                        if phase.wait_for(|p| *p == RESTARTED).await.is_err() {
                            return sent;
                        }
                    }
                    pace.lock().await.tick().await;
                    let event_id = Uuid::new_v4();
                    let body = json!({
                        "build_id": build_ids[i % build_ids.len()],
                        "status": "running",
                        "event_id": event_id,
                    })
                    .to_string();
                    let phase_at_start = *phase.borrow();
                    let answer = post(&client, &url, body).await;
                    if answer.status == 503 {
                        unavailable.fetch_add(1, Ordering::SeqCst);
                    }
                    answered.fetch_add(1, Ordering::SeqCst);
                    sent.push(Sent {
                        event_id,
                        phase_at_start,
                        answer,
                    });
                }
            })
        })
        .collect();

    poll_until(
        "60 answers before the outage",
        Duration::from_secs(60),
        || {
            let answered = answered.clone();
            async move { (answered.load(Ordering::SeqCst) >= 60).then_some(()) }
        },
    )
    .await;
    phase.send_replace(GOING_DOWN);
    let down_at = Instant::now();
    tokio::task::spawn_blocking({
        let broker = broker.clone();
        move || match outage {
            Outage::Stop => broker.stop(),
            Outage::Kill => broker.kill(),
        }
    })
    .await
    .expect("broker goes away");
    poll_until(
        "8 requests answered 503 during the outage",
        Duration::from_secs(60),
        || {
            let unavailable = unavailable.clone();
            async move { (unavailable.load(Ordering::SeqCst) >= 8).then_some(()) }
        },
    )
    .await;
    phase.send_replace(RESTARTING);
    tokio::task::spawn_blocking({
        let broker = broker.clone();
        move || broker.restart()
    })
    .await
    .expect("broker restarts");
    let outage_took = down_at.elapsed();
    phase.send_replace(RESTARTED);

    let mut sent: Vec<Sent> = Vec::new();
    for worker in workers {
        sent.extend(worker.await.expect("client worker"));
    }
    let on_topic = tokio::task::spawn_blocking({
        let (brokers, topic) = (broker.bootstrap.clone(), topic.clone());
        move || event_ids_on(&brokers, &topic)
    })
    .await
    .expect("read the topic back");

    let on_topic_set: HashSet<Uuid> = on_topic.iter().copied().collect();
    let accepted: Vec<&Sent> = sent.iter().filter(|s| s.answer.status == 202).collect();
    let refused: Vec<&Sent> = sent.iter().filter(|s| s.answer.status == 503).collect();
    let other: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.answer.status != 202 && s.answer.status != 503)
        .collect();
    let lost: Vec<Uuid> = accepted
        .iter()
        .map(|s| s.event_id)
        .filter(|id| !on_topic_set.contains(id))
        .collect();
    let refused_but_written = refused
        .iter()
        .filter(|s| on_topic_set.contains(&s.event_id))
        .count();
    let duplicates = on_topic.len() - on_topic_set.len();
    let accepted_after_restart = accepted
        .iter()
        .filter(|s| s.phase_at_start == RESTARTED)
        .count();
    let refused_in = |phase: u8| refused.iter().filter(|s| s.phase_at_start == phase).count();
    println!(
        "{outage:?}: {} requests: {} x 202, {} x 503 (Retry-After), {} other; \
         acked but lost: {}; 503 but written anyway: {}; duplicates on topic: {}; \
         202 after the restart: {}; 503 by phase at start (up/going down/restarting/restarted): \
         {}/{}/{}/{}; records on topic: {} (+1 warm-up); outage {:.1} s",
        sent.len(),
        accepted.len(),
        refused.len(),
        other.len(),
        lost.len(),
        refused_but_written,
        duplicates,
        accepted_after_restart,
        refused_in(UP),
        refused_in(GOING_DOWN),
        refused_in(RESTARTING),
        refused_in(RESTARTED),
        on_topic.len().saturating_sub(1),
        outage_took.as_secs_f64(),
    );

    assert_eq!(sent.len(), REQUESTS);
    assert!(other.is_empty(), "only 202 or 503: {other:?}");
    assert!(
        lost.is_empty(),
        "acknowledged but not on the topic: {lost:?}"
    );
    assert!(refused.len() >= 8, "the outage was answered 503");
    for s in &refused {
        assert_eq!(
            s.answer.retry_after.as_deref(),
            Some(RETRY_AFTER_SECS.to_string().as_str()),
            "503 carries Retry-After: {:?}",
            s.answer
        );
    }
    assert!(
        sent.iter()
            .any(|s| s.phase_at_start == UP && s.answer.status == 202),
        "202 before the outage"
    );
    assert!(
        accepted_after_restart > 0,
        "the same producer answers 202 again once the broker is back"
    );
    assert_eq!(
        duplicates, 0,
        "the idempotent producer writes each event once"
    );
    // Once the producer has reconnected it stays healthy: after its first 202 since the
    // restart, every further transition is accepted. Judged by order (the answers after that
    // first 202), not by a window of wall-clock time, so a slow reconnect cannot fail it.
    let fresh = || {
        json!({
            "build_id": build_ids[0],
            "status": "running",
            "event_id": Uuid::new_v4(),
        })
        .to_string()
    };
    poll_until(
        "a 202 after the restart",
        Duration::from_secs(60),
        || async { (post(&client, &url, fresh()).await.status == 202).then_some(()) },
    )
    .await;
    for n in 0..2 * CONCURRENCY {
        let answer = post(&client, &url, fresh()).await;
        assert_eq!(
            answer.status, 202,
            "answer {n} after the producer was back: {answer:?}"
        );
    }
    producer.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_broker_loses_no_acknowledged_event_and_the_producer_recovers() {
    outage_loses_no_acknowledged_event(Outage::Stop).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_killed_broker_loses_no_acknowledged_event_and_the_producer_recovers() {
    outage_loses_no_acknowledged_event(Outage::Kill).await;
}

/// GitLab sends no hooks for builds of blocked users. The producer emits nothing for a build
/// whose user is blocked at the transition; the consumer skips a deferred event whose build's
/// user was blocked after it; an inline event was decided at its transition and is delivered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn builds_of_blocked_users_send_no_hooks() {
    let world = World::new(1).await;
    let blocked_before = world.build(10_000).await;
    let deferred_then_blocked = world.build(20_000).await;
    let inline_then_blocked = world.build(30_000).await;
    let sentinel = world.build(40_000).await;
    let block = |snapshot: &RenderSnapshot| {
        let mut user = snapshot.user.clone();
        user.blocked = true;
        let store = world.store.clone();
        async move { store.upsert_user(&user).await.expect("block user") }
    };
    block(&blocked_before).await;
    let flags = inline_for(&[inline_then_blocked.project.id]).await;
    let producer = start_producer(
        &kafka_brokers(),
        &world.topic,
        world.store.clone(),
        flags,
        None,
        Duration::from_secs(10),
    )
    .await;
    let url = format!("{}/v1/transitions", producer.url);
    let client = reqwest::Client::new();
    let transition =
        |s: &RenderSnapshot| json!({"build_id": s.build.id, "status": "running"}).to_string();

    let skipped = post(&client, &url, transition(&blocked_before)).await;
    assert_eq!(skipped.status, 200, "{:?}", skipped.json);
    assert_eq!(skipped.json["skipped"], "user_blocked");
    let deferred = post(&client, &url, transition(&deferred_then_blocked)).await;
    assert_eq!(
        (deferred.status, deferred.json["timing"].as_str()),
        (202, Some("deferred"))
    );
    let inline = post(&client, &url, transition(&inline_then_blocked)).await;
    assert_eq!(
        (inline.status, inline.json["timing"].as_str()),
        (202, Some("inline"))
    );
    // Blocked after their transitions were emitted, before the consumer delivers them.
    block(&deferred_then_blocked).await;
    block(&inline_then_blocked).await;
    let last = post(&client, &url, transition(&sentinel)).await;
    assert_eq!(last.status, 202, "{:?}", last.json);
    assert_eq!(producer.metrics.events_skipped("user_blocked"), 1);

    let on_topic = tokio::task::spawn_blocking({
        let topic = world.topic.clone();
        move || event_ids_on(&kafka_brokers(), &topic)
    })
    .await
    .unwrap();
    let id = |a: &Answer| {
        a.json["event_id"]
            .as_str()
            .unwrap()
            .parse::<Uuid>()
            .unwrap()
    };
    assert_eq!(
        on_topic,
        [id(&deferred), id(&inline), id(&last)],
        "no event for the build whose user was blocked at the transition"
    );

    let receiver = Receiver::start().await;
    for s in [
        &blocked_before,
        &deferred_then_blocked,
        &inline_then_blocked,
        &sentinel,
    ] {
        world.hook(s.project.id, &receiver.url, None).await;
    }
    let consumer = world.start(world.config()).await;
    // Deliveries of different builds run concurrently, so they may arrive in any order: wait
    // until the consumer has decided on every event (two delivered, one skipped).
    let wanted = [id(&inline).to_string(), id(&last).to_string()];
    poll_until(
        "the inline event and the sentinel delivered, the deferred one skipped",
        Duration::from_secs(30),
        || async {
            let uuids: Vec<String> = receiver
                .received()
                .iter()
                .filter_map(|r| r.header("x-gitlab-event-uuid").map(str::to_owned))
                .collect();
            (wanted.iter().all(|w| uuids.contains(w))
                && consumer.metrics.events_skipped("user_blocked") == 1)
                .then_some(())
        },
    )
    .await;
    let mut delivered: Vec<String> = receiver
        .received()
        .iter()
        .filter_map(|r| r.header("x-gitlab-event-uuid").map(str::to_owned))
        .collect();
    delivered.sort();
    let mut expected = wanted.to_vec();
    expected.sort();
    assert_eq!(
        delivered, expected,
        "the deferred event of the now-blocked user is not delivered; the inline one is"
    );
    assert_eq!(consumer.metrics.events_skipped("user_blocked"), 1);
    assert!(
        consumer
            .metrics
            .encode()
            .contains("hookline_consumer_events_skipped_total{reason=\"user_blocked\"} 1")
    );
    println!(
        "blocked users: producer skipped {}, consumer skipped {}, delivered {}",
        producer.metrics.events_skipped("user_blocked"),
        consumer.metrics.events_skipped("user_blocked"),
        delivered.len()
    );
    consumer.stop().await;
    producer.stop().await;
}

/// The exposition as `series -> value`, e.g. `hookline_producer_payload_bytes_count` -> 5.
fn parse_metrics(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// After inline and deferred events (and a skipped and an unknown build), `/metrics` shows
/// exactly what happened: events by timing, one render and one payload size per inline event
/// (their sums equal what the API reported per event), flag evaluations by result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_events_by_timing_render_cost_payload_sizes_and_flag_results() {
    let topic = unique_name("metrics");
    hookline_tests::create_topic(&topic, 2).await;
    let store = pg_store().await;
    let snapshots = builds(&store, &[0, 200_000, 400_000]).await;
    let (on, off, blocked) = (&snapshots[0], &snapshots[1], &snapshots[2]);
    let mut user = blocked.user.clone();
    user.blocked = true;
    store.upsert_user(&user).await.unwrap();
    let flags = inline_for(&[on.project.id]).await;
    let producer = start_producer(
        &kafka_brokers(),
        &topic,
        Arc::new(store),
        flags,
        None,
        Duration::from_secs(10),
    )
    .await;
    let client = reqwest::Client::new();
    let one = format!("{}/v1/transitions", producer.url);
    let batch = format!("{}/v1/transitions/batch", producer.url);

    const INLINE: usize = 5;
    const DEFERRED: usize = 3;
    let mut rendered_us = 0u64;
    let mut payload_bytes = 0u64;
    for status in ["created", "pending", "running", "success", "failed"] {
        let answer = post(
            &client,
            &one,
            json!({"build_id": on.build.id, "status": status}).to_string(),
        )
        .await;
        assert_eq!(
            (answer.status, answer.json["timing"].as_str()),
            (202, Some("inline"))
        );
        rendered_us += answer.json["render_time_us"].as_u64().unwrap();
        payload_bytes += answer.json["payload_bytes"].as_u64().unwrap();
    }
    let deferred = post(
        &client,
        &batch,
        json!([
            {"build_id": off.build.id, "status": "created"},
            {"build_id": off.build.id, "status": "pending"},
            {"build_id": off.build.id, "status": "running"},
        ])
        .to_string(),
    )
    .await;
    assert_eq!(deferred.status, 202, "{:?}", deferred.json);
    assert_eq!(deferred.json["accepted"], DEFERRED);
    let skipped = post(
        &client,
        &one,
        json!({"build_id": blocked.build.id, "status": "running"}).to_string(),
    )
    .await;
    assert_eq!(skipped.status, 200);
    let unknown = post(
        &client,
        &one,
        json!({"build_id": 987_654_321, "status": "running"}).to_string(),
    )
    .await;
    assert_eq!(unknown.status, 404);

    let text = producer.metrics_text().await;
    let m = parse_metrics(&text);
    let get = |series: &str| {
        m.get(series)
            .copied()
            .unwrap_or_else(|| panic!("{series} missing from /metrics:\n{text}"))
    };
    let (inline_n, deferred_n) = (INLINE as f64, DEFERRED as f64);
    assert_eq!(
        get("hookline_producer_events_emitted_total{timing=\"inline\"}"),
        inline_n
    );
    assert_eq!(
        get("hookline_producer_events_emitted_total{timing=\"deferred\"}"),
        deferred_n
    );
    assert_eq!(
        get("hookline_producer_emit_duration_seconds_count{timing=\"inline\"}"),
        inline_n
    );
    assert_eq!(
        get("hookline_producer_emit_duration_seconds_count{timing=\"deferred\"}"),
        deferred_n
    );
    // Deferred events render nothing: one render and one payload size per inline event.
    assert_eq!(
        get("hookline_producer_render_duration_seconds_count"),
        inline_n
    );
    assert_eq!(
        get("hookline_producer_render_duration_seconds_bucket{le=\"+Inf\"}"),
        inline_n
    );
    assert_eq!(get("hookline_producer_payload_bytes_count"), inline_n);
    assert_eq!(
        get("hookline_producer_payload_bytes_sum"),
        payload_bytes as f64,
        "the payload sizes the API reported, summed"
    );
    // The API reports whole microseconds (truncated), the histogram the exact time.
    let render_sum = get("hookline_producer_render_duration_seconds_sum");
    let reported = rendered_us as f64 / 1e6;
    assert!(
        render_sum >= reported - 1e-9 && render_sum < reported + inline_n * 1e-6 + 1e-9,
        "render time sum {render_sum} s vs {reported} s reported"
    );
    // Buckets are cumulative: never decreasing, ending at the count.
    let buckets: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with("hookline_producer_render_duration_seconds_bucket"))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse().ok())
        .collect();
    assert!(buckets.len() > 2 && buckets.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(
        get(
            "hookline_producer_flag_evaluations_total{flag=\"execute_build_hooks_inline\",result=\"on\"}"
        ),
        inline_n
    );
    assert_eq!(
        get(
            "hookline_producer_flag_evaluations_total{flag=\"execute_build_hooks_inline\",result=\"off\"}"
        ),
        deferred_n,
        "skipped and unknown builds evaluate no flag"
    );
    assert_eq!(
        get("hookline_producer_events_skipped_total{reason=\"user_blocked\"}"),
        1.0
    );
    assert_eq!(
        get("hookline_producer_produce_errors_total{kind=\"unknown_build\"}"),
        1.0
    );
    println!(
        "metrics: inline {inline_n}, deferred {deferred_n}, render sum {:.1} us (reported {rendered_us} us), \
         payload bytes sum {payload_bytes}, flag on {inline_n} / off {deferred_n}, skipped 1, unknown 1",
        render_sum * 1e6
    );
    producer.stop().await;
}
