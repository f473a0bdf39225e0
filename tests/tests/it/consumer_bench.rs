//! Throughput and latency of the consumer, end to end (Kafka to a local receiver), on the real
//! broker, each against a baseline measured in the same run. A measurement, not a test: run it on
//! purpose and read the figures it prints.
//!
//! ```text
//! eval "$(scripts/stack env)"
//! cargo test --release -p hookline-tests --test consumer_bench -- --ignored --nocapture
//! ```
//!
//! - Throughput: a backlog of inline events drained by hookline, and by a bare pipeline (a plain
//!   consumer that POSTs each record's payload with the same concurrency, no decode, no hooks, no
//!   offsets discipline). The ratio is what hookline's guarantees cost.
//! - Latency: events produced at a steady rate well below capacity, so the figure is the
//!   pipeline's own latency (produce call to receiver), not time spent queueing in a backlog.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hookline_schemas::{BuildEvent, BuildStatus, Codec, SchemaVersion};
use hookline_tests::world::{World, inline_event};
use hookline_tests::{Receiver, kafka_brokers, poll_until, unique_name};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Message};
use tokio::sync::Semaphore;

const BACKLOG: usize = 5_000;
const BUILDS: usize = 100;
const PACED: usize = 1_000;
const PACED_PER_SECOND: u64 = 250;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn deliveries_per_second_and_event_to_delivery_latency() {
    let world = World::new(4).await;
    let first = world.build(8_000).await;
    let mut builds = vec![first.clone()];
    for i in 1..BUILDS as i64 {
        let mut b = first.clone();
        b.build.id += i;
        world.store_upsert_build(&b.build).await;
        builds.push(b);
    }
    let receiver = Receiver::start().await;
    world.hook(first.project.id, &receiver.url, None).await;
    let mut config = world.config();
    // The in-flight bound trades throughput for how much a crash may re-deliver (records stay
    // in flight until a commit covers them); HOOKLINE_BENCH_MAX_IN_FLIGHT measures other bounds.
    if let Some(n) = std::env::var("HOOKLINE_BENCH_MAX_IN_FLIGHT")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.max_in_flight = n;
    }
    // Strict ordering (the default) reads the (hook, build) order queue before each delivery;
    // HOOKLINE_BENCH_ORDERING=relaxed measures without it.
    if let Some(ordering) = std::env::var("HOOKLINE_BENCH_ORDERING")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        config.ordering = ordering;
    }
    let ordering = config.ordering;
    let group = config.group_id.clone();
    let max_in_flight = config.max_in_flight;
    let running = world.start(config).await;
    // Warm up: group joined, connections open, and an offset committed on every partition
    // (one event per build spreads over all of them). A partition with no committed offset
    // makes a restarted group look its offset up first, which costs a long-poll fetch
    // (`fetch.wait.max.ms`) of idle time that is start-up, not throughput.
    for b in &builds {
        world
            .send(&inline_event(b, BuildStatus::Created), SchemaVersion::V2)
            .await;
    }
    poll_until("warm-up deliveries", Duration::from_secs(60), || async {
        (receiver.count() >= BUILDS).then_some(())
    })
    .await;

    // Throughput, hookline: the consumer is stopped, the backlog produced, and the same group
    // resumed, so it drains exactly the backlog. Timed from the first to the last arrival, so
    // the group join is not counted.
    let events: Vec<_> = (0..BACKLOG)
        .map(|i| inline_event(&builds[i % BUILDS], BuildStatus::Running))
        .collect();
    running.stop().await;
    produce(&world, &events, None).await;
    let before = receiver.count();
    let mut config = world.config();
    config.group_id = group;
    config.max_in_flight = max_in_flight;
    config.ordering = ordering;
    let running = world.start(config).await;
    poll_until(
        "every backlog delivery",
        Duration::from_secs(300),
        || async { (receiver.count() >= before + BACKLOG).then_some(()) },
    )
    .await;
    let hookline_rate = arrival_rate(&receiver, before, BACKLOG);

    // Throughput, baseline: the same records, a bare consume-and-POST loop.
    let before = receiver.count();
    bare_pipeline(&world.topic, &receiver.url, BUILDS + BACKLOG, max_in_flight).await;
    let baseline_rate = arrival_rate(&receiver, before, BUILDS + BACKLOG);

    // Latency at a steady rate.
    let paced: Vec<_> = (0..PACED)
        .map(|i| inline_event(&builds[i % BUILDS], BuildStatus::Success))
        .collect();
    let before = receiver.count();
    let sent_at = produce(&world, &paced, Some(PACED_PER_SECOND)).await;
    poll_until("every paced delivery", Duration::from_secs(120), || async {
        (receiver.count() >= before + PACED).then_some(())
    })
    .await;
    let mut latencies: Vec<Duration> = receiver.received()[before..]
        .iter()
        .filter_map(|r| {
            Some(r.at.saturating_duration_since(*sent_at.get(r.header("x-gitlab-event-uuid")?)?))
        })
        .collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "throughput: {BACKLOG} inline events, {BUILDS} builds, 4 partitions, 1 hook, max in flight {max_in_flight}, ordering {ordering}: \
         hookline {hookline_rate:.0} deliveries/s, bare consume+POST baseline {baseline_rate:.0}/s, ratio {:.2}",
        hookline_rate / baseline_rate
    );
    println!(
        "latency at {PACED_PER_SECOND} events/s ({} deliveries), produce call to receiver: p50 {:?}, p99 {:?}, max {:?}",
        latencies.len(),
        pct(0.50),
        pct(0.99),
        latencies.last().unwrap()
    );
    running.stop().await;
}

