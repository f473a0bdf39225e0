//! Which delivery gets the next in-flight slot: the pure rules, unit-tested here; `engine`
//! carries them out.
//!
//! # The units of fairness: the receiver host, then the hook
//!
//! What gets slow is a receiver, and several hooks often point at one receiver (a chat service,
//! a team's webhook gateway, one CI integration per project). Slots are therefore shared in two
//! levels: round-robin over the receiver *hosts* (scheme, host and port of the hook's URL) that
//! have work, then round-robin over that host's *hooks*. Each host may hold at most `host`
//! slots and each hook at most `hook`, whatever the window has free. A hook whose receiver
//! answers after 8 s can therefore hold `hook` slots and no more, and a host with many slow
//! hooks `host`; every other receiver keeps the rest of the window. Per hook alone would let a
//! host behind many hooks take the window; per host alone would let one busy hook starve the
//! host's other hooks.
//!
//! # Order
//!
//! A hook's waiting deliveries are served in arrival order, and never two of one (hook, build)
//! at once: a delivery whose build has one in flight to the same hook (or being handed on) waits
//! behind it, so a receiver sees one build's transitions in order, as before; other builds of
//! the hook go around it.
//!
//! # Handing on
//!
//! A delivery that would wait long for its hook's slot must not keep its record, and so its
//! partition's commit and the window, waiting: it is handed on (the engine writes it to the
//! retry topic, due later, and its record is finished). How long it would wait is estimated from
//! the hook's answer time (a moving average, and at least the age of its oldest attempt in
//! flight, so a receiver that went quiet shows before its first answer) times the deliveries
//! ahead of it, divided by the hook's slots. A delivery is handed on when that estimate, or the
//! time it has actually waited, exceeds `max_wait`. Its due time is a reservation on the hook's
//! own clock, advanced by one answer time per slot for each delivery handed on, so handed-on
//! deliveries come back at about the rate the receiver can take them rather than all at once.
//! A fast hook with much work is never handed on: its queue drains within the estimate.
//!
//! Order holds through a hand-on: only the first waiting delivery of a build may leave (the
//! build's later waiting ones leave with it, written after it in order), never while an earlier
//! one of its build is being handed on (their holds could land out of order),
//! and, when an earlier one is in flight, due only after that attempt has surely ended. Under
//! strict ordering the handed-on delivery holds its build's later events; if the one in flight
//! fails meanwhile, it joins the queue ahead of it (the queue is ordered by transition time), so
//! it goes first. A slow hook whose backlog sits in a few builds thus still hands on, instead of
//! keeping its records (and the window) waiting one build at a time.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The limits of the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Deliveries in flight at once, every hook together.
    pub window: usize,
    /// Deliveries in flight at once to one hook.
    pub hook: usize,
    /// Deliveries in flight at once to one receiver host.
    pub host: usize,
    /// The longest a delivery waits for its hook's slot (estimated or actual) before it is
    /// handed on.
    pub max_wait: Duration,
    /// The soonest a delivery handed on behind an earlier one of its build still in flight is
    /// due: past that one's longest attempt (the delivery timeout), so it cannot overtake it,
    /// even on another instance (see the module doc).
    pub flying_build_delay: Duration,
}

/// Where a delivery goes, and in which order.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub hook: i64,
    pub build: i64,
    /// Scheme, host and port of the hook's URL.
    pub host: Arc<str>,
}

/// A delivery in flight: what [`Scheduler::done`] needs back.
#[derive(Debug)]
pub struct Grant {
    key: Key,
    started: Instant,
}

impl Grant {
    pub fn key(&self) -> &Key {
        &self.key
    }
}

/// A delivery handed on, with the time it is due back, and the later deliveries of its build
/// that waited behind it, to be handed on after it in this order.
#[derive(Debug)]
pub struct HandOn<T> {
    pub key: Key,
    pub item: T,
    pub due: Instant,
    pub then: Vec<(T, Instant)>,
}

/// What [`Scheduler::push`] did with a delivery.
#[derive(Debug)]
pub enum Placed<T> {
    /// It waits for a slot.
    Waiting,
    /// It would wait too long: hand it on. Until [`Scheduler::handed_on`], nothing later of its
    /// build starts or is handed on.
    HandOn(HandOn<T>),
}

struct Waiting<T> {
    build: i64,
    since: Instant,
    item: T,
}

