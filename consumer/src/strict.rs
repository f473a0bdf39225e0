//! Strict ordering carried out on both paths: reading a (hook, build)'s order queue, asking
//! `order::turn` what to do, and doing it (attempt, queue behind, wait for the turn, collapse,
//! or leave a record read again).
//!
//! # The order of writes
//!
//! A crash at any point may duplicate a delivery (at-least-once allows it) but never loses one
//! nor sends a later event ahead of an earlier one:
//!
//! - A delivery enters the queue (PostgreSQL) before its retry record is written (Kafka), and is
//!   marked settled only after its delivery or dead letter is done. A crash between the two
//!   leaves it pending, so its record, read again, is attempted again and the build's later
//!   events keep waiting.
//! - A record that is not at its turn is parked on its entry (headers and body, in PostgreSQL)
//!   before its offset is done. A crash before the offset is stored reads it again: it parks
//!   again (the same record) or, if its turn came meanwhile, goes.
//! - Settling an entry and reading the parked record now first in its queue is one transaction;
//!   that record is then written back to the retry topic, due now, and only then unparked. A
//!   crash before the write leaves a parked record first in a quiet queue: the sweep
//!   ([`sweep`]) writes it back. A crash between the write and the unpark writes it twice: the
//!   second copy is attempted again or, once the first was delivered, found settled.
//! - Parking and settling take the same per-queue lock, so a record never parks unseen behind
//!   an entry being settled at that moment (it would wait for the sweep, not lose its place).
//!
//! # Reading the queue on the main path
//!
//! Most builds never have a queue, so the main path does not read one per delivery: it asks once
//! per batch which of the batch's builds have one ([`queued_pairs`]), and reads the queue only
//! for those, and for pairs this instance put in a queue since (a batch's earlier event of the
//! same build failing: `Context::held_here`). Only the main path starts queues (a retry outside
//! the order that fails again is retried without holding anything), and a build's main-topic
//! records are read by one instance at a time, so nothing else can start a queue unseen.
//!
//! # Waiting for a turn
//!
//! A queued record that is not first in its queue does not wait in memory: it is parked in
//! PostgreSQL and its offset is done, so waiting costs no in-flight slot (under a mass failure
//! thousands of queues wait at once, and waiters holding slots starved the heads that would
//! move them). Whichever instance settles the entry ahead of it writes it back to the retry
//! topic, due now; [`sweep`] does it for queues whose head was settled by an instance that
//! stopped before the write-back.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use hookline_cistate::{Hook, OrderEntry, ParkedDelivery, ParkedEntry};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::context::Context;
use crate::handoff::Landed;
use crate::metrics::Stall;
use crate::order::{self, Ordering, Side, Turn};
use crate::shutdown::{Abandoned, wait_out};
use crate::step::{self, Mode, Settlement};
use crate::task::{self, DeliveryTask};

/// How long settled queue entries are kept: long past any re-read of their records after a
/// crash (bounded by the retry hold and the commit interval).
pub const SETTLED_RETENTION: Duration = Duration::from_secs(24 * 3600);
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Forgets settled queue entries past [`SETTLED_RETENTION`] (and those of removed hooks),
/// hourly, until `stop`. Under relaxed ordering nothing is written, so nothing is pruned.
pub(crate) async fn prune(cx: std::sync::Arc<Context>, stop: CancellationToken) {
    if cx.config.ordering == Ordering::Relaxed {
        return;
    }
    let mut tick = tokio::time::interval(PRUNE_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let before = Utc::now()
            - chrono::Duration::from_std(SETTLED_RETENTION).unwrap_or(chrono::Duration::MAX);
        // Past an hour, every batch that could have missed a hold of this instance is long done.
        held_here(&cx).retain(|_, at| at.elapsed() < PRUNE_EVERY);
        match cx.store.order_prune(before).await {
            Ok(pruned) => debug!(pruned, "settled order-queue entries pruned"),
            // The next hour tries again; meanwhile the table only grows.
            Err(error) => tracing::warn!(%error, "could not prune the order queue"),
        }
    }
}

