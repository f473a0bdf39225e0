//! The Job Hook against GitLab's own expectations, written by hand (never produced by hookline's
//! renderer), for the sample build (`hookline_cistate::fixtures::sample(0)`) in every status that
//! sends a hook. Compared byte for byte, so key order, value types (integers, floats, booleans,
//! nulls) and both date formats are checked.
//!
//! Where each expectation comes from (GitLab, gitlabhq/gitlabhq and gitlab-org/gitlab):
//! - Field names and order: `lib/gitlab/data_builder/build.rb` (`object_kind`, `ref`, `tag`,
//!   `before_sha`, `sha`, `retries_count`, `build_*`, `pipeline_id`, `runner`, `project_id`,
//!   `project_name`, `user`, `commit`, `repository`, `project`, `environment`, and
//!   `source_pipeline` only when `commit.source_pipeline.present?`), its `build_runner`
//!   (id, description, runner_type, active, is_shared, tags) and `source_pipeline_attrs`
//!   (`project` {id, web_url, path_with_namespace}, then `job_id`, then `pipeline_id`).
//! - `project`: `Project#hook_attrs(backward: false)` in `app/models/project.rb`: id, name,
//!   description, web_url, avatar_url, git_ssh_url, git_http_url, namespace (the namespace's
//!   name), visibility_level, path_with_namespace, default_branch, ci_config_path (nil for a
//!   project on the default `.gitlab-ci.yml`). `project_name` is `full_name`:
//!   `"Namespace / Project"`. `repository.url` is `url_to_repo`, the SSH URL.
//! - `user`: `spec/lib/gitlab/data_builder/build_spec.rb` (id, name, username, avatar_url,
//!   email), the email `[REDACTED]` unless public (`webhook_events.md`).
//! - `*_iso` fields right after the three times, `commit.started_at_iso`/`finished_at_iso` after
//!   `finished_at`, `environment.deployment_tier`, `"ci_config_path": null`: the "Job events"
//!   example in `doc/user/project/integrations/webhook_events.md` (its current version
//!   interleaves each `*_iso` with its plain time; where the example and GitLab's source
//!   disagree, `docs/gitlab-deviations.md` lists what hookline sends and why, and
//!   `documented_example.rs` checks every other field of the example by value).
//! - Date formats: the `*_iso` forms are Ruby's `Time#iso8601` (whole seconds, `Z`), as
//!   `spec/workers/ci/execute_build_hooks_worker_spec.rb` expects (`started_at.iso8601`); the
//!   plain forms reach receivers as Ruby's `Time#to_s` in UTC, `"2026-11-27 20:19:00 UTC"`,
//!   because the payload crosses Sidekiq's JSON as strings (the same spec: "derives the ISO
//!   timestamps when the values arrive as strings"; the pipeline-events example of the same
//!   document shows that format).
//! - `build_failure_reason` is `unknown_failure` for a build that did not fail
//!   (`webhook_events.md`, "Failure reason"); the `created` event has no start, finish,
//!   durations, failure reason or runner: `build_created_hook_data` in
//!   `app/workers/ci/execute_pipeline_build_hooks_worker.rb` sets each to nil.
//! - Durations are seconds as floats (`build_duration`, `build_queued_duration`); the pipeline's
//!   `commit.duration` is whole seconds (an integer column).

use chrono::{DateTime, TimeZone, Utc};
use hookline_cistate::fixtures::sample;
use hookline_cistate::{RenderSnapshot, Transition, render};
use hookline_schemas::{BuildStatus, TransitionFacts};

/// Everything before the status-dependent part.
const HEAD: &str = r#"{
  "object_kind": "build",
  "ref": "main",
  "tag": false,
  "before_sha": "2293ada6b400935a1378653304eaf6221e0fdb8f",
  "sha": "a91957a858320c0e17f3a0eca7cfacbff50ea29a",
  "retries_count": 1,
  "build_id": 70000,
  "build_name": "rspec 2/4",
  "build_stage": "test","#;