struct HookState<T> {
    host: Arc<str>,
    waiting: VecDeque<Waiting<T>>,
    in_flight: usize,
    /// Start times of the attempts in flight (the oldest shows a receiver gone quiet).
    started: VecDeque<Instant>,
    /// Builds with a delivery in flight, and how many.
    flying: HashMap<i64, usize>,
    /// Builds with a delivery being handed on, and how many.
    handing: HashMap<i64, usize>,
    /// Moving average of answer times; `None` before the first answer.
    answer: Option<Duration>,
    /// The hook's reservation clock for handed-on deliveries.
    reserved: Option<Instant>,
    /// When the hook last had a delivery start or end.
    last_seen: Instant,
}

impl<T> HookState<T> {
    fn new(host: Arc<str>, now: Instant) -> Self {
        HookState {
            host,
            waiting: VecDeque::new(),
            in_flight: 0,
            started: VecDeque::new(),
            flying: HashMap::new(),
            handing: HashMap::new(),
            answer: None,
            reserved: None,
            last_seen: now,
        }
    }

    /// The hook's answer time as best known now.
    fn answer_time(&self, now: Instant) -> Duration {
        let oldest = self
            .started
            .front()
            .map_or(Duration::ZERO, |s| now.saturating_duration_since(*s));
        self.answer.unwrap_or(Duration::ZERO).max(oldest)
    }

    /// The hook answers (or has kept an attempt) for longer than `max_wait`: only such a hook's
    /// deliveries are handed on. A fast hook with a deep queue is not slow: under a busy machine
    /// its estimate can pass `max_wait`, and handing its deliveries on would only send them
    /// round the retry topic, each reserving the hook's clock again, while its slots sit idle.
    fn is_slow(&self, now: Instant, max_wait: Duration) -> bool {
        self.answer_time(now) > max_wait
    }

    /// How long a delivery with `ahead` deliveries before it would wait, with `slots` slots.
    fn estimated_wait(&self, ahead: usize, slots: usize, now: Instant) -> Duration {
        if self.in_flight < slots {
            return Duration::ZERO;
        }
        let rounds = u32::try_from(ahead / slots.max(1) + 1).unwrap_or(u32::MAX);
        self.answer_time(now).saturating_mul(rounds)
    }

    /// Nothing of the build is in flight nor being handed on: its next delivery may start.
    fn may_start(&self, build: i64) -> bool {
        !self.flying.contains_key(&build) && !self.handing.contains_key(&build)
    }

    /// Nothing of the build is being handed on: its next delivery may be handed on (with one
    /// in flight it is due only after that one has ended, see [`Limits::flying_build_delay`]).
    fn may_hand_on(&self, build: i64) -> bool {
        !self.handing.contains_key(&build)
    }

    /// The first waiting delivery whose build may start. Only the first of a build can be
    /// chosen: a later one of the same build sees it first.
    fn first_ready(&self) -> Option<usize> {
        let mut seen = HashSet::new();
        self.waiting
            .iter()
            .position(|w| seen.insert(w.build) && self.may_start(w.build))
    }

    fn idle(&self) -> bool {
        self.waiting.is_empty()
            && self.in_flight == 0
            && self.flying.is_empty()
            && self.handing.is_empty()
    }
}

#[derive(Default)]
struct HostState {
    in_flight: usize,
    /// Hooks of this host with deliveries waiting, in round-robin order.
    hooks: VecDeque<i64>,
}

fn count_up(map: &mut HashMap<i64, usize>, build: i64) {
    *map.entry(build).or_default() += 1;
}

fn count_down(map: &mut HashMap<i64, usize>, build: i64) {
    if let Some(n) = map.get_mut(&build) {
        *n -= 1;
        if *n == 0 {
            map.remove(&build);
        }
    }
}

/// The window: who waits, who is in flight, whose turn is next.
pub struct Scheduler<T> {
    limits: Limits,
    in_flight: usize,
    hooks: HashMap<i64, HookState<T>>,
    hosts: HashMap<Arc<str>, HostState>,
    /// Hosts with hooks that have deliveries waiting, in round-robin order.
    ring: VecDeque<Arc<str>>,
    waiting: usize,
}

