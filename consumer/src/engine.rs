//! The delivery engine: the window of deliveries in flight, shared fairly by the hooks (the rules
//! are `fair`'s), and each record finished once the last of its deliveries is.
//!
//! ```text
//! main path:  record --(one Work per hook)--> submit --> waiting --slot--> worker: strict::main_step
//! retry path: record --(due: one Work)------> submit          |              |
//!                                                  too long:  v              v
//!                                                  hand on (strict::*_step in hand-on mode:
//!                                                  to the retry topic, due when the hook can take it)
//! every Work ends --> its record's Claim: the last one finishes the record (its offset may go)
//! ```
//!
//! A worker task runs one delivery at a time and, when it ends, takes the next one the rules
//! give it, so a busy consumer does not spawn a task per delivery. Work that needs no slot (a
//! dead letter of an undecodable record, a retry record waiting to be due) runs as tasks of the
//! engine too, so the drain at shutdown waits for (or abandons) all of it alike.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use futures::FutureExt;
use hookline_cistate::Hook;
use hookline_shell::supervise::{Supervisor, TaskFailure, panic_message};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use crate::context::Context;
use crate::fair::{Grant, HandOn, Key, Limits, Placed, Scheduler};
use crate::offsets::{Offsets, Ticket};
use crate::shutdown::Abandoned;
use crate::step::Mode;
use crate::strict;
use crate::task::DeliveryTask;

/// How often waiting deliveries are checked for having waited too long.
const OVERDUE_EVERY: Duration = Duration::from_millis(100);
/// How often hooks idle for long are forgotten.
const FORGET_EVERY: Duration = Duration::from_secs(60);

/// A record's claim on its offset and in-flight permit: finished when the last of its parts
/// (one delivery per hook, or one piece of work) ends, unless one was abandoned.
pub(crate) struct Claim {
    offsets: Arc<Offsets>,
    ticket: Ticket,
    permit: Mutex<Option<OwnedSemaphorePermit>>,
    left: AtomicUsize,
    abandoned: AtomicBool,
}

impl Claim {
    pub(crate) fn new(
        offsets: Arc<Offsets>,
        (ticket, permit): (Ticket, OwnedSemaphorePermit),
        parts: usize,
    ) -> Arc<Claim> {
        Arc::new(Claim {
            offsets,
            ticket,
            permit: Mutex::new(Some(permit)),
            left: AtomicUsize::new(parts.max(1)),
            abandoned: AtomicBool::new(false),
        })
    }

    /// One part ended; the record is finished when every part ended and none was abandoned.
    pub(crate) fn part_done(&self, result: Result<(), Abandoned>) {
        if result.is_err() {
            self.abandoned.store(true, Ordering::Release);
        }
        if self.left.fetch_sub(1, Ordering::AcqRel) == 1 && !self.abandoned.load(Ordering::Acquire)
        {
            let permit = self.permit.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(permit) = permit {
                self.offsets.finish(&self.ticket, permit);
            }
        }
    }
}

/// One delivery to run in a slot.
pub(crate) enum Work {
    /// A new event from the main topic. `queued`: its (hook, build) had an order queue when its
    /// batch was read.
    Main {
        task: DeliveryTask,
        hook: Hook,
        queued: bool,
    },
    /// A due record of the retry topic, with the hook as read just now.
    Retry { task: DeliveryTask, hook: Hook },
}

impl Work {
    fn hook(&self) -> &Hook {
        match self {
            Work::Main { hook, .. } | Work::Retry { hook, .. } => hook,
        }
    }

    fn build_id(&self) -> i64 {
        match self {
            Work::Main { task, .. } | Work::Retry { task, .. } => task.build_id,
        }
    }

    async fn run(
        self,
        cx: &Context,
        mode: Mode,
        abandon: &CancellationToken,
    ) -> Result<(), Abandoned> {
        match self {
            Work::Main { task, hook, queued } => {
                strict::main_step(cx, task, &hook, queued, mode, abandon).await
            }
            Work::Retry { task, hook } => strict::retry_step(cx, task, &hook, mode, abandon).await,
        }
    }
}

