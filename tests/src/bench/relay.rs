//! The outbox relay's figures (`relay.*`): `hookline-producer relay` as a release process, the
//! CI's transactions and a Kafka reader in this process.
//!
//! - `relay.<rate>`: an open load of transitions at a fixed schedule, each the CI's own
//!   transaction (the build row and `Outbox::record`, then COMMIT), started when it is due
//!   whether or not earlier ones are done, so a stall of the relay or the database cannot slow
//!   the load down and hide itself. Latency is from the moment COMMIT returned to the moment a
//!   Kafka consumer read the event; the first second is a ramp and not counted.
//! - `relay.backlog`: rows committed in one transaction while the relay waits, four per build
//!   (as a CI's created, pending, running, finished), and the rate from that commit to the last
//!   of them read from Kafka.
//!
//! Each run has its own topic, schema and relay process; the figures are medians over the runs.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{Build, Outbox, OutboxTransition, PgOptions, PgStore, write_build};
use hookline_schemas::{BuildStatus, Codec};
use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use serde_json::{Value, json};
use tokio::process::Child;
use uuid::Uuid;

use super::{Bench, median, progress, round, stop};
use crate::{database_url, free_port, unique_name};

/// How much the relay part measures.
#[derive(Debug, Clone)]
pub struct RelaySizes {
    /// Transitions per second of the open load.
    pub rate: u64,
    /// Seconds of load measured (after a one-second ramp).
    pub secs: u64,
    /// Rows in the backlog.
    pub backlog: usize,
    /// Runs of each; the figures are their medians.
    pub runs: usize,
}

impl RelaySizes {
    pub fn full() -> RelaySizes {
        RelaySizes {
            rate: 1_000,
            secs: 20,
            backlog: 20_000,
            runs: 3,
        }
    }

    pub fn quick() -> RelaySizes {
        RelaySizes {
            rate: 1_000,
            secs: 5,
            backlog: 5_000,
            runs: 1,
        }
    }
}

const PARTITIONS: i32 = 4;
const PROJECTS: i64 = 4;
const STATUSES: [BuildStatus; 4] = [
    BuildStatus::Created,
    BuildStatus::Pending,
    BuildStatus::Running,
    BuildStatus::Success,
];
const RAMP_SECS: u64 = 1;
/// Connections of the CI's side: enough that commits keep the schedule when one takes long.
const WRITER_CONNECTIONS: u32 = 32;

/// One run's figures.
#[derive(Debug, Clone)]
struct Run {
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    sent: usize,
    delivered: usize,
    /// How late the 99th percentile of commits returned after their scheduled moment: the load
    /// was held when this is small.
    commit_late_p99_ms: f64,
    /// From COMMIT to the broker's append (the relay's part, in whole milliseconds).
    to_broker_p50_ms: f64,
    to_broker_p99_ms: f64,
    backlog_per_s: f64,
}

/// Measures `sizes.runs` runs and returns the report's `relay` object.
pub async fn measure(bench: &Bench, sizes: &RelaySizes) -> anyhow::Result<Value> {
    let mut runs = Vec::with_capacity(sizes.runs);
    for n in 0..sizes.runs {
        eprintln!(
            "bench: relay run {}/{}: {} transitions/s for {} s, then a backlog of {}",
            n + 1,
            sizes.runs,
            sizes.rate,
            sizes.secs,
            sizes.backlog
        );
        runs.push(run(bench, sizes, n).await?);
    }
    let med = |f: fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let list = |f: fn(&Run) -> f64| runs.iter().map(|r| round(f(r), 1)).collect::<Vec<_>>();
    let mut report = json!({
        "backlog": {
            "rows": sizes.backlog,
            "per_s": round(med(|r| r.backlog_per_s), 0),
            "per_s_runs": list(|r| r.backlog_per_s),
        },
        "runs": sizes.runs,
    });
    report[sizes.rate.to_string()] = json!({
        "p50_ms": round(med(|r| r.p50_ms), 2),
        "p99_ms": round(med(|r| r.p99_ms), 2),
        "p999_ms": round(med(|r| r.p999_ms), 2),
        "max_ms": round(med(|r| r.max_ms), 2),
        "p99_ms_runs": list(|r| r.p99_ms),
        "max_ms_runs": list(|r| r.max_ms),
        "sent": runs.iter().map(|r| r.sent).sum::<usize>(),
        "delivered": runs.iter().map(|r| r.delivered).sum::<usize>(),
        "commit_late_p99_ms": round(med(|r| r.commit_late_p99_ms), 2),
        "to_broker_p50_ms": med(|r| r.to_broker_p50_ms),
        "to_broker_p99_ms": med(|r| r.to_broker_p99_ms),
        "secs": sizes.secs,
    });
    Ok(report)
}