/// Weight of the newest answer in the moving average.
const ANSWER_WEIGHT: f64 = 0.2;
/// How long an idle hook's answer time is kept.
pub const FORGET_AFTER: Duration = Duration::from_secs(600);
/// A hook's reservation clock never runs further ahead than this: past it, the retry path's
/// hold sends the delivery round again anyway.
const MAX_RESERVATION: Duration = Duration::from_secs(600);

impl<T> Scheduler<T> {
    pub fn new(limits: Limits) -> Self {
        Scheduler {
            limits: Limits {
                window: limits.window.max(1),
                hook: limits.hook.max(1),
                host: limits.host.max(1),
                ..limits
            },
            in_flight: 0,
            hooks: HashMap::new(),
            hosts: HashMap::new(),
            ring: VecDeque::new(),
            waiting: 0,
        }
    }

    /// Deliveries in flight.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Deliveries waiting for a slot.
    pub fn waiting(&self) -> usize {
        self.waiting
    }

    /// A delivery arrives: it waits for a slot, or is handed on at once when it would wait too
    /// long.
    pub fn push(&mut self, key: Key, item: T, now: Instant) -> Placed<T> {
        let limits = self.limits;
        let hook = self
            .hooks
            .entry(key.hook)
            .or_insert_with(|| HookState::new(key.host.clone(), now));
        // A hook whose URL changed moves to its new host once nothing of it is under the old.
        if hook.host != key.host && hook.idle() {
            hook.host = key.host.clone();
        }
        let wait = hook.estimated_wait(hook.waiting.len(), limits.hook, now);
        // Only a delivery with nothing of its build ahead of it may leave: one behind an earlier
        // event of its build keeps its place (handed on first, it would pass that event).
        if wait > limits.max_wait
            && hook.is_slow(now, limits.max_wait)
            && hook.may_hand_on(key.build)
            && !hook.waiting.iter().any(|w| w.build == key.build)
        {
            let due = Self::hand_on_due(hook, &limits, key.build, now);
            count_up(&mut hook.handing, key.build);
            return Placed::HandOn(HandOn {
                key,
                item,
                due,
                then: Vec::new(),
            });
        }
        hook.waiting.push_back(Waiting {
            build: key.build,
            since: now,
            item,
        });
        self.waiting += 1;
        let host = hook.host.clone();
        self.enlist(key.hook, &host);
        Placed::Waiting
    }

    /// The next delivery to start, if the window, a host and one of its hooks have room.
    pub fn next(&mut self, now: Instant) -> Option<(Grant, T)> {
        if self.in_flight >= self.limits.window {
            return None;
        }
        for _ in 0..self.ring.len() {
            let host_key = self.ring.pop_front()?;
            let Some(host) = self.hosts.get_mut(&host_key) else {
                continue;
            };
            if host.hooks.is_empty() {
                continue;
            }
            if host.in_flight >= self.limits.host {
                self.ring.push_back(host_key);
                continue;
            }
            let mut chosen = None;
            for _ in 0..host.hooks.len() {
                let Some(hook_id) = host.hooks.pop_front() else {
                    break;
                };
                let Some(hook) = self.hooks.get_mut(&hook_id) else {
                    continue;
                };
                if hook.waiting.is_empty() {
                    continue;
                }
                if hook.in_flight < self.limits.hook
                    && let Some(at) = hook.first_ready()
                {
                    let w = hook.waiting.remove(at).expect("index from position");
                    hook.in_flight += 1;
                    hook.last_seen = now;
                    hook.started.push_back(now);
                    count_up(&mut hook.flying, w.build);
                    if !hook.waiting.is_empty() {
                        host.hooks.push_back(hook_id);
                    }
                    chosen = Some((hook_id, w));
                    break;
                }
                host.hooks.push_back(hook_id);
            }
            if !host.hooks.is_empty() {
                self.ring.push_back(host_key.clone());
            }
            if let Some((hook_id, w)) = chosen {
                host.in_flight += 1;
                self.in_flight += 1;
                self.waiting -= 1;
                let key = Key {
                    hook: hook_id,
                    build: w.build,
                    host: host_key,
                };
                return Some((Grant { key, started: now }, w.item));
            }
        }
        None
    }

