//! The producer's Emitter against the real Kafka broker and PostgreSQL: inline events carry the
//! renderer's exact bytes, deferred events none, the v1 switch writes legacy events, and flags
//! stored in PostgreSQL reach a running producer within its reload interval.

use std::sync::Arc;
use std::time::Duration;

use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{CiStore, PgStore, RenderSnapshot, Transition, render};
use hookline_producer::feature::{FeatureCommand, execute};
use hookline_producer::flags::{FlagStore, PgFlagStore};
use hookline_producer::{
    Change, Emitter, EmitterConfig, Flags, INLINE_FLAG, ProducerMetrics, TransitionRequest,
};
use hookline_schemas::{
    BuildEvent, BuildStatus, Codec, PayloadTiming, SchemaVersion, TransitionFacts,
};
use hookline_tests::{create_topic, kafka_brokers, pg_store, poll_until, unique_name};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};

/// An event as read back from the topic.
struct Read {
    key: String,
    event: BuildEvent,
    writer_schema_id: u32,
}

/// Reads the first `n` records of `topic` (all partitions, from the beginning).
async fn read(topic: &str, partitions: i32, n: usize) -> Vec<Read> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    for p in 0..partitions {
        assignment
            .add_partition_offset(topic, p, Offset::Beginning)
            .unwrap();
    }
    consumer.assign(&assignment).unwrap();
    let codec = Codec::embedded();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while out.len() < n {
            let message = consumer.recv().await.expect("consume");
            let decoded = codec
                .decode(message.payload().expect("value"))
                .await
                .expect("decodes");
            out.push(Read {
                key: String::from_utf8(message.key().expect("key").to_vec()).unwrap(),
                event: decoded.event,
                writer_schema_id: decoded.writer_schema_id,
            });
        }
    })
    .await
    .unwrap_or_else(|_| panic!("read {} of {n} records from {topic}", out.len()));
    out
}

async fn world(store: &PgStore, bases: &[i64]) -> Vec<RenderSnapshot> {
    let mut snapshots = Vec::new();
    for base in bases {
        let snapshot = sample(*base);
        write_snapshot(store, &snapshot).await.unwrap();
        snapshots.push(snapshot);
    }
    snapshots
}

async fn emitter(
    store: Arc<dyn CiStore>,
    flags: Flags,
    topic: &str,
    writer: SchemaVersion,
) -> Emitter {
    let mut config = EmitterConfig::new(kafka_brokers());
    config.topic = topic.to_owned();
    config.writer = writer;
    Emitter::new(config, store, flags, Arc::new(ProducerMetrics::new()))
        .await
        .unwrap()
}

