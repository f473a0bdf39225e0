//! The consumer's reliability claims, each exercised as stated and counted: a broker that goes
//! away mid-run (cleanly, then by SIGKILL), consumer instances joining and leaving a group
//! mid-run, an instance joining while every delivery of the other hangs, and a hook that is
//! temporarily disabled. The tests that move work check that each (event, hook) pair reaches its
//! receiver, count the duplicates and hold them to the in-flight bound.
//!
//! ```text
//! eval "$(scripts/stack env)"
//! cargo test -p hookline-tests --test consumer_reliability -- --nocapture
//! ```

use std::time::{Duration, Instant};

use chrono::Utc;
use hookline_cistate::{CiStore, HookState};
use hookline_consumer::Outcome;
use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::world::{SlowReceiver, Tally, World, inline_event, mixed_events};
use hookline_tests::{Answer, PrivateBroker, Receiver, poll_until};

/// Small, so that the bound on duplicates is tight enough to mean something.
const MAX_IN_FLIGHT: usize = 16;
const HOOKS: usize = 2;
const WAIT: Duration = Duration::from_secs(60);
/// Re-assignments the broker test allows: the member rejoins after each of the two outages,
/// possibly more than once while the broker settles. Fixed in advance, so the duplicate bound
/// (which grows with them) stays well below the run's size and can fail.
const MAX_REBALANCES: usize = 8;

/// The consumer's logs, when `RUST_LOG` asks for them (a failing run is read with
/// `RUST_LOG=hookline_consumer=debug`).
fn logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// How long the receivers of the mid-run tests take to answer: long enough that deliveries are
/// in flight whenever the test acts, short enough that the runs stay brief.
const ANSWER_AFTER: Duration = Duration::from_millis(50);

/// Waits until `receiver` has answered `n` requests and returns how many it has.
async fn arrivals_reach(receiver: &SlowReceiver, n: usize, what: &str) -> usize {
    poll_until(what, WAIT, || async {
        let count = receiver.count();
        (count >= n).then_some(count)
    })
    .await
}

/// Waits until every one of `pairs` (event, hook) pairs reached `receiver`.
async fn every_pair(receiver: &SlowReceiver, pairs: usize) -> Tally {
    poll_until("every (event, hook) pair", WAIT, || async {
        let tally = Tally::of(&receiver.received());
        (tally.pairs == pairs).then_some(tally)
    })
    .await
}

