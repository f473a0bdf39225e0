//! Synchronous offset commits with a time limit.
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

use crate::consume::KafkaConsumer;

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
