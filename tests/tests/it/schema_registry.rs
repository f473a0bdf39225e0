//! Both services against a Confluent-compatible schema registry instead of the embedded one: a
//! fake registry served over real HTTP on loopback (ids from 100, so they differ from the
//! embedded ones), the real broker and the real PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use hookline_cistate::{CiStore, Transition, render};
use hookline_consumer::Consumer;
use hookline_producer::{
    Change, Emitter, EmitterConfig, Flags, INLINE_FLAG, ProducerMetrics, TransitionRequest,
};
use hookline_schemas::{
    BuildStatus, Codec, CodecError, HttpRegistry, PayloadTiming, SchemaVersion,
};
use hookline_tests::fake_registry::FakeRegistry;
use hookline_tests::world::{World, inline_event, legacy_event};
use hookline_tests::{Receiver, kafka_brokers, poll_until, unique_name};
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

async fn registry_codec(url: &str, writer: SchemaVersion) -> Codec {
    Codec::new(Arc::new(HttpRegistry::new(url).unwrap()), writer)
        .await
        .expect("registry codec")
}

/// The value of the record at `offset` of partition 0 of `topic`.
async fn record_value(topic: &str, offset: i64) -> Vec<u8> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let message = tokio::time::timeout(WAIT, consumer.recv())
        .await
        .expect("record read in time")
        .expect("consume");
    message.payload().expect("value").to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn producer_and_consumer_use_registry_ids_and_the_inline_payload_arrives_byte_identical() {
    let registry = FakeRegistry::start().await;
    let url = registry.url.clone();
    let world = World::new(1).await;
    let snapshot = world.build(0).await;
    let receiver = Receiver::start().await;
    world.hook(snapshot.project.id, &receiver.url, None).await;

    // The producer's library, configured with the registry: it registers its v2 writer schema.
    let flags = Flags::in_memory();
    flags
        .set(INLINE_FLAG, "test", Change::Boolean(true))
        .await
        .unwrap();
    let mut config = EmitterConfig::new(world.brokers.clone());
    config.topic = world.topic.clone();
    config.schema_registry_url = Some(url.clone());
    let store: Arc<dyn CiStore> = world.store.clone();
    let emitter = Emitter::new(config, store, flags, Arc::new(ProducerMetrics::new()))
        .await
        .expect("emitter with a registry");
    assert_eq!(registry.requests("register"), 1, "v2 registered at startup");
    let emitted = emitter
        .emit(TransitionRequest::new(
            snapshot.build.id,
            BuildStatus::Running,
        ))
        .await
        .unwrap()
        .emitted()
        .expect("emitted, not skipped");
    assert_eq!(emitted.timing, PayloadTiming::Inline);

    // The record names the registry's id, which the embedded registry does not know.
    let value = record_value(&world.topic, emitted.offset).await;
    assert_eq!(value[0], 0, "Confluent magic byte");
    let id = u32::from_be_bytes(value[1..5].try_into().unwrap());
    assert!(id >= 100, "schema id {id} comes from the registry");
    assert!(matches!(
        Codec::embedded().decode(&value).await,
        Err(CodecError::UnknownSchemaId(i)) if i == id
    ));
    let event = registry_codec(&url, SchemaVersion::V2)
        .await
        .decode(&value)
        .await
        .unwrap()
        .event;
    let current = world
        .store
        .snapshot(snapshot.build.id)
        .await
        .unwrap()
        .unwrap();
    let expected = render(&current, &Transition::of_event(&event));
    assert_eq!(
        event.payload.as_deref(),
        Some(expected.as_slice()),
        "embedded payload = renderer output"
    );

    // The consumer's library with a codec on the same registry.
    let codec = registry_codec(&url, SchemaVersion::V2).await;
    let consumer = Consumer::new(world.config(), world.store.clone(), codec)
        .await
        .expect("consumer");
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(consumer.run(shutdown.clone()));

    poll_until("the Job Hook", WAIT, || async {
        (receiver.count() >= 1).then_some(())
    })
    .await;
    let got = receiver.received();
    assert_eq!(got.len(), 1);
    assert_eq!(
        got[0].header("x-gitlab-event-uuid"),
        Some(emitted.event_id.to_string().as_str())
    );
    assert_eq!(
        got[0].body.as_ref(),
        expected.as_slice(),
        "the Job Hook is the embedded payload, byte for byte"
    );

    shutdown.cancel();
    running.await.expect("join").expect("consumer ran");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_unknown_id_is_dead_lettered_and_a_registry_outage_holds_the_record() {
    let registry = FakeRegistry::start().await;
    let url = registry.url.clone();
    let world = World::new(1).await;
    let snapshot = world.build(0).await;
    let receiver = Receiver::start().await;
    world.hook(snapshot.project.id, &receiver.url, None).await;
    // Another process's writers: v2 (id 100) now, v1 (id 101) registered before the outage.
    let v2 = registry_codec(&url, SchemaVersion::V2).await;
    let v1 = registry_codec(&url, SchemaVersion::V1).await;
    assert_eq!((v2.writer_schema_id(), v1.writer_schema_id()), (100, 101));

    let codec = registry_codec(&url, SchemaVersion::V2).await;
    let consumer = Consumer::new(world.config(), world.store.clone(), codec)
        .await
        .expect("consumer");
    let metrics = consumer.metrics();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(consumer.run(shutdown.clone()));
    let key = snapshot.build.id.to_string();

    // An id the registry answers 404 for can never be read: dead-lettered.
    let mut unknown = v2
        .encode(&inline_event(&snapshot, BuildStatus::Running))
        .unwrap();
    unknown[1..5].copy_from_slice(&999u32.to_be_bytes());
    world.send_raw(&key, &unknown).await;
    poll_until("the unknown id dead-lettered", WAIT, || async {
        (metrics.dead_letters(Some("unknown_schema_id")) >= 1).then_some(())
    })
    .await;

    // The registry is down when a record of a schema this consumer has not fetched yet arrives:
    // the record waits (lookups repeat), nothing is dead-lettered or delivered.
    registry.set_down(true);
    let before = registry.requests("by_id");
    let legacy = legacy_event(&snapshot, BuildStatus::Success);
    world.send_raw(&key, &v1.encode(&legacy).unwrap()).await;
    poll_until("the consumer asking the registry again", WAIT, || async {
        (registry.requests("by_id") >= before + 3).then_some(())
    })
    .await;
    assert_eq!(
        receiver.count(),
        0,
        "nothing delivered while the registry is down"
    );
    assert_eq!(
        metrics.dead_letters(None),
        1,
        "the outage dead-letters nothing"
    );

    // Back up: the held record is read and delivered.
    registry.set_down(false);
    poll_until("the held record delivered", WAIT, || async {
        (receiver.count() >= 1).then_some(())
    })
    .await;
    let got = receiver.received();
    assert_eq!(
        got[0].header("x-gitlab-event-uuid"),
        Some(legacy.event_id.to_string().as_str())
    );
    assert_eq!(metrics.dead_letters(None), 1);

    shutdown.cancel();
    running.await.expect("join").expect("consumer ran");
}