/// The broker stops cleanly a third of the way in and is killed (SIGKILL) two thirds of the way
/// in, each time coming back with its data. The consumer is never restarted: it reconnects,
/// delivers everything, and re-delivers at most its in-flight records per outage.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_stopped_then_killed_mid_run_loses_no_delivery_and_the_consumer_rides_it_out() {
    logs();
    let broker = tokio::task::spawn_blocking(PrivateBroker::start)
        .await
        .expect("start the private broker");
    let world = World::on(&broker.bootstrap, 2).await;
    let builds = world.builds(11_000, 12).await;
    let project = builds[0].project.id;
    let receiver = SlowReceiver::start(ANSWER_AFTER).await;
    world
        .hook(project, &format!("{}?a", receiver.url), None)
        .await;
    world
        .hook(project, &format!("{}?b", receiver.url), None)
        .await;
    let events = mixed_events(&builds, 25);
    let pairs = events.len() * HOOKS;

    let mut config = world.config();
    config.max_in_flight = MAX_IN_FLIGHT;
    config.poll_batch = MAX_IN_FLIGHT;
    let running = world.start(config).await;
    let n = pairs / HOOKS;
    // Each outage comes while the consumer is busy and before the last events are produced, so
    // the consumer must deliver events produced after the broker came back.
    let producing = world.send_paced(events, Duration::from_millis(5));
    producing.release(n / 2);
    let t0 = Instant::now();
    let at_stop = arrivals_reach(&receiver, pairs / 3, "a third of the deliveries").await;
    // The broker scripts block; block_in_place keeps the runtime's other workers serving the
    // consumer and the receiver meanwhile.
    tokio::task::block_in_place(|| broker.stop());
    let stopped = t0.elapsed();
    tokio::task::block_in_place(|| broker.restart());
    let back = t0.elapsed();
    producing.release(5 * n / 6);
    let at_kill = arrivals_reach(&receiver, 2 * pairs / 3, "two thirds of the deliveries").await;
    let killed = t0.elapsed();
    tokio::task::block_in_place(|| broker.kill());
    tokio::task::block_in_place(|| broker.restart());
    let back_again = t0.elapsed();

    let resent = producing.finish().await;
    let tally = every_pair(&receiver, pairs).await;
    eprintln!(
        "broker restart timeline: stopped at {stopped:?}, back at {back:?}, killed at {killed:?}, \
         back at {back_again:?}, every pair delivered at {:?}",
        t0.elapsed()
    );
    // A re-assignment (the member rejoining after an outage) re-delivers at most the records
    // past the committed offset, which the in-flight bound limits. Duplicate records written by
    // the test's own producer are not the consumer's doing.
    let rebalances = running.metrics.assignments("main").saturating_sub(1) as usize;
    let bound = MAX_REBALANCES * MAX_IN_FLIGHT * HOOKS + resent * HOOKS;
    assert!(
        bound < pairs,
        "a bound of {bound} duplicates could not fail a run of {pairs} pairs"
    );
    eprintln!(
        "broker restart: {pairs} pairs; broker stopped after {at_stop} arrivals and killed after {at_kill}; \
         {} arrivals, {} duplicates after {rebalances} rebalances (bound: {MAX_REBALANCES} rebalances x {MAX_IN_FLIGHT} in flight x {HOOKS} hooks \
         + {resent} records the test producer resent = {bound}); fetch paused {} times; delivered metric {}",
        tally.arrivals,
        tally.duplicates,
        running.metrics.fetch_pauses("main"),
        running.metrics.deliveries(Outcome::Delivered),
    );
    assert!(
        !running.handle.is_finished(),
        "the consumer stopped instead of riding out the outages"
    );
    assert!(
        rebalances <= MAX_REBALANCES,
        "{rebalances} re-assignments for two outages (at most {MAX_REBALANCES} allowed)"
    );
    assert!(
        tally.duplicates <= bound,
        "{} duplicates exceed the bound {bound}",
        tally.duplicates
    );
    assert_eq!(
        running.metrics.dead_letters(None),
        0,
        "nothing dead-lettered"
    );
    running.stop().await;
}

/// Two instances in one group on a 4-partition topic: the second joins a third of the way in,
/// the first leaves (its shutdown token) two thirds of the way in. Nothing is lost, the second
/// takes over, and because a revoked partition's offsets are never stored by the instance that
/// lost it, re-deliveries stay within the in-flight bound per rebalance.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_joining_and_leaving_the_group_mid_run_lose_nothing_and_duplicate_little() {
    logs();
    let world = World::new(4).await;
    let builds = world.builds(12_000, 16).await;
    let project = builds[0].project.id;
    let receiver = SlowReceiver::start(ANSWER_AFTER).await;
    world
        .hook(project, &format!("{}?a", receiver.url), None)
        .await;
    world
        .hook(project, &format!("{}?b", receiver.url), None)
        .await;
    let events = mixed_events(&builds, 30);
    let pairs = events.len() * HOOKS;

    let mut config = world.config();
    config.max_in_flight = MAX_IN_FLIGHT;
    config.poll_batch = MAX_IN_FLIGHT;
    let first = world.start(config.clone()).await;
    let n = pairs / HOOKS;
    // Each change of membership comes while the group is busy, and the last events are produced
    // only after the first instance left, so the second must have taken over its partitions.
    let producing = world.send_paced(events, Duration::from_millis(5));
    producing.release(n / 2);
    let at_join = arrivals_reach(&receiver, pairs / 3, "a third of the deliveries").await;
    let second = world.start(config.clone()).await;
    producing.release(5 * n / 6);
    let at_leave = arrivals_reach(&receiver, 2 * pairs / 3, "two thirds of the deliveries").await;
    let second_before_leave = second.metrics.deliveries(Outcome::Delivered);
    let first_metrics = first.metrics.clone();
    // Cancels the first instance's token and waits for its drain.
    first.stop().await;

    let resent = producing.finish().await;
    every_pair(&receiver, pairs).await;
    // Every arrival is a delivery one of the instances counted (each counts a delivery once the
    // receiver's answer is back, a moment after the receiver recorded it).
    let (tally, by_first, by_second) = poll_until(
        "every arrival counted as delivered by one of the instances",
        WAIT,
        || async {
            let tally = Tally::of(&receiver.received());
            let by_first = first_metrics.deliveries(Outcome::Delivered);
            let by_second = second.metrics.deliveries(Outcome::Delivered);
            ((by_first + by_second) as usize == tally.arrivals)
                .then_some((tally, by_first, by_second))
        },
    )
    .await;
    // Two rebalances (join, leave); at each, the instance giving up partitions has at most
    // MAX_IN_FLIGHT records past its committed offsets, each one delivery per hook.
    let rebalances = 2;
    let bound = rebalances * MAX_IN_FLIGHT * HOOKS + resent * HOOKS;
    eprintln!(
        "rebalance: {pairs} pairs; second instance joined after {at_join} arrivals, first left after {at_leave}; \
         delivered by the first {by_first}, by the second {by_second} ({second_before_leave} before the first left); \
         {} arrivals, {} duplicates (bound: {rebalances} rebalances x {MAX_IN_FLIGHT} in flight x {HOOKS} hooks \
         + {resent} resent records = {bound})",
        tally.arrivals, tally.duplicates,
    );
    assert!(
        by_second > 0,
        "the second instance never took over a partition"
    );
    assert!(
        tally.duplicates <= bound,
        "{} duplicates exceed the bound {bound}",
        tally.duplicates
    );
    assert_eq!(first_metrics.dead_letters(None), 0);
    assert_eq!(second.metrics.dead_letters(None), 0);
    second.stop().await;
}

