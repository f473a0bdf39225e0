//! The Kafka side: consumer groups on the main and the retry topic, per-partition offset
//! tracking, ordered concurrency on the main path, backpressure, rebalances and the drain.
//!
//! # Where offsets are stored, and why
//!
//! `enable.auto.commit=true` with `enable.auto.offset.store=false`: librdkafka commits in the
//! background whatever we *store*, and we store offset `o + 1` of a partition only when record
//! `o` and every earlier record of that partition are finished: delivered, dead-lettered (acked)
//! or handed to the retry topic (acked). A crash therefore re-delivers at most the unfinished
//! records, which the in-flight bound limits.
//!
//! # Ordering
//!
//! Records of a batch are dispatched in partition order. Deliveries of one build to one hook are
//! chained: each waits for the previous event of the same (build, hook) to finish its main-path
//! step, so a receiver sees one build's transitions in order (key = build id keeps them in one
//! partition). Different builds, different hooks and different partitions run concurrently; a
//! hanging receiver delays only its own hook's next events of the same build. Retries leave the
//! order (they run on the retry topic while the build's later events go on).
//!
//! # The in-flight bound
//!
//! A permit is taken per record at dispatch and given back only when the stored offset has
//! passed the record, not when the record finishes: records finished behind a slow one keep
//! their permits. So at most `max_in_flight` records of a path are ever past the stored offset,
//! which is what bounds re-deliveries after a crash. The price: a receiver that hangs until the
//! delivery timeout can stall dispatch once `max_in_flight` records pile up behind it (for at
//! most the timeout, after which its delivery goes to the retry topic). While dispatch waits for
//! room the consumer still serves its group (see `intake`), so such a stall never holds a
//! rebalance. (Waiting out an unreachable schema registry or CI store does, as it polls nothing
//! meanwhile; past `max.poll.interval.ms` the group moves on without this member.)
//!
//! # Rebalances
//!
//! A revoked partition's tracker is dropped before librdkafka commits on revoke; work already
//! running for it finishes (or is abandoned at shutdown) but never stores an offset, because the
//! tracker it belongs to is gone. A reassigned partition gets a fresh tracker (a new epoch).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hookline_cistate::{Hook, RenderSnapshot};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::statistics::Statistics;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::attempt::Pipeline;
use crate::commit::{CommitFailed, Committer};
use crate::config::ConsumerConfig;
use crate::decode::{self, Decoded};
use crate::handoff::DeadLetterReason;
use crate::intake::{Intake, Taken};
use crate::metrics::{ConsumerMetrics, Stall};
use crate::resolve::{self, ResolvedPayload};
use crate::shutdown::{Abandoned, wait_out};
use crate::task::{DeliveryTask, H_ONLY_HOOK, Source, header};
use crate::{ConsumerError, retry};

/// Settings every client gets: the brokers, then the pass-through settings (which may override).
pub(crate) fn base_config(config: &ConsumerConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers);
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    c
}

/// A consumer of `group` with at-least-once offset handling.
pub(crate) fn client_config(config: &ConsumerConfig, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &config.brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        // Topics are created at start (see `topics`), never as a side effect of subscribing.
        .set("allow.auto.create.topics", "false")
        .set("statistics.interval.ms", "1000")
        .set(
            "session.timeout.ms",
            config.session_timeout.as_millis().to_string(),
        );
    if let Some(id) = &config.instance_id {
        // Static membership: a restarted instance with the same identity takes its partitions
        // back at once, without a rebalance and without waiting for its dead self to expire.
        // The id is unique within a group; the main and retry groups are different groups.
        c.set("group.instance.id", id);
    }
    if !config.commit_interval.is_zero() {
        c.set(
            "auto.commit.interval.ms",
            config.commit_interval.as_millis().to_string(),
        );
    }
    for (k, v) in &config.kafka {
        c.set(k, v);
    }
    // Set after the pass-through on purpose: at-least-once rests on storing offsets only for
    // finished records, and permits come back through auto-commit when a commit goes unanswered.
    c.set("enable.auto.commit", "true")
        .set("enable.auto.offset.store", "false");
    c
}

