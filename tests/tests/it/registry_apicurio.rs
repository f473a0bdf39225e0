//! Both services against a real Confluent-compatible schema registry: Apicurio Registry, started
//! by `scripts/registry` (`HOOKLINE_TEST_REGISTRY` is its `/apis/ccompat/v7` URL), with the real
//! broker and PostgreSQL. Apicurio's ids are not sequential, so no test assumes an id's value;
//! its default compatibility is NONE, so the compatibility test sets BACKWARD on a subject of its
//! own. Outages are acted with a TCP gate in front of the shared registry, never by stopping it.

use std::sync::Arc;
use std::time::Duration;

use apache_avro::Schema;
use hookline_cistate::{CiStore, Transition, render};
use hookline_consumer::Consumer;
use hookline_consumer::metrics::Stall;
use hookline_producer::{
    Change, Emitter, EmitterConfig, Flags, INLINE_FLAG, ProducerMetrics, TransitionRequest,
};
use hookline_schemas::{
    BuildStatus, Codec, CodecError, HttpRegistry, PayloadTiming, RegistryError, SchemaRegistry,
    SchemaVersion,
};
use hookline_tests::pg_gate::PgGate;
use hookline_tests::world::World;
use hookline_tests::{Receiver, kafka_brokers, poll_until, registry_url, unique_name};
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(30);
const CONTENT_TYPE: &str = "application/vnd.schemaregistry.v1+json";

/// The schema id in a Confluent-framed record.
fn schema_id(value: &[u8]) -> u32 {
    assert_eq!(value[0], 0, "Confluent magic byte");
    u32::from_be_bytes(value[1..5].try_into().unwrap())
}

/// The value of the record at `offset` of partition `partition` of `topic`.
async fn record_value(topic: &str, partition: i32, offset: i64) -> Vec<u8> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("reader"))
        .set("enable.auto.commit", "false")
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, partition, Offset::Offset(offset))
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let message = tokio::time::timeout(WAIT, consumer.recv())
        .await
        .expect("record read in time")
        .expect("consume");
    message.payload().expect("value").to_vec()
}

/// `GET /schemas/ids/{id}` straight from the registry: the schema's JSON.
async fn registry_schema_json(url: &str, id: u32) -> Value {
    let answer: Value = reqwest::get(format!("{url}/schemas/ids/{id}"))
        .await
        .expect("GET schema by id")
        .error_for_status()
        .expect("the registry knows the id")
        .json()
        .await
        .expect("JSON");
    serde_json::from_str(answer["schema"].as_str().expect("schema text")).expect("schema JSON")
}

/// The same, parsed as Avro.
async fn registry_schema(url: &str, id: u32) -> Schema {
    Schema::parse_str(&registry_schema_json(url, id).await.to_string()).expect("Avro schema")
}

/// The field `name` of a record schema's JSON.
fn field<'a>(schema: &'a Value, name: &str) -> &'a Value {
    schema["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .find(|f| f["name"] == name)
        .unwrap_or_else(|| panic!("no field {name} in {schema}"))
}

async fn emitter(world: &World, url: &str, writer: SchemaVersion, flags: Flags) -> Emitter {
    let mut config = EmitterConfig::new(world.brokers.clone());
    config.topic = world.topic.clone();
    config.schema_registry_url = Some(url.to_owned());
    config.writer = writer;
    let store: Arc<dyn CiStore> = world.store.clone();
    Emitter::new(config, store, flags, Arc::new(ProducerMetrics::new()))
        .await
        .expect("emitter with a registry")
}

