//! Which offset of a partition may be stored, and when an in-flight permit comes back.
//!
//! # Where offsets are stored, and why
//!
//! `enable.auto.commit=true` with `enable.auto.offset.store=false`: librdkafka commits in the
//! background whatever we *store*, and we store offset `o + 1` of a partition only when record
//! `o` and every earlier record of that partition are finished: delivered, dead-lettered (acked)
//! or handed to the retry topic (acked). A crash therefore re-delivers at most the unfinished
//! records, which the in-flight bound limits.
//!
//! # The in-flight bound
//!
//! A permit is taken per record at dispatch and given back only when a confirmed commit has
//! passed the record (or, with a commit interval, when the stored offset has), not when the
//! record finishes: records finished behind a slow one keep their permits ("parked"). So at most
//! `max_in_flight` records of a path are ever past the committed offset, which is what bounds
//! re-deliveries after a crash. A record fetched again below the committed offset (the fetch
//! position can move back after a broker restart without a rebalance) gives its permit back at
//! once: no commit will pass it again, and a crash cannot re-deliver it.
//!
//! # Rebalances
//!
//! A revoked partition's lane is dropped before librdkafka commits on revoke; work already
//! running for it finishes (or is abandoned at shutdown) but never stores an offset, because the
//! lane its ticket belongs to is gone. A reassigned partition gets a fresh lane (a new epoch).
//!
//! The rules live on [`Lane`], pure and unit-tested; [`Offsets`] holds the lanes of a consumer
//! and makes the one librdkafka call (`store_offsets`) with what a rule decided.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::OwnedSemaphorePermit;
use tracing::{debug, info};

/// The in-flight records of one owned partition.
#[derive(Debug)]
pub(crate) struct Lane {
    epoch: u64,
    in_flight: BTreeSet<i64>,
    /// Permits of finished records not yet passed by a commit (see the module doc).
    parked: BTreeMap<i64, OwnedSemaphorePermit>,
    /// One past the highest offset dispatched.
    next: Option<i64>,
    stored: i64,
    committed: i64,
}

impl Lane {
    fn new(epoch: u64) -> Self {
        Lane {
            epoch,
            in_flight: BTreeSet::new(),
            parked: BTreeMap::new(),
            next: None,
            stored: -1,
            committed: -1,
        }
    }

    /// Record `offset` arrived: it is in flight until finished.
    fn begin(&mut self, offset: i64) {
        self.in_flight.insert(offset);
        self.next = Some(self.next.unwrap_or(0).max(offset + 1));
    }

    /// The offset every record below which is finished: the oldest in flight, or one past the
    /// newest dispatched. `None` before anything was dispatched.
    fn committable(&self) -> Option<i64> {
        let next = self.next?;
        Some(self.in_flight.first().copied().unwrap_or(next))
    }

    /// The offset to store now, if it is past what is stored.
    fn to_store(&self) -> Option<i64> {
        self.committable().filter(|&c| c > self.stored)
    }

    /// Record `offset` finished; its permit is parked until a commit passes it (with
    /// `release_when_stored`, until the store does: librdkafka commits the stored offset on its
    /// interval, and the loop does not wait for confirmations). Returns the offset to store.
    fn finish(
        &mut self,
        offset: i64,
        permit: OwnedSemaphorePermit,
        release_when_stored: bool,
    ) -> Option<i64> {
        self.in_flight.remove(&offset);
        if offset >= self.committed {
            self.parked.insert(offset, permit);
        }
        // else: fetched again below the committed offset; the permit goes back now (dropped).
        if release_when_stored && let Some(committable) = self.committable() {
            self.parked = self.parked.split_off(&committable);
        }
        self.to_store()
    }

    /// `offset` was stored.
    fn stored(&mut self, offset: i64) {
        self.stored = self.stored.max(offset);
    }

    /// A commit of `offset` was confirmed: every permit below it goes back, and nothing below
    /// it is ever stored again.
    fn confirmed(&mut self, offset: i64) {
        if offset > self.committed {
            self.committed = offset;
            self.stored = self.stored.max(offset);
            self.parked = self.parked.split_off(&offset);
        }
    }

    /// The stored offset, if a commit has yet to confirm it.
    fn uncommitted(&self) -> Option<i64> {
        (self.stored > self.committed).then_some(self.stored)
    }
}