/// The idempotent producer for retry and dead-letter hand-offs.
pub(crate) fn producer_config(config: &ConsumerConfig) -> ClientConfig {
    let mut c = base_config(config);
    // Set after the pass-through on purpose: a hand-off must be acked by all in-sync replicas.
    c.set("enable.idempotence", "true");
    c
}

/// The in-flight records of one owned partition.
#[derive(Debug)]
struct Lane {
    epoch: u64,
    in_flight: BTreeSet<i64>,
    /// Permits of finished records still behind an unfinished one: they are released only when
    /// the stored offset passes them, so the in-flight bound also bounds what a crash re-delivers.
    parked: BTreeMap<i64, OwnedSemaphorePermit>,
    /// One past the highest offset dispatched.
    next: Option<i64>,
    stored: i64,
    committed: i64,
}

/// Per-partition offset tracking, shared by the dispatcher, the tasks and the rebalance callback.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    lanes: Mutex<HashMap<(String, i32), Lane>>,
    epochs: AtomicU64,
    /// Commit after every store (through [`commit_loop`]) rather than on librdkafka's interval,
    /// and keep permits until the commit is acked.
    commit_each_store: bool,
    /// Wakes the committer after a store.
    stored: tokio::sync::Notify,
    /// Fetching is paused by the intake: partitions assigned meanwhile are paused too.
    pub(crate) paused: std::sync::atomic::AtomicBool,
}

/// A dispatched record's claim on its partition's offset.
#[derive(Debug, Clone)]
pub(crate) struct Ticket {
    topic: String,
    partition: i32,
    offset: i64,
    /// 0 when the partition was not owned at dispatch: such a ticket never stores.
    epoch: u64,
}

impl Offsets {
    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Lane>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn assign(&self, tpl: &TopicPartitionList) {
        debug!(partitions = tpl.count(), "partitions assigned");
        let mut lanes = self.lanes();
        for e in tpl.elements() {
            let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
            lanes.insert(
                (e.topic().to_owned(), e.partition()),
                Lane {
                    epoch,
                    in_flight: BTreeSet::new(),
                    parked: BTreeMap::new(),
                    next: None,
                    stored: -1,
                    committed: -1,
                },
            );
        }
    }

    fn revoke(&self, tpl: &TopicPartitionList) {
        let mut lanes = self.lanes();
        for e in tpl.elements() {
            if let Some(lane) = lanes.remove(&(e.topic().to_owned(), e.partition()))
                && !lane.in_flight.is_empty()
            {
                info!(
                    topic = e.topic(),
                    partition = e.partition(),
                    in_flight = lane.in_flight.len(),
                    "partition revoked with work in flight; its offsets will not be stored"
                );
            }
        }
    }

    /// Claims `msg`'s offset in its partition's current assignment (epoch): taken as the record
    /// arrives, so that a rebalance served after it voids the claim.
    pub(crate) fn begin(&self, msg: &OwnedMessage) -> Ticket {
        let mut lanes = self.lanes();
        let key = (msg.topic().to_owned(), msg.partition());
        let epoch = match lanes.get_mut(&key) {
            Some(lane) => {
                lane.in_flight.insert(msg.offset());
                lane.next = Some(lane.next.unwrap_or(0).max(msg.offset() + 1));
                lane.epoch
            }
            None => {
                debug!(
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    "record of a partition not owned; its offset will not be stored"
                );
                0
            }
        };
        Ticket {
            topic: key.0,
            partition: key.1,
            offset: msg.offset(),
            epoch,
        }
    }

