//! The Job Hook against GitLab's *documented* example, value by value.
//!
//! `oracle/gitlab_docs_job_event.json` is the "Job events" payload example of GitLab's
//! `doc/user/project/integrations/webhook_events.md` (gitlabhq/gitlabhq), made valid JSON: its
//! two `// ...` comments and the trailing comma after `source_pipeline` removed, nothing else
//! changed. hookline follows GitLab's source (`oracle/gitlab_job_hook.rs` names it) where the
//! example disagrees with it; every such field is listed in [`DISPUTED`] with the reason, and
//! `docs/gitlab-deviations.md` explains each. Every other field of the example is compared by
//! value (after JSON parsing, so key order and `\u0026` against `&` do not matter here; the
//! byte-level oracle pins those): the build below is the example's build, and hookline's body for
//! it must carry the example's values.

use chrono::{DateTime, TimeZone, Utc};
use hookline_cistate::{
    Build, Namespace, Pipeline, Project, RenderSnapshot, Runner, SourcePipeline, Transition, User,
    render,
};
use hookline_schemas::{BuildStatus, TransitionFacts};
use serde_json::Value;

const EXAMPLE: &str = include_str!("oracle/gitlab_docs_job_event.json");

/// Fields of the example hookline deliberately renders otherwise (JSON pointers, prefixes
/// included: `/runner` covers the runner's fields), and why.
const DISPUTED: &[(&str, &str)] = &[
    (
        "/build_created_at",
        "time format: the plain times reach receivers as Ruby's Time#to_s in UTC (\"2021-02-23 02:41:37 UTC\"), because the payload crosses Sidekiq's JSON as strings (spec/workers/ci/execute_build_hooks_worker_spec.rb); the example shows an ISO 8601 value with milliseconds",
    ),
    (
        "/build_queued_duration",
        "the created event: GitLab's hook data for a created build sets it to nil (build_created_hook_data in app/workers/ci/execute_pipeline_build_hooks_worker.rb); the example shows 1095.588715",
    ),
    (
        "/build_failure_reason",
        "the created event: nil in build_created_hook_data; the example shows script_failure",
    ),
    (
        "/runner",
        "the created event: nil in build_created_hook_data (a created build has no runner yet); the example shows one",
    ),
    (
        "/project_name",
        "lib/gitlab/data_builder/build.rb sends project.full_name, \"Gitlab Org / Gitlab Test\"; the example shows the path",
    ),
    (
        "/repository/name",
        "the data builder sends project.name for both repository.name and project.name; the example shows two different names for one project",
    ),
];

fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32, ms: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap() + chrono::Duration::milliseconds(ms)
}

/// The example's build and everything around it, as hookline's CI state holds it.
fn example_snapshot() -> RenderSnapshot {
    let namespace = Namespace {
        id: 9,
        name: "Gitlab Org".into(),
        path: "gitlab-org".into(),
    };
    let project = Project {
        id: 380,
        namespace_id: namespace.id,
        name: "Gitlab Test".into(),
        path: "gitlab-test".into(),
        description: Some("Atque in sunt eos similique dolores voluptatem.".into()),
        web_url: "http://192.168.64.1:3005/gitlab-org/gitlab-test".into(),
        avatar_url: None,
        git_ssh_url: "git@192.168.64.1:gitlab-org/gitlab-test.git".into(),
        git_http_url: "http://192.168.64.1:3005/gitlab-org/gitlab-test.git".into(),
        visibility_level: 20,
        default_branch: "master".into(),
    };
    let user = User {
        id: 3,
        name: "User".into(),
        username: "user3".into(),
        avatar_url: Some(
            "http://www.gravatar.com/avatar/e32bd13e2add097461cb96824b7a829c?s=80&d=identicon"
                .into(),
        ),
        public_email: Some("user@gitlab.com".into()),
        blocked: false,
    };
    let runner = Runner {
        id: 380_987,
        description: "shared-runners-manager-6.gitlab.com".into(),
        runner_type: "project_type".into(),
        active: true,
        is_shared: false,
        tags: vec!["linux".into(), "docker".into()],
    };
    let pipeline = Pipeline {
        id: 2366,
        project_id: project.id,
        user_id: user.id,
        name: Some("Build pipeline".into()),
        git_ref: "gitlab-script-trigger".into(),
        tag: false,
        sha: "2293ada6b400935a1378653304eaf6221e0fdb8f".into(),
        before_sha: "2293ada6b400935a1378653304eaf6221e0fdb8f".into(),
        status: "created".into(),
        started_at: None,
        finished_at: None,
        duration: None,
        commit_message: "test\n".into(),
        commit_author_name: "User".into(),
        commit_author_email: "user@gitlab.com".into(),
        source: Some(SourcePipeline {
            project_id: 41,
            project_web_url: "https://gitlab.example.com/gitlab-org/upstream-project".into(),
            project_path_with_namespace: "gitlab-org/upstream-project".into(),
            pipeline_id: 30,
            job_id: 3401,
        }),
    };
    let build = Build {
        id: 1977,
        project_id: project.id,
        pipeline_id: pipeline.id,
        user_id: user.id,
        runner_id: Some(runner.id),
        name: "test".into(),
        stage: "test".into(),
        status: "created".into(),
        created_at: at(2021, 2, 23, 2, 41, 37, 886),
        queued_at: None,
        started_at: None,
        finished_at: None,
        duration: None,
        queued_duration: Some(1095.588715),
        allow_failure: false,
        failure_reason: Some("script_failure".into()),
        retries_count: 2,
        environment: None,
    };
    RenderSnapshot {
        build,
        pipeline,
        project,
        namespace,
        user,
        runner: Some(runner),
    }
}