/// Per-partition offset tracking, shared by the dispatcher, the tasks and the rebalance callback.
#[derive(Debug, Default)]
pub(crate) struct Offsets {
    lanes: Mutex<HashMap<(String, i32), Lane>>,
    epochs: AtomicU64,
    /// Commit after every store (through `commit::commit_loop`) rather than on librdkafka's
    /// interval, and keep permits until the commit is confirmed.
    pub(crate) commit_each_store: bool,
    /// Wakes the committer after a store.
    pub(crate) stored: tokio::sync::Notify,
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

impl Offsets {
    pub(crate) fn new(commit_each_store: bool) -> Self {
        Offsets {
            commit_each_store,
            ..Offsets::default()
        }
    }

    fn lanes(&self) -> std::sync::MutexGuard<'_, HashMap<(String, i32), Lane>> {
        self.lanes.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn assign(&self, tpl: &TopicPartitionList) {
        debug!(partitions = tpl.count(), "partitions assigned");
        let mut lanes = self.lanes();
        for e in tpl.elements() {
            let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
            lanes.insert((e.topic().to_owned(), e.partition()), Lane::new(epoch));
        }
    }

    pub(crate) fn revoke(&self, tpl: &TopicPartitionList) {
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
                lane.begin(msg.offset());
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

    /// Marks the ticket's record finished and stores the partition's offset if it moved.
    pub(crate) fn finish<C: ConsumerContext>(
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
        if let Some(offset) = lane.finish(ticket.offset, permit, !self.commit_each_store) {
            self.store(lane, &ticket.topic, ticket.partition, offset, consumer);
        }
    }

    /// Stores `offset` for the lane's partition and wakes the committer. Called under the lanes
    /// lock, so stores of one partition happen in increasing order. A refused store is left for
    /// [`Offsets::store_left_behind`].
    fn store<C: ConsumerContext>(
        &self,
        lane: &mut Lane,
        topic: &str,
        partition: i32,
        offset: i64,
        consumer: &StreamConsumer<C>,
    ) {
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(topic, partition, Offset::Offset(offset))
            .is_err()
        {
            return;
        }
        match consumer.store_offsets(&tpl) {
            Ok(()) => {
                debug!(%topic, partition, offset, "offset stored");
                lane.stored(offset);
                if self.commit_each_store {
                    self.stored.notify_one();
                }
            }
            Err(error) => debug!(%topic, partition, %error, "offset not stored"),
        }
    }

    /// Stores again what a refused store left behind. librdkafka refuses stores while a
    /// partition's state is in flux (around a broker restart); the records behind such a store
    /// keep their permits parked, and once every permit is parked no record finishes to store
    /// again: without this sweep the consumer would stop for good.
    pub(crate) fn store_left_behind<C: ConsumerContext>(&self, consumer: &StreamConsumer<C>) {
        let mut lanes = self.lanes();
        for ((topic, partition), lane) in lanes.iter_mut() {
            if let Some(offset) = lane.to_store() {
                self.store(lane, topic, *partition, offset, consumer);
            }
        }
    }

    /// Stored offsets not yet committed, as a commit request.
    pub(crate) fn pending(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), lane) in self.lanes().iter() {
            if let Some(stored) = lane.uncommitted() {
                let _ = tpl.add_partition_offset(topic, *partition, Offset::Offset(stored));
            }
        }
        tpl
    }

