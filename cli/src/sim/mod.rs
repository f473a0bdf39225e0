//! The simulated CI: a seeded world of namespaces, projects, users and runners, and pipelines
//! whose builds go through GitLab's transitions in real (but fast) time.
//!
//! Two halves:
//! - `plan`: a plan drawn from the seed up front ([`plan()`]): which builds exist, in which
//!   stages, how long each waits in the queue and runs, how it ends, which failures are retried
//!   (a retry is a NEW build with a new id and `retries_count + 1`, as in GitLab) and every event
//!   id; and writing the plan's world (namespaces, projects, users, runners, hooks) to a store.
//! - `play`: running it ([`run`]) plays every pipeline as its own task on the real clock. Each
//!   step first commits the new state to the store (build and pipeline), like a real CI commits
//!   before it notifies, then computes the *truth* (the Job Hook rendered from the state at that
//!   very moment, what a perfect system would deliver) and hands the transition to a [`Sink`].
//!
//! One pipeline's steps run one after the other and never overlap: the pipeline row is shared by
//! its builds, so a step of build A must not change what build B's transition renders between
//! B's commit and B's emit. Different pipelines share nothing that renders, so they run in
//! parallel.

mod plan;
mod play;

pub use crate::facts::Witness;
pub use crate::transition::{Accepted, Sink, TransitionSent};
pub use plan::{BuildPlan, Outcome, PipelinePlan, Plan, SimSpec, plan, write_world};
pub use play::{Pace, RunSummary, Runtime, run};

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use async_trait::async_trait;
    use chrono::Utc;
    use hookline_cistate::{CiStore, NewHook, Transition, render};
    use hookline_schemas::PayloadTiming;
    use uuid::Uuid;

    use super::play::{Step, timeline};
    use super::*;
    use crate::error::CliError;
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
                outbox: None,
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
