//! The simulated CI: a seeded world of namespaces, projects, users and runners, and pipelines
//! whose builds go through GitLab's transitions in real (but fast) time.
//!
//! A plan is drawn from the seed up front ([`plan`]): which builds exist, in which stages, how long
//! each waits in the queue and runs, how it ends, which failures are retried (a retry is a NEW
//! build with a new id and `retries_count + 1`, as in GitLab) and every event id. Running it
//! ([`run`]) plays every pipeline as its own task on the real clock. Each step first commits the
//! new state to the store (build and pipeline), like a real CI commits before it notifies, then
//! computes the *truth* (the Job Hook rendered from the state at that very moment, what a perfect
//! system would deliver) and hands the transition to a [`Sink`].
//!
//! One pipeline's steps run one after the other and never overlap: the pipeline row is shared by
//! its builds, so a step of build A must not change what build B's transition renders between
//! B's commit and B's emit. Different pipelines share nothing that renders, so they run in
//! parallel.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use hookline_cistate::render::truncate_to_micros;
use hookline_cistate::{
    Build, CiStore, Environment, Namespace, NewHook, Pipeline, Project, Runner, SourcePipeline,
    Transition, User, render,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;
use tokio::time::Instant;
use uuid::Uuid;

use crate::error::CliError;
pub use crate::transition::{Accepted, Sink, TransitionSent, Witness};

/// What to simulate.
#[derive(Debug, Clone)]
pub struct SimSpec {
    pub projects: usize,
    /// Builds in total, retries and skipped ones included.
    pub builds: usize,
    pub seed: u64,
    /// Added to every id, so several runs can share one database.
    pub id_base: i64,
    /// Pipelines start spread over this long.
    pub spread: Duration,
}

impl SimSpec {
    /// Pipelines start over about 12 ms per build: with a few builds alive per pipeline this keeps
    /// a few dozen builds in flight, and 400 builds take about five seconds.
    pub fn spread_for(builds: usize) -> Duration {
        Duration::from_millis(12 * builds as u64)
    }
}

/// How a build ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failed,
    Canceled,
}

/// One build of the plan, with its timing drawn from the seed.
#[derive(Debug, Clone)]
pub struct BuildPlan {
    pub build: Build,
    pub runner_id: i64,
    /// Time spent pending before a runner picks it up.
    pub queue: Duration,
    /// Time spent running.
    pub run: Duration,
    pub outcome: Outcome,
    pub failure_reason: Option<String>,
    /// One event id per hook-sending transition, in order: created, pending, running, finished.
    pub event_ids: [Uuid; 4],
    /// The retry this build gets when it fails (index into the pipeline's builds).
    pub retried_by: Option<usize>,
}

/// One pipeline of the plan: its builds by stage.
#[derive(Debug, Clone)]
pub struct PipelinePlan {
    pub pipeline: Pipeline,
    pub start_after: Duration,
    pub builds: Vec<BuildPlan>,
    /// `stages[k]` lists the first attempts of stage k (indexes into `builds`).
    pub stages: Vec<Vec<usize>>,
}

/// The whole simulated world.
#[derive(Debug, Clone)]
pub struct Plan {
    pub namespaces: Vec<Namespace>,
    pub projects: Vec<Project>,
    pub users: Vec<User>,
    pub runners: Vec<Runner>,
    pub pipelines: Vec<PipelinePlan>,
}

impl Plan {
    pub fn build_count(&self) -> usize {
        self.pipelines.iter().map(|p| p.builds.len()).sum()
    }
}

const GROUPS: &[(&str, &str)] = &[
    ("Platform", "platform"),
    ("Payments", "payments"),
    ("Mobile", "mobile"),
    ("Data", "data"),
    ("Security", "security"),
];
const REPOS: &[&str] = &[
    "api",
    "web",
    "billing",
    "ledger",
    "ios-app",
    "android-app",
    "etl",
    "warehouse",
    "scanner",
    "gateway",
    "docs",
    "infra",
    "search",
    "notifier",
    "auth",
];
const PEOPLE: &[(&str, &str)] = &[
    ("Ada Lovelace", "ada"),
    ("Grace Hopper", "grace"),
    ("Alan Turing", "alan"),
    ("Barbara Liskov", "barbara"),
    ("Ken Thompson", "ken"),
    ("Margaret Hamilton", "margaret"),
];
const STAGES: &[(&str, &[&str])] = &[
    ("build", &["compile", "docker-build", "assets"]),
    (
        "test",
        &[
            "rspec 1/3",
            "rspec 2/3",
            "rspec 3/3",
            "lint",
            "unit",
            "integration",
        ],
    ),
    ("deploy", &["deploy-staging", "publish"]),
];
const FAILURE_REASONS: &[&str] = &[
    "script_failure",
    "runner_system_failure",
    "stuck_or_timeout_failure",
];