async fn inline_flags() -> Flags {
    let flags = Flags::in_memory();
    flags
        .set(INLINE_FLAG, "test", Change::Boolean(true))
        .await
        .unwrap();
    flags
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v1_and_v2_producers_register_at_startup_and_the_consumer_delivers_both_by_id() {
    let Some(url) = registry_url() else { return };
    let world = World::new(1).await;
    let snapshot = world.build(0).await;
    let receiver = Receiver::start().await;
    world.hook(snapshot.project.id, &receiver.url, None).await;

    // Two producers on one topic: today's (v2, inline) and one still on the v1 writer. Each
    // registers its writer schema at startup.
    let v2 = emitter(&world, &url, SchemaVersion::V2, inline_flags().await).await;
    let v1 = emitter(&world, &url, SchemaVersion::V1, inline_flags().await).await;
    let running = v2
        .emit(TransitionRequest::new(
            snapshot.build.id,
            BuildStatus::Running,
        ))
        .await
        .unwrap()
        .emitted()
        .expect("emitted");
    assert_eq!(running.timing, PayloadTiming::Inline);
    let success = v1
        .emit(TransitionRequest::new(
            snapshot.build.id,
            BuildStatus::Success,
        ))
        .await
        .unwrap()
        .emitted()
        .expect("emitted");

    // Each record names its writer's id, and the registry itself answers that id with that
    // writer's schema (whatever the id's value).
    let v2_bytes = record_value(&world.topic, running.partition, running.offset).await;
    let v1_bytes = record_value(&world.topic, success.partition, success.offset).await;
    let (v2_id, v1_id) = (schema_id(&v2_bytes), schema_id(&v1_bytes));
    assert_ne!(v2_id, v1_id, "two writer schemas, two ids");
    assert_eq!(
        registry_schema(&url, v2_id).await.canonical_form(),
        SchemaVersion::V2.schema().canonical_form()
    );
    assert_eq!(
        registry_schema(&url, v1_id).await.canonical_form(),
        SchemaVersion::V1.schema().canonical_form()
    );
    // Registered whole, not in Parsing Canonical Form: the defaults that make v2 readable by v1
    // readers (and v1 records by v2) and the logical types reach the registry.
    let registered = registry_schema_json(&url, v2_id).await;
    assert_eq!(field(&registered, "payload")["default"], Value::Null);
    assert!(
        field(&registered, "payload").get("default").is_some(),
        "payload's default: {registered}"
    );
    assert_eq!(
        field(&registered, "event_id")["type"]["logicalType"],
        "uuid",
        "{registered}"
    );
    // The embedded registry's fixed ids do not name them (unless by chance): the reader must ask.
    if !matches!(v2_id, 1 | 2) {
        assert!(matches!(
            Codec::embedded().decode(&v2_bytes).await,
            Err(CodecError::UnknownSchemaId(i)) if i == v2_id
        ));
    }

    // The consumer's codec knows only the schema it registered itself; v1 is fetched by id.
    let codec = Codec::for_registry(Some(&url), SchemaVersion::V2)
        .await
        .expect("consumer codec");
    let inline = codec.decode(&v2_bytes).await.unwrap().event;
    let current = world
        .store
        .snapshot(snapshot.build.id)
        .await
        .unwrap()
        .unwrap();
    let expected_running = render(&current, &Transition::of_event(&inline));
    assert_eq!(
        inline.payload.as_deref(),
        Some(expected_running.as_slice()),
        "the inline payload survives the registry's round trip"
    );
    let consumer = Consumer::new(world.config(), world.store.clone(), codec)
        .await
        .expect("consumer");
    let metrics = consumer.metrics();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));
    poll_until("both Job Hooks", WAIT, || async {
        (receiver.count() >= 2).then_some(())
    })
    .await;
    let got = receiver.received();
    let uuids: Vec<_> = got
        .iter()
        .map(|r| {
            r.header("x-gitlab-event-uuid")
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert!(uuids.contains(&running.event_id.to_string()), "{uuids:?}");
    assert!(uuids.contains(&success.event_id.to_string()), "{uuids:?}");
    let inline_hook = got
        .iter()
        .find(|r| r.header("x-gitlab-event-uuid") == Some(running.event_id.to_string().as_str()))
        .unwrap();
    assert_eq!(
        inline_hook.body.as_ref(),
        expected_running.as_slice(),
        "the v2 record's Job Hook is its inline payload, byte for byte"
    );
    assert_eq!(metrics.dead_letters(None), 0);

    shutdown.cancel();
    task.await.expect("join").expect("consumer ran");
}

#[tokio::test]
async fn an_incompatible_schema_is_refused_with_409_on_a_backward_subject() {
    let Some(url) = registry_url() else { return };
    let http = reqwest::Client::new();
    // A subject of this test's own: the shared one is not switched to BACKWARD under others.
    let subject = unique_name("compat-value");
    let config: Value = http
        .put(format!("{url}/config/{subject}"))
        .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
        .body(json!({"compatibility": "BACKWARD"}).to_string())
        .send()
        .await
        .unwrap()
        .error_for_status()
        .expect("PUT /config/{subject}")
        .json()
        .await
        .unwrap();
    assert_eq!(config["compatibility"], "BACKWARD", "{config}");

    // hookline's own evolution is backward compatible: v2 registers over v1.
    let registry = HttpRegistry::new(&url).unwrap();
    let v1 = registry
        .register(&subject, &SchemaVersion::V1.schema())
        .await
        .expect("v1 registers");
    let v2 = registry
        .register(&subject, &SchemaVersion::V2.schema())
        .await
        .expect("v2 registers over v1 under BACKWARD");
    assert_ne!(v1, v2);

    // A BuildEvent that drops a field into a new required one without a default cannot read
    // the old records: refused with 409, and the client reports a refusal, not an outage.
    let mut incompatible: Value =
        serde_json::from_str(&SchemaVersion::V2.schema().canonical_form()).unwrap();
    incompatible["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "tenant", "type": "string"}));
    let incompatible = Schema::parse_str(&incompatible.to_string()).expect("valid Avro");
    let raw = http
        .post(format!("{url}/subjects/{subject}/versions"))
        .header(reqwest::header::CONTENT_TYPE, CONTENT_TYPE)
        .body(json!({"schema": incompatible.canonical_form()}).to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), reqwest::StatusCode::CONFLICT);
    let err = HttpRegistry::new(&url)
        .unwrap()
        .register(&subject, &incompatible)
        .await
        .expect_err("refused");
    assert!(matches!(err, RegistryError::Refused(_)), "{err}");
    assert!(!err.is_transient(), "asking again would not help: {err}");
    assert!(err.to_string().contains("409"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_that_does_not_answer_at_startup_fails_it_after_a_few_attempts() {
    let Some(url) = registry_url() else { return };
    let (gate, gated) = gate_in_front_of(&url).await;
    gate.close();
    let world = World::new(1).await;
    let mut config = EmitterConfig::new(world.brokers.clone());
    config.topic = world.topic.clone();
    config.schema_registry_url = Some(gated.clone());
    let store: Arc<dyn CiStore> = world.store.clone();
    let err = Emitter::new(
        config,
        store,
        Flags::in_memory(),
        Arc::new(ProducerMetrics::new()),
    )
    .await
    .expect_err("the producer does not start without its registry");
    let message = err.to_string();
    assert!(message.contains("gave up after"), "{message}");

    // The consumer's codec, the same way; with the gate open both start.
    let err = Codec::for_registry(Some(&gated), SchemaVersion::V2)
        .await
        .expect_err("the consumer's codec does not open either");
    assert!(err.is_transient(), "{err}");
    gate.open();
    Codec::for_registry(Some(&gated), SchemaVersion::V2)
        .await
        .expect("registry reachable again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_registry_outage_while_running_holds_unseen_ids_and_does_not_stop_the_producer() {
    let Some(url) = registry_url() else { return };
    let (gate, gated) = gate_in_front_of(&url).await;
    let world = World::new(1).await;
    let snapshot = world.build(0).await;
    let receiver = Receiver::start().await;
    world.hook(snapshot.project.id, &receiver.url, None).await;

    // Both services start through the gate while the registry answers.
    let v2 = emitter(&world, &gated, SchemaVersion::V2, inline_flags().await).await;
    let v1 = emitter(&world, &url, SchemaVersion::V1, Flags::in_memory()).await;
    let codec = Codec::for_registry(Some(&gated), SchemaVersion::V2)
        .await
        .expect("consumer codec");
    let consumer = Consumer::new(world.config(), world.store.clone(), codec)
        .await
        .expect("consumer");
    let metrics = consumer.metrics();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(consumer.run(shutdown.clone()));

    // The registry goes away. The producer has its id already: it keeps emitting, and the
    // consumer reads v2 records (its own writer schema, known since startup).
    gate.close();
    let running = v2
        .emit(TransitionRequest::new(
            snapshot.build.id,
            BuildStatus::Running,
        ))
        .await
        .expect("the producer emits without asking the registry again")
        .emitted()
        .expect("emitted");
    poll_until(
        "the v2 record delivered during the outage",
        WAIT,
        || async { (receiver.count() >= 1).then_some(()) },
    )
    .await;

    // A v1 record names an id this consumer has never fetched: the partition waits for the
    // registry (the stall gauge says so); nothing is dead-lettered or delivered meanwhile.
    let success = v1
        .emit(TransitionRequest::new(
            snapshot.build.id,
            BuildStatus::Success,
        ))
        .await
        .unwrap()
        .emitted()
        .expect("emitted");
    poll_until("the consumer stalled on the registry", WAIT, || async {
        (metrics.stalled_seconds(Stall::SchemaRegistry) >= 1).then_some(())
    })
    .await;
    assert_eq!(receiver.count(), 1, "the v1 record is held, not delivered");
    assert_eq!(
        metrics.dead_letters(None),
        0,
        "an outage dead-letters nothing"
    );

    // Back: the held record is read and delivered.
    gate.open();
    poll_until("the held record delivered", WAIT, || async {
        (receiver.count() >= 2).then_some(())
    })
    .await;
    let got = receiver.received();
    assert_eq!(
        got[0].header("x-gitlab-event-uuid"),
        Some(running.event_id.to_string().as_str())
    );
    assert_eq!(
        got[1].header("x-gitlab-event-uuid"),
        Some(success.event_id.to_string().as_str())
    );
    assert_eq!(metrics.dead_letters(None), 0);

    shutdown.cancel();
    task.await.expect("join").expect("consumer ran");
}

/// A gate in front of the registry of `url`, and the same URL through the gate.
async fn gate_in_front_of(url: &str) -> (PgGate, String) {
    let rest = url
        .strip_prefix("http://")
        .expect("an http:// registry URL");
    let (address, path) = rest.split_once('/').unwrap_or((rest, ""));
    let gate = PgGate::in_front_of(address.to_owned()).await;
    let gated = format!("http://127.0.0.1:{}/{path}", gate.port());
    (gate, gated)
}