struct Item {
    work: Work,
    claim: Arc<Claim>,
}

/// The engine both paths submit their deliveries to.
pub(crate) struct Engine {
    cx: Arc<Context>,
    sched: Mutex<Scheduler<Item>>,
    tasks: TaskTracker,
    /// Fires when the drain bound runs out: work still running stops unfinished, and no slot is
    /// granted any more (waiting deliveries stay unfinished, to be read again).
    abandon: CancellationToken,
    /// No delivery is taken any more (shutdown); those already waiting still run, within the
    /// drain bound, so no record is left half delivered by a clean stop.
    closed: AtomicBool,
    /// Told when a delivery's task panics: its record could never finish, so the consumer stops
    /// rather than hold the partition (and a slot) with nothing to show.
    supervisor: Supervisor,
}

impl Engine {
    pub(crate) fn new(cx: Arc<Context>, supervisor: Supervisor) -> Arc<Engine> {
        let c = &cx.config;
        let limits = Limits {
            window: c.max_in_flight,
            hook: c.hook_in_flight,
            host: c.host_in_flight,
            max_wait: c.hook_wait,
            // The delivery timeout, and a second for the failure's hold to be written.
            flying_build_delay: c.deliver.timeout + Duration::from_secs(1),
        };
        Arc::new(Engine {
            sched: Mutex::new(Scheduler::new(limits)),
            cx,
            tasks: TaskTracker::new(),
            abandon: CancellationToken::new(),
            closed: AtomicBool::new(false),
            supervisor,
        })
    }

    pub(crate) fn cx(&self) -> &Arc<Context> {
        &self.cx
    }

    pub(crate) fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// Runs `task` as a task of the engine (the drain waits for it); a panic fails the service.
    fn run_task(&self, what: &'static str, task: impl Future<Output = ()> + Send + 'static) {
        let supervisor = self.supervisor.clone();
        self.tasks.spawn(async move {
            if let Err(panic) = AssertUnwindSafe(task).catch_unwind().await {
                supervisor.fail(TaskFailure {
                    task: what.to_owned(),
                    how: format!("panicked: {}", panic_message(panic.as_ref())),
                });
            }
        });
    }

