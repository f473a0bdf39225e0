//! `hookline-producer serve`'s HTTP API against the real Kafka broker and PostgreSQL: 202 only
//! once Kafka acknowledged the event, and each error status.

use std::sync::Arc;
use std::time::Duration;

use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{CiStore, RenderSnapshot};
use hookline_producer::event_ids::PgEventIds;
use hookline_producer::{
    AppState, Change, Emitter, EmitterConfig, Flags, INLINE_FLAG, ProducerMetrics,
};
use hookline_schemas::Codec;
use hookline_tests::producer::Producer;
use hookline_tests::{
    PrivateBroker, admin, create_topic, kafka_brokers, pg_store, poll_until, unique_name,
};
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{Value, json};

/// The producer API in-process with the build its tests post transitions for.
struct Started {
    producer: Producer,
    snapshot: RenderSnapshot,
    /// The store's pool (its schema holds `producer_event_ids`).
    pool: sqlx::PgPool,
}

impl std::ops::Deref for Started {
    type Target = Producer;

    fn deref(&self) -> &Producer {
        &self.producer
    }
}

async fn start(
    brokers: String,
    topic: &str,
    create_partitions: Option<i32>,
    delivery_timeout: Duration,
) -> Started {
    start_with(
        brokers,
        topic,
        create_partitions,
        delivery_timeout,
        sample(0),
        false,
    )
    .await
}

/// As `serve` runs it: event ids recorded in PostgreSQL; `inline` turns the flag on.
async fn start_with(
    brokers: String,
    topic: &str,
    create_partitions: Option<i32>,
    delivery_timeout: Duration,
    snapshot: RenderSnapshot,
    inline: bool,
) -> Started {
    let store = pg_store().await;
    write_snapshot(&store, &snapshot).await.unwrap();
    let pool = store.pool().clone();
    let event_ids = Arc::new(PgEventIds::new(store.pool().clone()));
    let store: Arc<dyn CiStore> = Arc::new(store);
    let flags = Flags::in_memory();
    if inline {
        flags
            .set(INLINE_FLAG, "test", Change::Boolean(true))
            .await
            .unwrap();
    }
    let mut config = EmitterConfig::new(brokers);
    config.event_ids = Some(event_ids);
    config.topic = topic.to_owned();
    config.delivery_timeout = delivery_timeout;
    config.create_topic_partitions = create_partitions;
    let producer = Producer::start(config, store, flags, |state| AppState {
        body_limit: 4096,
        retry_after: Duration::from_secs(7),
        ..state
    })
    .await;
    Started {
        producer,
        snapshot,
        pool,
    }
}

async fn post(url: &str, body: impl Into<reqwest::Body>) -> (u16, Option<String>, Value) {
    let response = reqwest::Client::new()
        .post(url)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("request");
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().to_owned());
    let json = response.json().await.unwrap_or(Value::Null);
    (status, retry_after, json)
}

/// The record at `partition`/`offset` of `topic`, decoded.
fn record_at(topic: &str, partition: i32, offset: i64) -> hookline_schemas::BuildEvent {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("reader"))
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let message = consumer
        .poll(Duration::from_secs(20))
        .expect("a record at the acknowledged offset")
        .expect("consume");
    let bytes = message.payload().unwrap().to_vec();
    futures::executor::block_on(Codec::embedded().decode(&bytes))
        .unwrap()
        .event
}

