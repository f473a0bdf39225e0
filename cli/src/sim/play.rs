//! Playing a plan on the real clock: every pipeline as its own task, each step committed to the
//! store before its transition is handed on, with the truth rendered at that moment.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hookline_cistate::render::truncate_to_micros;
use hookline_cistate::{
    Build, CiStore, Outbox, OutboxTransition, PgStore, Transition, render, write_build,
    write_pipeline,
};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::error::CliError;
use crate::facts::Witness;
use crate::transition::{Accepted, Sink, TransitionSent};

use super::plan::{BuildPlan, Outcome, PipelinePlan, Plan};

/// What a run did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunSummary {
    /// Transitions handed to the sink.
    pub sent: usize,
    /// Transitions the sink accepted.
    pub accepted: usize,
    /// Transitions the sink refused for good (each was logged with its error).
    pub failed: usize,
    pub by_status: HashMap<&'static str, usize>,
}

/// Paces transitions to at most `rate` per second (simulate's `--rate`); `None` is unpaced.
#[derive(Debug)]
pub struct Pace {
    next: Mutex<Instant>,
    interval: Duration,
}

impl Pace {
    pub fn per_second(rate: f64) -> Option<Arc<Pace>> {
        (rate > 0.0).then(|| {
            Arc::new(Pace {
                next: Mutex::new(Instant::now()),
                interval: Duration::from_secs_f64(1.0 / rate),
            })
        })
    }

    async fn wait(&self) {
        let at = {
            let mut next = self.next.lock().await;
            let at = (*next).max(Instant::now());
            *next = at + self.interval;
            at
        };
        tokio::time::sleep_until(at).await;
    }
}

/// Everything a pipeline task needs.
#[derive(Clone)]
pub struct Runtime {
    pub store: Arc<dyn CiStore>,
    pub sink: Arc<dyn Sink>,
    /// Gets the truth of every transition and the sink's answer (the demo); `None` for simulate.
    pub witness: Option<Arc<dyn Witness>>,
    pub pace: Option<Arc<Pace>>,
    /// `simulate --via outbox`: each step commits the build, the pipeline and the transition's
    /// outbox row in one transaction of this store; the sink is not used.
    pub outbox: Option<PgStore>,
}

/// Plays every pipeline of `plan` on the real clock; returns when all are finished.
pub async fn run(plan: &Plan, runtime: Runtime) -> Result<RunSummary, CliError> {
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for pipeline in plan.pipelines.clone() {
        let runtime = runtime.clone();
        tasks.spawn(async move {
            tokio::time::sleep_until(start + pipeline.start_after).await;
            play_pipeline(pipeline, &runtime).await
        });
    }
    let mut summary = RunSummary::default();
    let mut first_error = None;
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(s)) => {
                summary.sent += s.sent;
                summary.accepted += s.accepted;
                summary.failed += s.failed;
                for (k, v) in s.by_status {
                    *summary.by_status.entry(k).or_default() += v;
                }
            }
            // A store failure stops that pipeline; the others go on, and the run reports it.
            Ok(Err(error)) => {
                tracing::error!(%error, "a simulated pipeline stopped");
                first_error.get_or_insert(error);
            }
            Err(join) => {
                first_error.get_or_insert(CliError::Internal(join.to_string()));
            }
        }
    }
    match first_error {
        Some(error) => Err(error),
        None => Ok(summary),
    }
}

/// A step of a pipeline: what happens to which build, when (offset from the pipeline's start).
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Step {
    Create(usize),
    Enqueue(usize),
    Start(usize),
    Finish(usize),
    /// A later stage will not run because an earlier one failed: GitLab marks it skipped (no hook).
    Skip(usize),
}

