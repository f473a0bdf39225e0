//! The demo receiver's ledger: what should arrive (the truth of every transition, for every hook
//! of its project) against what did arrive.
//!
//! The simulator records the truth of a transition ([`Ledger::expect`]) before it hands the
//! transition to the producer, so a delivery can never arrive before its truth. A delivery is
//! *stale* when its body differs from the truth by even one byte. The truth is rendered by the
//! same function as an inline payload, so staleness measures *when* a body was rendered; what a
//! body says is checked apart from the renderer: its *facts are wrong* when a field the
//! transition decides (status, times, durations, failure reason, runner, pipeline status)
//! differs from [`Facts`] written down from the transition and the state committed at its
//! moment. A delivery is a *duplicate* when its
//! `Idempotency-Key` was seen before (at-least-once allows them; they are counted, not hidden);
//! an (event, hook) pair the producer accepted that never arrives is *missing*.
//!
//! Per (hook, build) the ledger also reads what the receiver's view of the build went through:
//! a *regression* is a pair whose accepted deliveries did not arrive in transition order (an
//! older state after a newer one), and its *final view is wrong* when the last body the
//! receiver accepted is not the truth of the build's last transition. With
//! [`Ledger::fail_first_attempts`] the receiver answers 500 to a seeded share of first attempts,
//! so that retries happen.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hookline_schemas::PayloadTiming;
use serde::Serialize;
use uuid::Uuid;

use crate::error::CliError;
use crate::facts::{Facts, Witness};
use crate::transition::{Accepted, TransitionSent};

/// One request the receiver got, as the ledger needs it.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The hook, from the URL path the hook was registered with.
    pub hook_id: i64,
    /// `X-Gitlab-Event-UUID`, if present and a UUID.
    pub event_id: Option<Uuid>,
    pub idempotency_key: Option<String>,
    pub signature: SignatureCheck,
    pub body: Vec<u8>,
    pub received_at: DateTime<Utc>,
}

/// What the Standard Webhooks signature of a delivery came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureCheck {
    Valid,
    /// The hook has a secret but the signature is absent, malformed or wrong.
    Invalid,
    /// The hook has no secret.
    NotSigned,
}

/// What the ledger made of one delivery (the receiver logs it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    Fresh,
    Stale,
    Duplicate,
    /// No truth for this event and hook: a delivery nobody asked for.
    Unexpected,
}

#[derive(Debug)]
enum Answer {
    /// Handed to the producer, no answer yet.
    Waiting,
    Accepted(Accepted),
    Refused,
}

#[derive(Debug)]
struct Expected {
    project_id: i64,
    build_id: i64,
    truth: Vec<u8>,
    /// What the body must say, checked apart from the renderer (`None`: not checked).
    facts: Option<Facts>,
    occurred_at: DateTime<Utc>,
    answer: Answer,
}

#[derive(Debug, Clone)]
struct Arrived {
    event_id: Uuid,
    hook_id: i64,
    stale: bool,
    wrong_facts: bool,
    duplicate: bool,
    latency: Duration,
}

#[derive(Debug, Default)]
struct Inner {
    /// hook id -> project id
    hooks: HashMap<i64, i64>,
    hooks_by_project: HashMap<i64, Vec<i64>>,
    events: HashMap<Uuid, Expected>,
    arrived: Vec<Arrived>,
    pairs: HashSet<(Uuid, i64)>,
    idempotency_keys: HashSet<String>,
    unexpected: usize,
    bad_signatures: usize,
    unsigned: usize,
    /// Percentage of first attempts answered 500, and the seed that picks them.
    fail_percent: f64,
    fail_seed: u64,
    /// `Idempotency-Key`s that had their first attempt.
    attempted: HashSet<String>,
    /// hook -> consecutive 500s answered (kept under GitLab's auto-disable threshold).
    failures_in_a_row: HashMap<i64, u32>,
    receiver_failures: usize,
}

/// The most 500s in a row the receiver answers one hook: the consumer disables a hook on its
/// 4th consecutive failure (GitLab's rule) for a minute, which would outlast the demo's wait.
const MAX_FAILURES_IN_A_ROW: u32 = 2;

