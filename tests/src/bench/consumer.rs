//! The consumer's figures: throughput against a bare consume-and-POST loop on the same records
//! and receiver, latency under an open load, and peak memory while draining a backlog.
//!
//! hookline runs as the release `hookline-consumer serve` process (its default settings, loopback
//! allowed); the bare loop, the producer of the records and the receiver run in this process.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use hookline_cistate::delivery_log::{self, DeliveryLogEntry};
use hookline_cistate::{PgOptions, PgStore, RenderSnapshot};
use hookline_schemas::{BuildStatus, Codec};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use tokio::sync::Semaphore;
use uuid::Uuid;

use super::receiver::{BenchReceiver, first_arrivals, rate};
use super::{Bench, progress, stop};
use crate::process::ConsumerProcess;
use crate::world::{World, inline_event};

/// The consumer's default `--max-in-flight`: the bare loop gets the same concurrency.
const CONCURRENCY: usize = 256;

/// A world of `builds` builds of one project with one hook to the receiver.
pub struct Fleet {
    pub world: World,
    pub schema: String,
    pub builds: Vec<RenderSnapshot>,
}

impl Fleet {
    pub async fn new(partitions: i32, builds: usize, hook_url: &str) -> Fleet {
        Fleet::projects(partitions, &[hook_url], builds).await
    }

    /// A world of one project per hook URL, each with `builds` builds and one hook to its URL;
    /// [`Fleet::builds`] interleaves the projects (build `i` of every project, then `i + 1`).
    pub async fn projects(partitions: i32, hook_urls: &[&str], builds: usize) -> Fleet {
        let world = World::new(partitions).await;
        let mut per_project = Vec::new();
        for (p, url) in (0..).zip(hook_urls) {
            let first = world.build(9_000_000 + p * 1_000_000).await;
            let mut mine = vec![first.clone()];
            for i in 1..builds as i64 {
                let mut b = first.clone();
                b.build.id += i;
                world.store_upsert_build(&b.build).await;
                mine.push(b);
            }
            world.hook(first.project.id, url, None).await;
            per_project.push(mine);
        }
        let all = (0..builds)
            .flat_map(|i| per_project.iter().map(move |builds| builds[i].clone()))
            .collect();
        let schema = world.store_schema().await;
        Fleet {
            world,
            schema,
            builds: all,
        }
    }

    /// `count` inline events, round robin over the builds, encoded as the producer writes them.
    pub fn records(&self, count: usize, status: BuildStatus) -> Vec<(String, Uuid, Vec<u8>)> {
        let codec = Codec::embedded();
        (0..count)
            .map(|i| {
                let b = &self.builds[i % self.builds.len()];
                let event = inline_event(b, status);
                let bytes = codec.encode(&event).expect("encode");
                (event.build_id.to_string(), event.event_id, bytes)
            })
            .collect()
    }

    /// A `hookline-consumer serve` process in a new group (so it reads the topic from the start),
    /// started with its log in the bench's work directory (`consumer-<group>.log`).
    pub fn spawn_consumer(&self, bench: &Bench) -> tokio::process::Child {
        let group = crate::unique_name("bench");
        let log = std::fs::File::create(bench.work_dir.join(format!("consumer-{group}.log")))
            .expect("the bench's work directory");
        self.consumer_in(bench, &group).spawn_logging_to(log)
    }

    /// A `hookline-consumer serve` process in a new group (so it reads the topic from the start).
    pub fn consumer(&self, bench: &Bench) -> ConsumerProcess {
        self.consumer_in(bench, &crate::unique_name("bench"))
    }

    fn consumer_in(&self, bench: &Bench, group: &str) -> ConsumerProcess {
        let bin = bench.bin_dir.join("hookline-consumer");
        ConsumerProcess::new(
            bin.to_str().expect("utf-8 path"),
            &self.world,
            group,
            &self.schema,
        )
        .args(bench.consumer_args.iter().map(String::as_str))
    }
}

