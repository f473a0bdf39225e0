//! The soak: at-least-once, counted at scale, with the real binaries.
//!
//! # Layout
//!
//! ```text
//! feed.rs (world in PostgreSQL; POST /v1/transitions/batch, 202 = owed) --> hookline-producer
//!   --> Kafka (private broker) --> hookline-consumer x2 (one group) --> receiver.rs --> ledger.rs
//!                 ^ chaos (this file): SIGKILL + restart, broker restart, PostgreSQL restart,
//!                   receiver outage (503) for a third of the hooks
//! ```
//!
//! - [`config`]: the sizes and settings of a full and a quick soak.
//! - [`ledger`]: owed (event, hook) pairs against what the receiver got: missing, duplicates
//!   (attributed to the disruption in force), unexpected, key mismatches, bodies that are not
//!   the planned transition's, bad signatures, builds seen going back.
//! - [`receiver`]: the HTTP receiver on loopback that verifies, reads and books every request;
//!   the outage switch.
//! - [`feed`]: the world, the plan, and the paced transitions (a build's one after the other).
//! - [`services`]: the producer and consumer processes, `scripts/kafka` / `scripts/pg`, metrics
//!   and peak RSS.
//!
//! [`run`] plays one soak and returns a [`Report`]; `scripts/soak` starts the private broker and
//! database, runs the `soak` binary (which calls [`run`]) and prints the report's JSON line.
//!
//! Time to resume after a kill is measured from the SIGKILL to the first moment the restarted
//! instance's `/metrics` shows a delivery (`hookline_consumer_deliveries_total{outcome="delivered"}`
//! above 0), polled every 100 ms. Kills happen while transitions are still being posted, so the
//! restarted instance always has work once it owns partitions again.

pub mod config;
pub mod feed;
pub mod ledger;
pub mod receiver;
pub mod services;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::task::JoinHandle;

pub use config::{Environment, Mode, SoakConfig};
use ledger::{Counts, Ledger};
use receiver::{Books, SoakReceiver};
use services::{Consumer, Producer, ctl};

/// One thing the chaos does to the run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disruption {
    /// SIGKILL the consumer instance with this index, restart it at once.
    Kill(usize),
    BrokerRestart,
    PgRestart,
    /// The receiver answers 503 for the outage's hooks for `config.outage`.
    Outage,
}

impl Disruption {
    fn label(&self, config: &SoakConfig) -> String {
        match self {
            Disruption::Kill(i) => format!("kill {}", config.consumers[*i]),
            Disruption::BrokerRestart => "broker restart".into(),
            Disruption::PgRestart => "postgres restart".into(),
            Disruption::Outage => "receiver outage".into(),
        }
    }
}

/// When each disruption happens, offsets from the feed's start, in order. Kills land between
/// 10 % and 75 % of the feed (so the restarted instance has work, even when a kill has to wait
/// for the previous one to resume), the restarts in the middle of it, and the outage ends before
/// the feed does.
pub fn chaos_plan(config: &SoakConfig) -> Vec<(Duration, Disruption)> {
    let mut rng = StdRng::seed_from_u64(config.seed);
    let feed = config.post_for.as_secs_f64();
    let at = |rng: &mut StdRng, from: f64, to: f64| {
        Duration::from_secs_f64(feed * rng.random_range(from..to))
    };
    let mut plan = Vec::new();
    for _ in 0..config.kills {
        let who = rng.random_range(0..config.consumers.len());
        plan.push((at(&mut rng, 0.1, 0.75), Disruption::Kill(who)));
    }
    for _ in 0..config.broker_restarts {
        plan.push((at(&mut rng, 0.2, 0.8), Disruption::BrokerRestart));
    }
    for _ in 0..config.pg_restarts {
        plan.push((at(&mut rng, 0.2, 0.8), Disruption::PgRestart));
    }
    let latest_outage = (1.0 - config.outage.as_secs_f64() / feed).clamp(0.25, 0.7);
    plan.push((at(&mut rng, 0.2, latest_outage), Disruption::Outage));
    plan.sort_by_key(|(at, _)| *at);
    plan
}

