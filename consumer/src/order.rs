//! Per-(hook, build) order across retries: the pure rules.
//!
//! # What strict ordering promises
//!
//! A receiver never sees a build go backwards. Once a delivery of (hook, build) waits for a
//! retry, the build's later events for that hook are not attempted ahead of it: they queue
//! behind it and go out in transition order once it is delivered, dead-lettered or collapsed.
//! Other builds and other hooks never wait for it.
//!
//! # Where the queue lives
//!
//! Whose turn it is lives in PostgreSQL, table `delivery_order`: one row per delivery that
//! waits for a retry or is queued behind one, ordered by the transition's time (ties by
//! arrival). A row is written before the delivery's retry record, and marked settled after the
//! delivery ends, so the queue survives crashes and rebalances and is the same for every
//! instance (the main path of a build and its retry path can run on different instances).
//! Settled rows are kept a day, so a record read again after a crash is recognised as done and
//! not sent behind the build's later events. Builds whose deliveries never fail write nothing.
//!
//! The first delivery of a queue travels on the retry topic with its own due time, as any
//! retry. The ones behind it do not wait in a consumer: a queued record that is not at its turn
//! is parked on its row (headers and body) and its offset is done, so waiting costs neither an
//! in-flight slot nor a held offset. When a row is settled, the instance that settled it writes
//! the record parked next back to the retry topic, due now; a periodic sweep does it for queues
//! whose settler stopped first. Holding waiters in memory instead (an earlier design) filled
//! the retry path's slots under a mass failure with records that could not go, while the heads
//! that would have moved them waited for a slot: thousands of queues drained one hold period
//! at a time.
//!
//! This module decides, from a (hook, build)'s queue, what to do with one delivery ([`turn`]);
//! `strict` carries it out.

use chrono::{DateTime, Utc};
use hookline_cistate::OrderEntry;
use uuid::Uuid;

/// `--ordering`: whether a build's later events wait behind its delivery waiting for a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Ordering {
    /// Later events queue behind a delivery waiting for a retry (per hook and build). The
    /// default: queued events wait parked in PostgreSQL, not in the retry path's in-flight slots,
    /// so a mass failure drains as fast as under relaxed ordering (docs/guarantees.md, "Ordering").
    #[default]
    Strict,
    /// Retries leave the order: later events go ahead of a delivery waiting for a retry.
    Relaxed,
}

impl std::str::FromStr for Ordering {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(Ordering::Strict),
            "relaxed" => Ok(Ordering::Relaxed),
            other => Err(format!(
                "unknown ordering {other:?}: expected strict or relaxed"
            )),
        }
    }
}

impl std::fmt::Display for Ordering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Ordering::Strict => "strict",
            Ordering::Relaxed => "relaxed",
        })
    }
}

/// Which path a delivery is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// A new event from the main topic.
    Main,
    /// A record of the retry topic that is due.
    Retry,
}

/// What to do with one delivery of (hook, build), given that pair's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Turn {
    /// Nothing of this build waits ahead of it: attempt it now.
    Go,
    /// An earlier delivery of this build waits for a retry: queue behind it (written to the
    /// queue, then to the retry topic).
    Queue,
    /// It is queued and earlier ones are still waiting: not its turn yet.
    Wait,
    /// Its turn, but a later event of the build is queued behind it and the hook only wants
    /// the latest state: settle it without sending.
    Collapse,
    /// It already went out (or was dead-lettered or collapsed): a record read again after a
    /// crash or a rebalance. Sending it now would take the build backwards.
    AlreadySettled,
}

/// The turn of the delivery of `event_id` (transition at `occurred_at`), given its (hook,
/// build)'s queue `entries` in order.
pub fn turn(
    entries: &[OrderEntry],
    event_id: Uuid,
    occurred_at: DateTime<Utc>,
    collapse: bool,
    side: Side,
) -> Turn {
    let mut pending = entries.iter().filter(|e| !e.settled);
    let head = pending.next();
    let behind_head = pending.count();
    if let Some(mine) = entries.iter().find(|e| e.event_id == event_id) {
        return if mine.settled {
            Turn::AlreadySettled
        } else if head.is_some_and(|h| h.event_id == event_id) {
            if collapse && behind_head > 0 {
                Turn::Collapse
            } else {
                Turn::Go
            }
        } else {
            Turn::Wait
        };
    }
    match side {
        // Not queued: a retry written under relaxed ordering (or settled so long ago that its
        // entry was pruned). It holds nothing. (Replays from the dead-letter topic never get
        // here: they are outside the order.)
        Side::Retry => Turn::Go,
        Side::Main => {
            // The main path takes a build's events in transition order, and an event enters the
            // queue only by failing or by arriving while an earlier one waits. So one that is
            // not in the queue but older than its head or a settled entry went out before them:
            // it is a record read again (its offset was not stored before a crash).
            let older_than_queued = entries
                .iter()
                .filter(|e| e.settled || head.is_some_and(|h| h.event_id == e.event_id))
                .any(|e| e.occurred_at > occurred_at);
            if older_than_queued {
                Turn::AlreadySettled
            } else if head.is_some() {
                Turn::Queue
            } else {
                Turn::Go
            }
        }
    }
}

