//! hookline's consumer: delivers a Job Hook for every `BuildEvent` to every subscribed webhook,
//! at least once.
//!
//! # Layout
//!
//! ```text
//! build-events --intake--> dispatch: decode, resolve, hooks --> step --deliver (HTTP)--> receiver
//!   (Kafka)       |            | bad bytes   | embedded, or rendered   |   | failed: handoff to the retry topic (due time)
//!                 |            v             | from current state      |   | final/exhausted: handoff to the dead-letter topic
//!                 |        dead letter       v build gone: dead letter |   v
//!                 +-- offsets stored only when a record's deliveries are finished (acked hand-offs)
//! build-events.retry --intake--> retry (hold until due, or re-queue) --> step --> ...
//! ```
//!
//! Bottom to top, one noun per file:
//! - [`error`]: [`ConsumerError`]. [`config`]: the options. [`metrics`]: the Prometheus metrics.
//! - [`shutdown`]: waits that end, are abandoned at shutdown, or show as a stall (`wait_out`).
//! - `offsets`: which records of a partition are finished, what a commit says about them (its
//!   offset and, in `commit_metadata`, the unfinished records past it), and when an in-flight
//!   permit comes back (the lane rules, pure and unit-tested).
//! - `kafka`: client settings, the consumer context (rebalances, statistics), subscribing.
//! - `commit`: the commit loop of a path; synchronous commits with a time limit.
//! - [`topics`]: the retry and dead-letter topics, created at start.
//! - [`task`]: the delivery task and its Kafka header form.
//! - [`decode`]: record bytes to `BuildEvent`, or a reason to dead-letter them.
//! - [`resolve`]: the body: embedded bytes, or a render from current state (batched snapshots).
//! - [`hooks`]: each project's job hooks (cached briefly), hook health and auto-disable.
//! - [`deliver`]: one HTTP attempt: headers, signing ([`sign`]), SSRF guard ([`ssrf`]).
//! - [`rate_limit`]: a token bucket per root namespace, shared in PostgreSQL; the excess is
//!   deferred to the retry topic, never dropped.
//! - [`schedule`]: the retry delays (pure).
//! - [`handoff`]: writing to the retry and dead-letter topics; which Kafka errors are waited out
//!   and which end in a compact dead letter; the dead-letter reasons.
//! - [`context`]: what both paths share.
//! - [`step`]: one attempt of a delivery task and its settlement (decided by a pure function).
//! - `intake`: records taken only when there is in-flight room, while serving the group.
//! - [`fair`]: which delivery gets the next slot (per hook and per receiver host, round-robin;
//!   hand-on of a slow hook's excess), the pure rules; `engine`: the slots, workers and hand-ons
//!   both paths submit their deliveries to.
//! - `path`: a path's subscription, committer, claims on its records and last commit.
//! - [`order`]: per-(hook, build) order across retries, the pure rules; `strict`: carrying
//!   them out on both paths (the queue in the store, turns, collapse).
//! - `dispatch`: the main path (ordering per (build, hook)). [`retry`]: the retry path.
//! - `recheck`: what a retry checks again before it is sent (the build's user blocked meanwhile).
//! - [`dead_letter`]: the dead-letter topic, the operator's side: listing and replaying it.
//! - [`hook_admin`]: managing hooks (checks, add, edit, list, remove, enable), the one
//!   implementation behind the `hooks` commands and the hooks API.
//! - [`access`]: the credential model: the operator's admin token, tokens scoped to a project
//!   or namespace, and the one authorization check every route calls.
//! - [`api`]: the hooks API (GitLab's project hooks routes, behind an admin token) and its
//!   OpenAPI document.
//! - [`delivery_log`]: every attempt recorded off the delivery path (batched writer, dropped
//!   rows counted), daily partitions created ahead and dropped past the retention.
//! - [`hook_ops`]: an operator's test of a hook and resend of a logged delivery (the CLI's
//!   `hooks test|resend`, and the hooks API's routes).
//! - [`server`]: `/metrics`, `/healthz`, `/readyz` and [`serve`].

pub mod access;
pub mod api;
mod commit;
mod commit_metadata;
pub mod config;
pub mod context;
pub mod dead_letter;
pub mod decode;
pub mod deliver;
pub mod delivery_log;
mod dispatch;
mod engine;
pub mod error;
pub mod fair;
pub mod handoff;
pub mod hook_admin;
pub mod hook_ops;
pub mod hooks;
mod intake;
mod kafka;
pub mod metrics;
mod offsets;
pub mod order;
mod path;
pub mod rate_limit;
mod recheck;
pub mod resolve;
pub mod retry;
pub mod schedule;
pub mod server;
pub mod shutdown;
pub mod sign;
pub mod ssrf;
pub mod step;
mod strict;
pub mod task;
pub mod topics;

use std::sync::Arc;

use hookline_cistate::CiStore;
use hookline_schemas::Codec;
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

pub use config::ConsumerConfig;
pub use error::ConsumerError;
pub use kafka::HandoffProducer;
pub use metrics::{ConsumerMetrics, Outcome};
pub use resolve::ResolvedPayload;
pub use server::{ServeConfig, serve};

use crate::context::Context;
use crate::deliver::Deliverer;
use crate::delivery_log::{DeliveryLog, DeliveryLogTasks};
use crate::engine::Engine;
use crate::handoff::Handoff;
use crate::hooks::HookRegistry;
use crate::kafka::Subscription;
use crate::path::Path;
use crate::rate_limit::RateLimiter;

/// A running consumer: the main path and the retry path, sharing one context.
pub struct Consumer {
    cx: Arc<Context>,
    main: Subscription,
    retry: Subscription,
    /// The delivery log's writer and keeper, when the log is on.
    log_tasks: Option<DeliveryLogTasks>,
}

