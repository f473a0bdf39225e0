//! `hookline simulate`: the simulated CI against real services. The world goes to PostgreSQL,
//! one hook per project points at a receiver, and every transition is POSTed to a producer's
//! HTTP API (`POST /v1/transitions`) after its state was committed.
//!
//! With `--via outbox` nothing is POSTed: each step writes its transition into the outbox table
//! in the same transaction as the state change, and `hookline-producer relay` publishes it.
//!
//! Every request carries the producer's API token (`--api-token`) as a bearer token.
//! The producer answers `202` once Kafka acknowledged the event, `503` with `Retry-After` while
//! Kafka or the store is unavailable (retried as told, with the same `event_id`, so a retried
//! event keeps its identity), and other errors for good (logged, counted, reported).

use std::sync::Arc;
use std::time::Duration;

use hookline_cistate::{CiStore, NewHook, PgOptions, PgStore};
use reqwest::StatusCode;
use serde::Serialize;
use serde_json::json;

use crate::error::CliError;
use crate::sim::{self, Accepted, Pace, Runtime, SimSpec, Sink, TransitionSent};

/// The options of `hookline simulate` (see `--help`).
#[derive(Debug, Clone)]
pub struct SimulateOptions {
    pub database_url: String,
    pub database_schema: Option<String>,
    /// How transitions leave the simulated CI.
    pub via: Via,
    /// Base URL of the producer's API (`Via::Http` only).
    pub producer_url: String,
    /// Sent as `Authorization: Bearer <token>` to the producer (`None` for a `--no-auth` one).
    pub api_token: Option<String>,
    pub receiver_url: String,
    pub signing_secret: Option<String>,
    pub projects: usize,
    pub builds: usize,
    /// Transitions per second; 0 = as fast as the producer accepts them.
    pub rate: f64,
    pub seed: u64,
    pub id_base: i64,
    /// How long to keep retrying one transition (503s, connection errors) before giving up on it.
    pub retry_for: Duration,
    /// One line per transition on stdout.
    pub verbose: bool,
}

/// How the simulated CI hands its transitions on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Via {
    /// Commit the state, then POST the transition to the producer's API.
    Http,
    /// Write the transition into the outbox in the state change's own transaction; a
    /// `hookline-producer relay` publishes it.
    Outbox,
}

/// What `simulate` did.
#[derive(Debug, Clone, Serialize)]
pub struct SimulateReport {
    pub projects: usize,
    pub hooks: usize,
    pub builds: usize,
    pub sent: usize,
    pub accepted: usize,
    pub failed: usize,
    pub by_status: std::collections::BTreeMap<String, usize>,
    pub elapsed_ms: u64,
}

/// The first token of a token file in the producer's format (one per line, `#` comments).
pub fn first_token(path: &std::path::Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::Usage(format!(
            "reading the API token file {}: {e}",
            path.display()
        ))
    })?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .ok_or_else(|| CliError::Usage(format!("{} holds no API token", path.display())))
}

/// The producer's HTTP API as the simulator's sink.
struct HttpSink {
    client: reqwest::Client,
    url: String,
    api_token: Option<String>,
    retry_for: Duration,
    verbose: bool,
    /// Transitions accepted so far, on a terminal.
    progress: hookline_shell::ProgressBar,
}

/// `Retry-After` in seconds (the producer sends whole seconds); 1 s when absent or unreadable.
fn retry_after(response: &reqwest::Response) -> Duration {
    response
        .headers()
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(1), |s| {
            Duration::from_secs(s.clamp(1, 60))
        })
}

