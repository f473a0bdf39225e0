//! What the producer accepts into an event: GitLab's failure reasons, and a bound on every
//! free-text field of the CI state an inline Job Hook is rendered from.
//!
//! The bounds keep every event under `--max-event-bytes` by construction: the worst case they
//! allow (every field at its bound, every character a control character that JSON escapes to six
//! bytes) is rendered and measured in this module's tests. Where GitLab validates a length, the
//! bound is GitLab's; where GitLab has none (refs, commit messages, URLs), the bound is
//! hookline's own, chosen so the worst case still fits in Kafka's default message size.

use hookline_cistate::RenderSnapshot;

/// The default `max_event_bytes`: librdkafka's default `message.max.bytes`.
pub const DEFAULT_MAX_EVENT_BYTES: usize = hookline_schemas::codec::DEFAULT_MAX_EVENT_BYTES;

/// GitLab's `Enums::Ci::CommitStatus.failure_reasons` (CE and EE), plus `unknown_failure`,
/// which GitLab reports for a failed build without a reason.
pub const FAILURE_REASONS: &[&str] = &[
    "unknown_failure",
    "script_failure",
    "api_failure",
    "stuck_or_timeout_failure",
    "runner_system_failure",
    "missing_dependency_failure",
    "runner_unsupported",
    "stale_schedule",
    "job_execution_timeout",
    "archived_failure",
    "unmet_prerequisites",
    "scheduler_failure",
    "data_integrity_failure",
    "forward_deployment_failure",
    "user_blocked",
    "project_deleted",
    "ci_quota_exceeded",
    "pipeline_loop_detected",
    "no_matching_runner",
    "trace_size_exceeded",
    "builds_disabled",
    "environment_creation_failure",
    "deployment_rejected",
    "failed_outdated_deployment_job",
    "protected_environment_failure",
    "insufficient_bridge_permissions",
    "downstream_bridge_project_not_found",
    "invalid_bridge_trigger",
    "upstream_bridge_project_not_found",
    "insufficient_upstream_permissions",
    "bridge_pipeline_is_child_pipeline",
    "downstream_pipeline_creation_failed",
    "secrets_provider_not_found",
    "reached_max_descendant_pipelines_depth",
    "ip_restriction_failure",
    "reached_max_pipeline_hierarchy_size",
    "reached_downstream_pipeline_trigger_rate_limit",
];

/// Whether GitLab knows `reason` as a job failure reason.
pub fn is_failure_reason(reason: &str) -> bool {
    FAILURE_REASONS.contains(&reason)
}

/// Names, paths, stages, branches, emails: GitLab's 255-character columns and validations.
pub const NAME: usize = 255;
/// A project description: GitLab validates at most 2000 characters.
pub const DESCRIPTION: usize = 2000;
/// A runner description: GitLab validates at most 1024 characters.
pub const RUNNER_DESCRIPTION: usize = 1024;
/// Tags on one runner: GitLab allows at most 50 (each a 255-character name).
pub const RUNNER_TAGS: usize = 50;
/// URLs (web, avatar, clone URLs): hookline's bound; GitLab derives them from bounded paths.
pub const URL: usize = 2048;
/// A git ref: hookline's bound (git has none; GitLab's branch names are practically far below).
pub const REF: usize = 1024;
/// A commit SHA: 40 hex digits for SHA-1, 64 for SHA-256 repositories.
pub const SHA: usize = 64;
/// A commit message: hookline's bound (GitLab has none of its own). 32 KiB characters.
pub const COMMIT_MESSAGE: usize = 32 * 1024;

/// A CI state field over its bound.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverBound {
    /// Where it is, e.g. `pipeline.commit_message`.
    pub field: String,
    /// Its length in characters.
    pub length: usize,
    pub bound: usize,
}

impl std::fmt::Display for OverBound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the build's {} is {} characters, over the bound of {}",
            self.field, self.length, self.bound
        )
    }
}