    /// Whether the ticket's claim still holds: its partition is owned in the same assignment.
    pub(crate) fn is_current(&self, ticket: &Ticket) -> bool {
        ticket.epoch != 0
            && self
                .lanes()
                .get(&(ticket.topic.clone(), ticket.partition))
                .is_some_and(|lane| lane.epoch == ticket.epoch)
    }

    /// Marks the ticket's record finished and stores the partition's offset if it moved. The
    /// record's permit is released once the stored offset has passed it.
    fn finish<C: ConsumerContext>(
        &self,
        ticket: &Ticket,
        permit: OwnedSemaphorePermit,
        consumer: &StreamConsumer<C>,
    ) {
        let mut lanes = self.lanes();
        let Some(lane) = lanes.get_mut(&(ticket.topic.clone(), ticket.partition)) else {
            return;
        };
        if lane.epoch != ticket.epoch {
            return;
        }
        lane.in_flight.remove(&ticket.offset);
        if ticket.offset < lane.committed {
            // A record fetched again below the committed offset (the fetch position can move
            // back after a broker restart without a rebalance): no commit will ever pass it
            // again, and it does not count towards what a crash re-delivers.
            drop(permit);
        } else {
            lane.parked.insert(ticket.offset, permit);
        }
        let Some(next) = lane.next else { return };
        let committable = lane.in_flight.first().copied().unwrap_or(next);
        if !self.commit_each_store {
            // Committed on librdkafka's interval: permits go back once stored.
            lane.parked = lane.parked.split_off(&committable);
        }
        self.store(lane, &ticket.topic, ticket.partition, committable, consumer);
    }

    /// Stores `committable` for the lane's partition if it is past what is stored, and wakes the
    /// committer. Called under the lanes lock, so stores of one partition happen in increasing
    /// order. A refused store is left for [`Offsets::store_left_behind`].
    fn store<C: ConsumerContext>(
        &self,
        lane: &mut Lane,
        topic: &str,
        partition: i32,
        committable: i64,
        consumer: &StreamConsumer<C>,
    ) {
        if committable <= lane.stored {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(topic, partition, Offset::Offset(committable))
            .is_err()
        {
            return;
        }
        match consumer.store_offsets(&tpl) {
            Ok(()) => {
                debug!(%topic, partition, offset = committable, "offset stored");
                lane.stored = committable;
                if self.commit_each_store {
                    self.stored.notify_one();
                }
            }
            Err(error) => debug!(%topic, partition, %error, "offset not stored"),
        }
    }
}

impl Offsets {
    /// Stores again what a refused store left behind. librdkafka refuses stores while a
    /// partition's state is in flux (around a broker restart); the records behind such a store
    /// keep their permits parked, and once every permit is parked no record finishes to store
    /// again: without this sweep the consumer would stop for good.
    fn store_left_behind<C: ConsumerContext>(&self, consumer: &StreamConsumer<C>) {
        let mut lanes = self.lanes();
        for ((topic, partition), lane) in lanes.iter_mut() {
            let Some(next) = lane.next else { continue };
            let committable = lane.in_flight.first().copied().unwrap_or(next);
            self.store(lane, topic, *partition, committable, consumer);
        }
    }

    /// Stored offsets not yet committed, as a commit request.
    fn pending(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), lane) in self.lanes().iter() {
            if lane.stored > lane.committed {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(lane.stored));
            }
        }
        tpl
    }

    /// A confirmed commit (this path's own, or one answered through librdkafka's commit
    /// callback: an auto-commit of the stored offsets, or the commit on revoke) gives back the
    /// permits of the records it covers. It names no
    /// epoch; a confirmed offset is committed on the broker whichever assignment the lane now
    /// belongs to, and every record below it is finished.
    fn confirmed(&self, tpl: &TopicPartitionList) {
        let mut lanes = self.lanes();
        for e in tpl.elements() {
            let Offset::Offset(offset) = e.offset() else {
                continue;
            };
            if e.error().is_err() {
                continue;
            }
            if let Some(lane) = lanes.get_mut(&(e.topic().to_owned(), e.partition()))
                && offset > lane.committed
            {
                lane.committed = offset;
                // Never store below what the broker already has.
                lane.stored = lane.stored.max(offset);
                lane.parked = lane.parked.split_off(&offset);
            }
        }
    }
}