/// Every delivery of the first instance hangs, so every in-flight permit is taken and stays
/// taken. A second instance joins the group: the first must still serve the rebalance (it pauses
/// fetching and keeps polling) so that the second gets a partition and delivers, rather than the
/// whole group waiting for the first instance's deliveries to time out. A dispatcher that only
/// waited for a permit would hold the rebalance for the delivery timeout (here 120 s); after a
/// broker restart, where commits fail until the member rejoins, it would wait for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_saturated_instance_still_serves_the_rebalance_a_joining_instance_needs() {
    logs();
    let world = World::new(2).await;
    let builds = world.builds(15_000, 8).await;
    let project = builds[0].project.id;
    let hanging = Receiver::start().await;
    hanging.answer_always(Answer::Hang);
    world.hook(project, &hanging.url, None).await;

    const ROOM: usize = 4;
    let mut config = world.config();
    config.max_in_flight = ROOM;
    config.poll_batch = ROOM;
    config.deliver.timeout = Duration::from_secs(120);
    config.drain_timeout = Duration::from_millis(500);
    let first = world.start(config.clone()).await;
    // Events of 8 builds, keyed by build id: both partitions get some.
    for (event, version) in mixed_events(&builds, 2) {
        world.send(&event, version).await;
    }
    let saturated = poll_until(
        "the first instance's in-flight room taken",
        WAIT,
        || async { (hanging.count() >= ROOM).then_some(hanging.count()) },
    )
    .await;
    assert_eq!(
        saturated, ROOM,
        "the first instance started more deliveries than its in-flight bound"
    );

    let joined = Instant::now();
    let second = world.start(config).await;
    // The second instance's partition starts from the earliest offset (nothing was committed),
    // so its first delivery is a request beyond the first instance's ROOM.
    let took = poll_until("a delivery by the joining instance", WAIT, || async {
        (hanging.count() > ROOM).then(|| joined.elapsed())
    })
    .await;
    eprintln!(
        "saturated rebalance: the joining instance's first delivery began {took:?} after it \
         started, while every delivery of the first instance hung (delivery timeout 120 s)"
    );
    assert!(!first.handle.is_finished() && !second.handle.is_finished());
    first.stop().await;
    second.stop().await;
}

