//! A consumer test's world: its own topics, store and hooks, events produced with the real
//! codec, a consumer running against the real broker, and receivers that answer slowly.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::{Received, create_topic, kafka_brokers, pg_store, unique_name};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use chrono::{DateTime, Utc};
use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{CiStore, Hook, NewHook, PgStore, RenderSnapshot, Transition, render};
use hookline_consumer::config::ConsumerConfig;
use hookline_consumer::deliver::DeliverConfig;
use hookline_consumer::schedule::RetrySchedule;
use hookline_consumer::{Consumer, ConsumerMetrics};
use hookline_schemas::{
    BuildEvent, BuildStatus, Codec, PayloadTiming, SchemaVersion, TransitionFacts,
};
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A test's own topics, store and producer.
pub struct World {
    /// The broker this world's topics live on (the shared one, or a test's private one).
    pub brokers: String,
    pub topic: String,
    pub store: Arc<PgStore>,
    pub producer: FutureProducer,
}

impl World {
    /// The PostgreSQL schema of this world's store (for a consumer started as a process).
    pub async fn store_schema(&self) -> String {
        sqlx::query_scalar::<_, String>("SELECT current_schema()::text")
            .fetch_one(self.store.pool())
            .await
            .expect("current schema")
    }

    pub async fn store_upsert_build(&self, build: &hookline_cistate::Build) {
        self.store.upsert_build(build).await.expect("upsert build");
    }
}

impl World {
    pub async fn new(partitions: i32) -> World {
        let topic = unique_name("events");
        create_topic(&topic, partitions).await;
        create_topic(&format!("{topic}.retry"), 2).await;
        create_topic(&format!("{topic}.dlq"), 1).await;
        World::with_topic(kafka_brokers(), topic).await
    }

    /// A world on another broker (a test's [`crate::PrivateBroker`]).
    pub async fn on(brokers: &str, partitions: i32) -> World {
        let topic = unique_name("events");
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .create()
            .expect("admin client");
        let (retry, dlq) = (format!("{topic}.retry"), format!("{topic}.dlq"));
        let topics = [
            NewTopic::new(&topic, partitions, TopicReplication::Fixed(-1)),
            NewTopic::new(&retry, 2, TopicReplication::Fixed(-1)),
            NewTopic::new(&dlq, 1, TopicReplication::Fixed(-1)),
        ];
        let results = admin
            .create_topics(
                &topics,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await
            .expect("create_topics request");
        for result in results {
            result.unwrap_or_else(|(topic, code)| panic!("creating topic {topic}: {code}"));
        }
        World::with_topic(brokers.to_owned(), topic).await
    }

    async fn with_topic(brokers: String, topic: String) -> World {
        // Idempotent, so a test producer that rides out a broker restart writes no duplicate
        // records of its own (they would be counted as the consumer's duplicates).
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &brokers)
            .set("linger.ms", "1")
            .set("enable.idempotence", "true")
            .create()
            .expect("producer");
        World {
            brokers,
            topic,
            store: Arc::new(pg_store().await),
            producer,
        }
    }

    /// The consumer options of this world: shrunk retries, loopback allowed.
    pub fn config(&self) -> ConsumerConfig {
        let mut c =
            ConsumerConfig::new(&self.brokers, unique_name("group")).with_topic(&self.topic);
        c.retry_schedule = RetrySchedule {
            jitter: 0.0,
            ..RetrySchedule::with_delays(vec![
                Duration::from_millis(20),
                Duration::from_millis(40),
                Duration::from_millis(80),
            ])
        };
        c.retry_hold = Duration::from_millis(500);
        c.hook_cache_ttl = Duration::from_millis(200);
        c.drain_timeout = Duration::from_secs(5);
        c.deliver = DeliverConfig {
            timeout: Duration::from_secs(2),
            instance_url: "https://ci.example.com".into(),
            allow_cidrs: vec!["127.0.0.0/8".into()],
            ..DeliverConfig::default()
        };
        c.kafka = vec![
            ("session.timeout.ms".into(), "6000".into()),
            ("heartbeat.interval.ms".into(), "500".into()),
        ];
        c
    }

    /// Writes the sample build (ids offset by `base`) and returns its snapshot.
    pub async fn build(&self, base: i64) -> RenderSnapshot {
        let snapshot = sample(base);
        write_snapshot(self.store.as_ref(), &snapshot)
            .await
            .expect("write snapshot");
        snapshot
    }

