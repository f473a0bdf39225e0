//! The consumer against a registry that misbehaves in ways the real one (`registry_apicurio`)
//! cannot be made to: it answers `503` to lookups by id while up, and it counts the lookups, so
//! the test sees the consumer asking again. The fake registry is served over real HTTP on
//! loopback, with the real broker and the real PostgreSQL.

use std::sync::Arc;
use std::time::Duration;

use hookline_consumer::Consumer;
use hookline_schemas::{BuildStatus, Codec, HttpRegistry, SchemaVersion};
use hookline_tests::fake_registry::FakeRegistry;
use hookline_tests::world::{World, inline_event, legacy_event};
use hookline_tests::{Receiver, poll_until};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);

async fn registry_codec(url: &str, writer: SchemaVersion) -> Codec {
    Codec::new(Arc::new(HttpRegistry::new(url).unwrap()), writer)
        .await
        .expect("registry codec")
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
