//! The outbox against the real PostgreSQL and Kafka, one relay batch at a time: a row recorded
//! in a transaction exists exactly when the transaction commits; the relay publishes rows with
//! the row's event id and the facts the transaction saw, keyed by build, in commit order;
//! rows that can never be published are moved aside with the reason and the build's later rows
//! go on; and a build's rows held by one relay are not taken by another.
//! (The kill test is `producer/tests/outbox_relay.rs`: it needs the relay binary.)

use std::sync::Arc;
use std::time::Duration;

use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{CiStore, Outbox, OutboxTransition, write_build};
use hookline_producer::relay::{RelayMetrics, relay_batch};
use hookline_producer::{Emitter, EmitterConfig, Flags, ProducerMetrics};
use hookline_schemas::{BuildStatus, Codec};
use hookline_tests::{create_topic, kafka_brokers, pg_store, unique_name};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use sqlx::Row;

async fn emitter(topic: &str, store: Arc<dyn CiStore>) -> Emitter {
    let mut config = EmitterConfig::new(kafka_brokers());
    config.topic = topic.to_owned();
    Emitter::new(
        config,
        store,
        Flags::in_memory(),
        Arc::new(ProducerMetrics::new()),
    )
    .await
    .expect("emitter")
}

/// (key, event id, status, started_at) of the first `n` records of a one-partition topic.
async fn read(
    topic: &str,
    n: usize,
) -> Vec<(
    String,
    uuid::Uuid,
    BuildStatus,
    Option<chrono::DateTime<chrono::Utc>>,
)> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka_brokers())
        .set("group.id", unique_name("reader"))
        .create()
        .expect("consumer");
    let mut assignment = TopicPartitionList::new();
    assignment
        .add_partition_offset(topic, 0, Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let codec = Codec::embedded();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), async {
        while out.len() < n {
            let message = consumer.recv().await.expect("consume");
            let event = codec
                .decode(message.payload().unwrap())
                .await
                .unwrap()
                .event;
            out.push((
                String::from_utf8(message.key().unwrap().to_vec()).unwrap(),
                event.event_id,
                event.status,
                event.facts.started_at,
            ));
        }
    })
    .await
    .expect("the records arrive");
    out
}

