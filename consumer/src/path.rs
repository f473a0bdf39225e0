//! What both paths (main and retry) share around their dispatch loop: the subscription, the
//! committer, the tracker of spawned work with the in-flight gauge, and the drain at shutdown.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use hookline_shell::supervise::{Supervisor, TaskFailure, panic_message};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::commit::{COMMIT_LIMIT, CommitFailed, Committer, commit_loop};
use crate::context::Context;
use crate::intake::Intake;
use crate::kafka::{KafkaConsumer, Subscription};
use crate::metrics::ConsumerMetrics;
use crate::offsets::{Offsets, Ticket};
use crate::shutdown::Abandoned;

/// One path's consumer with everything around it.
pub(crate) struct Path {
    pub(crate) name: &'static str,
    pub(crate) cx: Arc<Context>,
    consumer: Arc<KafkaConsumer>,
    offsets: Arc<Offsets>,
    /// Fires when the drain bound runs out: work still running stops unfinished.
    abandon: CancellationToken,
    committer_stop: CancellationToken,
    committer: tokio::task::JoinHandle<()>,
    tasks: TaskTracker,
    /// Told when a record's work or the committer panics: the record's offset could never be
    /// stored, so the consumer stops rather than hold the partition with nothing to show.
    supervisor: Supervisor,
}

impl Path {
    /// Starts the path's committer.
    pub(crate) fn start(
        name: &'static str,
        cx: Arc<Context>,
        subscription: Subscription,
        abandon: CancellationToken,
        supervisor: Supervisor,
    ) -> Self {
        let Subscription { consumer, offsets } = subscription;
        let committer_stop = CancellationToken::new();
        let committer = tokio::spawn(commit_loop(
            consumer.clone(),
            offsets.clone(),
            cx.metrics.clone(),
            committer_stop.clone(),
        ));
        Path {
            name,
            cx,
            consumer,
            offsets,
            abandon,
            committer_stop,
            committer,
            tasks: TaskTracker::new(),
            supervisor,
        }
    }

    /// The records of this path's consumer, in batches no larger than the in-flight room.
    pub(crate) fn intake(&self) -> Intake<'_> {
        Intake::new(&self.consumer, &self.offsets, &self.cx, self.name)
    }

    /// Runs `work` for a dispatched record as a task of this path. The record is finished (its
    /// offset may be stored) only when the work completes; abandoned work leaves it unfinished,
    /// to be delivered again.
    pub(crate) fn spawn_record<F, Fut>(
        &self,
        (ticket, permit): (Ticket, OwnedSemaphorePermit),
        work: F,
    ) where
        F: FnOnce(Arc<Context>, CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), Abandoned>> + Send + 'static,
    {
        let work = work(self.cx.clone(), self.abandon.clone());
        let (metrics, consumer, offsets) = (
            self.cx.metrics.clone(),
            self.consumer.clone(),
            self.offsets.clone(),
        );
        let (path, supervisor) = (self.name, self.supervisor.clone());
        self.tasks.spawn(async move {
            let _in_flight = InFlight::new(&metrics);
            match AssertUnwindSafe(work).catch_unwind().await {
                Ok(Ok(())) => offsets.finish(&ticket, permit, &consumer),
                Ok(Err(Abandoned)) => {}
                Err(panic) => supervisor.fail(TaskFailure {
                    task: format!("{path} path delivery"),
                    how: format!("panicked: {}", panic_message(panic.as_ref())),
                }),
            }
        });
    }

    /// Finishes a record that needs no work (nothing to deliver, by design).
    pub(crate) fn finish_record(&self, (ticket, permit): (Ticket, OwnedSemaphorePermit)) {
        self.offsets.finish(&ticket, permit, &self.consumer);
    }

    /// Waits for in-flight work within the drain bound, abandons the rest, commits what was
    /// stored, and stops the committer. The intake must be gone by now, so that no record is
    /// fetched after the final commit.
    pub(crate) async fn finish(self) {
        let (path, tasks) = (self.name, &self.tasks);
        tasks.close();
        if tokio::time::timeout(self.cx.config.drain_timeout, tasks.wait())
            .await
            .is_err()
        {
            warn!(
                path,
                left = tasks.len(),
                "drain bound reached; abandoning in-flight work"
            );
            self.abandon.cancel();
            tasks.wait().await;
        }
        match Committer::default()
            .commit(&self.consumer, None, COMMIT_LIMIT)
            .await
        {
            Ok(()) => info!(path, "offsets committed"),
            Err(CommitFailed::Kafka(error)) => {
                debug!(path, %error, "final commit (nothing stored is fine)")
            }
            Err(CommitFailed::Stuck) => warn!(path, "final commit unanswered; exiting without it"),
        }
        self.committer_stop.cancel();
        if let Err(joined) = self.committer.await
            && joined.is_panic()
        {
            self.supervisor.fail(TaskFailure {
                task: format!("{path} path committer"),
                how: format!("panicked: {}", panic_message(joined.into_panic().as_ref())),
            });
        }
    }
}

/// Counts a record in the in-flight gauge while alive.
struct InFlight(Arc<ConsumerMetrics>);

impl InFlight {
    fn new(metrics: &Arc<ConsumerMetrics>) -> Self {
        metrics.in_flight_gauge().inc();
        InFlight(metrics.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight_gauge().dec();
    }
}
