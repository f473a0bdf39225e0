//! A Confluent-compatible schema registry stand-in, served over real HTTP on loopback: register a
//! subject version, fetch a schema by id. Ids start at 100 so they differ from the embedded
//! registry's; it can be told to be "down" (503 to lookups by id).
//!
//! The tests of hookline against a registry use the real one (Apicurio, `registry_apicurio`).
//! This fake stays only for what the real one cannot do: answer `503` while reachable
//! (`schema_registry`: a lookup by id that fails is asked again, the record held), and count
//! requests by kind (`schemas_http_registry`: a schema is fetched by id once, then cached).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

#[derive(Default)]
struct Registered {
    schemas: Vec<String>,
    requests: HashMap<&'static str, usize>,
    down: bool,
}

type Shared = Arc<Mutex<Registered>>;

/// A running fake registry.
#[derive(Clone)]
pub struct FakeRegistry {
    /// Its base URL, `http://127.0.0.1:<port>`.
    pub url: String,
    state: Shared,
}

impl FakeRegistry {
    pub async fn start() -> FakeRegistry {
        let state = Shared::default();
        let app = Router::new()
            .route("/subjects/{subject}/versions", post(register))
            .route("/schemas/ids/{id}", get(by_id))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind registry");
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        FakeRegistry { url, state }
    }

    /// Requests of `kind` (`register` or `by_id`) so far.
    pub fn requests(&self, kind: &str) -> usize {
        self.state
            .lock()
            .unwrap()
            .requests
            .get(kind)
            .copied()
            .unwrap_or(0)
    }

    /// While down, lookups by id answer 503.
    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }
}

async fn register(
    State(r): State<Shared>,
    Path(_subject): Path<String>,
    Json(body): Json<Value>,
) -> Json<Value> {
    let mut r = r.lock().unwrap();
    *r.requests.entry("register").or_default() += 1;
    let schema = body["schema"].as_str().unwrap_or_default().to_owned();
    let id = match r.schemas.iter().position(|s| *s == schema) {
        Some(i) => i,
        None => {
            r.schemas.push(schema);
            r.schemas.len() - 1
        }
    };
    Json(json!({ "id": 100 + id }))
}

async fn by_id(State(r): State<Shared>, Path(id): Path<usize>) -> Result<Json<Value>, StatusCode> {
    let mut r = r.lock().unwrap();
    *r.requests.entry("by_id").or_default() += 1;
    if r.down {
        return Err(StatusCode::SERVICE_UNAVAILABLE);
    }
    id.checked_sub(100)
        .and_then(|i| r.schemas.get(i).cloned())
        .map(|s| Json(json!({ "schema": s })))
        .ok_or(StatusCode::NOT_FOUND)
}