#[tokio::test]
async fn rows_are_published_in_commit_order_and_unpublishable_ones_are_set_aside_with_a_reason() {
    let store = pg_store().await;
    let pool = store.pool().clone();
    let topic = unique_name("outbox");
    create_topic(&topic, 1).await;
    let snapshot = sample(0);
    write_snapshot(&store, &snapshot).await.unwrap();
    let build = snapshot.build.clone();

    // Rolled back: no row.
    let mut tx = pool.begin().await.unwrap();
    Outbox::record(
        &mut *tx,
        &OutboxTransition::new(build.id, BuildStatus::Pending),
    )
    .await
    .unwrap();
    tx.rollback().await.unwrap();
    assert_eq!(Outbox::depth(&pool).await.unwrap().rows, 0);

    // Committed with the build row: facts come from the row as the transaction saw it.
    let mut running = build.clone();
    running.status = "running".into();
    let started = chrono::DateTime::parse_from_rfc3339("2026-12-01T10:00:00.123456Z")
        .unwrap()
        .to_utc();
    running.started_at = Some(started);
    let mut tx = pool.begin().await.unwrap();
    write_build(&mut *tx, &running).await.unwrap();
    let first = Outbox::record(
        &mut *tx,
        &OutboxTransition::new(build.id, BuildStatus::Running),
    )
    .await
    .unwrap();
    tx.commit().await.unwrap();
    // The build moves on before the relay runs: the event still carries the running facts.
    let mut later = running.clone();
    later.started_at = Some(started + chrono::Duration::seconds(60));
    store.upsert_build(&later).await.unwrap();

    // Through the SQL function, as a CI in another language would; an unknown build; facts the
    // API would refuse; and one more good row of the same build.
    let unknown: uuid::Uuid =
        sqlx::query_scalar("SELECT hookline_outbox_record(424242, 'pending')")
            .fetch_one(&pool)
            .await
            .unwrap();
    sqlx::query("SELECT hookline_outbox_record($1, 'failed', '{\"duration\": -1}')")
        .bind(build.id)
        .execute(&pool)
        .await
        .unwrap();
    let last: uuid::Uuid = sqlx::query_scalar("SELECT hookline_outbox_record($1, 'success')")
        .bind(build.id)
        .fetch_one(&pool)
        .await
        .unwrap();
    // A status outside the six is refused at the insert, in the CI's own transaction.
    let refused = sqlx::query("SELECT hookline_outbox_record($1, 'exploded')")
        .bind(build.id)
        .execute(&pool)
        .await
        .unwrap_err();
    assert!(
        refused.to_string().contains("check constraint"),
        "{refused}"
    );

    let store: Arc<dyn CiStore> = Arc::new(store);
    let emitter = emitter(&topic, store).await;
    let metrics = RelayMetrics::new();
    let outcome = relay_batch(&pool, &emitter, 100, &metrics).await.unwrap();
    assert_eq!(
        (outcome.claimed, outcome.relayed, outcome.dead, outcome.left),
        (4, 2, 2, 0),
        "{outcome:?}"
    );
    assert_eq!(Outbox::depth(&pool).await.unwrap().rows, 0);
    let records = read(&topic, 2).await;
    let key = build.id.to_string();
    assert_eq!(
        records,
        vec![
            (key.clone(), first, BuildStatus::Running, Some(started)),
            (
                key,
                last,
                BuildStatus::Success,
                Some(started + chrono::Duration::seconds(60))
            ),
        ]
    );
    let dead = sqlx::query("SELECT event_id, reason FROM hookline_outbox_dead ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    let reasons: Vec<(uuid::Uuid, String)> = dead
        .iter()
        .map(|r| (r.get("event_id"), r.get("reason")))
        .collect();
    assert_eq!(reasons.len(), 2, "{reasons:?}");
    assert_eq!(reasons[0].0, unknown);
    assert!(
        reasons[0].1.contains("build 424242 not found"),
        "{reasons:?}"
    );
    assert!(reasons[1].1.starts_with("facts.duration"), "{reasons:?}");
    assert_eq!(Outbox::depth(&pool).await.unwrap().dead, 2);
    assert!(
        metrics
            .encode()
            .contains("hookline_relay_rows_relayed_total 2"),
        "{}",
        metrics.encode()
    );
}

#[tokio::test]
async fn a_build_whose_older_row_another_relay_holds_waits_for_it() {
    let store = pg_store().await;
    let pool = store.pool().clone();
    let a = sample(0);
    let mut b = sample(0);
    b.build.id += 1;
    write_snapshot(&store, &a).await.unwrap();
    store.upsert_build(&b.build).await.unwrap();
    for (build, status) in [
        (a.build.id, BuildStatus::Created),
        (b.build.id, BuildStatus::Created),
        (a.build.id, BuildStatus::Pending),
    ] {
        Outbox::record(&pool, &OutboxTransition::new(build, status))
            .await
            .unwrap();
    }
    // Relay one holds the oldest row (build a's first).
    let mut one = pool.begin().await.unwrap();
    let held = Outbox::claim(&mut *one, 1).await.unwrap();
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].build_id, a.build.id);
    // Relay two gets build b's row, not build a's second: it waits behind the first.
    let mut two = pool.begin().await.unwrap();
    let taken = Outbox::claim(&mut *two, 10).await.unwrap();
    assert_eq!(
        taken.iter().map(|r| r.build_id).collect::<Vec<_>>(),
        vec![b.build.id]
    );
    two.rollback().await.unwrap();
    // Once relay one has published and deleted its row, build a's second row is free.
    Outbox::delete(&mut *one, &[held[0].id]).await.unwrap();
    one.commit().await.unwrap();
    let mut three = pool.begin().await.unwrap();
    let taken = Outbox::claim(&mut *three, 10).await.unwrap();
    assert_eq!(
        taken.iter().map(|r| r.build_id).collect::<Vec<_>>(),
        vec![b.build.id, a.build.id]
    );
    three.rollback().await.unwrap();
}
