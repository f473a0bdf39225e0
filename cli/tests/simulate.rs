//! `hookline simulate` against a real PostgreSQL (scripts/test starts it) and a stand-in producer
//! that answers like the real one: 401 without the bearer token, 503 with Retry-After first,
//! then 202.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::post;
use hookline_cistate::{CiStore, PgOptions, PgStore};
use hookline_tests::{database_url, unique_name};

/// What the stand-in producer saw: (build id, posted status, status in the store at that moment).
type Seen = Arc<Mutex<Vec<(i64, String, Option<String>)>>>;

#[derive(Clone)]
struct Producer {
    store: Arc<PgStore>,
    seen: Seen,
    unavailable_first: Arc<Mutex<bool>>,
}

/// The token `run_simulate` gives `simulate`; the stand-in producer answers 401 without it.
const API_TOKEN: &str = "sim-token-0123456789";

async fn transition(
    State(p): State<Producer>,
    headers: axum::http::HeaderMap,
    body: axum::Json<serde_json::Value>,
) -> axum::response::Response {
    let expected = format!("Bearer {API_TOKEN}");
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some(expected.as_str()) {
        return (StatusCode::UNAUTHORIZED, "no or wrong bearer token").into_response();
    }
    {
        let mut first = p.unavailable_first.lock().unwrap();
        if *first {
            *first = false;
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                [("retry-after", "1")],
                "kafka is down",
            )
                .into_response();
        }
    }
    let build_id = body["build_id"].as_i64().unwrap();
    let status = body["status"].as_str().unwrap().to_owned();
    let stored = p
        .store
        .snapshot(build_id)
        .await
        .unwrap()
        .map(|s| s.build.status);
    p.seen.lock().unwrap().push((build_id, status, stored));
    (
        StatusCode::ACCEPTED,
        axum::Json(serde_json::json!({"timing": "deferred"})),
    )
        .into_response()
}

async fn run_simulate(
    schema: &str,
    producer: &str,
    receiver: &str,
) -> (std::process::Output, serde_json::Value) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookline"))
        .args([
            "simulate",
            "--projects",
            "3",
            "--builds",
            "12",
            "--seed",
            "5",
            "--quiet",
            "--json",
        ])
        .args([
            "--database-url",
            &database_url(),
            "--database-schema",
            schema,
        ])
        .args(["--producer-url", producer, "--receiver-url", receiver])
        .args(["--api-token", API_TOKEN])
        .output()
        .await
        .unwrap();
    let report = serde_json::from_slice(&out.stdout).unwrap_or(serde_json::Value::Null);
    (out, report)
}

#[tokio::test]
async fn commits_before_notifying_retries_503_and_registers_one_hook_per_project() {
    let schema = unique_name("sim");
    let store = Arc::new(
        PgStore::connect(&PgOptions::new(database_url()).schema(schema.clone()))
            .await
            .unwrap(),
    );
    let producer = Producer {
        store: store.clone(),
        seen: Arc::default(),
        unavailable_first: Arc::new(Mutex::new(true)),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new()
        .route("/v1/transitions", post(transition))
        .with_state(producer.clone());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let receiver = "http://receiver.example:8090";
    let (out, report) = run_simulate(&schema, &url, receiver).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let seen = producer.seen.lock().unwrap().clone();
    assert!(!seen.is_empty());
    assert_eq!(report["sent"].as_u64(), Some(seen.len() as u64), "{report}");
    assert_eq!(report["accepted"], report["sent"], "{report}");
    assert_eq!(report["failed"].as_u64(), Some(0), "{report}");
    // Like a real CI: the state a transition describes is committed before it is announced.
    for (build, posted, stored) in &seen {
        assert_eq!(
            Some(posted),
            stored.as_ref(),
            "build {build} was announced before it was committed"
        );
    }
    let statuses: std::collections::HashSet<&str> =
        seen.iter().map(|(_, s, _)| s.as_str()).collect();
    for status in ["created", "pending", "running"] {
        assert!(
            statuses.contains(status),
            "no {status} transition in {statuses:?}"
        );
    }

    let hooks = store.list_hooks(None).await.unwrap();
    assert_eq!(hooks.len(), 3);
    for hook in &hooks {
        assert_eq!(hook.url, format!("{receiver}/projects/{}", hook.project_id));
        assert!(hook.job_events);
    }

    // Running it again re-uses the hooks instead of adding a second one per project.
    let (out, _) = run_simulate(&schema, &url, receiver).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(store.list_hooks(None).await.unwrap().len(), 3);
}

#[tokio::test]
async fn a_producer_that_refuses_for_good_makes_simulate_fail_and_say_so() {
    let schema = unique_name("sim");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = Router::new().route(
        "/v1/transitions",
        post(|| async {
            (
                StatusCode::UNPROCESSABLE_ENTITY,
                r#"{"error":"nope","field":"status"}"#,
            )
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let (out, report) = run_simulate(&schema, &url, "http://receiver.example").await;
    assert!(!out.status.success());
    assert_eq!(report["accepted"].as_u64(), Some(0), "{report}");
    assert!(report["failed"].as_u64().unwrap() > 0, "{report}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("422"));
}

#[tokio::test]
async fn via_outbox_commits_each_transition_with_its_state_and_posts_nothing() {
    let schema = unique_name("sim");
    let store = PgStore::connect(&PgOptions::new(database_url()).schema(schema.clone()))
        .await
        .unwrap();
    // No producer: nothing may be POSTed.
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_hookline"))
        .args(["simulate", "--via", "outbox", "--projects", "3"])
        .args(["--builds", "12", "--seed", "5", "--quiet", "--json"])
        .args([
            "--database-url",
            &database_url(),
            "--database-schema",
            &schema,
        ])
        .args(["--receiver-url", "http://receiver.example:8090"])
        .output()
        .await
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let rows: Vec<(i64, String, Option<serde_json::Value>)> =
        sqlx::query_as("SELECT build_id, status, facts FROM hookline_outbox ORDER BY id")
            .fetch_all(store.pool())
            .await
            .unwrap();
    assert!(!rows.is_empty());
    assert_eq!(report["sent"].as_u64(), Some(rows.len() as u64), "{report}");
    assert_eq!(report["accepted"], report["sent"], "{report}");
    // Each build's rows in the order of its transitions, with the facts of that moment.
    let rank = |s: &str| {
        ["created", "pending", "running"]
            .iter()
            .position(|x| *x == s)
            .unwrap_or(3)
    };
    let mut last: std::collections::HashMap<i64, usize> = Default::default();
    for (build, status, facts) in &rows {
        let r = rank(status);
        assert!(
            last.get(build).is_none_or(|l| *l < r),
            "build {build}: {status} out of order"
        );
        last.insert(*build, r);
        let facts = facts.as_ref().expect("facts from the build row");
        if r <= 2 {
            assert_eq!(facts["started_at"].is_null(), r < 2, "{status}: {facts}");
        }
    }
}