/// How long a synchronous commit may go unanswered before the loop goes on without it.
const COMMIT_LIMIT: std::time::Duration = std::time::Duration::from_secs(10);

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

/// The consumer context: rebalances update the offset trackers; statistics feed the lag gauge.
pub(crate) struct Ctx {
    offsets: Arc<Offsets>,
    metrics: Arc<ConsumerMetrics>,
    path: &'static str,
}

impl ClientContext for Ctx {
    fn stats(&self, statistics: Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition >= 0 && p.consumer_lag >= 0 {
                    self.metrics.set_lag(topic, *partition, p.consumer_lag);
                }
            }
        }
    }
}

impl ConsumerContext for Ctx {
    fn pre_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            self.offsets.revoke(tpl);
        }
    }

    fn commit_callback(
        &self,
        result: rdkafka::error::KafkaResult<()>,
        offsets: &TopicPartitionList,
    ) {
        match result {
            Ok(()) => {
                debug!(partitions = offsets.count(), "offsets committed");
                self.offsets.confirmed(offsets);
            }
            Err(error) => debug!(%error, "offset commit failed; the next one covers it"),
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            self.metrics.assigned(self.path);
            self.offsets.assign(tpl);
            // librdkafka keeps a partition's pause across a revoke and a new assignment: set it
            // to what the intake wants now (see `intake`).
            let result = if self.offsets.paused.load(Ordering::Relaxed) {
                consumer.pause(tpl)
            } else {
                consumer.resume(tpl)
            };
            if let Err(error) = result {
                warn!(%error, "cannot set the fetch state of assigned partitions");
            }
        }
    }
}

pub(crate) type KafkaConsumer = StreamConsumer<Ctx>;

/// Creates a consumer of `group`, subscribed to `topic`.
pub(crate) fn subscribe(
    config: &ConsumerConfig,
    group: &str,
    topic: &str,
    path: &'static str,
    metrics: &Arc<ConsumerMetrics>,
) -> Result<(Arc<KafkaConsumer>, Arc<Offsets>), ConsumerError> {
    let offsets = Arc::new(Offsets {
        commit_each_store: config.commit_interval.is_zero(),
        ..Offsets::default()
    });

    let consumer: KafkaConsumer = client_config(config, group).create_with_context(Ctx {
        offsets: offsets.clone(),
        metrics: metrics.clone(),
        path,
    })?;
    consumer.subscribe(&[topic])?;
    Ok((Arc::new(consumer), offsets))
}

/// Links of the per-(build, hook) chains: the receiver of the latest delivery's "done" signal.
#[derive(Default)]
struct Chains {
    links: HashMap<(i64, i64), oneshot::Receiver<()>>,
}

impl Chains {
    /// Returns the previous delivery's signal (to wait for) and this delivery's (to drop when
    /// done).
    fn link(&mut self, key: (i64, i64)) -> (Option<oneshot::Receiver<()>>, oneshot::Sender<()>) {
        let (done, next) = oneshot::channel();
        (self.links.insert(key, next), done)
    }