    /// A delivery in flight ended (whatever its outcome): its slot is free, its build too, and
    /// its answer time counts in the hook's average.
    pub fn done(&mut self, grant: Grant, now: Instant) {
        let Grant { key, started } = grant;
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(host) = self.hosts.get_mut(&key.host) {
            host.in_flight = host.in_flight.saturating_sub(1);
        }
        if let Some(hook) = self.hooks.get_mut(&key.hook) {
            hook.in_flight = hook.in_flight.saturating_sub(1);
            if let Some(at) = hook.started.iter().position(|s| *s == started) {
                hook.started.remove(at);
            }
            count_down(&mut hook.flying, key.build);
            hook.last_seen = now;
            let took = now.saturating_duration_since(started);
            hook.answer = Some(match hook.answer {
                None => took,
                Some(avg) => avg.mul_f64(1.0 - ANSWER_WEIGHT) + took.mul_f64(ANSWER_WEIGHT),
            });
        }
        self.forget_idle_host(&key.host);
    }

    /// A delivery handed on is written: its build is free again.
    pub fn handed_on(&mut self, key: &Key) {
        if let Some(hook) = self.hooks.get_mut(&key.hook) {
            count_down(&mut hook.handing, key.build);
        }
        self.forget_idle_host(&key.host);
    }

    /// Waiting deliveries that have waited, or would still wait, longer than `max_wait`, oldest
    /// first per hook. Only the first waiting delivery of a build is judged; when it leaves, the
    /// build's later waiting deliveries leave with it, in order (they could not start before it
    /// anyway, and one by one they would hold the window a tick each). Until
    /// [`Scheduler::handed_on`], nothing later of their builds starts or is handed on.
    pub fn overdue(&mut self, now: Instant) -> Vec<HandOn<T>> {
        let limits = self.limits;
        let mut out: Vec<HandOn<T>> = Vec::new();
        let mut taken = 0;
        for (&hook_id, hook) in self.hooks.iter_mut() {
            if hook.waiting.is_empty() {
                continue;
            }
            let mut kept = VecDeque::with_capacity(hook.waiting.len());
            let mut seen = HashSet::new();
            // Builds handed on in this pass, and where their hand-on is in `out`.
            let mut leaving: HashMap<i64, usize> = HashMap::new();
            while let Some(w) = hook.waiting.pop_front() {
                if let Some(&at) = leaving.get(&w.build) {
                    let due = Self::reserve(hook, limits.hook, now).max(out[at].due);
                    out[at].then.push((w.item, due));
                    taken += 1;
                    continue;
                }
                let first_of_build = seen.insert(w.build);
                let waited = now.saturating_duration_since(w.since);
                let would_wait = hook.estimated_wait(kept.len(), limits.hook, now);
                if first_of_build
                    && hook.may_hand_on(w.build)
                    && hook.is_slow(now, limits.max_wait)
                    && (waited > limits.max_wait || would_wait > limits.max_wait)
                {
                    let due = Self::hand_on_due(hook, &limits, w.build, now);
                    count_up(&mut hook.handing, w.build);
                    leaving.insert(w.build, out.len());
                    taken += 1;
                    out.push(HandOn {
                        key: Key {
                            hook: hook_id,
                            build: w.build,
                            host: hook.host.clone(),
                        },
                        item: w.item,
                        due,
                        then: Vec::new(),
                    });
                } else {
                    kept.push_back(w);
                }
            }
            hook.waiting = kept;
        }
        self.waiting -= taken;
        out
    }

    /// When a delivery handed on is due: its reservation on the hook's clock, and, when an
    /// earlier delivery of its build is in flight, not before that one has surely ended.
    fn hand_on_due(hook: &mut HookState<T>, limits: &Limits, build: i64, now: Instant) -> Instant {
        let due = Self::reserve(hook, limits.hook, now);
        if hook.flying.contains_key(&build) {
            due.max(now + limits.flying_build_delay)
        } else {
            due
        }
    }

    /// Advances the hook's reservation clock by one answer time per slot and returns the
    /// delivery's due time.
    fn reserve(hook: &mut HookState<T>, slots: usize, now: Instant) -> Instant {
        let step = hook
            .answer_time(now)
            .div_f64(slots.max(1) as f64)
            .max(Duration::from_millis(1));
        let from = hook.reserved.filter(|r| *r > now).unwrap_or(now);
        let due = (from + step).min(now + MAX_RESERVATION);
        hook.reserved = Some(due);
        due
    }

