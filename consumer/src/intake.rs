//! Taking records off a consumer only when there is room for them, without starving the group
//! protocol.
//!
//! Dispatch needs an in-flight permit per record, and a permit comes back only when an offset
//! commit covers its record (see `offsets`). After a broker restart the group coordinator may
//! have forgotten the member: every commit then fails with `UnknownMemberId` until the consumer
//! rejoins, and rejoining needs the application to serve the rebalance, which rust-rdkafka does
//! only inside a poll of the stream. A dispatcher that just waited for a permit would wait for
//! ever: seen here as a minute of `UnknownMemberId` on every commit and no rejoin, with every
//! permit parked.
//!
//! So the intake waits for room briefly, then pauses its partitions and keeps polling. A paused
//! partition yields no records (librdkafka drops what it fetched ahead and, on resume, fetches
//! again from the application's position), but rebalances are still served. The brief wait
//! first keeps a short stall behind a slow receiver from throwing away the prefetched records,
//! and a paused intake resumes only when there is room for a worthwhile batch, so a path that
//! stays saturated (slow receivers, held retries) does not pause and re-fetch for every record.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::{FutureExt, StreamExt};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, MessageStream};
use rdkafka::message::{BorrowedMessage, OwnedMessage};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::context::Context;
use crate::kafka::{Ctx, KafkaConsumer};
use crate::metrics::{ConsumerMetrics, Stall};
use crate::offsets::{Arrival, Offsets, Ticket};

/// How long dispatch waits for room before pausing fetching to serve the group protocol: short
/// next to the session and rebalance timeouts, long enough that a brief stall does not throw
/// away the prefetched records.
const PAUSE_AFTER: Duration = Duration::from_secs(1);

/// A record taken off the consumer: its claim on the partition's offset (taken when the record
/// arrived, so that a rebalance served after it makes the claim void rather than letting it store
/// the new assignment's offsets), and its claim on the in-flight bound.
pub(crate) type Taken = (OwnedMessage, Ticket, OwnedSemaphorePermit);

/// The records of one path's consumer, handed out in batches no larger than the room left.
pub(crate) struct Intake<'a> {
    consumer: &'a KafkaConsumer,
    offsets: &'a Offsets,
    metrics: &'a ConsumerMetrics,
    stream: MessageStream<'a, Ctx>,
    permits: Arc<Semaphore>,
    /// Free permits needed before a paused intake resumes: resuming re-fetches what the pause
    /// dropped, so it waits for room for a worthwhile batch.
    resume_at: u32,
    /// Records that arrived while paused (a race with the pause): they lead the next batch.
    held: VecDeque<(OwnedMessage, Ticket)>,
    /// Beyond this many held records the intake stops polling (pausing is failing).
    held_cap: usize,
    path: &'static str,
    /// A fatal error of the client (e.g. this static member was fenced): the client will never
    /// consume again, so the intake ends and the consumer stops with it (see `Consumer::run`).
    fatal: Option<rdkafka::error::KafkaError>,
}

impl<'a> Intake<'a> {
    pub(crate) fn new(
        consumer: &'a KafkaConsumer,
        offsets: &'a Offsets,
        p: &'a Context,
        path: &'static str,
    ) -> Self {
        let room = p.config.max_in_flight;
        let resume_at = p.config.poll_batch.min(room / 4).max(1);
        Intake {
            consumer,
            offsets,
            metrics: &p.metrics,
            stream: consumer.stream(),
            permits: Arc::new(Semaphore::new(room)),
            resume_at: u32::try_from(resume_at).unwrap_or(u32::MAX),
            held: VecDeque::new(),
            held_cap: room,
            path,
            fatal: None,
        }
    }

    /// The fatal error that ended the intake, if one did.
    pub(crate) fn fatal(&mut self) -> Option<rdkafka::error::KafkaError> {
        self.fatal.take()
    }