    /// Forgets chains whose last delivery is finished.
    fn prune(&mut self, above: usize) {
        if self.links.len() > above {
            self.links
                .retain(|_, rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        }
    }
}

/// Handles shutdown for a path: wait for in-flight work within the drain bound, abandon the
/// rest, and commit what was stored.
async fn drain(
    p: &Pipeline,
    tasks: &TaskTracker,
    abandon: &CancellationToken,
    consumer: &Arc<KafkaConsumer>,
    path: &str,
) {
    tasks.close();
    if tokio::time::timeout(p.config.drain_timeout, tasks.wait())
        .await
        .is_err()
    {
        warn!(
            path,
            left = tasks.len(),
            "drain bound reached; abandoning in-flight work"
        );
        abandon.cancel();
        tasks.wait().await;
    }
    match Committer::default()
        .commit(consumer, None, COMMIT_LIMIT)
        .await
    {
        Ok(()) => info!(path, "offsets committed"),
        Err(CommitFailed::Kafka(error)) => {
            debug!(path, %error, "final commit (nothing stored is fine)")
        }
        Err(CommitFailed::Stuck) => warn!(path, "final commit unanswered; exiting without it"),
    }
}

/// A record of a batch, read: the registry being unreachable is waited out, not returned.
enum Read {
    Event(Box<hookline_schemas::BuildEvent>),
    Undecodable(decode::Undecodable),
}

/// Decodes every record of a batch, waiting out a schema registry that cannot be reached.
async fn decode_batch<'m>(
    p: &Pipeline,
    batch: impl ExactSizeIterator<Item = &'m OwnedMessage>,
    shutdown: &CancellationToken,
) -> Result<Vec<Read>, Abandoned> {
    let mut out = Vec::with_capacity(batch.len());
    for msg in batch {
        let read = wait_out(
            &p.metrics,
            Stall::SchemaRegistry,
            "schema registry unavailable",
            shutdown,
            || async {
                match decode::record(&p.codec, msg.payload()).await {
                    Decoded::Transient(error) => Err(error),
                    Decoded::Event(event) => Ok(Read::Event(event)),
                    Decoded::Undecodable(u) => Ok(Read::Undecodable(u)),
                }
            },
        )
        .await?;
        out.push(read);
    }
    Ok(out)
}

type Lookup = (HashMap<i64, Arc<Vec<Hook>>>, HashMap<i64, RenderSnapshot>);

/// The hooks of every project in the batch and the snapshots of every build to render: one
/// lookup per batch. The store being down holds the batch (and so the partition) until it is
/// back: there is nothing to deliver without it.
async fn lookup(
    p: &Pipeline,
    decoded: &[Read],
    shutdown: &CancellationToken,
) -> Result<Lookup, Abandoned> {
    let events: Vec<_> = decoded
        .iter()
        .filter_map(|d| match d {
            Read::Event(e) => Some(e.as_ref()),
            Read::Undecodable(_) => None,
        })
        .collect();
    wait_out(
        &p.metrics,
        Stall::Store,
        "store unavailable; batch waits",
        shutdown,
        || async {
            let hooks = p
                .hooks
                .for_projects(events.iter().map(|e| e.project_id))
                .await?;
            // Only builds with someone to deliver to need a render.
            let with_hooks = events
                .iter()
                .copied()
                .filter(|e| hooks.get(&e.project_id).is_some_and(|h| !h.is_empty()));
            let snapshots = resolve::load_snapshots(p.store.as_ref(), with_hooks).await?;
            Ok::<_, hookline_cistate::StoreError>((hooks, snapshots))
        },
    )
    .await
}

/// What both paths share around their dispatch loop: the committer, the intake (its room is the
/// in-flight bound) and the tracker of spawned work, then the drain at shutdown.
struct Path {
    name: &'static str,
    committer_stop: CancellationToken,
    committer: tokio::task::JoinHandle<()>,
    tasks: TaskTracker,
}

impl Path {
    fn start(
        name: &'static str,
        p: &Pipeline,
        consumer: &Arc<KafkaConsumer>,
        offsets: &Arc<Offsets>,
    ) -> Self {
        let committer_stop = CancellationToken::new();
        let committer = tokio::spawn(commit_loop(
            consumer.clone(),
            offsets.clone(),
            p.metrics.clone(),
            committer_stop.clone(),
        ));
        Path {
            name,
            committer_stop,
            committer,
            tasks: TaskTracker::new(),
        }
    }