fn event_id(rng: &mut StdRng) -> Uuid {
    uuid::Builder::from_random_bytes(rng.random()).into_uuid()
}

fn sha(rng: &mut StdRng) -> String {
    let bytes: [u8; 20] = rng.random();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn millis(rng: &mut StdRng, range: std::ops::Range<u64>) -> Duration {
    Duration::from_millis(rng.random_range(range))
}

/// Draws the world and its pipelines from `spec.seed`. The same spec gives the same plan.
pub fn plan(spec: &SimSpec) -> Plan {
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let base = spec.id_base;
    let projects_wanted = spec.projects.max(1);
    let namespaces: Vec<Namespace> = GROUPS
        .iter()
        .take(projects_wanted.div_ceil(4).clamp(1, GROUPS.len()))
        .enumerate()
        .map(|(i, (name, path))| Namespace {
            id: base + 1 + i as i64,
            name: (*name).into(),
            path: (*path).into(),
        })
        .collect();
    let projects: Vec<Project> = (0..projects_wanted)
        .map(|i| {
            let namespace = &namespaces[i % namespaces.len()];
            let repo = REPOS[i % REPOS.len()];
            let path = if i < REPOS.len() {
                repo.to_owned()
            } else {
                format!("{repo}-{}", i / REPOS.len() + 1)
            };
            let full = format!("{}/{}", namespace.path, path);
            Project {
                id: base + 100 + i as i64,
                namespace_id: namespace.id,
                name: path.replace('-', " "),
                path: path.clone(),
                description: rng.random_bool(0.7).then(|| format!("The {path} service")),
                web_url: format!("https://ci.example.com/{full}"),
                avatar_url: None,
                git_ssh_url: format!("git@ci.example.com:{full}.git"),
                git_http_url: format!("https://ci.example.com/{full}.git"),
                visibility_level: [0, 10, 20][rng.random_range(0..3)],
                default_branch: "main".into(),
            }
        })
        .collect();
    let users: Vec<User> = PEOPLE
        .iter()
        .enumerate()
        .map(|(i, (name, username))| User {
            id: base + 10_000 + i as i64,
            name: (*name).into(),
            username: (*username).into(),
            avatar_url: Some(format!(
                "https://ci.example.com/uploads/user/avatar/{i}/{username}.png"
            )),
            public_email: (i % 2 == 0).then(|| format!("{username}@example.com")),
            blocked: false,
        })
        .collect();
    let runners: Vec<Runner> = [
        (
            "linux-amd64 shared runner #1",
            "instance_type",
            true,
            &["linux", "docker", "amd64"][..],
        ),
        (
            "linux-amd64 shared runner #2",
            "instance_type",
            true,
            &["linux", "docker", "amd64"][..],
        ),
        (
            "arm64 group runner",
            "group_type",
            false,
            &["linux", "arm64"][..],
        ),
        (
            "macos project runner",
            "project_type",
            false,
            &["macos", "xcode"][..],
        ),
    ]
    .iter()
    .enumerate()
    .map(|(i, (description, kind, shared, tags))| Runner {
        id: base + 20_000 + i as i64,
        description: (*description).into(),
        runner_type: (*kind).into(),
        active: true,
        is_shared: *shared,
        tags: tags.iter().map(|t| (*t).to_owned()).collect(),
    })
    .collect();

    let mut pipelines = Vec::new();
    let mut builds_left = spec.builds;
    let mut next_build_id = base + 1_000_000;
    let mut pipeline_index = 0usize;
    while builds_left > 0 {
        let project = &projects[pipeline_index % projects.len()];
        let user = &users[rng.random_range(0..users.len())];
        let pipeline_id = base + 100_000 + pipeline_index as i64;
        let git_ref = if rng.random_bool(0.6) {
            "main".to_owned()
        } else {
            format!("feature/{}", rng.random_range(100..999))
        };
        let source = (pipeline_index > 0 && rng.random_bool(0.1)).then(|| SourcePipeline {
            project_id: projects[0].id,
            project_web_url: projects[0].web_url.clone(),
            project_path_with_namespace: format!("{}/{}", namespaces[0].path, projects[0].path),
            pipeline_id: base + 100_000,
            job_id: base + 1_000_000,
        });
        let pipeline = Pipeline {
            id: pipeline_id,
            project_id: project.id,
            user_id: user.id,
            name: rng.random_bool(0.3).then(|| "Merge train".to_owned()),
            git_ref,
            tag: false,
            sha: sha(&mut rng),
            before_sha: sha(&mut rng),
            status: "created".into(),
            started_at: None,
            finished_at: None,
            duration: None,
            commit_message: format!("Change {} of {}", pipeline_index + 1, project.name),
            commit_author_name: user.name.clone(),
            commit_author_email: format!("{}@example.com", user.username),
            source,
        };
        let mut builds: Vec<BuildPlan> = Vec::new();
        let mut stages = Vec::new();
        let stage_count = rng.random_range(1..=STAGES.len());
        let mut blocked = false;
        for (stage, names) in STAGES.iter().take(stage_count) {
            if builds_left == 0 {
                break;
            }
            let jobs = rng.random_range(1..=names.len().min(3)).min(builds_left);
            let mut firsts = Vec::new();
            for name in names.iter().take(jobs) {
                if builds_left == 0 {
                    break;
                }
                let index = builds.len();
                firsts.push(index);
                let mut retries_count = 0;
                let mut current = index;
                builds.push(draw_build(
                    &mut rng,
                    next_build_id,
                    &pipeline,
                    stage,
                    name,
                    0,
                    &runners,
                ));
                next_build_id += 1;
                builds_left -= 1;
                // GitLab retries failed jobs (retry: 2): each retry is a new build.
                while !blocked
                    && builds[current].outcome == Outcome::Failed
                    && retries_count < 2
                    && builds_left > 0
                    && rng.random_bool(0.6)
                {
                    retries_count += 1;
                    let retry = draw_build(
                        &mut rng,
                        next_build_id,
                        &pipeline,
                        stage,
                        name,
                        retries_count,
                        &runners,
                    );
                    next_build_id += 1;
                    builds_left -= 1;
                    builds.push(retry);
                    let retry_index = builds.len() - 1;
                    builds[current].retried_by = Some(retry_index);
                    current = retry_index;
                }
            }
            // A stage whose last attempt of a required job did not succeed skips the later
            // stages (they are created, then skipped, and never retried): `timeline` agrees.
            blocked |= firsts.iter().any(|&first| {
                let mut last = first;
                while let Some(r) = builds[last].retried_by {
                    last = r;
                }
                builds[last].outcome != Outcome::Success && !builds[last].build.allow_failure
            });
            stages.push(firsts);
        }
        pipelines.push(PipelinePlan {
            pipeline,
            start_after: Duration::ZERO,
            builds,
            stages,
        });
        pipeline_index += 1;
    }
    let count = pipelines.len().max(1) as u32;
    for (i, p) in pipelines.iter_mut().enumerate() {
        p.start_after = spec.spread * i as u32 / count;
    }
    Plan {
        namespaces,
        projects,
        users,
        runners,
        pipelines,
    }
}

fn draw_build(
    rng: &mut StdRng,
    id: i64,
    pipeline: &Pipeline,
    stage: &str,
    name: &str,
    retries_count: i32,
    runners: &[Runner],
) -> BuildPlan {
    let roll: f64 = rng.random();
    let outcome = if roll < 0.72 {
        Outcome::Success
    } else if roll < 0.94 {
        Outcome::Failed
    } else {
        Outcome::Canceled
    };
    let failure_reason = (outcome == Outcome::Failed)
        .then(|| FAILURE_REASONS[rng.random_range(0..FAILURE_REASONS.len())].to_owned());
    let environment = (stage == "deploy").then(|| Environment {
        name: if name == "publish" {
            "production"
        } else {
            "staging"
        }
        .into(),
        action: "start".into(),
        deployment_tier: if name == "publish" {
            "production"
        } else {
            "staging"
        }
        .into(),
    });
    // Placeholder timestamps: the real ones are taken from the clock when the build is created.
    let epoch = DateTime::<Utc>::UNIX_EPOCH;
    BuildPlan {
        build: Build {
            id,
            project_id: pipeline.project_id,
            pipeline_id: pipeline.id,
            user_id: pipeline.user_id,
            runner_id: None,
            name: name.into(),
            stage: stage.into(),
            status: "created".into(),
            created_at: epoch,
            queued_at: None,
            started_at: None,
            finished_at: None,
            duration: None,
            queued_duration: None,
            allow_failure: name == "lint",
            failure_reason: None,
            retries_count,
            environment,
        },
        runner_id: runners[rng.random_range(0..runners.len())].id,
        queue: millis(rng, 5..80),
        run: millis(rng, 20..400),
        outcome,
        failure_reason,
        event_ids: [event_id(rng), event_id(rng), event_id(rng), event_id(rng)],
        retried_by: None,
    }
}

/// Writes the world (everything but pipelines and builds) and one hook per project, reusing a
/// hook the project already has at the same URL.
pub async fn write_world(
    store: &dyn CiStore,
    plan: &Plan,
    hook_for: &dyn Fn(&Project) -> NewHook,
) -> Result<Vec<hookline_cistate::Hook>, CliError> {
    for n in &plan.namespaces {
        store.upsert_namespace(n).await?;
    }
    for p in &plan.projects {
        store.upsert_project(p).await?;
    }
    for u in &plan.users {
        store.upsert_user(u).await?;
    }
    for r in &plan.runners {
        store.upsert_runner(r).await?;
    }
    // A project that already has a hook at the same URL keeps it: writing the world again (a
    // second `simulate` against the same database) must not multiply deliveries.
    let mut hooks = Vec::with_capacity(plan.projects.len());
    for p in &plan.projects {
        let wanted = hook_for(p);
        let existing = store
            .list_hooks(Some(p.id))
            .await?
            .into_iter()
            .find(|h| h.url == wanted.url);
        let hook = match existing {
            Some(hook) => hook,
            None => store.add_hook(&wanted).await?,
        };
        hooks.push(hook);
    }
    Ok(hooks)
}

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
enum Step {
    Create(usize),
    Enqueue(usize),
    Start(usize),
    Finish(usize),
    /// A later stage will not run because an earlier one failed: GitLab marks it skipped (no hook).
    Skip(usize),
}

/// The pipeline's timeline: steps with their offsets, in order. Stages run one after the other;
/// a stage starts when every build of the previous one (retries included) has finished.
fn timeline(p: &PipelinePlan) -> Vec<(Duration, Step)> {
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
        // Commit first, notify second, like a real CI.
        let build = &live[slot[&index]];
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
        witness.expect(&sent, render(&snapshot, &current));
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

#[cfg(test)]
mod tests {
    use async_trait::async_trait;
    use hookline_schemas::PayloadTiming;

    use super::*;
    use crate::ledger::Ledger;

    fn spec(seed: u64) -> SimSpec {
        SimSpec {
            projects: 5,
            builds: 60,
            seed,
            id_base: 0,
            spread: Duration::from_millis(100),
        }
    }

    #[test]
    fn the_same_seed_draws_the_same_plan() {
        let a = plan(&spec(7));
        let b = plan(&spec(7));
        let ids = |p: &Plan| -> Vec<(i64, Uuid, Duration)> {
            p.pipelines
                .iter()
                .flat_map(|p| p.builds.iter().map(|b| (b.build.id, b.event_ids[0], b.run)))
                .collect()
        };
        assert_eq!(ids(&a), ids(&b));
        assert_ne!(ids(&a), ids(&plan(&spec(8))));
    }

    #[test]
    fn plans_exactly_the_builds_asked_for_retries_included() {
        for seed in 0..20 {
            let p = plan(&spec(seed));
            assert_eq!(p.build_count(), 60, "seed {seed}");
            assert_eq!(p.projects.len(), 5);
        }
    }

    #[test]
    fn a_retry_is_a_new_build_with_one_more_retry() {
        let p = plan(&SimSpec {
            builds: 400,
            ..spec(3)
        });
        let mut retries = 0;
        for pipeline in &p.pipelines {
            for b in &pipeline.builds {
                if let Some(r) = b.retried_by {
                    let retry = &pipeline.builds[r];
                    assert_eq!(b.outcome, Outcome::Failed);
                    assert_ne!(retry.build.id, b.build.id);
                    assert_eq!(retry.build.retries_count, b.build.retries_count + 1);
                    assert_eq!(retry.build.name, b.build.name);
                    retries += 1;
                }
            }
        }
        assert!(retries > 0, "400 builds should include retries");
    }

    #[test]
    fn a_timeline_walks_each_build_through_the_hook_transitions_in_order() {
        let p = plan(&SimSpec {
            builds: 200,
            ..spec(11)
        });
        for pipeline in &p.pipelines {
            let steps = timeline(pipeline);
            for (i, _) in pipeline.builds.iter().enumerate() {
                let mine: Vec<&'static str> = steps
                    .iter()
                    .filter_map(|(_, s)| match *s {
                        Step::Create(b) if b == i => Some("created"),
                        Step::Enqueue(b) if b == i => Some("pending"),
                        Step::Start(b) if b == i => Some("running"),
                        Step::Finish(b) if b == i => Some("finished"),
                        Step::Skip(b) if b == i => Some("skipped"),
                        _ => None,
                    })
                    .collect();
                assert!(
                    mine == ["created", "pending", "running", "finished"]
                        || mine == ["created", "skipped"],
                    "build {i}: {mine:?}"
                );
            }
        }
    }

    /// Stands in for the producer: renders from the store when it is handed the transition
    /// (inline, even projects) or keeps it to render after the whole run (deferred, odd ones).
    struct RenderingSink {
        store: Arc<hookline_cistate::MemoryStore>,
        ledger: Arc<Ledger>,
        deferred: std::sync::Mutex<Vec<TransitionSent>>,
    }

    impl RenderingSink {
        async fn deliver(&self, t: &TransitionSent) {
            let snapshot = self.store.snapshot(t.build_id).await.unwrap().unwrap();
            let body = render(
                &snapshot,
                &Transition {
                    status: t.status,
                    facts: t.facts.clone(),
                },
            );
            self.ledger.record(crate::ledger::Delivery {
                hook_id: t.project_id,
                event_id: Some(t.event_id),
                idempotency_key: Some(t.event_id.to_string()),
                signature: crate::ledger::SignatureCheck::NotSigned,
                body,
                received_at: Utc::now(),
            });
        }
    }

    #[async_trait]
    impl Sink for RenderingSink {
        async fn send(&self, t: &TransitionSent) -> Result<Accepted, CliError> {
            let timing = if t.project_id % 2 == 0 {
                self.deliver(t).await;
                PayloadTiming::Inline
            } else {
                self.deferred.lock().unwrap().push(t.clone());
                PayloadTiming::Deferred
            };
            Ok(Accepted {
                timing: Some(timing),
                ..Accepted::default()
            })
        }
    }

    #[tokio::test]
    async fn rendering_at_the_transition_matches_the_truth_and_rendering_later_does_not() {
        let store = Arc::new(hookline_cistate::MemoryStore::new());
        let ledger = Arc::new(Ledger::new());
        let plan = plan(&SimSpec {
            builds: 80,
            ..spec(5)
        });
        write_world(store.as_ref(), &plan, &|p| NewHook {
            project_id: p.id,
            url: format!("http://127.0.0.1:1/hooks/{}", p.id),
            job_events: true,
            ..NewHook::default()
        })
        .await
        .unwrap();
        for p in &plan.projects {
            ledger.add_hook(p.id, p.id);
        }
        let sink = Arc::new(RenderingSink {
            store: store.clone(),
            ledger: ledger.clone(),
            deferred: Default::default(),
        });
        let summary = run(
            &plan,
            Runtime {
                store: store.clone(),
                sink: sink.clone(),
                witness: Some(ledger.clone()),
                pace: None,
            },
        )
        .await
        .unwrap();
        assert_eq!(summary.failed, 0);
        assert_eq!(summary.sent, summary.accepted);
        let deferred = std::mem::take(&mut *sink.deferred.lock().unwrap());
        for t in &deferred {
            sink.deliver(t).await;
        }
        let report = ledger.report();
        assert_eq!(report.events, summary.sent);
        assert_eq!(report.missing, 0);
        assert!(report.by_timing.inline.deliveries > 0);
        assert_eq!(report.by_timing.inline.stale, 0, "{report:#?}");
        assert!(report.by_timing.deferred.stale > 0, "{report:#?}");
        assert!(
            report.by_timing.deferred.stale < report.by_timing.deferred.deliveries,
            "a build's last event rendered after the run is fresh unless its pipeline moved on"
        );
    }
}
