//! Throughput and latency of the consumer, end to end (Kafka to a local receiver), on the real
//! broker. A measurement, not a test: run it on purpose and read the figures it prints.
//!
//! ```text
//! eval "$(scripts/stack env)"
//! cargo test --release -p hookline-tests --test consumer_bench -- --ignored --nocapture
//! ```

mod consumer_common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use consumer_common::{World, inline_event};
use hookline_schemas::{BuildStatus, Codec, SchemaVersion};
use hookline_tests::{Receiver, poll_until};
use rdkafka::producer::FutureRecord;
use rdkafka::util::Timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "benchmark: run with --ignored --nocapture"]
async fn deliveries_per_second_and_event_to_delivery_latency() {
    const EVENTS: usize = 5_000;
    const BUILDS: i64 = 100;
    let world = World::new(4).await;
    let first = world.build(8_000).await;
    let mut builds = vec![first.clone()];
    for i in 1..BUILDS {
        let mut b = first.clone();
        b.build.id += i;
        world.store_upsert_build(&b.build).await;
        builds.push(b);
    }
    let receiver = Receiver::start().await;
    world.hook(first.project.id, &receiver.url, None).await;
    let running = world.start(world.config()).await;
    // Warm up: group joined, connections open.
    world
        .send(
            &inline_event(&first, BuildStatus::Created),
            SchemaVersion::V2,
        )
        .await;
    poll_until("warm-up delivery", Duration::from_secs(60), || async {
        (receiver.count() >= 1).then_some(())
    })
    .await;

    let codec = Codec::embedded();
    let events: Vec<_> = (0..EVENTS)
        .map(|i| inline_event(&builds[i % builds.len()], BuildStatus::Running))
        .collect();
    let mut sent_at = HashMap::with_capacity(EVENTS);
    let start = Instant::now();
    let mut acks = Vec::with_capacity(EVENTS);
    for e in &events {
        let bytes = codec.encode(e).unwrap();
        let key = e.build_id.to_string();
        sent_at.insert(e.event_id.to_string(), Instant::now());
        acks.push(
            world
                .producer
                .send_result(FutureRecord::to(&world.topic).key(&key).payload(&bytes))
                .unwrap(),
        );
        if acks.len() >= 1_000 {
            for a in acks.drain(..) {
                a.await.unwrap().unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
    poll_until("every delivery", Duration::from_secs(300), || async {
        (receiver.count() > EVENTS).then_some(())
    })
    .await;
    let elapsed = start.elapsed();
    let mut latencies: Vec<Duration> = receiver
        .received()
        .iter()
        .filter_map(|r| Some(r.at - *sent_at.get(r.header("x-gitlab-event-uuid")?)?))
        .collect();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "{EVENTS} events over {BUILDS} builds, 4 partitions, 1 hook: {:.0} deliveries/s end to end ({elapsed:?}); event-to-delivery latency p50 {:?}, p99 {:?}, max {:?}",
        EVENTS as f64 / elapsed.as_secs_f64(),
        pct(0.50),
        pct(0.99),
        latencies.last().unwrap()
    );
    let _ = Timeout::Never;
    running.stop().await;
}