/// The (hook, build) pairs of a batch's builds that have an order queue: one read per batch
/// (none under relaxed ordering).
pub(crate) async fn queued_pairs(
    cx: &Context,
    build_ids: impl Iterator<Item = i64>,
    abandon: &CancellationToken,
) -> Result<HashSet<(i64, i64)>, Abandoned> {
    if cx.config.ordering == Ordering::Relaxed {
        return Ok(HashSet::new());
    }
    let mut build_ids: Vec<i64> = build_ids.collect();
    build_ids.sort_unstable();
    build_ids.dedup();
    let pairs = wait_out(
        &cx.metrics,
        Stall::Store,
        "store unavailable; the order queues cannot be read",
        abandon,
        || cx.store.order_queued_pairs(&build_ids),
    )
    .await?;
    Ok(pairs.into_iter().collect())
}

/// A new event's delivery on the main path. `queued`: its (hook, build) had an order queue when
/// its batch was read.
pub(crate) async fn main_step(
    cx: &Context,
    task: DeliveryTask,
    hook: &Hook,
    queued: bool,
    mode: Mode,
    abandon: &CancellationToken,
) -> Result<(), Abandoned> {
    if outside_the_order(cx, &task) {
        return step::run(cx, task, hook, mode, abandon).await;
    }
    let pair = (task.hook_id, task.build_id);
    let held_here = held_here(cx).contains_key(&pair);
    let entries = if queued || held_here {
        queue(cx, &task, abandon).await?
    } else {
        Vec::new()
    };
    match order::turn(
        &entries,
        task.event_id,
        task.occurred_at,
        hook.collapse,
        Side::Main,
    ) {
        Turn::Go => go(cx, task, hook, &entries, Side::Main, mode, abandon).await,
        turn @ (Turn::Queue | Turn::Wait) => {
            if turn == Turn::Queue {
                cx.metrics.order_action("queued");
                info!(event_id = %task.event_id, build_id = task.build_id, hook_id = hook.id, "an earlier event of this build waits for a retry; queued behind it");
            }
            enqueue(cx, task, hook, abandon).await
        }
        Turn::Collapse => collapse(cx, &task, abandon).await,
        Turn::AlreadySettled => {
            already_settled(cx, &task);
            Ok(())
        }
    }
}

/// A due record of the retry topic.
pub(crate) async fn retry_step(
    cx: &Context,
    task: DeliveryTask,
    hook: &Hook,
    mode: Mode,
    abandon: &CancellationToken,
) -> Result<(), Abandoned> {
    if outside_the_order(cx, &task) {
        return step::run(cx, task, hook, mode, abandon).await;
    }
    loop {
        let entries = queue(cx, &task, abandon).await?;
        match order::turn(
            &entries,
            task.event_id,
            task.occurred_at,
            hook.collapse,
            Side::Retry,
        ) {
            Turn::Go => return go(cx, task, hook, &entries, Side::Retry, mode, abandon).await,
            Turn::Collapse => return collapse(cx, &task, abandon).await,
            Turn::AlreadySettled => {
                already_settled(cx, &task);
                return Ok(());
            }
            Turn::Queue | Turn::Wait => {
                if park(cx, &task, abandon).await? {
                    return Ok(());
                }
                // The entry ahead was settled since the queue was read: read it again.
            }
        }
    }
}

/// Relaxed ordering, or a replay from the dead-letter topic: an operator's deliberate re-send of
/// an old event, which neither waits for the build's queue nor holds it.
fn outside_the_order(cx: &Context, task: &DeliveryTask) -> bool {
    cx.config.ordering == Ordering::Relaxed || task.replayed
}

