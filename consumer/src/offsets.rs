//! Which records of a partition are finished, what a commit says about them, and when an
//! in-flight permit comes back.
//!
//! # What a commit says, and why
//!
//! Deliveries of one partition run side by side and finish in any order: a receiver that answers
//! after 8 s holds its record while the records behind it finish. A commit therefore carries two
//! things (see `commit_metadata`): the offset below which every record is finished (the first
//! unfinished one), and, in the commit's metadata, which records at or past it are still
//! unfinished. Whoever reads the partition next (this instance after a restart, or another after
//! a rebalance) reads the description back when the partition is assigned and skips the records
//! it calls finished, so a slow record costs no re-deliveries of the finished records behind it.
//! A record read again in the same assignment (the fetch position can move back after a broker
//! restart) is recognised the same way: finished, or still being worked on, it is not dispatched
//! twice.
//!
//! Only the consumer commits (`enable.auto.commit=false`): librdkafka's own commits send the
//! stored offset alone, and skip a partition whose offset did not move even when the records
//! past it did (a metadata-only change). So the committer sends explicit commits with metadata
//! (`commit`), and a revoked partition's newest snapshot is committed before it goes.
//!
//! # The in-flight bound, and what a crash re-delivers
//!
//! A permit is taken per record at dispatch and given back only when a confirmed commit covers
//! the finished record: below its offset, or inside its description and not listed unfinished.
//! So at most `max_in_flight` records of a path are ever either being worked on or finished but
//! not yet covered by a confirmed commit, and those are what a crash can deliver again. Records
//! that were never attempted (waiting for a slot or for their retry to be due) are delivered
//! when read again, which is not a duplicate. With `--commit-interval`, permits come back when a
//! record finishes and a crash also re-delivers what finished since the last commit.
//!
//! # Rebalances
//!
//! A revoked partition's lane is dropped after its newest description is committed; work still running
//! for it finishes but never stores an offset, because the lane its ticket belongs to is gone. A
//! (re)assigned partition gets a fresh lane (a new epoch) from the committed description.
//!
//! The rules live on [`Lane`], pure and unit-tested; [`Offsets`] holds a consumer's lanes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info};

use crate::commit_metadata::{self, Described};

/// What arrived with a record, in its lane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Arrival {
    /// New work: dispatch it.
    Dispatch,
    /// Finished already (before a crash or a rebalance, or earlier in this assignment): skip it.
    Finished,
    /// Being worked on now (fetched a second time): skip it.
    InFlight,
}

/// What one commit says of a partition: its offset, its metadata, and the records the metadata
/// lists as unfinished (so a confirmation knows which finished records it covers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Snapshot {
    pub(crate) offset: i64,
    pub(crate) metadata: String,
    pub(crate) described: Described,
}

/// The records of one owned partition.
#[derive(Debug)]
pub(crate) struct Lane {
    epoch: u64,
    /// Dispatched and not finished.
    in_flight: BTreeSet<i64>,
    /// Unfinished according to the commit this assignment started from, not read again yet.
    inherited: BTreeSet<i64>,
    /// One past the highest offset whose state is known; `None` before anything is.
    known_end: Option<i64>,
    /// Permits of finished records, until a confirmed commit covers them.
    parked: BTreeMap<i64, OwnedSemaphorePermit>,
    /// The offset of the last confirmed commit: every record below it is finished.
    committed: i64,
    /// The last snapshot sent in a commit (to match a confirmation that arrives late).
    sent: Option<Snapshot>,
    /// Something changed since the last snapshot.
    dirty: bool,
}

impl Lane {
    /// A lane for a partition whose committed offset is `committed` (-1: none) with what that
    /// commit describes.
    fn new(epoch: u64, committed: i64, described: Option<Described>) -> Self {
        let (inherited, known_end) = match described {
            Some(d) => (commit_metadata::unfinished_set(&d), Some(d.end)),
            None => (BTreeSet::new(), None),
        };
        Lane {
            epoch,
            in_flight: BTreeSet::new(),
            inherited,
            known_end,
            parked: BTreeMap::new(),
            committed,
            sent: None,
            dirty: false,
        }
    }

