//! The one Job Hook renderer, used by the producer (inline) and the consumer (deferred).
//!
//! A pure function: the same snapshot and transition give the same bytes, whichever store the
//! snapshot came from. The transition's own facts are *pinned* over the snapshot (status,
//! started/finished times, durations, failure reason, and no runner for `created`), as GitLab's
//! bulk worker does, so a deferred render of an old event still says what that event said; what
//! is not pinned (pipeline status, runner, names) comes from the snapshot as it is.

use chrono::{DateTime, Utc};
use hookline_schemas::job_hook::{
    HookCommit, HookEnvironment, HookProject, HookRepository, HookRunner, HookSourcePipeline,
    HookSourceProject, HookUser, JobHook, OBJECT_KIND, gitlab_time, iso_time,
};
use hookline_schemas::{BuildEvent, BuildStatus, TransitionFacts};

use crate::model::{Build, RenderSnapshot};

/// What a transition says about its build: the status it reached and the facts at that moment.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub status: BuildStatus,
    pub facts: TransitionFacts,
}

impl Transition {
    /// The transition a build's current row describes, if its status is one that sends hooks.
    pub fn of_current(build: &Build) -> Option<Transition> {
        Some(Transition {
            status: build.status.parse().ok()?,
            facts: TransitionFacts {
                started_at: build.started_at,
                finished_at: build.finished_at,
                duration: build.duration,
                queued_duration: build.queued_duration,
                failure_reason: build.failure_reason.clone(),
            },
        })
    }

    pub fn of_event(event: &BuildEvent) -> Transition {
        Transition {
            status: event.status,
            facts: event.facts.clone(),
        }
    }
}

/// GitLab reports `unknown_failure` for builds that have no failure reason.
const NO_FAILURE_REASON: &str = "unknown_failure";
const REDACTED_EMAIL: &str = "[REDACTED]";