impl std::fmt::Debug for Consumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Consumer")
            .field("config", &self.cx.config)
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
        config.validate()?;
        let deliverer = Deliverer::new(config.deliver.clone())
            .map_err(|e| ConsumerError::Config(e.to_string()))?;
        let metrics = Arc::new(ConsumerMetrics::new());
        metrics.preset_dead_letters(handoff::DeadLetterReason::KNOWN.map(|r| r.as_str()));
        let producer = kafka::producer_config(&config).create_with_context(Default::default())?;
        let handoff = Handoff::new(
            producer,
            config.retry_topic.clone(),
            config.dlq_topic.clone(),
            metrics.clone(),
        );
        let main = kafka::subscribe(&config, &config.group_id, &config.topic, "main", &metrics)?;
        let retry = kafka::subscribe(
            &config,
            &config.retry_group_id(),
            &config.retry_topic,
            "retry",
            &metrics,
        )?;
        let (log, log_tasks) = match (config.delivery_log.enabled, store.pg_pool()) {
            (true, Some(pool)) => {
                let (log, tasks) =
                    DeliveryLog::start(pool.clone(), &config.delivery_log, metrics.clone());
                (log, Some(tasks))
            }
            (true, None) => {
                tracing::info!("the delivery log needs a PostgreSQL store; it is off");
                (DeliveryLog::off(metrics.clone()), None)
            }
            (false, _) => (DeliveryLog::off(metrics.clone()), None),
        };
        let cx = Arc::new(Context {
            hooks: HookRegistry::new(store.clone(), config.hook_cache_ttl),
            rate_limits: RateLimiter::new(config.rate_limit, store.clone()),
            config,
            store,
            codec,
            deliverer,
            log,
            handoff,
            metrics,
            held_here: Default::default(),
        });
        Ok(Self {
            cx,
            main,
            retry,
            log_tasks,
        })
    }

    /// The operator's hook operations (test, resend) with this consumer's store, HTTP stage,
    /// hand-off producer and retry topic: what the hooks API's routes call.
    pub fn hook_ops(&self) -> hook_ops::HookOps {
        hook_ops::HookOps::new(
            self.cx.store.clone(),
            self.cx.deliverer.clone(),
            self.cx.handoff.producer().clone(),
            self.cx.config.retry_topic.clone(),
        )
        .with_rate_limit(self.cx.config.rate_limit)
    }

    pub fn metrics(&self) -> Arc<ConsumerMetrics> {
        self.cx.metrics.clone()
    }

    /// A client of the consumer's Kafka cluster (its hand-off producer), for readiness probes.
    pub fn kafka_client(&self) -> HandoffProducer {
        self.cx.handoff.producer().clone()
    }

    /// Runs both paths until `shutdown`, then drains in-flight work within the configured bound
    /// and commits the offsets of finished work.
    ///
    /// First makes sure of the retry and dead-letter topics, waiting for a broker that does not
    /// answer yet (a `topics` stall); missing topics that may not be created end it with an
    /// error. A fatal error of a Kafka client (this instance fenced as a static member, say)
    /// stops both paths, drains, and is returned.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let log_tasks = self.log_tasks.take();
        let result = self.run_paths(shutdown).await;
        // After the paths drained, so the last attempts' rows are written too.
        if let Some(tasks) = log_tasks {
            tasks.stop().await;
        }
        result
    }

    async fn run_paths(self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let config = &self.cx.config;
        let ensured = shutdown::wait_out(
            &self.cx.metrics,
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
        // One stop: shutdown, or a fatal error of either path's client (a static member
        // fenced by the broker never consumes again). The process then exits with the error,
        // for its supervisor to start it again, rather than run on consuming nothing.
        let stop = shutdown.child_token();
        let pruner = tokio::spawn(strict::prune(self.cx.clone(), stop.clone()));
        let sweeper = tokio::spawn(strict::sweep(self.cx.clone(), stop.clone()));
        // One engine for both paths: the window and each hook's slots are shared by new events
        // and retries alike.
        let engine = Engine::new(self.cx.clone());
        let overdue = tokio::spawn(engine.clone().watch_overdue(stop.clone()));
        let main = Path::start("main", engine.clone(), self.main);
        let retry = Path::start("retry", engine.clone(), self.retry);
        let path = |run: tokio::task::JoinHandle<(Path, Option<KafkaError>)>,
                    stop: CancellationToken| async move {
            let ended = run.await;
            if !matches!(ended, Ok((_, None))) {
                stop.cancel();
            }
            ended
        };
        let (a, b) = tokio::join!(
            path(
                tokio::spawn(dispatch::run(main, stop.clone())),
                stop.clone()
            ),
            path(tokio::spawn(retry::run(retry, stop.clone())), stop.clone()),
        );
        stop.cancel();
        // Both intakes are gone: finish the work in flight within the drain bound, then commit.
        engine.drain().await;
        let _ = overdue.await;
        let _ = pruner.await;
        let _ = sweeper.await;
        let mut ended = Vec::new();
        for r in [a, b] {
            match r {
                Ok((path, fatal)) => {
                    path.finish().await;
                    ended.push(Ok(fatal));
                }
                Err(e) => ended.push(Err(e)),
            }
        }
        let mut fatal = None;
        for ended in ended {
            match ended {
                Ok(None) => {}
                Ok(Some(error)) => fatal = fatal.or(Some(error)),
                Err(e) => tracing::error!(error = %e, "consumer path panicked"),
            }
        }
        match fatal {
            Some(error) => Err(ConsumerError::Kafka(error)),
            None => Ok(()),
        }
    }
}
