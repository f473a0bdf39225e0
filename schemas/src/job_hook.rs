//! The Job Hook body: GitLab's "Job events" webhook payload, field for field and in GitLab's
//! field order (`lib/gitlab/data_builder/build.rb`), so receivers written for GitLab work
//! unchanged.
//!
//! Times appear twice, as GitLab sends them: `"2026-11-27 20:19:19 UTC"` and, in the `*_iso`
//! fields, ISO 8601 (`"2026-11-27T20:19:19Z"`). Use [`gitlab_time`] and [`iso_time`].

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// `object_kind` of every Job Hook.
pub const OBJECT_KIND: &str = "build";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobHook {
    pub object_kind: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    pub tag: bool,
    pub before_sha: String,
    pub sha: String,
    pub retries_count: i64,
    pub build_id: i64,
    pub build_name: String,
    pub build_stage: String,
    pub build_status: String,
    pub build_created_at: Option<String>,
    pub build_started_at: Option<String>,
    pub build_finished_at: Option<String>,
    pub build_created_at_iso: Option<String>,
    pub build_started_at_iso: Option<String>,
    pub build_finished_at_iso: Option<String>,
    /// Seconds, fractional.
    pub build_duration: Option<f64>,
    /// Seconds, fractional.
    pub build_queued_duration: Option<f64>,
    pub build_allow_failure: bool,
    /// `unknown_failure` for a build that did not fail; null in the `created` event (GitLab's
    /// created-build hook data sets it to nil).
    pub build_failure_reason: Option<String>,
    pub pipeline_id: i64,
    /// Null until a runner picked the build up.
    pub runner: Option<HookRunner>,
    pub project_id: i64,
    /// The project's full name, `"Namespace / Project"`.
    pub project_name: String,
    pub user: HookUser,
    /// Describes the pipeline (GitLab's historical naming), not only the commit.
    pub commit: HookCommit,
    pub repository: HookRepository,
    pub project: HookProject,
    /// Null when the build deploys to no environment.
    pub environment: Option<HookEnvironment>,
    /// Present only when the pipeline was triggered by another pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_pipeline: Option<HookSourcePipeline>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookUser {
    pub id: i64,
    pub name: String,
    pub username: String,
    pub avatar_url: Option<String>,
    /// GitLab sends `"[REDACTED]"` unless the user made the address public.
    pub email: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookCommit {
    /// The pipeline id.
    pub id: i64,
    /// The pipeline name, if it has one.
    pub name: Option<String>,
    pub sha: String,
    pub message: String,
    pub author_name: String,
    pub author_email: String,
    pub author_url: String,
    /// The pipeline status.
    pub status: String,
    /// Whole seconds the pipeline ran.
    pub duration: Option<i64>,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub started_at_iso: Option<String>,
    pub finished_at_iso: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookRepository {
    pub name: String,
    /// The SSH clone URL (GitLab's `url_to_repo`).
    pub url: String,
    pub description: Option<String>,
    pub homepage: String,
    pub git_http_url: String,
    pub git_ssh_url: String,
    pub visibility_level: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookProject {
    pub id: i64,
    pub name: String,
    pub description: Option<String>,
    pub web_url: String,
    pub avatar_url: Option<String>,
    pub git_ssh_url: String,
    pub git_http_url: String,
    /// The namespace's human name.
    pub namespace: String,
    pub visibility_level: i32,
    pub path_with_namespace: String,
    pub default_branch: String,
    /// GitLab's custom CI configuration path; null for a project on the default
    /// `.gitlab-ci.yml`, which is every project hookline's CI state describes.
    #[serde(default)]
    pub ci_config_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookRunner {
    pub id: i64,
    pub description: String,
    /// `instance_type`, `group_type` or `project_type`.
    pub runner_type: String,
    pub active: bool,
    pub is_shared: bool,
    pub tags: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookEnvironment {
    pub name: String,
    /// `start`, `prepare`, `stop`, `verify` or `access`.
    pub action: String,
    /// `production`, `staging`, `testing`, `development` or `other`.
    pub deployment_tier: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookSourcePipeline {
    pub project: HookSourceProject,
    // GitLab's order (`source_pipeline_attrs`): the job, then the pipeline.
    pub job_id: i64,
    pub pipeline_id: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HookSourceProject {
    pub id: i64,
    pub web_url: String,
    pub path_with_namespace: String,
}

/// GitLab's hook time format: `2026-11-27 20:19:19 UTC`.
pub fn gitlab_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
}

/// Ruby's `Time#iso8601` for UTC: `2026-11-27T20:19:19Z` (whole seconds).
pub fn iso_time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn times_use_gitlab_formats() {
        let t = Utc.with_ymd_and_hms(2026, 11, 27, 20, 19, 19).unwrap()
            + chrono::Duration::microseconds(886_123);
        assert_eq!(gitlab_time(t), "2026-11-27 20:19:19 UTC");
        assert_eq!(iso_time(t), "2026-11-27T20:19:19Z");
    }
}
