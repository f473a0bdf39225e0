//! The Confluent-compatible registry client against a real HTTP server on loopback that speaks
//! the registry's API (register a subject version, fetch by id).

use std::sync::Arc;

use hookline_schemas::{
    BuildEvent, BuildStatus, Codec, CodecError, HttpRegistry, PayloadTiming, SchemaVersion,
    TransitionFacts,
};
use hookline_tests::fake_registry::FakeRegistry;

fn event() -> BuildEvent {
    BuildEvent {
        event_id: uuid::Uuid::new_v4(),
        build_id: 1,
        project_id: 2,
        pipeline_id: 3,
        status: BuildStatus::Pending,
        occurred_at: chrono::DateTime::from_timestamp_micros(1_800_000_000_000_000).unwrap(),
        facts: TransitionFacts::default(),
        payload: Some(b"{}".to_vec()),
        payload_timing: PayloadTiming::Inline,
    }
}

#[tokio::test]
async fn registers_writer_schemas_and_decodes_by_fetched_id() {
    let registry = FakeRegistry::start().await;
    let url = registry.url.clone();
    let v1 = Codec::new(
        Arc::new(HttpRegistry::new(&url).unwrap()),
        SchemaVersion::V1,
    )
    .await
    .unwrap();
    let v2 = Codec::new(
        Arc::new(HttpRegistry::new(&url).unwrap()),
        SchemaVersion::V2,
    )
    .await
    .unwrap();
    assert_eq!((v1.writer_schema_id(), v2.writer_schema_id()), (100, 101));

    // A fresh client (another process) knows no schema yet: it fetches by id, once.
    let reader = Codec::new(
        Arc::new(HttpRegistry::new(&url).unwrap()),
        SchemaVersion::V2,
    )
    .await
    .unwrap();
    let e = event();
    for _ in 0..3 {
        let decoded = reader.decode(&v1.encode(&e).unwrap()).await.unwrap();
        assert_eq!(decoded.writer_schema_id, 100);
        assert_eq!(decoded.event.payload, None);
        assert_eq!(
            reader.decode(&v2.encode(&e).unwrap()).await.unwrap().event,
            e
        );
    }
    assert_eq!(
        registry.requests("by_id"),
        1,
        "the v1 schema is fetched once, then cached"
    );

    let mut unknown = v2.encode(&e).unwrap();
    unknown[1..5].copy_from_slice(&7u32.to_be_bytes());
    assert!(matches!(
        reader.decode(&unknown).await,
        Err(CodecError::UnknownSchemaId(7))
    ));
}

#[tokio::test]
async fn an_unreachable_registry_is_a_transient_error() {
    // Bind then drop a listener: nothing answers on that port.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let registry = Arc::new(HttpRegistry::new(&format!("http://127.0.0.1:{port}")).unwrap());
    let err = Codec::new(registry, SchemaVersion::V2).await.unwrap_err();
    assert!(err.is_transient(), "{err}");
}
