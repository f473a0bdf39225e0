//! SIGKILL the real `hookline-consumer serve` mid-run and start it again: every (event, hook)
//! pair still reaches its receiver, and the duplicates stay within the in-flight bound; and a
//! kill while a build's events are queued behind its failing delivery (strict ordering) loses
//! none of them and keeps their order.

use std::collections::HashMap;
use std::time::Duration;

use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::ordering::{StatusReceiver, in_transition_order};
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
    let world = World::new(2).await;
    let schema = world.store_schema().await;
    let receiver = StatusReceiver::start().await;
    let builds = world.builds(7_000, 2).await;
    let (a, b) = (&builds[0], &builds[1]);
    world.hook(a.project.id, &receiver.url, None).await;
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
        ])
        .args(["--kafka-option", "session.timeout.ms=6000"])
        .spawn()
    };
    let mut consumer = start();
    for build in [a, b] {
        for status in [
            BuildStatus::Created,
            BuildStatus::Pending,
            BuildStatus::Running,
            BuildStatus::Success,
        ] {
            world
                .send(&inline_event(build, status), SchemaVersion::V2)
                .await;
        }
    }
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
    // What a receiver that de-duplicates by Idempotency-Key sees: each status at its first
    // arrival. Records delivered before the kill whose offsets it left uncommitted may come
    // again afterwards (at-least-once), as repeats with their first key, not as new states.
    let accepted = receiver.accepted(a.build.id);
    let mut first_seen: Vec<String> = Vec::new();
    for status in &accepted {
        if !first_seen.contains(status) {
            first_seen.push(status.clone());
        }
    }
    assert!(in_transition_order(&first_seen), "{accepted:?}");
    assert_eq!(
        first_seen,
        ["created", "pending", "running", "success"].map(String::from),
        "{:?}",
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
