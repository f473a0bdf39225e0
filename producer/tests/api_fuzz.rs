//! Property tests of the ingestion API through `app()`, without a socket: arbitrary JSON values,
//! near-valid transitions and arbitrary bytes never get a 5xx other than 503, and every 4xx
//! body is `{"error": string, "field"?: string}` (a batch's per-item report being the one other
//! shape). A bounded number of cases, so they run in the normal test command.
//!
//! Kafka is unreachable here: a transition that passes every check is answered 503 once its
//! short delivery timeout passes, which is an allowed answer.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::http::Request;
use hookline_cistate::MemoryStore;
use hookline_producer::{AppState, Emitter, EmitterConfig, Flags, ProducerMetrics, app};
use proptest::prelude::*;
use serde_json::{Map, Value, json};
use tower::ServiceExt;

/// Cases per property.
const CASES: u32 = 300;

/// The build every near-valid transition names, so some of them reach Kafka (and get 503).
const BUILD_ID: i64 = 1000;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    })
}

fn router() -> &'static Router {
    static APP: OnceLock<Router> = OnceLock::new();
    APP.get_or_init(|| {
        runtime().block_on(async {
            let store = Arc::new(MemoryStore::new());
            let mut snapshot = hookline_cistate::fixtures::sample(0);
            snapshot.build.id = BUILD_ID;
            hookline_cistate::fixtures::write_snapshot(store.as_ref(), &snapshot)
                .await
                .unwrap();
            let mut config = EmitterConfig::new("127.0.0.1:9");
            config.delivery_timeout = Duration::from_millis(50);
            let emitter = Emitter::new(
                config,
                store,
                Flags::in_memory(),
                Arc::new(ProducerMetrics::new()),
            )
            .await
            .unwrap();
            app(AppState {
                body_limit: 64 * 1024,
                ..AppState::new(emitter)
            })
        })
    })
}

fn post(path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
    // Built before entering the runtime: building it blocks on the runtime itself.
    let app = router().clone();
    runtime().block_on(async {
        let request = Request::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .unwrap();
        let response = app.oneshot(request).await.unwrap();
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, bytes.to_vec())
    })
}

/// The contract: no 5xx but 503; a 4xx is `{"error", "field"?}`, or a batch's item report.
fn check_answer(path: &str, sent: &[u8], status: u16, body: &[u8]) -> Result<(), TestCaseError> {
    let shown = || {
        format!(
            "{path} {} -> {status} {}",
            String::from_utf8_lossy(sent),
            String::from_utf8_lossy(body)
        )
    };
    prop_assert!(status < 500 || status == 503, "{}", shown());
    if (400..500).contains(&status) {
        let json: Value = serde_json::from_slice(body)
            .map_err(|_| TestCaseError::fail(format!("4xx body is not JSON: {}", shown())))?;
        let object = json.as_object().ok_or_else(|| {
            TestCaseError::fail(format!("4xx body is not an object: {}", shown()))
        })?;
        let is_item_report = path.ends_with("/batch") && object.contains_key("results");
        if !is_item_report {
            prop_assert!(object["error"].is_string(), "{}", shown());
            prop_assert!(
                object.get("field").is_none_or(Value::is_string),
                "{}",
                shown()
            );
            prop_assert!(
                object.keys().all(|k| k == "error" || k == "field"),
                "{}",
                shown()
            );
        }
    }
    Ok(())
}

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        any::<String>().prop_map(Value::String),
        field_name().prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            proptest::collection::vec((field_name(), inner), 0..6)
                .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// The API's field names and status words, and a few others.
fn field_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("build_id"),
        Just("status"),
        Just("occurred_at"),
        Just("event_id"),
        Just("facts"),
        Just("started_at"),
        Just("finished_at"),
        Just("duration"),
        Just("queued_duration"),
        Just("failure_reason"),
        Just("running"),
        Just("failed"),
        Just("script_failure"),
        Just(""),
        Just("x"),
    ]
    .prop_map(str::to_owned)
}

