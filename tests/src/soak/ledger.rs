//! The soak's books: which (event, hook) pairs are owed, and what the receiver got for each.
//!
//! A pair is owed once the producer answered `202` for the event: every hook of the event's
//! project owes one delivery. The receiver may see a delivery before the driver has read the
//! `202` (the consumer can be faster than the HTTP answer), so both sides are recorded as they
//! come and joined incrementally: `missing` is exact at any moment, in O(1).

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use uuid::Uuid;

/// A hook of the soak's world, by its position: the receiver serves hook `slot` at `/h/<slot>`.
pub type Slot = u32;

/// What the receiver saw for one (event, hook) pair.
#[derive(Debug, Default, Clone)]
struct PairTally {
    /// Requests answered 2xx.
    delivered: u32,
    /// Requests answered 503 (the outage).
    refused: u32,
    /// The `Idempotency-Key` of the first request; every later one must carry the same.
    key: Option<Uuid>,
}

/// The counts the soak reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    /// (event, hook) pairs owed: accepted events × hooks of their project.
    pub owed: u64,
    /// Owed pairs delivered at least once.
    pub delivered: u64,
    pub missing: u64,
    /// Deliveries beyond the first of a pair (at-least-once allows them; they are counted).
    pub duplicates: u64,
    /// Requests the receiver answered 503 during the outage.
    pub refused_by_receiver: u64,
    /// Pairs delivered that nobody owes (an event never accepted, or a hook not of its project).
    pub unexpected: u64,
    /// Requests whose `Idempotency-Key` differs from the pair's first one.
    pub key_mismatches: u64,
    /// Requests without a readable `X-Gitlab-Event-UUID`.
    pub unreadable: u64,
}

/// Owed pairs and deliveries, joined as they arrive.
#[derive(Debug, Default)]
pub struct Ledger {
    /// Hook slots of each project (index = project).
    slots_of: Vec<Vec<Slot>>,
    /// The project of each hook slot.
    project_of_slot: HashMap<Slot, u32>,
    /// Accepted events: their project and Kafka partition.
    accepted: HashMap<Uuid, (u32, i32)>,
    pairs: HashMap<(Uuid, Slot), PairTally>,
    owed: u64,
    delivered: u64,
    duplicates: u64,
    refused: u64,
    key_mismatches: u64,
    unreadable: u64,
    /// Duplicates by the disruption in force when they arrived (0 = before the first one).
    duplicates_by_epoch: Vec<u64>,
    /// Every duplicate: when it arrived and its event (for the per-kill, per-partition view).
    duplicate_log: Vec<(Instant, Uuid)>,
    /// Duplicates by hook.
    duplicates_by_slot: HashMap<Slot, u64>,
}

impl Ledger {
    /// A ledger for projects whose hooks are `slots_of[project]`.
    pub fn new(slots_of: Vec<Vec<Slot>>) -> Ledger {
        let project_of_slot = slots_of
            .iter()
            .enumerate()
            .flat_map(|(p, slots)| slots.iter().map(move |&s| (s, p as u32)))
            .collect();
        Ledger {
            slots_of,
            project_of_slot,
            ..Ledger::default()
        }
    }

    /// The producer accepted `event` (202) for `project`, on Kafka `partition`: each of the
    /// project's hooks is owed a delivery. Accepting the same event again (a retried post) owes
    /// nothing more.
    pub fn accept(&mut self, event: Uuid, project: u32, partition: i32) {
        if self.accepted.insert(event, (project, partition)).is_some() {
            return;
        }
        let slots = self
            .slots_of
            .get(project as usize)
            .cloned()
            .unwrap_or_default();
        for slot in slots {
            self.owed += 1;
            if self
                .pairs
                .get(&(event, slot))
                .is_some_and(|t| t.delivered > 0)
            {
                self.delivered += 1;
            }
        }
    }

    fn owes(&self, event: Uuid, slot: Slot) -> bool {
        matches!(
            (self.accepted.get(&event), self.project_of_slot.get(&slot)),
            (Some((a, _)), Some(b)) if a == b
        )
    }

    /// One request at the receiver: `ok` when it was answered 2xx, else it was refused (503).
    /// `epoch` names the disruption in force (see [`Ledger::duplicates_by_epoch`]).
    pub fn request(&mut self, event: Uuid, slot: Slot, key: Option<Uuid>, ok: bool, epoch: usize) {
        let owed = self.owes(event, slot);
        let tally = self.pairs.entry((event, slot)).or_default();
        match (tally.key, key) {
            (None, key) => tally.key = key,
            (Some(first), Some(key)) if first != key => self.key_mismatches += 1,
            (Some(_), None) => self.key_mismatches += 1,
            _ => {}
        }
        if !ok {
            tally.refused += 1;
            self.refused += 1;
            return;
        }
        tally.delivered += 1;
        if tally.delivered == 1 {
            if owed {
                self.delivered += 1;
            }
        } else {
            self.duplicates += 1;
            if self.duplicates_by_epoch.len() <= epoch {
                self.duplicates_by_epoch.resize(epoch + 1, 0);
            }
            self.duplicates_by_epoch[epoch] += 1;
            self.duplicate_log.push((Instant::now(), event));
            *self.duplicates_by_slot.entry(slot).or_default() += 1;
        }
    }

    /// A request the receiver could not attribute (no event id header, or no such slot).
    pub fn unreadable(&mut self) {
        self.unreadable += 1;
    }

    pub fn missing(&self) -> u64 {
        self.owed - self.delivered
    }

