//! Offset commits: the commit loop of a path, and synchronous commits with a time limit.
//!
//! Only the consumer commits (`enable.auto.commit=false`): each commit names, per partition, the
//! first unfinished offset and, in its metadata, the records past it that are not finished yet
//! (see `offsets`). At most one commit of a path is on its way at a time.
//!
//! librdkafka's synchronous commit has no timeout, and it can wait forever when the group
//! coordinator goes away at the wrong moment (a broker restart; seen here about one run in four).
//! A stuck `spawn_blocking` thread would also keep the runtime from shutting down. So a commit
//! runs on a thread of its own that nothing waits for past the limit: when the limit passes, the
//! caller goes on without it. The next call starts a new commit beside the stuck one (the stuck
//! one may never return), up to [`MAX_WAITING`] unanswered at once.
//!
//! Going on without an answer releases nothing: permits come back only for a confirmed commit, a
//! later one of the loop's or the late answer to the one it gave up on (through the consumer's
//! commit callback), so the in-flight bound on re-deliveries holds throughout.

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
    /// Commits `offsets` (with their metadata) and waits at most `limit`.
    pub(crate) async fn commit(
        &self,
        consumer: &Arc<KafkaConsumer>,
        offsets: TopicPartitionList,
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
                let result = consumer.commit(&offsets, CommitMode::Sync);
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

/// How often the loop looks for something to commit when no record finished meanwhile (a
/// commit that failed is tried again).
const SWEEP: Duration = Duration::from_millis(500);

/// Commits what the path's records say (offsets with metadata, see `offsets`), one commit at a
/// time: records that finish while a commit is on its way go in the next one, so commits
/// coalesce under load. With `interval` zero a commit follows every finish; otherwise one is made
/// per interval.
///
/// A commit can go unanswered (see `Committer::commit`); the snapshots it carried are taken again
/// by the next one, and a late answer through the client's callback gives permits back too.
pub(crate) async fn commit_loop(
    consumer: Arc<KafkaConsumer>,
    offsets: Arc<Offsets>,
    metrics: Arc<ConsumerMetrics>,
    interval: Duration,
    stop: CancellationToken,
) {
    let committer = Committer::default();
    let mut stuck = false;
    // Set while commits keep failing: shown as a `commit` stall once it lasts.
    let mut stall = None;
    let mut tick = tokio::time::interval(if interval.is_zero() { SWEEP } else { interval });
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = offsets.finished.notified(), if interval.is_zero() => {}
            _ = tick.tick() => {}
        }
        let mut commit = offsets.snapshots();
        if commit.is_empty() {
            continue;
        }
        match committer
            .commit(&consumer, commit.take_request(), COMMIT_LIMIT)
            .await
        {
            Ok(()) => {
                stuck = false;
                stall = None;
                offsets.confirmed(&commit);
            }
            Err(CommitFailed::Kafka(error)) => {
                offsets.not_committed(&commit);
                debug!(%error, "offset commit failed; trying again");
                stall
                    .get_or_insert_with(|| metrics.stall(Stall::Commit))
                    .still(&error);
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                offsets.finished.notify_one();
            }
            Err(CommitFailed::Stuck) => {
                offsets.not_committed(&commit);
                stall
                    .get_or_insert_with(|| metrics.stall(Stall::Commit))
                    .still(&"commit unanswered");
                if !stuck {
                    warn!(limit = ?COMMIT_LIMIT, "offset commit unanswered; trying again");
                }
                stuck = true;
            }
        }
    }
}

/// The last commit of a path at shutdown, after its work drained.
pub(crate) async fn commit_last(
    consumer: &Arc<KafkaConsumer>,
    offsets: &Offsets,
) -> Result<(), CommitFailed> {
    let mut commit = offsets.snapshots();
    if commit.is_empty() {
        return Ok(());
    }
    Committer::default()
        .commit(consumer, commit.take_request(), COMMIT_LIMIT)
        .await?;
    offsets.confirmed(&commit);
    Ok(())
}