#[tokio::test]
async fn accepted_means_acknowledged_and_on_the_topic() {
    let topic = unique_name("http");
    create_topic(&topic, 2).await;
    let producer = start(kafka_brokers(), &topic, None, Duration::from_secs(10)).await;
    let build_id = producer.snapshot.build.id;
    let body = json!({
        "build_id": build_id,
        "status": "success",
        "occurred_at": "2026-11-27T20:21:00.123456Z",
        "facts": {"started_at": "2026-11-27T20:19:03.5Z", "finished_at": "2026-11-27T20:21:00Z", "duration": 116.5}
    });
    let (status, _, json) = post(
        &format!("{}/v1/transitions", producer.url),
        body.to_string(),
    )
    .await;
    assert_eq!(status, 202, "{json}");
    assert_eq!(json["timing"], "deferred");
    let (partition, offset) = (
        json["partition"].as_i64().unwrap() as i32,
        json["offset"].as_i64().unwrap(),
    );
    let event = tokio::task::spawn_blocking({
        let topic = topic.clone();
        move || record_at(&topic, partition, offset)
    })
    .await
    .unwrap();
    assert_eq!(
        event.event_id.to_string(),
        json["event_id"].as_str().unwrap()
    );
    assert_eq!(event.build_id, build_id);
    assert_eq!(event.facts.duration, Some(116.5));
    assert_eq!(
        event.occurred_at.to_rfc3339(),
        "2026-11-27T20:21:00.123456+00:00"
    );

    let client = reqwest::Client::new();
    let metrics = client
        .get(format!("{}/metrics", producer.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("hookline_producer_events_emitted_total{timing=\"deferred\"} 1"),
        "{metrics}"
    );
    assert_eq!(producer.metrics.events_emitted("deferred"), 1);
    assert_eq!(
        client
            .get(format!("{}/healthz", producer.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client
            .get(format!("{}/readyz", producer.url))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );

    // Graceful shutdown: run returns, the socket closes.
    let url = producer.url.clone();
    producer.producer.stop().await;
    assert!(client.get(format!("{url}/healthz")).send().await.is_err());
}

#[tokio::test]
async fn errors_answer_404_422_413_and_400() {
    let topic = unique_name("http_errors");
    create_topic(&topic, 1).await;
    let producer = start(kafka_brokers(), &topic, None, Duration::from_secs(10)).await;
    let url = format!("{}/v1/transitions", producer.url);
    let (status, _, json) = post(&url, r#"{"build_id": 123456789, "status": "running"}"#).await;
    assert_eq!(status, 404, "{json}");
    let (status, _, json) = post(&url, r#"{"build_id": 1, "status": "manual"}"#).await;
    assert_eq!(
        (status, json["field"].as_str()),
        (422, Some("status")),
        "{json}"
    );
    let (status, _, json) = post(
        &url,
        r#"{"build_id": 1, "status": "failed", "facts": {"finished_at": 12}}"#,
    )
    .await;
    assert_eq!(
        (status, json["field"].as_str()),
        (422, Some("facts.finished_at")),
        "{json}"
    );
    let big =
        json!({"build_id": 1, "status": "failed", "facts": {"failure_reason": "x".repeat(5000)}});
    let (status, _, _) = post(&url, big.to_string()).await;
    assert_eq!(status, 413);
    let (status, _, _) = post(&url, "[1, 2").await;
    assert_eq!(status, 400);
    assert_eq!(
        producer.metrics.events_emitted("deferred"),
        0,
        "nothing was emitted"
    );
}

#[tokio::test]
async fn a_batch_is_accepted_whole_or_reports_each_item() {
    let topic = unique_name("http_batch");
    create_topic(&topic, 1).await;
    let producer = start(kafka_brokers(), &topic, None, Duration::from_secs(10)).await;
    let url = format!("{}/v1/transitions/batch", producer.url);
    let id = producer.snapshot.build.id;
    let (status, _, json) = post(
        &url,
        json!([{"build_id": id, "status": "created"}, {"build_id": id, "status": "pending"}])
            .to_string(),
    )
    .await;
    assert_eq!(status, 202, "{json}");
    assert_eq!(json["accepted"], 2);
    let (status, _, json) = post(
        &url,
        json!([{"build_id": id, "status": "running"}, {"build_id": 5, "status": "running"}])
            .to_string(),
    )
    .await;
    assert_eq!(status, 404, "{json}");
    assert_eq!(json["accepted"], 1);
    assert_eq!(json["results"][0]["status"], 202);
    assert_eq!(json["results"][1]["status"], 404);
}

/// The broker goes away: every request is answered 503 with Retry-After once the delivery
/// timeout passes, and none gets 202.
#[tokio::test]
async fn a_stopped_broker_gets_503_with_retry_after_and_never_202() {
    let broker = PrivateBroker::start();
    let topic = unique_name("http_down");
    let producer = start(
        broker.bootstrap.clone(),
        &topic,
        Some(1),
        Duration::from_secs(3),
    )
    .await;
    let url = format!("{}/v1/transitions", producer.url);
    let body = json!({"build_id": producer.snapshot.build.id, "status": "running"}).to_string();
    // Only a 202 ends the wait; what it says is checked: acknowledged at an offset.
    let json = poll_until(
        "the private broker accepts",
        Duration::from_secs(60),
        || async {
            let (status, _, json) = post(&url, body.clone()).await;
            (status == 202).then_some(json)
        },
    )
    .await;
    assert!(json["offset"].is_i64() && json["partition"] == 0, "{json}");

    broker.stop();
    let answers = futures::future::join_all((0..5).map(|_| post(&url, body.clone()))).await;
    for (status, retry_after, json) in &answers {
        assert_eq!(*status, 503, "{json}");
        assert_eq!(retry_after.as_deref(), Some("7"));
    }
    let ready = reqwest::get(format!("{}/readyz", producer.url))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert!(
        producer
            .metrics
            .value("hookline_producer_produce_errors_total{kind=\"unavailable\"}")
            >= Some(5.0),
        "{}",
        producer.metrics.encode()
    );
}

/// Every record of a one-partition `topic` on `brokers`, decoded, in offset order.
fn all_records(brokers: &str, topic: &str) -> Vec<(i64, hookline_schemas::BuildEvent)> {
    let reader = || -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("group.id", unique_name("reader"))
            .create()
            .unwrap()
    };
    // A broker that was just paused is fenced for a moment when it goes on (its session timed
    // out meanwhile): ask again, with a fresh client and so fresh metadata.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let (consumer, high) = loop {
        let consumer = reader();
        match consumer.fetch_watermarks(topic, 0, Duration::from_secs(10)) {
            Ok((_, high)) => break (consumer, high),
            Err(error) if std::time::Instant::now() < deadline => {
                eprintln!("watermarks of {topic}: {error}; asking again");
                std::thread::sleep(Duration::from_millis(500));
            }
            Err(error) => panic!("watermarks of {topic}: {error}"),
        }
    };
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&tpl).unwrap();
    let mut out = Vec::new();
    while out.last().is_none_or(|(offset, _)| offset + 1 < high) {
        let message = consumer
            .poll(Duration::from_secs(20))
            .expect("a record below the high watermark")
            .expect("consume");
        let event =
            futures::executor::block_on(Codec::embedded().decode(message.payload().unwrap()))
                .unwrap()
                .event;
        out.push((message.offset(), event));
    }
    out
}

/// A late ack, end to end: the broker hangs (SIGSTOP) while an event is in flight, so the
/// request is answered 503 once `--delivery-timeout` passes; the broker goes on (SIGCONT) and
/// acknowledges the record after all. The client retries with the same `event_id`, as the 503
/// tells it to: the retry is answered `202` from the first write (`"repeated": true`, its
/// partition and offset), and the topic holds the event once.
#[tokio::test]
async fn a_retry_after_a_late_ack_is_answered_from_the_first_write() {
    let broker = tokio::task::spawn_blocking(PrivateBroker::start)
        .await
        .unwrap();
    let topic = unique_name("http_late_ack");
    // The late ack must come within the extra half of the delivery timeout that librdkafka
    // waits beyond it (`kafka_message_timeout`): 4 s here, whatever the machine's load.
    let producer = start(
        broker.bootstrap.clone(),
        &topic,
        Some(1),
        Duration::from_secs(8),
    )
    .await;
    let url = format!("{}/v1/transitions", producer.url);
    let build_id = producer.snapshot.build.id;
    // Connected and the topic known before the broker hangs.
    poll_until(
        "the private broker accepts",
        Duration::from_secs(60),
        || {
            let body = json!({"build_id": build_id, "status": "pending"}).to_string();
            let url = url.clone();
            async move { (post(&url, body).await.0 == 202).then_some(()) }
        },
    )
    .await;

    let event_id = uuid::Uuid::new_v4();
    let body = json!({"build_id": build_id, "status": "running", "event_id": event_id}).to_string();
    let broker = std::sync::Arc::new(broker);
    tokio::task::spawn_blocking({
        let broker = broker.clone();
        move || broker.pause()
    })
    .await
    .unwrap();
    let (status, retry_after, refused) = post(&url, body.clone()).await;
    tokio::task::spawn_blocking({
        let broker = broker.clone();
        move || broker.resume()
    })
    .await
    .unwrap();
    assert_eq!(status, 503, "{refused}");
    assert!(retry_after.is_some());
    assert!(
        refused["error"]
            .as_str()
            .is_some_and(|e| e.contains("may still be written")),
        "{refused}"
    );

    // The late ack: counted, and the event id recorded with its offset.
    poll_until("the late ack", Duration::from_secs(30), || async {
        (producer.metrics.late_acks() == 1).then_some(())
    })
    .await;
    // Recording the late ack's event id follows the ack by a moment: wait for it (at most
    // 30 s), so the retry below comes after it, as the README's promise is worded. If it never
    // comes, the retry goes anyway and what the client gets shows the fault.
    let recorded = async {
        for _ in 0..150 {
            let row: Option<(i32, i64)> = sqlx::query_as(
                "SELECT partition, \"offset\" FROM producer_event_ids WHERE event_id = $1",
            )
            .bind(event_id)
            .fetch_optional(&producer.pool)
            .await
            .unwrap();
            if row.is_some() {
                return row;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        None
    }
    .await;

    let (status, _, again) = post(&url, body).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(
        again["repeated"], true,
        "the retry after the late ack was not answered from the first write: {again}"
    );
    let records = tokio::task::spawn_blocking({
        let (brokers, topic) = (broker.bootstrap.clone(), topic.clone());
        move || all_records(&brokers, &topic)
    })
    .await
    .unwrap();
    let written: Vec<(i32, i64)> = records
        .iter()
        .filter(|(_, e)| e.event_id == event_id)
        .map(|(offset, _)| (0, *offset))
        .collect();
    assert_eq!(
        written.len(),
        1,
        "the event's records on the topic: {written:?}"
    );
    assert_eq!(
        (again["partition"].as_i64(), again["offset"].as_i64()),
        (Some(0), Some(written[0].1)),
        "{again}"
    );
    assert_eq!(recorded, Some(written[0]), "the recorded first write");
}

/// Before the event id store, the second post of the same id was emitted again (a new offset),
/// and a different transition under a used id was accepted.
#[tokio::test]
async fn a_used_event_id_answers_its_first_emission_or_409_for_another_transition() {
    let topic = unique_name("http_ids");
    create_topic(&topic, 1).await;
    let producer = start(kafka_brokers(), &topic, None, Duration::from_secs(10)).await;
    let url = format!("{}/v1/transitions", producer.url);
    let build_id = producer.snapshot.build.id;
    let event_id = uuid::Uuid::new_v4();
    let first = json!({"build_id": build_id, "status": "running", "event_id": event_id});
    let (status, _, answer) = post(&url, first.to_string()).await;
    assert_eq!(status, 202, "{answer}");
    let offset = answer["offset"].as_i64().unwrap();
    assert!(answer.get("repeated").is_none(), "{answer}");

    let (status, _, again) = post(&url, first.to_string()).await;
    assert_eq!(status, 202, "{again}");
    assert_eq!(
        (
            again["partition"].clone(),
            again["offset"].clone(),
            again["repeated"].clone()
        ),
        (
            answer["partition"].clone(),
            answer["offset"].clone(),
            json!(true)
        ),
        "{again}"
    );

    let other = json!({"build_id": build_id, "status": "failed", "event_id": event_id});
    let (status, _, conflict) = post(&url, other.to_string()).await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["field"], "event_id");

    // In a batch: the known id is answered from its first emission, a new one is emitted.
    let batch = json!([first, {"build_id": build_id, "status": "success"}]);
    let (status, _, answers) = post(
        &format!("{}/v1/transitions/batch", producer.url),
        batch.to_string(),
    )
    .await;
    assert_eq!(status, 202, "{answers}");
    assert_eq!(answers["results"][0]["offset"], offset);
    assert_eq!(answers["results"][0]["repeated"], true);
    // Nothing was emitted for the repeats or the conflict: the next event follows the first.
    assert_eq!(answers["results"][1]["offset"], offset + 1, "{answers}");
    let (status, _, conflict) = post(
        &format!("{}/v1/transitions/batch", producer.url),
        json!([other]).to_string(),
    )
    .await;
    assert_eq!(status, 409, "{conflict}");
    assert_eq!(conflict["results"][0]["status"], 409);
}

async fn create_topic_with_max_message_bytes(name: &str, max: usize) {
    let max = max.to_string();
    let topic = NewTopic::new(name, 1, TopicReplication::Fixed(-1)).set("max.message.bytes", &max);
    let results = admin()
        .create_topics(
            &[topic],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        result.unwrap_or_else(|(topic, code)| panic!("creating topic {topic}: {code}"));
    }
}

/// Before sizes were checked, the broker's refusal answered 500.
#[tokio::test]
async fn an_event_the_broker_refuses_for_its_size_is_413_not_500() {
    let topic = unique_name("http_small");
    create_topic_with_max_message_bytes(&topic, 4000).await;
    // An inline payload the compressor cannot shrink below the topic's limit.
    let mut snapshot = sample(0);
    snapshot.pipeline.commit_message = (0..600)
        .map(|_| uuid::Uuid::new_v4().simple().to_string())
        .collect();
    let producer = start_with(
        kafka_brokers(),
        &topic,
        None,
        Duration::from_secs(10),
        snapshot,
        true,
    )
    .await;
    let url = format!("{}/v1/transitions", producer.url);
    let body = json!({"build_id": producer.snapshot.build.id, "status": "running"});
    let (status, retry_after, json) = post(&url, body.to_string()).await;
    assert_eq!(status, 413, "{json}");
    assert_eq!(retry_after, None);
    assert!(
        json["error"].as_str().unwrap().contains("size"),
        "the answer says why: {json}"
    );
}

#[tokio::test]
async fn startup_checks_the_topic_takes_the_largest_event() {
    let topic = unique_name("http_limit");
    create_topic_with_max_message_bytes(&topic, 100_000).await;
    let emitter = |max_event_bytes: usize| {
        let topic = topic.clone();
        async move {
            let mut config = EmitterConfig::new(kafka_brokers());
            config.topic = topic;
            config.max_event_bytes = max_event_bytes;
            Emitter::new(
                config,
                Arc::new(hookline_cistate::MemoryStore::new()),
                Flags::in_memory(),
                Arc::new(ProducerMetrics::new()),
            )
            .await
            .unwrap()
        }
    };
    let error = emitter(1_000_000)
        .await
        .check_topic_limit()
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("100000") && error.contains("--max-event-bytes 1000000"),
        "{error}"
    );
    emitter(90_000).await.check_topic_limit().await.unwrap();
}

#[tokio::test]
async fn event_ids_older_than_the_retention_window_are_pruned() {
    use hookline_producer::event_ids::{EventIds, Recorded};
    let store = pg_store().await;
    let ids = PgEventIds::new(store.pool().clone());
    let id = uuid::Uuid::new_v4();
    let record = Recorded {
        event_id: id,
        digest: [7; 32],
        partition: 1,
        offset: 42,
        timing: hookline_schemas::PayloadTiming::Inline,
        payload_bytes: 2411,
    };
    ids.record(std::slice::from_ref(&record)).await.unwrap();
    assert_eq!(ids.lookup(&[id]).await.unwrap()[&id], record);
    assert_eq!(ids.prune(Duration::from_secs(7 * 86400)).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(ids.prune(Duration::from_millis(10)).await.unwrap(), 1);
    assert!(ids.lookup(&[id]).await.unwrap().is_empty());
}