const RUNNER: &str = r#"{
    "id": 1000,
    "description": "linux-amd64 shared runner #3",
    "runner_type": "instance_type",
    "active": true,
    "is_shared": true,
    "tags": ["linux", "docker", "amd64"]
  }"#;

/// From `project_id` to the end, with `{email}`, `{environment}` and `{source}` to fill.
const TAIL: &str = r#"
  "project_id": 10,
  "project_name": "Platform / Build Tools",
  "user": {
    "id": 100,
    "name": "Ada Lovelace",
    "username": "ada",
    "avatar_url": "https://ci.example.com/uploads/-/system/user/avatar/7/ada.png",
    "email": {email}
  },
  "commit": {
    "id": 5000,
    "name": "Merge train",
    "sha": "a91957a858320c0e17f3a0eca7cfacbff50ea29a",
    "message": "Cache cargo registry between jobs\n\nCuts cold builds by a third.",
    "author_name": "Ada Lovelace",
    "author_email": "ada@example.com",
    "author_url": "mailto:ada@example.com",
    "status": "running",
    "duration": null,
    "started_at": "2026-11-27 20:19:01 UTC",
    "finished_at": null,
    "started_at_iso": "2026-11-27T20:19:01Z",
    "finished_at_iso": null
  },
  "repository": {
    "name": "Build Tools",
    "url": "git@ci.example.com:platform/build-tools.git",
    "description": "Shared CI images & scripts",
    "homepage": "https://ci.example.com/platform/build-tools",
    "git_http_url": "https://ci.example.com/platform/build-tools.git",
    "git_ssh_url": "git@ci.example.com:platform/build-tools.git",
    "visibility_level": 10
  },
  "project": {
    "id": 10,
    "name": "Build Tools",
    "description": "Shared CI images & scripts",
    "web_url": "https://ci.example.com/platform/build-tools",
    "avatar_url": null,
    "git_ssh_url": "git@ci.example.com:platform/build-tools.git",
    "git_http_url": "https://ci.example.com/platform/build-tools.git",
    "namespace": "Platform",
    "visibility_level": 10,
    "path_with_namespace": "platform/build-tools",
    "default_branch": "main",
    "ci_config_path": null
  },
  "environment": {environment}{source}
}"#;

const STAGING: &str = r#"{"name": "staging", "action": "start", "deployment_tier": "staging"}"#;

const SOURCE_PIPELINE: &str = r#",
  "source_pipeline": {
    "project": {
      "id": 11,
      "web_url": "https://ci.example.com/platform/monorepo",
      "path_with_namespace": "platform/monorepo"
    },
    "job_id": 49990,
    "pipeline_id": 4999
  }"#;

/// JSON without the whitespace between tokens (strings kept as written).
fn compact(json: &str) -> String {
    let mut out = String::with_capacity(json.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in json.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_whitespace() {
            out.push(c);
        }
    }
    out
}

struct Expected<'a> {
    /// From `"build_status"` to `"runner": ...,` (hand-written per status).
    build: &'a str,
    runner: &'a str,
    email: &'a str,
    environment: &'a str,
    source: &'a str,
}

impl Expected<'_> {
    fn json(&self) -> String {
        let tail = TAIL
            .replace("{email}", self.email)
            .replace("{environment}", self.environment)
            .replace("{source}", self.source);
        compact(&format!(
            "{HEAD}{}\n  \"runner\": {},{tail}",
            self.build, self.runner
        ))
    }
}

fn at(h: u32, m: u32, s: u32, micros: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 27, h, m, s).unwrap() + chrono::Duration::microseconds(micros)
}

fn transition(status: BuildStatus, facts: TransitionFacts) -> Transition {
    Transition { status, facts }
}