    /// The next batch: at least one record, then whatever the client already holds, up to `max`
    /// and the room left. `None` on shutdown, or after a fatal error of the client.
    pub(crate) async fn next_batch(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Option<Vec<Taken>> {
        loop {
            if self.fatal.is_some() {
                return None;
            }
            self.wait_for_room(shutdown).await?;
            let mut batch = self.collect(max, shutdown).await?;
            // A rebalance served while the batch was held or collected voids the claims taken
            // before it: the partition's owner now (this instance again, or another) fetches
            // those records again from the committed offset, so delivering them here would only
            // duplicate them.
            batch.retain(|(msg, ticket)| {
                let current = self.offsets.is_current(ticket);
                if !current {
                    debug!(
                        path = self.path,
                        partition = msg.partition(),
                        offset = msg.offset(),
                        "record of a revoked assignment dropped; its new owner fetches it again"
                    );
                }
                current
            });
            if batch.is_empty() {
                continue;
            }
            let n = u32::try_from(batch.len()).unwrap_or(u32::MAX);
            // Never waits (the room is there); fails only if the semaphore were closed, which
            // nothing does.
            let mut permits = self.permits.clone().acquire_many_owned(n).await.ok()?;
            return Some(
                batch
                    .into_iter()
                    .filter_map(|(msg, ticket)| {
                        permits.split(1).map(|permit| (msg, ticket, permit))
                    })
                    .collect(),
            );
        }
    }

    /// At least one record (held ones first), then whatever the client already holds, up to
    /// `max` and the room left.
    async fn collect(
        &mut self,
        max: usize,
        shutdown: &CancellationToken,
    ) -> Option<Vec<(OwnedMessage, Ticket)>> {
        let first = match self.held.pop_front() {
            Some(taken) => taken,
            None => loop {
                let next = tokio::select! {
                    biased;
                    _ = shutdown.cancelled() => return None,
                    next = self.stream.next() => next,
                };
                if let Some(taken) = self.accept(next) {
                    break taken;
                }
                if self.fatal.is_some() {
                    return None;
                }
            },
        };
        // Only this intake takes permits, so the room can only have grown since the wait.
        let room = self.permits.available_permits().clamp(1, max.max(1));
        let mut batch = vec![first];
        while batch.len() < room {
            if let Some(taken) = self.held.pop_front() {
                batch.push(taken);
                continue;
            }
            match self.stream.next().now_or_never() {
                Some(next) => {
                    if let Some(taken) = self.accept(next) {
                        batch.push(taken);
                    }
                }
                None => break,
            }
        }
        Some(batch)
    }

    /// A record from the stream with its offset claim, or nothing after logging a consumer
    /// error.
    fn accept(
        &mut self,
        next: Option<rdkafka::error::KafkaResult<BorrowedMessage<'_>>>,
    ) -> Option<(OwnedMessage, Ticket)> {
        match next {
            Some(Ok(msg)) => match self.offsets.begin(&msg) {
                (ticket, Arrival::Dispatch) => Some((msg.detach(), ticket)),
                (_, Arrival::Finished) => {
                    self.metrics.record_skipped(self.path, "finished");
                    None
                }
                (_, Arrival::InFlight) => {
                    self.metrics.record_skipped(self.path, "in_flight");
                    None
                }
            },
            Some(Err(error @ rdkafka::error::KafkaError::MessageConsumptionFatal(_))) => {
                tracing::error!(path = self.path, %error, "fatal kafka consumer error: this consumer stops");
                self.fatal = Some(error);
                None
            }
            // A broker going away reaches the stream too, as a copy of the client's error event
            // that the context has already logged (at WARN, once per broker per interval): the
            // client recovers by itself.
            Some(Err(error)) if hookline_shell::kafka_log::is_transient(&error) => {
                debug!(path = self.path, %error, "kafka consumer error (transient)");
                None
            }
            Some(Err(error)) => {
                warn!(path = self.path, %error, "kafka consumer error");
                None
            }
            None => None,
        }
    }

    /// Returns once a permit is free: at once, or after pausing the partitions and serving the
    /// group protocol meanwhile. `None` on shutdown.
    async fn wait_for_room(&mut self, shutdown: &CancellationToken) -> Option<()> {
        if self.permits.available_permits() > 0 {
            return Some(());
        }
        let permits = self.permits.clone();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => return None,
            _ = permits.acquire() => return Some(()),
            _ = tokio::time::sleep(PAUSE_AFTER) => {}
        }
        debug!(path = self.path, "no room for more records; pausing fetch");
        self.metrics.fetch_paused(self.path);
        self.set_paused(true);
        let resume_at = self.resume_at;
        let mut polling = true;
        // Every permit is held by records not yet finished or not yet committed: a wait that
        // lasts means a receiver hangs on a long chain of one build's events, or commits fail.
        let metrics = self.metrics;
        let mut stall = metrics.stall(Stall::InFlightFull);
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        let outcome = loop {
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break None,
                _ = permits.acquire_many(resume_at) => break Some(()),
                _ = tick.tick() => stall.still(&"every in-flight slot is held by an unfinished or uncommitted record"),
                // Serves rebalances; a paused partition yields no record, but one already on its
                // way, or from a partition assigned just now, is kept for the next batch.
                next = self.stream.next(), if polling => {
                    let taken = self.accept(next);
                    if self.fatal.is_some() {
                        break None;
                    }
                    if let Some(taken) = taken {
                        self.held.push_back(taken);
                        self.fetch_assignment(false);
                        if self.held.len() >= self.held_cap {
                            warn!(path = self.path, held = self.held.len(), "records keep arriving while fetching is paused; waiting for room without polling");
                            polling = false;
                        }
                    }
                }
            }
        };
        if outcome.is_some() {
            self.set_paused(false);
            debug!(path = self.path, "room again; fetch resumed");
        }
        outcome
    }

    fn set_paused(&self, paused: bool) {
        // Set first: a rebalance served from now on pauses (or resumes) what it assigns.
        self.offsets.paused.store(paused, Ordering::Relaxed);
        self.fetch_assignment(!paused);
    }

    /// Pauses or resumes fetching for every partition assigned now.
    fn fetch_assignment(&self, fetch: bool) {
        let result = self.consumer.assignment().and_then(|tpl| {
            if fetch {
                self.consumer.resume(&tpl)
            } else {
                self.consumer.pause(&tpl)
            }
        });
        if let Err(error) = result {
            warn!(path = self.path, fetch, %error, "cannot pause or resume fetching");
        }
    }
}
