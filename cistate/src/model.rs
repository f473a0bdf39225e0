//! The CI state a Job Hook is rendered from, as plain values. The CI system owns it; hookline
//! reads it (and the simulator and tests write it).

use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Namespace {
    pub id: i64,
    pub name: String,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Project {
    pub id: i64,
    /// The root namespace: rate limits and the project's full name hang off it.
    pub namespace_id: i64,
    pub name: String,
    pub path: String,
    pub description: Option<String>,
    pub web_url: String,
    pub avatar_url: Option<String>,
    pub git_ssh_url: String,
    pub git_http_url: String,
    /// 0 private, 10 internal, 20 public.
    pub visibility_level: i32,
    pub default_branch: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub username: String,
    pub avatar_url: Option<String>,
    /// Sent in hooks only when the user made it public; otherwise `[REDACTED]`.
    pub public_email: Option<String>,
    /// GitLab sends no hooks for builds of blocked users.
    pub blocked: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Runner {
    pub id: i64,
    pub description: String,
    /// `instance_type`, `group_type` or `project_type`.
    pub runner_type: String,
    pub active: bool,
    pub is_shared: bool,
    pub tags: Vec<String>,
}

/// The upstream pipeline and job that triggered a pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SourcePipeline {
    pub project_id: i64,
    pub project_web_url: String,
    pub project_path_with_namespace: String,
    pub pipeline_id: i64,
    pub job_id: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pipeline {
    pub id: i64,
    pub project_id: i64,
    pub user_id: i64,
    pub name: Option<String>,
    pub git_ref: String,
    pub tag: bool,
    pub sha: String,
    pub before_sha: String,
    pub status: String,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Whole seconds.
    pub duration: Option<i64>,
    pub commit_message: String,
    pub commit_author_name: String,
    pub commit_author_email: String,
    pub source: Option<SourcePipeline>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    pub name: String,
    pub action: String,
    pub deployment_tier: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Build {
    pub id: i64,
    pub project_id: i64,
    pub pipeline_id: i64,
    pub user_id: i64,
    pub runner_id: Option<i64>,
    pub name: String,
    pub stage: String,
    /// Any CI status, including ones that send no hook (`manual`, `skipped`, ...).
    pub status: String,
    pub created_at: DateTime<Utc>,
    pub queued_at: Option<DateTime<Utc>>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Seconds.
    pub duration: Option<f64>,
    /// Seconds.
    pub queued_duration: Option<f64>,
    pub allow_failure: bool,
    pub failure_reason: Option<String>,
    pub retries_count: i32,
    pub environment: Option<Environment>,
}

/// Everything the renderer needs for one build, loaded in one round trip.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RenderSnapshot {
    pub build: Build,
    pub pipeline: Pipeline,
    pub project: Project,
    pub namespace: Namespace,
    pub user: User,
    pub runner: Option<Runner>,
}

/// A project webhook and its health.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hook {
    pub id: i64,
    /// `X-Gitlab-Webhook`-style stable identity, part of idempotency keys.
    pub uuid: Uuid,
    pub project_id: i64,
    pub url: String,
    /// Sent verbatim as `X-Gitlab-Token`; never logged.
    pub token: Option<String>,
    /// Standard Webhooks secret, `whsec_<base64>`.
    pub signing_secret: Option<String>,
    pub job_events: bool,
    pub recent_failures: i32,
    /// Temporarily disabled until then. [`DISABLED_FOR_GOOD`] (how `infinity` in the database
    /// reads) disables the hook until someone enables it again.
    pub disabled_until: Option<DateTime<Utc>>,
    /// Under strict ordering, when several of a build's events wait behind a failing delivery,
    /// send only the latest (for receivers that only want the current state).
    #[serde(default)]
    pub collapse: bool,
    /// When the hook was added (the hooks API's `created_at`); `None` on a hook built in memory
    /// that no store has seen.
    #[serde(default)]
    pub created_at: Option<DateTime<Utc>>,
}

/// A hook to create.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NewHook {
    pub project_id: i64,
    pub url: String,
    pub token: Option<String>,
    pub signing_secret: Option<String>,
    pub job_events: bool,
    /// See [`Hook::collapse`].
    pub collapse: bool,
}

/// Changes to a stored hook: `None` leaves a setting as it is; for the secrets, `Some(None)`
/// clears one. Its health is not a setting (see [`crate::CiStore::enable_hook`]).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct HookEdit {
    pub url: Option<String>,
    pub token: Option<Option<String>>,
    pub signing_secret: Option<Option<String>>,
    pub job_events: Option<bool>,
    pub collapse: Option<bool>,
}

/// One delivery of the per-(hook, build) order queue (strict ordering): a delivery that waits
/// for a retry, or a later event of the same build queued behind it.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderEntry {
    pub event_id: Uuid,
    /// The transition's time: the queue's order (ties broken by `seq`, the order of arrival).
    pub occurred_at: DateTime<Utc>,
    pub seq: i64,
    /// Delivered, dead-lettered or collapsed: kept a while so a record read again after a crash
    /// is known as done and not sent behind later events.
    pub settled: bool,
}

