//! What both paths (main and retry) share around their dispatch loop: the subscription, the
//! committer, the engine their deliveries go to, and the last commit at shutdown.

use std::future::Future;
use std::sync::Arc;

use hookline_shell::supervise::{TaskFailure, panic_message};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::commit::{CommitFailed, commit_last, commit_loop};
use crate::context::Context;
use crate::engine::{Claim, Engine};
use crate::intake::Intake;
use crate::kafka::{KafkaConsumer, Subscription};
use crate::offsets::{Offsets, Ticket};
use crate::shutdown::Abandoned;

/// One path's consumer with everything around it.
pub(crate) struct Path {
    pub(crate) name: &'static str,
    pub(crate) cx: Arc<Context>,
    pub(crate) engine: Arc<Engine>,
    consumer: Arc<KafkaConsumer>,
    offsets: Arc<Offsets>,
    committer_stop: CancellationToken,
    committer: tokio::task::JoinHandle<()>,
}

impl Path {
    /// Starts the path's committer.
    pub(crate) fn start(
        name: &'static str,
        engine: Arc<Engine>,
        subscription: Subscription,
    ) -> Self {
        let Subscription { consumer, offsets } = subscription;
        let cx = engine.cx().clone();
        let committer_stop = CancellationToken::new();
        let committer = tokio::spawn(commit_loop(
            consumer.clone(),
            offsets.clone(),
            cx.metrics.clone(),
            cx.config.commit_interval,
            committer_stop.clone(),
        ));
        Path {
            name,
            cx,
            engine,
            consumer,
            offsets,
            committer_stop,
            committer,
        }
    }

    /// The records of this path's consumer, in batches no larger than the in-flight room.
    pub(crate) fn intake(&self) -> Intake<'_> {
        Intake::new(&self.consumer, &self.offsets, &self.cx, self.name)
    }

    /// The claim of a record whose work comes in `parts` (one per delivery): the record is
    /// finished when every part ended.
    pub(crate) fn claim(&self, taken: (Ticket, OwnedSemaphorePermit), parts: usize) -> Arc<Claim> {
        Claim::new(self.offsets.clone(), taken, parts)
    }

    /// Runs `work` for a record as one task of the engine (no delivery slot: a dead letter, a
    /// retry record waiting to be due). The record is finished when the work completes;
    /// abandoned work leaves it unfinished, to be done again.
    pub(crate) fn spawn_record<F, Fut>(&self, claim: Arc<Claim>, work: F)
    where
        F: FnOnce(Arc<Context>, CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), Abandoned>> + Send + 'static,
    {
        self.engine.spawn(move |cx, abandon| async move {
            let result = work(cx, abandon).await;
            claim.part_done(result);
        });
    }

    /// Finishes a record that needs no work (nothing to deliver, by design).
    pub(crate) fn finish_record(&self, (ticket, permit): (Ticket, OwnedSemaphorePermit)) {
        self.offsets.finish(&ticket, permit);
    }

    /// Commits what is finished and stops the committer. The intake must be gone and the
    /// engine drained by now, so that nothing finishes or is fetched after the last commit.
    pub(crate) async fn finish(self) {
        let path = self.name;
        self.committer_stop.cancel();
        if let Err(joined) = self.committer.await
            && joined.is_panic()
        {
            self.engine.supervisor().fail(TaskFailure {
                task: format!("{path} path committer"),
                how: format!("panicked: {}", panic_message(joined.into_panic().as_ref())),
            });
        }
        match commit_last(&self.consumer, &self.offsets).await {
            Ok(()) => info!(path, "offsets committed"),
            Err(CommitFailed::Kafka(error)) => {
                debug!(path, %error, "final commit failed (nothing to commit is fine)")
            }
            Err(CommitFailed::Stuck) => warn!(path, "final commit unanswered; exiting without it"),
        }
    }
}