fn assert_renders(snapshot: &RenderSnapshot, t: &Transition, expected: &Expected<'_>) {
    let got = String::from_utf8(render(snapshot, t)).unwrap();
    let want = expected.json();
    if got != want {
        // Point at the first difference: whole payloads are long.
        let at = got
            .bytes()
            .zip(want.bytes())
            .position(|(a, b)| a != b)
            .unwrap_or(got.len().min(want.len()));
        let from = at.saturating_sub(60);
        panic!(
            "{:?}: differs from GitLab's payload at byte {at}\n   got: ...{}\n  want: ...{}",
            t.status,
            &got[from..(at + 60).min(got.len())],
            &want[from..(at + 60).min(want.len())]
        );
    }
}

const CREATED_BUILD: &str = r#"
  "build_status": "created",
  "build_created_at": "2026-11-27 20:19:00 UTC",
  "build_started_at": null,
  "build_finished_at": null,
  "build_created_at_iso": "2026-11-27T20:19:00Z",
  "build_started_at_iso": null,
  "build_finished_at_iso": null,
  "build_duration": null,
  "build_queued_duration": null,
  "build_allow_failure": false,
  "build_failure_reason": null,
  "pipeline_id": 5000,"#;

#[test]
fn created_has_no_times_durations_failure_reason_or_runner() {
    let snapshot = sample(0);
    // Facts the row has by now must not leak into the created event.
    let facts = TransitionFacts {
        started_at: Some(at(20, 19, 3, 500_000)),
        finished_at: None,
        duration: None,
        queued_duration: Some(2.488),
        failure_reason: Some("script_failure".into()),
    };
    assert_renders(
        &snapshot,
        &transition(BuildStatus::Created, facts),
        &Expected {
            build: CREATED_BUILD,
            runner: "null",
            email: r#""[REDACTED]""#,
            environment: STAGING,
            source: SOURCE_PIPELINE,
        },
    );
}

#[test]
fn pending_without_a_runner_environment_or_upstream_and_with_a_public_email() {
    let mut snapshot = sample(0);
    snapshot.runner = None;
    snapshot.build.environment = None;
    snapshot.pipeline.source = None;
    snapshot.user.public_email = Some("ada@example.com".into());
    let facts = TransitionFacts {
        queued_duration: Some(0.5),
        ..TransitionFacts::default()
    };
    assert_renders(
        &snapshot,
        &transition(BuildStatus::Pending, facts),
        &Expected {
            build: r#"
  "build_status": "pending",
  "build_created_at": "2026-11-27 20:19:00 UTC",
  "build_started_at": null,
  "build_finished_at": null,
  "build_created_at_iso": "2026-11-27T20:19:00Z",
  "build_started_at_iso": null,
  "build_finished_at_iso": null,
  "build_duration": null,
  "build_queued_duration": 0.5,
  "build_allow_failure": false,
  "build_failure_reason": "unknown_failure",
  "pipeline_id": 5000,"#,
            runner: "null",
            email: r#""ada@example.com""#,
            environment: "null",
            source: "",
        },
    );
}

#[test]
fn running_on_a_runner_deploying_to_staging_triggered_upstream() {
    let snapshot = sample(0);
    let t = Transition::of_current(&snapshot.build).unwrap();
    assert_renders(
        &snapshot,
        &t,
        &Expected {
            build: r#"
  "build_status": "running",
  "build_created_at": "2026-11-27 20:19:00 UTC",
  "build_started_at": "2026-11-27 20:19:03 UTC",
  "build_finished_at": null,
  "build_created_at_iso": "2026-11-27T20:19:00Z",
  "build_started_at_iso": "2026-11-27T20:19:03Z",
  "build_finished_at_iso": null,
  "build_duration": null,
  "build_queued_duration": 2.488,
  "build_allow_failure": false,
  "build_failure_reason": "unknown_failure",
  "pipeline_id": 5000,"#,
            runner: RUNNER,
            email: r#""[REDACTED]""#,
            environment: STAGING,
            source: SOURCE_PIPELINE,
        },
    );
}

fn finished(duration: f64, failure_reason: Option<&str>) -> TransitionFacts {
    TransitionFacts {
        started_at: Some(at(20, 19, 3, 500_000)),
        finished_at: Some(at(20, 21, 0, 250_000)),
        duration: Some(duration),
        queued_duration: Some(2.488),
        failure_reason: failure_reason.map(str::to_owned),
    }
}