/// The report's relay rows for the table.
pub fn table(report: &Value, row: &mut impl FnMut(&str, String)) {
    let Some(relay) = report["relay"].as_object() else {
        return;
    };
    for (rate, l) in relay.iter().filter(|(k, _)| k.parse::<u64>().is_ok()) {
        row(
            &format!("relay at {rate} transitions/s"),
            format!(
                "COMMIT to read: p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms, {}/{} read (p99 runs {}); to the broker's append p50 {} ms, p99 {} ms",
                l["p50_ms"],
                l["p99_ms"],
                l["p999_ms"],
                l["max_ms"],
                l["delivered"],
                l["sent"],
                l["p99_ms_runs"],
                l["to_broker_p50_ms"],
                l["to_broker_p99_ms"]
            ),
        );
    }
    let b = &relay["backlog"];
    if !b.is_null() {
        row(
            &format!("relay backlog ({} rows)", b["rows"]),
            format!("{} rows/s (runs {})", b["per_s"], b["per_s_runs"]),
        );
    }
}

/// A topic, a schema with the sample projects, a running relay and a reader.
struct Scene {
    store: PgStore,
    relay: Child,
    reader: Reader,
    /// The builds of every project, ids as in the sample world.
    builds: Vec<Build>,
}

impl Scene {
    async fn new(bench: &Bench, builds: usize, n: usize) -> anyhow::Result<Scene> {
        let topic = unique_name("bench_relay");
        // The broker stamps each record when it appends it: the latency splits there into the
        // relay's part (claim, publish, ack) and the reader's (fetch).
        let created = crate::admin()
            .create_topics(
                &[
                    NewTopic::new(&topic, PARTITIONS, TopicReplication::Fixed(-1))
                        .set("message.timestamp.type", "LogAppendTime"),
                ],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
            )
            .await?;
        for result in created {
            result.map_err(|(topic, code)| anyhow::anyhow!("creating topic {topic}: {code}"))?;
        }
        let schema = unique_name("bench_relay");
        // The relay first: it creates and migrates the schema as its own version knows it, so
        // an older relay binary can be measured with this driver too.
        let port = free_port();
        let log = std::fs::File::create(bench.work_dir.join(format!("relay-{n}.log")))?;
        let relay = tokio::process::Command::new(bench.bin_dir.join("hookline-producer"))
            .args(["relay", "--listen", &format!("127.0.0.1:{port}")])
            .env("HOOKLINE_KAFKA_BROKERS", crate::kafka_brokers())
            .env("HOOKLINE_TOPIC", &topic)
            .env("HOOKLINE_DATABASE_URL", database_url())
            .env("HOOKLINE_DATABASE_SCHEMA", &schema)
            .env(
                "RUST_LOG",
                std::env::var("CHILD_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("start hookline-producer relay")?;
        let ready = format!("http://127.0.0.1:{port}/readyz");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match reqwest::get(&ready).await {
                Ok(r) if r.status().is_success() => break,
                _ if Instant::now() > deadline => bail!("the relay was not ready within 60 s"),
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
        let store = PgStore::connect(&PgOptions {
            max_connections: WRITER_CONNECTIONS,
            ..PgOptions::new(database_url()).schema(schema.clone())
        })
        .await
        .context("database")?;
        let mut all = Vec::with_capacity(builds);
        for p in 0..PROJECTS {
            let snapshot = sample(p * 1_000_000);
            write_snapshot(&store, &snapshot).await?;
        }
        for i in 0..builds {
            let p = i as i64 % PROJECTS;
            let mut build = sample(p * 1_000_000).build;
            build.id += i as i64 / PROJECTS;
            build.started_at = None;
            build.finished_at = None;
            build.duration = None;
            build.failure_reason = None;
            all.push(build);
        }
        let reader = Reader::start(&topic)?;
        Ok(Scene {
            store,
            relay,
            reader,
            builds: all,
        })
    }

    /// Commits one transition as a CI does: the build row, then the outbox row, one transaction.
    async fn commit(
        pool: &sqlx::PgPool,
        build: &Build,
        status: BuildStatus,
    ) -> anyhow::Result<Uuid> {
        let mut b = build.clone();
        b.status = status.as_str().to_owned();
        let now = chrono::Utc::now();
        if status == BuildStatus::Running {
            b.started_at = Some(now);
        }
        if status.is_finished() {
            b.started_at = Some(now - chrono::Duration::seconds(3));
            b.finished_at = Some(now);
            b.duration = Some(3.0);
        }
        let mut tx = pool.begin().await?;
        write_build(&mut *tx, &b).await?;
        let id = Outbox::record(&mut *tx, &OutboxTransition::new(b.id, status)).await?;
        tx.commit().await?;
        Ok(id)
    }
}

/// When each event was first read from the topic, and when the broker appended it (ms since
/// the epoch).
struct Reader {
    arrivals: Arc<Mutex<HashMap<Uuid, Arrival>>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Reader {
    fn start(topic: &str) -> anyhow::Result<Reader> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", crate::kafka_brokers())
            .set("group.id", unique_name("bench_relay_reader"))
            .set("enable.auto.commit", "false")
            // An empty fetch returns after this; a record ends the broker's wait at once.
            .set("fetch.wait.max.ms", "10")
            .create()?;
        let mut assignment = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            assignment.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&assignment)?;
        let arrivals: Arc<Mutex<HashMap<Uuid, Arrival>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let thread = std::thread::spawn({
            let (arrivals, stop) = (arrivals.clone(), stop.clone());
            move || {
                let codec = Codec::embedded();
                while !stop.load(Ordering::Relaxed) {
                    let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) else {
                        continue;
                    };
                    let at = Instant::now();
                    let Some(payload) = m.payload() else { continue };
                    let Ok(decoded) = futures::executor::block_on(codec.decode(payload)) else {
                        continue;
                    };
                    let appended_ms = m.timestamp().to_millis().unwrap_or(0);
                    arrivals
                        .lock()
                        .expect("arrivals")
                        .entry(decoded.event.event_id)
                        .or_insert(Arrival { at, appended_ms });
                }
            }
        });
        Ok(Reader {
            arrivals,
            stop,
            thread: Some(thread),
        })
    }

    fn arrived(&self, ids: &[Uuid]) -> Vec<Option<Arrival>> {
        let arrivals = self.arrivals.lock().expect("arrivals");
        ids.iter().map(|id| arrivals.get(id).copied()).collect()
    }

    /// Waits until every id in `ids` was read, at most `timeout`; how many were.
    async fn wait_for(&self, ids: &[Uuid], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let read = self.arrived(ids).iter().filter(|a| a.is_some()).count();
            if read == ids.len() || Instant::now() > deadline {
                return read;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Arrival {
    at: Instant,
    appended_ms: i64,
}

impl Drop for Reader {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

async fn run(bench: &Bench, sizes: &RelaySizes, n: usize) -> anyhow::Result<Run> {
    let ramp = (sizes.rate * RAMP_SECS) as usize;
    let total = (sizes.rate * sizes.secs) as usize;
    let transitions = ramp + total;
    // Each build goes through its four statuses, a quarter of the run apart: one build's
    // transitions never overlap, and every partition sees every kind.
    let per_status = transitions.div_ceil(STATUSES.len());
    if per_status < sizes.backlog / 4 {
        bail!(
            "a backlog of {} needs more builds than the load writes",
            sizes.backlog
        );
    }
    let scene = Scene::new(bench, per_status, n).await?;
    let pool = scene.store.pool().clone();
    // Warm: every writer connection open, and one event through the relay and the reader, so
    // the figures are the relay's steady state (cold starts are the ramp's, not counted).
    let mut open = Vec::with_capacity(WRITER_CONNECTIONS as usize);
    for _ in 0..WRITER_CONNECTIONS {
        open.push(pool.acquire().await?);
    }
    drop(open);
    let probe = Scene::commit(&pool, &scene.builds[0], BuildStatus::Created).await?;
    if scene
        .reader
        .wait_for(&[probe], Duration::from_secs(60))
        .await
        == 0
    {
        bail!("the relay published nothing within 60 s (its log: relay-{n}.log)");
    }

    let bar = progress(transitions as u64, &format!("relay at {}/s", sizes.rate));
    let start = Instant::now() + Duration::from_millis(100);
    let mut tasks = tokio::task::JoinSet::new();
    let mut committed = Vec::with_capacity(transitions);
    for i in 0..transitions {
        let due = start + Duration::from_nanos(i as u64 * 1_000_000_000 / sizes.rate);
        tokio::time::sleep_until(due.into()).await;
        let build = scene.builds[i % per_status].clone();
        let status = STATUSES[i / per_status];
        let pool = pool.clone();
        tasks.spawn(async move {
            let id = Scene::commit(&pool, &build, status).await?;
            anyhow::Ok((i, id, due, Instant::now(), chrono::Utc::now()))
        });
        // Reap what is done, so errors surface during the run.
        while let Some(done) = tasks.try_join_next() {
            committed.push(done??);
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    while let Some(done) = tasks.join_next().await {
        committed.push(done??);
    }
    committed.retain(|(i, ..)| *i >= ramp);
    committed.sort_by_key(|(i, ..)| *i);
    let ids: Vec<Uuid> = committed.iter().map(|(_, id, ..)| *id).collect();
    // What has not been read 30 s after the last commit is counted as not delivered.
    scene.reader.wait_for(&ids, Duration::from_secs(30)).await;
    let arrived = scene.reader.arrived(&ids);

    let mut latency = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut late = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    // Milliseconds (the broker's stamp has no finer grain), from COMMIT to the broker's append.
    let mut appended = Histogram::<u64>::new_with_bounds(1, 600_000, 3)?;
    let mut csv =
        String::from("due_ms,commit_late_ms,latency_ms,to_broker_ms,event_id,commit_unix_us\n");
    let mut delivered = 0;
    for ((_, id, due, at_commit, wall_commit), read) in committed.iter().zip(&arrived) {
        let commit_late = at_commit.saturating_duration_since(*due);
        late.saturating_record((commit_late.as_micros() as u64).max(1));
        let Some(read) = read else { continue };
        delivered += 1;
        let took = read.at.saturating_duration_since(*at_commit);
        latency.saturating_record((took.as_micros() as u64).max(1));
        let to_broker = (read.appended_ms - wall_commit.timestamp_millis()).max(0);
        appended.saturating_record(to_broker as u64 + 1);
        csv.push_str(&format!(
            "{:.3},{:.3},{:.3},{to_broker},{id},{}\n",
            due.duration_since(start).as_secs_f64() * 1e3,
            commit_late.as_secs_f64() * 1e3,
            took.as_secs_f64() * 1e3,
            wall_commit.timestamp_micros()
        ));
    }
    std::fs::write(
        bench
            .work_dir
            .join(format!("relay-{}-run{n}.csv", sizes.rate)),
        csv,
    )?;
    let ms = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q) as f64 / 1_000.0;

    // The backlog: four rows for each of the first builds, committed at once.
    let backlog_started_at = Instant::now();
    let backlog: Vec<Uuid> = sqlx::query_scalar(
        "SELECT hookline_outbox_record(b.id, 'running')
         FROM (SELECT id FROM builds ORDER BY id LIMIT $1) b, generate_series(1, 4)",
    )
    .bind((sizes.backlog / 4) as i64)
    .fetch_all(&pool)
    .await
    .context("writing the backlog")?;
    let committed_at = Instant::now();
    eprintln!(
        "bench: relay backlog of {} rows committed in {:.1} s",
        backlog.len(),
        committed_at
            .duration_since(backlog_started_at)
            .as_secs_f64()
    );
    if backlog.len() != sizes.backlog {
        bail!(
            "relay backlog: {} rows written, {} asked",
            backlog.len(),
            sizes.backlog
        );
    }
    let read = scene
        .reader
        .wait_for(&backlog, Duration::from_secs(300))
        .await;
    if read < backlog.len() {
        bail!(
            "relay backlog: {read} of {} rows read within 300 s",
            backlog.len()
        );
    }
    let last = scene
        .reader
        .arrived(&backlog)
        .into_iter()
        .flatten()
        .map(|a| a.at)
        .max()
        .context("no backlog row read")?;
    let drain = last.saturating_duration_since(committed_at);
    let Scene { relay, reader, .. } = scene;
    drop(reader);
    stop(relay).await;
    Ok(Run {
        p50_ms: ms(&latency, 0.50),
        p99_ms: ms(&latency, 0.99),
        p999_ms: ms(&latency, 0.999),
        max_ms: latency.max() as f64 / 1_000.0,
        sent: committed.len(),
        delivered,
        commit_late_p99_ms: ms(&late, 0.99),
        // Recorded +1, so a 0 ms append is not below the histogram's floor.
        to_broker_p50_ms: appended.value_at_quantile(0.50) as f64 - 1.0,
        to_broker_p99_ms: appended.value_at_quantile(0.99) as f64 - 1.0,
        backlog_per_s: backlog.len() as f64 / drain.as_secs_f64().max(1e-3),
    })
}
