//! The real processes the soak runs and disturbs: `hookline-producer serve`, the
//! `hookline-consumer serve` instances, and the private broker and database through
//! `scripts/kafka` and `scripts/pg`.
//!
//! Every child's stdout and stderr go to a log file of its own in the work directory (appended
//! across restarts), so a failed run can be read afterwards. Children are killed when dropped,
//! so a driver that stops early leaves nothing running.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use super::config::SoakConfig;

/// The consumer group both instances share.
pub const GROUP: &str = "hookline-soak";
/// The main topic.
pub const TOPIC: &str = "build-events";

fn log_file(dir: &Path, name: &str) -> anyhow::Result<(std::fs::File, std::fs::File)> {
    let path = dir.join(format!("{name}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    let err = file.try_clone()?;
    Ok((file, err))
}

/// A TCP port on loopback nothing listens on right now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One running `hookline-producer serve`.
#[derive(Debug)]
pub struct Producer {
    child: Child,
    pub base: String,
}

impl Producer {
    pub fn start(config: &SoakConfig) -> anyhow::Result<Producer> {
        let port = free_port()?;
        let (out, err) = log_file(&config.work_dir, "producer")?;
        let child = Command::new(config.bin_dir.join("hookline-producer"))
            .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
            .args(["--brokers", &config.brokers, "--topic", TOPIC])
            .args(["--database-url", &config.database_url])
            .args(["--create-topic-partitions", &config.partitions.to_string()])
            // Loopback only, so the API may go without bearer tokens.
            .arg("--no-auth")
            // The driver retries refused items; a short Retry-After keeps a broker restart from
            // stretching into long pauses of the feed.
            .args(["--retry-after", "1s"])
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .context("starting hookline-producer")?;
        Ok(Producer {
            child,
            base: format!("http://127.0.0.1:{port}"),
        })
    }

    pub async fn stop(&mut self) {
        terminate(&mut self.child, Duration::from_secs(30)).await;
    }
}

/// One `hookline-consumer serve` instance with a stable identity; each restart is a new
/// process (and a new `/metrics` port) with the same identity.
#[derive(Debug)]
pub struct Consumer {
    /// `soak-a`, `soak-b`: the value of `HOOKLINE_INSTANCE_ID`.
    pub identity: String,
    child: Child,
    pub port: u16,
    /// Highest VmHWM (peak RSS) seen over every process of this identity, in kB.
    pub peak_rss_kb: u64,
    /// VmHWM of each process, read just before it was killed or stopped.
    pub rss_samples_kb: Vec<u64>,
}

impl Consumer {
    pub fn start(config: &SoakConfig, identity: &str) -> anyhow::Result<Consumer> {
        let (child, port) = spawn_consumer(config, identity)?;
        Ok(Consumer {
            identity: identity.to_owned(),
            child,
            port,
            peak_rss_kb: 0,
            rss_samples_kb: Vec::new(),
        })
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Records the process's VmHWM (its peak resident set so far).
    pub fn sample_rss(&mut self) {
        if let Some(kb) = self.pid().and_then(vm_hwm_kb) {
            self.peak_rss_kb = self.peak_rss_kb.max(kb);
            self.rss_samples_kb.push(kb);
        }
    }

    /// SIGKILL (no drain, no commit: a crash), then start the same identity again at once.
    /// Returns when the new process is spawned; its readiness is not awaited.
    pub async fn kill_and_restart(&mut self, config: &SoakConfig) -> anyhow::Result<Instant> {
        self.sample_rss();
        self.child.start_kill().context("SIGKILL")?;
        let killed_at = Instant::now();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.child.wait()).await;
        let (child, port) = spawn_consumer(config, &self.identity)?;
        self.child = child;
        self.port = port;
        Ok(killed_at)
    }

    /// When the process has ended on its own, starts the same identity again and returns how it
    /// ended.
    pub fn restart_if_exited(&mut self, config: &SoakConfig) -> anyhow::Result<Option<String>> {
        let Some(status) = self.child.try_wait()? else {
            return Ok(None);
        };
        let (child, port) = spawn_consumer(config, &self.identity)?;
        self.child = child;
        self.port = port;
        Ok(Some(status.to_string()))
    }

    pub async fn stop(&mut self) {
        self.sample_rss();
        terminate(&mut self.child, Duration::from_secs(40)).await;
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.port)
    }
}

fn spawn_consumer(config: &SoakConfig, identity: &str) -> anyhow::Result<(Child, u16)> {
    let port = free_port()?;
    let (out, err) = log_file(&config.work_dir, &format!("consumer-{identity}"))?;
    let child = Command::new(config.bin_dir.join("hookline-consumer"))
        .args(["serve", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--brokers", &config.brokers, "--topic", TOPIC])
        .args(["--group-id", GROUP])
        .args(["--database-url", &config.database_url])
        .args(["--allow-cidr", "127.0.0.0/8"])
        .args(["--retry-schedule", &config.retry_schedule])
        .args(["--max-in-flight", &config.max_in_flight.to_string()])
        .args(["--poll-batch", &config.poll_batch.to_string()])
        // Static group membership: a restarted instance takes its partitions back. Read from
        // the environment, so a binary that does not know it yet simply ignores it.
        .env("HOOKLINE_INSTANCE_ID", identity)
        // Warnings only: at info every deferred render of an event whose build moved on is a
        // line, and the soak makes tens of thousands of them.
        .env("RUST_LOG", "warn")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting hookline-consumer {identity}"))?;
    Ok((child, port))
}

/// SIGTERM, then SIGKILL if the process outlives `grace`.
pub async fn terminate(child: &mut Child, grace: Duration) {
    let Some(pid) = child.id() else { return };
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        let _ = child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
    }
}

/// The last non-empty line of a log file (empty when unreadable).
pub fn last_line(path: &Path) -> String {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|text| {
            text.lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .map(|l| l.chars().take(500).collect())
        })
        .unwrap_or_default()
}

/// VmHWM of a process from /proc, in kB.
pub fn vm_hwm_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The value of `name{label}` in Prometheus text, e.g.
/// `counter(text, "hookline_consumer_deliveries_total", "outcome=\"delivered\"")`.
pub fn counter(text: &str, name: &str, label: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(label))
        })
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Runs `scripts/kafka` or `scripts/pg` with `args`; their ports and run directories come from
/// the environment the soak script exported, the cache directory from `cache`.
pub async fn ctl(script: &Path, cache: &Path, args: &[&str]) -> anyhow::Result<()> {
    let output = tokio::time::timeout(
        Duration::from_secs(180),
        Command::new(script)
            .args(args)
            .env("HOOKLINE_CACHE", cache)
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("{} {args:?} took over 180 s", script.display()))?
    .with_context(|| format!("running {}", script.display()))?;
    if !output.status.success() {
        bail!(
            "{} {args:?} failed: {}{}",
            script.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Waits until `url` answers 200, at most `timeout`.
pub async fn wait_ready(
    client: &reqwest::Client,
    url: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.status().is_success()
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{url} did not answer 200 within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where the binaries are: `<bin_dir>/hookline-producer` and `hookline-consumer`.
pub fn check_binaries(bin_dir: &Path) -> anyhow::Result<()> {
    for name in ["hookline-producer", "hookline-consumer"] {
        let path: PathBuf = bin_dir.join(name);
        if !path.is_file() {
            bail!(
                "{} is missing: build it with `cargo build --release --workspace --bins`",
                path.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_reads_one_labelled_sample() {
        let text = "# HELP hookline_consumer_deliveries_total x\n\
                    hookline_consumer_deliveries_total{outcome=\"retried\"} 3\n\
                    hookline_consumer_deliveries_total{outcome=\"delivered\"} 12\n";
        assert_eq!(
            counter(
                text,
                "hookline_consumer_deliveries_total",
                "outcome=\"delivered\""
            ),
            Some(12.0)
        );
        assert_eq!(
            counter(
                text,
                "hookline_consumer_deliveries_total",
                "outcome=\"final\""
            ),
            None
        );
    }

    #[test]
    fn vm_hwm_of_this_process_is_read() {
        assert!(vm_hwm_kb(std::process::id()).is_some_and(|kb| kb > 0));
    }
}
