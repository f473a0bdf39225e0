//! hookline's consumer: delivers a Job Hook for every `BuildEvent` to every subscribed webhook,
//! at least once.
//!
//! # Layout
//!
//! ```text
//! build-events --consume--> decode --> resolve --> hooks --> attempt --deliver (HTTP)--> receiver
//!   (Kafka)      |            | bad bytes   | embedded, or rendered   |   | failed: retry topic (due time)
//!                |            v             | from current state      |   | final/exhausted: dead-letter topic
//!                |        dead letter       v build gone: dead letter |   v
//!                +-- offsets stored only when a record's deliveries are finished (acked hand-offs)
//! build-events.retry --consume--> retry (hold until due, or re-queue) --> attempt --> ...
//! ```
//!
//! - [`consume`]: consumer groups on the main and retry topics; per-partition offset tracking,
//!   ordered concurrency per (build, hook), backpressure, rebalances, drain.
//! - [`decode`]: record bytes to `BuildEvent`, or a reason to dead-letter them.
//! - [`resolve`]: the body: embedded bytes, or a render from current state (batched snapshots).
//! - [`hooks`]: each project's job hooks (cached briefly), hook health and auto-disable.
//! - [`attempt`]: one step of a delivery task and what follows from its outcome.
//! - [`deliver`]: one HTTP attempt: headers, signing ([`sign`]), SSRF guard ([`ssrf`]).
//! - [`schedule`]: the retry delays (pure).
//! - [`retry`]: the retry topic (one topic with due times; why is explained there).
//! - [`handoff`]: writing to the retry and dead-letter topics; which Kafka errors are waited out
//!   and which end in a compact dead letter.
//! - [`dead_letter`]: the dead-letter topic, the operator's side: listing and replaying it.
//! - [`shutdown`]: waits that end, are abandoned at shutdown, or show as a stall.
//! - [`topics`]: the retry and dead-letter topics, created at start.
//! - [`task`]: the delivery task and its Kafka header form.
//! - [`metrics`], [`config`], [`server`] (`/metrics`, `/healthz`, `/readyz`, [`serve`]).

pub mod attempt;
mod commit;
pub mod config;
pub mod consume;
pub mod dead_letter;
pub mod decode;
pub mod deliver;
pub mod handoff;
pub mod hooks;
mod intake;
pub mod metrics;
pub mod resolve;
pub mod retry;
pub mod schedule;
pub mod server;
pub mod shutdown;
pub mod sign;
pub mod ssrf;
pub mod task;
pub mod topics;

use std::sync::Arc;

use hookline_cistate::{CiStore, StoreError};
use hookline_schemas::Codec;
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

pub use config::ConsumerConfig;
pub use metrics::{ConsumerMetrics, Outcome};
pub use resolve::ResolvedPayload;
pub use server::{ServeConfig, serve};

use crate::attempt::{Attempt, Pipeline};
use crate::consume::{KafkaConsumer, Offsets};
use crate::deliver::Deliverer;
use crate::handoff::Handoff;
use crate::hooks::HookRegistry;

/// Why the consumer could not start or run, grouped by what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// An option is wrong: fix the configuration and start again.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Kafka refused a client, a subscription or a request: check the brokers and settings.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The CI state store failed: check the database, then try again.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The HTTP listener for `/metrics` could not be opened.
    #[error("listener: {0}")]
    Listen(#[from] std::io::Error),
    /// The schema registry did not answer at startup (or refused the reader's schema).
    #[error("schema registry: {0}")]
    SchemaRegistry(String),
}

/// A running consumer: the main path and the retry path, sharing one pipeline.
pub struct Consumer {
    pipeline: Arc<Pipeline>,
    main: (Arc<KafkaConsumer>, Arc<Offsets>),
    retry: (Arc<KafkaConsumer>, Arc<Offsets>),
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.pipeline.config)
            .finish_non_exhaustive()
    }
}

impl Consumer {
    /// Validates `config`, builds the HTTP stage and the Kafka clients, and subscribes.
    pub async fn new(
        config: ConsumerConfig,
        store: Arc<dyn CiStore>,
        codec: Codec,
    ) -> Result<Self, ConsumerError> {
        let deliverer = Deliverer::new(config.deliver.clone())
            .map_err(|e| ConsumerError::Config(e.to_string()))?;
        Self::with_deliverer(config, store, codec, Arc::new(deliverer)).await
    }

    /// Like [`Consumer::new`] with another HTTP stage (an instrumented one, in tests).
    pub async fn with_deliverer(
        config: ConsumerConfig,
        store: Arc<dyn CiStore>,
        codec: Codec,
        deliverer: Arc<dyn Attempt>,
    ) -> Result<Self, ConsumerError> {
        config.validate()?;
        let metrics = Arc::new(ConsumerMetrics::new());
        let producer = consume::producer_config(&config).create()?;
        let handoff = Handoff::new(
            producer,
            config.retry_topic.clone(),
            config.dlq_topic.clone(),
            metrics.clone(),
        );
        let main = consume::subscribe(&config, &config.group_id, &config.topic, "main", &metrics)?;
        let retry = consume::subscribe(
            &config,
            &config.retry_group_id(),
            &config.retry_topic,
            "retry",
            &metrics,
        )?;
        let pipeline = Arc::new(Pipeline {
            hooks: HookRegistry::new(store.clone(), config.hook_cache_ttl),
            config,
            store,
            codec,
            deliverer,
            handoff,
            metrics,
        });
        Ok(Self {
            pipeline,
            main,
            retry,
        })
    }

    pub fn metrics(&self) -> Arc<ConsumerMetrics> {
        self.pipeline.metrics.clone()
    }

    /// A client of the consumer's Kafka cluster (its hand-off producer), for readiness probes.
    pub fn kafka_client(&self) -> rdkafka::producer::FutureProducer {
        self.pipeline.handoff.producer().clone()
    }

    /// Runs both paths until `shutdown`, then drains in-flight work within the configured bound
    /// and commits the offsets of finished work.
    ///
    /// First makes sure of the retry and dead-letter topics, waiting for a broker that does not
    /// answer yet (a `topics` stall); missing topics that may not be created end it with an
    /// error.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let config = &self.pipeline.config;
        let ensured = shutdown::wait_out(
            &self.pipeline.metrics,
            metrics::Stall::Topics,
            "retry and dead-letter topics not checked yet",
            &shutdown,
            || async {
                match topics::ensure(config).await {
                    Ok(()) => Ok(Ok(())),
                    Err(topics::EnsureError::Fatal(e)) => Ok(Err(e)),
                    Err(topics::EnsureError::Unavailable(e)) => Err(e),
                }
            },
        )
        .await;
        match ensured {
            Ok(Ok(())) => {}
            Ok(Err(fatal)) => return Err(fatal),
            // Shut down before the consumer ever ran: nothing to drain.
            Err(shutdown::Abandoned) => return Ok(()),
        }
        let abandon = CancellationToken::new();
        let main = tokio::spawn(consume::run_main(
            self.pipeline.clone(),
            self.main.0,
            self.main.1,
            shutdown.clone(),
            abandon.clone(),
        ));
        let retry = tokio::spawn(consume::run_retry(
            self.pipeline.clone(),
            self.retry.0,
            self.retry.1,
            shutdown,
            abandon,
        ));
        let (a, b) = tokio::join!(main, retry);
        for joined in [a, b] {
            if let Err(e) = joined {
                tracing::error!(error = %e, "consumer path panicked");
            }
        }
        Ok(())
    }
}