    pub async fn hook(&self, project_id: i64, url: &str, secret: Option<&str>) -> Hook {
        self.store
            .add_hook(&NewHook {
                project_id,
                url: url.to_owned(),
                token: Some("s3cret-token".into()),
                signing_secret: secret.map(str::to_owned),
                job_events: true,
                collapse: false,
            })
            .await
            .expect("add hook")
    }

    /// Produces raw bytes with `key`.
    pub async fn send_raw(&self, key: &str, bytes: &[u8]) {
        self.producer
            .send(
                FutureRecord::to(&self.topic).key(key).payload(bytes),
                Timeout::After(Duration::from_secs(10)),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("produce");
    }

    /// Encodes `event` with `version` and produces it (key = build id).
    pub async fn send(&self, event: &BuildEvent, version: SchemaVersion) {
        let bytes = Codec::embedded_writing(version)
            .encode(event)
            .expect("encode");
        self.send_raw(&event.build_id.to_string(), &bytes).await;
    }

    /// Starts a consumer; cancel the token to stop it, then await the handle.
    pub async fn start(&self, config: ConsumerConfig) -> Running {
        let consumer = Consumer::new(config, self.store.clone(), Codec::embedded())
            .await
            .expect("consumer");
        let metrics = consumer.metrics();
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(consumer.run(shutdown.clone()));
        Running {
            metrics,
            shutdown,
            handle,
        }
    }
}

pub struct Running {
    pub metrics: Arc<ConsumerMetrics>,
    pub shutdown: CancellationToken,
    pub handle: JoinHandle<Result<(), hookline_consumer::ConsumerError>>,
}

impl Running {
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.handle.await.expect("join").expect("consumer ran");
    }
}

/// A legacy-shaped event for `snapshot`'s build at `status`, no payload.
pub fn legacy_event(snapshot: &RenderSnapshot, status: BuildStatus) -> BuildEvent {
    BuildEvent {
        event_id: Uuid::new_v4(),
        build_id: snapshot.build.id,
        project_id: snapshot.project.id,
        pipeline_id: snapshot.pipeline.id,
        status,
        occurred_at: now_micros(),
        facts: TransitionFacts {
            started_at: snapshot.build.started_at,
            finished_at: None,
            duration: None,
            queued_duration: snapshot.build.queued_duration,
            failure_reason: None,
        },
        payload: None,
        payload_timing: PayloadTiming::Deferred,
    }
}

/// An inline event: the payload rendered now, as the producer does.
pub fn inline_event(snapshot: &RenderSnapshot, status: BuildStatus) -> BuildEvent {
    let mut event = legacy_event(snapshot, status);
    event.payload = Some(render(snapshot, &Transition::of_event(&event)));
    event.payload_timing = PayloadTiming::Inline;
    event
}

pub fn now_micros() -> DateTime<Utc> {
    hookline_cistate::render::truncate_to_micros(Utc::now())
}

impl World {
    /// `count` builds of one project: the sample build at `base` and copies with the next ids.
    pub async fn builds(&self, base: i64, count: i64) -> Vec<RenderSnapshot> {
        let first = self.build(base).await;
        let mut builds = vec![first.clone()];
        for i in 1..count {
            let mut b = first.clone();
            b.build.id += i;
            self.store_upsert_build(&b.build).await;
            builds.push(b);
        }
        builds
    }