/// The events queued behind `event_id` (pending, later in the queue): named in its dead letter,
/// since they go out after it.
pub fn followers(entries: &[OrderEntry], event_id: Uuid) -> Vec<Uuid> {
    entries
        .iter()
        .skip_while(|e| e.event_id != event_id)
        .skip(1)
        .filter(|e| !e.settled)
        .map(|e| e.event_id)
        .collect()
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + s, 0).unwrap()
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn entry(n: u128, settled: bool) -> OrderEntry {
        OrderEntry {
            event_id: id(n),
            occurred_at: at(n as i64),
            seq: n as i64,
            settled,
        }
    }

    #[test]
    fn with_nothing_held_every_event_goes() {
        assert_eq!(turn(&[], id(1), at(1), false, Side::Main), Turn::Go);
        assert_eq!(turn(&[], id(1), at(1), false, Side::Retry), Turn::Go);
    }

    #[test]
    fn a_later_event_queues_behind_a_held_delivery_and_waits_for_its_turn() {
        let held = [entry(3, false)];
        assert_eq!(turn(&held, id(4), at(4), false, Side::Main), Turn::Queue);
        let queued = [entry(3, false), entry(4, false)];
        assert_eq!(turn(&queued, id(3), at(3), false, Side::Retry), Turn::Go);
        assert_eq!(turn(&queued, id(4), at(4), false, Side::Retry), Turn::Wait);
        // Read again on the main path (crash before its offset was stored): still waits.
        assert_eq!(turn(&queued, id(4), at(4), false, Side::Main), Turn::Wait);
    }

    #[test]
    fn the_queue_moves_on_once_the_head_is_settled() {
        let q = [entry(3, true), entry(4, false), entry(5, false)];
        assert_eq!(turn(&q, id(4), at(4), false, Side::Retry), Turn::Go);
        assert_eq!(turn(&q, id(5), at(5), false, Side::Retry), Turn::Wait);
        // A new event once everything went out: nothing holds it.
        let done = [entry(3, true), entry(4, true)];
        assert_eq!(turn(&done, id(6), at(6), false, Side::Main), Turn::Go);
    }

    #[test]
    fn a_settled_delivery_read_again_is_not_sent_again() {
        let q = [entry(3, true), entry(4, false)];
        assert_eq!(
            turn(&q, id(3), at(3), false, Side::Retry),
            Turn::AlreadySettled
        );
        assert_eq!(
            turn(&q, id(3), at(3), false, Side::Main),
            Turn::AlreadySettled
        );
    }

    #[test]
    fn an_older_event_read_again_on_the_main_path_does_not_go_behind_newer_ones() {
        // created (1) and pending (2) went out directly; running (3) failed and is held.
        let held = [entry(3, false)];
        assert_eq!(
            turn(&held, id(2), at(2), false, Side::Main),
            Turn::AlreadySettled
        );
        let settled = [entry(3, true)];
        assert_eq!(
            turn(&settled, id(1), at(1), false, Side::Main),
            Turn::AlreadySettled
        );
    }

    #[test]
    fn retries_outside_the_queue_are_not_held() {
        let held = [entry(3, false)];
        assert_eq!(turn(&held, id(9), at(9), false, Side::Retry), Turn::Go);
    }

    #[test]
    fn a_collapsing_hook_sends_only_the_latest_of_the_queue() {
        let q = [entry(3, false), entry(4, false), entry(5, false)];
        assert_eq!(turn(&q, id(3), at(3), true, Side::Retry), Turn::Collapse);
        let q = [entry(3, true), entry(4, true), entry(5, false)];
        assert_eq!(turn(&q, id(5), at(5), true, Side::Retry), Turn::Go);
        // Without the option every one goes, in order.
        let q = [entry(3, false), entry(4, false)];
        assert_eq!(turn(&q, id(3), at(3), false, Side::Retry), Turn::Go);
    }

    #[test]
    fn followers_are_the_pending_events_behind_one() {
        let q = [
            entry(3, false),
            entry(4, true),
            entry(5, false),
            entry(6, false),
        ];
        assert_eq!(followers(&q, id(3)), vec![id(5), id(6)]);
        assert!(followers(&q, id(6)).is_empty());
        assert!(followers(&q, id(9)).is_empty());
    }

    #[test]
    fn ordering_parses_its_two_names() {
        assert_eq!("strict".parse::<Ordering>(), Ok(Ordering::Strict));
        assert_eq!("relaxed".parse::<Ordering>(), Ok(Ordering::Relaxed));
        assert!("loose".parse::<Ordering>().is_err());
        // Strict by default: a receiver never sees a build go backwards unless it opts out.
        assert_eq!(Ordering::default().to_string(), "strict");
    }
}