    /// Record `offset` arrived.
    fn begin(&mut self, offset: i64) -> Arrival {
        if offset < self.committed {
            return Arrival::Finished;
        }
        if self.in_flight.contains(&offset) {
            return Arrival::InFlight;
        }
        let known = self.known_end.is_some_and(|end| offset < end);
        if known && !self.inherited.remove(&offset) {
            return Arrival::Finished;
        }
        self.in_flight.insert(offset);
        self.known_end = Some(self.known_end.map_or(offset + 1, |end| end.max(offset + 1)));
        self.dirty = true;
        Arrival::Dispatch
    }

    /// The first unfinished offset (every record below it is finished), or one past the newest
    /// known. `None` before anything is known.
    fn first_unfinished(&self) -> Option<i64> {
        let end = self.known_end?;
        let a = self.in_flight.first().copied().unwrap_or(end);
        let b = self.inherited.first().copied().unwrap_or(end);
        Some(a.min(b).max(self.committed))
    }

    /// Record `offset` finished. Its permit is parked until a commit covers it, or dropped at
    /// once with `release_now` (a commit interval) or when it is below the committed offset.
    fn finish(&mut self, offset: i64, permit: OwnedSemaphorePermit, release_now: bool) {
        if self.in_flight.remove(&offset) {
            self.dirty = true;
        }
        if !release_now && offset >= self.committed {
            self.parked.insert(offset, permit);
        }
    }

    /// What a commit made now would say, if anything changed since the last one.
    fn snapshot(&mut self) -> Option<Snapshot> {
        if !self.dirty {
            return None;
        }
        let offset = self.first_unfinished()?;
        let end = self.known_end?;
        let unfinished: Vec<i64> = merged(&self.in_flight, &self.inherited)
            .filter(|o| *o >= offset)
            .collect();
        let (metadata, described) = commit_metadata::encode(offset, end, &unfinished);
        self.dirty = false;
        Some(Snapshot {
            offset,
            metadata,
            described,
        })
    }

    fn set_sent(&mut self, snapshot: &Snapshot) {
        self.sent = Some(snapshot.clone());
    }

    /// The snapshot was not committed: the next commit takes one again.
    fn not_committed(&mut self) {
        self.dirty = true;
    }

    /// A commit of `snapshot` was confirmed: nothing below its offset is ever dispatched again,
    /// and the permits of the finished records it covers come back.
    fn confirmed(&mut self, snapshot: &Snapshot) {
        self.committed = self.committed.max(snapshot.offset);
        let unfinished = &snapshot.described.unfinished;
        let past = self.parked.split_off(&snapshot.described.end);
        let described = std::mem::replace(&mut self.parked, past);
        // Released, unless the description listed the record unfinished (it finished after
        // the snapshot was taken: the next commit covers it).
        for (offset, permit) in described {
            if offset >= snapshot.offset && unfinished.binary_search(&offset).is_ok() {
                self.parked.insert(offset, permit);
            }
        }
    }

    /// Permits held by finished records waiting for a commit.
    #[cfg(test)]
    fn parked_len(&self) -> usize {
        self.parked.len()
    }
}

/// The ascending union of two ascending sets.
fn merged<'a>(a: &'a BTreeSet<i64>, b: &'a BTreeSet<i64>) -> impl Iterator<Item = i64> + 'a {
    let mut a = a.iter().copied().peekable();
    let mut b = b.iter().copied().peekable();
    std::iter::from_fn(move || match (a.peek(), b.peek()) {
        (Some(x), Some(y)) if x <= y => a.next(),
        (Some(_), Some(_)) => b.next(),
        (Some(_), None) => a.next(),
        (None, Some(_)) => b.next(),
        (None, None) => None,
    })
}

/// Per-partition tracking, shared by the intake, the tasks, the committer and the rebalance
/// callbacks.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    lanes: Mutex<HashMap<(String, i32), Lane>>,
    epochs: AtomicU64,
    /// Permits come back when a record finishes rather than when a commit covers it (a commit
    /// interval is set: the committer commits on its interval, not after every finish).
    pub(crate) release_on_finish: bool,
    /// Wakes the committer after a record finished.
    pub(crate) finished: tokio::sync::Notify,
    /// Fetching is paused by the intake: partitions assigned meanwhile are paused too.
    pub(crate) paused: AtomicBool,
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

/// A commit to make: the request (offsets with metadata), and the snapshots it carries, to
/// confirm once it is committed. A snapshot names its lane's epoch, so a confirmation that
/// arrives after a rebalance changes nothing of the new assignment.
pub(crate) struct Commit {
    request: TopicPartitionList,
    snapshots: Vec<((String, i32, u64), Snapshot)>,
}