/// After a restarted instance got its partitions back, how long its re-fetched records (and the
/// other instance's, after a rebalance) may take to be delivered again.
pub const REDELIVERY_SETTLE: Duration = Duration::from_secs(20);

/// One kill and what followed.
#[derive(Debug, Clone, Serialize)]
pub struct KillReport {
    pub instance: String,
    /// Seconds from the feed's start.
    pub at_s: f64,
    /// SIGKILL → first delivery of the restarted instance; `None` if it did not deliver within
    /// the cap.
    pub resume_ms: Option<u64>,
    /// SIGKILL → the restarted instance's first partition assignment on the main topic
    /// (`hookline_consumer_assignments_total{path="main"}` above 0).
    pub assigned_ms: Option<u64>,
    /// Deliveries repeated from the kill until [`REDELIVERY_SETTLE`] after the restarted
    /// instance got its partitions back (the cap when it never did): what the kill and the
    /// rebalance it caused made the group repeat. Windows of kills close together overlap.
    pub redelivered: u64,
    /// The same, by the Kafka partition of their event (-1: unknown).
    pub redelivered_by_partition: BTreeMap<i32, u64>,
    /// Peak RSS of the killed process, kB.
    pub rss_kb: Option<u64>,
}

/// The soak's result: [`Report::ok`] and the JSON line.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub soak: Mode,
    pub ok: bool,
    /// Why the run failed; empty when ok.
    pub failures: Vec<String>,
    pub seed: u64,
    pub wall_s: f64,
    pub feed_s: f64,
    /// From the end of the feed and the disruptions to the last owed delivery (or the timeout).
    pub drain_s: f64,
    pub transitions_posted: u64,
    pub transitions_accepted: u64,
    pub transitions_refused: u64,
    pub transitions_reposted: u64,
    pub pairs_owed: u64,
    pub delivered: u64,
    pub missing: u64,
    /// Up to 20 missing pairs, `event/hook-slot`.
    pub missing_sample: Vec<String>,
    pub duplicates: u64,
    /// The largest number of deliveries repeated after one kill.
    pub redelivered_after_kill_max: u64,
    /// `--max-in-flight` × hooks per event: what one instance may re-deliver from one path.
    pub in_flight_bound: u64,
    /// Duplicates by the disruption in force when they arrived.
    pub duplicates_by_disruption: Vec<(String, u64)>,
    /// Duplicates delivered to the hooks the outage refused (a third of them): re-deliveries
    /// that came from the retry path rather than from a kill.
    pub duplicates_to_outage_hooks: u64,
    pub refused_by_receiver: u64,
    pub unexpected: u64,
    pub key_mismatches: u64,
    pub unreadable: u64,
    /// Requests whose body is not the planned transition's (build or status) for their event id.
    pub wrong_bodies: u64,
    /// Requests whose signature did not verify with their hook's secret.
    pub bad_signatures: u64,
    /// First deliveries of a build's transition after a later one of the same build reached
    /// the same hook (a failure under strict ordering).
    pub regressions: u64,
    /// Planned transitions never accepted by the producer.
    pub unaccepted: u64,
    /// The duplicate bound fixed before the run (`settings.max_duplicates`).
    pub max_duplicates: u64,
    /// Dead letters by reason (`None` when listing failed; see failures).
    pub dead_letters: Option<BTreeMap<String, u64>>,
    pub resume_ms_p50: Option<u64>,
    pub resume_ms_max: Option<u64>,
    pub kills: Vec<KillReport>,
    /// Highest VmHWM per instance identity, kB (every process of it, sampled before each kill
    /// and at the end).
    pub peak_rss_kb: BTreeMap<String, u64>,
    /// Consumer processes that ended on their own (each was started again, as a supervisor
    /// would).
    pub consumer_exits: Vec<Exit>,
    /// librdkafka's fatal errors in the consumers' logs (`instance: line`, at most 10). A
    /// client in that state consumes nothing more; a process that keeps running after one
    /// leaves its partitions to the group's session timeout.
    pub kafka_fatal_errors: Vec<String>,
    pub disruptions: Vec<(f64, String)>,
    pub settings: SoakConfig,
}

fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// A kill whose resume is being watched.
struct Watch {
    instance: usize,
    at_s: f64,
    killed_at: Instant,
    rss_kb: Option<u64>,
    resumed: JoinHandle<Resumed>,
}

/// How long a restarted instance took to get its partitions and to deliver.
#[derive(Debug, Clone, Copy, Default)]
struct Resumed {
    assigned: Option<Duration>,
    delivered: Option<Duration>,
}

/// A consumer process that ended without being told to.
#[derive(Debug, Clone, Serialize)]
pub struct Exit {
    pub instance: String,
    /// Seconds from the feed's start.
    pub at_s: f64,
    pub status: String,
    /// The last line the process logged.
    pub last_log_line: String,
}

/// The consumer instances, the kills' resume watches, and the supervisor's record.
struct Fleet {
    consumers: Vec<Consumer>,
    watches: Vec<Watch>,
    exits: Vec<Exit>,
}

impl Fleet {
    /// Starts a process again when one ended on its own, as the supervisor of a deployment would
    /// (systemd's `Restart=`, a pod's restart policy); each such exit is reported. A resume watch
    /// on that instance moves to the new process and keeps measuring from its kill.
    fn supervise(&mut self, config: &SoakConfig, feed_started: Instant) -> anyhow::Result<()> {
        for (i, consumer) in self.consumers.iter_mut().enumerate() {
            let Some(status) = consumer.restart_if_exited(config)? else {
                continue;
            };
            let log = config
                .work_dir
                .join(format!("consumer-{}.log", consumer.identity));
            let exit = Exit {
                instance: consumer.identity.clone(),
                at_s: round1(feed_started.elapsed().as_secs_f64()),
                status,
                last_log_line: services::last_line(&log),
            };
            eprintln!(
                "soak: {} exited on its own ({}): {}; started again",
                exit.instance, exit.status, exit.last_log_line
            );
            self.exits.push(exit);
            for w in self
                .watches
                .iter_mut()
                .filter(|w| w.instance == i && !w.resumed.is_finished())
            {
                w.resumed.abort();
                w.resumed = watch_resume(consumer.metrics_url(), w.killed_at, config.resume_cap);
            }
        }
        Ok(())
    }

    /// Supervises until `until`.
    async fn wait_until(
        &mut self,
        until: Instant,
        config: &SoakConfig,
        feed_started: Instant,
    ) -> anyhow::Result<()> {
        loop {
            self.supervise(config, feed_started)?;
            let now = Instant::now();
            if now >= until {
                return Ok(());
            }
            tokio::time::sleep((until - now).min(Duration::from_millis(250))).await;
        }
    }

    fn pending(&self, instance: usize) -> bool {
        self.watches
            .iter()
            .any(|w| w.instance == instance && !w.resumed.is_finished())
    }

    /// Which instance to kill: one that has resumed since its last kill, so every kill gets a
    /// time to resume of its own. The planned one, else another, else whichever resumes first
    /// (waiting at most the resume cap, then the planned one).
    async fn kill_target(
        &mut self,
        planned: usize,
        config: &SoakConfig,
        feed_started: Instant,
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + config.resume_cap;
        loop {
            let free = std::iter::once(planned)
                .chain(0..self.consumers.len())
                .find(|&i| !self.pending(i));
            match free {
                Some(i) => return Ok(i),
                None if Instant::now() > deadline => return Ok(planned),
                None => {
                    let tick = Instant::now() + Duration::from_millis(100);
                    self.wait_until(tick, config, feed_started).await?;
                }
            }
        }
    }

