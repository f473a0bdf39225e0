//! The producer's cost of inline rendering through the real path: `hookline-producer serve` with
//! the PostgreSQL store, builds that exist there, `POST /v1/transitions` from a client in this
//! process, the flag off (deferred) and then on (inline). CPU time is the producer process's own
//! (user + system, from `/proc/<pid>/stat`), so the client's work is not counted; beside it,
//! PostgreSQL's (its postmaster and every backend, from `/proc`), because inline rendering reads
//! a snapshot per event there: a cost the producer's own figure does not show. The database
//! must run on this machine (the test services do) and serve nothing else meanwhile.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use super::consumer::Fleet;
use super::receiver::BenchReceiver;
use super::{Bench, progress, stop};
use crate::{database_url, free_port};

/// Requests in flight at once: a CI system's workers posting transitions.
const CLIENTS: usize = 16;
const WARM_UP: usize = 300;

/// One side of the comparison.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProducerRun {
    pub cpu_us_per_event: f64,
    /// PostgreSQL's CPU per event over the same window (`None` when its processes could not
    /// be read).
    pub pg_cpu_us_per_event: Option<f64>,
    pub per_s: f64,
    /// Of the 202 answers: `render_time_us` median and `payload_bytes` mean (inline only).
    pub render_us_p50: f64,
    pub payload_bytes_mean: f64,
}

/// Deferred then inline, each in a fresh producer process.
pub async fn cost(
    bench: &Bench,
    receiver: &BenchReceiver,
    events: usize,
) -> anyhow::Result<(ProducerRun, ProducerRun)> {
    // The hook is irrelevant to the producer; the fleet gives builds in the store and a topic.
    let fleet = Fleet::new(4, 2_000, &receiver.url).await;
    let ids: Vec<i64> = fleet.builds.iter().map(|b| b.build.id).collect();
    let deferred = run(bench, &fleet, &ids, false, events).await?;
    let inline = run(bench, &fleet, &ids, true, events).await?;
    Ok((deferred, inline))
}

async fn run(
    bench: &Bench,
    fleet: &Fleet,
    ids: &[i64],
    inline: bool,
    events: usize,
) -> anyhow::Result<ProducerRun> {
    set_flag(bench, &fleet.schema, inline).await?;
    let port = free_port();
    let base = format!("http://127.0.0.1:{port}");
    let mut child = spawn(bench, fleet, port)?;
    let http = reqwest::Client::new();
    wait_ready(&http, &format!("{base}/readyz"), &mut child).await?;
    let url = format!("{base}/v1/transitions");
    post_all(&http, &url, ids, WARM_UP, inline, "warm-up").await?;
    let pid = child.id().context("producer pid")?;
    let postmaster = postmaster_pid(fleet.world.store.pool()).await;
    let pg_before = postmaster.and_then(|p| postgres_cpu_seconds(p).ok());
    let cpu_before = cpu_seconds(pid)?;
    let started = Instant::now();
    let answers = post_all(
        &http,
        &url,
        ids,
        events,
        inline,
        if inline {
            "producer inline"
        } else {
            "producer deferred"
        },
    )
    .await?;
    let wall = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds(pid)? - cpu_before;
    let pg_cpu = match (postmaster, pg_before) {
        (Some(p), Some(before)) => postgres_cpu_seconds(p).ok().map(|after| after - before),
        _ => None,
    };
    stop(child).await;

    let mut render: Vec<f64> = answers
        .iter()
        .filter_map(|a| a.get("render_time_us")?.as_f64())
        .collect();
    render.sort_by(f64::total_cmp);
    let bytes: Vec<f64> = answers
        .iter()
        .filter_map(|a| a.get("payload_bytes")?.as_f64())
        .collect();
    Ok(ProducerRun {
        cpu_us_per_event: cpu * 1e6 / events as f64,
        pg_cpu_us_per_event: pg_cpu.map(|c| c * 1e6 / events as f64),
        per_s: events as f64 / wall,
        render_us_p50: render.get(render.len() / 2).copied().unwrap_or(0.0),
        payload_bytes_mean: if bytes.is_empty() {
            0.0
        } else {
            bytes.iter().sum::<f64>() / bytes.len() as f64
        },
    })
}

