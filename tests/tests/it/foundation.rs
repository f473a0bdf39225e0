//! The foundation against the real services: the codec over a real Kafka broker, and the
//! stores over a real PostgreSQL.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{CiStore, MemoryStore, NewHook, Transition, render};
use hookline_schemas::{
    BuildEvent, BuildStatus, Codec, PayloadTiming, SchemaVersion, TransitionFacts,
};
use hookline_tests::{create_topic, kafka_brokers, pg_store, poll_until, unique_name};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Message};
use uuid::Uuid;

fn event(build_id: i64, status: BuildStatus, payload: Option<Vec<u8>>) -> BuildEvent {
    BuildEvent {
        event_id: Uuid::new_v4(),
        build_id,
        project_id: 10,
        pipeline_id: 5000,
        status,
        occurred_at: Utc.with_ymd_and_hms(2026, 11, 27, 20, 0, 0).unwrap()
            + chrono::Duration::microseconds(build_id),
        facts: TransitionFacts {
            started_at: Some(Utc.with_ymd_and_hms(2026, 11, 27, 19, 59, 58).unwrap()),
            finished_at: None,
            duration: Some(1.25),
            queued_duration: Some(0.5),
            failure_reason: None,
        },
        payload_timing: if payload.is_some() {
            PayloadTiming::Inline
        } else {
            PayloadTiming::Deferred
        },
        payload,
    }
}

#[tokio::test]
async fn v1_and_v2_events_round_trip_through_a_real_broker() {
    let topic = unique_name("foundation");
    create_topic(&topic, 3).await;

    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("enable.idempotence", "true")
        .create()
        .unwrap();
    let v1 = Codec::embedded_writing(SchemaVersion::V1);
    let v2 = Codec::embedded();
    let mut sent = HashMap::new();
    for i in 0..30i64 {
        let (codec, e) = match i % 3 {
            0 => (&v1, event(i, BuildStatus::Running, None)),
            1 => (
                &v2,
                event(
                    i,
                    BuildStatus::Success,
                    Some(format!("{{\"build_id\":{i}}}").into_bytes()),
                ),
            ),
            _ => (&v2, event(i, BuildStatus::Failed, None)),
        };
        let bytes = codec.encode(&e).unwrap();
        let key = e.build_id.to_string();
        producer
            .send(
                FutureRecord::to(&topic).key(&key).payload(&bytes),
                Duration::from_secs(10),
            )
            .await
            .map_err(|(err, _)| err)
            .unwrap();
        sent.insert(e.event_id, (e, codec.writer_schema_id()));
    }

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("foundation_group"))
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    consumer.subscribe(&[&topic]).unwrap();
    let reader = Codec::embedded();
    let mut received = HashMap::new();
    while received.len() < sent.len() {
        let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .expect("all events consumed within 30 s")
            .unwrap();
        let decoded = reader.decode(message.payload().unwrap()).await.unwrap();
        assert_eq!(
            message.key(),
            Some(decoded.event.build_id.to_string().as_bytes())
        );
        received.insert(decoded.event.event_id, decoded);
    }
    for (id, (event, writer_id)) in sent {
        let got = &received[&id];
        assert_eq!(got.writer_schema_id, writer_id);
        // A v1 writer cannot carry a payload: the v2 reader sees none, and deferred timing.
        let expected = if writer_id == v1.writer_schema_id() {
            BuildEvent {
                payload: None,
                payload_timing: PayloadTiming::Deferred,
                ..event
            }
        } else {
            event
        };
        assert_eq!(got.event, expected);
    }
}

#[tokio::test]
async fn postgres_store_round_trips_a_snapshot_and_renders_the_memory_stores_bytes() {
    let pg = pg_store().await;
    let memory = MemoryStore::new();
    let snapshots: Vec<_> = (0..5).map(|i| sample(i * 1_000_000)).collect();
    for s in &snapshots {
        write_snapshot(&pg, s).await.unwrap();
        write_snapshot(&memory, s).await.unwrap();
    }
    let ids: Vec<i64> = snapshots.iter().map(|s| s.build.id).chain([-1]).collect();
    let from_pg = pg.snapshots(&ids).await.unwrap();
    let from_memory = memory.snapshots(&ids).await.unwrap();
    assert_eq!(
        from_pg.len(),
        5,
        "the unknown build is absent, every other one present"
    );
    for s in &snapshots {
        let id = s.build.id;
        assert_eq!(&from_pg[&id], s, "PostgreSQL returns what was written");
        for status in BuildStatus::ALL {
            let t = Transition {
                status,
                facts: Transition::of_current(&s.build).unwrap().facts,
            };
            assert_eq!(render(&from_pg[&id], &t), render(&from_memory[&id], &t));
        }
    }

    // Updating the build is what a CI does on every transition.
    let mut moved = snapshots[0].clone();
    moved.build.status = "failed".into();
    moved.build.finished_at = Some(Utc::now());
    moved.build.failure_reason = Some("script_failure".into());
    pg.upsert_build(&moved.build).await.unwrap();
    memory.upsert_build(&moved.build).await.unwrap();
    let a = pg.snapshot(moved.build.id).await.unwrap().unwrap();
    let b = memory.snapshot(moved.build.id).await.unwrap().unwrap();
    assert_eq!(
        a, b,
        "timestamps keep the same (microsecond) precision in both stores"
    );
    assert!(hookline_cistate::is_stale(&a, BuildStatus::Running));
}

