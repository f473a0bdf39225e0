//! Per-(hook, build) order across retries against the real broker and database: a receiver
//! that fails a build's `running` once still sees created, pending, running, success in that
//! order (strict, the default), while the same hook's other builds go on; relaxed ordering
//! shows the regression strict mode removes; a collapsing hook gets only the latest queued
//! state; and two instances in one group, joining and leaving mid-run, keep every build in
//! order.

use std::time::Duration;

use hookline_cistate::{CiStore, NewHook, RenderSnapshot};
use hookline_consumer::config::Ordering;
use hookline_consumer::schedule::RetrySchedule;
use hookline_schemas::{BuildStatus, SchemaVersion};
use hookline_tests::ordering::{StatusReceiver, in_transition_order};
use hookline_tests::poll_until;
use hookline_tests::world::{World, inline_event};

const TRANSITIONS: [BuildStatus; 4] = [
    BuildStatus::Created,
    BuildStatus::Pending,
    BuildStatus::Running,
    BuildStatus::Success,
];

fn every_status() -> Vec<String> {
    ["created", "pending", "running", "success"]
        .map(String::from)
        .to_vec()
}

/// Retries `first` after a failure, then quickly.
fn schedule(first: Duration) -> RetrySchedule {
    RetrySchedule {
        jitter: 0.0,
        ..RetrySchedule::with_delays(
            vec![first; 1]
                .into_iter()
                .chain([Duration::from_millis(100); 20])
                .collect(),
        )
    }
}

async fn send_build(world: &World, build: &RenderSnapshot) {
    for status in TRANSITIONS {
        world
            .send(&inline_event(build, status), SchemaVersion::V2)
            .await;
    }
}

async fn accepted_all(receiver: &StatusReceiver, builds: &[&RenderSnapshot]) {
    poll_until("every build's success", Duration::from_secs(60), || {
        let done = builds
            .iter()
            .all(|b| receiver.accepted_at(b.build.id, "success").is_some());
        async move { done.then_some(()) }
    })
    .await;
}

/// Every build's accepted statuses are in transition order, and each status is there.
fn assert_complete_and_in_order(receiver: &StatusReceiver, builds: &[RenderSnapshot]) {
    let seen = receiver.seen();
    for b in builds {
        let accepted = receiver.accepted(b.build.id);
        assert!(
            in_transition_order(&accepted),
            "build {}: {accepted:?}",
            b.build.id
        );
        let mut distinct = accepted.clone();
        distinct.dedup();
        assert_eq!(distinct, every_status(), "build {}: {seen:?}", b.build.id);
    }
}