#[test]
fn success_failed_and_canceled_carry_their_end_and_duration() {
    let snapshot = sample(0);
    for (status, facts, reason, duration) in [
        (
            BuildStatus::Success,
            finished(116.75, None),
            r#""unknown_failure""#,
            "116.75",
        ),
        // A whole number of seconds is still a float, as Ruby's Float prints it.
        (
            BuildStatus::Failed,
            finished(60.0, Some("script_failure")),
            r#""script_failure""#,
            "60.0",
        ),
        (
            BuildStatus::Canceled,
            finished(116.75, None),
            r#""unknown_failure""#,
            "116.75",
        ),
    ] {
        let build = format!(
            r#"
  "build_status": "{}",
  "build_created_at": "2026-11-27 20:19:00 UTC",
  "build_started_at": "2026-11-27 20:19:03 UTC",
  "build_finished_at": "2026-11-27 20:21:00 UTC",
  "build_created_at_iso": "2026-11-27T20:19:00Z",
  "build_started_at_iso": "2026-11-27T20:19:03Z",
  "build_finished_at_iso": "2026-11-27T20:21:00Z",
  "build_duration": {duration},
  "build_queued_duration": 2.488,
  "build_allow_failure": false,
  "build_failure_reason": {reason},
  "pipeline_id": 5000,"#,
            match status {
                BuildStatus::Success => "success",
                BuildStatus::Failed => "failed",
                _ => "canceled",
            }
        );
        assert_renders(
            &snapshot,
            &transition(status, facts),
            &Expected {
                build: &build,
                runner: RUNNER,
                email: r#""[REDACTED]""#,
                environment: STAGING,
                source: SOURCE_PIPELINE,
            },
        );
    }
}

/// A retry is a new build; `retries_count` counts the retries before it (0 for a first run).
#[test]
fn a_first_run_counts_zero_retries() {
    let mut snapshot = sample(0);
    snapshot.build.retries_count = 0;
    let got: serde_json::Value = serde_json::from_slice(&render(
        &snapshot,
        &Transition::of_current(&snapshot.build).unwrap(),
    ))
    .unwrap();
    assert_eq!(got["retries_count"], serde_json::json!(0));
    let text = String::from_utf8(render(
        &snapshot,
        &Transition::of_current(&snapshot.build).unwrap(),
    ))
    .unwrap();
    assert!(
        text.contains(
            r#""sha":"a91957a858320c0e17f3a0eca7cfacbff50ea29a","retries_count":0,"build_id":70000"#
        ),
        "{text}"
    );
}

