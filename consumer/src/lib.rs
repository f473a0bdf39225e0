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

use std::convert::Infallible;
use std::sync::Arc;

use hookline_cistate::CiStore;
use hookline_schemas::Codec;
use hookline_shell::supervise::Supervisor;
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
    /// Every task the consumer runs: the first that dies stops the others and is the run's
    /// error (the process exits non-zero), and `/readyz` says so meanwhile.
    supervisor: Supervisor,
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
        let supervisor = Supervisor::new(CancellationToken::new());
        let (log, log_tasks) = match (config.delivery_log.enabled, store.pg_pool()) {
            (true, Some(pool)) => {
                let (log, tasks) = DeliveryLog::start(
                    pool.clone(),
                    &config.delivery_log,
                    metrics.clone(),
                    &supervisor,
                );
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
            supervisor,
        })
    }

    /// The consumer's tasks: for `/readyz` ([`Supervisor::check`]), and for tasks of its
    /// process that it should stop with (the HTTP listener: stop on [`Supervisor::stop`]).
    pub fn supervisor(&self) -> Supervisor {
        self.supervisor.clone()
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
    /// error. Any task of the consumer that dies (a path, including a fatal error of its Kafka
    /// client such as a static member fenced by the broker; a delivery; the delivery log's
    /// writer or keeper; the order queue's pruner or sweeper) stops both paths, which drain,
    /// and is returned as [`ConsumerError::TaskFailed`]: the process then exits non-zero, for
    /// its supervisor to start it again, rather than run on with a part missing.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), ConsumerError> {
        let stop = self.supervisor.stop().clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = shutdown.cancelled() => stop.cancel(),
                _ = stop.cancelled() => {}
            }
        });
        let supervisor = self.supervisor.clone();
        let log_tasks = self.log_tasks.take();
        let result = self.run_paths().await;
        // After the paths drained, so the last attempts' rows are written too.
        if let Some(tasks) = log_tasks {
            tasks.stop().await;
        }
        supervisor.stop().cancel();
        let supervised = supervisor.wait().await;
        match (result, supervised) {
            (Err(error), _) => Err(error),
            (Ok(()), Err(failure)) => Err(ConsumerError::TaskFailed(failure)),
            (Ok(()), Ok(())) => Ok(()),
        }
    }

    async fn run_paths(self) -> Result<(), ConsumerError> {
        let config = &self.cx.config;
        let stop = self.supervisor.stop().clone();
        let ensured = shutdown::wait_out(
            &self.cx.metrics,
            metrics::Stall::Topics,
            "retry and dead-letter topics not checked yet",
            &stop,
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
        let supervisor = &self.supervisor;
        // Under relaxed ordering there is no order queue to keep.
        if config.ordering == config::Ordering::Strict {
            let (cx, until) = (self.cx.clone(), stop.clone());
            supervisor.spawn_service("order-queue pruner", async move {
                strict::prune(cx, until).await;
                Ok::<(), Infallible>(())
            });
            let (cx, until) = (self.cx.clone(), stop.clone());
            supervisor.spawn_service("order-queue sweeper", async move {
                strict::sweep(cx, until).await;
                Ok::<(), Infallible>(())
            });
        }
        // One engine for both paths: the window and each hook's slots are shared by new events
        // and retries alike. A delivery that panics fails the service: its record could never
        // finish.
        let engine = Engine::new(self.cx.clone(), supervisor.clone());
        let (watcher, until) = (engine.clone(), stop.clone());
        supervisor.spawn_service("hand-on watcher", async move {
            watcher.watch_overdue(until).await;
            Ok::<(), Infallible>(())
        });
        let main = Path::start("main", engine.clone(), self.main);
        let retry = Path::start("retry", engine.clone(), self.retry);
        let (main, main_back) =
            supervise_path(supervisor, "main path", dispatch::run(main, stop.clone()));
        let (retry, retry_back) =
            supervise_path(supervisor, "retry path", retry::run(retry, stop.clone()));
        let _ = tokio::join!(main, retry);
        // Both intakes are gone: finish the work in flight within the drain bound, then commit.
        stop.cancel();
        engine.drain().await;
        for back in [main_back, retry_back] {
            // A path that panicked is not handed back: the process exits with that failure.
            if let Ok(path) = back.await {
                path.finish().await;
            }
        }
        Ok(())
    }
}

/// Runs a path's loop as a task of `supervisor`. The path is handed back when its intake ends,
/// for the last commit once the engine has drained; a fatal error of its Kafka client (a static
/// member fenced by the broker never consumes again) fails the task like a panic does.
fn supervise_path<F>(
    supervisor: &Supervisor,
    name: &str,
    run: F,
) -> (
    tokio::task::JoinHandle<()>,
    tokio::sync::oneshot::Receiver<Path>,
)
where
    F: std::future::Future<Output = (Path, Option<KafkaError>)> + Send + 'static,
{
    let (back, handed_back) = tokio::sync::oneshot::channel();
    let task = supervisor.spawn_service(name, async move {
        let (path, fatal) = run.await;
        let _ = back.send(path);
        fatal.map_or(Ok(()), |e| Err(ConsumerError::Kafka(e)))
    });
    (task, handed_back)
}
