//! Static group membership with the real binary and broker: a SIGKILLed consumer restarted at
//! once with the same `--instance-id` takes its partitions back without waiting for its dead self
//! to expire, while an instance that is gone for good still has its partitions taken over.

use std::time::{Duration, Instant};

use hookline_cistate::RenderSnapshot;
use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::process::ConsumerProcess;
use hookline_tests::world::{World, inline_event};
use hookline_tests::{Receiver, poll_until, unique_name};
use tokio::process::Child;

/// A consumer with a stable identity and a session timeout; `(child, metrics base URL)`.
fn start(
    world: &World,
    group: &str,
    schema: &str,
    instance: &str,
    session: &str,
) -> (Child, String) {
    let process = ConsumerProcess::new(
        env!("CARGO_BIN_EXE_hookline-consumer"),
        world,
        group,
        schema,
    )
    .args(["--instance-id", instance, "--session-timeout", session]);
    let base = process.base_url();
    (process.spawn(), base)
}

/// Sends one inline event of `build` and waits until the receiver has it.
async fn deliver_one(world: &World, receiver: &Receiver, build: &RenderSnapshot, within: Duration) {
    let event = inline_event(build, BuildStatus::Running);
    world.send(&event, SchemaVersion::V2).await;
    let id = event.event_id.to_string();
    poll_until("the event's delivery", within, || {
        let received = receiver.received();
        let id = id.clone();
        async move {
            received
                .iter()
                .any(|r| r.header("x-gitlab-event-uuid") == Some(id.as_str()))
                .then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_restarted_with_its_identity_resumes_before_its_session_expires() {
    let world = World::new(2).await;
    let schema = world.store_schema().await;
    let receiver = Receiver::start().await;
    let builds = world.builds(80_000, 2).await;
    world.hook(builds[0].project.id, &receiver.url, None).await;
    let group = unique_name("group");
    // A long session: without static membership the restarted instance would wait for the
    // killed one to expire (a minute) before any partition is assigned again.
    let (mut consumer, _) = start(&world, &group, &schema, "restart-a", "60s");
    for b in &builds {
        deliver_one(&world, &receiver, b, Duration::from_secs(60)).await;
    }
    let mut resumed = Vec::new();
    for _ in 0..2 {
        consumer.kill().await.expect("SIGKILL");
        let restarted = Instant::now();
        consumer = start(&world, &group, &schema, "restart-a", "60s").0;
        // Both partitions (two builds, keyed by build id) must be served again.
        for b in &builds {
            deliver_one(&world, &receiver, b, Duration::from_secs(45)).await;
        }
        resumed.push(restarted.elapsed());
    }
    eprintln!("resumed after a SIGKILL and an immediate restart in {resumed:?}");
    for took in &resumed {
        assert!(
            *took < Duration::from_secs(30),
            "resumed in {took:?}: the restart waited for the session to expire"
        );
    }
    consumer.kill().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_gone_for_good_has_its_partitions_taken_over_after_the_session_timeout() {
    let world = World::new(4).await;
    let schema = world.store_schema().await;
    let receiver = Receiver::start().await;
    let builds = world.builds(81_000, 8).await;
    world.hook(builds[0].project.id, &receiver.url, None).await;
    let group = unique_name("group");
    let (mut a, _) = start(&world, &group, &schema, "leave-a", "6s");
    let (mut b, b_base) = start(&world, &group, &schema, "leave-b", "6s");
    for build in &builds {
        deliver_one(&world, &receiver, build, Duration::from_secs(60)).await;
    }
    // b must own partitions of the main topic before it goes: its lag gauges name them.
    let metrics = format!("{b_base}/metrics");
    let owned = format!("topic=\"{}\"", world.topic);
    poll_until("b owns partitions", Duration::from_secs(60), || {
        let (metrics, owned) = (metrics.clone(), owned.clone());
        async move {
            let text = reqwest::get(&metrics).await.ok()?.text().await.ok()?;
            text.lines()
                .any(|l| l.starts_with("hookline_consumer_consumer_lag{") && l.contains(&owned))
                .then_some(())
        }
    })
    .await;
    // b never comes back: after its session times out, a serves every partition.
    b.kill().await.expect("SIGKILL");
    for build in &builds {
        deliver_one(&world, &receiver, build, Duration::from_secs(60)).await;
    }
    a.kill().await.ok();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_instance_fenced_by_another_with_its_identity_exits_instead_of_idling() {
    let world = World::new(2).await;
    let schema = world.store_schema().await;
    let receiver = Receiver::start().await;
    let builds = world.builds(82_000, 2).await;
    world.hook(builds[0].project.id, &receiver.url, None).await;
    let group = unique_name("group");
    let (mut first, _) = start(&world, &group, &schema, "twin", "10s");
    for b in &builds {
        deliver_one(&world, &receiver, b, Duration::from_secs(60)).await;
    }
    // A second instance with the same identity (a misconfiguration, or a restart racing a
    // stuck predecessor): the broker fences the first, whose client can never consume again.
    let (mut second, _) = start(&world, &group, &schema, "twin", "10s");
    let exit = tokio::time::timeout(Duration::from_secs(60), first.wait())
        .await
        .expect("the fenced instance exits rather than running on without consuming")
        .expect("wait");
    assert!(
        !exit.success(),
        "a fenced instance exits with an error: {exit}"
    );
    // The one left delivers.
    for b in &builds {
        deliver_one(&world, &receiver, b, Duration::from_secs(60)).await;
    }
    second.kill().await.ok();
}