/// Deliveries per second among the `count` requests the receiver got after the first `before`,
/// from the first arrival to the last.
fn arrival_rate(receiver: &Receiver, before: usize, count: usize) -> f64 {
    let got = receiver.received();
    let window = &got[before..before + count];
    let span = window.last().unwrap().at - window.first().unwrap().at;
    (count - 1) as f64 / span.as_secs_f64()
}

/// Produces `events` and, when paced (each send awaits its ack), returns when each was sent, by
/// event id.
async fn produce(
    world: &World,
    events: &[BuildEvent],
    per_second: Option<u64>,
) -> HashMap<String, Instant> {
    let codec = Codec::embedded();
    let mut sent = HashMap::with_capacity(events.len());
    let start = Instant::now();
    let mut acks = Vec::new();
    for (i, e) in events.iter().enumerate() {
        if let Some(rate) = per_second {
            tokio::time::sleep_until(
                (start + Duration::from_micros(i as u64 * 1_000_000 / rate)).into(),
            )
            .await;
        }
        let bytes = codec.encode(e).unwrap();
        let key = e.build_id.to_string();
        let sent_at = Instant::now();
        let ack = world
            .producer
            .send_result(FutureRecord::to(&world.topic).key(&key).payload(&bytes))
            .unwrap();
        let id = e.event_id.to_string();
        if per_second.is_some() {
            ack.await.unwrap().unwrap();
            sent.insert(id, sent_at);
        } else {
            acks.push(ack);
        }
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
    sent
}

/// Reads `count` records of `topic` from the start and POSTs each payload to `url`, at most
/// `concurrency` at a time.
async fn bare_pipeline(topic: &str, url: &str, count: usize, concurrency: usize) {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("bare"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[topic]).unwrap();
    let http = reqwest::Client::new();
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut tasks = tokio::task::JoinSet::new();
    let mut stream = consumer.stream();
    for _ in 0..count {
        let message = stream.next().await.unwrap().unwrap().detach();
        {
            let permit = permits.clone().acquire_owned().await.unwrap();
            let http = http.clone();
            let url = url.to_owned();
            // The inline payload sits after the Confluent header inside the Avro datum; the
            // bare pipeline posts the record as is: the cost of a POST of that size is the same.
            let body = message.payload().unwrap().to_vec();
            tasks.spawn(async move {
                http.post(url).body(body).send().await.unwrap();
                drop(permit);
            });
        }
    }
    while tasks.join_next().await.is_some() {}
}
