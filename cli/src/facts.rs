//! What a delivered Job Hook must say about its transition, written down without the renderer.
//!
//! The demo's *truth* is the Job Hook rendered at the moment of the transition by the same
//! `render` the producer uses inline, so a byte-for-byte comparison with it cannot catch a fault
//! of the renderer itself (both sides would share it): it measures *when* a body was rendered,
//! not *what* it says. [`Facts`] is the check that can: the values a body must carry, taken
//! straight from the transition as sent and the CI state committed at that moment, and compared
//! field by field with the body as JSON. Only what a transition decides is checked: the build,
//! its status, the transition's times (whole seconds, ISO 8601, as GitLab's `*_iso` fields),
//! durations and failure reason, the runner (none for `created`, as in GitLab's hook data for a
//! created build) and the pipeline's status at that moment.

use hookline_cistate::RenderSnapshot;
use hookline_schemas::BuildStatus;
use serde_json::{Value, json};

use uuid::Uuid;

use crate::error::CliError;
use crate::transition::{Accepted, TransitionSent};

/// Told of every transition: the truth rendered at its moment, the facts its bodies must carry
/// (written down without the renderer), and the sink's answer.
pub trait Witness: Send + Sync {
    fn expect(&self, sent: &TransitionSent, truth: Vec<u8>, facts: Facts);
    fn answered(&self, event_id: Uuid, answer: &Result<Accepted, CliError>);
}

/// Field (a JSON pointer) and the value it must have.
#[derive(Debug, Clone, PartialEq)]
pub struct Facts {
    fields: Vec<(&'static str, Value)>,
}

/// GitLab's `build_failure_reason` for a build that did not fail.
const NO_FAILURE: &str = "unknown_failure";

fn iso_seconds(t: Option<chrono::DateTime<chrono::Utc>>) -> Value {
    t.map_or(Value::Null, |t| {
        json!(t.format("%Y-%m-%dT%H:%M:%SZ").to_string())
    })
}

impl Facts {
    /// The facts of `sent`, a transition of `snapshot`'s build committed as `snapshot` shows.
    pub fn of(snapshot: &RenderSnapshot, sent: &TransitionSent) -> Facts {
        let created = sent.status == BuildStatus::Created;
        let f = &sent.facts;
        let mut fields = vec![
            ("/build_id", json!(sent.build_id)),
            ("/pipeline_id", json!(sent.pipeline_id)),
            ("/build_status", json!(sent.status.as_str())),
            ("/commit/status", json!(snapshot.pipeline.status)),
        ];
        if created {
            fields.extend([
                ("/build_started_at_iso", Value::Null),
                ("/build_finished_at_iso", Value::Null),
                ("/build_duration", Value::Null),
                ("/build_queued_duration", Value::Null),
                ("/build_failure_reason", Value::Null),
                ("/runner", Value::Null),
            ]);
        } else {
            fields.extend([
                ("/build_started_at_iso", iso_seconds(f.started_at)),
                ("/build_finished_at_iso", iso_seconds(f.finished_at)),
                ("/build_duration", json!(f.duration)),
                ("/build_queued_duration", json!(f.queued_duration)),
                (
                    "/build_failure_reason",
                    json!(f.failure_reason.as_deref().unwrap_or(NO_FAILURE)),
                ),
            ]);
            fields.push(match &snapshot.runner {
                Some(runner) => ("/runner/id", json!(runner.id)),
                None => ("/runner", Value::Null),
            });
        }
        Facts { fields }
    }

    /// The fields of `body` that differ from the facts (every field when `body` is not JSON).
    pub fn wrong_in(&self, body: &[u8]) -> Vec<&'static str> {
        let Ok(body) = serde_json::from_slice::<Value>(body) else {
            return self.fields.iter().map(|(f, _)| *f).collect();
        };
        self.fields
            .iter()
            .filter(|(pointer, want)| body.pointer(pointer) != Some(want))
            .map(|(pointer, _)| *pointer)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use hookline_cistate::fixtures::sample;
    use hookline_cistate::{Transition, render};
    use hookline_schemas::TransitionFacts;
    use uuid::Uuid;

    use super::*;

    fn sent(status: BuildStatus, facts: TransitionFacts) -> TransitionSent {
        let s = sample(0);
        TransitionSent {
            event_id: Uuid::nil(),
            build_id: s.build.id,
            project_id: s.project.id,
            pipeline_id: s.pipeline.id,
            status,
            occurred_at: Utc::now(),
            facts,
        }
    }

    fn finished() -> TransitionFacts {
        TransitionFacts {
            started_at: Some(Utc.with_ymd_and_hms(2026, 11, 27, 20, 19, 3).unwrap()),
            finished_at: Some(
                Utc.with_ymd_and_hms(2026, 11, 27, 20, 21, 0).unwrap()
                    + chrono::Duration::milliseconds(250),
            ),
            duration: Some(116.75),
            queued_duration: Some(2.488),
            failure_reason: Some("script_failure".into()),
        }
    }

    #[test]
    fn the_renderer_agrees_with_the_facts_for_every_status() {
        let snapshot = sample(0);
        for status in [
            BuildStatus::Created,
            BuildStatus::Pending,
            BuildStatus::Running,
            BuildStatus::Success,
            BuildStatus::Failed,
            BuildStatus::Canceled,
        ] {
            let sent = sent(status, finished());
            let body = render(
                &snapshot,
                &Transition {
                    status,
                    facts: sent.facts.clone(),
                },
            );
            assert_eq!(
                Facts::of(&snapshot, &sent).wrong_in(&body),
                Vec::<&str>::new(),
                "{status:?}"
            );
        }
    }

    #[test]
    fn a_body_of_another_moment_is_caught_even_when_the_truth_would_share_it() {
        let snapshot = sample(0);
        let sent = sent(BuildStatus::Failed, finished());
        let facts = Facts::of(&snapshot, &sent);
        // Rendered with the row's current facts instead of the transition's (a renderer that
        // forgot to pin them): the truth would be rendered the same way, the facts are not.
        let unpinned = render(&snapshot, &Transition::of_current(&snapshot.build).unwrap());
        let wrong = facts.wrong_in(&unpinned);
        assert!(wrong.contains(&"/build_status"), "{wrong:?}");
        assert!(wrong.contains(&"/build_failure_reason"), "{wrong:?}");
        // A created event rendered with a runner and the row's times.
        let created = Facts::of(&snapshot, &self::sent(BuildStatus::Created, finished()));
        let with_runner = render(
            &snapshot,
            &Transition {
                status: BuildStatus::Running,
                facts: finished(),
            },
        );
        let wrong = created.wrong_in(&with_runner);
        for field in ["/build_status", "/runner", "/build_started_at_iso"] {
            assert!(wrong.contains(&field), "{field} in {wrong:?}");
        }
        assert_eq!(facts.wrong_in(b"not json").len(), facts.fields.len());
    }
}
