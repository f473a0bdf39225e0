//! One slow receiver must not slow anyone else: a hook that answers after seconds (never
//! failing) with a backlog of its own, and other projects' hooks that answer at once, on the
//! real broker and database.
//!
//! ```text
//! scripts/test -p hookline-tests --test it -- consumer_fairness::
//! ```

use std::collections::HashMap;
use std::time::Duration;

use hookline_cistate::RenderSnapshot;
use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::world::{SlowReceiver, Tally, World, inline_event};
use hookline_tests::{Received, Receiver, poll_until};

/// The slow hook's answer time: inside the delivery timeout below, so it never fails.
const SLOW: Duration = Duration::from_secs(2);
const WAIT: Duration = Duration::from_secs(120);
const STATUSES: [BuildStatus; 4] = [
    BuildStatus::Created,
    BuildStatus::Pending,
    BuildStatus::Running,
    BuildStatus::Success,
];

fn status_of(r: &Received) -> (i64, String) {
    let body = r.json();
    (
        body["build_id"].as_i64().expect("build_id"),
        body["build_status"]
            .as_str()
            .expect("build_status")
            .to_owned(),
    )
}

/// Every build's statuses in the order its receiver got them.
fn by_build(received: &[Received]) -> HashMap<i64, Vec<String>> {
    let mut out: HashMap<i64, Vec<String>> = HashMap::new();
    for r in received {
        let (build, status) = status_of(r);
        out.entry(build).or_default().push(status);
    }
    out
}

/// Project A's hook answers after 2 s and has 40 events (10 builds, each created, pending,
/// running, success) waiting when the consumer starts; four other projects' hooks answer at
/// once. The others' 40 events, sent once A's deliveries are under way, all arrive while A's
/// receiver has answered only a few of its own: A holds its hook's slots, not the window.
/// Then every one of A's events arrives too, each build's in transition order (strict
/// ordering holds for the slow hook's builds, also for the deliveries it handed on).
///
/// Before the engine's fairness (a shared window of records, permits held until a commit passed
/// them), A's records filled the window and the partitions' commit positions, and the others'
/// events arrived only after most of A's had been answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_slow_hook_holds_its_own_slots_and_every_other_hook_is_served_meanwhile() {
    let world = World::new(4).await;
    let slow = SlowReceiver::start(SLOW).await;
    let fast = Receiver::start().await;

    let a_builds = world.builds(20_000, 10).await;
    let slow_hook = world.hook(a_builds[0].project.id, &slow.url, None).await;
    let mut others: Vec<RenderSnapshot> = Vec::new();
    for p in 0..4 {
        let builds = world.builds(21_000 + p * 1_000, 5).await;
        world
            .hook(builds[0].project.id, &format!("{}?p={p}", fast.url), None)
            .await;
        others.extend(builds);
    }

    // A's backlog, each build's transitions in order.
    for status in STATUSES {
        for b in &a_builds {
            world
                .send(&inline_event(b, status), SchemaVersion::V2)
                .await;
        }
    }

    let mut config = world.config();
    config.max_in_flight = 16;
    config.poll_batch = 16;
    config.hook_in_flight = 4;
    config.hook_wait = Duration::from_millis(300);
    config.deliver.timeout = Duration::from_secs(10);
    let running = world.start(config).await;

    poll_until("the slow hook's first request", WAIT, || async {
        (slow.begun() > 0).then_some(())
    })
    .await;

    let mut sent = 0;
    for status in [BuildStatus::Pending, BuildStatus::Success] {
        for b in &others {
            world
                .send(&inline_event(b, status), SchemaVersion::V2)
                .await;
            sent += 1;
        }
    }
    let slow_answered_then = poll_until("every other project's event", WAIT, || async {
        (fast.count() >= sent).then(|| slow.count())
    })
    .await;
    eprintln!(
        "fairness: the others' {sent} events all arrived when the slow hook had answered {slow_answered_then} of its 40 \
         (begun {}); handed on so far: {}",
        slow.begun(),
        running.metrics.deferred("hook_busy"),
    );
    assert!(
        slow_answered_then < 12,
        "the others waited for the slow hook: they arrived only after it answered {slow_answered_then} of its 40 events"
    );

    // Nothing of A's is lost, and each of its builds is seen in transition order.
    let a_received = poll_until("every one of A's events", WAIT, || async {
        (slow.count() >= 40).then(|| slow.received())
    })
    .await;
    let expected: Vec<String> = STATUSES.iter().map(|s| s.to_string()).collect();
    for (build, statuses) in by_build(&a_received) {
        assert_eq!(statuses, expected, "build {build} at the slow hook");
    }
    assert_eq!(by_build(&a_received).len(), a_builds.len());
    let fast_tally = Tally::of(&fast.received());
    assert_eq!(
        (fast_tally.pairs, fast_tally.duplicates),
        (sent, 0),
        "every other event once"
    );
    for (build, statuses) in by_build(&fast.received()) {
        assert_eq!(statuses, ["pending", "success"], "build {build}");
    }
    assert!(
        running.metrics.deferred("hook_busy") > 0,
        "the slow hook's excess was handed on"
    );
    assert!(running.metrics.slow_answers(slow_hook.id) > 0);
    assert_eq!(running.metrics.dead_letters(None), 0);
    running.stop().await;
}
