//! The soak's sizes and settings: a full run and a quick one, and where the services are.

use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

/// Which soak to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// 100,000 transitions, 10 kills, a 30 s outage.
    Full,
    /// About 10,000 transitions, 3 kills, a 10 s outage: a few minutes.
    Quick,
}

/// Everything a soak needs; [`SoakConfig::for_mode`] fills the sizes.
#[derive(Debug, Clone, Serialize)]
pub struct SoakConfig {
    pub mode: Mode,
    pub seed: u64,
    pub transitions: usize,
    pub builds: usize,
    pub projects: usize,
    pub hooks_per_project: usize,
    pub partitions: u32,
    /// Transitions per batch post.
    pub batch_size: usize,
    /// The feed spreads its batches over this long.
    #[serde(serialize_with = "secs")]
    pub post_for: Duration,
    /// How long the feed retries one item before giving up on it.
    #[serde(serialize_with = "secs")]
    pub give_up: Duration,
    pub kills: usize,
    pub broker_restarts: usize,
    pub pg_restarts: usize,
    #[serde(serialize_with = "secs")]
    pub outage: Duration,
    /// After the feed and the disruptions, how long deliveries may take to complete.
    #[serde(serialize_with = "secs")]
    pub drain_timeout: Duration,
    /// After a kill, how long to wait for the restarted instance's first delivery.
    #[serde(serialize_with = "secs")]
    pub resume_cap: Duration,
    pub max_in_flight: usize,
    pub poll_batch: usize,
    pub retry_schedule: String,
    /// The consumers' `--ordering` (from `HOOKLINE_ORDERING`, which they inherit; strict when
    /// unset): under strict a build seen going back by any hook fails the run.
    pub ordering: String,
    /// The most duplicates the run may deliver, fixed before it starts: every disruption (kill,
    /// broker or PostgreSQL restart) making every instance repeat its whole in-flight window on
    /// both paths, `(kills + restarts) x consumers x 2 x --max-in-flight x hooks per project`.
    /// The README's bound, summed; the report shows how far below it a run stays.
    pub max_duplicates: u64,
    pub consumers: Vec<String>,
    #[serde(skip)]
    pub brokers: String,
    #[serde(skip)]
    pub database_url: String,
    #[serde(skip)]
    pub bin_dir: PathBuf,
    #[serde(skip)]
    pub work_dir: PathBuf,
    #[serde(skip)]
    pub kafka_ctl: PathBuf,
    #[serde(skip)]
    pub kafka_cache: PathBuf,
    #[serde(skip)]
    pub pg_ctl: PathBuf,
    #[serde(skip)]
    pub pg_cache: PathBuf,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// Where the services and binaries are.
#[derive(Debug, Clone)]
pub struct Environment {
    pub brokers: String,
    pub database_url: String,
    pub bin_dir: PathBuf,
    pub work_dir: PathBuf,
    pub kafka_ctl: PathBuf,
    pub kafka_cache: PathBuf,
    pub pg_ctl: PathBuf,
    pub pg_cache: PathBuf,
}

impl SoakConfig {
    pub fn for_mode(mode: Mode, seed: u64, env: Environment) -> SoakConfig {
        let (transitions, builds, post_for, kills, outage, drain) = match mode {
            Mode::Full => (100_000, 2_000, 480, 10, 30, 600),
            Mode::Quick => (10_000, 500, 75, 3, 10, 240),
        };
        let mut config = SoakConfig {
            mode,
            seed,
            transitions,
            builds,
            projects: 20,
            hooks_per_project: 2,
            partitions: 4,
            batch_size: 0,
            post_for: Duration::from_secs(post_for),
            give_up: Duration::from_secs(180),
            kills,
            broker_restarts: 1,
            pg_restarts: 1,
            outage: Duration::from_secs(outage),
            drain_timeout: Duration::from_secs(drain),
            resume_cap: Duration::from_secs(120),
            max_in_flight: 128,
            poll_batch: 64,
            // Short enough that deliveries refused during the outage come back within the run
            // (about 2.5 minutes of retries in all), long enough to span the outage.
            retry_schedule: "1s,2s,5s,10s,20s,30s,30s,30s".into(),
            ordering: std::env::var("HOOKLINE_ORDERING")
                .ok()
                .filter(|o| !o.is_empty())
                .unwrap_or_else(|| "strict".into()),
            max_duplicates: 0,
            consumers: vec!["soak-a".into(), "soak-b".into()],
            brokers: env.brokers,
            database_url: env.database_url,
            bin_dir: env.bin_dir,
            work_dir: env.work_dir,
            kafka_ctl: env.kafka_ctl,
            kafka_cache: env.kafka_cache,
            pg_ctl: env.pg_ctl,
            pg_cache: env.pg_cache,
        };
        config.fit_batch();
        config
    }

    /// Ten batches a second at the configured pace, never more items than builds (the items of
    /// one batch are then different builds, and a build's transitions go one after the other);
    /// and the duplicate bound for these sizes. Call again after changing the sizes.
    pub fn fit_batch(&mut self) {
        let per_second = self.transitions as f64 / self.post_for.as_secs_f64().max(1.0);
        self.batch_size =
            ((per_second / 10.0).ceil() as usize).clamp(1, 1000.min(self.builds.max(1)));
        let disruptions = (self.kills + self.broker_restarts + self.pg_restarts) as u64;
        self.max_duplicates = disruptions
            * self.consumers.len() as u64
            * 2
            * self.max_in_flight as u64
            * self.hooks_per_project as u64;
    }

    /// Whether a build seen going back fails the run.
    pub fn strict(&self) -> bool {
        self.ordering == "strict"
    }

    /// Hooks the outage refuses: every third slot (slot % 3 == 2), a third of all hooks.
    pub fn outage_slots(&self) -> Vec<bool> {
        (0..self.projects * self.hooks_per_project)
            .map(|s| s % 3 == 2)
            .collect()
    }
}
