//! A receiver for ordering tests: it reads each Job Hook's build and status, answers 500 to the
//! (build, status) pairs it is told to fail, and keeps every request in arrival order, so a
//! test can read what each build looked like to the receiver.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::StatusCode;

/// One request: the build, its status in the body, and the answer given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub build_id: i64,
    pub status: String,
    pub accepted: bool,
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    /// (build, status) -> failures still to answer; `u32::MAX` fails until told otherwise.
    failing: HashMap<(i64, String), u32>,
}

#[derive(Clone)]
pub struct StatusReceiver {
    pub url: String,
    state: Arc<Mutex<State>>,
}

impl StatusReceiver {
    pub async fn start() -> StatusReceiver {
        let state = Arc::new(Mutex::new(State::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind receiver");
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let shared = state.clone();
        let app = axum::Router::new().fallback(move |body: Bytes| {
            let state = shared.clone();
            async move {
                let json: serde_json::Value =
                    serde_json::from_slice(&body).expect("receiver got JSON");
                let build_id = json["build_id"].as_i64().expect("build_id");
                let status = json["build_status"]
                    .as_str()
                    .expect("build_status")
                    .to_owned();
                let mut s = state.lock().unwrap();
                let fail = match s.failing.get_mut(&(build_id, status.clone())) {
                    Some(left) if *left > 0 => {
                        if *left != u32::MAX {
                            *left -= 1;
                        }
                        true
                    }
                    _ => false,
                };
                s.seen.push(Seen {
                    build_id,
                    status,
                    accepted: !fail,
                });
                if fail {
                    StatusCode::INTERNAL_SERVER_ERROR
                } else {
                    StatusCode::OK
                }
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await.ok() });
        StatusReceiver { url, state }
    }

    /// Answers 500 to the next `times` deliveries of `build` at `status` (`u32::MAX`: until
    /// [`StatusReceiver::recover`]).
    pub fn fail(&self, build_id: i64, status: &str, times: u32) {
        self.state
            .lock()
            .unwrap()
            .failing
            .insert((build_id, status.to_owned()), times);
    }

    /// Stops failing everything.
    pub fn recover(&self) {
        self.state.lock().unwrap().failing.clear();
    }

    /// Every request, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// The statuses of `build` the receiver accepted (2xx), in arrival order.
    pub fn accepted(&self, build_id: i64) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|s| s.build_id == build_id && s.accepted)
            .map(|s| s.status)
            .collect()
    }

    /// Position in arrival order of the first accepted delivery of `build` at `status`.
    pub fn accepted_at(&self, build_id: i64, status: &str) -> Option<usize> {
        self.seen()
            .iter()
            .position(|s| s.build_id == build_id && s.status == status && s.accepted)
    }
}

/// Whether `statuses` never go backwards in the order of a build's transitions (repeats of the
/// same status, i.e. duplicates, are allowed).
pub fn in_transition_order(statuses: &[String]) -> bool {
    let rank = |s: &str| match s {
        "created" => 0,
        "pending" => 1,
        "running" => 2,
        _ => 3,
    };
    statuses.windows(2).all(|w| rank(&w[0]) <= rank(&w[1]))
}