/// Thread-safe; shared by the simulator and the receiver.
#[derive(Debug, Default)]
pub struct Ledger {
    inner: Mutex<Inner>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// A hook that gets the project's deliveries.
    pub fn add_hook(&self, hook_id: i64, project_id: i64) {
        let mut inner = self.lock();
        inner.hooks.insert(hook_id, project_id);
        inner
            .hooks_by_project
            .entry(project_id)
            .or_default()
            .push(hook_id);
    }

    /// The truth of a transition, recorded before it is sent (its body's facts not checked).
    pub fn expect(&self, sent: &TransitionSent, truth: Vec<u8>) {
        self.expect_with_facts(sent, truth, None);
    }

    /// The truth of a transition and the facts its bodies must carry, recorded before it is
    /// sent.
    pub fn expect_with_facts(&self, sent: &TransitionSent, truth: Vec<u8>, facts: Option<Facts>) {
        self.lock().events.insert(
            sent.event_id,
            Expected {
                project_id: sent.project_id,
                build_id: sent.build_id,
                truth,
                facts,
                occurred_at: sent.occurred_at,
                answer: Answer::Waiting,
            },
        );
    }

    /// The producer's answer: only accepted transitions are owed deliveries.
    pub fn answered(&self, event_id: Uuid, answer: &Result<Accepted, CliError>) {
        if let Some(e) = self.lock().events.get_mut(&event_id) {
            e.answer = match answer {
                Ok(accepted) => Answer::Accepted(accepted.clone()),
                Err(_) => Answer::Refused,
            };
        }
    }

    /// Answers 500 to `percent` % of first attempts, picked by `seed` and the `Idempotency-Key`
    /// (never more than two in a row to one hook).
    pub fn fail_first_attempts(&self, percent: f64, seed: u64) {
        let mut inner = self.lock();
        inner.fail_percent = percent;
        inner.fail_seed = seed;
    }

    /// Whether the receiver answers this request 500: only a first attempt can be refused.
    pub fn refuses(&self, hook_id: i64, idempotency_key: Option<&str>) -> bool {
        let mut inner = self.lock();
        let inner = &mut *inner;
        let Some(key) = idempotency_key else {
            return false;
        };
        if inner.fail_percent <= 0.0 || !inner.attempted.insert(key.to_owned()) {
            return false;
        }
        // SipHash with fixed keys: the same key and seed always draw the same number.
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        (inner.fail_seed, key).hash(&mut hasher);
        let draw = (hasher.finish() % 100_000) as f64 / 1000.0;
        let in_a_row = inner.failures_in_a_row.entry(hook_id).or_default();
        if draw < inner.fail_percent && *in_a_row < MAX_FAILURES_IN_A_ROW {
            *in_a_row += 1;
            inner.receiver_failures += 1;
            true
        } else {
            *in_a_row = 0;
            false
        }
    }

    pub fn record(&self, delivery: Delivery) -> Verdict {
        let mut inner = self.lock();
        let inner = &mut *inner;
        match delivery.signature {
            SignatureCheck::Valid => {}
            SignatureCheck::Invalid => inner.bad_signatures += 1,
            SignatureCheck::NotSigned => inner.unsigned += 1,
        }
        let hook_project = inner.hooks.get(&delivery.hook_id).copied();
        let expected = delivery
            .event_id
            .and_then(|id| inner.events.get(&id).map(|e| (id, e)));
        let Some((event_id, expected)) =
            expected.filter(|(_, e)| Some(e.project_id) == hook_project)
        else {
            inner.unexpected += 1;
            return Verdict::Unexpected;
        };
        let duplicate = match &delivery.idempotency_key {
            Some(key) => !inner.idempotency_keys.insert(key.clone()),
            // Without a key, a second delivery of the same pair is the duplicate.
            None => inner.pairs.contains(&(event_id, delivery.hook_id)),
        };
        inner.pairs.insert((event_id, delivery.hook_id));
        let stale = delivery.body != expected.truth;
        let wrong_facts = expected
            .facts
            .as_ref()
            .is_some_and(|f| !f.wrong_in(&delivery.body).is_empty());
        let latency = (delivery.received_at - expected.occurred_at)
            .to_std()
            .unwrap_or_default();
        inner.failures_in_a_row.insert(delivery.hook_id, 0);
        inner.arrived.push(Arrived {
            event_id,
            hook_id: delivery.hook_id,
            stale,
            wrong_facts,
            duplicate,
            latency,
        });
        match (duplicate, stale) {
            (true, _) => Verdict::Duplicate,
            (false, true) => Verdict::Stale,
            (false, false) => Verdict::Fresh,
        }
    }

