//! The consumer against the real broker, the real PostgreSQL and real loopback receivers.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hookline_cistate::CiStore;
use hookline_consumer::Outcome;
use hookline_consumer::dead_letter::{self, DeadLetterKind, ReplayFilter};
use hookline_consumer::sign::{SigningSecret, verify};
use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::world::{WHSEC, World, inline_event, legacy_event};
use hookline_tests::{Answer, Receiver, poll_until};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn inline_is_sent_byte_identical_and_legacy_is_rendered_pinned_and_counted_stale() {
    let world = World::new(2).await;
    let snapshot = world.build(1_000).await; // currently running
    let receiver = Receiver::start().await;
    world.hook(snapshot.project.id, &receiver.url, None).await;
    let running = world.start(world.config()).await;

    let inline = inline_event(&snapshot, BuildStatus::Running);
    world.send(&inline, SchemaVersion::V2).await;
    let legacy = legacy_event(&snapshot, BuildStatus::Pending);
    world.send(&legacy, SchemaVersion::V1).await;
    let current = legacy_event(&snapshot, BuildStatus::Running);
    world.send(&current, SchemaVersion::V1).await;

    poll_until("three deliveries", WAIT, || async {
        (receiver.count() >= 3).then_some(())
    })
    .await;
    let got = receiver.received();
    // Same build, same hook: delivered in the order produced.
    let ids: Vec<_> = got
        .iter()
        .map(|r| r.header("x-gitlab-event-uuid").unwrap().to_owned())
        .collect();
    assert_eq!(
        ids,
        [inline.event_id, legacy.event_id, current.event_id].map(|u| u.to_string())
    );
    assert_eq!(
        got[0].body.as_ref(),
        inline.payload.as_deref().unwrap(),
        "inline body must be byte-identical"
    );
    assert_eq!(
        got[1].json()["build_status"],
        "pending",
        "legacy event renders its own status"
    );
    assert_eq!(got[1].json()["build_id"], snapshot.build.id);
    assert_eq!(got[2].json()["build_status"], "running");
    assert_eq!(got[0].header("x-gitlab-event"), Some("Job Hook"));
    assert_eq!(got[0].header("x-gitlab-token"), Some("s3cret-token"));
    // Only the pending event was rendered after its build moved on.
    assert_eq!(running.metrics.stale_renders(), 1);
    // The receiver records a request before answering; the consumer counts it once answered.
    poll_until("three deliveries counted", WAIT, || async {
        (running.metrics.deliveries(Outcome::Delivered) == 3).then_some(())
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_are_retried_off_the_partition_with_one_idempotency_key_and_valid_signatures() {
    let world = World::new(1).await;
    let snapshot = world.build(2_000).await;
    let receiver = Receiver::start().await;
    receiver.script([
        Answer::Status(500),
        Answer::Status(500),
        Answer::Status(200),
    ]);
    world
        .hook(snapshot.project.id, &receiver.url, Some(WHSEC))
        .await;
    let running = world.start(world.config()).await;

    let event = inline_event(&snapshot, BuildStatus::Running);
    world.send(&event, SchemaVersion::V2).await;
    poll_until("a 2xx after two 500s", WAIT, || async {
        receiver
            .received()
            .iter()
            .any(|r| r.status == 200)
            .then_some(())
    })
    .await;
    let got = receiver.received();
    assert_eq!(got.len(), 3, "three attempts");
    let keys: HashSet<_> = got
        .iter()
        .map(|r| r.header("idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 1, "one Idempotency-Key across retries");
    let uuids: HashSet<_> = got
        .iter()
        .map(|r| r.header("x-gitlab-webhook-uuid").unwrap().to_owned())
        .collect();
    assert_eq!(uuids.len(), 3, "a new Webhook-UUID per attempt");
    let secret = SigningSecret::parse(WHSEC).unwrap();
    for r in &got {
        assert_eq!(
            r.body.as_ref(),
            event.payload.as_deref().unwrap(),
            "retries send the same bytes"
        );
        verify(
            &secret,
            r.header("webhook-id").unwrap(),
            r.header("webhook-timestamp").unwrap(),
            r.header("webhook-signature").unwrap(),
            &r.body,
            chrono::Utc::now().timestamp(),
        )
        .expect("valid Standard Webhooks signature");
    }
    assert_eq!(running.metrics.retries_scheduled(), 2);
    // The receiver records a request before answering it: the consumer counts the delivery and
    // resets the hook's failures only once the answer is back.
    poll_until("the delivery counted", WAIT, || async {
        (running.metrics.deliveries(Outcome::Delivered) == 1).then_some(())
    })
    .await;
    poll_until("a success resets the hook's failures", WAIT, || async {
        let hooks = world.store.list_hooks(Some(snapshot.project.id)).await;
        (hooks.unwrap()[0].recent_failures == 0).then_some(())
    })
    .await;
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hanging_receiver_delays_neither_other_hooks_nor_other_builds() {
    let world = World::new(2).await;
    let a = world.build(3_000).await;
    // A second build of the same project (its own pipeline row is shared).
    let mut b = a.clone();
    b.build.id += 1;
    world.store.upsert_build(&b.build).await.unwrap();
    let hanging = Receiver::start().await;
    hanging.answer_always(Answer::Hang);
    let healthy = Receiver::start().await;
    world.hook(a.project.id, &hanging.url, None).await;
    world.hook(a.project.id, &healthy.url, None).await;
    let mut config = world.config();
    // Far longer than the healthy deliveries may take on a loaded machine: the test asserts that
    // they all arrive before any hanging attempt has timed out, not a wall-clock figure.
    config.deliver.timeout = Duration::from_secs(30);
    let running = world.start(config).await;

    // Warm up: the group joins and the first (hanging) attempt starts.
    world
        .send(&inline_event(&a, BuildStatus::Pending), SchemaVersion::V2)
        .await;
    poll_until("the healthy hook's first delivery", WAIT, || async {
        (healthy.count() >= 1).then_some(())
    })
    .await;

    let sent = Instant::now();
    let events: Vec<_> = (0..5)
        .flat_map(|_| {
            [
                inline_event(&b, BuildStatus::Running),
                inline_event(&b, BuildStatus::Running),
            ]
        })
        .collect();
    for e in &events {
        world.send(e, SchemaVersion::V2).await;
    }
    poll_until(
        "other build's deliveries to the healthy hook",
        WAIT,
        || async { (healthy.count() > events.len()).then_some(()) },
    )
    .await;
    let took = sent.elapsed();
    println!(
        "10 events of another build reached the healthy hook in {took:?} while the other hook hangs (timeout 30 s)"
    );
    // Had they waited for the hanging receiver, a hanging attempt would have timed out (and been
    // handed to the retry topic) first.
    assert_eq!(
        running.metrics.retries_scheduled(),
        0,
        "deliveries waited for the hanging receiver to time out ({took:?})"
    );
    assert!(hanging.count() >= 1, "the hanging receiver was called");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn final_answers_and_poison_records_are_dead_lettered_and_replay_delivers_them() {
    let world = World::new(1).await;
    let snapshot = world.build(4_000).await;
    let receiver = Receiver::start().await;
    receiver.script([Answer::Status(404)]);
    let hook = world.hook(snapshot.project.id, &receiver.url, None).await;
    let config = world.config();
    let running = world.start(config.clone()).await;

    let refused = inline_event(&snapshot, BuildStatus::Running);
    world.send(&refused, SchemaVersion::V2).await;
    world.send_raw("poison", b"\x07 definitely not avro").await;
    let mut gone = legacy_event(&snapshot, BuildStatus::Running);
    gone.build_id = 999_999_999;
    world.send(&gone, SchemaVersion::V1).await;
    let after = inline_event(&snapshot, BuildStatus::Success);
    world.send(&after, SchemaVersion::V2).await;

    let after_id = after.event_id.to_string();
    poll_until("the record after the poison", WAIT, || async {
        receiver
            .received()
            .iter()
            .any(|r| r.header("x-gitlab-event-uuid") == Some(after_id.as_str()))
            .then_some(())
    })
    .await;
    poll_until("three dead letters", WAIT, || async {
        (running.metrics.dead_letters(None) >= 3).then_some(())
    })
    .await;
    assert_eq!(receiver.count(), 2, "a 404 is not retried");
    assert_eq!(running.metrics.dead_letters(Some("final_response")), 1);
    assert_eq!(running.metrics.dead_letters(Some("bad_magic")), 1);
    assert_eq!(running.metrics.dead_letters(Some("build_not_found")), 1);

    let letters = dead_letter::list(&config).await.unwrap();
    assert_eq!(letters.len(), 3);
    let poison = letters.iter().find(|l| l.reason == "bad_magic").unwrap();
    assert_eq!(
        poison.value, b"\x07 definitely not avro",
        "original bytes kept"
    );
    assert!(
        matches!(&poison.kind, DeadLetterKind::Record { source_topic } if *source_topic == world.topic)
    );
    let final_letter = letters
        .iter()
        .find(|l| l.reason == "final_response")
        .unwrap();
    match &final_letter.kind {
        DeadLetterKind::Delivery(task) => {
            assert_eq!(task.hook_id, hook.id);
            assert_eq!(task.event_id, refused.event_id);
            assert_eq!(task.attempts, 1);
        }
        other => panic!("expected a delivery, got {other:?}"),
    }

    // The receiver is fixed; replay this hook's dead letters.
    let summary = dead_letter::replay(
        &config,
        &ReplayFilter {
            since: None,
            hook_id: Some(hook.id),
        },
    )
    .await
    .unwrap();
    assert_eq!(
        (summary.deliveries, summary.records, summary.skipped),
        (1, 0, 2)
    );
    let refused_id = refused.event_id.to_string();
    poll_until("the replayed delivery", WAIT, || async {
        receiver
            .received()
            .iter()
            .any(|r| {
                r.status == 200 && r.header("x-gitlab-event-uuid") == Some(refused_id.as_str())
            })
            .then_some(())
    })
    .await;
    let attempts: Vec<_> = receiver
        .received()
        .into_iter()
        .filter(|r| r.header("x-gitlab-event-uuid") == Some(refused_id.as_str()))
        .collect();
    assert_eq!(attempts.len(), 2);
    assert_eq!(
        attempts[0].header("idempotency-key"),
        attempts[1].header("idempotency-key"),
        "a replay keeps the Idempotency-Key"
    );
    assert_eq!(attempts[0].body, attempts[1].body);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn exhausted_retries_are_dead_lettered_and_gone_disables_the_hook() {
    let world = World::new(1).await;
    let snapshot = world.build(5_000).await;
    let failing = Receiver::start().await;
    failing.answer_always(Answer::Status(503));
    let gone = Receiver::start().await;
    gone.answer_always(Answer::Status(410));
    world.hook(snapshot.project.id, &failing.url, None).await;
    let gone_hook = world.hook(snapshot.project.id, &gone.url, None).await;
    let running = world.start(world.config()).await;

    world
        .send(
            &inline_event(&snapshot, BuildStatus::Running),
            SchemaVersion::V2,
        )
        .await;
    poll_until("exhausted and gone dead letters", WAIT, || async {
        (running.metrics.dead_letters(Some("retries_exhausted")) == 1
            && running.metrics.dead_letters(Some("gone")) == 1)
            .then_some(())
    })
    .await;
    assert_eq!(failing.count(), 4, "first attempt plus three retries");
    let hook = world.store.hook(gone_hook.id).await.unwrap().unwrap();
    assert_eq!(
        hook.state(chrono::Utc::now()),
        hookline_cistate::HookState::PermanentlyDisabled,
        "410 disables the hook"
    );
    // The next event for the disabled hook is dead-lettered without an attempt.
    world
        .send(
            &inline_event(&snapshot, BuildStatus::Success),
            SchemaVersion::V2,
        )
        .await;
    poll_until("the disabled hook's dead letter", WAIT, || async {
        (running.metrics.dead_letters(Some("hook_disabled")) >= 1).then_some(())
    })
    .await;
    assert_eq!(gone.count(), 1);
    running.stop().await;
}
