//! The soak's books: which (event, hook) pairs are owed, and what the receiver got for each.
//!
//! A pair is owed once the producer answered `202` for the event: every hook of the event's
//! project owes one delivery. The receiver may see a delivery before the driver has read the
//! `202` (the consumer can be faster than the HTTP answer), so both sides are recorded as they
//! come and joined incrementally: `missing` is exact at any moment, in O(1).
//!
//! What each request carried is checked against the plan, not merely counted: the body's
//! `build_id` and `build_status` must be the planned transition's for the event id in its
//! header (a wrong body under the right event id is counted), and the first deliveries of one
//! build to one hook must follow the build's transitions in the order they were posted (the
//! feed posts a build's next transition only once its previous one was accepted, so that is
//! also their order on Kafka): a first delivery of an earlier transition after a later one is
//! a regression.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use uuid::Uuid;

/// A hook of the soak's world, by its position: the receiver serves hook `slot` at `/h/<slot>`.
pub type Slot = u32;

/// One planned transition: its build, the status posted, and its place among the build's
/// transitions (0 for the first posted).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Planned {
    pub build: i64,
    pub status: &'static str,
    pub seq: u32,
}

/// What the receiver read from a request's body: the build and status it describes, or
/// nothing when it is not a Job Hook it can read.
pub type BodyFacts<'a> = Option<(i64, &'a str)>;

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
    /// Requests without a readable `X-Gitlab-Event-UUID`, or whose body is not a Job Hook
    /// with a `build_id` and a `build_status`.
    pub unreadable: u64,
    /// Requests whose body's `build_id` or `build_status` is not the planned transition's for
    /// the event id in their header.
    pub wrong_bodies: u64,
    /// Requests whose Standard Webhooks signature does not verify with their hook's secret.
    pub bad_signatures: u64,
    /// First deliveries of a build's transition to a hook after a later transition of the
    /// same build reached that hook (duplicates of an earlier transition are not counted here).
    pub regressions: u64,
    /// Planned transitions the producer never accepted.
    pub unaccepted: u64,
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
    /// The feed's plan by event id.
    planned: HashMap<Uuid, Planned>,
    wrong_bodies: u64,
    bad_signatures: u64,
    /// For each (hook, build), the `seq` of each transition at its first 2xx delivery, in
    /// arrival order.
    first_deliveries: HashMap<(Slot, i64), Vec<u32>>,
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

    /// The feed's plan: every transition it will post, by event id.
    pub fn plan(&mut self, planned: impl IntoIterator<Item = (Uuid, Planned)>) {
        self.planned.extend(planned);
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
    /// `epoch` names the disruption in force (see [`Ledger::duplicates_by_epoch`]); `body` is
    /// what its body describes, `signed` whether its signature verified.
    #[allow(clippy::too_many_arguments)]
    pub fn request(
        &mut self,
        event: Uuid,
        slot: Slot,
        key: Option<Uuid>,
        ok: bool,
        epoch: usize,
        body: BodyFacts<'_>,
        signed: bool,
    ) {
        let owed = self.owes(event, slot);
        if !signed {
            self.bad_signatures += 1;
        }
        let planned = self.planned.get(&event);
        match (body, planned) {
            (None, _) => self.unreadable += 1,
            (Some((build, status)), Some(p)) if build != p.build || status != p.status => {
                self.wrong_bodies += 1;
            }
            // Right, or an event nobody planned (counted as unexpected once delivered).
            _ => {}
        }
        let first_of_build = planned.map(|p| (p.build, p.seq));
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
            if let Some((build, seq)) = first_of_build {
                self.first_deliveries
                    .entry((slot, build))
                    .or_default()
                    .push(seq);
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
        let regressions = self
            .first_deliveries
            .values()
            .map(|seqs| {
                let mut latest = None;
                let mut behind = 0;
                for &seq in seqs {
                    if latest.is_some_and(|l| seq < l) {
                        behind += 1;
                    }
                    latest = latest.max(Some(seq));
                }
                behind
            })
            .sum();
        Counts {
            owed: self.owed,
            delivered: self.delivered,
            missing: self.missing(),
            duplicates: self.duplicates,
            refused_by_receiver: self.refused,
            unexpected,
            key_mismatches: self.key_mismatches,
            unreadable: self.unreadable,
            wrong_bodies: self.wrong_bodies,
            bad_signatures: self.bad_signatures,
            regressions,
            unaccepted: (self.planned.len() as u64).saturating_sub(self.accepted.len() as u64),
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

    /// A body that passes for an event the tests did not plan.
    const BODY: BodyFacts<'static> = Some((1, "created"));

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
        l.request(id(1), 0, Some(id(10)), true, 0, BODY, true);
        l.request(id(2), 2, Some(id(20)), true, 0, BODY, true);
        assert_eq!(l.missing(), 1);
        assert_eq!(l.missing_pairs(10), vec![format!("{}/1", id(1))]);
    }

    #[test]
    fn a_delivery_that_arrives_before_the_202_is_counted_once_the_event_is_accepted() {
        let mut l = ledger();
        l.request(id(1), 0, Some(id(10)), true, 0, BODY, true);
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
        l.request(id(1), 2, Some(id(10)), false, 0, BODY, true);
        assert_eq!(l.missing(), 1);
        l.request(id(1), 2, Some(id(10)), true, 1, BODY, true);
        l.request(id(1), 2, Some(id(10)), true, 3, BODY, true);
        l.request(id(1), 2, Some(id(10)), true, 3, BODY, true);
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
        l.request(id(1), 0, Some(id(10)), true, 0, BODY, true);
        l.request(id(1), 0, Some(id(11)), true, 0, BODY, true);
        l.request(id(1), 2, Some(id(12)), true, 0, BODY, true);
        let c = l.counts();
        assert_eq!((c.key_mismatches, c.unexpected, c.delivered), (1, 1, 1));
    }

    fn planned(build: i64, status: &'static str, seq: u32) -> Planned {
        Planned { build, status, seq }
    }

    #[test]
    fn a_wrong_body_under_the_right_event_id_a_bad_signature_and_an_unreadable_body_are_counted() {
        let mut l = ledger();
        l.plan([(id(1), planned(7, "running", 2))]);
        l.accept(id(1), 1, 0);
        l.request(id(1), 2, Some(id(10)), true, 0, Some((7, "running")), true);
        // The same event id, another transition's body: delivered, and wrong.
        l.request(id(1), 2, Some(id(10)), true, 0, Some((7, "success")), true);
        l.request(id(1), 2, Some(id(10)), true, 0, Some((8, "running")), true);
        l.request(id(1), 2, Some(id(10)), true, 0, None, false);
        let c = l.counts();
        assert_eq!((c.wrong_bodies, c.unreadable, c.bad_signatures), (2, 1, 1));
        assert_eq!((c.delivered, c.missing, c.duplicates), (1, 0, 3));
    }

    #[test]
    fn a_build_seen_going_back_by_a_first_delivery_is_a_regression_a_repeat_is_not() {
        let mut l = ledger();
        let statuses = ["created", "pending", "running", "success"];
        l.plan((0..4).map(|n| (id(n), planned(7, statuses[n as usize], n as u32))));
        l.plan((10..12).map(|n| {
            (
                id(n),
                planned(8, statuses[(n - 10) as usize], (n - 10) as u32),
            )
        }));
        for n in (0..4).chain(10..12) {
            l.accept(id(n), if n < 10 { 0 } else { 1 }, 0);
        }
        // Hook 0: created, running, pending (back), success; then running again (a repeat).
        for (n, status) in [
            (0, "created"),
            (2, "running"),
            (1, "pending"),
            (3, "success"),
            (2, "running"),
        ] {
            l.request(
                id(n),
                0,
                Some(id(100 + n)),
                true,
                0,
                Some((7, status)),
                true,
            );
        }
        // Hook 1: in order.
        for (n, status) in [
            (0, "created"),
            (1, "pending"),
            (2, "running"),
            (3, "success"),
        ] {
            l.request(
                id(n),
                1,
                Some(id(200 + n)),
                true,
                0,
                Some((7, status)),
                true,
            );
        }
        // Hook 2 (the other project): created refused, pending delivered, then created's retry:
        // the build went back, as a retry outside the order does.
        l.request(
            id(10),
            2,
            Some(id(300)),
            false,
            0,
            Some((8, "created")),
            true,
        );
        l.request(
            id(11),
            2,
            Some(id(301)),
            true,
            0,
            Some((8, "pending")),
            true,
        );
        l.request(
            id(10),
            2,
            Some(id(300)),
            true,
            0,
            Some((8, "created")),
            true,
        );
        let c = l.counts();
        assert_eq!(c.regressions, 2, "pending on hook 0, created on hook 2");
        assert_eq!((c.duplicates, c.wrong_bodies, c.unaccepted), (1, 0, 0));
    }

    #[test]
    fn planned_transitions_never_accepted_are_counted() {
        let mut l = ledger();
        l.plan([
            (id(1), planned(7, "created", 0)),
            (id(2), planned(7, "pending", 1)),
        ]);
        l.accept(id(1), 0, 0);
        assert_eq!(l.counts().unaccepted, 1);
        l.accept(id(2), 0, 0);
        assert_eq!(l.counts().unaccepted, 0);
    }
}