/// A hook backing off after failures (GitLab's auto-disable: `disabled_until` in the future)
/// gets nothing while it is disabled, then every delivery due meanwhile, none dead-lettered;
/// the project's other hook is served all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn deliveries_to_a_temporarily_disabled_hook_are_deferred_not_dropped() {
    logs();
    let world = World::new(2).await;
    let builds = world.builds(13_000, 3).await;
    let project = builds[0].project.id;
    let healthy = Receiver::start().await;
    let backing_off = Receiver::start().await;
    world.hook(project, &healthy.url, None).await;
    let hook = world.hook(project, &backing_off.url, None).await;
    let mut config = world.config();
    // Every batch reads the hooks from the store, so the change below is seen at once.
    config.hook_cache_ttl = Duration::ZERO;
    // Strict ordering, whose held deliveries the counts below include.
    config.ordering = hookline_consumer::config::Ordering::Strict;
    let running = world.start(config).await;

    // The consumer is up and both hooks are served.
    world
        .send(
            &inline_event(&builds[0], BuildStatus::Created),
            SchemaVersion::V2,
        )
        .await;
    poll_until("the warm-up delivery to both hooks", WAIT, || async {
        (healthy.count() == 1 && backing_off.count() == 1).then_some(())
    })
    .await;

    // As after four failures in a row, with a back-off short enough for a test and long enough
    // that producing and consuming the 12 events below fits inside it several times over on a
    // loaded 2-core machine (they all must be deferred, none attempted).
    let backoff = Duration::from_secs(12);
    let (until, until_instant) = (
        Utc::now() + chrono::Duration::from_std(backoff).unwrap(),
        Instant::now() + backoff,
    );
    sqlx::query("UPDATE web_hooks SET recent_failures = 4, disabled_until = $2 WHERE id = $1")
        .bind(hook.id)
        .bind(until)
        .execute(world.store.pool())
        .await
        .expect("disable the hook for a while");
    assert!(matches!(
        world
            .store
            .hook(hook.id)
            .await
            .unwrap()
            .unwrap()
            .state(Utc::now()),
        HookState::TemporarilyDisabled(_)
    ));

    let events = mixed_events(&builds, 4);
    for (event, version) in &events {
        world.send(event, *version).await;
    }
    let n = events.len();
    poll_until("every event at the healthy hook", WAIT, || async {
        (healthy.count() == 1 + n).then_some(())
    })
    .await;
    let deferred_events = poll_until("every deferred event", WAIT, || async {
        (backing_off.count() == 1 + n).then(|| backing_off.received().split_off(1))
    })
    .await;

    let earliest = deferred_events.iter().map(|r| r.at).min().unwrap();
    eprintln!(
        "disabled hook: {n} events; healthy hook got {} ; disabled hook got {} deliveries, the first {:?} after disabled_until; \
         deferred {}, dead letters {}",
        healthy.count() - 1,
        deferred_events.len(),
        earliest.saturating_duration_since(until_instant),
        running.metrics.deliveries(Outcome::Deferred),
        running.metrics.dead_letters(None),
    );
    // The consumer compares wall-clock time with disabled_until, the receiver stamps a
    // monotonic Instant: allow the two clocks a few milliseconds of disagreement.
    assert!(
        earliest + Duration::from_millis(20) >= until_instant,
        "a delivery reached the hook {:?} before disabled_until",
        until_instant - earliest
    );
    let keys = Tally::of(&deferred_events);
    assert_eq!(
        (keys.pairs, keys.duplicates),
        (n, 0),
        "each event arrives once"
    );
    // Under strict ordering a build's first deferred delivery holds the build's
    // later events, which queue behind it rather than being deferred each on their own.
    assert_eq!(
        running.metrics.deliveries(Outcome::Deferred) + running.metrics.ordering("queued"),
        n as u64,
        "every event for the disabled hook was deferred or queued behind a deferred one (not attempted, not dropped)"
    );
    assert_eq!(
        running.metrics.ordering("held"),
        builds.len() as u64,
        "one held delivery per build"
    );
    assert_eq!(
        running.metrics.dead_letters(None),
        0,
        "nothing dead-lettered"
    );
    let after = world.store.hook(hook.id).await.unwrap().unwrap();
    assert_eq!(
        (after.recent_failures, after.disabled_until),
        (0, None),
        "a delivery after the back-off resets the hook's health"
    );
    running.stop().await;
}