/// Attempts a delivery whose turn it is, and keeps the queue in step with what follows. Only on
/// the main path does a failure start a queue: a retry outside the order stays outside it.
async fn go(
    cx: &Context,
    task: DeliveryTask,
    hook: &Hook,
    entries: &[OrderEntry],
    side: Side,
    mode: Mode,
    abandon: &CancellationToken,
) -> Result<(), Abandoned> {
    let queued = entries.iter().any(|e| e.event_id == task.event_id);
    let (task, settlement) = step::attempt(cx, task, hook, mode, abandon).await?;
    let mut holds = false;
    let settlement = match settlement {
        Settlement::Retry { .. } | Settlement::Deferred { .. } => {
            if !queued && side == Side::Main {
                holds = true;
                // In the queue before its retry record exists: see the module's doc.
                hold(cx, &task, abandon).await?;
                cx.metrics.order_action("held");
            }
            settlement
        }
        Settlement::DeadLetter { reason, detail } if queued => {
            // The queue as it is now: events may have joined it during the attempt.
            let followers = order::followers(&queue(cx, &task, abandon).await?, task.event_id);
            let detail = if followers.is_empty() {
                detail
            } else {
                let ids: Vec<String> = followers.iter().map(ToString::to_string).collect();
                format!(
                    "{detail}; strict ordering: {} later event(s) of this build were queued behind it and go out after it: {}",
                    followers.len(),
                    ids.join(", ")
                )
            };
            Settlement::DeadLetter { reason, detail }
        }
        other => other,
    };
    let ends = matches!(
        settlement,
        Settlement::Delivered | Settlement::DeadLetter { .. }
    );
    let (hook_id, build_id, event_id) = (task.hook_id, task.build_id, task.event_id);
    let in_queue = queued || holds;
    let landed = step::settle(cx, task, Some(hook), settlement, abandon).await?;
    // A retry Kafka refused for good ended in a dead letter: the queue moves on too.
    if in_queue && (ends || landed != Landed::AsIs) {
        settle_entry(cx, hook_id, build_id, event_id, abandon).await?;
    }
    Ok(())
}

/// Puts a delivery in the queue (if it is not there) and parks its record behind the entries
/// ahead of it; if none is pending any more, its record goes to the end of the retry topic, due
/// now, and is attempted there.
async fn enqueue(
    cx: &Context,
    task: DeliveryTask,
    hook: &Hook,
    abandon: &CancellationToken,
) -> Result<(), Abandoned> {
    hold(cx, &task, abandon).await?;
    if park(cx, &task, abandon).await? {
        return Ok(());
    }
    let landed = cx
        .handoff
        .to_retry(&task, Some(hook), Utc::now(), abandon)
        .await?;
    if landed != Landed::AsIs {
        settle_entry(cx, task.hook_id, task.build_id, task.event_id, abandon).await?;
    }
    Ok(())
}

/// Parks a queued record on its entry, if an entry ahead of it is still pending; false when it
/// is first (its turn came since the queue was read).
async fn park(
    cx: &Context,
    task: &DeliveryTask,
    abandon: &CancellationToken,
) -> Result<bool, Abandoned> {
    let delivery = ParkedDelivery {
        headers: task
            .header_pairs()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        body: task.body.to_vec(),
    };
    let parked = wait_out(
        &cx.metrics,
        Stall::Store,
        "store unavailable; a queued delivery cannot be parked",
        abandon,
        || {
            cx.store
                .order_park(task.hook_id, task.build_id, task.event_id, &delivery)
        },
    )
    .await?;
    if parked {
        cx.metrics.order_action("parked");
        debug!(event_id = %task.event_id, build_id = task.build_id, hook_id = task.hook_id, "not its turn; parked until the deliveries ahead of it are settled");
    }
    Ok(parked)
}

/// A queued delivery superseded by a later one on a hook that wants only the latest state.
async fn collapse(
    cx: &Context,
    task: &DeliveryTask,
    abandon: &CancellationToken,
) -> Result<(), Abandoned> {
    info!(event_id = %task.event_id, build_id = task.build_id, hook_id = task.hook_id, "collapsed: a later event of this build is queued behind it");
    settle_entry(cx, task.hook_id, task.build_id, task.event_id, abandon).await?;
    cx.metrics.order_action("collapsed");
    Ok(())
}

fn already_settled(cx: &Context, task: &DeliveryTask) {
    cx.metrics.order_action("already_settled");
    debug!(event_id = %task.event_id, build_id = task.build_id, hook_id = task.hook_id, "delivery already settled (a record read again); not sent again");
}

async fn queue(
    cx: &Context,
    task: &DeliveryTask,
    abandon: &CancellationToken,
) -> Result<Vec<OrderEntry>, Abandoned> {
    wait_out(
        &cx.metrics,
        Stall::Store,
        "store unavailable; the order queue cannot be read",
        abandon,
        || cx.store.order_entries(task.hook_id, task.build_id),
    )
    .await
}

fn held_here(
    cx: &Context,
) -> std::sync::MutexGuard<'_, std::collections::HashMap<(i64, i64), Instant>> {
    // A panic while holding it leaves at worst a stale entry, which only costs a read.
    cx.held_here.lock().unwrap_or_else(|p| p.into_inner())
}