/// A transition with every field present or not, each of a plausible or wrong value.
fn near_valid() -> impl Strategy<Value = Value> {
    let build_id = prop_oneof![
        8 => Just(json!(BUILD_ID)),
        1 => Just(json!(77)),
        1 => Just(json!(0)),
        1 => Just(json!(-1)),
        1 => Just(json!(i64::MAX)),
        1 => Just(json!(u64::MAX)),
        1 => Just(json!(1.5)),
        1 => Just(json!("1000")),
        1 => any_json(),
    ];
    let status = prop_oneof![
        4 => Just(json!("created")),
        4 => Just(json!("running")),
        4 => Just(json!("failed")),
        1 => Just(json!("manual")),
        1 => Just(json!({"running": null})),
        1 => any_json(),
    ];
    let time = prop_oneof![
        6 => Just(json!("2026-11-27T20:21:00Z")),
        6 => Just(json!("2026-11-27T20:21:00.123456789+01:00")),
        1 => Just(json!("yesterday")),
        1 => Just(json!(0)),
        1 => any_json(),
    ];
    let number = prop_oneof![
        6 => Just(json!(1.5)),
        1 => Just(json!(-1)),
        2 => Just(json!(1e308)),
        1 => Just(json!("1")),
        1 => any_json()
    ];
    let reason = prop_oneof![
        4 => Just(json!("script_failure")),
        4 => Just(json!("unknown_failure")),
        1 => Just(json!("x")),
        1 => any_json()
    ];
    let facts = (
        proptest::option::of(time.clone()),
        proptest::option::of(time.clone()),
        proptest::option::of(number.clone()),
        proptest::option::of(number),
        proptest::option::of(reason),
    )
        .prop_map(|(s, f, d, q, r)| {
            let mut facts = Map::new();
            for (k, v) in [
                ("started_at", s),
                ("finished_at", f),
                ("duration", d),
                ("queued_duration", q),
                ("failure_reason", r),
            ] {
                if let Some(v) = v {
                    facts.insert(k.into(), v);
                }
            }
            Value::Object(facts)
        });
    let event_id = prop_oneof![
        6 => Just(json!("6f1c2f36-2a43-4a8e-9f0e-0a4d2f6c1b7e")),
        1 => Just(json!("not-a-uuid")),
        1 => any_json(),
    ];
    (
        proptest::option::of(build_id),
        proptest::option::of(status),
        proptest::option::of(time),
        proptest::option::of(event_id),
        proptest::option::of(facts),
    )
        .prop_map(|(b, s, o, e, f)| {
            let mut body = Map::new();
            for (k, v) in [
                ("build_id", b),
                ("status", s),
                ("occurred_at", o),
                ("event_id", e),
                ("facts", f),
            ] {
                if let Some(v) = v {
                    body.insert(k.into(), v);
                }
            }
            Value::Object(body)
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: CASES,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_json_gets_a_typed_answer(value in any_json(), batch in any::<bool>()) {
        let path = if batch { "/v1/transitions/batch" } else { "/v1/transitions" };
        let sent = serde_json::to_vec(&value).unwrap();
        let (status, body) = post(path, sent.clone());
        check_answer(path, &sent, status, &body)?;
    }

    #[test]
    fn near_valid_transitions_get_a_typed_answer(
        items in proptest::collection::vec(near_valid(), 1..4),
        batch in any::<bool>(),
    ) {
        let (path, value) = if batch {
            ("/v1/transitions/batch", Value::Array(items))
        } else {
            ("/v1/transitions", items[0].clone())
        };
        let sent = serde_json::to_vec(&value).unwrap();
        let (status, body) = post(path, sent.clone());
        check_answer(path, &sent, status, &body)?;
    }

    #[test]
    fn arbitrary_bytes_get_a_typed_answer(
        bytes in proptest::collection::vec(any::<u8>(), 0..300),
        batch in any::<bool>(),
    ) {
        let path = if batch { "/v1/transitions/batch" } else { "/v1/transitions" };
        let (status, body) = post(path, bytes.clone());
        check_answer(path, &bytes, status, &body)?;
    }
}