/// Every leaf of `value` as (JSON pointer, value); an empty object or array is a leaf.
fn leaves(value: &Value, at: String, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                leaves(v, format!("{at}/{k}"), out);
            }
        }
        Value::Array(items) if !items.is_empty() => {
            for (i, v) in items.iter().enumerate() {
                leaves(v, format!("{at}/{i}"), out);
            }
        }
        other => out.push((at, other.clone())),
    }
}

fn disputed(pointer: &str) -> bool {
    DISPUTED
        .iter()
        .any(|(d, _)| pointer == *d || pointer.starts_with(&format!("{d}/")))
}

fn rendered(status: BuildStatus) -> Value {
    let snapshot = example_snapshot();
    let facts = TransitionFacts {
        started_at: None,
        finished_at: None,
        duration: None,
        queued_duration: snapshot.build.queued_duration,
        failure_reason: snapshot.build.failure_reason.clone(),
    };
    serde_json::from_slice(&render(&snapshot, &Transition { status, facts })).unwrap()
}

#[test]
fn every_field_of_the_documented_example_not_in_dispute_has_the_documented_value() {
    let example: Value = serde_json::from_str(EXAMPLE).expect("the example is valid JSON");
    let got = rendered(BuildStatus::Created);
    let mut fields = Vec::new();
    leaves(&example, String::new(), &mut fields);
    let mut compared = 0;
    let mut differ = Vec::new();
    for (pointer, want) in &fields {
        if disputed(pointer) {
            continue;
        }
        compared += 1;
        if got.pointer(pointer) != Some(want) {
            differ.push(format!(
                "{pointer}: documented {want}, hookline {}",
                got.pointer(pointer)
                    .map_or("(absent)".to_owned(), Value::to_string)
            ));
        }
    }
    assert!(
        differ.is_empty(),
        "hookline differs from GitLab's documented example on fields not in dispute:\n{}",
        differ.join("\n")
    );
    // A dispute list that swallowed more of the example would pass: the disputed leaves are the
    // six fields above, the runner's seven leaves counted one by one.
    assert_eq!(
        fields.len() - compared,
        12,
        "{compared} of {} fields compared",
        fields.len()
    );
}

/// Each disputed field really is rendered otherwise (a dispute that no longer is one should
/// leave the list), and the created event's disputed values are GitLab's source's.
#[test]
fn each_disputed_field_differs_as_its_reason_says() {
    let example: Value = serde_json::from_str(EXAMPLE).unwrap();
    let got = rendered(BuildStatus::Created);
    for (pointer, why) in DISPUTED {
        assert_ne!(
            got.pointer(pointer),
            example.pointer(pointer),
            "{pointer} is listed as disputed ({why}) but hookline renders the documented value"
        );
    }
    assert_eq!(got["build_created_at"], "2021-02-23 02:41:37 UTC");
    for nil in ["build_queued_duration", "build_failure_reason", "runner"] {
        assert_eq!(got[nil], Value::Null, "{nil} of a created event");
    }
    assert_eq!(got["project_name"], "Gitlab Org / Gitlab Test");
}

/// The example's runner, queued duration and failure reason are not disputed once the build
/// has left `created`: a pending event of the same build carries the documented values.
#[test]
fn past_created_the_documented_runner_and_facts_are_rendered_as_documented() {
    let example: Value = serde_json::from_str(EXAMPLE).unwrap();
    let got = rendered(BuildStatus::Pending);
    for pointer in ["/runner", "/build_queued_duration", "/build_failure_reason"] {
        assert_eq!(got.pointer(pointer), example.pointer(pointer), "{pointer}");
    }
}
