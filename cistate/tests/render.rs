//! The renderer's output, pinned: a change to the bytes receivers get must show up here. The
//! golden file is a change detector (it was written from the renderer's own output); what the
//! bytes must be is checked against GitLab's expectations, written by hand, in
//! `oracle/gitlab_job_hook.rs`.

#[path = "oracle/gitlab_job_hook.rs"]
mod gitlab_job_hook;

use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{CiStore, MemoryStore, Transition, render};
use hookline_schemas::{BuildStatus, JobHook, TransitionFacts};

const GOLDEN: &str = "tests/golden/job_hook_running.json";

#[test]
fn running_build_matches_golden_json() {
    let snapshot = sample(0);
    let transition = Transition::of_current(&snapshot.build).unwrap();
    let bytes = render(&snapshot, &transition);
    // Pretty-printed from the typed body, so the file keeps GitLab's field order.
    let parsed: JobHook = serde_json::from_slice(&bytes).unwrap();
    let pretty = serde_json::to_string_pretty(&parsed).unwrap() + "\n";
    if std::env::var_os("HOOKLINE_BLESS").is_some() {
        std::fs::write(GOLDEN, &pretty).unwrap();
    }
    let golden = std::fs::read_to_string(GOLDEN).unwrap();
    assert_eq!(
        pretty, golden,
        "rendered Job Hook differs from {GOLDEN} (HOOKLINE_BLESS=1 rewrites it)"
    );
    // Field order is GitLab's, not alphabetical: compare the raw bytes' key order too.
    let text = String::from_utf8(bytes).unwrap();
    assert!(text.starts_with(r#"{"object_kind":"build","ref":"main","tag":false,"before_sha":"#));
}

#[test]
fn created_event_pins_status_and_hides_runner() {
    let snapshot = sample(0);
    let created = Transition {
        status: BuildStatus::Created,
        facts: TransitionFacts::default(),
    };
    let hook: JobHook = serde_json::from_slice(&render(&snapshot, &created)).unwrap();
    assert_eq!(hook.build_status, "created");
    assert_eq!(hook.runner, None, "a created build has no runner yet");
    assert_eq!(hook.build_started_at, None);
    assert_eq!(hook.build_queued_duration, None);
    assert_eq!(hook.build_failure_reason, None);
    // What is not pinned comes from the current state.
    assert_eq!(hook.commit.status, "running");
    assert_eq!(hook.project.path_with_namespace, "platform/build-tools");
    assert_eq!(hook.project_name, "Platform / Build Tools");
    assert_eq!(hook.source_pipeline.unwrap().pipeline_id, 4999);
}

#[test]
fn source_pipeline_is_absent_without_upstream() {
    let mut snapshot = sample(0);
    snapshot.pipeline.source = None;
    snapshot.build.environment = None;
    let bytes = render(&snapshot, &Transition::of_current(&snapshot.build).unwrap());
    let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    assert!(value.get("source_pipeline").is_none());
    assert_eq!(value["environment"], serde_json::Value::Null);
}

#[tokio::test]
async fn memory_store_round_trip_renders_the_same_bytes() {
    let store = MemoryStore::new();
    let snapshot = sample(0);
    write_snapshot(&store, &snapshot).await.unwrap();
    let loaded = store.snapshot(snapshot.build.id).await.unwrap().unwrap();
    let t = Transition::of_current(&snapshot.build).unwrap();
    assert_eq!(render(&loaded, &t), render(&snapshot, &t));
    assert!(store.snapshot(424242).await.unwrap().is_none());
}