/// The pipeline's timeline: steps with their offsets, in order. Stages run one after the other;
/// a stage starts when every build of the previous one (retries included) has finished.
pub(super) fn timeline(p: &PipelinePlan) -> Vec<(Duration, Step)> {
    let mut steps = Vec::new();
    for (i, b) in p.builds.iter().enumerate() {
        if b.build.retries_count == 0 {
            steps.push((Duration::ZERO, Step::Create(i)));
        }
    }
    let mut stage_start = Duration::from_millis(2);
    let mut blocked = false;
    for firsts in &p.stages {
        if blocked {
            for &i in firsts {
                steps.push((stage_start, Step::Skip(i)));
            }
            continue;
        }
        let mut stage_end = stage_start;
        for &first in firsts {
            let mut at = stage_start;
            let mut current = Some(first);
            let mut last = first;
            while let Some(i) = current {
                let b = &p.builds[i];
                if b.build.retries_count > 0 {
                    steps.push((at, Step::Create(i)));
                    at += Duration::from_millis(1);
                }
                steps.push((at, Step::Enqueue(i)));
                at += b.queue;
                steps.push((at, Step::Start(i)));
                at += b.run;
                steps.push((at, Step::Finish(i)));
                at += Duration::from_millis(3);
                last = i;
                current = b.retried_by;
            }
            stage_end = stage_end.max(at);
            let b = &p.builds[last];
            if b.outcome != Outcome::Success && !b.build.allow_failure {
                blocked = true;
            }
        }
        stage_start = stage_end;
    }
    // Stable: steps at the same offset keep the order they were pushed in.
    steps.sort_by_key(|(at, _)| *at);
    steps
}

fn now() -> DateTime<Utc> {
    truncate_to_micros(Utc::now())
}

fn seconds(from: DateTime<Utc>, to: DateTime<Utc>) -> f64 {
    (to - from).num_microseconds().unwrap_or(0) as f64 / 1e6
}

/// The pipeline status GitLab would show for these builds (its composite status, simplified).
fn pipeline_status(builds: &[Build]) -> &'static str {
    let live: Vec<&str> = builds
        .iter()
        .map(|b| b.status.as_str())
        .filter(|s| *s != "skipped")
        .collect();
    if live.contains(&"running") {
        "running"
    } else if live.contains(&"pending") {
        if builds.iter().any(|b| b.started_at.is_some()) {
            "running"
        } else {
            "pending"
        }
    } else if live.contains(&"created") {
        if builds.iter().any(|b| b.status != "created") {
            "running"
        } else {
            "created"
        }
    } else if builds
        .iter()
        .any(|b| b.status == "failed" && !b.allow_failure && !is_retried(b, builds))
    {
        "failed"
    } else if live.contains(&"canceled") {
        "canceled"
    } else {
        "success"
    }
}

/// True when a later attempt of the same job exists.
fn is_retried(build: &Build, builds: &[Build]) -> bool {
    builds.iter().any(|other| {
        other.name == build.name
            && other.stage == build.stage
            && other.retries_count > build.retries_count
    })
}

async fn play_pipeline(plan: PipelinePlan, rt: &Runtime) -> Result<RunSummary, CliError> {
    let start = Instant::now();
    let mut pipeline = plan.pipeline.clone();
    // The builds this pipeline has created so far, in the order they were created.
    let mut live: Vec<Build> = Vec::new();
    let mut slot: HashMap<usize, usize> = HashMap::new();
    let mut summary = RunSummary::default();
    for (offset, step) in timeline(&plan) {
        tokio::time::sleep_until(start + offset).await;
        if let Some(pace) = &rt.pace {
            pace.wait().await;
        }
        let t = now();
        let (index, event) = match step {
            Step::Create(i) => {
                let mut build = plan.builds[i].build.clone();
                build.created_at = t;
                slot.insert(i, live.len());
                live.push(build);
                (i, Some(0))
            }
            Step::Enqueue(i) => {
                let b = &mut live[slot[&i]];
                b.status = "pending".into();
                b.queued_at = Some(t);
                (i, Some(1))
            }
            Step::Start(i) => {
                let b = &mut live[slot[&i]];
                b.status = "running".into();
                b.runner_id = Some(plan.builds[i].runner_id);
                b.started_at = Some(t);
                b.queued_duration = b.queued_at.map(|q| seconds(q, t));
                (i, Some(2))
            }
            Step::Finish(i) => {
                let p = &plan.builds[i];
                let b = &mut live[slot[&i]];
                b.status = match p.outcome {
                    Outcome::Success => "success",
                    Outcome::Failed => "failed",
                    Outcome::Canceled => "canceled",
                }
                .into();
                b.finished_at = Some(t);
                b.duration = b.started_at.map(|s| seconds(s, t));
                b.failure_reason = p.failure_reason.clone();
                (i, Some(3))
            }
            Step::Skip(i) => {
                let mut build = plan.builds[i].build.clone();
                build.created_at = t;
                build.status = "skipped".into();
                match slot.get(&i) {
                    Some(&s) => live[s].status = "skipped".into(),
                    None => {
                        slot.insert(i, live.len());
                        live.push(build);
                    }
                }
                (i, None)
            }
        };
        let status = pipeline_status(&live);
        if pipeline.status != status {
            if pipeline.started_at.is_none() && status == "running" {
                pipeline.started_at = Some(t);
            }
            if matches!(status, "success" | "failed" | "canceled") {
                pipeline.finished_at = Some(t);
                pipeline.duration = pipeline.started_at.map(|s| (t - s).num_seconds());
            }
            pipeline.status = status.into();
        }
        let build = &live[slot[&index]];
        if let Some(outbox) = &rt.outbox {
            let Some(status) =
                commit_with_outbox(outbox, &pipeline, build, event.is_some()).await?
            else {
                continue;
            };
            summary.sent += 1;
            summary.accepted += 1;
            *summary.by_status.entry(status).or_default() += 1;
            continue;
        }
        // Commit first, notify second, like a real CI.
        rt.store.upsert_pipeline(&pipeline).await?;
        rt.store.upsert_build(build).await?;
        let Some(n) = event else { continue };
        summary.sent += 1;
        let sent = transition(rt, &plan.builds[index], n, build.id).await?;
        let status_name = sent.0.status.as_str();
        *summary.by_status.entry(status_name).or_default() += 1;
        match sent.1 {
            Ok(_) => summary.accepted += 1,
            Err(_) => summary.failed += 1,
        }
    }
    Ok(summary)
}

