//! The bound on re-deliveries after a crash, with a slow hook holding the commit offset:
//! SIGKILL the real `hookline-consumer serve` mid-drain and start it again.
//!
//! The bound is stated in the README's guarantees (docs/guarantees.md): after a crash at most
//! `--max-in-flight` records per path are delivered again (being worked on, or finished but not
//! yet covered by a confirmed commit). A slow hook's records stay unfinished for long while the
//! records behind them finish; each commit names those finished records in its metadata, so the
//! restarted consumer skips them instead of delivering everything past the slow one again.

use std::time::Duration;

use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::process::ConsumerProcess;
use hookline_tests::world::{SlowReceiver, Tally, World, inline_event};
use hookline_tests::{Receiver, poll_until, unique_name};
use tokio::process::Child;

/// Fixed in advance: the stated bound, in records of the main path (the fast hook never fails,
/// so none of its deliveries goes through the retry path).
const MAX_IN_FLIGHT: usize = 32;
const EVENTS: usize = 300;
// Generous: a liveness bound only (the assertions are on duplicates), on a busy 2-core machine.
const WAIT: Duration = Duration::from_secs(240);

fn start(world: &World, group: &str, schema: &str) -> ConsumerProcess {
    let in_flight = MAX_IN_FLIGHT.to_string();
    ConsumerProcess::new(
        env!("CARGO_BIN_EXE_hookline-consumer"),
        world,
        group,
        schema,
    )
    .args(["--retry-schedule", "10ms,20ms", "--retry-hold", "500ms"])
    .args(["--max-in-flight", &in_flight, "--poll-batch", "32"])
    .args(["--hook-in-flight", "4", "--hook-wait", "200ms"])
    .args(["--kafka-option", "session.timeout.ms=6000"])
}

async fn metric(base: &str, series: &str) -> Option<f64> {
    let text = reqwest::get(format!("{base}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find(|l| l.starts_with(series))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

// Ignored until a defect it found is fixed: on the merged main, 3 runs of 4 never delivered
// every event to the slow hook after the restart (the fast hook's duplicates stayed within the
// bound each time, and the order queue held no unsettled entry). Run it by name with
// `--ignored` when working on that.
#[ignore = "slow hook not fully delivered after a SIGKILL in 3 of 4 runs: an open defect"]
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_drain_beside_a_slow_hook_delivers_again_at_most_the_in_flight_bound() {
    let world = World::new(2).await;
    let schema = world.store_schema().await;
    let fast = Receiver::start().await;
    let slow = SlowReceiver::start(Duration::from_millis(300)).await;
    let builds = world.builds(8_000, 30).await;
    let project = builds[0].project.id;
    world.hook(project, &fast.url, None).await;
    world.hook(project, &slow.url, None).await;
    let statuses = [
        BuildStatus::Pending,
        BuildStatus::Running,
        BuildStatus::Success,
    ];
    for i in 0..EVENTS {
        let b = &builds[i % builds.len()];
        let status = statuses[(i / builds.len()) % statuses.len()];
        world
            .send(&inline_event(b, status), SchemaVersion::V2)
            .await;
    }

    let group = unique_name("crash-bound");
    let mut first: Child = start(&world, &group, &schema).spawn();
    poll_until("a third of the fast hook's deliveries", WAIT, || async {
        (fast.count() >= EVENTS / 3).then_some(())
    })
    .await;
    first.kill().await.expect("SIGKILL");
    let at_kill = fast.count();

    let second = start(&world, &group, &schema);
    let base = second.base_url();
    let mut second: Child = second.spawn();
    let tally = poll_until("every event at the fast hook", WAIT, || async {
        let tally = Tally::of(&fast.received());
        (tally.pairs == EVENTS).then_some(tally)
    })
    .await;
    let skipped = poll_until("the restarted consumer's metrics", WAIT, || {
        let base = base.clone();
        async move {
            metric(
                &base,
                "hookline_consumer_records_skipped_total{path=\"main\",reason=\"finished\"}",
            )
            .await
        }
    })
    .await;
    let slow_tally = poll_until("every event at the slow hook", WAIT, || async {
        let tally = Tally::of(&slow.received());
        (tally.pairs == EVENTS).then_some(tally)
    })
    .await;
    second.kill().await.expect("stop");
    eprintln!(
        "crash bound: killed after {at_kill} of {EVENTS} fast deliveries; fast hook: {} arrivals, {} duplicates \
         (bound {MAX_IN_FLIGHT}); slow hook: {} duplicates; the restarted consumer skipped {skipped} records \
         its commit described as finished",
        tally.arrivals, tally.duplicates, slow_tally.duplicates
    );
    assert!(
        tally.duplicates <= MAX_IN_FLIGHT,
        "{} duplicates at the fast hook exceed the bound of {MAX_IN_FLIGHT}",
        tally.duplicates
    );
    assert!(
        slow_tally.duplicates <= 2 * MAX_IN_FLIGHT,
        "{} duplicates at the slow hook exceed the bound of {} (both paths)",
        slow_tally.duplicates,
        2 * MAX_IN_FLIGHT
    );
    assert!(
        skipped > 0.0,
        "the restarted consumer skipped nothing: the commit described no finished record past its offset"
    );
}