async fn hold(
    cx: &Context,
    task: &DeliveryTask,
    abandon: &CancellationToken,
) -> Result<(), Abandoned> {
    held_here(cx).insert((task.hook_id, task.build_id), Instant::now());
    wait_out(
        &cx.metrics,
        Stall::Store,
        "store unavailable; the order queue cannot be written",
        abandon,
        || {
            cx.store
                .order_hold(task.hook_id, task.build_id, task.event_id, task.occurred_at)
        },
    )
    .await
}

/// Marks a delivery of its queue settled and writes the record parked next, if any, back to
/// the retry topic (due now); a record Kafka refuses for good is dead-lettered, which settles
/// it in turn.
pub(crate) async fn settle_entry(
    cx: &Context,
    hook_id: i64,
    build_id: i64,
    event_id: uuid::Uuid,
    abandon: &CancellationToken,
) -> Result<(), Abandoned> {
    let mut settling = (hook_id, build_id, event_id);
    loop {
        let (hook_id, build_id, event_id) = settling;
        let next = wait_out(
            &cx.metrics,
            Stall::Store,
            "store unavailable; the order queue cannot be moved on",
            abandon,
            || cx.store.order_settle(hook_id, build_id, event_id),
        )
        .await?;
        let Some(next) = next else {
            return Ok(());
        };
        match redrive(cx, &next, abandon).await? {
            Landed::AsIs => return Ok(()),
            _ => settling = (next.hook_id, next.build_id, next.event_id),
        }
    }
}

/// Writes a parked record back to the retry topic, due now, then unparks it. Where it landed:
/// anything but `AsIs` means it ended in a dead letter and its entry is to be settled.
async fn redrive(
    cx: &Context,
    parked: &ParkedEntry,
    abandon: &CancellationToken,
) -> Result<Landed, Abandoned> {
    let headers = task::headers(
        parked
            .delivery
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone())),
    );
    let landed = match DeliveryTask::from_headers(Some(&headers), &parked.delivery.body) {
        Ok(task) => {
            let landed = cx
                .handoff
                .to_retry(&task, None, Utc::now(), abandon)
                .await?;
            cx.metrics.order_action("redriven");
            landed
        }
        Err(detail) => {
            // Written by this code, so never expected; leaving it would hold the queue for good.
            warn!(event_id = %parked.event_id, build_id = parked.build_id, hook_id = parked.hook_id, %detail, "unreadable parked record; its queue moves on without it");
            cx.metrics.order_action("unreadable");
            Landed::Lost
        }
    };
    wait_out(
        &cx.metrics,
        Stall::Store,
        "store unavailable; a re-driven delivery cannot be unparked",
        abandon,
        || {
            cx.store
                .order_unpark(parked.hook_id, parked.build_id, parked.event_id)
        },
    )
    .await?;
    Ok(landed)
}

/// How often [`sweep`] looks for parked records left first in a quiet queue.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How long a queue must have seen no settlement before its parked first record counts as
/// stranded: long past a settlement's write-back, so the sweep does not race it.
pub const STRANDED_AFTER: Duration = Duration::from_secs(30);

/// Writes back parked records whose queue's head was settled by an instance that stopped before
/// the write-back (or whose hook was removed), every [`SWEEP_EVERY`], until `stop`. Every
/// instance sweeps; two writing back one record only duplicate it.
pub(crate) async fn sweep(cx: std::sync::Arc<Context>, stop: CancellationToken) {
    if cx.config.ordering == Ordering::Relaxed {
        return;
    }
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let quiet_since = Utc::now()
            - chrono::Duration::from_std(STRANDED_AFTER).unwrap_or(chrono::Duration::MAX);
        let stranded = match cx.store.order_stranded(quiet_since, 1000).await {
            Ok(stranded) => stranded,
            // The next tick tries again; meanwhile those queues wait.
            Err(error) => {
                warn!(%error, "could not look for stranded parked deliveries");
                continue;
            }
        };
        for parked in stranded {
            info!(event_id = %parked.event_id, build_id = parked.build_id, hook_id = parked.hook_id, "parked delivery first in a quiet queue; written back");
            cx.metrics.order_action("swept");
            let landed = match redrive(&cx, &parked, &stop).await {
                Ok(landed) => landed,
                Err(Abandoned) => return,
            };
            if landed != Landed::AsIs
                && settle_entry(&cx, parked.hook_id, parked.build_id, parked.event_id, &stop)
                    .await
                    .is_err()
            {
                return;
            }
        }
    }
}