    /// (event, hook) pairs owed and not yet delivered.
    pub fn missing(&self) -> usize {
        let inner = self.lock();
        owed(&inner)
            .filter(|pair| !inner.pairs.contains(pair))
            .count()
    }

    /// Transitions handed over and not answered yet.
    pub fn unanswered(&self) -> usize {
        let inner = self.lock();
        inner
            .events
            .values()
            .filter(|e| matches!(e.answer, Answer::Waiting))
            .count()
    }

    /// Deliveries received so far.
    pub fn received(&self) -> usize {
        self.lock().arrived.len()
    }

    /// A few missing pairs, for the report when the wait timed out.
    pub fn missing_sample(&self, n: usize) -> Vec<(Uuid, i64)> {
        let inner = self.lock();
        owed(&inner)
            .filter(|pair| !inner.pairs.contains(pair))
            .take(n)
            .collect()
    }

    pub fn report(&self) -> LedgerReport {
        let inner = self.lock();
        let timing_of = |id: &Uuid| -> Option<PayloadTiming> {
            match &inner.events.get(id)?.answer {
                Answer::Accepted(a) => a.timing,
                _ => None,
            }
        };
        let mut by_timing: HashMap<&'static str, TimingReport> = HashMap::new();
        let mut refused = 0;
        for (id, e) in &inner.events {
            let Answer::Accepted(accepted) = &e.answer else {
                refused += usize::from(matches!(e.answer, Answer::Refused));
                continue;
            };
            let hooks = inner
                .hooks_by_project
                .get(&e.project_id)
                .map_or(&[][..], |h| &h[..]);
            let t = by_timing.entry(timing_name(accepted.timing)).or_default();
            t.events += 1;
            t.missing += hooks
                .iter()
                .filter(|h| !inner.pairs.contains(&(*id, **h)))
                .count();
            if let Some(r) = accepted.render_time {
                t.render_times.push(r);
            }
            if let Some(b) = accepted.payload_bytes {
                t.payload_bytes.push(b);
            }
        }
        for a in &inner.arrived {
            let t = by_timing
                .entry(timing_name(timing_of(&a.event_id)))
                .or_default();
            t.deliveries += 1;
            t.stale += usize::from(a.stale);
            t.wrong_facts += usize::from(a.wrong_facts);
            t.duplicates += usize::from(a.duplicate);
            t.latencies.push(a.latency);
        }
        for (timing, view) in views(&inner) {
            let t = by_timing.entry(timing).or_default();
            t.regressions += usize::from(view.regressed);
            t.final_view_wrong += usize::from(view.final_wrong);
        }
        let summary = |name: &str| {
            by_timing
                .get(name)
                .map(TimingReport::summary)
                .unwrap_or_default()
        };
        let inline = summary("inline");
        let deferred = summary("deferred");
        let unknown = by_timing.get("unknown").map(TimingReport::summary);
        LedgerReport {
            regressions: inline.regressions
                + deferred.regressions
                + unknown.as_ref().map_or(0, |u| u.regressions),
            final_view_wrong: inline.final_view_wrong
                + deferred.final_view_wrong
                + unknown.as_ref().map_or(0, |u| u.final_view_wrong),
            receiver_failures: inner.receiver_failures,
            events: inline.events + deferred.events + unknown.as_ref().map_or(0, |u| u.events),
            deliveries: inner.arrived.len(),
            missing: owed(&inner).filter(|p| !inner.pairs.contains(p)).count(),
            duplicates: inner.arrived.iter().filter(|a| a.duplicate).count(),
            unexpected: inner.unexpected,
            bad_signatures: inner.bad_signatures,
            unsigned: inner.unsigned,
            refused,
            by_timing: ByTiming {
                inline,
                deferred,
                unknown,
            },
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the counters half-updated in a way that
        // matters more than losing the report, so a poisoned lock is used as it is.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn timing_name(t: Option<PayloadTiming>) -> &'static str {
    match t {
        Some(PayloadTiming::Inline) => "inline",
        Some(PayloadTiming::Deferred) => "deferred",
        None => "unknown",
    }
}

/// What one hook's receiver saw of one build.
struct View {
    /// A delivery arrived after one of a later transition.
    regressed: bool,
    /// The last accepted body is not the truth of the build's last transition (or nothing
    /// arrived).
    final_wrong: bool,
}

/// The view of every (hook, build) owed something, with its timing.
fn views(inner: &Inner) -> Vec<(&'static str, View)> {
    let accepted = |e: &Expected| match &e.answer {
        Answer::Accepted(a) => Some(a.timing),
        _ => None,
    };
    // The build's last accepted transition: (occurred_at, event) per build.
    let mut last: HashMap<i64, (DateTime<Utc>, Uuid)> = HashMap::new();
    for (id, e) in &inner.events {
        if accepted(e).is_some() {
            let entry = last.entry(e.build_id).or_insert((e.occurred_at, *id));
            if e.occurred_at > entry.0 {
                *entry = (e.occurred_at, *id);
            }
        }
    }
    // Arrivals per (hook, build), in arrival order.
    let mut seen: HashMap<(i64, i64), Vec<&Arrived>> = HashMap::new();
    for a in &inner.arrived {
        if let Some(e) = inner.events.get(&a.event_id) {
            seen.entry((a.hook_id, e.build_id)).or_default().push(a);
        }
    }
    let mut out = Vec::new();
    for (build_id, (_, final_event)) in &last {
        let e = &inner.events[final_event];
        let timing = timing_name(accepted(e).flatten());
        for hook_id in inner
            .hooks_by_project
            .get(&e.project_id)
            .into_iter()
            .flatten()
        {
            let arrivals = seen.get(&(*hook_id, *build_id)).map_or(&[][..], |a| &a[..]);
            let times: Vec<DateTime<Utc>> = arrivals
                .iter()
                .map(|a| inner.events[&a.event_id].occurred_at)
                .collect();
            let regressed = times.windows(2).any(|w| w[1] < w[0]);
            let final_wrong = arrivals
                .last()
                .is_none_or(|a| a.event_id != *final_event || a.stale);
            out.push((
                timing,
                View {
                    regressed,
                    final_wrong,
                },
            ));
        }
    }
    out
}

/// Every (event, hook) pair owed: accepted events times their project's hooks.
fn owed(inner: &Inner) -> impl Iterator<Item = (Uuid, i64)> + '_ {
    inner
        .events
        .iter()
        .filter(|(_, e)| matches!(e.answer, Answer::Accepted(_)))
        .flat_map(|(id, e)| {
            inner
                .hooks_by_project
                .get(&e.project_id)
                .into_iter()
                .flatten()
                .map(|h| (*id, *h))
        })
}

#[derive(Debug, Default)]
struct TimingReport {
    events: usize,
    deliveries: usize,
    stale: usize,
    wrong_facts: usize,
    missing: usize,
    duplicates: usize,
    regressions: usize,
    final_view_wrong: usize,
    render_times: Vec<Duration>,
    payload_bytes: Vec<usize>,
    latencies: Vec<Duration>,
}

impl TimingReport {
    fn summary(&self) -> TimingSummary {
        let mut latencies = self.latencies.clone();
        latencies.sort();
        let mut renders = self.render_times.clone();
        renders.sort();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        TimingSummary {
            events: self.events,
            deliveries: self.deliveries,
            stale: self.stale,
            stale_pct: percent(self.stale, self.deliveries),
            wrong_facts: self.wrong_facts,
            missing: self.missing,
            duplicates: self.duplicates,
            regressions: self.regressions,
            final_view_wrong: self.final_view_wrong,
            render_us_p50: quantile(&renders, 0.5).map(us),
            render_us_mean: (!renders.is_empty())
                .then(|| us(renders.iter().sum::<Duration>()) / renders.len() as f64),
            payload_bytes_mean: (!self.payload_bytes.is_empty()).then(|| {
                self.payload_bytes.iter().sum::<usize>() as f64 / self.payload_bytes.len() as f64
            }),
            latency_ms_p50: quantile(&latencies, 0.5).map(ms),
            latency_ms_p99: quantile(&latencies, 0.99).map(ms),
        }
    }
}

fn percent(part: usize, whole: usize) -> f64 {
    if whole == 0 {
        0.0
    } else {
        100.0 * part as f64 / whole as f64
    }
}

/// The nearest-rank quantile of sorted values.
fn quantile(sorted: &[Duration], q: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// The figures of one payload timing.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct TimingSummary {
    /// Transitions the producer accepted with this timing.
    pub events: usize,
    /// Requests received for them (duplicates included).
    pub deliveries: usize,
    /// Deliveries whose body differs from the truth (rendered at the transition by the same
    /// renderer: a timing check).
    pub stale: usize,
    pub stale_pct: f64,
    /// Deliveries whose body contradicts the transition (status, times, durations, failure
    /// reason, runner or pipeline status), checked without the renderer.
    pub wrong_facts: usize,
    pub missing: usize,
    pub duplicates: usize,
    /// (hook, build) pairs whose accepted deliveries did not arrive in transition order.
    pub regressions: usize,
    /// (hook, build) pairs whose last accepted body is not the truth of the build's last
    /// transition (or that got nothing).
    pub final_view_wrong: usize,
    /// The producer's render time per event (inline only), microseconds.
    pub render_us_p50: Option<f64>,
    pub render_us_mean: Option<f64>,
    pub payload_bytes_mean: Option<f64>,
    /// From the transition to the receiver, milliseconds.
    pub latency_ms_p50: Option<f64>,
    pub latency_ms_p99: Option<f64>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ByTiming {
    pub inline: TimingSummary,
    pub deferred: TimingSummary,
    /// Events whose timing the producer did not say (a sink that cannot tell).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unknown: Option<TimingSummary>,
}

/// Everything the ledger knows, as the demo prints it.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct LedgerReport {
    /// Transitions the producer accepted.
    pub events: usize,
    pub deliveries: usize,
    pub missing: usize,
    pub duplicates: usize,
    /// Deliveries for no known (event, hook) pair.
    pub unexpected: usize,
    /// Deliveries whose signature did not verify.
    pub bad_signatures: usize,
    /// Deliveries without a signature.
    pub unsigned: usize,
    /// Transitions the producer refused (logged with the error at the time).
    pub refused: usize,
    /// (hook, build) pairs whose accepted deliveries did not arrive in transition order.
    pub regressions: usize,
    /// (hook, build) pairs whose last accepted body is not the build's final state.
    pub final_view_wrong: usize,
    /// First attempts the receiver answered 500 (`--receiver-failure-percent`).
    pub receiver_failures: usize,
    pub by_timing: ByTiming,
}

impl Witness for Ledger {
    fn expect(&self, sent: &TransitionSent, truth: Vec<u8>, facts: Facts) {
        Ledger::expect_with_facts(self, sent, truth, Some(facts));
    }

