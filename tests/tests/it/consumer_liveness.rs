//! Liveness of the consumer against the real broker and database: no record wedges a partition,
//! a failure burst cannot disable a hook for good, the dead-letter listing never fails on a new
//! topic, and the retry and dead-letter topics exist before the first failure.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use hookline_cistate::CiStore;
use hookline_consumer::dead_letter::{self, DeadLetterKind, ReplayFilter};
use hookline_consumer::metrics::Stall;
use hookline_consumer::{Consumer, ConsumerError, Outcome};
use hookline_schemas::{BuildStatus, Codec, SchemaVersion};
use hookline_tests::world::{World, legacy_event};
use hookline_tests::{Answer, Received, Receiver, admin, create_topic, poll_until, unique_name};
use rdkafka::consumer::{BaseConsumer, Consumer as _};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use sha2::{Digest, Sha256};

/// The 170 KB record of the report: each control character renders as 6 bytes of JSON
/// (`\u0001`), so the body is over a megabyte, past Kafka's default message size.
fn oversized_failure_reason() -> String {
    "\u{1}".repeat(170_000)
}

/// The first request for `event_id` among the receiver's requests after the first `skip`,
/// waited for up to a minute.
async fn arrival(receiver: &Receiver, event_id: uuid::Uuid, skip: usize) -> Received {
    let id = event_id.to_string();
    poll_until(
        &format!("a delivery of event {id}"),
        Duration::from_secs(60),
        || {
            let received = receiver.received();
            let id = id.clone();
            async move {
                received
                    .into_iter()
                    .skip(skip)
                    .find(|r| r.header("x-gitlab-event-uuid") == Some(id.as_str()))
            }
        },
    )
    .await
}

/// The committed offset of partition 0 of `topic` for `group`.
fn committed(brokers: &str, group: &str, topic: &str) -> Option<i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .expect("offset reader");
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let offsets = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .expect("committed offsets");
    match offsets.elements()[0].offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hand_off_too_large_for_kafka_ends_in_a_compact_dead_letter_and_the_partition_moves_on() {
    let world = World::new(1).await;
    let snapshot = world.build(70_000).await;
    let receiver = Receiver::start().await;
    let hook = world.hook(snapshot.project.id, &receiver.url, None).await;
    // The oversized delivery fails (500: its retry hand-off is too large), the next event of
    // the same build for the same hook must still go out, and the offsets must move.
    receiver.script([Answer::Status(500)]);
    let mut big = legacy_event(&snapshot, BuildStatus::Failed);
    big.facts.failure_reason = Some(oversized_failure_reason());
    let next = legacy_event(&snapshot, BuildStatus::Running);
    let config = world.config();
    let group = config.group_id.clone();
    let running = world.start(config.clone()).await;
    world.send(&big, SchemaVersion::V1).await;
    world.send(&next, SchemaVersion::V1).await;

    let next_delivery = arrival(&receiver, next.event_id, 0).await;
    assert!(next_delivery.header("idempotency-key").is_some());
    poll_until("both records committed", Duration::from_secs(30), || {
        let (brokers, topic, group) = (world.brokers.clone(), world.topic.clone(), group.clone());
        async move { (committed(&brokers, &group, &topic) == Some(2)).then_some(()) }
    })
    .await;
    assert_eq!(running.metrics.in_flight(), 0);
    assert_eq!(running.metrics.stalled_seconds(Stall::Handoff), 0);
    assert_eq!(running.metrics.dead_letters(Some("handoff_too_large")), 1);
    assert_eq!(running.metrics.deliveries(Outcome::HandoffRefused), 1);

    // The compact dead letter names everything needed to do the delivery again.
    let letters = dead_letter::list(&world.config()).await.expect("list");
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.reason, "handoff_too_large");
    assert!(letter.value.is_empty(), "no body in a compact dead letter");
    let DeadLetterKind::Reference {
        source,
        hook_id,
        idempotency_key,
        body_bytes,
        body_sha256,
    } = &letter.kind
    else {
        panic!("not a reference: {letter:?}");
    };
    let source = source.as_ref().expect("source named");
    assert_eq!(
        (source.topic.as_str(), source.partition, source.offset),
        (world.topic.as_str(), 0, 0)
    );
    assert_eq!(*hook_id, Some(hook.id));
    let first_attempt = arrival(&receiver, big.event_id, 0).await;
    assert_eq!(
        idempotency_key.as_deref(),
        first_attempt.header("idempotency-key")
    );
    assert!(
        first_attempt.body.len() > 1_000_000,
        "{}",
        first_attempt.body.len()
    );
    assert_eq!(*body_bytes, Some(first_attempt.body.len() as u64));
    let digest: String = Sha256::digest(&first_attempt.body)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(body_sha256.as_deref(), Some(digest.as_str()));

    // The replay re-drives it from the source record, to this hook only, and it arrives.
    let before = receiver.count();
    let summary = dead_letter::replay(&world.config(), &ReplayFilter::default())
        .await
        .expect("replay");
    assert_eq!(summary.references, 1, "{summary:?}");
    let redelivered = arrival(&receiver, big.event_id, before).await;
    assert_eq!(redelivered.status, StatusCode::OK);
    assert_eq!(
        redelivered.header("idempotency-key"),
        idempotency_key.as_deref()
    );
    assert_eq!(redelivered.body.len(), first_attempt.body.len());
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_final_failure_whose_dead_letter_is_too_large_does_not_wedge_either() {
    let world = World::new(1).await;
    let snapshot = world.build(71_000).await;
    let receiver = Receiver::start().await;
    world.hook(snapshot.project.id, &receiver.url, None).await;
    // 401 is final: the dead letter would carry the megabyte body.
    receiver.script([Answer::Status(401)]);
    let mut big = legacy_event(&snapshot, BuildStatus::Failed);
    big.facts.failure_reason = Some(oversized_failure_reason());
    let next = legacy_event(&snapshot, BuildStatus::Success);
    let running = world.start(world.config()).await;
    world.send(&big, SchemaVersion::V1).await;
    world.send(&next, SchemaVersion::V1).await;
    arrival(&receiver, next.event_id, 0).await;
    poll_until("the compact dead letter", Duration::from_secs(30), || {
        let n = running.metrics.dead_letters(Some("handoff_too_large"));
        async move { (n == 1).then_some(()) }
    })
    .await;
    let letters = dead_letter::list(&world.config()).await.expect("list");
    assert_eq!(letters.len(), 1);
    assert!(
        letters[0].detail.contains("final_response"),
        "the detail keeps the intended reason: {}",
        letters[0].detail
    );
    running.stop().await;
}