    /// Produces `events` in order from a task of its own, waiting for each ack and `gap` between
    /// sends, but only as far as the test has released them (see [`Paced::release`]): a test
    /// acting "mid-run" thus knows that work remains for after its action. A send that fails
    /// (the broker is away for longer than the producer waits) is sent again; such a resend may
    /// be a duplicate record that is not the consumer's doing, so they are counted.
    pub fn send_paced(&self, events: Vec<(BuildEvent, SchemaVersion)>, gap: Duration) -> Paced {
        let producer = self.producer.clone();
        let topic = self.topic.clone();
        let (release, mut released) = watch::channel(0usize);
        let handle = tokio::spawn(async move {
            let mut resent = 0;
            for (i, (event, version)) in events.into_iter().enumerate() {
                if released.wait_for(|upto| i < *upto).await.is_err() {
                    break;
                }
                let bytes = Codec::embedded_writing(version)
                    .encode(&event)
                    .expect("encode");
                let key = event.build_id.to_string();
                let mut tries = 0;
                loop {
                    let sent = producer
                        .send(
                            FutureRecord::to(&topic).key(&key).payload(&bytes),
                            Timeout::After(Duration::from_secs(10)),
                        )
                        .await;
                    match sent {
                        Ok(_) => break,
                        Err((error, _)) => {
                            tries += 1;
                            assert!(tries < 20, "the test producer gave up: {error}");
                            eprintln!("test producer: {error}; sending again");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
                resent += usize::from(tries > 0);
                tokio::time::sleep(gap).await;
            }
            resent
        });
        Paced { release, handle }
    }
}

/// A producer task started by [`World::send_paced`].
pub struct Paced {
    release: watch::Sender<usize>,
    handle: JoinHandle<usize>,
}

impl Paced {
    /// Lets the producer go on up to (not including) event `upto`.
    pub fn release(&self, upto: usize) {
        self.release.send_replace(upto);
    }

    /// Releases every event, waits until all are acked and returns how many were resent.
    pub async fn finish(self) -> usize {
        self.release.send_replace(usize::MAX);
        self.handle.await.expect("test producer")
    }
}

/// `rounds` events per build, round-robin over `builds` with statuses cycling, alternately inline
/// (v2, payload rendered now) and legacy (v1, rendered by the consumer from current state).
pub fn mixed_events(builds: &[RenderSnapshot], rounds: usize) -> Vec<(BuildEvent, SchemaVersion)> {
    const STATUSES: [BuildStatus; 3] = [
        BuildStatus::Pending,
        BuildStatus::Running,
        BuildStatus::Success,
    ];
    let mut events = Vec::with_capacity(builds.len() * rounds);
    for round in 0..rounds {
        for b in builds {
            let status = STATUSES[round % STATUSES.len()];
            if events.len() % 2 == 0 {
                events.push((inline_event(b, status), SchemaVersion::V2));
            } else {
                events.push((legacy_event(b, status), SchemaVersion::V1));
            }
        }
    }
    events
}

/// What a receiver saw, per (event, hook) pair: the `Idempotency-Key` is stable per pair across
/// retries and re-deliveries, so arrivals are counted per key.
#[derive(Debug)]
pub struct Tally {
    /// Distinct (event, hook) pairs that arrived.
    pub pairs: usize,
    /// Every request.
    pub arrivals: usize,
    /// Arrivals beyond the first of each pair.
    pub duplicates: usize,
}

impl Tally {
    pub fn of(received: &[Received]) -> Tally {
        let mut per_pair: HashMap<&str, usize> = HashMap::new();
        for r in received {
            *per_pair
                .entry(r.header("idempotency-key").expect("Idempotency-Key"))
                .or_default() += 1;
        }
        Tally {
            pairs: per_pair.len(),
            arrivals: received.len(),
            duplicates: per_pair.values().map(|n| n - 1).sum(),
        }
    }
}

/// A receiver that answers 200 only after `delay`, so that deliveries are reliably in flight
/// when a test acts mid-run ([`crate::Receiver`] answers at once). It tells requests
/// begun from requests answered: a request whose client went away before the answer (an
/// abandoned delivery) is begun but never answered.
#[derive(Clone)]
pub struct SlowReceiver {
    pub url: String,
    state: Arc<Mutex<SlowState>>,
}

#[derive(Default)]
struct SlowState {
    begun: usize,
    answered: Vec<Received>,
}

impl SlowReceiver {
    pub async fn start(delay: Duration) -> SlowReceiver {
        let state = Arc::new(Mutex::new(SlowState::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let shared = state.clone();
        let app = axum::Router::new().fallback(move |headers: HeaderMap, body: Bytes| {
            let state = shared.clone();
            async move {
                state.lock().unwrap().begun += 1;
                tokio::time::sleep(delay).await;
                state.lock().unwrap().answered.push(Received {
                    headers,
                    body,
                    at: Instant::now(),
                    status: StatusCode::OK,
                });
                StatusCode::OK
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        SlowReceiver { url, state }
    }

    /// Requests answered (2xx), in the order answered.
    pub fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().answered.clone()
    }

    /// Requests answered.
    pub fn count(&self) -> usize {
        self.state.lock().unwrap().answered.len()
    }

    /// Requests begun, answered or not.
    pub fn begun(&self) -> usize {
        self.state.lock().unwrap().begun
    }
}