/// The Job Hook for `snapshot` with `transition` pinned.
pub fn job_hook(snapshot: &RenderSnapshot, transition: &Transition) -> JobHook {
    let RenderSnapshot {
        build,
        pipeline,
        project,
        namespace,
        user,
        runner,
    } = snapshot;
    // GitLab's hook data for a created build has no start, end, durations, failure reason or
    // runner, whatever the row says by the time it is rendered.
    let no_facts = TransitionFacts::default();
    let created = transition.status == BuildStatus::Created;
    let facts = if created {
        &no_facts
    } else {
        &transition.facts
    };
    let runner = match transition.status {
        // A created build has no runner yet, whatever the row says now.
        BuildStatus::Created => None,
        _ => runner.as_ref().map(|r| HookRunner {
            id: r.id,
            description: r.description.clone(),
            runner_type: r.runner_type.clone(),
            active: r.active,
            is_shared: r.is_shared,
            tags: r.tags.clone(),
        }),
    };
    JobHook {
        object_kind: OBJECT_KIND.to_owned(),
        git_ref: pipeline.git_ref.clone(),
        tag: pipeline.tag,
        before_sha: pipeline.before_sha.clone(),
        sha: pipeline.sha.clone(),
        retries_count: build.retries_count.into(),
        build_id: build.id,
        build_name: build.name.clone(),
        build_stage: build.stage.clone(),
        build_status: transition.status.as_str().to_owned(),
        build_created_at: Some(gitlab_time(build.created_at)),
        build_started_at: facts.started_at.map(gitlab_time),
        build_finished_at: facts.finished_at.map(gitlab_time),
        build_created_at_iso: Some(iso_time(build.created_at)),
        build_started_at_iso: facts.started_at.map(iso_time),
        build_finished_at_iso: facts.finished_at.map(iso_time),
        build_duration: facts.duration,
        build_queued_duration: facts.queued_duration,
        build_allow_failure: build.allow_failure,
        build_failure_reason: (!created).then(|| {
            facts
                .failure_reason
                .clone()
                .unwrap_or_else(|| NO_FAILURE_REASON.to_owned())
        }),
        pipeline_id: pipeline.id,
        runner,
        project_id: project.id,
        project_name: format!("{} / {}", namespace.name, project.name),
        user: HookUser {
            id: user.id,
            name: user.name.clone(),
            username: user.username.clone(),
            avatar_url: user.avatar_url.clone(),
            email: user
                .public_email
                .clone()
                .unwrap_or_else(|| REDACTED_EMAIL.to_owned()),
        },
        commit: HookCommit {
            id: pipeline.id,
            name: pipeline.name.clone(),
            sha: pipeline.sha.clone(),
            message: pipeline.commit_message.clone(),
            author_name: pipeline.commit_author_name.clone(),
            author_email: pipeline.commit_author_email.clone(),
            author_url: format!("mailto:{}", pipeline.commit_author_email),
            status: pipeline.status.clone(),
            duration: pipeline.duration,
            started_at: pipeline.started_at.map(gitlab_time),
            finished_at: pipeline.finished_at.map(gitlab_time),
            started_at_iso: pipeline.started_at.map(iso_time),
            finished_at_iso: pipeline.finished_at.map(iso_time),
        },
        repository: HookRepository {
            name: project.name.clone(),
            url: project.git_ssh_url.clone(),
            description: project.description.clone(),
            homepage: project.web_url.clone(),
            git_http_url: project.git_http_url.clone(),
            git_ssh_url: project.git_ssh_url.clone(),
            visibility_level: project.visibility_level,
        },
        project: HookProject {
            id: project.id,
            name: project.name.clone(),
            description: project.description.clone(),
            web_url: project.web_url.clone(),
            avatar_url: project.avatar_url.clone(),
            git_ssh_url: project.git_ssh_url.clone(),
            git_http_url: project.git_http_url.clone(),
            namespace: namespace.name.clone(),
            visibility_level: project.visibility_level,
            path_with_namespace: format!("{}/{}", namespace.path, project.path),
            default_branch: project.default_branch.clone(),
            ci_config_path: None,
        },
        environment: build.environment.as_ref().map(|e| HookEnvironment {
            name: e.name.clone(),
            action: e.action.clone(),
            deployment_tier: e.deployment_tier.clone(),
        }),
        source_pipeline: pipeline.source.as_ref().map(|s| HookSourcePipeline {
            project: HookSourceProject {
                id: s.project_id,
                web_url: s.project_web_url.clone(),
                path_with_namespace: s.project_path_with_namespace.clone(),
            },
            job_id: s.job_id,
            pipeline_id: s.pipeline_id,
        }),
    }
}

/// The Job Hook body as it is POSTed.
pub fn render(snapshot: &RenderSnapshot, transition: &Transition) -> Vec<u8> {
    serde_json::to_vec(&job_hook(snapshot, transition))
        .expect("a JobHook has only string keys and finite numbers")
}

/// True when a deferred render shows a build that has moved on since the event: the receiver
/// gets the event's status pinned, but everything not pinned is from a later moment.
pub fn is_stale(snapshot: &RenderSnapshot, event_status: BuildStatus) -> bool {
    snapshot.build.status != event_status.as_str()
}

/// Timestamps on the wire keep microseconds; a store may keep less. Both stores keep
/// microseconds (PostgreSQL's `timestamptz` precision), so renders agree across them.
pub fn truncate_to_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    use chrono::{DurationRound, TimeDelta};
    t.duration_trunc(TimeDelta::microseconds(1)).unwrap_or(t)
}
/// Why a build's transitions send no hook at all: GitLab's rule, kept beside the renderer so
/// that the producer (at the transition) and the consumer (rendering a legacy event later) apply
/// the same one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoHook {
    /// The build's user is blocked: GitLab sends no hooks for builds of blocked users.
    UserBlocked { user_id: i64 },
}

impl NoHook {
    /// A short stable name, for the API's `skipped` field, metrics labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NoHook::UserBlocked { .. } => "user_blocked",
        }
    }
}

impl std::fmt::Display for NoHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoHook::UserBlocked { .. } => f.write_str("the build's user is blocked"),
        }
    }
}

/// Whether `snapshot`'s build sends no hook, and why.
pub fn no_hook(snapshot: &RenderSnapshot) -> Option<NoHook> {
    snapshot.user.blocked.then_some(NoHook::UserBlocked {
        user_id: snapshot.user.id,
    })
}