/// An `Idempotency-Key` accepted, and when.
type Delivered = (String, chrono::DateTime<Utc>);

/// A receiver that fails the first attempt of every `Idempotency-Key`, a second later (so that
/// a burst's first attempts are all in flight at once), and accepts the next at once.
#[derive(Clone, Default)]
struct FirstAttemptFails {
    seen: Arc<Mutex<HashMap<String, usize>>>,
    delivered: Arc<Mutex<Vec<Delivered>>>,
    /// When each first attempt was answered 500.
    failed_at: Arc<Mutex<Vec<chrono::DateTime<Utc>>>>,
}

impl FirstAttemptFails {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let this = self.clone();
        let app = axum::Router::new().fallback(move |headers: HeaderMap, _body: Bytes| {
            let this = this.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                let n = {
                    let mut seen = this.seen.lock().unwrap();
                    let n = seen.entry(key.clone()).or_default();
                    *n += 1;
                    *n
                };
                if n == 1 {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    this.failed_at.lock().unwrap().push(Utc::now());
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    this.delivered.lock().unwrap().push((key, Utc::now()));
                    StatusCode::OK
                }
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        url
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_failures_disables_a_hook_for_a_minute_not_for_good() {
    const BUILDS: i64 = 100;
    let world = World::new(4).await;
    let builds = world.builds(72_000, BUILDS).await;
    let receiver = FirstAttemptFails::default();
    let url = receiver.start().await;
    let hook = world.hook(builds[0].project.id, &url, None).await;
    let mut config = world.config();
    // Every first attempt in flight at once, and every first attempt over before the first
    // retry is due (a retry that succeeded in the middle of the burst would reset the hook).
    config.max_in_flight = 256;
    config.poll_batch = 128;
    // One hook may hold the whole window here (its own slots would hand the excess on before
    // its attempt: fairness between hooks is not what this test is about).
    config.hook_in_flight = 256;
    config.host_in_flight = 256;
    config.retry_schedule = hookline_consumer::schedule::RetrySchedule {
        jitter: 0.0,
        ..hookline_consumer::schedule::RetrySchedule::with_delays(vec![
            Duration::from_secs(3),
            Duration::from_secs(3),
            Duration::from_secs(3),
        ])
    };
    // The whole burst is on the topic before the consumer starts: it is dispatched at once.
    for b in &builds {
        world
            .send(&legacy_event(b, BuildStatus::Running), SchemaVersion::V1)
            .await;
    }
    let running = world.start(config).await;
    poll_until(
        "every first attempt failed",
        Duration::from_secs(60),
        || {
            let failed = running.metrics.deliveries(Outcome::Retried);
            async move { (failed == BUILDS as u64).then_some(()) }
        },
    )
    .await;
    assert_eq!(
        receiver.seen.lock().unwrap().len(),
        BUILDS as usize,
        "every delivery was attempted once in the burst (none deferred before its attempt)"
    );
    // Failures that ended while the hook was already backing off did not count.
    let health = world.store.hook(hook.id).await.unwrap().unwrap();
    assert!(
        (4..=5).contains(&health.recent_failures),
        "failures {} after a burst of {BUILDS}",
        health.recent_failures
    );
    // A minute's back-off from the failure that disabled it (two from a 5th): it ends more
    // than a minute after the first failure was answered (the disabling one was recorded after
    // that), and at most two minutes after now (every failure was recorded before now). Order
    // between moments, not the speed of this machine.
    let until = health.disabled_until.expect("backing off");
    let first_failure = *receiver.failed_at.lock().unwrap().iter().min().unwrap();
    assert!(
        until > first_failure + chrono::Duration::minutes(1),
        "backing off until {until}, first failure answered at {first_failure}"
    );
    assert!(
        until <= Utc::now() + chrono::Duration::minutes(2),
        "backing off until {until}: more than the 5th failure's two minutes"
    );
    assert_eq!(running.metrics.dead_letters(None), 0);

    // The deferred deliveries go out once the back-off has passed, and none before.
    poll_until("every deferred delivery", Duration::from_secs(150), || {
        let n = receiver.delivered.lock().unwrap().len();
        async move { (n == BUILDS as usize).then_some(()) }
    })
    .await;
    let delivered = receiver.delivered.lock().unwrap().clone();
    let early: Vec<_> = delivered.iter().filter(|(_, at)| *at < until).collect();
    assert!(early.is_empty(), "delivered before {until}: {early:?}");
    let health = world.store.hook(hook.id).await.unwrap().unwrap();
    assert_eq!(health.recent_failures, 0, "a success resets the hook");
    assert_eq!(running.metrics.dead_letters(None), 0);
    running.stop().await;
}

#[tokio::test]
async fn listing_dead_letters_never_creates_the_topic_and_waits_for_a_new_one() {
    let topic = unique_name("events");
    let config =
        hookline_consumer::ConsumerConfig::new(hookline_tests::kafka_brokers(), unique_name("g"))
            .with_topic(&topic);
    // No topic yet: nothing dead-lettered, and listing does not create it.
    assert!(dead_letter::list(&config).await.expect("list").is_empty());
    // All topics: asking a client for one topic by name could itself create it.
    let metadata = admin()
        .inner()
        .fetch_metadata(None, Duration::from_secs(10))
        .expect("metadata");
    let exists = metadata
        .topics()
        .iter()
        .any(|t| t.name() == config.dlq_topic && t.error().is_none() && !t.partitions().is_empty());
    assert!(!exists, "listing created {}", config.dlq_topic);
    // A topic created a moment ago (its partitions may have no leader yet) lists as empty,
    // again and again, without an error.
    create_topic(&config.dlq_topic, 3).await;
    for _ in 0..3 {
        assert!(dead_letter::list(&config).await.expect("list").is_empty());
    }
}

#[tokio::test]
async fn the_retry_and_dead_letter_topics_are_created_at_start_like_the_main_topic() {
    let topic = unique_name("events");
    create_topic(&topic, 3).await;
    let store = Arc::new(hookline_tests::pg_store().await);
    let mut config =
        hookline_consumer::ConsumerConfig::new(hookline_tests::kafka_brokers(), unique_name("g"))
            .with_topic(&topic);

    config.create_topics = false;
    let consumer = Consumer::new(config.clone(), store.clone(), Codec::embedded())
        .await
        .expect("consumer");
    let refused = tokio::time::timeout(
        Duration::from_secs(60),
        consumer.run(tokio_util::sync::CancellationToken::new()),
    )
    .await
    .expect("refused at once, not waited for")
    .expect_err("missing topics with creation off");
    let ConsumerError::Config(message) = refused else {
        panic!("{refused:?}")
    };
    assert!(
        message.contains(&config.retry_topic) && message.contains(&config.dlq_topic),
        "{message}"
    );

    config.create_topics = true;
    let consumer = Consumer::new(config.clone(), store, Codec::embedded())
        .await
        .expect("consumer");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(consumer.run(shutdown.clone()));
    let metadata = poll_until("the topics", Duration::from_secs(30), || async {
        let metadata = admin()
            .inner()
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata");
        let created = [&config.retry_topic, &config.dlq_topic].iter().all(|name| {
            metadata
                .topics()
                .iter()
                .any(|t| t.name() == name.as_str() && !t.partitions().is_empty())
        });
        created.then_some(metadata)
    })
    .await;
    for name in [&config.retry_topic, &config.dlq_topic] {
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == name.as_str())
            .unwrap();
        assert_eq!(t.partitions().len(), 3, "{name}");
    }
    shutdown.cancel();
    running.await.expect("join").expect("ran");
}