/// The bench's producer: hookline-producer's compression and batching, so the consumer
/// decompresses what it would in production.
pub fn producer(brokers: &str) -> FutureProducer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("compression.type", "zstd")
        .set("linger.ms", "5")
        .set("enable.idempotence", "true")
        .set("queue.buffering.max.messages", "200000")
        .create()
        .expect("producer")
}

/// Produces every record and waits for every ack.
pub async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    records: impl Iterator<Item = (String, Vec<u8>)>,
) -> anyhow::Result<()> {
    let mut acks = futures::stream::FuturesUnordered::new();
    for (key, bytes) in records {
        loop {
            match producer.send_result(FutureRecord::to(topic).key(&key).payload(&bytes)) {
                Ok(ack) => {
                    acks.push(ack);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                    // Wait for some acks to make room.
                    if let Some(ack) = acks.next().await {
                        ack?.map_err(|(e, _)| e)?;
                    }
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        if acks.len() >= 50_000
            && let Some(ack) = acks.next().await
        {
            ack?.map_err(|(e, _)| e)?;
        }
    }
    while let Some(ack) = acks.next().await {
        ack?.map_err(|(e, _)| e)?;
    }
    Ok(())
}

/// Waits until the receiver holds `count` distinct deliveries (repeats of an event do not
/// count); fails after `limit` without progress.
pub(super) async fn wait_for(
    receiver: &BenchReceiver,
    count: usize,
    limit: Duration,
) -> anyhow::Result<()> {
    let mut last = (receiver.distinct(), Instant::now());
    loop {
        let now = receiver.distinct();
        if now >= count {
            return Ok(());
        }
        if now != last.0 {
            last = (now, Instant::now());
        } else if last.1.elapsed() > limit {
            bail!("stuck at {now} of {count} requests for {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// hookline against the bare loop on one workload.
#[derive(Debug, Clone, Copy)]
pub struct Throughput {
    pub hookline_per_s: f64,
    pub bare_per_s: f64,
}

/// Drains `events` records over `builds` builds (4 partitions, 1 hook) with hookline, then with
/// the bare loop, `runs` times on the same records.
pub async fn throughput(
    bench: &Bench,
    receiver: &BenchReceiver,
    events: usize,
    builds: usize,
    runs: usize,
) -> anyhow::Result<Vec<Throughput>> {
    let fleet = Fleet::new(4, builds, &receiver.url).await;
    let records = fleet.records(events, BuildStatus::Running);
    produce_all(
        &producer(&fleet.world.brokers),
        &fleet.world.topic,
        records.into_iter().map(|(k, _, b)| (k, b)),
    )
    .await?;
    let mut out = Vec::new();
    for _ in 0..runs {
        receiver.clear();
        let child = fleet.spawn_consumer(bench);
        wait_for(receiver, events, Duration::from_secs(60))
            .await
            .context("hookline drain")?;
        let hookline_per_s = rate(&receiver.since(0));
        stop(child).await;

        receiver.clear();
        bare_loop(
            &fleet.world.brokers,
            &fleet.world.topic,
            &receiver.url,
            events,
        )
        .await?;
        let bare_per_s = rate(&receiver.since(0));
        out.push(Throughput {
            hookline_per_s,
            bare_per_s,
        });
    }
    receiver.clear();
    Ok(out)
}

/// The delivery log's cost on one drain: the consumer's rate with the log on and off.
#[derive(Debug, Clone, Copy)]
pub struct LogCost {
    pub on_per_s: f64,
    pub off_per_s: f64,
    /// Rows the log run wrote (so a log that was silently off shows).
    pub rows_logged: i64,
}

/// Drains `events` records over `builds` builds with `--delivery-log on` and with `off`, `runs`
/// times on the same records, alternating which goes first (so a drift of the shared machine
/// does not always favour one side). Also returns one row the drains logged.
pub async fn delivery_log_cost(
    bench: &Bench,
    receiver: &BenchReceiver,
    events: usize,
    builds: usize,
    runs: usize,
) -> anyhow::Result<(Vec<LogCost>, Option<DeliveryLogEntry>)> {
    let fleet = Fleet::new(4, builds, &receiver.url).await;
    let records = fleet.records(events, BuildStatus::Running);
    produce_all(
        &producer(&fleet.world.brokers),
        &fleet.world.topic,
        records.into_iter().map(|(k, _, b)| (k, b)),
    )
    .await?;
    let rows = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM delivery_log")
            .fetch_one(fleet.world.store.pool())
            .await
            .context("counting log rows")
    };
    let mut out = Vec::new();
    for run in 0..runs {
        let order = if run % 2 == 0 {
            ["on", "off"]
        } else {
            ["off", "on"]
        };
        let mut cost = LogCost {
            on_per_s: 0.0,
            off_per_s: 0.0,
            rows_logged: 0,
        };
        for switch in order {
            let before = rows().await?;
            receiver.clear();
            let child = fleet
                .consumer(bench)
                .args(["--delivery-log", switch])
                .spawn();
            wait_for(receiver, events, Duration::from_secs(60))
                .await
                .with_context(|| format!("drain with the delivery log {switch}"))?;
            let per_s = rate(&receiver.since(0));
            // The drain flushes the log's last rows before the process exits.
            stop(child).await;
            if switch == "on" {
                cost.on_per_s = per_s;
                cost.rows_logged = rows().await? - before;
            } else {
                cost.off_per_s = per_s;
            }
        }
        out.push(cost);
    }
    receiver.clear();
    let sample: Option<i64> = sqlx::query_scalar("SELECT max(id) FROM delivery_log")
        .fetch_one(fleet.world.store.pool())
        .await?;
    let sample = match sample {
        Some(id) => delivery_log::find(fleet.world.store.pool(), id).await?,
        None => None,
    };
    Ok((out, sample))
}

/// The database's side of the log: server CPU milliseconds (of the one backend doing the
/// writes, from `/proc`, so the client's work is not counted) per 1,000 rows written the
/// consumer's way (batches of 500 through [`delivery_log::append_within`]), with the bodies and
/// headers compressed by `lz4` (the schema's) and by PostgreSQL's default `pglz`, alternating,
/// `rounds` times each. `template` is a row a drain logged, so the bodies are real Job Hooks.
pub async fn delivery_log_server_cost(
    template: &DeliveryLogEntry,
    rounds: usize,
) -> anyhow::Result<Vec<(&'static str, f64)>> {
    const BATCH: usize = 500;
    const BATCHES: usize = 20;
    let mut totals = [("lz4", 0.0), ("pglz", 0.0)];
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            // One connection, so one backend does all the writing.
            let options = PgOptions {
                max_connections: 1,
                ..PgOptions::new(crate::database_url()).schema(crate::unique_name("bench_log"))
            };
            let store = PgStore::connect(&options).await?;
            let pool = store.pool();
            let method = totals[i].0;
            for column in [
                "request_headers",
                "request_body",
                "response_headers",
                "response_body",
            ] {
                for table in ["delivery_log", "delivery_log_default"] {
                    sqlx::query(&format!(
                        "ALTER TABLE ONLY {table} ALTER COLUMN {column} SET COMPRESSION {method}"
                    ))
                    .execute(pool)
                    .await?;
                }
            }
            let now = chrono::Utc::now();
            let rows: Vec<DeliveryLogEntry> = (0..BATCH)
                .map(|n| DeliveryLogEntry {
                    event_id: Uuid::new_v4(),
                    idempotency_key: Uuid::new_v4().to_string(),
                    attempted_at: now + chrono::Duration::microseconds(n as i64),
                    ..template.clone()
                })
                .collect();
            let backend = || async {
                sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                    .fetch_one(pool)
                    .await
            };
            let pid = backend().await?;
            let before = super::producer::cpu_seconds(pid as u32)?;
            for _ in 0..BATCHES {
                delivery_log::append_within(pool, &rows, Duration::from_secs(30)).await?;
            }
            let used = super::producer::cpu_seconds(pid as u32)? - before;
            if backend().await? != pid {
                bail!("the log's writes moved to another backend while measured");
            }
            totals[i].1 += used * 1000.0 * 1000.0 / (BATCH * BATCHES) as f64;
        }
    }
    Ok(totals
        .into_iter()
        .map(|(method, total)| (method, total / rounds.max(1) as f64))
        .collect())
}

/// Reads `count` records of `topic` from the start and POSTs each record's bytes to `url` with
/// the consumer's concurrency: no decode, no hooks, no signing, no offset discipline. What is
/// left is the cost of Kafka and HTTP alone.
pub(super) async fn bare_loop(
    brokers: &str,
    topic: &str,
    url: &str,
    count: usize,
) -> anyhow::Result<()> {
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", crate::unique_name("bare"))
        .set("auto.offset.reset", "earliest")
        .create()?;
    consumer.subscribe(&[topic])?;
    let http = reqwest::Client::new();
    let permits = Arc::new(Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    let mut stream = consumer.stream();
    for _ in 0..count {
        let message = stream.next().await.context("stream ended")??;
        let body = message.payload().unwrap_or_default().to_vec();
        drop(message);
        let permit = permits.clone().acquire_owned().await?;
        let (http, url) = (http.clone(), url.to_owned());
        tasks.spawn(async move {
            let sent = http.post(url).body(body).send().await;
            drop(permit);
            sent.map(drop)
        });
        while let Some(done) = tasks.try_join_next() {
            done??;
        }
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    Ok(())
}

/// Latency at one offered rate.
#[derive(Debug, Clone)]
pub struct Latency {
    pub rate: u64,
    pub sent: usize,
    pub delivered: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
}

impl Latency {
    /// Every event delivered and the tail within a second: the consumer kept up with the rate.
    pub fn sustained(&self) -> bool {
        self.delivered >= self.sent && self.p99_ms < 1_000.0
    }
}

/// Seconds of load at the rate before the measured window: the first second after an idle
/// warm-up showed 0.8 s latencies in every run (the consumer's fetches and the producer's
/// batches settling to the rate), then nothing above tens of milliseconds.
pub const RAMP_SECS: u64 = 2;

/// Open load: `rate` events/s for `secs` (after [`RAMP_SECS`] at the same rate, not measured),
/// each produced at its scheduled moment whatever came back before (no coordinated omission: a
/// late send is measured from when it was due). Latency is from the scheduled moment to the
/// receiver's arrival.
pub async fn latency(
    bench: &Bench,
    receiver: &BenchReceiver,
    rate: u64,
    secs: u64,
) -> anyhow::Result<Latency> {
    let fleet = Fleet::new(4, 2_000, &receiver.url).await;
    let ramp = (rate * RAMP_SECS) as usize;
    let total = (rate * secs) as usize;
    let records = fleet.records(ramp + total, BuildStatus::Success);
    let producer = producer(&fleet.world.brokers);
    receiver.clear();
    let child = fleet.spawn_consumer(bench);
    // Warm-up: the group joined and every partition fetching (one event per build reaches all
    // partitions), so the measurement starts on a running consumer.
    let warm = fleet.records(fleet.builds.len(), BuildStatus::Created);
    let warm_n = warm.len();
    produce_all(
        &producer,
        &fleet.world.topic,
        warm.into_iter().map(|(k, _, b)| (k, b)),
    )
    .await?;
    wait_for(receiver, warm_n, Duration::from_secs(60))
        .await
        .context("latency warm-up")?;
    receiver.clear();

    let bar = progress((ramp + total) as u64, &format!("latency at {rate}/s"));
    let start = Instant::now();
    let mut due = HashMap::with_capacity(total);
    let mut acks = futures::stream::FuturesUnordered::new();
    for (i, (key, id, bytes)) in records.iter().enumerate() {
        let at = start + Duration::from_nanos(i as u64 * 1_000_000_000 / rate);
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        if i >= ramp {
            due.insert(*id, at);
        }
        match producer.send_result(FutureRecord::to(&fleet.world.topic).key(key).payload(bytes)) {
            Ok(ack) => acks.push(ack),
            Err((e, _)) => bail!("produce at {rate}/s: {e}"),
        }
        while let Some(Some(ack)) = futures::FutureExt::now_or_never(acks.next()) {
            ack?.map_err(|(e, _)| e)?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    while let Some(ack) = acks.next().await {
        ack?.map_err(|(e, _)| e)?;
    }
    // What has not arrived 10 s after the last send is counted as not delivered.
    let _ = wait_for(receiver, ramp + total, Duration::from_secs(10)).await;
    let arrivals = receiver.since(0);
    stop(child).await;
    receiver.clear();

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut delivered = 0;
    // Every delivery's moment and latency, for a look at when the tail happened; an event
    // delivered twice counts once, at its first arrival.
    let mut csv = String::from("due_ms,latency_ms\n");
    for a in &first_arrivals(&arrivals).0 {
        if let Some(due) = a.event.and_then(|e| due.get(&e)) {
            delivered += 1;
            let latency = a.at.saturating_duration_since(*due);
            histogram.saturating_record((latency.as_micros() as u64).max(1));
            csv.push_str(&format!(
                "{:.3},{:.3}\n",
                due.duration_since(start).as_secs_f64() * 1e3 - (RAMP_SECS * 1_000) as f64,
                latency.as_secs_f64() * 1e3
            ));
        }
    }
    std::fs::write(bench.work_dir.join(format!("latency-{rate}.csv")), csv)?;
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1_000.0;
    Ok(Latency {
        rate,
        sent: total,
        delivered,
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        max_ms: histogram.max() as f64 / 1_000.0,
    })
}

/// Peak RSS (VmHWM, MB) of a consumer that drains a backlog of `events` records.
pub async fn backlog_rss(
    bench: &Bench,
    receiver: &BenchReceiver,
    events: usize,
) -> anyhow::Result<f64> {
    let fleet = Fleet::new(4, 5_000, &receiver.url).await;
    let producer = producer(&fleet.world.brokers);
    // Produced in slices, so the bench itself never holds a million encoded records.
    let bar = progress(events as u64, &format!("backlog of {events}: producing"));
    let mut done = 0;
    while done < events {
        let n = (events - done).min(20_000);
        let records = fleet.records(n, BuildStatus::Running);
        produce_all(
            &producer,
            &fleet.world.topic,
            records.into_iter().map(|(k, _, b)| (k, b)),
        )
        .await?;
        done += n;
        bar.inc(n as u64);
    }
    bar.finish_and_clear();
    receiver.clear();
    let child = fleet.spawn_consumer(bench);
    let pid = child.id().context("consumer pid")?;
    let bar = progress(events as u64, &format!("backlog of {events}: draining"));
    let mut peak_kb = 0;
    let mut last = (0, Instant::now());
    loop {
        peak_kb = peak_kb.max(crate::soak::services::vm_hwm_kb(pid).unwrap_or(0));
        let n = receiver.distinct();
        bar.set_position(n as u64);
        if n >= events {
            break;
        }
        if n != last.0 {
            last = (n, Instant::now());
        } else if last.1.elapsed() > Duration::from_secs(60) {
            bail!("backlog of {events}: stuck at {n} deliveries for a minute");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    bar.finish_and_clear();
    peak_kb = peak_kb.max(crate::soak::services::vm_hwm_kb(pid).unwrap_or(0));
    stop(child).await;
    receiver.clear();
    Ok(peak_kb as f64 / 1024.0)
}