    /// SIGKILL instance `i`, start it again at once, and watch it resume.
    async fn kill(&mut self, i: usize, at_s: f64, config: &SoakConfig) -> anyhow::Result<()> {
        let consumer = &mut self.consumers[i];
        let killed_at = consumer.kill_and_restart(config).await?;
        self.watches.push(Watch {
            instance: i,
            at_s,
            killed_at,
            rss_kb: consumer.rss_samples_kb.last().copied(),
            resumed: watch_resume(consumer.metrics_url(), killed_at, config.resume_cap),
        });
        Ok(())
    }
}

/// Polls the restarted instance's `/metrics` every 100 ms until it shows a delivery, at most
/// `cap`; notes when it first shows a partition assignment on the main topic.
fn watch_resume(url: String, killed_at: Instant, cap: Duration) -> JoinHandle<Resumed> {
    tokio::spawn(async move {
        let mut resumed = Resumed::default();
        let Ok(client) = reqwest::Client::builder()
            .timeout(Duration::from_secs(1))
            .build()
        else {
            return resumed;
        };
        while killed_at.elapsed() < cap {
            if let Ok(r) = client.get(&url).send().await
                && let Ok(text) = r.text().await
            {
                let above_zero = |name: &str, label: &str| {
                    services::counter(&text, name, label).is_some_and(|n| n > 0.0)
                };
                if resumed.assigned.is_none()
                    && above_zero("hookline_consumer_assignments_total", "path=\"main\"")
                {
                    resumed.assigned = Some(killed_at.elapsed());
                }
                if above_zero(
                    "hookline_consumer_deliveries_total",
                    "outcome=\"delivered\"",
                ) {
                    resumed.delivered = Some(killed_at.elapsed());
                    resumed.assigned.get_or_insert(killed_at.elapsed());
                    return resumed;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        resumed
    })
}

fn progress(started: Instant, message: impl std::fmt::Display) {
    eprintln!("soak [{:>6.1}s] {message}", started.elapsed().as_secs_f64());
}

/// Plays one soak against the broker and database in `config` (both already running).
pub async fn run(config: SoakConfig) -> anyhow::Result<Report> {
    let started = Instant::now();
    services::check_binaries(&config.bin_dir)?;
    std::fs::create_dir_all(&config.work_dir)?;
    let slots_of = feed::plan_slots(config.projects, config.hooks_per_project);
    let books = Arc::new(Books::new(Ledger::new(slots_of), config.outage_slots()));
    let receiver = SoakReceiver::start(books.clone()).await?;
    let world = feed::write_world(&config, &receiver).await?;
    let items = feed::plan(&config, &world);
    books
        .ledger()
        .plan(items.iter().map(|i| (i.event, i.planned())));
    progress(
        started,
        format_args!(
            "world: {} projects, {} builds, {} hooks at {}",
            config.projects,
            world.builds.len(),
            config.projects * config.hooks_per_project,
            receiver.base
        ),
    );
    // Half the projects get their payload rendered inline, half deferred (rendered by the
    // consumer from PostgreSQL), so the database restart reaches both services.
    set_inline_percent(&config, 50).await?;

    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()?;
    let mut producer = Producer::start(&config)?;
    services::wait_ready(
        &client,
        &format!("{}/readyz", producer.base),
        Duration::from_secs(60),
    )
    .await?;
    // The producer creates the topic; consumers start after it exists.
    let mut fleet = Fleet {
        consumers: Vec::new(),
        watches: Vec::new(),
        exits: Vec::new(),
    };
    for identity in &config.consumers {
        fleet.consumers.push(Consumer::start(&config, identity)?);
    }
    for c in &fleet.consumers {
        services::wait_ready(
            &client,
            &format!("http://127.0.0.1:{}/readyz", c.port),
            Duration::from_secs(60),
        )
        .await?;
    }
    progress(started, "producer and consumers ready; feeding");

    let feed_started = Instant::now();
    let feed_task = {
        let (config, base, books) = (config.clone(), producer.base.clone(), books.clone());
        tokio::spawn(async move { feed::post_all(&config, items, &base, books).await })
    };

    // The chaos: one disruption after the other, each at its planned time (or as soon as the
    // previous one is done).
    let plan = chaos_plan(&config);
    let mut labels = vec!["before any disruption".to_owned()];
    let mut disruptions = Vec::new();
    let mut failures = Vec::new();
    let mut outage_end: Option<JoinHandle<()>> = None;
    for (at, planned) in &plan {
        fleet
            .wait_until(feed_started + *at, &config, feed_started)
            .await?;
        // The outage must meet consumers that deliver, or it tests nothing: it waits until
        // every killed instance has resumed, and kills wait until it is over.
        let disruption = match planned {
            Disruption::Kill(i) => {
                while books.outage.load(Ordering::Relaxed) {
                    let tick = Instant::now() + Duration::from_millis(250);
                    fleet.wait_until(tick, &config, feed_started).await?;
                }
                Disruption::Kill(fleet.kill_target(*i, &config, feed_started).await?)
            }
            Disruption::Outage => {
                let deadline = Instant::now() + config.resume_cap;
                while (0..fleet.consumers.len()).any(|i| fleet.pending(i))
                    && Instant::now() < deadline
                {
                    let tick = Instant::now() + Duration::from_millis(250);
                    fleet.wait_until(tick, &config, feed_started).await?;
                }
                Disruption::Outage
            }
            other => other.clone(),
        };
        let at_s = feed_started.elapsed().as_secs_f64();
        let label = disruption.label(&config);
        labels.push(label.clone());
        let epoch = labels.len() - 1;
        books.epoch.store(epoch, Ordering::Relaxed);
        progress(
            started,
            format_args!("{label} (missing so far {})", books.ledger().missing()),
        );
        disruptions.push((at_s, label.clone()));
        match disruption {
            Disruption::Kill(i) => fleet.kill(i, at_s, &config).await?,
            Disruption::BrokerRestart => {
                let result = async {
                    ctl(
                        &config.kafka_ctl,
                        &config.kafka_cache,
                        &["stop", "--keep-data"],
                    )
                    .await?;
                    ctl(
                        &config.kafka_ctl,
                        &config.kafka_cache,
                        &["start", "--keep-data"],
                    )
                    .await
                }
                .await;
                if let Err(e) = result {
                    failures.push(format!("broker restart: {e:#}"));
                }
            }
            Disruption::PgRestart => {
                let result = async {
                    ctl(&config.pg_ctl, &config.pg_cache, &["stop"]).await?;
                    ctl(&config.pg_ctl, &config.pg_cache, &["start"]).await
                }
                .await;
                if let Err(e) = result {
                    failures.push(format!("postgres restart: {e:#}"));
                }
            }
            Disruption::Outage => {
                books.outage.store(true, Ordering::Relaxed);
                let (books, outage) = (books.clone(), config.outage);
                outage_end = Some(tokio::spawn(async move {
                    tokio::time::sleep(outage).await;
                    books.outage.store(false, Ordering::Relaxed);
                    progress(started, "receiver outage over");
                }));
            }
        }
        progress(started, format_args!("{label} done"));
    }
    while !feed_task.is_finished() || outage_end.as_ref().is_some_and(|e| !e.is_finished()) {
        let tick = Instant::now() + Duration::from_millis(250);
        fleet.wait_until(tick, &config, feed_started).await?;
    }
    let totals = match feed_task.await {
        Ok(totals) => totals,
        Err(error) => {
            failures.push(format!("the feed failed: {error}"));
            feed::FeedTotals::default()
        }
    };
    if totals.panicked > 0 {
        failures.push(format!(
            "{} feed batches failed before they were answered",
            totals.panicked
        ));
    }
    progress(
        started,
        format_args!(
            "feed done: {} posted, {} accepted, {} refused in {:.1}s",
            totals.posted, totals.accepted, totals.refused, totals.seconds
        ),
    );

    // Drain: every owed pair delivered, or the timeout.
    let drain_started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let missing = books.ledger().missing();
        if missing == 0 {
            break;
        }
        if drain_started.elapsed() > config.drain_timeout {
            failures.push(format!(
                "{missing} pairs still missing {:?} after the feed and the disruptions ended",
                config.drain_timeout
            ));
            break;
        }
        if last_report.elapsed() > Duration::from_secs(10) {
            progress(started, format_args!("draining: {missing} pairs missing"));
            last_report = Instant::now();
        }
        let tick = Instant::now() + Duration::from_millis(500);
        fleet.wait_until(tick, &config, feed_started).await?;
    }
    let drain_s = drain_started.elapsed().as_secs_f64();
    // Late repeats (a retry already on its way) still count as duplicates.
    let settle = Instant::now() + Duration::from_secs(3);
    fleet.wait_until(settle, &config, feed_started).await?;
    progress(started, format_args!("drained in {drain_s:.1}s; stopping"));

    let mut kills = Vec::new();
    for mut w in std::mem::take(&mut fleet.watches) {
        let resumed = (&mut w.resumed).await.unwrap_or_default();
        kills.push((w, resumed));
    }
    for c in &mut fleet.consumers {
        c.stop().await;
    }
    producer.stop().await;
    let dead_letters = match dead_letter_reasons(&config).await {
        Ok(reasons) => Some(reasons),
        Err(e) => {
            failures.push(format!("dlq list: {e:#}"));
            None
        }
    };

    let ledger = books.ledger();
    let counts: Counts = ledger.counts();
    let by_epoch = ledger.duplicates_by_epoch(labels.len());
    let missing_sample = ledger.missing_pairs(20);
    let outage_slots = config.outage_slots();
    let duplicates_to_outage_hooks =
        ledger.duplicates_to(|slot| outage_slots.get(slot as usize).copied().unwrap_or(false));
    let kills: Vec<KillReport> = kills
        .into_iter()
        .map(|(w, resumed)| {
            let window_end =
                w.killed_at + resumed.assigned.unwrap_or(config.resume_cap) + REDELIVERY_SETTLE;
            let by_partition = ledger.duplicates_between(w.killed_at, window_end);
            KillReport {
                instance: config.consumers[w.instance].clone(),
                at_s: round1(w.at_s),
                resume_ms: resumed.delivered.map(|d| d.as_millis() as u64),
                assigned_ms: resumed.assigned.map(|d| d.as_millis() as u64),
                redelivered: by_partition.values().sum(),
                redelivered_by_partition: by_partition,
                rss_kb: w.rss_kb,
            }
        })
        .collect();
    drop(ledger);
    let mut resumes: Vec<u64> = kills.iter().filter_map(|k| k.resume_ms).collect();
    resumes.sort_unstable();
    let unresumed = kills.iter().filter(|k| k.resume_ms.is_none()).count();
    if unresumed > 0 {
        failures.push(format!(
            "{unresumed} restarted instance(s) delivered nothing within {:?} of the kill",
            config.resume_cap
        ));
    }
    if counts.missing > 0 {
        failures.push(format!("{} owed pairs missing", counts.missing));
    }
    if totals.refused > 0 {
        failures.push(format!(
            "{} transitions refused by the producer",
            totals.refused
        ));
    }
    if !config.outage.is_zero() && counts.refused_by_receiver == 0 {
        failures.push("the receiver outage refused no request: it tested nothing".into());
    }
    if counts.key_mismatches > 0 {
        failures.push(format!(
            "{} deliveries changed their Idempotency-Key",
            counts.key_mismatches
        ));
    }
    if counts.unaccepted > 0 {
        failures.push(format!(
            "{} planned transitions were never accepted",
            counts.unaccepted
        ));
    }
    for (n, what) in [
        (counts.unexpected, "deliveries nobody owed"),
        (
            counts.unreadable,
            "requests without an event id or a readable Job Hook",
        ),
        (
            counts.wrong_bodies,
            "requests whose body is not the planned transition of their event id",
        ),
        (
            counts.bad_signatures,
            "requests whose signature does not verify",
        ),
    ] {
        if n > 0 {
            failures.push(format!("{n} {what}"));
        }
    }
    if config.strict() && counts.regressions > 0 {
        failures.push(format!(
            "{} first deliveries took a build back under strict ordering",
            counts.regressions
        ));
    }
    if counts.duplicates > config.max_duplicates {
        failures.push(format!(
            "{} duplicates, over the bound of {} fixed before the run",
            counts.duplicates, config.max_duplicates
        ));
    }
    // Every receiver comes back after the outage, so nothing has a reason to be dead-lettered.
    if let Some(letters) = &dead_letters {
        let total: u64 = letters.values().sum();
        if total > 0 {
            failures.push(format!("{total} dead letters: {letters:?}"));
        }
    }
    let peak_rss_kb = fleet
        .consumers
        .iter()
        .map(|c| (c.identity.clone(), c.peak_rss_kb))
        .collect();
    Ok(Report {
        soak: config.mode,
        ok: failures.is_empty(),
        failures,
        seed: config.seed,
        wall_s: round1(started.elapsed().as_secs_f64()),
        feed_s: round1(totals.seconds),
        drain_s: round1(drain_s),
        transitions_posted: totals.posted,
        transitions_accepted: totals.accepted,
        transitions_refused: totals.refused,
        transitions_reposted: totals.reposted,
        pairs_owed: counts.owed,
        delivered: counts.delivered,
        missing: counts.missing,
        missing_sample,
        duplicates: counts.duplicates,
        redelivered_after_kill_max: kills.iter().map(|k| k.redelivered).max().unwrap_or(0),
        in_flight_bound: (config.max_in_flight * config.hooks_per_project) as u64,
        duplicates_to_outage_hooks,
        duplicates_by_disruption: labels.into_iter().zip(by_epoch).collect(),
        refused_by_receiver: counts.refused_by_receiver,
        unexpected: counts.unexpected,
        key_mismatches: counts.key_mismatches,
        unreadable: counts.unreadable,
        wrong_bodies: counts.wrong_bodies,
        bad_signatures: counts.bad_signatures,
        regressions: counts.regressions,
        unaccepted: counts.unaccepted,
        max_duplicates: config.max_duplicates,
        dead_letters,
        resume_ms_p50: percentile(&resumes, 0.5),
        resume_ms_max: resumes.last().copied(),
        kills,
        peak_rss_kb,
        consumer_exits: fleet.exits,
        kafka_fatal_errors: fatal_errors(&config),
        disruptions: disruptions
            .into_iter()
            .map(|(at, l)| (round1(at), l))
            .collect(),
        settings: config,
    })
}

/// Lines of the consumers' logs where librdkafka reported a fatal error.
fn fatal_errors(config: &SoakConfig) -> Vec<String> {
    let mut out = Vec::new();
    for identity in &config.consumers {
        let log = config.work_dir.join(format!("consumer-{identity}.log"));
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("FATAL")) {
            if out.len() < 10 {
                out.push(format!(
                    "{identity}: {}",
                    line.chars().take(300).collect::<String>()
                ));
            }
        }
    }
    out
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// `hookline-producer feature set execute_build_hooks_inline <pct> --actors`.
async fn set_inline_percent(config: &SoakConfig, percent: u32) -> anyhow::Result<()> {
    let output = tokio::process::Command::new(config.bin_dir.join("hookline-producer"))
        .args(["feature", "--database-url", &config.database_url])
        .args([
            "set",
            "execute_build_hooks_inline",
            &percent.to_string(),
            "--actors",
        ])
        .env("HOOKLINE_ACTOR", "soak")
        .output()
        .await?;
    anyhow::ensure!(
        output.status.success(),
        "feature set failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(())
}

/// Dead letters by reason, read with `hookline-consumer dlq list` (the operator's tool).
/// Listing is tried a few times: right after the topic first appears it can fail briefly.
async fn dead_letter_reasons(config: &SoakConfig) -> anyhow::Result<BTreeMap<String, u64>> {
    let mut last_error = String::new();
    for try_number in 0..5 {
        if try_number > 0 {
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            tokio::process::Command::new(config.bin_dir.join("hookline-consumer"))
                .args(["dlq", "list", "--brokers", &config.brokers])
                .args(["--topic", services::TOPIC, "--group-id", services::GROUP])
                .env("RUST_LOG", "warn")
                .kill_on_drop(true)
                .output(),
        )
        .await;
        match output {
            Ok(Ok(out)) if out.status.success() => {
                return Ok(parse_dead_letters(&String::from_utf8_lossy(&out.stdout)));
            }
            Ok(Ok(out)) => {
                last_error = format!(
                    "exit {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                eprintln!("soak: dlq list failed (try {try_number}): {last_error}");
            }
            Ok(Err(e)) => last_error = e.to_string(),
            Err(_) => last_error = "timed out after 120 s".into(),
        }
    }
    anyhow::bail!("{last_error}")
}

/// Counts `dlq list` lines by their reason (the third tab-separated field).
pub fn parse_dead_letters(listing: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for line in listing.lines().filter(|l| !l.trim().is_empty()) {
        let reason = line.split('\t').nth(2).unwrap_or("unreadable_line");
        *out.entry(reason.to_owned()).or_default() += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn config(mode: Mode) -> SoakConfig {
        SoakConfig::for_mode(
            mode,
            7,
            Environment {
                brokers: String::new(),
                database_url: String::new(),
                bin_dir: PathBuf::new(),
                work_dir: PathBuf::new(),
                kafka_ctl: PathBuf::new(),
                kafka_cache: PathBuf::new(),
                pg_ctl: PathBuf::new(),
                pg_cache: PathBuf::new(),
            },
        )
    }

    #[test]
    fn the_chaos_plan_has_every_disruption_inside_the_feed_in_order() {
        for mode in [Mode::Full, Mode::Quick] {
            let c = config(mode);
            let plan = chaos_plan(&c);
            let kills = plan
                .iter()
                .filter(|(_, d)| matches!(d, Disruption::Kill(_)))
                .count();
            assert_eq!(kills, c.kills);
            assert_eq!(plan.len(), c.kills + 3);
            assert!(plan.windows(2).all(|w| w[0].0 <= w[1].0));
            for (at, d) in &plan {
                assert!(*at < c.post_for, "{d:?} at {at:?}");
                if *d == Disruption::Outage {
                    assert!(
                        *at + c.outage < c.post_for,
                        "the outage ends within the feed"
                    );
                }
            }
            assert_eq!(plan, chaos_plan(&c), "same seed, same plan");
        }
    }

    #[test]
    fn sizes_match_the_issue() {
        let full = config(Mode::Full);
        assert_eq!(
            (full.transitions, full.builds, full.projects, full.kills),
            (100_000, 2_000, 20, 10)
        );
        assert_eq!(full.outage, Duration::from_secs(30));
        let quick = config(Mode::Quick);
        assert_eq!((quick.transitions, quick.kills), (10_000, 3));
        let outage = full.outage_slots();
        assert_eq!(outage.iter().filter(|o| **o).count(), outage.len() / 3);
    }

    #[test]
    fn dead_letters_are_counted_by_reason() {
        let listing = "0:0\t2026-11-27T20:54:17+00:00\thook_disabled\tdelivery hook=6\tthe hook is disabled\n\
                       1:4\t2026-11-27T20:54:18+00:00\thook_disabled\tdelivery hook=7\tx\n\
                       2:0\t2026-11-27T20:54:19+00:00\tretries_exhausted\tdelivery hook=6\t503\n";
        let reasons = parse_dead_letters(listing);
        assert_eq!(reasons.get("hook_disabled"), Some(&2));
        assert_eq!(reasons.get("retries_exhausted"), Some(&1));
        assert!(parse_dead_letters("").is_empty());
    }

    #[test]
    fn percentiles_pick_a_member() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[5], 0.5), Some(5));
        assert_eq!(percentile(&[1, 2, 3, 4], 0.5), Some(2));
        assert_eq!(percentile(&[1, 2, 3, 4, 5], 0.5), Some(3));
    }
}