/// The outbox way: the pipeline, the build and (for a transition that sends a hook) its outbox
/// row in one transaction, so the transition is committed exactly when the state is. The facts
/// are read from the build row inside the transaction. Returns the status recorded.
async fn commit_with_outbox(
    store: &PgStore,
    pipeline: &hookline_cistate::Pipeline,
    build: &Build,
    transition: bool,
) -> Result<Option<&'static str>, CliError> {
    let mut tx = store
        .pool()
        .begin()
        .await
        .map_err(|e| CliError::Unavailable(format!("CI state store: {e}")))?;
    write_pipeline(&mut *tx, pipeline).await?;
    write_build(&mut *tx, build).await?;
    let recorded = if transition {
        let current = Transition::of_current(build).ok_or_else(|| {
            CliError::Internal(format!("build {} has status {}", build.id, build.status))
        })?;
        let event_id =
            Outbox::record(&mut *tx, &OutboxTransition::new(build.id, current.status)).await?;
        tracing::debug!(build_id = build.id, status = %current.status, %event_id, "transition recorded in the outbox");
        Some(current.status.as_str())
    } else {
        None
    };
    tx.commit()
        .await
        .map_err(|e| CliError::Unavailable(format!("CI state store: {e}")))?;
    Ok(recorded)
}

/// Reads the committed state back, records the truth, and hands the transition to the sink.
async fn transition(
    rt: &Runtime,
    plan: &BuildPlan,
    n: usize,
    build_id: i64,
) -> Result<(TransitionSent, Result<Accepted, CliError>), CliError> {
    // The truth and the transition's facts come from the store as committed, so timestamps have
    // the store's precision, exactly as the producer and the consumer will read them.
    let snapshot =
        rt.store.snapshot(build_id).await?.ok_or_else(|| {
            CliError::Internal(format!("build {build_id} vanished from the store"))
        })?;
    let current = Transition::of_current(&snapshot.build).ok_or_else(|| {
        CliError::Internal(format!(
            "build {build_id} has status {}",
            snapshot.build.status
        ))
    })?;
    let sent = TransitionSent {
        event_id: plan.event_ids[n],
        build_id,
        project_id: snapshot.build.project_id,
        pipeline_id: snapshot.build.pipeline_id,
        status: current.status,
        occurred_at: now(),
        facts: current.facts.clone(),
    };
    if let Some(witness) = &rt.witness {
        witness.expect(
            &sent,
            render(&snapshot, &current),
            crate::facts::Facts::of(&snapshot, &sent),
        );
    }
    let answer = rt.sink.send(&sent).await;
    if let Some(witness) = &rt.witness {
        witness.answered(sent.event_id, &answer);
    }
    if let Err(error) = &answer {
        tracing::warn!(event_id = %sent.event_id, build_id, status = %sent.status, %error, "transition not accepted");
    }
    Ok((sent, answer))
}