/// Build A's `running` fails once and is retried after `first_retry`; A's and B's events go to
/// one hook, A's first. Returns the receiver once both builds' `success` arrived.
async fn one_failed_running(ordering: Ordering, collapse: bool) -> (StatusReceiver, [i64; 2], u64) {
    let world = World::new(2).await;
    let builds = world.builds(91_000, 2).await;
    let (a, b) = (&builds[0], &builds[1]);
    let receiver = StatusReceiver::start().await;
    world
        .store
        .add_hook(&NewHook {
            project_id: a.project.id,
            url: receiver.url.clone(),
            job_events: true,
            collapse,
            ..NewHook::default()
        })
        .await
        .expect("add hook");
    receiver.fail(a.build.id, "running", 1);
    let mut config = world.config();
    config.ordering = ordering;
    // Long enough that B's four events, sent after A's, would visibly wait if they were held.
    config.retry_schedule = schedule(Duration::from_secs(3));
    let running = world.start(config).await;
    send_build(&world, a).await;
    send_build(&world, b).await;
    accepted_all(&receiver, &[a, b]).await;
    // The queue moves on right after A's success: give a stray out-of-order delivery (relaxed)
    // a moment to show.
    poll_until("A's running delivered", Duration::from_secs(30), || {
        let r = receiver.accepted_at(a.build.id, "running").is_some() || collapse;
        async move { r.then_some(()) }
    })
    .await;
    let collapsed = running.metrics.ordering("collapsed");
    running.stop().await;
    (receiver, [a.build.id, b.build.id], collapsed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_a_failed_running_holds_its_builds_later_events_and_no_other_build() {
    let (receiver, [a, b], _) = one_failed_running(Ordering::Strict, false).await;
    let seen = receiver.seen();
    assert_eq!(receiver.accepted(a), every_status(), "{seen:?}");
    assert_eq!(receiver.accepted(b), every_status(), "{seen:?}");
    // The failed attempt came first, and A's success only after its retried running.
    let failed = seen
        .iter()
        .position(|s| !s.accepted)
        .expect("a failed attempt");
    assert_eq!(
        (seen[failed].build_id, seen[failed].status.as_str()),
        (a, "running")
    );
    // B was not held behind A: all of B arrived before A's running was retried (3 s later).
    let a_running = receiver.accepted_at(a, "running").unwrap();
    assert!(
        receiver.accepted_at(b, "success").unwrap() < a_running,
        "B waited behind A: {seen:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relaxed_a_retried_running_arrives_after_its_builds_success() {
    let (receiver, [a, b], _) = one_failed_running(Ordering::Relaxed, false).await;
    let seen = receiver.seen();
    assert_eq!(
        receiver.accepted(a),
        ["created", "pending", "success", "running"].map(String::from),
        "{seen:?}"
    );
    assert_eq!(receiver.accepted(b), every_status(), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collapsing_hook_gets_only_the_latest_of_the_queued_events() {
    let (receiver, [a, _], collapsed) = one_failed_running(Ordering::Strict, true).await;
    assert_eq!(
        receiver.accepted(a),
        ["created", "pending", "success"].map(String::from),
        "{:?}",
        receiver.seen()
    );
    assert_eq!(collapsed, 1);
}

/// Two instances in one group: the second joins after the builds' `pending`, the first leaves
/// right after their `running`, so their `success` (and the retries of the failed `running`,
/// held by the first instance) are the second's. A quarter of the builds fail their `running`
/// once. Every build still reaches its receiver complete and in transition order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn instances_joining_and_leaving_keep_every_build_in_order() {
    let world = World::new(4).await;
    let builds = world.builds(92_000, 24).await;
    let receiver = StatusReceiver::start().await;
    world.hook(builds[0].project.id, &receiver.url, None).await;
    // One build in four: more failures in a row would make the hook back off for a minute
    // (GitLab's auto-disable rule) and the test wait for it.
    for b in builds.iter().step_by(4) {
        receiver.fail(b.build.id, "running", 1);
    }
    let mut config = world.config();
    config.ordering = Ordering::Strict;
    // Long enough that the failed deliveries are still held when the first instance leaves.
    config.retry_schedule = schedule(Duration::from_secs(1));
    let first = world.start(config.clone()).await;
    let send_round = |status: BuildStatus| {
        let (world, builds) = (&world, &builds);
        async move {
            for b in builds {
                world
                    .send(&inline_event(b, status), SchemaVersion::V2)
                    .await;
            }
        }
    };
    send_round(BuildStatus::Created).await;
    send_round(BuildStatus::Pending).await;
    let second = world.start(config.clone()).await;
    poll_until(
        "the second instance's assignment",
        Duration::from_secs(30),
        || {
            let assigned = second.metrics.assignments("main") > 0;
            async move { assigned.then_some(()) }
        },
    )
    .await;
    send_round(BuildStatus::Running).await;
    let failing = builds.len().div_ceil(4);
    poll_until("the failed runnings", Duration::from_secs(30), || {
        let failed = receiver.seen().iter().filter(|s| !s.accepted).count();
        async move { (failed == failing).then_some(()) }
    })
    .await;
    let held_by_first = first.metrics.ordering("held");
    first.stop().await;
    send_round(BuildStatus::Success).await;
    let refs: Vec<&RenderSnapshot> = builds.iter().collect();
    accepted_all(&receiver, &refs).await;
    poll_until("every running delivered", Duration::from_secs(30), || {
        let done = builds
            .iter()
            .all(|b| receiver.accepted_at(b.build.id, "running").is_some());
        async move { done.then_some(()) }
    })
    .await;
    assert_complete_and_in_order(&receiver, &builds);
    assert!(
        held_by_first + second.metrics.ordering("held") > 0,
        "no delivery was held"
    );
    assert!(
        second
            .metrics
            .deliveries(hookline_consumer::Outcome::Delivered)
            > 0,
        "the second instance delivered nothing"
    );
    eprintln!(
        "held by the first instance {held_by_first}, by the second {}; queued behind them: {}",
        second.metrics.ordering("held"),
        second.metrics.ordering("queued")
    );
    second.stop().await;
}

/// The order queue behaves the same in PostgreSQL and in memory: entries in transition order
/// (ties by arrival), a hold written twice kept once, settling marks without removing, pruning
/// forgets settled entries past the cut and entries of removed hooks.
#[tokio::test]
async fn the_order_queue_is_the_same_in_postgresql_and_in_memory() {
    use chrono::{TimeZone, Utc};
    use uuid::Uuid;
    let pg = hookline_tests::pg_store().await;
    let memory = hookline_cistate::MemoryStore::new();
    let stores: [&dyn CiStore; 2] = [&pg, &memory];
    for store in stores {
        let hook = store
            .add_hook(&NewHook {
                project_id: 1,
                url: "http://127.0.0.1:1/hook".into(),
                job_events: true,
                ..NewHook::default()
            })
            .await
            .expect("add hook");
        let at = |s: i64| Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap();
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        store.order_hold(hook.id, 7, b, at(2)).await.unwrap();
        store.order_hold(hook.id, 7, a, at(1)).await.unwrap();
        store.order_hold(hook.id, 7, c, at(2)).await.unwrap();
        store.order_hold(hook.id, 7, a, at(1)).await.unwrap();
        store.order_hold(hook.id, 8, a, at(1)).await.unwrap();
        let ids = |entries: Vec<hookline_cistate::OrderEntry>| -> Vec<(Uuid, bool)> {
            entries.iter().map(|e| (e.event_id, e.settled)).collect()
        };
        assert_eq!(
            ids(store.order_entries(hook.id, 7).await.unwrap()),
            [(a, false), (b, false), (c, false)],
            "{store:?}"
        );
        store.order_settle(hook.id, 7, a).await.unwrap();
        assert_eq!(
            ids(store.order_entries(hook.id, 7).await.unwrap()),
            [(a, true), (b, false), (c, false)]
        );
        // Nothing settled before a minute ago: the fresh settlement stays.
        let cut = Utc::now() - chrono::Duration::minutes(1);
        assert_eq!(store.order_prune(cut).await.unwrap(), 0);
        assert_eq!(
            store
                .order_prune(Utc::now() + chrono::Duration::minutes(1))
                .await
                .unwrap(),
            1
        );
        assert_eq!(
            ids(store.order_entries(hook.id, 7).await.unwrap()),
            [(b, false), (c, false)]
        );
        store.remove_hook(hook.id).await.unwrap();
        assert_eq!(store.order_prune(cut).await.unwrap(), 3);
        assert!(store.order_entries(hook.id, 8).await.unwrap().is_empty());
    }
}

/// A queued delivery that is not at its turn is parked in the store, not held in memory: it
/// parks only behind a pending entry; settling the entry ahead of it hands it back (to be
/// written to the retry topic); a parked record left first in a quiet queue (its settler
/// stopped before the write-back) is found by the sweep until it is unparked; and a removed
/// hook's parked records are kept until they are dead-lettered. The same in PostgreSQL and in
/// memory.
#[tokio::test]
async fn a_queued_delivery_parks_until_the_entry_ahead_of_it_is_settled() {
    use chrono::{TimeZone, Utc};
    use hookline_cistate::ParkedDelivery;
    use uuid::Uuid;
    let pg = hookline_tests::pg_store().await;
    let memory = hookline_cistate::MemoryStore::new();
    let stores: [&dyn CiStore; 2] = [&pg, &memory];
    for store in stores {
        let hook = store
            .add_hook(&NewHook {
                project_id: 1,
                url: "http://127.0.0.1:1/hook".into(),
                job_events: true,
                ..NewHook::default()
            })
            .await
            .expect("add hook");
        let at = |s: i64| Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap();
        let record = |n: u8| ParkedDelivery {
            headers: vec![("hookline-event-id".into(), n.to_string())],
            body: vec![n; 3],
        };
        let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        for (id, s) in [(a, 1), (b, 2), (c, 3)] {
            store.order_hold(hook.id, 9, id, at(s)).await.unwrap();
        }
        // First in its queue: nothing to wait for, so nothing is parked.
        assert!(
            !store.order_park(hook.id, 9, a, &record(1)).await.unwrap(),
            "{store:?}"
        );
        assert!(store.order_park(hook.id, 9, b, &record(2)).await.unwrap());
        assert!(store.order_park(hook.id, 9, c, &record(3)).await.unwrap());
        let later = Utc::now() + chrono::Duration::minutes(1);
        let earlier = Utc::now() - chrono::Duration::minutes(1);
        // Parked behind a pending entry: not stranded however quiet the queue.
        assert!(store.order_stranded(later, 10).await.unwrap().is_empty());
        // Settling a record that is not first hands nothing back.
        assert_eq!(store.order_settle(hook.id, 9, c).await.unwrap(), None);
        // A settled entry does not park again.
        assert!(!store.order_park(hook.id, 9, c, &record(3)).await.unwrap());
        let next = store.order_settle(hook.id, 9, a).await.unwrap();
        let next = next.expect("the parked record behind the settled one");
        assert_eq!((next.event_id, next.delivery), (b, record(2)));
        // The settler stopped before writing it back: the queue saw a settlement just now, so
        // it is not stranded yet; once the queue is quiet, it is.
        assert!(store.order_stranded(earlier, 10).await.unwrap().is_empty());
        let stranded = store.order_stranded(later, 10).await.unwrap();
        assert_eq!(stranded.iter().map(|p| p.event_id).collect::<Vec<_>>(), [b]);
        store.order_unpark(hook.id, 9, b).await.unwrap();
        assert!(store.order_stranded(later, 10).await.unwrap().is_empty());
        // c was settled above: nothing pending behind b.
        assert_eq!(store.order_settle(hook.id, 9, b).await.unwrap(), None);

        // A removed hook: its parked record outlives the prune, first in a quiet queue, so the
        // sweep writes it back and the retry path dead-letters it (hook removed).
        let (d, e) = (Uuid::new_v4(), Uuid::new_v4());
        store.order_hold(hook.id, 10, d, at(1)).await.unwrap();
        store.order_hold(hook.id, 10, e, at(2)).await.unwrap();
        assert!(store.order_park(hook.id, 10, e, &record(5)).await.unwrap());
        store.remove_hook(hook.id).await.unwrap();
        store.order_prune(earlier).await.unwrap();
        let stranded = store.order_stranded(later, 10).await.unwrap();
        assert_eq!(
            stranded
                .iter()
                .map(|p| (p.hook_id, p.build_id, p.event_id))
                .collect::<Vec<_>>(),
            [(hook.id, 10, e)],
            "{store:?}"
        );
    }
}

/// How often every consumer sweeps for stranded parked records (`consumer/src/strict.rs`,
/// `SWEEP_EVERY`), and how long a queue must have been quiet first (`STRANDED_AFTER`).
const SWEEP_EVERY: Duration = Duration::from_secs(5);
const STRANDED_AFTER: Duration = Duration::from_secs(30);

/// The sweep, end to end: A's running fails and holds its queue, A's success parks behind it
/// (its main-topic offset done), and the consumer stops. Then the head is settled directly in
/// the store, as by an instance that settled it and died before writing the parked record back,
/// longer ago than the quiet period. Nothing but the sweep can bring the success back now (its
/// offset is committed, and the running is settled), so a consumer started afterwards must
/// deliver it within a few sweep periods, without re-sending the settled running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_parked_behind_a_head_whose_settler_died_is_swept_back_and_delivered() {
    let world = World::new(1).await;
    let a = world.build(95_000).await;
    let receiver = StatusReceiver::start().await;
    let hook = world.hook(a.project.id, &receiver.url, None).await;
    receiver.fail(a.build.id, "running", u32::MAX);
    let mut config = world.config();
    config.ordering = Ordering::Strict;
    // The held running is not retried while this test runs: only the sweep moves the queue.
    config.retry_schedule = RetrySchedule {
        jitter: 0.0,
        ..RetrySchedule::with_delays(vec![Duration::from_secs(3600)])
    };
    let first = world.start(config.clone()).await;
    let events: Vec<_> = TRANSITIONS.iter().map(|s| inline_event(&a, *s)).collect();
    for e in &events {
        world.send(e, SchemaVersion::V2).await;
    }
    let (running, success) = (events[2].event_id, events[3].event_id);
    poll_until(
        "A's success parked behind its failed running",
        Duration::from_secs(60),
        || {
            let parked = first.metrics.ordering("parked");
            async move { (parked >= 1).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        receiver.accepted(a.build.id),
        ["created", "pending"].map(String::from)
    );
    // A clean stop: every offset done so far is committed, so nothing is read again.
    first.stop().await;

    // The settler: it marks the head settled and gets the parked success back to write to the
    // retry topic, then dies before writing it.
    let parked = world
        .store
        .order_settle(hook.id, a.build.id, running)
        .await
        .expect("settle the head")
        .expect("the record parked behind the head");
    assert_eq!(parked.event_id, success);
    let quiet = chrono::Duration::from_std(STRANDED_AFTER * 2).unwrap();
    sqlx::query(
        "UPDATE delivery_order SET settled_at = settled_at - $3
         WHERE hook_id = $1 AND build_id = $2 AND settled_at IS NOT NULL",
    )
    .bind(hook.id)
    .bind(a.build.id)
    .bind(quiet)
    .execute(world.store.pool())
    .await
    .expect("age the settlement past the quiet period");

    let second = world.start(config).await;
    poll_until(
        "A's success, written back by the sweep",
        SWEEP_EVERY * 6,
        || async { receiver.accepted_at(a.build.id, "success").map(drop) },
    )
    .await;
    assert_eq!(second.metrics.ordering("swept"), 1);
    // The settled running was not sent again: it failed once, before the stop, and only then.
    let runnings: Vec<_> = receiver
        .seen()
        .into_iter()
        .filter(|s| s.build_id == a.build.id && s.status == "running")
        .collect();
    assert_eq!(runnings.len(), 1, "{:?}", receiver.seen());
    assert_eq!(
        receiver.accepted(a.build.id),
        ["created", "pending", "success"].map(String::from)
    );
    second.stop().await;
}

/// A held delivery that ends in a dead letter lets its queue move on, and its dead letter names
/// the events that were queued behind it and went out after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_head_names_the_events_that_went_out_after_it() {
    let world = World::new(1).await;
    let a = world.build(93_000).await;
    let receiver = StatusReceiver::start().await;
    world.hook(a.project.id, &receiver.url, None).await;
    // The first attempt and the one retry fail: retries exhausted.
    receiver.fail(a.build.id, "running", 2);
    let mut config = world.config();
    config.ordering = Ordering::Strict;
    config.retry_schedule = RetrySchedule {
        jitter: 0.0,
        ..RetrySchedule::with_delays(vec![Duration::from_millis(500)])
    };
    let running = world.start(config.clone()).await;
    let events: Vec<_> = TRANSITIONS.iter().map(|s| inline_event(&a, *s)).collect();
    for e in &events {
        world.send(e, SchemaVersion::V2).await;
    }
    accepted_all(&receiver, &[&a]).await;
    assert_eq!(
        receiver.accepted(a.build.id),
        ["created", "pending", "success"].map(String::from)
    );
    let letters = poll_until("the dead letter", Duration::from_secs(30), || {
        let config = config.clone();
        async move {
            let letters = hookline_consumer::dead_letter::list(&config).await.ok()?;
            (!letters.is_empty()).then_some(letters)
        }
    })
    .await;
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(letters[0].reason, "retries_exhausted");
    let success = events[3].event_id.to_string();
    assert!(
        letters[0].detail.contains(&success),
        "the dead letter does not name {success}: {}",
        letters[0].detail
    );
    running.stop().await;
}

/// A rate limit defers a namespace's deliveries to the retry path, each to its own slot, while a
/// quarter of the builds fail their `running` once. Under strict ordering a build's later
/// events wait behind the failed delivery whatever slot the limit gave them, so every build
/// still reaches its receiver complete and in transition order.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rate_limited_namespace_keeps_every_build_in_order() {
    let world = World::new(2).await;
    let builds = world.builds(94_000, 12).await;
    let receiver = StatusReceiver::start().await;
    world.hook(builds[0].project.id, &receiver.url, None).await;
    for b in builds.iter().step_by(4) {
        receiver.fail(b.build.id, "running", 1);
    }
    let mut config = world.config();
    config.ordering = Ordering::Strict;
    config.retry_schedule = schedule(Duration::from_secs(1));
    // 10 a second after a bucket of 10: most of the 48 deliveries are deferred.
    config.rate_limit = hookline_consumer::config::RateLimitConfig {
        per_minute: Some(600),
        burst: Duration::from_secs(1),
    };
    let running = world.start(config).await;
    for status in TRANSITIONS {
        for b in &builds {
            world
                .send(&inline_event(b, status), SchemaVersion::V2)
                .await;
        }
    }
    let refs: Vec<&RenderSnapshot> = builds.iter().collect();
    accepted_all(&receiver, &refs).await;
    assert_complete_and_in_order(&receiver, &builds);
    assert!(
        running.metrics.deferred("rate_limit") >= 20,
        "the limit deferred deliveries: {}",
        running.metrics.deferred("rate_limit")
    );
    running.stop().await;
}