#[tokio::test]
async fn inline_events_carry_the_renderers_bytes_and_deferred_events_none() {
    let store = pg_store().await;
    let [on, off] = <[RenderSnapshot; 2]>::try_from(world(&store, &[0, 1_000_000]).await)
        .ok()
        .unwrap();
    let topic = unique_name("events");
    create_topic(&topic, 3).await;
    let flags = Flags::in_memory();
    flags
        .set(
            INLINE_FLAG,
            "test",
            Change::Actors {
                enable: true,
                actors: vec![format!("Project:{}", on.project.id)],
            },
        )
        .await
        .unwrap();
    let store: Arc<dyn CiStore> = Arc::new(store);
    let emitter = emitter(store.clone(), flags, &topic, SchemaVersion::V2).await;

    let facts = TransitionFacts {
        started_at: on.build.started_at,
        finished_at: Some(on.build.started_at.unwrap() + chrono::Duration::milliseconds(81_250)),
        duration: Some(81.25),
        queued_duration: Some(2.488),
        failure_reason: Some("script_failure".into()),
    };
    let inline = emitter
        .emit(TransitionRequest {
            facts: Some(facts.clone()),
            ..TransitionRequest::new(on.build.id, BuildStatus::Failed)
        })
        .await
        .unwrap()
        .emitted()
        .expect("emitted, not skipped");
    assert_eq!(inline.timing, PayloadTiming::Inline);
    assert!(inline.render_time.is_some() && inline.payload_bytes > 0);
    let deferred = emitter
        .emit(TransitionRequest::new(off.build.id, BuildStatus::Running))
        .await
        .unwrap()
        .emitted()
        .expect("emitted, not skipped");
    assert_eq!(deferred.timing, PayloadTiming::Deferred);

    let mut records = read(&topic, 3, 2).await;
    records.sort_by_key(|r| r.event.build_id);
    let (first, second) = (&records[0], &records[1]);
    assert_eq!(first.key, on.build.id.to_string(), "key is the build id");
    assert_eq!(first.event.event_id, inline.event_id);
    assert_eq!(first.event.payload_timing, PayloadTiming::Inline);
    assert_eq!(first.event.facts, facts);
    let snapshot = store.snapshot(on.build.id).await.unwrap().unwrap();
    let expected = render(&snapshot, &Transition::of_event(&first.event));
    assert_eq!(
        first.event.payload.as_deref(),
        Some(expected.as_slice()),
        "inline bytes = renderer output"
    );
    let json: serde_json::Value = serde_json::from_slice(&expected).unwrap();
    assert_eq!(json["build_status"], "failed");
    assert_eq!(json["build_failure_reason"], "script_failure");

    assert_eq!(second.event.build_id, off.build.id);
    assert_eq!(second.event.payload_timing, PayloadTiming::Deferred);
    assert_eq!(second.event.payload, None);
    // Facts left out were read from the build row.
    assert_eq!(second.event.facts.started_at, off.build.started_at);
    assert_eq!(second.event.project_id, off.project.id);
    assert_eq!(second.event.pipeline_id, off.pipeline.id);
}

#[tokio::test]
async fn the_v1_switch_writes_legacy_events_without_rendering() {
    let store = pg_store().await;
    let snapshot = world(&store, &[0]).await.remove(0);
    let topic = unique_name("legacy");
    create_topic(&topic, 1).await;
    let flags = Flags::in_memory();
    flags
        .set(INLINE_FLAG, "test", Change::Boolean(true))
        .await
        .unwrap();
    let emitter = emitter(Arc::new(store), flags, &topic, SchemaVersion::V1).await;
    let emitted = emitter
        .emit(TransitionRequest::new(
            snapshot.build.id,
            BuildStatus::Pending,
        ))
        .await
        .unwrap()
        .emitted()
        .expect("emitted, not skipped");
    assert_eq!(emitted.timing, PayloadTiming::Deferred);
    assert_eq!(emitted.render_time, None);
    let record = read(&topic, 1, 1).await.remove(0);
    assert_eq!(
        record.writer_schema_id,
        Codec::embedded_writing(SchemaVersion::V1).writer_schema_id()
    );
    assert_eq!(record.event.payload, None);
    assert_eq!(record.event.status, BuildStatus::Pending);
}

#[tokio::test]
async fn a_batch_keeps_one_builds_transitions_in_order_and_reports_unknown_builds() {
    let store = pg_store().await;
    let snapshot = world(&store, &[0]).await.remove(0);
    let topic = unique_name("batch");
    create_topic(&topic, 3).await;
    let emitter = emitter(
        Arc::new(store),
        Flags::in_memory(),
        &topic,
        SchemaVersion::V2,
    )
    .await;
    let id = snapshot.build.id;
    let statuses = [
        BuildStatus::Created,
        BuildStatus::Pending,
        BuildStatus::Running,
        BuildStatus::Failed,
    ];
    let mut requests: Vec<_> = statuses
        .iter()
        .map(|s| TransitionRequest::new(id, *s))
        .collect();
    requests.insert(2, TransitionRequest::new(999_999_999, BuildStatus::Running));
    let results = emitter.emit_batch(requests).await;
    assert!(matches!(
        results[2],
        Err(hookline_producer::EmitError::UnknownBuild(999_999_999))
    ));
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 4);
    let records = read(&topic, 3, 4).await;
    let order: Vec<_> = records.iter().map(|r| r.event.status).collect();
    assert_eq!(
        order, statuses,
        "one build's events arrive in transition order"
    );
}