impl Commit {
    pub(crate) fn is_empty(&self) -> bool {
        self.snapshots.is_empty()
    }

    /// The commit request, to send (once).
    pub(crate) fn take_request(&mut self) -> TopicPartitionList {
        std::mem::replace(&mut self.request, TopicPartitionList::new())
    }
}

/// One partition's committed offset and metadata, as read when it is assigned.
pub(crate) struct Committed {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    /// -1 when nothing was committed.
    pub(crate) offset: i64,
    pub(crate) metadata: Option<String>,
}

impl Offsets {
    pub(crate) fn new(release_on_finish: bool) -> Self {
        Offsets {
            release_on_finish,
            ..Offsets::default()
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Lane>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Partitions assigned, with what their last commits say.
    pub(crate) fn assign(&self, committed: Vec<Committed>) {
        debug!(partitions = committed.len(), "partitions assigned");
        let mut lanes = self.lanes();
        for c in committed {
            let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
            let described = c
                .metadata
                .as_deref()
                .filter(|_| c.offset >= 0)
                .and_then(|m| commit_metadata::decode(c.offset, m));
            if let Some(d) = &described {
                debug!(topic = %c.topic, partition = c.partition, committed = c.offset, end = d.end, unfinished = d.unfinished.len(), "the last commit describes the records past it");
            }
            lanes.insert(
                (c.topic, c.partition),
                Lane::new(epoch, c.offset, described),
            );
        }
    }

    /// Partitions revoked: their lanes are dropped, and their newest snapshots returned, for a
    /// last commit before the partitions go.
    pub(crate) fn revoke(&self, tpl: &TopicPartitionList) -> TopicPartitionList {
        let mut lanes = self.lanes();
        let mut last = TopicPartitionList::new();
        for e in tpl.elements() {
            let Some(mut lane) = lanes.remove(&(e.topic().to_owned(), e.partition())) else {
                continue;
            };
            if !lane.in_flight.is_empty() {
                info!(
                    topic = e.topic(),
                    partition = e.partition(),
                    in_flight = lane.in_flight.len(),
                    "partition revoked with work in flight; its offsets will not be committed"
                );
            }
            lane.dirty = true;
            if let Some(s) = lane.snapshot() {
                add(&mut last, e.topic(), e.partition(), &s);
            }
        }
        last
    }

    /// Claims `msg`'s offset in its partition's current assignment (epoch), taken as the record
    /// arrives so that a rebalance served after it voids the claim; and says whether the record
    /// is new work.
    pub(crate) fn begin(&self, msg: &impl Message) -> (Ticket, Arrival) {
        let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
        let mut lanes = self.lanes();
        let key = (topic.to_owned(), partition);
        let (epoch, arrival) = match lanes.get_mut(&key) {
            Some(lane) => (lane.epoch, lane.begin(offset)),
            None => {
                debug!(
                    topic,
                    partition,
                    offset,
                    "record of a partition not owned; its offset will not be committed"
                );
                (0, Arrival::Dispatch)
            }
        };
        (
            Ticket {
                topic: key.0,
                partition: key.1,
                offset,
                epoch,
            },
            arrival,
        )
    }

    /// Whether the ticket's claim still holds: its partition is owned in the same assignment.
    pub(crate) fn is_current(&self, ticket: &Ticket) -> bool {
        ticket.epoch != 0
            && self
                .lanes()
                .get(&(ticket.topic.clone(), ticket.partition))
                .is_some_and(|lane| lane.epoch == ticket.epoch)
    }

    /// Marks the ticket's record finished and wakes the committer.
    pub(crate) fn finish(&self, ticket: &Ticket, permit: OwnedSemaphorePermit) {
        {
            let mut lanes = self.lanes();
            let Some(lane) = lanes.get_mut(&(ticket.topic.clone(), ticket.partition)) else {
                return;
            };
            if lane.epoch != ticket.epoch {
                return;
            }
            lane.finish(ticket.offset, permit, self.release_on_finish);
        }
        self.finished.notify_one();
    }

    /// What a commit made now would say, for every partition where something changed.
    pub(crate) fn snapshots(&self) -> Commit {
        let mut lanes = self.lanes();
        let mut commit = Commit {
            request: TopicPartitionList::new(),
            snapshots: Vec::new(),
        };
        for ((topic, partition), lane) in lanes.iter_mut() {
            if let Some(s) = lane.snapshot() {
                add(&mut commit.request, topic, *partition, &s);
                lane.set_sent(&s);
                commit
                    .snapshots
                    .push(((topic.clone(), *partition, lane.epoch), s));
            }
        }
        commit
    }

    /// The commit failed: the next one describes those partitions again.
    pub(crate) fn not_committed(&self, commit: &Commit) {
        let mut lanes = self.lanes();
        for ((topic, partition, epoch), _) in &commit.snapshots {
            if let Some(lane) = lanes.get_mut(&(topic.clone(), *partition))
                && lane.epoch == *epoch
            {
                lane.not_committed();
            }
        }
    }

    /// The commit was confirmed.
    pub(crate) fn confirmed(&self, commit: &Commit) {
        let mut lanes = self.lanes();
        for ((topic, partition, epoch), snapshot) in &commit.snapshots {
            if let Some(lane) = lanes.get_mut(&(topic.clone(), *partition))
                && lane.epoch == *epoch
            {
                lane.confirmed(snapshot);
            }
        }
    }

    /// A commit confirmed through the client's callback: when it is the last snapshot sent (a
    /// commit whose own wait gave up, answered late), it covers what that snapshot says.
    pub(crate) fn confirmed_by_client(&self, tpl: &TopicPartitionList) {
        let mut lanes = self.lanes();
        for e in tpl.elements() {
            let Offset::Offset(offset) = e.offset() else {
                continue;
            };
            if e.error().is_err() {
                continue;
            }
            // rust-rdkafka panics on metadata that is not UTF-8; ours always is, and anything
            // else is simply not ours.
            let metadata =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| e.metadata().to_owned()));
            if let Some(lane) = lanes.get_mut(&(e.topic().to_owned(), e.partition()))
                && let Some(sent) = lane.sent.clone()
                && sent.offset == offset
                && metadata.is_ok_and(|m| m == sent.metadata)
            {
                lane.confirmed(&sent);
            }
        }
    }
}