    /// Runs `work` for a dispatched record as a task of this path. The record is finished (its
    /// offset may be stored) only when the work completes; abandoned work leaves it unfinished,
    /// to be delivered again.
    fn spawn_record(
        &self,
        p: &Pipeline,
        consumer: &Arc<KafkaConsumer>,
        offsets: &Arc<Offsets>,
        (ticket, permit): (Ticket, OwnedSemaphorePermit),
        work: impl Future<Output = Result<(), Abandoned>> + Send + 'static,
    ) {
        let (metrics, consumer, offsets) = (p.metrics.clone(), consumer.clone(), offsets.clone());
        self.tasks.spawn(async move {
            let _in_flight = InFlight::new(&metrics);
            if work.await.is_ok() {
                offsets.finish(&ticket, permit, &consumer);
            }
        });
    }

    /// Drains in-flight work, commits, and stops the committer. The intake must be gone by now,
    /// so that no record is fetched after the final commit.
    async fn finish(
        self,
        p: &Pipeline,
        abandon: &CancellationToken,
        consumer: &Arc<KafkaConsumer>,
    ) {
        drain(p, &self.tasks, abandon, consumer, self.name).await;
        self.committer_stop.cancel();
        let _ = self.committer.await;
    }
}

/// The main path: `build-events` to deliveries.
pub(crate) async fn run_main(
    p: Arc<Pipeline>,
    consumer: Arc<KafkaConsumer>,
    offsets: Arc<Offsets>,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    let path = Path::start("main", &p, &consumer, &offsets);
    let mut chains = Chains::default();
    let mut intake = Intake::new(&consumer, &offsets, &p, path.name);
    while let Some(batch) = intake.next_batch(p.config.poll_batch, &shutdown).await {
        let dispatched = dispatch_main(
            &p,
            &consumer,
            &offsets,
            &shutdown,
            &abandon,
            &mut chains,
            &path,
            batch,
        )
        .await;
        if dispatched.is_err() {
            break;
        }
    }
    drop(intake);
    path.finish(&p, &abandon, &consumer).await;
}