/// A tag pipeline that finished (`success`, its duration a whole number of seconds) although
/// this build failed, because the build may fail (`allow_failure`); text with HTML's special
/// characters, quotes and non-ASCII letters. hookline writes `<`, `>` and `&` as they are and
/// non-ASCII as UTF-8; GitLab's JSON encoder writes the first three as `\u003c`, `\u003e`,
/// `\u0026` (a deliberate deviation: the same strings once parsed, checked below).
#[test]
fn a_finished_tag_pipeline_an_allowed_failure_and_special_text() {
    let mut snapshot = sample(0);
    snapshot.pipeline.tag = true;
    snapshot.pipeline.git_ref = "v1.2.0".into();
    snapshot.pipeline.status = "success".into();
    snapshot.pipeline.finished_at = Some(at(20, 25, 2, 0));
    snapshot.pipeline.duration = Some(361);
    snapshot.pipeline.commit_message =
        "Escape <script> & \"quotes\" in the log — naïve café ✓\n".into();
    snapshot.pipeline.commit_author_name = "Zoë Ünal".into();
    snapshot.user.name = "Zoë Ünal".into();
    snapshot.project.description = Some("Tools <for> \"CI\" & Zürich's ✓".into());
    snapshot.build.allow_failure = true;
    let t = transition(
        BuildStatus::Failed,
        finished(116.75, Some("script_failure")),
    );
    let want = compact(
        r#"{
  "object_kind": "build",
  "ref": "v1.2.0",
  "tag": true,
  "before_sha": "2293ada6b400935a1378653304eaf6221e0fdb8f",
  "sha": "a91957a858320c0e17f3a0eca7cfacbff50ea29a",
  "retries_count": 1,
  "build_id": 70000,
  "build_name": "rspec 2/4",
  "build_stage": "test",
  "build_status": "failed",
  "build_created_at": "2026-11-27 20:19:00 UTC",
  "build_started_at": "2026-11-27 20:19:03 UTC",
  "build_finished_at": "2026-11-27 20:21:00 UTC",
  "build_created_at_iso": "2026-11-27T20:19:00Z",
  "build_started_at_iso": "2026-11-27T20:19:03Z",
  "build_finished_at_iso": "2026-11-27T20:21:00Z",
  "build_duration": 116.75,
  "build_queued_duration": 2.488,
  "build_allow_failure": true,
  "build_failure_reason": "script_failure",
  "pipeline_id": 5000,
  "runner": {
    "id": 1000,
    "description": "linux-amd64 shared runner #3",
    "runner_type": "instance_type",
    "active": true,
    "is_shared": true,
    "tags": ["linux", "docker", "amd64"]
  },
  "project_id": 10,
  "project_name": "Platform / Build Tools",
  "user": {
    "id": 100,
    "name": "Zoë Ünal",
    "username": "ada",
    "avatar_url": "https://ci.example.com/uploads/-/system/user/avatar/7/ada.png",
    "email": "[REDACTED]"
  },
  "commit": {
    "id": 5000,
    "name": "Merge train",
    "sha": "a91957a858320c0e17f3a0eca7cfacbff50ea29a",
    "message": "Escape <script> & \"quotes\" in the log — naïve café ✓\n",
    "author_name": "Zoë Ünal",
    "author_email": "ada@example.com",
    "author_url": "mailto:ada@example.com",
    "status": "success",
    "duration": 361,
    "started_at": "2026-11-27 20:19:01 UTC",
    "finished_at": "2026-11-27 20:25:02 UTC",
    "started_at_iso": "2026-11-27T20:19:01Z",
    "finished_at_iso": "2026-11-27T20:25:02Z"
  },
  "repository": {
    "name": "Build Tools",
    "url": "git@ci.example.com:platform/build-tools.git",
    "description": "Tools <for> \"CI\" & Zürich's ✓",
    "homepage": "https://ci.example.com/platform/build-tools",
    "git_http_url": "https://ci.example.com/platform/build-tools.git",
    "git_ssh_url": "git@ci.example.com:platform/build-tools.git",
    "visibility_level": 10
  },
  "project": {
    "id": 10,
    "name": "Build Tools",
    "description": "Tools <for> \"CI\" & Zürich's ✓",
    "web_url": "https://ci.example.com/platform/build-tools",
    "avatar_url": null,
    "git_ssh_url": "git@ci.example.com:platform/build-tools.git",
    "git_http_url": "https://ci.example.com/platform/build-tools.git",
    "namespace": "Platform",
    "visibility_level": 10,
    "path_with_namespace": "platform/build-tools",
    "default_branch": "main",
    "ci_config_path": null
  },
  "environment": {"name": "staging", "action": "start", "deployment_tier": "staging"},
  "source_pipeline": {
    "project": {
      "id": 11,
      "web_url": "https://ci.example.com/platform/monorepo",
      "path_with_namespace": "platform/monorepo"
    },
    "job_id": 49990,
    "pipeline_id": 4999
  }
}"#,
    );
    let got = String::from_utf8(render(&snapshot, &t)).unwrap();
    assert_eq!(got, want);
    // GitLab's spelling of the same body: `<`, `>` and `&` escaped. Byte for byte different,
    // value for value the same.
    let gitlab = want
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026");
    assert_ne!(gitlab, got);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&gitlab).unwrap(),
        serde_json::from_str::<serde_json::Value>(&got).unwrap()
    );
}