/// The rollout test at the library level: `feature set ... 100 --actors`, then
/// `feature set ... false`, made through the PostgreSQL flag store by another "process" (its own
/// pool), switch a running emitter's timing within its reload interval.
#[tokio::test]
async fn flag_changes_in_postgres_reach_a_running_producer_without_restart() {
    let store = pg_store().await;
    let snapshot = world(&store, &[0]).await.remove(0);
    let topic = unique_name("rollout");
    create_topic(&topic, 1).await;
    let flags = Flags::load(
        Arc::new(PgFlagStore::new(store.pool().clone())),
        Duration::from_millis(200),
    )
    .await
    .unwrap();
    let operator = PgFlagStore::new(store.pool().clone());
    let emitter = emitter(Arc::new(store), flags, &topic, SchemaVersion::V2).await;
    let next_timing = || async {
        emitter
            .emit(TransitionRequest::new(
                snapshot.build.id,
                BuildStatus::Running,
            ))
            .await
            .unwrap()
            .emitted()
            .expect("emitted, not skipped")
            .timing
    };
    assert_eq!(next_timing().await, PayloadTiming::Deferred, "default off");

    let set = |value: &str, actors: bool| FeatureCommand::Set {
        name: INLINE_FLAG.into(),
        value: value.into(),
        actors,
        random: false,
        project: vec![],
        opt_out: false,
    };
    execute(&operator, "ops", &set("100", true)).await.unwrap();
    poll_until(
        "inline after `feature set 100 --actors`",
        Duration::from_secs(10),
        || async { (next_timing().await == PayloadTiming::Inline).then_some(()) },
    )
    .await;
    execute(&operator, "ops", &set("false", false))
        .await
        .unwrap();
    poll_until(
        "deferred after `feature set false`",
        Duration::from_secs(10),
        || async { (next_timing().await == PayloadTiming::Deferred).then_some(()) },
    )
    .await;

    let history = operator.history(INLINE_FLAG).await.unwrap();
    let changes: Vec<_> = history
        .iter()
        .map(|h| {
            (
                h.who.as_str(),
                h.gate.as_str(),
                h.old.clone(),
                h.new.clone(),
            )
        })
        .collect();
    assert_eq!(
        changes,
        [
            ("ops", "percentage_of_actors", None, Some("100".to_owned())),
            ("ops", "percentage_of_actors", Some("100".to_owned()), None),
        ]
    );
}

#[tokio::test]
async fn postgres_flag_store_keeps_gates_history_and_serialises_concurrent_changes() {
    let store = pg_store().await;
    let flags = PgFlagStore::new(store.pool().clone());
    // Twenty operators add one project each at once: none of the additions is lost.
    let adds = (1..=20).map(|p| {
        let flags = flags.clone();
        async move {
            flags
                .update(
                    INLINE_FLAG,
                    &format!("op{p}"),
                    &Change::Actors {
                        enable: true,
                        actors: vec![format!("Project:{p}")],
                    },
                )
                .await
                .unwrap()
        }
    });
    futures::future::join_all(adds).await;
    let gates = flags.load().await.unwrap().remove(INLINE_FLAG).unwrap();
    assert_eq!(gates.actors.len(), 20);
    assert_eq!(flags.history(INLINE_FLAG).await.unwrap().len(), 20);
    flags
        .update(
            INLINE_FLAG,
            "ops",
            &Change::OptOut {
                enable: true,
                actors: vec!["Project:3".into()],
            },
        )
        .await
        .unwrap();
    flags
        .update(
            INLINE_FLAG,
            "ops",
            &Change::PercentageOfTime("12.5".parse().unwrap()),
        )
        .await
        .unwrap();
    let gates = flags.load().await.unwrap().remove(INLINE_FLAG).unwrap();
    assert!(gates.opt_out_actors.contains("Project:3"));
    assert_eq!(
        gates.percentage_of_time.map(|p| p.to_string()),
        Some("12.5".into())
    );
    assert!(flags.delete(INLINE_FLAG, "ops").await.unwrap());
    assert!(
        flags.load().await.unwrap().is_empty(),
        "deleted: back to the default"
    );
    let last = flags.history(INLINE_FLAG).await.unwrap();
    assert!(
        last.iter().rev().take(3).all(|h| h.new.is_none()),
        "delete records every closed gate"
    );
}