    fn answered(&self, event_id: Uuid, answer: &Result<Accepted, CliError>) {
        Ledger::answered(self, event_id, answer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_schemas::{BuildStatus, TransitionFacts};

    fn sent(project_id: i64) -> TransitionSent {
        TransitionSent {
            event_id: Uuid::new_v4(),
            build_id: 1,
            project_id,
            pipeline_id: 1,
            status: BuildStatus::Running,
            occurred_at: Utc::now(),
            facts: TransitionFacts::default(),
        }
    }

    fn delivery(hook_id: i64, event_id: Uuid, key: &str, body: &[u8]) -> Delivery {
        Delivery {
            hook_id,
            event_id: Some(event_id),
            idempotency_key: Some(key.into()),
            signature: SignatureCheck::Valid,
            body: body.to_vec(),
            received_at: Utc::now(),
        }
    }

    fn accepted(timing: PayloadTiming) -> Result<Accepted, CliError> {
        Ok(Accepted {
            timing: Some(timing),
            ..Accepted::default()
        })
    }

    #[test]
    fn counts_stale_duplicate_missing_and_unexpected_by_timing() {
        let ledger = Ledger::new();
        ledger.add_hook(10, 1);
        ledger.add_hook(11, 1);
        ledger.add_hook(20, 2);
        let a = sent(1);
        let b = sent(2);
        ledger.expect(&a, b"truth-a".to_vec());
        ledger.expect(&b, b"truth-b".to_vec());
        ledger.answered(a.event_id, &accepted(PayloadTiming::Inline));
        ledger.answered(b.event_id, &accepted(PayloadTiming::Deferred));
        assert_eq!(ledger.missing(), 3);

        assert_eq!(
            ledger.record(delivery(10, a.event_id, "k1", b"truth-a")),
            Verdict::Fresh
        );
        assert_eq!(
            ledger.record(delivery(10, a.event_id, "k1", b"truth-a")),
            Verdict::Duplicate
        );
        assert_eq!(
            ledger.record(delivery(20, b.event_id, "k3", b"later")),
            Verdict::Stale
        );
        // Hook 20 belongs to project 2: event a is not owed to it.
        assert_eq!(
            ledger.record(delivery(20, a.event_id, "k4", b"truth-a")),
            Verdict::Unexpected
        );

        let report = ledger.report();
        assert_eq!(report.events, 2);
        assert_eq!(report.deliveries, 3);
        assert_eq!(report.duplicates, 1);
        assert_eq!(report.missing, 1, "hook 11 never got event a");
        assert_eq!(report.unexpected, 1);
        assert_eq!(report.by_timing.inline.events, 1);
        assert_eq!(report.by_timing.inline.deliveries, 2);
        assert_eq!(report.by_timing.inline.stale, 0);
        assert_eq!(report.by_timing.inline.missing, 1);
        assert_eq!(report.by_timing.deferred.stale, 1);
        assert_eq!(report.by_timing.deferred.stale_pct, 100.0);
    }

    #[test]
    fn refused_transitions_are_owed_nothing_but_are_counted() {
        let ledger = Ledger::new();
        ledger.add_hook(10, 1);
        let a = sent(1);
        ledger.expect(&a, b"x".to_vec());
        assert_eq!(ledger.unanswered(), 1);
        ledger.answered(a.event_id, &Err(CliError::Refused("no".into())));
        assert_eq!(ledger.missing(), 0);
        let report = ledger.report();
        assert_eq!(report.refused, 1);
        assert_eq!(report.events, 0);
    }

    #[test]
    fn bad_signatures_are_counted() {
        let ledger = Ledger::new();
        ledger.add_hook(10, 1);
        let a = sent(1);
        ledger.expect(&a, b"x".to_vec());
        ledger.answered(a.event_id, &accepted(PayloadTiming::Inline));
        let mut d = delivery(10, a.event_id, "k", b"x");
        d.signature = SignatureCheck::Invalid;
        ledger.record(d);
        assert_eq!(ledger.report().bad_signatures, 1);
    }

    #[test]
    fn a_build_seen_going_backwards_is_a_regression_and_a_stale_last_state_a_wrong_view() {
        let ledger = Ledger::new();
        ledger.add_hook(10, 1);
        let t0 = Utc::now();
        let transitions: Vec<TransitionSent> = (0..3)
            .map(|i| TransitionSent {
                occurred_at: t0 + chrono::Duration::milliseconds(i),
                ..sent(1)
            })
            .collect();
        for (i, t) in transitions.iter().enumerate() {
            ledger.expect(t, format!("truth-{i}").into_bytes());
            ledger.answered(t.event_id, &accepted(PayloadTiming::Inline));
        }
        let deliver = |i: usize| {
            let t = &transitions[i];
            ledger.record(delivery(
                10,
                t.event_id,
                &format!("k{i}"),
                format!("truth-{i}").as_bytes(),
            ));
        };
        // 0, 2, then the retried 1: the receiver's view went back, and ended on 1, not 2.
        deliver(0);
        deliver(2);
        deliver(1);
        let report = ledger.report();
        assert_eq!(report.regressions, 1);
        assert_eq!(report.final_view_wrong, 1);
        assert_eq!(report.by_timing.inline.regressions, 1);
        assert_eq!(report.by_timing.inline.final_view_wrong, 1);
        // The last state delivered again (a duplicate) makes the final view right; the
        // regression stays.
        deliver(2);
        let report = ledger.report();
        assert_eq!((report.regressions, report.final_view_wrong), (1, 0));
    }

    #[test]
    fn a_seeded_share_of_first_attempts_is_refused_and_never_a_retry() {
        let ledger = Ledger::new();
        ledger.fail_first_attempts(20.0, 1);
        let refused = (0..1000)
            .filter(|i| {
                let key = format!("key-{i}");
                let first = ledger.refuses(i % 50, Some(&key));
                assert!(!ledger.refuses(i % 50, Some(&key)), "a retry was refused");
                first
            })
            .count();
        assert!((120..=280).contains(&refused), "{refused} of 1000 refused");
        assert_eq!(ledger.report().receiver_failures, refused);
    }

    #[test]
    fn quantiles_use_the_nearest_rank() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(quantile(&v, 0.5), Some(Duration::from_millis(50)));
        assert_eq!(quantile(&v, 0.99), Some(Duration::from_millis(99)));
        assert_eq!(quantile(&[], 0.5), None);
    }
}