#[tokio::test]
async fn postgres_store_refuses_dangling_references_and_keeps_hook_health() {
    let pg = pg_store().await;
    let s = sample(0);
    let err = pg.upsert_build(&s.build).await.unwrap_err();
    assert!(
        matches!(err, hookline_cistate::StoreError::Invalid(_)),
        "{err}"
    );

    let hook = pg
        .add_hook(&NewHook {
            project_id: 10,
            url: "https://example.com/hook".into(),
            job_events: true,
            ..NewHook::default()
        })
        .await
        .unwrap();
    let now = Utc::now();
    for _ in 0..4 {
        pg.record_hook_failure(hook.id, now).await.unwrap();
    }
    let after = pg.hook(hook.id).await.unwrap().unwrap();
    assert_eq!(after.recent_failures, 4);
    assert_eq!(
        after.state(now),
        hookline_cistate::HookState::TemporarilyDisabled(after.disabled_until.unwrap())
    );
    pg.record_hook_success(hook.id).await.unwrap();
    let healed = poll_until("hook healed", Duration::from_secs(5), || async {
        pg.hook(hook.id)
            .await
            .unwrap()
            .filter(|h| h.recent_failures == 0)
    })
    .await;
    assert_eq!(healed.disabled_until, None);
    assert_eq!(pg.job_hooks(10).await.unwrap().len(), 1);
    assert!(pg.remove_hook(hook.id).await.unwrap());
    assert!(pg.job_hooks(10).await.unwrap().is_empty());
}

/// GitLab's schedule, written out by hand from `WebHooks::AutoDisabling` (REFERENCE.md): the
/// back-off in minutes after each counted failure, `None` for no back-off; the 40th is permanent.
fn gitlab_backoff_minutes(failure: i32) -> Option<i64> {
    match failure {
        1..=3 => None,
        4 => Some(1),
        5 => Some(2),
        6 => Some(4),
        7 => Some(8),
        8 => Some(16),
        9 => Some(32),
        10 => Some(64),
        11 => Some(128),
        12 => Some(256),
        13 => Some(512),
        14 => Some(1024),
        _ => Some(24 * 60),
    }
}

/// A scripted run of 41 failures with a controllable clock. Each step first fails once while the
/// hook is still backing off (it must not count), then once when the back-off has passed (it
/// counts). The hook is disabled for good at the 40th counted failure and not before, and the
/// 41st changes nothing.
async fn follows_gitlabs_auto_disable_schedule(store: &dyn CiStore) {
    let s = sample(0);
    write_snapshot(store, &s).await.unwrap();
    let hook = store
        .add_hook(&NewHook {
            project_id: s.project.id,
            url: "https://example.com/hook".into(),
            job_events: true,
            ..NewHook::default()
        })
        .await
        .unwrap();
    let mut now = Utc.with_ymd_and_hms(2026, 12, 1, 12, 0, 0).unwrap();
    for failure in 1..=41 {
        let before = store.hook(hook.id).await.unwrap().unwrap();
        if let Some(until) = before.disabled_until {
            // Still backing off: a failure that ends now does not count.
            let early = until - chrono::Duration::seconds(1);
            let unchanged = store.record_hook_failure(hook.id, early).await.unwrap();
            assert!(
                matches!(&unchanged, hookline_cistate::HookFailure::NotExecutable(h) if *h == before),
                "step {failure}: {unchanged:?}"
            );
            now = until;
        } else {
            now += chrono::Duration::seconds(1);
        }
        let recorded = store.record_hook_failure(hook.id, now).await.unwrap();
        if failure == 41 {
            assert!(
                matches!(recorded, hookline_cistate::HookFailure::NotExecutable(_)),
                "a permanently disabled hook counts nothing more: {recorded:?}"
            );
            break;
        }
        let hookline_cistate::HookFailure::Counted(after) = recorded else {
            panic!("step {failure}: {recorded:?}");
        };
        assert_eq!(after.recent_failures, failure, "step {failure}");
        assert_eq!(
            after.disabled_until.map(|u| (u - now).num_minutes()),
            gitlab_backoff_minutes(failure),
            "step {failure}"
        );
        let state = after.state(now);
        if failure == 40 {
            assert_eq!(state, hookline_cistate::HookState::PermanentlyDisabled);
        } else {
            assert_ne!(
                state,
                hookline_cistate::HookState::PermanentlyDisabled,
                "step {failure}"
            );
        }
    }
    // A success resets it all (`hooks enable` does the same for a permanent disable).
    assert!(store.enable_hook(hook.id).await.unwrap());
    let healed = store.hook(hook.id).await.unwrap().unwrap();
    assert_eq!((healed.recent_failures, healed.disabled_until), (0, None));
}

#[tokio::test]
async fn both_stores_follow_gitlabs_auto_disable_schedule_with_a_controllable_clock() {
    follows_gitlabs_auto_disable_schedule(&MemoryStore::new()).await;
    follows_gitlabs_auto_disable_schedule(&pg_store().await).await;
}
