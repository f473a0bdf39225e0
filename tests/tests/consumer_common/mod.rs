//! Helpers shared by the consumer's integration tests: a world (store + topics + hooks), events
//! produced with the real codec, and a consumer running against the real broker.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

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
use hookline_tests::{create_topic, kafka_brokers, pg_store, unique_name};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub const WHSEC: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A test's own topics, store and producer.
pub struct World {
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
        let producer = ClientConfig::new()
            .set("bootstrap.servers", kafka_brokers())
            .set("linger.ms", "1")
            .create()
            .expect("producer");
        World {
            topic,
            store: Arc::new(pg_store().await),
            producer,
        }
    }

    /// The consumer options of this world: shrunk retries, loopback allowed.
    pub fn config(&self) -> ConsumerConfig {
        let mut c =
            ConsumerConfig::new(kafka_brokers(), unique_name("group")).with_topic(&self.topic);
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
            ssrf_guard: true,
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