    /// Puts the hook in its host's round and the host in the ring, unless already there.
    fn enlist(&mut self, hook_id: i64, host_key: &Arc<str>) {
        let host = self.hosts.entry(host_key.clone()).or_default();
        if !host.hooks.contains(&hook_id) {
            host.hooks.push_back(hook_id);
        }
        if !self.ring.contains(host_key) {
            self.ring.push_back(host_key.clone());
        }
    }

    fn forget_idle_host(&mut self, host: &Arc<str>) {
        if self
            .hosts
            .get(host)
            .is_some_and(|h| h.in_flight == 0 && h.hooks.is_empty())
        {
            self.hosts.remove(host);
        }
    }

    /// Drops the state of hooks that had nothing waiting, in flight or busy for [`FORGET_AFTER`],
    /// so hooks that had work once cost nothing later. Until then a hook keeps its answer time:
    /// a slow hook with sparse events is still known to be slow at its next one.
    pub fn forget_idle(&mut self, now: Instant) {
        self.hooks.retain(|_, hook| {
            !(hook.idle() && now.saturating_duration_since(hook.last_seen) > FORGET_AFTER)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: Duration = Duration::from_secs(1);

    fn limits(window: usize, hook: usize, host: usize) -> Limits {
        Limits {
            window,
            hook,
            host,
            max_wait: SEC,
            flying_build_delay: 10 * SEC,
        }
    }

    fn key(hook: i64, build: i64, host: &str) -> Key {
        Key {
            hook,
            build,
            host: Arc::from(host),
        }
    }

    /// Grants until none is left, returning (hook, build, item) of each.
    fn drain(s: &mut Scheduler<u32>, now: Instant) -> Vec<(i64, i64, u32, Grant)> {
        std::iter::from_fn(|| s.next(now))
            .map(|(g, item)| (g.key.hook, g.key.build, item, g))
            .collect()
    }

    fn push_all(s: &mut Scheduler<u32>, keys: &[(i64, i64, &str)], now: Instant) {
        for (n, (hook, build, host)) in (0..).zip(keys) {
            assert!(matches!(
                s.push(key(*hook, *build, host), n, now),
                Placed::Waiting
            ));
        }
    }

    #[test]
    fn a_hook_holds_at_most_its_slots_and_the_window_is_shared() {
        let now = Instant::now();
        let mut s = Scheduler::new(limits(10, 2, 10));
        push_all(
            &mut s,
            &[(1, 1, "a"), (1, 2, "a"), (1, 3, "a"), (2, 4, "b")],
            now,
        );
        let granted = drain(&mut s, now);
        let hooks: Vec<i64> = granted.iter().map(|g| g.0).collect();
        assert_eq!(hooks.iter().filter(|h| **h == 1).count(), 2, "{hooks:?}");
        assert_eq!(hooks.iter().filter(|h| **h == 2).count(), 1, "{hooks:?}");
        assert_eq!((s.in_flight(), s.waiting()), (3, 1));
    }

    #[test]
    fn hosts_with_work_take_turns_and_so_do_a_hosts_hooks() {
        let now = Instant::now();
        let mut s = Scheduler::new(limits(6, 10, 10));
        // Host a has two hooks with much work, host b one hook arriving last.
        let mut keys = Vec::new();
        for build in 0..6 {
            keys.push((1, build, "a"));
            keys.push((2, 100 + build, "a"));
        }
        keys.push((3, 200, "b"));
        keys.push((3, 201, "b"));
        push_all(&mut s, &keys, now);
        let granted: Vec<i64> = drain(&mut s, now).iter().map(|g| g.0).collect();
        // Round-robin over hosts (a, b, a, b, ...), within a over hooks 1 and 2.
        assert_eq!(granted, vec![1, 3, 2, 3, 1, 2]);
    }

    #[test]
    fn a_host_holds_at_most_its_slots_whatever_its_hooks_have() {
        let now = Instant::now();
        let mut s = Scheduler::new(limits(100, 10, 3));
        let keys: Vec<_> = (0..8).map(|h| (h, h, "slow.example")).collect();
        push_all(&mut s, &keys, now);
        push_all(
            &mut s,
            &[(50, 1, "fast.example"), (51, 2, "fast.example")],
            now,
        );
        let granted = drain(&mut s, now);
        let slow = granted.iter().filter(|g| g.0 < 50).count();
        let fast = granted.iter().filter(|g| g.0 >= 50).count();
        assert_eq!((slow, fast), (3, 2));
    }

    #[test]
    fn one_builds_deliveries_to_a_hook_go_one_at_a_time_in_order() {
        let now = Instant::now();
        let mut s = Scheduler::new(limits(10, 10, 10));
        push_all(&mut s, &[(1, 7, "a"), (1, 7, "a"), (1, 8, "a")], now);
        let first = drain(&mut s, now);
        let items: Vec<u32> = first.iter().map(|g| g.2).collect();
        assert_eq!(
            items,
            vec![0, 2],
            "build 7's second event waits behind its first"
        );
        let (_, _, _, grant) = first.into_iter().next().unwrap();
        s.done(grant, now);
        let next = drain(&mut s, now);
        assert_eq!(next.iter().map(|g| g.2).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn the_window_bounds_every_hook_together() {
        let now = Instant::now();
        let mut s = Scheduler::new(limits(3, 10, 10));
        let keys: Vec<_> = (0..6).map(|h| (h, h, "a")).collect();
        push_all(&mut s, &keys, now);
        let granted = drain(&mut s, now);
        assert_eq!(granted.len(), 3);
        let (_, _, _, grant) = granted.into_iter().next().unwrap();
        s.done(grant, now);
        assert_eq!(
            drain(&mut s, now).len(),
            1,
            "a freed slot goes to the next in line"
        );
    }

    /// A hook whose receiver answers after 8 s, with 2 slots: once its answer time is known,
    /// a delivery that would wait more than a second is handed on, due at the rate the hook
    /// can take them; a fast hook's deep queue is never handed on.
    #[test]
    fn a_slow_hooks_excess_is_handed_on_and_a_fast_hooks_is_not() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(limits(100, 2, 100));
        push_all(&mut s, &[(1, 1, "slow"), (1, 2, "slow")], t0);
        let mut granted = drain(&mut s, t0);
        // Both answer after 8 s; two more go out.
        let t8 = t0 + 8 * SEC;
        push_all(&mut s, &[(1, 3, "slow"), (1, 4, "slow")], t0);
        for (_, _, _, g) in granted.drain(..) {
            s.done(g, t8);
        }
        assert_eq!(drain(&mut s, t8).len(), 2);
        // Now the hook is known to be slow and full: the next deliveries leave.
        let mut dues = Vec::new();
        for build in 5..9 {
            match s.push(key(1, build, "slow"), 0, t8) {
                Placed::HandOn(h) => dues.push(h.due),
                Placed::Waiting => panic!("build {build} waits for a slow hook"),
            }
        }
        // 8 s per answer, 2 slots: one every 4 s.
        let gaps: Vec<Duration> = dues.windows(2).map(|w| w[1] - w[0]).collect();
        assert!(gaps.iter().all(|g| *g == 4 * SEC), "{gaps:?}");
        assert!(dues[0] > t8);

        // A fast hook (answers in 1 ms) with 100 waiting is never handed on.
        let mut fast = Scheduler::new(limits(100, 2, 100));
        push_all(&mut fast, &[(2, 0, "fast"), (2, 1, "fast")], t0);
        let warm = drain(&mut fast, t0);
        let t1 = t0 + Duration::from_millis(1);
        for (_, _, _, g) in warm {
            fast.done(g, t1);
        }
        for build in 2..102 {
            assert!(matches!(
                fast.push(key(2, build, "fast"), 0, t1),
                Placed::Waiting
            ));
        }
        assert!(fast.overdue(t1 + Duration::from_millis(10)).is_empty());
    }

    #[test]
    fn a_hook_gone_quiet_shows_before_its_first_answer() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(limits(100, 1, 100));
        push_all(&mut s, &[(1, 1, "quiet")], t0);
        let _in_flight = drain(&mut s, t0);
        push_all(&mut s, &[(1, 2, "quiet")], t0);
        // No answer yet, but the attempt in flight is 3 s old: waiting for it is too long.
        let overdue = s.overdue(t0 + 3 * SEC);
        assert_eq!(overdue.len(), 1);
        assert_eq!((overdue[0].key.hook, overdue[0].key.build), (1, 2));
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn a_builds_waiting_deliveries_are_handed_on_together_behind_its_first() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(limits(100, 1, 100));
        push_all(&mut s, &[(1, 1, "h")], t0);
        let _in_flight = drain(&mut s, t0);
        // Build 2 twice, then build 3; all wait past max_wait.
        push_all(&mut s, &[(1, 2, "h"), (1, 2, "h"), (1, 3, "h")], t0);
        let overdue = s.overdue(t0 + 2 * SEC);
        let builds: Vec<i64> = overdue.iter().map(|h| h.key.build).collect();
        assert_eq!(builds, vec![2, 3]);
        assert_eq!(s.waiting(), 0);
        let build2 = &overdue[0];
        assert_eq!(
            build2.then.len(),
            1,
            "build 2's second event leaves behind its first"
        );
        assert!(build2.then[0].1 >= build2.due, "and is not due before it");
        assert!(overdue[1].then.is_empty());
        // Until build 2's hand-on is written, its next event waits in order.
        assert!(matches!(
            s.push(key(1, 2, "h"), 9, t0 + 3 * SEC),
            Placed::Waiting
        ));
        assert!(s.overdue(t0 + 5 * SEC).is_empty());
        s.handed_on(&overdue[0].key);
        let again = s.overdue(t0 + 6 * SEC);
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].item, 9);
    }

    /// A slow hook whose backlog sits in a few builds: every build has one delivery in flight
    /// and the rest wait behind it. The first waiting one of each build is still handed on, due
    /// only after the one in flight has surely ended; the next of its build only once that
    /// hand-on is written.
    #[test]
    fn a_slow_hooks_backlog_in_few_builds_is_handed_on_behind_the_attempts_in_flight() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(limits(100, 2, 100));
        push_all(
            &mut s,
            &[
                (1, 1, "h"),
                (1, 2, "h"),
                (1, 1, "h"),
                (1, 2, "h"),
                (1, 1, "h"),
            ],
            t0,
        );
        assert_eq!(drain(&mut s, t0).len(), 2, "one of each build in flight");
        let overdue = s.overdue(t0 + 2 * SEC);
        let builds: Vec<i64> = overdue.iter().map(|h| h.key.build).collect();
        assert_eq!(builds, vec![1, 2]);
        assert!(
            overdue.iter().all(|h| h.due >= t0 + 2 * SEC + 10 * SEC),
            "not due before the attempt in flight has surely ended"
        );
        assert_eq!(
            s.waiting(),
            0,
            "build 1's third event leaves behind its second"
        );
        assert_eq!(overdue[0].then.len(), 1);
        assert!(overdue[1].then.is_empty());
    }

