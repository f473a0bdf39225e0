//! Drawing a plan from the seed (pure), and writing its world to a store.

use std::time::Duration;

use chrono::{DateTime, Utc};
use hookline_cistate::{
    Build, CiStore, Environment, Namespace, NewHook, Pipeline, Project, Runner, SourcePipeline,
    User,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use uuid::Uuid;

use crate::error::CliError;

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
