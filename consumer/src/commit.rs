//! Offset commits: the commit loop of a path, and synchronous commits with a time limit.
//!
//! librdkafka's synchronous commit has no timeout, and it can wait forever when the group
//! coordinator goes away at the wrong moment (a broker restart; seen here about one run in four).
//! A stuck `spawn_blocking` thread would also keep the runtime from shutting down. So a commit
//! runs on a thread of its own that nothing waits for past the limit: when the limit passes, the
//! caller goes on without it. The next call starts a new commit beside the stuck one (the stuck
//! one may never return), up to [`MAX_WAITING`] unanswered at once.
//!
//! Going on without an answer releases nothing: the commit loop gives permits back only for a
//! confirmed commit, a later one of its own or librdkafka's auto-commit of the stored offsets
//! (confirmed through the consumer's commit callback), so the in-flight bound on re-deliveries
//! holds throughout.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::KafkaError;
use tokio::sync::oneshot;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::kafka::KafkaConsumer;
use crate::metrics::{ConsumerMetrics, Stall};
use crate::offsets::Offsets;

/// Why a commit did not confirm.
#[derive(Debug)]
pub(crate) enum CommitFailed {
    /// The broker answered with an error: try again.
    Kafka(KafkaError),
    /// No answer within the limit (or an earlier commit is still waiting for one).
    Stuck,
}

/// Commit threads that may wait for an answer at once: beyond this many stuck ones, calls fail
/// at once as [`CommitFailed::Stuck`] rather than pile up threads.
pub(crate) const MAX_WAITING: usize = 3;

/// Counts the commit threads still waiting for an answer.
#[derive(Debug, Default)]
pub(crate) struct Committer {
    waiting: Arc<AtomicUsize>,
}

impl Committer {
    /// Commits `offsets` (or, with `None`, everything stored) and waits at most `limit`.
    pub(crate) async fn commit(
        &self,
        consumer: &Arc<KafkaConsumer>,
        offsets: Option<TopicPartitionList>,
        limit: Duration,
    ) -> Result<(), CommitFailed> {
        if self
            .waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_WAITING).then_some(n + 1)
            })
            .is_err()
        {
            return Err(CommitFailed::Stuck);
        }
        let (tx, rx) = oneshot::channel();
        let (consumer, waiting) = (consumer.clone(), self.waiting.clone());
        let spawned = std::thread::Builder::new()
            .name("hookline-commit".into())
            .spawn(move || {
                let result = match &offsets {
                    Some(tpl) => consumer.commit(tpl, CommitMode::Sync),
                    None => consumer.commit_consumer_state(CommitMode::Sync),
                };
                waiting.fetch_sub(1, Ordering::AcqRel);
                let _ = tx.send(result);
            });
        if let Err(error) = spawned {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            tracing::warn!(%error, "cannot start a commit thread");
            return Err(CommitFailed::Stuck);
        }
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(Ok(()))) => Ok(()),
            Ok(Ok(Err(error))) => Err(CommitFailed::Kafka(error)),
            // The thread ended without answering: treat like no answer.
            Ok(Err(_)) | Err(_) => Err(CommitFailed::Stuck),
        }
    }
}

/// How long a synchronous commit may go unanswered before the loop goes on without it.
pub(crate) const COMMIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

/// Commits stored offsets as they move, one synchronous commit at a time (so commits coalesce
/// under load), and releases the permits of records a commit covers: at most `max_in_flight`
/// records of a path are ever beyond the committed offset, which bounds what a crash re-delivers.
///
/// A commit can go unanswered (see `commit`); then no permit comes back until a commit is
/// confirmed, either a later one of this loop (the sweep tries again) or librdkafka's
/// auto-commit of the stored offsets, whose result reaches [`Ctx::commit_callback`] while the
/// intake polls.
pub(crate) async fn commit_loop(
    consumer: Arc<KafkaConsumer>,
    offsets: Arc<Offsets>,
    metrics: Arc<ConsumerMetrics>,
    stop: CancellationToken,
) {
    let committer = Committer::default();
    let mut stuck = false;
    // Set while commits keep failing: shown as a `commit` stall once it lasts.
    let mut stall = None;
    let mut sweep = tokio::time::interval(std::time::Duration::from_millis(500));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = offsets.stored.notified() => {}
            // Also tries again what is still uncommitted: after an unanswered commit nothing
            // else may come to ask.
            _ = sweep.tick() => offsets.store_left_behind(&consumer),
        }
        if !offsets.commit_each_store {
            continue;
        }
        let pending = offsets.pending();
        if pending.count() == 0 {
            continue;
        }
        match committer
            .commit(&consumer, Some(pending.clone()), COMMIT_LIMIT)
            .await
        {
            Ok(()) => {
                stuck = false;
                stall = None;
                offsets.confirmed(&pending)
            }
            Err(CommitFailed::Kafka(error)) => {
                debug!(%error, "offset commit failed; trying again");
                stall
                    .get_or_insert_with(|| metrics.stall(Stall::Commit))
                    .still(&error);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                offsets.stored.notify_one();
            }
            Err(CommitFailed::Stuck) => {
                stall
                    .get_or_insert_with(|| metrics.stall(Stall::Commit))
                    .still(&"commit unanswered");
                if !stuck {
                    warn!(limit = ?COMMIT_LIMIT, "offset commit unanswered; trying again, and an auto-commit of the stored offsets confirmed meanwhile gives permits back too");
                }
                stuck = true;
            }
        }
    }
}