/// Checks every free-text field of `snapshot` against its bound; the first one over it is named.
pub fn check(snapshot: &RenderSnapshot) -> Result<(), OverBound> {
    let RenderSnapshot {
        build,
        pipeline,
        project,
        namespace,
        user,
        runner,
    } = snapshot;
    let mut fields: Vec<(&str, Option<&str>, usize)> = vec![
        ("namespace.name", Some(&namespace.name), NAME),
        ("namespace.path", Some(&namespace.path), NAME),
        ("project.name", Some(&project.name), NAME),
        ("project.path", Some(&project.path), NAME),
        (
            "project.description",
            project.description.as_deref(),
            DESCRIPTION,
        ),
        ("project.web_url", Some(&project.web_url), URL),
        ("project.avatar_url", project.avatar_url.as_deref(), URL),
        ("project.git_ssh_url", Some(&project.git_ssh_url), URL),
        ("project.git_http_url", Some(&project.git_http_url), URL),
        (
            "project.default_branch",
            Some(&project.default_branch),
            NAME,
        ),
        ("user.name", Some(&user.name), NAME),
        ("user.username", Some(&user.username), NAME),
        ("user.avatar_url", user.avatar_url.as_deref(), URL),
        ("user.public_email", user.public_email.as_deref(), NAME),
        ("pipeline.name", pipeline.name.as_deref(), NAME),
        ("pipeline.ref", Some(&pipeline.git_ref), REF),
        ("pipeline.sha", Some(&pipeline.sha), SHA),
        ("pipeline.before_sha", Some(&pipeline.before_sha), SHA),
        ("pipeline.status", Some(&pipeline.status), NAME),
        (
            "pipeline.commit_message",
            Some(&pipeline.commit_message),
            COMMIT_MESSAGE,
        ),
        (
            "pipeline.commit_author_name",
            Some(&pipeline.commit_author_name),
            NAME,
        ),
        (
            "pipeline.commit_author_email",
            Some(&pipeline.commit_author_email),
            NAME,
        ),
        ("build.name", Some(&build.name), NAME),
        ("build.stage", Some(&build.stage), NAME),
        ("build.status", Some(&build.status), NAME),
        (
            "build.failure_reason",
            build.failure_reason.as_deref(),
            NAME,
        ),
    ];
    if let Some(source) = &pipeline.source {
        fields.push((
            "pipeline.source.project_web_url",
            Some(&source.project_web_url),
            URL,
        ));
        fields.push((
            "pipeline.source.project_path_with_namespace",
            Some(&source.project_path_with_namespace),
            URL,
        ));
    }
    if let Some(environment) = &build.environment {
        fields.push(("build.environment.name", Some(&environment.name), NAME));
        fields.push(("build.environment.action", Some(&environment.action), NAME));
        fields.push((
            "build.environment.deployment_tier",
            Some(&environment.deployment_tier),
            NAME,
        ));
    }
    if let Some(runner) = runner {
        fields.push((
            "runner.description",
            Some(&runner.description),
            RUNNER_DESCRIPTION,
        ));
        fields.push(("runner.runner_type", Some(&runner.runner_type), NAME));
        if runner.tags.len() > RUNNER_TAGS {
            return Err(OverBound {
                field: "runner.tags".into(),
                length: runner.tags.len(),
                bound: RUNNER_TAGS,
            });
        }
        for tag in &runner.tags {
            fields.push(("runner.tags[]", Some(tag), NAME));
        }
    }
    for (field, value, bound) in fields {
        // Bytes bound characters from above: count characters only when the bytes are over.
        if let Some(value) = value
            && value.len() > bound
        {
            let length = value.chars().count();
            if length > bound {
                return Err(OverBound {
                    field: field.to_owned(),
                    length,
                    bound,
                });
            }
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use hookline_cistate::fixtures::sample;
    use hookline_cistate::{Environment, Runner, SourcePipeline, Transition};
    use hookline_schemas::{BuildStatus, TransitionFacts};

    /// JSON escapes a control character as `\u00XX`: six bytes for one, the most any character
    /// grows when rendered.
    const WORST: char = '\u{1}';

    /// Every free-text field at its bound, every character one JSON escapes to six bytes.
    pub(crate) fn worst_case_snapshot() -> RenderSnapshot {
        worst_case_snapshot_filled_with(WORST)
    }

    fn worst_case_snapshot_filled_with(c: char) -> RenderSnapshot {
        let filled = |bound: usize| -> String { std::iter::repeat_n(c, bound).collect() };
        let mut s = sample(0);
        s.namespace.name = filled(NAME);
        s.namespace.path = filled(NAME);
        s.project.name = filled(NAME);
        s.project.path = filled(NAME);
        s.project.description = Some(filled(DESCRIPTION));
        s.project.web_url = filled(URL);
        s.project.avatar_url = Some(filled(URL));
        s.project.git_ssh_url = filled(URL);
        s.project.git_http_url = filled(URL);
        s.project.default_branch = filled(NAME);
        s.user.name = filled(NAME);
        s.user.username = filled(NAME);
        s.user.avatar_url = Some(filled(URL));
        s.user.public_email = Some(filled(NAME));
        s.pipeline.name = Some(filled(NAME));
        s.pipeline.git_ref = filled(REF);
        s.pipeline.sha = filled(SHA);
        s.pipeline.before_sha = filled(SHA);
        s.pipeline.status = filled(NAME);
        s.pipeline.commit_message = filled(COMMIT_MESSAGE);
        s.pipeline.commit_author_name = filled(NAME);
        s.pipeline.commit_author_email = filled(NAME);
        s.pipeline.source = Some(SourcePipeline {
            project_id: 1,
            project_web_url: filled(URL),
            project_path_with_namespace: filled(URL),
            pipeline_id: 1,
            job_id: 1,
        });
        s.build.name = filled(NAME);
        s.build.stage = filled(NAME);
        s.build.failure_reason = Some(filled(NAME));
        s.build.environment = Some(Environment {
            name: filled(NAME),
            action: filled(NAME),
            deployment_tier: filled(NAME),
        });
        s.runner = Some(Runner {
            description: filled(RUNNER_DESCRIPTION),
            runner_type: filled(NAME),
            tags: vec![filled(NAME); RUNNER_TAGS],
            ..s.runner.clone().unwrap()
        });
        s
    }

    pub(crate) fn worst_case_transition() -> Transition {
        Transition {
            status: BuildStatus::Failed,
            facts: TransitionFacts {
                failure_reason: Some("reached_downstream_pipeline_trigger_rate_limit".into()),
                ..Transition::of_current(&sample(0).build).unwrap().facts
            },
        }
    }

    #[test]
    fn the_worst_case_is_within_the_bounds_and_one_more_character_is_not() {
        let mut s = worst_case_snapshot();
        assert_eq!(check(&s), Ok(()));
        s.pipeline.commit_message.push('x');
        assert_eq!(
            check(&s),
            Err(OverBound {
                field: "pipeline.commit_message".into(),
                length: COMMIT_MESSAGE + 1,
                bound: COMMIT_MESSAGE
            })
        );
        let mut s = worst_case_snapshot();
        s.runner.as_mut().unwrap().tags.push("one-too-many".into());
        assert_eq!(check(&s).unwrap_err().field, "runner.tags");
        // Characters are counted, not bytes: 255 four-byte characters are a valid name.
        let mut s = sample(0);
        s.build.name = "𝄞".repeat(NAME);
        assert_eq!(check(&s), Ok(()));
        s.build.name.push('𝄞');
        assert_eq!(
            check(&s).unwrap_err().to_string(),
            "the build's build.name is 256 characters, over the bound of 255"
        );
    }

    /// The measured worst case: a control character renders as six bytes and nothing renders
    /// larger, so the payload is at most six times the same snapshot filled with plain letters.
    #[test]
    fn the_worst_case_render_is_measured_and_fits_the_default_event_size() {
        let transition = worst_case_transition();
        let payload = hookline_cistate::render(&worst_case_snapshot(), &transition);
        let plain = worst_case_snapshot_filled_with('a');
        let plain = hookline_cistate::render(&plain, &transition);
        println!(
            "worst-case rendered Job Hook: {} bytes ({} with plain letters)",
            payload.len(),
            plain.len()
        );
        assert!(
            payload.len() <= 6 * plain.len(),
            "{} bytes rendered, {} with plain letters",
            payload.len(),
            plain.len()
        );
        assert!(
            payload.len() > 6 * (COMMIT_MESSAGE + RUNNER_TAGS * NAME),
            "the worst case is really escaped: {} bytes",
            payload.len()
        );
        assert!(
            payload.len() < DEFAULT_MAX_EVENT_BYTES - 16 * 1024,
            "{} bytes leave room for the event around the payload",
            payload.len()
        );
    }

    #[test]
    fn failure_reasons_are_gitlabs() {
        for known in [
            "script_failure",
            "runner_system_failure",
            "stuck_or_timeout_failure",
            "unknown_failure",
        ] {
            assert!(is_failure_reason(known), "{known}");
        }
        for unknown in ["", "x", "Script_Failure", "script_failure "] {
            assert!(!is_failure_reason(unknown), "{unknown:?}");
        }
    }
}