    pub fn counts(&self) -> Counts {
        let unexpected = self
            .pairs
            .iter()
            .filter(|((event, slot), t)| t.delivered > 0 && !self.owes(*event, *slot))
            .count() as u64;
        Counts {
            owed: self.owed,
            delivered: self.delivered,
            missing: self.missing(),
            duplicates: self.duplicates,
            refused_by_receiver: self.refused,
            unexpected,
            key_mismatches: self.key_mismatches,
            unreadable: self.unreadable,
        }
    }

    /// Up to `limit` owed pairs never delivered, as `event/slot`, in a stable order.
    pub fn missing_pairs(&self, limit: usize) -> Vec<String> {
        let mut out: Vec<(Uuid, Slot)> = Vec::new();
        for (&event, &(project, _)) in &self.accepted {
            for &slot in &self.slots_of[project as usize] {
                if self
                    .pairs
                    .get(&(event, slot))
                    .is_none_or(|t| t.delivered == 0)
                {
                    out.push((event, slot));
                }
            }
        }
        out.sort_unstable();
        out.into_iter()
            .take(limit)
            .map(|(e, s)| format!("{e}/{s}"))
            .collect()
    }

    /// Duplicates by the disruption in force when they arrived: index 0 is before the first
    /// disruption, index i the i-th one.
    pub fn duplicates_by_epoch(&self, epochs: usize) -> Vec<u64> {
        let mut out = self.duplicates_by_epoch.clone();
        out.resize(epochs.max(out.len()), 0);
        out
    }

    /// Duplicates that arrived from `from` to `to`, by the Kafka partition of their event
    /// (-1: unknown).
    pub fn duplicates_between(&self, from: Instant, to: Instant) -> BTreeMap<i32, u64> {
        let mut out = BTreeMap::new();
        for (_, event) in self
            .duplicate_log
            .iter()
            .filter(|(at, _)| *at >= from && *at <= to)
        {
            let partition = self.accepted.get(event).map_or(-1, |(_, p)| *p);
            *out.entry(partition).or_default() += 1;
        }
        out
    }

    /// Duplicates delivered to the hooks `pick` selects.
    pub fn duplicates_to(&self, pick: impl Fn(Slot) -> bool) -> u64 {
        self.duplicates_by_slot
            .iter()
            .filter(|(slot, _)| pick(**slot))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn accepted(&self) -> usize {
        self.accepted.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    /// Two projects: project 0 has hooks 0 and 1, project 1 has hook 2.
    fn ledger() -> Ledger {
        Ledger::new(vec![vec![0, 1], vec![2]])
    }

    #[test]
    fn an_accepted_event_owes_one_delivery_per_hook_of_its_project() {
        let mut l = ledger();
        l.accept(id(1), 0, 0);
        l.accept(id(2), 1, 1);
        assert_eq!(l.counts().owed, 3);
        assert_eq!(l.missing(), 3);
        l.request(id(1), 0, Some(id(10)), true, 0);
        l.request(id(2), 2, Some(id(20)), true, 0);
        assert_eq!(l.missing(), 1);
        assert_eq!(l.missing_pairs(10), vec![format!("{}/1", id(1))]);
    }

    #[test]
    fn a_delivery_that_arrives_before_the_202_is_counted_once_the_event_is_accepted() {
        let mut l = ledger();
        l.request(id(1), 0, Some(id(10)), true, 0);
        assert_eq!(l.counts().unexpected, 1, "not owed yet");
        l.accept(id(1), 0, 0);
        let c = l.counts();
        assert_eq!((c.owed, c.delivered, c.missing, c.unexpected), (2, 1, 1, 0));
    }

    #[test]
    fn accepting_an_event_twice_owes_nothing_more() {
        let mut l = ledger();
        l.accept(id(1), 1, 1);
        l.accept(id(1), 1, 1);
        assert_eq!(l.counts().owed, 1);
        assert_eq!(l.accepted(), 1);
    }

    #[test]
    fn refusals_are_not_deliveries_and_duplicates_go_to_the_epoch_they_arrived_in() {
        let start = Instant::now();
        let mut l = ledger();
        l.accept(id(1), 1, 1);
        l.request(id(1), 2, Some(id(10)), false, 0);
        assert_eq!(l.missing(), 1);
        l.request(id(1), 2, Some(id(10)), true, 1);
        l.request(id(1), 2, Some(id(10)), true, 3);
        l.request(id(1), 2, Some(id(10)), true, 3);
        let c = l.counts();
        assert_eq!(
            (c.delivered, c.duplicates, c.refused_by_receiver),
            (1, 2, 1)
        );
        assert_eq!(l.duplicates_by_epoch(5), vec![0, 0, 0, 2, 0]);
        assert_eq!(l.duplicates_to(|s| s == 2), 2);
        assert_eq!(l.duplicates_to(|s| s != 2), 0);
        assert_eq!(
            l.duplicates_between(start, Instant::now()),
            BTreeMap::from([(1, 2)])
        );
    }

    #[test]
    fn a_pair_whose_key_changes_is_counted_and_a_hook_of_another_project_is_unexpected() {
        let mut l = ledger();
        l.accept(id(1), 0, 0);
        l.request(id(1), 0, Some(id(10)), true, 0);
        l.request(id(1), 0, Some(id(11)), true, 0);
        l.request(id(1), 2, Some(id(12)), true, 0);
        let c = l.counts();
        assert_eq!((c.key_mismatches, c.unexpected, c.delivered), (1, 1, 1));
    }
}
