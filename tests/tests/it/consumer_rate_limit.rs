//! Rate limits per root namespace and the blocked-user re-check on the retry path, against the
//! real broker, the real PostgreSQL and loopback receivers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use hookline_cistate::{CiStore, RateLimitOverride};
use hookline_consumer::Outcome;
use hookline_consumer::config::RateLimitConfig;
use hookline_consumer::schedule::RetrySchedule;
use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::world::{World, inline_event};
use hookline_tests::{Answer, Received, Receiver, poll_until};

/// 600 a minute is one token every 100 ms: the option stays per minute, the test stays short.
const PER_MINUTE: u32 = 600;
const INTERVAL: Duration = Duration::from_millis(100);
/// A full bucket holds a second's worth: 10 tokens.
const BURST: Duration = Duration::from_secs(1);
const CAPACITY: usize = 10;

/// The first arrival of each event (at-least-once may repeat one), in arrival order.
fn first_arrivals(received: &[Received]) -> Vec<Instant> {
    let mut first: HashMap<String, Instant> = HashMap::new();
    for r in received {
        let id = r.header("x-gitlab-event-uuid").unwrap().to_owned();
        first.entry(id).or_insert(r.at);
    }
    let mut at: Vec<Instant> = first.into_values().collect();
    at.sort();
    at
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_flooding_namespace_is_spread_over_time_and_fully_delivered_while_another_goes_out_at_once()
 {
    let world = World::new(2).await;
    let flood = world.builds(61_000, 150).await;
    let quiet = world.builds(62_000, 5).await;
    assert_ne!(flood[0].namespace.id, quiet[0].namespace.id);
    let (flood_rx, quiet_rx) = (Receiver::start().await, Receiver::start().await);
    let flood_hook = world.hook(flood[0].project.id, &flood_rx.url, None).await;
    world.hook(quiet[0].project.id, &quiet_rx.url, None).await;
    let mut config = world.config();
    config.rate_limit = RateLimitConfig {
        per_minute: Some(PER_MINUTE),
        burst: BURST,
    };
    // Deferred tasks wait in memory up to their slot rather than re-circulating meanwhile.
    config.retry_hold = Duration::from_secs(20);
    let running = world.start(config).await;

    // The flood first, then the quiet namespace's few: they sit behind the whole flood on the
    // main topic.
    for s in &flood {
        world
            .send(&inline_event(s, BuildStatus::Running), SchemaVersion::V2)
            .await;
    }
    for s in &quiet {
        world
            .send(&inline_event(s, BuildStatus::Running), SchemaVersion::V2)
            .await;
    }
    poll_until(
        "every event of both namespaces",
        Duration::from_secs(60),
        || async {
            (first_arrivals(&flood_rx.received()).len() == flood.len()
                && first_arrivals(&quiet_rx.received()).len() == quiet.len())
            .then_some(())
        },
    )
    .await;
    let flooded = first_arrivals(&flood_rx.received());
    let quiet_at = first_arrivals(&quiet_rx.received());

    // The limit held: in any second, at most a full bucket plus a second's refill, plus a
    // bucket's worth of slack for deferred deliveries that left the retry path late and bunched.
    let window = Duration::from_secs(1);
    let bound = CAPACITY + (window.as_millis() / INTERVAL.as_millis()) as usize + CAPACITY;
    let mut busiest = 0;
    for (i, start) in flooded.iter().enumerate() {
        let in_window = flooded[i..]
            .iter()
            .take_while(|t| t.duration_since(*start) < window)
            .count();
        assert!(
            in_window <= bound,
            "{in_window} deliveries within {window:?} of arrival {i}; the limit allows {bound}"
        );
        busiest = busiest.max(in_window);
    }
    // ... which spread the flood over time (150 at 10/s after a bucket of 10).
    let spread = flooded.last().unwrap().duration_since(flooded[0]);
    assert!(
        spread >= INTERVAL * (flood.len() - 3 * CAPACITY) as u32,
        "the flood drained in {spread:?}"
    );
    eprintln!(
        "flood: {} events over {spread:?}, at most {busiest} in any {window:?}; quiet namespace's last {:?} after the flood's first",
        flooded.len(),
        quiet_at
            .last()
            .unwrap()
            .saturating_duration_since(flooded[0])
    );
    // The quiet namespace's bucket is its own: sent after the whole flood, all of it arrived
    // before the flood's last delivery (had it waited behind the flood's deferrals, it would
    // come after them). Order, not how fast this machine is.
    assert!(
        quiet_at.last().unwrap() < flooded.last().unwrap(),
        "the quiet namespace waited behind the flood"
    );
    // Deferred, not failed: no retry scheduled, no dead letter, the hook's health untouched.
    assert!(running.metrics.deferred("rate_limit") >= (flood.len() - 3 * CAPACITY) as u64);
    assert_eq!(running.metrics.deliveries(Outcome::Retried), 0);
    assert_eq!(running.metrics.dead_letters(None), 0);
    let hook = world.store.hook(flood_hook.id).await.unwrap().unwrap();
    assert_eq!(hook.recent_failures, 0, "a deferral is not a failure");
    assert!(
        flood_rx.received().iter().all(|r| r.status == 200),
        "every flood delivery was answered 200"
    );
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_namespace_override_lifts_the_default_and_the_overrides_are_listed_and_cleared() {
    let world = World::new(1).await;
    let builds = world.builds(63_000, 20).await;
    let namespace = builds[0].namespace.id;
    let store = world.store.as_ref();
    store.set_rate_limit(namespace, None).await.unwrap();
    store
        .set_rate_limit(namespace + 7, Some(120))
        .await
        .unwrap();
    assert_eq!(
        store.rate_limit_overrides().await.unwrap(),
        [
            RateLimitOverride {
                namespace_id: namespace,
                per_minute: None
            },
            RateLimitOverride {
                namespace_id: namespace + 7,
                per_minute: Some(120)
            },
        ]
    );
    assert!(store.clear_rate_limit(namespace + 7).await.unwrap());
    assert!(!store.clear_rate_limit(namespace + 7).await.unwrap());

    let receiver = Receiver::start().await;
    world.hook(builds[0].project.id, &receiver.url, None).await;
    let mut config = world.config();
    // One every 10 s by default: 20 events would take over three minutes.
    config.rate_limit = RateLimitConfig {
        per_minute: Some(6),
        burst: BURST,
    };
    let running = world.start(config).await;
    for s in &builds {
        world
            .send(&inline_event(s, BuildStatus::Running), SchemaVersion::V2)
            .await;
    }
    poll_until(
        "every event, unlimited",
        Duration::from_secs(30),
        || async { (first_arrivals(&receiver.received()).len() == builds.len()).then_some(()) },
    )
    .await;
    assert_eq!(running.metrics.deferred("rate_limit"), 0);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_retry_for_a_build_whose_user_was_blocked_meanwhile_is_dropped_and_counted() {
    let world = World::new(1).await;
    let blocked = world.build(64_000).await;
    let other = world.build(65_000).await;
    assert_ne!(blocked.user.id, other.user.id);
    let receiver = Receiver::start().await;
    // Both first attempts fail; then the receiver takes everything.
    receiver.script([Answer::Status(500), Answer::Status(500)]);
    world.hook(blocked.project.id, &receiver.url, None).await;
    world.hook(other.project.id, &receiver.url, None).await;
    let mut config = world.config();
    // Long enough to block the user between the first attempt and the retry.
    config.retry_schedule = RetrySchedule {
        jitter: 0.0,
        ..RetrySchedule::with_delays(vec![Duration::from_secs(3)])
    };
    let running = world.start(config).await;

    let dropped = inline_event(&blocked, BuildStatus::Running);
    let delivered = inline_event(&other, BuildStatus::Running);
    world.send(&dropped, SchemaVersion::V2).await;
    world.send(&delivered, SchemaVersion::V2).await;
    poll_until(
        "both first attempts refused and handed to the retry topic",
        Duration::from_secs(30),
        || async { (running.metrics.retries_scheduled() == 2).then_some(()) },
    )
    .await;
    let mut user = blocked.user.clone();
    user.blocked = true;
    world.store.upsert_user(&user).await.unwrap();

    poll_until(
        "the blocked user's retry dropped",
        Duration::from_secs(30),
        || async { (running.metrics.retries_dropped("user_blocked") == 1).then_some(()) },
    )
    .await;
    // The other build's retry goes out: the retry path itself works.
    poll_until(
        "the other build's retry delivered",
        Duration::from_secs(30),
        || async { (running.metrics.deliveries(Outcome::Delivered) == 1).then_some(()) },
    )
    .await;
    let sent: Vec<(String, u16)> = receiver
        .received()
        .iter()
        .map(|r| {
            (
                r.header("x-gitlab-event-uuid").unwrap().to_owned(),
                r.status.as_u16(),
            )
        })
        .collect();
    let of = |id: uuid::Uuid| sent.iter().filter(|(e, _)| *e == id.to_string()).count();
    assert_eq!(
        of(dropped.event_id),
        1,
        "only the refused first attempt: {sent:?}"
    );
    assert_eq!(of(delivered.event_id), 2, "{sent:?}");
    // Dropped as the main path skips a blocked user's event: no dead letter.
    assert_eq!(running.metrics.dead_letters(None), 0);
    running.stop().await;
}