/// A delivery parked on its order-queue entry while it is not its turn: its retry record's
/// headers (as text pairs) and exact body, written back to the retry topic once the entries
/// ahead of it are settled.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedDelivery {
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// A parked delivery with its place: the entry that is first in its queue now.
#[derive(Debug, Clone, PartialEq)]
pub struct ParkedEntry {
    pub hook_id: i64,
    pub build_id: i64,
    pub event_id: Uuid,
    pub delivery: ParkedDelivery,
}

/// Whether a hook may be called now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookState {
    Executable,
    /// Back off until then; deliveries due meanwhile wait (GitLab drops them).
    TemporarilyDisabled(DateTime<Utc>),
    /// The 40th consecutive failure: off until someone enables it again.
    PermanentlyDisabled,
}

/// What recording a failed delivery did to a hook's health.
#[derive(Debug, Clone, PartialEq)]
pub enum HookFailure {
    /// The hook was executable: the failure counts; the hook's new health.
    Counted(Hook),
    /// The hook was already disabled (temporarily or for good) when the failure ended: as in
    /// GitLab, it does not count, so failures of deliveries that were in flight when the hook
    /// got disabled cannot push it on to its permanent disable. The hook as it is.
    NotExecutable(Hook),
    /// No such hook (removed meanwhile).
    Gone,
}

/// GitLab's auto-disable constants (`WebHooks::AutoDisabling`).
pub const FAILURE_THRESHOLD: i32 = 3;
pub const PERMANENT_FAILURES: i32 = 40;

/// A `disabled_until` that never comes: `UPDATE web_hooks SET disabled_until = 'infinity'` (an
/// operator's natural way to turn a hook off for good) reads as this, and the hook is
/// [`HookState::PermanentlyDisabled`] until it is enabled again (`hooks enable`, the API, or a
/// successful test).
pub const DISABLED_FOR_GOOD: DateTime<Utc> = DateTime::<Utc>::MAX_UTC;

impl Hook {
    pub fn state(&self, now: DateTime<Utc>) -> HookState {
        if self.recent_failures >= PERMANENT_FAILURES {
            return HookState::PermanentlyDisabled;
        }
        match self.disabled_until {
            Some(until) if until == DISABLED_FOR_GOOD => HookState::PermanentlyDisabled,
            Some(until) if until > now => HookState::TemporarilyDisabled(until),
            _ => HookState::Executable,
        }
    }

    /// Health after one more failed delivery at `now`: the count grows to at most 40, and from
    /// the 4th failure on the hook backs off 1 min * 2^(failures before this one - 3), clamped
    /// to [1 min, 1 day].
    pub fn health_after_failure(
        recent_failures: i32,
        now: DateTime<Utc>,
    ) -> (i32, Option<DateTime<Utc>>) {
        let failures = (recent_failures + 1).min(PERMANENT_FAILURES);
        if failures <= FAILURE_THRESHOLD {
            return (failures, None);
        }
        let exponent = (recent_failures - FAILURE_THRESHOLD).clamp(0, 20) as u32;
        let backoff = (Duration::minutes(1) * 2i32.pow(exponent)).min(Duration::days(1));
        (failures, Some(now + backoff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_disable_follows_gitlab() {
        let now = Utc::now();
        let mut failures = 0;
        let mut backoffs = vec![];
        for _ in 0..40 {
            let (f, until) = Hook::health_after_failure(failures, now);
            failures = f;
            backoffs.push(until.map(|u| (u - now).num_minutes()));
        }
        assert_eq!(&backoffs[..3], &[None, None, None]);
        assert_eq!(backoffs[3], Some(1));
        assert_eq!(backoffs[4], Some(2));
        assert_eq!(backoffs[5], Some(4));
        assert_eq!(backoffs[13], Some(1024));
        assert_eq!(backoffs[14], Some(24 * 60));
        assert_eq!(backoffs[38], Some(24 * 60));
        assert_eq!(failures, 40);
        let hook = Hook {
            id: 1,
            uuid: Uuid::nil(),
            project_id: 1,
            url: "http://x".into(),
            token: None,
            signing_secret: None,
            job_events: true,
            recent_failures: failures,
            disabled_until: None,
            collapse: false,
            created_at: None,
        };
        assert_eq!(hook.state(now), HookState::PermanentlyDisabled);
    }

    #[test]
    fn a_hook_disabled_until_infinity_is_disabled_for_good() {
        let hook = |disabled_until| Hook {
            id: 1,
            uuid: Uuid::nil(),
            project_id: 1,
            url: "http://x".into(),
            token: None,
            signing_secret: None,
            job_events: true,
            recent_failures: 0,
            disabled_until,
            collapse: false,
            created_at: None,
        };
        let now = Utc::now();
        assert_eq!(
            hook(Some(DISABLED_FOR_GOOD)).state(now),
            HookState::PermanentlyDisabled
        );
        assert_eq!(
            hook(Some(DateTime::<Utc>::MIN_UTC)).state(now),
            HookState::Executable,
            "-infinity is long past"
        );
    }
}
