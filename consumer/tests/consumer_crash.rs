//! SIGKILL the real `hookline-consumer serve` mid-run and start it again: every (event, hook)
//! pair still reaches its receiver, and the duplicates stay within the in-flight bound; and a
//! kill while a build's events are queued behind its failing delivery (strict ordering) loses
//! none of them and keeps their order.

use std::collections::HashMap;
use std::time::Duration;

use hookline_cistate::CiStore;
use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::ordering::StatusReceiver;
use hookline_tests::process::ConsumerProcess;
use hookline_tests::world::{World, inline_event};
use hookline_tests::{Receiver, poll_until, unique_name};
use tokio::process::Child;

const MAX_IN_FLIGHT: usize = 8;

fn start(world: &World, group: &str, schema: &str) -> Child {
    let in_flight = MAX_IN_FLIGHT.to_string();
    ConsumerProcess::new(
        env!("CARGO_BIN_EXE_hookline-consumer"),
        world,
        group,
        schema,
    )
    .args(["--retry-schedule", "10ms,20ms", "--retry-hold", "200ms"])
    .args(["--max-in-flight", &in_flight, "--poll-batch", "8"])
    .args(["--kafka-option", "session.timeout.ms=6000"])
    .spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_mid_run_loses_nothing_and_duplicates_stay_within_the_in_flight_bound() {
    let world = World::new(2).await;
    let schema = world.store_schema().await;
    let receiver = Receiver::start().await;
    // 20 builds of one project, two hooks: every event is two (event, hook) pairs.
    let first = world.build(6_000).await;
    let mut builds = vec![first.clone()];
    for i in 1..20 {
        let mut b = first.clone();
        b.build.id += i;
        world.store_upsert_build(&b.build).await;
        builds.push(b);
    }
    let hooks = [
        world
            .hook(first.project.id, &format!("{}?a", receiver.url), None)
            .await,
        world
            .hook(first.project.id, &format!("{}?b", receiver.url), None)
            .await,
    ];
    let mut events = Vec::new();
    for round in 0..15 {
        for b in &builds {
            let status = [
                BuildStatus::Pending,
                BuildStatus::Running,
                BuildStatus::Success,
            ][round % 3];
            events.push(inline_event(b, status));
        }
    }
    for e in &events {
        world.send(e, SchemaVersion::V2).await;
    }
    let pairs = events.len() * hooks.len();

    let group = unique_name("crash");
    let mut consumer = start(&world, &group, &schema);
    poll_until(
        "the consumer to be mid-run",
        Duration::from_secs(60),
        || async { (receiver.count() >= pairs / 2).then_some(()) },
    )
    .await;
    consumer.kill().await.expect("SIGKILL");
    let at_kill = receiver.count();

    let mut consumer = start(&world, &group, &schema);
    // Idempotency-Key is stable per (event, hook): count arrivals per key.
    let per_pair = poll_until(
        "every (event, hook) pair",
        Duration::from_secs(90),
        || async {
            let mut per_pair: HashMap<String, usize> = HashMap::new();
            for r in receiver.received() {
                *per_pair
                    .entry(r.header("idempotency-key").unwrap().to_owned())
                    .or_default() += 1;
            }
            (per_pair.len() == pairs).then_some(per_pair)
        },
    )
    .await;
    consumer.kill().await.ok();
    let duplicates: usize = per_pair.values().map(|n| n - 1).sum();
    // The bound is on records beyond the committed offset; each record is one delivery per hook.
    let bound = MAX_IN_FLIGHT * hooks.len();
    println!(
        "{pairs} pairs; killed after {at_kill} deliveries; {duplicates} duplicates after restart (bound: {MAX_IN_FLIGHT} records in flight x {} hooks = {bound})",
        hooks.len()
    );
    assert!(
        at_kill < pairs,
        "the kill landed after the run finished; nothing was tested"
    );
    assert!(
        duplicates <= bound,
        "{duplicates} duplicates exceed the in-flight bound {bound}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_while_a_build_is_held_loses_nothing_and_keeps_its_order() {
    sigkill_while_a_build_is_held(7_000, "0s").await;
}

/// The same kill when no offset was committed before it (`--commit-interval 1h`): every record
/// of both builds is read again after the restart, so A's created and pending (delivered) and
/// its queued success are all re-read while its running is held, and must not go out again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_with_nothing_committed_re_reads_everything_and_sends_no_settled_state_again() {
    sigkill_while_a_build_is_held(7_100, "1h").await;
}

/// A's running fails until the receiver recovers, A's success queued behind it, B delivered;
/// SIGKILL, restart, recover. `commit_interval` is the consumer's `--commit-interval`.
async fn sigkill_while_a_build_is_held(base: i64, commit_interval: &str) {
    let world = World::new(2).await;
    let schema = world.store_schema().await;
    let receiver = StatusReceiver::start().await;
    let builds = world.builds(base, 2).await;
    let (a, b) = (&builds[0], &builds[1]);
    let hook = world.hook(a.project.id, &receiver.url, None).await;
    // A's running fails until the receiver recovers: A's success stays queued behind it. Retries
    // a second apart keep the failures under four, GitLab's auto-disable threshold (the hook
    // would then back off for a minute).
    receiver.fail(a.build.id, "running", u32::MAX);
    let group = unique_name("held");
    let start = || {
        ConsumerProcess::new(
            env!("CARGO_BIN_EXE_hookline-consumer"),
            &world,
            &group,
            &schema,
        )
        .args([
            "--retry-schedule",
            &["200ms"; 100].join(","),
            "--retry-hold",
            "1s",
            "--ordering",
            "strict",
            "--commit-interval",
            commit_interval,
        ])
        .args(["--kafka-option", "session.timeout.ms=6000"])
        .spawn()
    };
    let mut consumer = start();
    let mut a_running = None;
    for build in [a, b] {
        for status in [
            BuildStatus::Created,
            BuildStatus::Pending,
            BuildStatus::Running,
            BuildStatus::Success,
        ] {
            let event = inline_event(build, status);
            if build.build.id == a.build.id && status == BuildStatus::Running {
                a_running = Some(event.event_id);
            }
            world.send(&event, SchemaVersion::V2).await;
        }
    }
    let a_running = a_running.expect("A's running was sent");
    let failures = |r: &StatusReceiver| {
        r.seen()
            .iter()
            .filter(|s| s.build_id == a.build.id && !s.accepted)
            .count()
    };
    poll_until(
        "B delivered and A's running failing",
        Duration::from_secs(60),
        || async {
            (receiver.accepted_at(b.build.id, "success").is_some() && failures(&receiver) >= 1)
                .then_some(())
        },
    )
    .await;
    // Held means in A's order queue: the receiver answers 500 a moment before the consumer
    // writes the hold, and a kill in that moment finds a build that never failed as far as
    // anything durable knows (its re-read records are then sent again, in order: the README's
    // "a build that never failed can be seen again from an earlier state").
    poll_until("A's running held", Duration::from_secs(60), || async {
        let queue = world
            .store
            .order_entries(hook.id, a.build.id)
            .await
            .expect("read A's order queue");
        queue
            .iter()
            .any(|e| e.event_id == a_running && !e.settled)
            .then_some(())
    })
    .await;
    consumer.kill().await.expect("SIGKILL");
    assert_eq!(
        receiver.accepted_at(a.build.id, "success"),
        None,
        "A's success went out while its running was failing"
    );
    let before_restart = failures(&receiver);
    let mut consumer = start();
    // The restarted instance picks the held delivery up and A's success still waits.
    poll_until(
        "A's running retried after the restart",
        Duration::from_secs(60),
        || async { (failures(&receiver) > before_restart).then_some(()) },
    )
    .await;
    assert_eq!(receiver.accepted_at(a.build.id, "success"), None);
    receiver.recover();
    poll_until("A's success", Duration::from_secs(60), || async {
        receiver.accepted_at(a.build.id, "success").map(drop)
    })
    .await;
    consumer.kill().await.ok();
    // The README's promise for a build with a queue: after a crash, a re-read record that was
    // already settled, or is older than the delivery the queue holds, is not sent; at most the
    // held delivery itself (A's running) is sent again. So A's accepted deliveries are exactly
    // created, pending, running (repeated only if the held delivery went out twice), success,
    // and nothing of A after success: an old state sent again after a newer one fails here,
    // even though a receiver de-duplicating by Idempotency-Key could hide it.
    let accepted = receiver.accepted(a.build.id);
    let mut held_once = accepted.clone();
    held_once.dedup_by(|later, earlier| later == earlier && later == "running");
    assert_eq!(
        held_once,
        ["created", "pending", "running", "success"].map(String::from),
        "A's accepted deliveries {accepted:?}; every request: {:?}",
        receiver.seen()
    );
    // B never failed, so nothing of it is queued: records whose offsets the kill left
    // uncommitted are delivered again, in order (at-least-once), and B ends on its last state.
    let b_accepted = receiver.accepted(b.build.id);
    assert_eq!(
        b_accepted[..4],
        ["created", "pending", "running", "success"].map(String::from),
        "{b_accepted:?}"
    );
    assert_eq!(b_accepted.last().map(String::as_str), Some("success"));
}
