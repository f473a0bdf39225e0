//! A TCP gate in front of the shared PostgreSQL that a test can close: while closed, every open
//! connection is cut and new ones are dropped on arrival, as when the server goes away; opened
//! again, connections reach the real server. Tests of a PostgreSQL outage use it instead of
//! stopping the shared server; tests of a schema registry outage put one in front of the shared
//! registry the same way ([`PgGate::in_front_of`]).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::AbortHandle;
use tokio_util::sync::CancellationToken;

use crate::database_url;

pub struct PgGate {
    port: u16,
    closed: Arc<AtomicBool>,
    /// Connections that arrived, let through or dropped.
    arrived: Arc<AtomicUsize>,
    connections: Arc<Mutex<Vec<AbortHandle>>>,
    shutdown: CancellationToken,
}

impl PgGate {
    /// Opens a gate to the server of `HOOKLINE_TEST_DATABASE_URL`.
    pub async fn start() -> PgGate {
        PgGate::in_front_of(server_address(&database_url())).await
    }

    /// Opens a gate to any TCP server at `target` (`host:port`).
    pub async fn in_front_of(target: String) -> PgGate {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the gate");
        let port = listener.local_addr().unwrap().port();
        let closed = Arc::new(AtomicBool::new(false));
        let arrived = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(Mutex::new(Vec::new()));
        let shutdown = CancellationToken::new();
        let (gate_closed, gate_arrived, gate_connections, stop) = (
            closed.clone(),
            arrived.clone(),
            connections.clone(),
            shutdown.clone(),
        );
        tokio::spawn(async move {
            loop {
                let (mut client, _) = tokio::select! {
                    _ = stop.cancelled() => return,
                    accepted = listener.accept() => match accepted {
                        Ok(pair) => pair,
                        Err(_) => continue,
                    },
                };
                gate_arrived.fetch_add(1, Ordering::SeqCst);
                if gate_closed.load(Ordering::SeqCst) {
                    continue; // dropped: the client sees the connection close at once
                }
                let target = target.clone();
                let task = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                gate_connections.lock().unwrap().push(task.abort_handle());
            }
        });
        PgGate {
            port,
            closed,
            arrived,
            connections,
            shutdown,
        }
    }

    /// How many connections arrived at the gate so far (let through or dropped): a client's
    /// attempts, counted without timing them.
    pub fn connections(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    /// The gate's own port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The test database's URL, through the gate.
    pub fn url(&self) -> String {
        let url = database_url();
        url.replace(&server_address(&url), &format!("127.0.0.1:{}", self.port))
    }

    /// Cuts every connection and refuses new ones.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for connection in self.connections.lock().unwrap().drain(..) {
            connection.abort();
        }
    }

    /// Lets connections through again.
    pub fn open(&self) {
        self.closed.store(false, Ordering::SeqCst);
    }
}

impl Drop for PgGate {
    fn drop(&mut self) {
        self.shutdown.cancel();
        self.close();
    }
}

/// `host:port` of a `postgres://user:password@host:port/db` URL.
fn server_address(url: &str) -> String {
    let rest = url.split_once('@').map_or(url, |(_, r)| r);
    let rest = rest.split_once("://").map_or(rest, |(_, r)| r);
    rest.split(['/', '?']).next().unwrap_or(rest).to_owned()
}