fn add(tpl: &mut TopicPartitionList, topic: &str, partition: i32, s: &Snapshot) {
    if tpl
        .add_partition_offset(topic, partition, Offset::Offset(s.offset))
        .is_ok()
        && let Some(mut e) = tpl.find_partition(topic, partition)
    {
        e.set_metadata(&s.metadata);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::*;

    struct Bench {
        lane: Lane,
        permits: Arc<Semaphore>,
        held: BTreeMap<i64, OwnedSemaphorePermit>,
    }

    impl Bench {
        fn new(committed: i64, described: Option<Described>) -> Self {
            Bench {
                lane: Lane::new(1, committed, described),
                permits: Arc::new(Semaphore::new(64)),
                held: BTreeMap::new(),
            }
        }

        fn arrive(&mut self, offsets: impl IntoIterator<Item = i64>) -> Vec<Arrival> {
            offsets
                .into_iter()
                .map(|o| {
                    let a = self.lane.begin(o);
                    if a == Arrival::Dispatch {
                        self.held
                            .insert(o, self.permits.clone().try_acquire_owned().unwrap());
                    }
                    a
                })
                .collect()
        }

        fn finish(&mut self, offsets: impl IntoIterator<Item = i64>) {
            for o in offsets {
                let permit = self.held.remove(&o).expect("dispatched");
                self.lane.finish(o, permit, false);
            }
        }

        fn commit(&mut self) -> Snapshot {
            let s = self.lane.snapshot().expect("something changed");
            self.lane.set_sent(&s);
            self.lane.confirmed(&s);
            s
        }

        fn free(&self) -> usize {
            self.permits.available_permits()
        }
    }

    #[test]
    fn nothing_is_described_before_a_record_arrives() {
        let mut lane = Lane::new(1, -1, None);
        assert_eq!(lane.first_unfinished(), None);
        assert_eq!(lane.snapshot(), None);
    }

    /// Record 10 is slow; 11 and 12 finish behind it. The commit's offset stays at 10, but its
    /// metadata says only 10 is unfinished, so 11 and 12's permits come back and a reader after
    /// a crash skips them.
    #[test]
    fn records_finished_behind_a_slow_one_are_covered_by_the_commit() {
        let mut b = Bench::new(-1, None);
        b.arrive([10, 11, 12]);
        b.finish([11, 12]);
        let s = b.commit();
        assert_eq!(s.offset, 10);
        assert_eq!(s.described.unfinished, vec![10]);
        assert_eq!(s.described.end, 13);
        assert_eq!(b.free(), 63, "only the slow record holds a permit");

        // The next owner of the partition reads the commit back.
        let mut next = Lane::new(2, s.offset, commit_metadata::decode(s.offset, &s.metadata));
        assert_eq!(next.begin(10), Arrival::Dispatch, "unfinished: delivered");
        assert_eq!(next.begin(11), Arrival::Finished);
        assert_eq!(next.begin(12), Arrival::Finished);
        assert_eq!(
            next.begin(13),
            Arrival::Dispatch,
            "past the description: new"
        );
    }

    #[test]
    fn a_permit_comes_back_only_when_a_confirmed_commit_covers_its_record() {
        let mut b = Bench::new(-1, None);
        b.arrive([0, 1, 2, 3]);
        assert_eq!(b.free(), 60);
        b.finish([0, 1]);
        assert_eq!(b.free(), 60, "finished, not yet committed: still counted");
        let s = b.lane.snapshot().unwrap();
        // 2 finishes after the snapshot was taken: the commit lists it unfinished.
        b.finish([2]);
        b.lane.confirmed(&s);
        assert_eq!(b.free(), 62, "0 and 1 are covered, 2 is not yet");
        assert_eq!(b.lane.parked_len(), 1);
        b.finish([3]);
        b.commit();
        assert_eq!(b.free(), 64);
    }

    #[test]
    fn a_record_fetched_again_is_not_dispatched_twice() {
        let mut b = Bench::new(-1, None);
        b.arrive([5, 6, 7]);
        b.finish([5]);
        // The fetch position moved back (a broker restart): 5, 6 and 7 arrive again.
        assert_eq!(
            b.arrive([5, 6, 7]),
            vec![Arrival::Finished, Arrival::InFlight, Arrival::InFlight]
        );
        b.finish([6, 7]);
        b.commit();
        assert_eq!(b.arrive([6]), vec![Arrival::Finished], "below the commit");
        assert_eq!(b.free(), 64);
    }

    #[test]
    fn an_inherited_description_is_kept_until_its_records_are_read_again() {
        // The last owner committed 100 with 100 and 104 unfinished, up to 110.
        let d = Described {
            end: 110,
            unfinished: vec![100, 104],
        };
        let mut b = Bench::new(100, Some(d));
        assert_eq!(b.arrive([100]), vec![Arrival::Dispatch]);
        b.finish([100]);
        // 104 has not been read again yet: the commit must still call it unfinished, and must
        // not forget that 101..=103 and 105..110 are finished.
        let s = b.commit();
        assert_eq!(s.offset, 104);
        assert_eq!(s.described.unfinished, vec![104]);
        assert_eq!(s.described.end, 110);
        assert_eq!(
            b.arrive([101, 104, 105, 110]),
            vec![
                Arrival::Finished,
                Arrival::Dispatch,
                Arrival::Finished,
                Arrival::Dispatch
            ]
        );
    }

    #[test]
    fn with_a_commit_interval_permits_come_back_when_records_finish() {
        let mut lane = Lane::new(1, -1, None);
        let permits = Arc::new(Semaphore::new(2));
        lane.begin(0);
        lane.finish(0, permits.clone().try_acquire_owned().unwrap(), true);
        assert_eq!(permits.available_permits(), 2);
    }

    #[test]
    fn a_confirmation_never_moves_the_offset_back() {
        let mut b = Bench::new(-1, None);
        b.arrive([0, 1]);
        b.finish([0, 1]);
        let late = b.lane.snapshot().unwrap();
        b.arrive([2]);
        b.finish([2]);
        let newer = b.commit();
        b.lane.confirmed(&late);
        assert_eq!(b.lane.committed, newer.offset);
    }

    #[test]
    fn a_snapshot_is_taken_only_when_something_changed() {
        let mut b = Bench::new(-1, None);
        b.arrive([0]);
        assert!(b.lane.snapshot().is_some());
        assert!(b.lane.snapshot().is_none());
        b.lane.not_committed();
        assert!(
            b.lane.snapshot().is_some(),
            "a failed commit is described again"
        );
    }
}