    /// A confirmed commit (this path's own, or one answered through librdkafka's commit
    /// callback: an auto-commit of the stored offsets, or the commit on revoke) gives back the
    /// permits of the records it covers. It names no epoch; a confirmed offset is committed on
    /// the broker whichever assignment the lane now belongs to, and every record below it is
    /// finished.
    pub(crate) fn confirmed(&self, tpl: &TopicPartitionList) {
        let mut lanes = self.lanes();
        for e in tpl.elements() {
            let Offset::Offset(offset) = e.offset() else {
                continue;
            };
            if e.error().is_err() {
                continue;
            }
            if let Some(lane) = lanes.get_mut(&(e.topic().to_owned(), e.partition())) {
                lane.confirmed(offset);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::sync::Semaphore;

    use super::*;

    /// A lane with records `offsets` dispatched, and the semaphore their permits came from.
    fn dispatched(offsets: &[i64]) -> (Lane, Arc<Semaphore>, Vec<OwnedSemaphorePermit>) {
        let permits = Arc::new(Semaphore::new(16));
        let mut lane = Lane::new(1);
        let taken = offsets
            .iter()
            .map(|&o| {
                lane.begin(o);
                permits.clone().try_acquire_owned().unwrap()
            })
            .collect();
        (lane, permits, taken)
    }

    #[test]
    fn nothing_is_stored_before_a_record_is_dispatched() {
        let lane = Lane::new(1);
        assert_eq!(lane.committable(), None);
        assert_eq!(lane.to_store(), None);
    }

    #[test]
    fn an_offset_is_stored_only_when_every_earlier_record_is_finished() {
        let (mut lane, _, mut permits) = dispatched(&[10, 11, 12]);
        let p12 = permits.pop().unwrap();
        let p11 = permits.pop().unwrap();
        let p10 = permits.pop().unwrap();
        // 11 and 12 finish behind 10: nothing may be stored past 10.
        assert_eq!(lane.finish(12, p12, false), Some(10));
        lane.stored(10);
        assert_eq!(lane.finish(11, p11, false), None);
        // 10 finishes: everything up to one past 12.
        assert_eq!(lane.finish(10, p10, false), Some(13));
        lane.stored(13);
        assert_eq!(lane.to_store(), None);
    }

    #[test]
    fn permits_come_back_only_when_a_confirmed_commit_passes_their_records() {
        let (mut lane, permits, taken) = dispatched(&[0, 1, 2, 3]);
        assert_eq!(permits.available_permits(), 12);
        for (offset, permit) in (0..).zip(taken) {
            lane.finish(offset, permit, false);
        }
        lane.stored(4);
        // Finished and stored, but not committed: the bound still counts them.
        assert_eq!(permits.available_permits(), 12);
        assert_eq!(lane.uncommitted(), Some(4));
        lane.confirmed(2);
        assert_eq!(
            permits.available_permits(),
            14,
            "records 0 and 1 are committed"
        );
        lane.confirmed(4);
        assert_eq!(permits.available_permits(), 16);
        assert_eq!(lane.uncommitted(), None);
    }

    #[test]
    fn with_a_commit_interval_permits_come_back_when_stored() {
        let (mut lane, permits, mut taken) = dispatched(&[0, 1]);
        let p1 = taken.pop().unwrap();
        let p0 = taken.pop().unwrap();
        lane.finish(1, p1, true);
        assert_eq!(permits.available_permits(), 14, "1 waits behind 0");
        lane.finish(0, p0, true);
        assert_eq!(permits.available_permits(), 16);
    }

    #[test]
    fn a_record_fetched_again_below_the_committed_offset_gives_its_permit_back_at_once() {
        let (mut lane, permits, mut taken) = dispatched(&[5, 6]);
        let p6 = taken.pop().unwrap();
        let p5 = taken.pop().unwrap();
        lane.finish(5, p5, false);
        lane.finish(6, p6, false);
        lane.stored(7);
        lane.confirmed(7);
        assert_eq!(permits.available_permits(), 16);
        // After a broker restart the fetch position moved back: 5 arrives again.
        lane.begin(5);
        let again = permits.clone().try_acquire_owned().unwrap();
        assert_eq!(
            lane.finish(5, again, false),
            None,
            "nothing below the commit is stored"
        );
        assert_eq!(permits.available_permits(), 16);
    }

    #[test]
    fn a_confirmation_never_moves_the_offsets_back() {
        let (mut lane, _, taken) = dispatched(&[0, 1, 2]);
        for (offset, permit) in (0..).zip(taken) {
            lane.finish(offset, permit, false);
        }
        lane.stored(3);
        lane.confirmed(3);
        lane.confirmed(1);
        assert_eq!((lane.committed, lane.stored), (3, 3));
        // A commit confirmed past what this instance stored (e.g. the one on revoke, or another
        // path's auto-commit) raises the stored offset too: never store below the broker's.
        lane.confirmed(9);
        assert_eq!((lane.committed, lane.stored), (9, 9));
        assert_eq!(lane.uncommitted(), None);
    }

    #[test]
    fn a_refused_store_is_offered_again() {
        let (mut lane, _, mut taken) = dispatched(&[0]);
        assert_eq!(lane.finish(0, taken.pop().unwrap(), false), Some(1));
        // The store was refused: `stored` was not called, so the sweep finds it.
        assert_eq!(lane.to_store(), Some(1));
        lane.stored(1);
        assert_eq!(lane.to_store(), None);
    }
}