#[async_trait::async_trait]
impl Sink for HttpSink {
    async fn send(&self, t: &TransitionSent) -> Result<Accepted, CliError> {
        let body = json!({
            "build_id": t.build_id,
            "status": t.status,
            "occurred_at": t.occurred_at,
            "event_id": t.event_id,
            "facts": t.facts,
        });
        let give_up_at = tokio::time::Instant::now() + self.retry_for;
        let mut backoff = Duration::from_millis(200);
        loop {
            let mut request = self.client.post(&self.url).json(&body);
            if let Some(token) = &self.api_token {
                request = request.bearer_auth(token);
            }
            let wait = match request.send().await {
                Ok(response) if response.status().is_success() => {
                    let answer: serde_json::Value = response.json().await.unwrap_or_default();
                    let timing =
                        answer
                            .get("timing")
                            .and_then(|v| v.as_str())
                            .and_then(|s| match s {
                                "inline" => Some(hookline_schemas::PayloadTiming::Inline),
                                "deferred" => Some(hookline_schemas::PayloadTiming::Deferred),
                                _ => None,
                            });
                    self.progress.inc(1);
                    if self.verbose {
                        println!(
                            "sent build {} {:<8} event {} -> {}",
                            t.build_id,
                            t.status.as_str(),
                            t.event_id,
                            timing.map_or("accepted", |t| t.as_str())
                        );
                    }
                    return Ok(Accepted {
                        timing,
                        render_time: answer
                            .get("render_time_us")
                            .and_then(|v| v.as_u64())
                            .map(Duration::from_micros),
                        payload_bytes: answer
                            .get("payload_bytes")
                            .and_then(|v| v.as_u64())
                            .map(|b| b as usize),
                    });
                }
                Ok(response) if response.status() == StatusCode::SERVICE_UNAVAILABLE => {
                    let wait = retry_after(&response);
                    tracing::info!(event_id = %t.event_id, wait_ms = wait.as_millis() as u64, "producer unavailable (503), retrying as told");
                    wait
                }
                Ok(response) => {
                    let status = response.status();
                    let text = response.text().await.unwrap_or_default();
                    return Err(CliError::Refused(format!("{status}: {text}")));
                }
                // The producer may still be starting, or restarting: retry with backoff.
                Err(error) => {
                    tracing::warn!(event_id = %t.event_id, %error, "producer unreachable, retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    backoff
                }
            };
            if tokio::time::Instant::now() + wait > give_up_at {
                return Err(CliError::Unavailable(format!(
                    "the producer did not accept event {} within {:?}",
                    t.event_id, self.retry_for
                )));
            }
            tokio::time::sleep(wait).await;
        }
    }
}

/// Connects, writes the world and hooks, and plays the simulation against the producer.
pub async fn run(options: SimulateOptions) -> Result<SimulateReport, CliError> {
    let started = std::time::Instant::now();
    if options.via == Via::Http && options.producer_url.is_empty() {
        return Err(CliError::Usage(
            "--producer-url (HOOKLINE_PRODUCER_URL) is required with --via http".into(),
        ));
    }
    if options.via == Via::Http
        && !options.producer_url.starts_with("http://")
        && !options.producer_url.starts_with("https://")
    {
        return Err(CliError::Usage(format!(
            "--producer-url must be an http(s) URL, got {:?}",
            options.producer_url
        )));
    }
    let mut pg = PgOptions::new(options.database_url.clone());
    if let Some(schema) = &options.database_schema {
        pg = pg.schema(schema.clone());
    }
    let pg_store = PgStore::connect(&pg).await?;
    let store: Arc<dyn CiStore> = Arc::new(pg_store.clone());
    let plan = sim::plan(&SimSpec {
        projects: options.projects,
        builds: options.builds,
        seed: options.seed,
        id_base: options.id_base,
        spread: SimSpec::spread_for(options.builds),
    });
    // Namespaces, projects, users and runners are upserts; a hook is added only once per
    // (project, URL), so running simulate again does not multiply deliveries.
    let receiver = options.receiver_url.trim_end_matches('/').to_owned();
    let hook_for = |p: &hookline_cistate::Project| NewHook {
        project_id: p.id,
        url: format!("{receiver}/projects/{}", p.id),
        token: None,
        signing_secret: options.signing_secret.clone(),
        job_events: true,
        collapse: false,
    };
    let hooks = sim::write_world(store.as_ref(), &plan, &hook_for)
        .await?
        .len();
    eprintln!(
        "simulate: {} projects with a hook each at {receiver}/projects/<id>, {} builds, via {}, rate {}",
        plan.projects.len(),
        plan.build_count(),
        match options.via {
            Via::Http => "the HTTP API",
            Via::Outbox => "the outbox",
        },
        if options.rate > 0.0 {
            format!("{}/s", options.rate)
        } else {
            "unpaced".into()
        }
    );
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| CliError::Internal(format!("HTTP client: {e}")))?;
    let sink = HttpSink {
        client,
        url: format!(
            "{}/v1/transitions",
            options.producer_url.trim_end_matches('/')
        ),
        api_token: options.api_token.clone(),
        retry_for: options.retry_for,
        verbose: options.verbose,
        progress: hookline_shell::progress_counter("transitions accepted"),
    };
    let progress = sink.progress.clone();
    let summary = sim::run(
        &plan,
        Runtime {
            store,
            sink: Arc::new(sink),
            witness: None,
            pace: Pace::per_second(options.rate),
            outbox: (options.via == Via::Outbox).then_some(pg_store),
        },
    )
    .await?;
    progress.finish_and_clear();
    Ok(SimulateReport {
        projects: plan.projects.len(),
        hooks,
        builds: plan.build_count(),
        sent: summary.sent,
        accepted: summary.accepted,
        failed: summary.failed,
        by_status: summary
            .by_status
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect(),
        elapsed_ms: started.elapsed().as_millis() as u64,
    })
}