/// Decodes a batch, loads what it needs in one lookup, and spawns its deliveries.
#[allow(clippy::too_many_arguments)]
async fn dispatch_main(
    p: &Arc<Pipeline>,
    consumer: &Arc<KafkaConsumer>,
    offsets: &Arc<Offsets>,
    shutdown: &CancellationToken,
    abandon: &CancellationToken,
    chains: &mut Chains,
    path: &Path,
    batch: Vec<Taken>,
) -> Result<(), Abandoned> {
    let decoded = decode_batch(p, batch.iter().map(|(msg, _, _)| msg), shutdown).await?;
    let (hooks, snapshots) = lookup(p, &decoded, shutdown).await?;
    for ((msg, ticket, permit), decoded) in batch.into_iter().zip(decoded) {
        let event = match decoded {
            Read::Event(event) => event,
            Read::Undecodable(u) => {
                warn!(partition = msg.partition(), offset = msg.offset(), reason = u.reason, detail = %u.detail, "undecodable record; dead-lettered");
                let (pc, abandon) = (p.clone(), abandon.clone());
                path.spawn_record(p, consumer, offsets, (ticket, permit), async move {
                    let reason = DeadLetterReason::Undecodable(u.reason);
                    pc.handoff
                        .dead_letter_record(&msg, reason, &u.detail, &abandon)
                        .await
                        .map(drop)
                });
                continue;
            }
        };
        let mut project_hooks = hooks.get(&event.project_id).cloned().unwrap_or_default();
        if let Some(only) = header(msg.headers(), H_ONLY_HOOK) {
            // A replay of one dead-lettered delivery: the other hooks already had this event.
            let only: Option<i64> = only.parse().ok();
            project_hooks = Arc::new(
                project_hooks
                    .iter()
                    .filter(|h| Some(h.id) == only)
                    .cloned()
                    .collect(),
            );
        }
        if project_hooks.is_empty() {
            offsets.finish(&ticket, permit, consumer);
            continue;
        }
        if let Some(skip) = resolve::skip(&event, &snapshots) {
            // Nothing to deliver, by design: the record is finished.
            p.metrics.event_skipped(skip.reason());
            info!(build_id = event.build_id, event_id = %event.event_id, reason = skip.reason(), ?skip, "no hook sent: the build's user is blocked");
            offsets.finish(&ticket, permit, consumer);
            continue;
        }
        let resolved = match resolve::payload(&event, &snapshots) {
            Ok(resolved) => resolved,
            Err(missing) => {
                warn!(build_id = missing.build_id, event_id = %event.event_id, "build no longer exists; dead-lettered");
                let (pc, abandon) = (p.clone(), abandon.clone());
                path.spawn_record(p, consumer, offsets, (ticket, permit), async move {
                    let detail =
                        format!("build {} not found in the CI state store", missing.build_id);
                    let reason = DeadLetterReason::BuildNotFound;
                    pc.handoff
                        .dead_letter_record(&msg, reason, &detail, &abandon)
                        .await
                        .map(drop)
                });
                continue;
            }
        };
        if let ResolvedPayload::RenderedFromCurrentState {
            stale: true,
            current_status,
            ..
        } = &resolved
        {
            p.metrics.stale_render();
            info!(build_id = event.build_id, event_status = %event.status, %current_status, event_id = %event.event_id, "stale render: the build has moved on");
        }
        let body = resolved.body().clone();
        let source = Source::of(&msg);
        let deliveries: Vec<_> = project_hooks
            .iter()
            .map(|hook| {
                let (previous, done) = chains.link((event.build_id, hook.id));
                let task = DeliveryTask {
                    event_id: event.event_id,
                    build_id: event.build_id,
                    project_id: event.project_id,
                    hook_id: hook.id,
                    attempts: 0,
                    occurred_at: event.occurred_at,
                    body: body.clone(),
                    last_error: None,
                    source: Some(source.clone()),
                };
                (previous, done, hook.clone(), task)
            })
            .collect();
        let (pc, abandon) = (p.clone(), abandon.clone());
        path.spawn_record(p, consumer, offsets, (ticket, permit), async move {
            let results = futures::future::join_all(deliveries.into_iter().map(
                |(previous, done, hook, task)| {
                    let (p, abandon) = (&pc, &abandon);
                    async move {
                        if let Some(previous) = previous {
                            // An error only means the previous delivery's task ended: go on.
                            let _ = previous.await;
                        }
                        let result = p.run_task(task, &hook, abandon).await;
                        drop(done);
                        result
                    }
                },
            ))
            .await;
            // Finished only when every hook's delivery reached an end (none abandoned).
            results.into_iter().try_for_each(|r| r.map(drop))
        });
    }
    chains.prune(p.config.max_in_flight * 4);
    Ok(())
}

/// The retry path: due delivery tasks from the retry topic.
pub(crate) async fn run_retry(
    p: Arc<Pipeline>,
    consumer: Arc<KafkaConsumer>,
    offsets: Arc<Offsets>,
    shutdown: CancellationToken,
    abandon: CancellationToken,
) {
    let path = Path::start("retry", &p, &consumer, &offsets);
    let mut intake = Intake::new(&consumer, &offsets, &p, path.name);
    while let Some(batch) = intake.next_batch(p.config.poll_batch, &shutdown).await {
        for (msg, ticket, permit) in batch {
            let (pc, abandon) = (p.clone(), abandon.clone());
            path.spawn_record(&p, &consumer, &offsets, (ticket, permit), async move {
                retry::process(&pc, &msg, &abandon).await
            });
        }
    }
    drop(intake);
    path.finish(&p, &abandon, &consumer).await;
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
