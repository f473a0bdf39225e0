//! `hookline-consumer serve` as a child process, set up for a test's [`World`]: its topics, its
//! database schema, loopback receivers allowed, metrics on a free port.
//!
//! The binary's path comes from the calling test (`env!("CARGO_BIN_EXE_hookline-consumer")`):
//! cargo gives it only to the consumer package's own tests.

use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::world::World;
use crate::{database_url, free_port};

/// A `hookline-consumer serve` command for a world, ready to take more options.
pub struct ConsumerProcess {
    command: Command,
    /// The port of its `/metrics`, `/healthz` and `/readyz`.
    pub port: u16,
}

/// Lines the child wrote to stderr, as they came.
pub type Logs = Arc<Mutex<Vec<String>>>;

impl ConsumerProcess {
    /// `bin serve` on `world`'s topics and broker, in `group`, with the store in `schema`.
    /// `RUST_LOG` is `CHILD_LOG` when set, else `warn`.
    pub fn new(bin: &str, world: &World, group: &str, schema: &str) -> ConsumerProcess {
        let port = free_port();
        let mut command = Command::new(bin);
        command
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--allow-cidr", "127.0.0.0/8"])
            .env("HOOKLINE_KAFKA_BROKERS", &world.brokers)
            .env("HOOKLINE_GROUP_ID", group)
            .env("HOOKLINE_TOPIC", &world.topic)
            .env("HOOKLINE_DATABASE_URL", database_url())
            .env("HOOKLINE_DATABASE_SCHEMA", schema)
            .env(
                "RUST_LOG",
                std::env::var("CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .kill_on_drop(true);
        ConsumerProcess { command, port }
    }

    /// More options for `serve`.
    pub fn args<'a>(mut self, args: impl IntoIterator<Item = &'a str>) -> Self {
        self.command.args(args);
        self
    }

    /// An environment variable for the process.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.command.env(key, value);
        self
    }

    /// `http://127.0.0.1:<port>`, where its `/metrics`, `/healthz` and `/readyz` answer.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts it; its stderr is dropped.
    pub fn spawn(mut self) -> Child {
        self.command
            .stderr(Stdio::null())
            .spawn()
            .expect("start hookline-consumer")
    }

    /// Starts it, its stderr written to `log`.
    pub fn spawn_logging_to(mut self, log: std::fs::File) -> Child {
        self.command
            .stderr(log)
            .spawn()
            .expect("start hookline-consumer")
    }

    /// Starts it, collecting its stderr line by line (read as it comes: a full pipe would block
    /// the process).
    pub fn spawn_logged(mut self) -> (Child, Logs) {
        let mut child = self
            .command
            .stderr(Stdio::piped())
            .spawn()
            .expect("start hookline-consumer");
        let logs = Logs::default();
        let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
        let sink = logs.clone();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                sink.lock().unwrap().push(line);
            }
        });
        (child, logs)
    }
}