    #[test]
    fn a_delivery_behind_its_builds_earlier_event_is_never_handed_on_ahead_of_it() {
        let t0 = Instant::now();
        let mut s = Scheduler::new(limits(100, 1, 100));
        push_all(&mut s, &[(1, 1, "h")], t0);
        let granted = drain(&mut s, t0);
        // The hook is now known to take 8 s.
        for (_, _, _, g) in granted {
            s.done(g, t0 + 8 * SEC);
        }
        let t8 = t0 + 8 * SEC;
        push_all(&mut s, &[(1, 2, "h")], t8);
        let _busy = drain(&mut s, t8);
        // Build 3 waits (nothing of it ahead, but the estimate says 8 s): handed on.
        assert!(matches!(s.push(key(1, 3, "h"), 0, t8), Placed::HandOn(_)));
        // Build 3 is being handed on: its next event waits in order.
        assert!(matches!(s.push(key(1, 3, "h"), 0, t8), Placed::Waiting));
        // Build 4 twice: the second waits behind the first, which waits too (build 3's
        // second event is ahead of it in the queue, so the estimate... is still too long).
        assert!(matches!(s.push(key(1, 4, "h"), 0, t8), Placed::HandOn(_)));
        assert!(matches!(s.push(key(1, 4, "h"), 0, t8), Placed::Waiting));
    }

    #[test]
    fn idle_hooks_are_forgotten_after_a_while() {
        let now = Instant::now();
        let mut s = Scheduler::new(limits(10, 10, 10));
        push_all(&mut s, &[(1, 1, "a")], now);
        for (_, _, _, g) in drain(&mut s, now) {
            s.done(g, now);
        }
        assert!(s.hosts.is_empty());
        s.forget_idle(now + Duration::from_secs(60));
        assert_eq!(s.hooks.len(), 1, "its answer time is kept a while");
        s.forget_idle(now + FORGET_AFTER + SEC);
        assert!(s.hooks.is_empty());
    }
}