pub(super) fn spawn(bench: &Bench, fleet: &Fleet, port: u16) -> anyhow::Result<Child> {
    let log = std::fs::File::create(bench.work_dir.join("producer.log"))?;
    Command::new(bench.bin_dir.join("hookline-producer"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args([
            "--brokers",
            &fleet.world.brokers,
            "--topic",
            &fleet.world.topic,
        ])
        .args(["--database-url", &database_url()])
        .args(["--database-schema", &fleet.schema])
        .arg("--no-auth")
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .context("starting hookline-producer")
}

pub(super) async fn set_flag(bench: &Bench, schema: &str, on: bool) -> anyhow::Result<()> {
    let status = Command::new(bench.bin_dir.join("hookline-producer"))
        .args(["feature", "--database-url", &database_url()])
        .args(["--database-schema", schema])
        .args([
            "set",
            "execute_build_hooks_inline",
            if on { "true" } else { "false" },
        ])
        .output()
        .await?;
    if !status.status.success() {
        bail!(
            "hookline-producer feature set failed: {}: {}",
            status.status,
            String::from_utf8_lossy(&status.stderr)
        );
    }
    Ok(())
}

pub(super) async fn wait_ready(
    http: &reqwest::Client,
    url: &str,
    child: &mut Child,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = http.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!("hookline-producer exited: {status}");
        }
        if Instant::now() > deadline {
            bail!("{url} not ready within a minute");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Posts `count` transitions over the builds with [`CLIENTS`] at a time; every one must be
/// answered 202 with the timing the flag says.
pub(super) async fn post_all(
    http: &reqwest::Client,
    url: &str,
    ids: &[i64],
    count: usize,
    inline: bool,
    label: &str,
) -> anyhow::Result<Vec<Value>> {
    let bar = progress(count as u64, label);
    let statuses = ["running", "success"];
    let answers = futures::stream::iter(0..count)
        .map(|i| {
            let body = json!({
                "build_id": ids[i % ids.len()],
                "status": statuses[(i / ids.len()) % 2],
                "event_id": uuid::Uuid::new_v4(),
            });
            let bar = &bar;
            async move {
                let response = http.post(url).json(&body).send().await?;
                let status = response.status();
                let answer: Value = response.json().await.unwrap_or_default();
                bar.inc(1);
                if status != reqwest::StatusCode::ACCEPTED {
                    bail!("transition answered {status}: {answer}");
                }
                Ok(answer)
            }
        })
        .buffer_unordered(CLIENTS)
        .collect::<Vec<anyhow::Result<Value>>>()
        .await
        .into_iter()
        .collect::<anyhow::Result<Vec<_>>>()?;
    bar.finish_and_clear();
    let want = if inline { "inline" } else { "deferred" };
    if let Some(wrong) = answers.iter().find(|a| a["timing"] != want) {
        bail!("expected {want} events, got {wrong}");
    }
    Ok(answers)
}

/// User + system CPU seconds of a process so far.
pub(super) fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(stat(pid)?.own)
}

/// What `/proc/<pid>/stat` says about a process's CPU, in seconds, and its parent.
struct Stat {
    parent: u32,
    /// User + system of the process itself.
    own: f64,
    /// User + system of its children that exited and were waited for.
    reaped: f64,
}

fn stat(pid: u32) -> anyhow::Result<Stat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> anyhow::Result<f64> {
        Ok(fields.get(i).context("short stat")?.parse::<f64>()?)
    };
    let ticks = clock_ticks();
    Ok(Stat {
        parent: fields.get(1).context("short stat")?.parse()?,
        own: (field(11)? + field(12)?) / ticks,
        reaped: (field(13)? + field(14)?) / ticks,
    })
}

/// The postmaster of the cluster `pool` talks to: the parent of its backend, if that backend
/// runs on this machine.
async fn postmaster_pid(pool: &sqlx::PgPool) -> Option<u32> {
    let backend: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(pool)
        .await
        .ok()?;
    stat(u32::try_from(backend).ok()?).ok().map(|s| s.parent)
}

/// CPU seconds of a PostgreSQL cluster so far: its postmaster, every process it started that
/// still runs (backends, background workers) and those that exited (reaped by the postmaster).
fn postgres_cpu_seconds(postmaster: u32) -> anyhow::Result<f64> {
    let root = stat(postmaster)?;
    let mut total = root.own + root.reaped;
    for entry in std::fs::read_dir("/proc")? {
        let Some(pid) = entry?
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // A process that exits meanwhile is counted by its parent's `reaped` next time.
        if let Ok(child) = stat(pid)
            && child.parent == postmaster
        {
            total += child.own;
        }
    }
    Ok(total)
}

fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}