    fn sched(&self) -> std::sync::MutexGuard<'_, Scheduler<Item>> {
        // A panic while holding it cannot leave the rules half-applied in a way that loses work:
        // at worst a slot is counted that is not used.
        self.sched.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs work that needs no slot as a task of the engine: the drain waits for it (or
    /// abandons it) like the deliveries.
    pub(crate) fn spawn<F, Fut>(&self, work: F)
    where
        F: FnOnce(Arc<Context>, CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.run_task("record task", work(self.cx.clone(), self.abandon.clone()));
    }

    /// A delivery of `claim`'s record: it waits for a slot (or is handed on at once).
    pub(crate) fn submit(self: &Arc<Self>, work: Work, claim: Arc<Claim>) {
        let key = Key {
            hook: work.hook().id,
            build: work.build_id(),
            host: host_of(&work.hook().url),
        };
        let placed = {
            if self.closed.load(Ordering::Acquire) {
                // Left unfinished: its record is read again by the partition's next owner.
                return;
            }
            self.sched().push(key, Item { work, claim }, Instant::now())
        };
        if let Placed::HandOn(h) = placed {
            self.hand_on(h);
        }
        self.pump();
    }

    /// Starts a worker for every slot the rules grant now.
    fn pump(self: &Arc<Self>) {
        loop {
            let next = {
                let mut sched = self.sched();
                if self.abandon.is_cancelled() {
                    None
                } else {
                    let next = sched.next(Instant::now());
                    self.gauges(&sched);
                    next
                }
            };
            let Some((grant, item)) = next else {
                return;
            };
            self.run_task("delivery", self.clone().worker(grant, item));
        }
    }

    /// Runs deliveries one after another while the rules give this worker another.
    async fn worker(self: Arc<Self>, mut grant: Grant, mut item: Item) {
        loop {
            let Item { work, claim } = item;
            let result = work.run(&self.cx, Mode::Attempt, &self.abandon).await;
            claim.part_done(result);
            let next = {
                let mut sched = self.sched();
                sched.done(grant, Instant::now());
                let next = if self.abandon.is_cancelled() {
                    None
                } else {
                    sched.next(Instant::now())
                };
                self.gauges(&sched);
                next
            };
            match next {
                Some((g, i)) => (grant, item) = (g, i),
                None => return,
            }
        }
    }

    /// Hands a delivery on: to the retry topic, due when its hook can take it, without an
    /// attempt (under strict ordering it holds its build's later events, as a retry does).
    fn hand_on(self: &Arc<Self>, h: HandOn<Item>) {
        let HandOn {
            key,
            item,
            due,
            then,
        } = h;
        debug!(hook_id = key.hook, build_id = key.build, host = %key.host, later = then.len(), "hook busy; delivery handed on");
        let me = self.clone();
        self.run_task("hand-on", async move {
            // One after another: the build's order is the order of the writes.
            for (item, due) in std::iter::once((item, due)).chain(then) {
                let wait = due.saturating_duration_since(Instant::now());
                let until = Utc::now() + chrono::Duration::from_std(wait).unwrap_or_default();
                let Item { work, claim } = item;
                let result = work.run(&me.cx, Mode::HandOn { until }, &me.abandon).await;
                claim.part_done(result);
            }
            me.sched().handed_on(&key);
            me.pump();
        });
    }

    /// Hands on, every [`OVERDUE_EVERY`], the deliveries that waited (or would still wait) too
    /// long for their hook, until `stop`.
    pub(crate) async fn watch_overdue(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(OVERDUE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut next_forget = Instant::now() + FORGET_EVERY;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let overdue = {
                let mut sched = self.sched();
                let now = Instant::now();
                if now >= next_forget {
                    sched.forget_idle(now);
                    next_forget = now + FORGET_EVERY;
                }
                let overdue = sched.overdue(now);
                self.gauges(&sched);
                overdue
            };
            for h in overdue {
                self.hand_on(h);
            }
        }
    }

    fn gauges(&self, sched: &Scheduler<Item>) {
        let m = &self.cx.metrics;
        m.in_flight_gauge()
            .set(i64::try_from(sched.in_flight()).unwrap_or(i64::MAX));
        m.waiting_gauge()
            .set(i64::try_from(sched.waiting()).unwrap_or(i64::MAX));
    }

    /// Takes no more deliveries, waits within the drain bound for the work taken (running and
    /// waiting for a slot), and abandons the rest (those records are read again).
    pub(crate) async fn drain(&self) {
        self.closed.store(true, Ordering::Release);
        let tasks = &self.tasks;
        tasks.close();
        if tokio::time::timeout(self.cx.config.drain_timeout, tasks.wait())
            .await
            .is_err()
        {
            warn!(
                left = tasks.len(),
                "drain bound reached; abandoning in-flight work"
            );
            self.abandon.cancel();
            tasks.wait().await;
        }
    }
}

/// The receiver a hook's URL points at: scheme, host and port (the unit of the host slots).
pub(crate) fn host_of(url: &str) -> Arc<str> {
    match reqwest::Url::parse(url) {
        Ok(u) => Arc::from(format!(
            "{}://{}:{}",
            u.scheme(),
            u.host_str().unwrap_or(""),
            u.port_or_known_default().unwrap_or(0)
        )),
        // Refused at delivery anyway; its own unit, so it takes no one else's slots.
        Err(_) => Arc::from(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_on_one_receiver_share_its_host_whatever_their_paths() {
        assert_eq!(
            host_of("https://hooks.example.com/a?x=1"),
            host_of("https://hooks.example.com:443/b")
        );
        assert_ne!(
            host_of("https://hooks.example.com/a"),
            host_of("http://hooks.example.com/a")
        );
        assert_eq!(
            &*host_of("http://127.0.0.1:8080/hook"),
            "http://127.0.0.1:8080"
        );
    }
}
