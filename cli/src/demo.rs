//! `hookline demo`: the whole pipeline in one process, with no services.
//!
//! ```text
//! sim (simulated CI) --commit--> MemoryStore <------------------------------+ current state
//!     |  truth of each transition --> Ledger <-- receiver (axum, 127.0.0.1)  |  (deferred)
//!     +--emit--> Emitter --> [build-events.incoming] --delay line (L ms)--> [build-events] --> Consumer --POST--^
//!                 flag: inline for P % of projects          librdkafka mock cluster
//! ```
//!
//! The producer ([`hookline_producer::Emitter`]) and the consumer ([`hookline_consumer::Consumer`])
//! are the real ones, unchanged; the demo only wires them. How the consumer is made to trail the
//! producer: the producer writes to `build-events.incoming`, and a *delay line* in the demo copies
//! every record to `build-events` once it is `--consumer-lag-ms` old (by its Kafka timestamp),
//! keeping its key and bytes and the order within each partition. The consumer reads
//! `build-events` as it would in production, so every event reaches it about L ms after it was
//! emitted: a hook queue that is L ms behind, constantly.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hookline_cistate::{CiStore, MemoryStore, NewHook};
use hookline_consumer::ConsumerConfig;
use hookline_consumer::config::Ordering as DeliveryOrdering;
use hookline_consumer::sign::SigningSecret;
use hookline_producer::flags::Change;
use hookline_producer::{
    Emission, EmitError, Emitter, EmitterConfig, Flags, INLINE_FLAG, Percentage, ProducerMetrics,
};
use hookline_schemas::Codec;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rdkafka::ClientConfig;
use rdkafka::consumer::{Consumer as _, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::error::CliError;
use crate::ledger::{Ledger, LedgerReport};
use crate::receiver::serve_ledger;
use crate::sim::{self, Accepted, Runtime, SimSpec, Sink, TransitionSent};

/// What the producer writes.
pub const INCOMING_TOPIC: &str = "build-events.incoming";
/// What the consumer reads (its retry and dead-letter topics are derived from it).
pub const EVENTS_TOPIC: &str = "build-events";
const PARTITIONS: i32 = 4;
/// Ids of the warm-up world, far from the simulated CI's.
const WARMUP_ID_BASE: i64 = 900_000_000;
/// The mock cluster answers a fetch with no new data only when `fetch.wait.max.ms` (500 ms by
/// default) has passed, which would add up to half a second to every hop; the demo's clients
/// ask for a short wait so that the lag measured is the one asked for.
const FETCH_WAIT_MS: &str = "10";

/// The demo's options (see `hookline demo --help`).
#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub projects: usize,
    pub builds: usize,
    /// Percentage of projects (Flipper percentage of actors) whose events are rendered inline.
    pub inline_percent: f64,
    pub consumer_lag: Duration,
    pub seed: u64,
    /// How long to wait for the last deliveries after the simulation ends.
    pub wait: Duration,
    /// Progress lines on stderr.
    pub progress: bool,
    /// Percentage of first delivery attempts the receiver answers 500 (seeded).
    pub receiver_failure_percent: f64,
    /// The consumer's per-(hook, build) ordering across retries.
    pub ordering: DeliveryOrdering,
}

/// The demo's result: the ledger's figures plus what the run looked like.
#[derive(Debug, Clone, Serialize)]
pub struct DemoReport {
    #[serde(flatten)]
    pub ledger: LedgerReport,
    /// Projects that got inline rendering from the flag.
    pub inline_projects: usize,
    pub projects: usize,
    pub builds: usize,
    pub inline_percent: f64,
    pub consumer_lag_ms: u64,
    pub seed: u64,
    pub receiver_failure_percent: f64,
    /// `strict` or `relaxed`.
    pub ordering: String,
    /// The consumer's strict-ordering counts: deliveries held for a retry, events queued
    /// behind them.
    pub consumer_ordering_held: u64,
    pub consumer_ordering_queued: u64,
    pub elapsed_ms: u64,
    /// The consumer's own count of deferred renders of builds that had moved on.
    pub consumer_stale_renders: u64,
    /// Records the delay line could not forward (each one was logged).
    pub delay_line_errors: usize,
    /// A few (event id, project id) pairs that never arrived, when some are missing.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub missing_sample: Vec<(String, i64)>,
}

/// The librdkafka mock cluster lives on a thread of its own: its handle is not `Send`.
struct MockKafka {
    bootstrap: String,
    stop: std::sync::mpsc::Sender<()>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockKafka {
    fn start(topics: &[(&str, i32)]) -> Result<MockKafka, CliError> {
        let topics: Vec<(String, i32)> =
            topics.iter().map(|(t, p)| ((*t).to_owned(), *p)).collect();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stop_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("mock-kafka".into())
            .spawn(move || {
                let started = MockCluster::new(1).and_then(|cluster| {
                    for (topic, partitions) in &topics {
                        cluster.create_topic(topic, *partitions, 1)?;
                    }
                    Ok(cluster)
                });
                match started {
                    Ok(cluster) => {
                        let _ = ready_tx.send(Ok(cluster.bootstrap_servers()));
                        // Lives until the demo says stop (or is gone).
                        let _ = stop_rx.recv();
                        drop(cluster);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                    }
                }
            })
            .map_err(|e| CliError::Unavailable(format!("starting the mock Kafka thread: {e}")))?;
        let bootstrap = ready_rx
            .recv()
            .map_err(|_| {
                CliError::Internal("the mock Kafka thread ended before it started".into())
            })?
            .map_err(|e| CliError::Unavailable(format!("librdkafka mock cluster: {e}")))?;
        Ok(MockKafka {
            bootstrap,
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for MockKafka {
    fn drop(&mut self) {
        let _ = self.stop.send(());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The in-process producer as the simulator's sink.
struct EmitterSink {
    emitter: Emitter,
}

#[async_trait::async_trait]
impl Sink for EmitterSink {
    async fn send(&self, t: &TransitionSent) -> Result<Accepted, CliError> {
        let request = hookline_producer::TransitionRequest {
            build_id: t.build_id,
            status: t.status,
            occurred_at: Some(t.occurred_at),
            facts: Some(t.facts.clone()),
            event_id: Some(t.event_id),
        };
        match self.emitter.emit(request).await {
            // The demo's users are never blocked; a skip would show as refused.
            Ok(Emission::Skipped { reason, .. }) => {
                Err(CliError::Refused(format!("no event emitted: {reason}")))
            }
            Ok(Emission::Emitted(emitted)) => Ok(Accepted {
                timing: Some(emitted.timing),
                render_time: emitted.render_time,
                // Deferred events carry no payload: no size to average.
                payload_bytes: (emitted.timing == hookline_schemas::PayloadTiming::Inline)
                    .then_some(emitted.payload_bytes),
            }),
            Err(EmitError::Unavailable(m)) => Err(CliError::Unavailable(m)),
            Err(e) => Err(CliError::Refused(e.to_string())),
        }
    }
}

/// A `whsec_` secret per project, drawn from the seed.
fn secret_for(rng: &mut StdRng) -> String {
    let key: [u8; 24] = rng.random();
    format!("whsec_{}", BASE64.encode(key))
}

/// Copies every record from `from` to `to` once it is `lag` old, in order per partition.
async fn delay_line(
    brokers: String,
    from: &'static str,
    to: &'static str,
    lag: Duration,
    errors: Arc<AtomicUsize>,
    shutdown: CancellationToken,
) -> Result<(), CliError> {
    let kafka = |e: rdkafka::error::KafkaError| CliError::Unavailable(format!("delay line: {e}"));
    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("group.id", "hookline-demo-delay-line")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", FETCH_WAIT_MS)
        .create()
        .map_err(kafka)?;
    consumer.subscribe(&[from]).map_err(kafka)?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &brokers)
        .set("enable.idempotence", "true")
        .set("linger.ms", "0")
        .create()
        .map_err(kafka)?;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = consumer.recv() => m.map_err(kafka)?.detach(),
        };
        let now_ms = chrono::Utc::now().timestamp_millis();
        let written_ms = message.timestamp().to_millis().unwrap_or(now_ms);
        let wait = (written_ms + lag.as_millis() as i64 - now_ms).max(0) as u64;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_millis(wait)) => {}
        }
        // The key (build id) picks the partition of `to`, as it did for `from`.
        let mut record = FutureRecord::<[u8], [u8]>::to(to);
        if let Some(key) = message.key() {
            record = record.key(key);
        }
        if let Some(payload) = message.payload() {
            record = record.payload(payload);
        }
        // `send_result` enqueues now (order kept); the acknowledgement is awaited aside.
        match producer.send_result(record) {
            Ok(ack) => {
                let errors = errors.clone();
                tokio::spawn(async move {
                    let failed = match ack.await {
                        Ok(Ok(_)) => None,
                        Ok(Err((e, _))) => Some(e.to_string()),
                        Err(_) => Some("delivery future canceled".to_owned()),
                    };
                    if let Some(error) = failed {
                        errors.fetch_add(1, Ordering::Relaxed);
                        tracing::error!(%error, "delay line could not forward a record");
                    }
                });
            }
            Err((e, _)) => {
                errors.fetch_add(1, Ordering::Relaxed);
                tracing::error!(error = %e, "delay line could not enqueue a record");
            }
        }
    }
}

/// Runs the demo and returns its figures.
pub async fn run(options: DemoOptions) -> Result<DemoReport, CliError> {
    let started = Instant::now();
    let say = |line: String| {
        if options.progress {
            eprintln!("[{:>5.1}s] {line}", started.elapsed().as_secs_f64());
        }
    };
    let kafka = MockKafka::start(&[
        // One partition: the delay line holds each record until it is due, and with several
        // partitions a record due early would wait behind another partition's later one.
        (INCOMING_TOPIC, 1),
        (EVENTS_TOPIC, PARTITIONS),
        ("build-events.retry", PARTITIONS),
        ("build-events.dlq", 1),
    ])?;
    say(format!("librdkafka mock cluster at {}", kafka.bootstrap));
    let shutdown = CancellationToken::new();
    // Everything below stops with the demo, also on an error part-way.
    let _stop_on_exit = shutdown.clone().drop_guard();

    let store: Arc<MemoryStore> = Arc::new(MemoryStore::new());
    let plan = sim::plan(&SimSpec {
        projects: options.projects,
        builds: options.builds,
        seed: options.seed,
        id_base: 0,
        spread: SimSpec::spread_for(options.builds),
    });
    let mut rng = StdRng::seed_from_u64(options.seed ^ 0x5EC2E7);
    let secrets: HashMap<i64, String> = plan
        .projects
        .iter()
        .map(|p| (p.id, secret_for(&mut rng)))
        .collect();
    let ledger = Arc::new(Ledger::new());
    ledger.fail_first_attempts(options.receiver_failure_percent, options.seed);
    let keys = secrets
        .iter()
        .map(|(id, s)| SigningSecret::parse(s).map(|k| (*id, k)))
        .collect::<Result<HashMap<_, _>, _>>()
        .map_err(|e| CliError::Internal(format!("demo secret: {e}")))?;
    let warmup = Arc::new(tokio::sync::Notify::new());
    let receiver = serve_ledger(ledger.clone(), keys, warmup.clone(), shutdown.clone()).await?;
    say(format!("receiver listening at {receiver}"));
    sim::write_world(store.as_ref(), &plan, &|p| NewHook {
        project_id: p.id,
        url: format!("{receiver}/hooks/{}", p.id),
        token: Some(format!("demo-token-{}", p.id)),
        signing_secret: secrets.get(&p.id).cloned(),
        job_events: true,
        collapse: false,
    })
    .await?;
    for p in &plan.projects {
        ledger.add_hook(p.id, p.id);
    }

    let flags = Flags::in_memory();
    let percent = Percentage::from_thousandths((options.inline_percent * 1000.0).round() as u32)
        .map_err(|e| CliError::Usage(format!("--inline-percent: {e}")))?;
    flags
        .set(
            INLINE_FLAG,
            "hookline demo",
            Change::PercentageOfActors(percent),
        )
        .await
        .map_err(|e| CliError::Internal(format!("setting the demo flag: {e}")))?;
    let inline_projects = plan
        .projects
        .iter()
        .filter(|p| flags.inline_for_project(p.id))
        .count();
    say(format!(
        "{} projects, {} builds; {INLINE_FLAG} on for {}% of projects ({inline_projects} of them)",
        plan.projects.len(),
        plan.build_count(),
        options.inline_percent,
    ));

    let emitter = Emitter::new(
        EmitterConfig {
            topic: INCOMING_TOPIC.to_owned(),
            ..EmitterConfig::new(kafka.bootstrap.clone())
        },
        store.clone() as Arc<dyn CiStore>,
        flags,
        Arc::new(ProducerMetrics::new()),
    )
    .await
    .map_err(|e| CliError::Unavailable(format!("producer: {e}")))?;

    let delay_errors = Arc::new(AtomicUsize::new(0));
    let delay = tokio::spawn(delay_line(
        kafka.bootstrap.clone(),
        INCOMING_TOPIC,
        EVENTS_TOPIC,
        options.consumer_lag,
        delay_errors.clone(),
        shutdown.clone(),
    ));

    let mut config =
        ConsumerConfig::new(kafka.bootstrap.clone(), "hookline-demo").with_topic(EVENTS_TOPIC);
    config.deliver.allow_cidrs = vec!["127.0.0.0/8".to_owned()];
    config.kafka = vec![("fetch.wait.max.ms".to_owned(), FETCH_WAIT_MS.to_owned())];
    config.deliver.instance_url = "https://ci.example.com".to_owned();
    // Short, so that deliveries the receiver refuses (--receiver-failure-percent) are retried
    // within the demo's wait.
    config.ordering = options.ordering;
    config.retry_schedule = "1s,2s,4s"
        .parse()
        .map_err(|e| CliError::Internal(format!("demo retry schedule: {e}")))?;
    config.retry_hold = Duration::from_secs(5);
    config.drain_timeout = Duration::from_secs(2);
    let consumer = hookline_consumer::Consumer::new(
        config,
        store.clone() as Arc<dyn CiStore>,
        Codec::embedded(),
    )
    .await
    .map_err(|e| CliError::Unavailable(format!("consumer: {e}")))?;
    let consumer_metrics = consumer.metrics();
    let consumer_task = tokio::spawn(consumer.run(shutdown.clone()));
    say(format!(
        "producer and consumer running; the consumer trails by {} ms",
        options.consumer_lag.as_millis()
    ));

    // Consumer groups take a moment to form; a first event through the whole path, to a hook
    // outside the ledger, makes sure they have before the simulated CI starts, so the latency
    // figures describe the steady state and not the start-up.
    let probe = hookline_cistate::fixtures::sample(WARMUP_ID_BASE);
    hookline_cistate::fixtures::write_snapshot(store.as_ref(), &probe).await?;
    store
        .add_hook(&NewHook {
            project_id: probe.project.id,
            url: format!("{receiver}/warmup"),
            job_events: true,
            ..NewHook::default()
        })
        .await?;
    let delivered = warmup.notified();
    emitter
        .emit(hookline_producer::TransitionRequest::new(
            probe.build.id,
            hookline_schemas::BuildStatus::Running,
        ))
        .await
        .map_err(|e| CliError::Unavailable(format!("producer: {e}")))?;
    if tokio::time::timeout(options.consumer_lag + Duration::from_secs(30), delivered)
        .await
        .is_err()
    {
        say("the warm-up event was not delivered within 30 s; starting anyway".into());
    } else {
        say("warm-up event delivered; starting the simulated CI".into());
    }

    let progress = options.progress.then(|| {
        let ledger = ledger.clone();
        let stop = shutdown.clone();
        // A live counter on a terminal, a line a second otherwise (logs, CI).
        let bar = hookline_shell::progress_counter("transitions emitted");
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        bar.finish_and_clear();
                        return;
                    }
                    _ = tick.tick() => {}
                }
                let r = ledger.report();
                if bar.is_hidden() {
                    eprintln!(
                        "[{:>5.1}s] {} transitions emitted, {} deliveries received, {} owed",
                        started.elapsed().as_secs_f64(),
                        r.events,
                        r.deliveries,
                        r.missing
                    );
                } else {
                    bar.set_position(r.events as u64);
                    bar.set_message(format!(
                        "{} deliveries received, {} owed",
                        r.deliveries, r.missing
                    ));
                }
            }
        })
    });

    let summary = sim::run(
        &plan,
        Runtime {
            store: store.clone(),
            sink: Arc::new(EmitterSink {
                emitter: emitter.clone(),
            }),
            witness: Some(ledger.clone()),
            pace: None,
            outbox: None,
        },
    )
    .await?;
    say(format!(
        "simulation done: {} transitions sent, {} accepted; waiting for the last deliveries",
        summary.sent, summary.accepted
    ));

    let deadline = Instant::now() + options.consumer_lag + options.wait;
    while ledger.missing() > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let missing_sample = ledger
        .missing_sample(5)
        .into_iter()
        .map(|(e, h)| (e.to_string(), h))
        .collect();
    shutdown.cancel();
    if let Some(p) = progress {
        let _ = p.await;
    }
    match tokio::time::timeout(Duration::from_secs(5), consumer_task).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(error))) => tracing::warn!(%error, "consumer stopped with an error"),
        Ok(Err(error)) => tracing::warn!(%error, "consumer task failed"),
        Err(_) => tracing::warn!("consumer did not stop within 5 s"),
    }
    match delay.await {
        Ok(Err(error)) => tracing::warn!(%error, "delay line stopped with an error"),
        Err(error) => tracing::warn!(%error, "delay line task failed"),
        Ok(Ok(())) => {}
    }
    // Kafka clients first, then the cluster they talk to.
    drop(emitter);
    drop(kafka);
    Ok(DemoReport {
        ledger: ledger.report(),
        inline_projects,
        projects: plan.projects.len(),
        builds: plan.build_count(),
        inline_percent: options.inline_percent,
        consumer_lag_ms: options.consumer_lag.as_millis() as u64,
        seed: options.seed,
        receiver_failure_percent: options.receiver_failure_percent,
        ordering: options.ordering.to_string(),
        consumer_ordering_held: consumer_metrics.ordering("held"),
        consumer_ordering_queued: consumer_metrics.ordering("queued"),
        elapsed_ms: started.elapsed().as_millis() as u64,
        consumer_stale_renders: consumer_metrics.stale_renders(),
        delay_line_errors: delay_errors.load(Ordering::Relaxed),
        missing_sample,
    })
}

fn opt(v: Option<f64>, unit: &str) -> String {
    v.map_or_else(|| "-".to_owned(), |v| format!("{v:.1} {unit}"))
}

/// The report as a short table, for people.
pub fn table(r: &DemoReport) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "hookline demo: {} projects ({} inline), {} builds, consumer {} ms behind, seed {}, {:.1} s",
        r.projects,
        r.inline_projects,
        r.builds,
        r.consumer_lag_ms,
        r.seed,
        r.elapsed_ms as f64 / 1e3
    );
    let _ = writeln!(
        out,
        "ordering {}, receiver refuses {} % of first attempts ({} refused; {} deliveries held for a retry, {} events queued behind them)",
        r.ordering,
        r.receiver_failure_percent,
        r.ledger.receiver_failures,
        r.consumer_ordering_held,
        r.consumer_ordering_queued
    );
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "{:<9} {:>7} {:>10} {:>15} {:>11} {:>8} {:>10} {:>11} {:>10} {:>14} {:>12} {:>12}",
        "timing",
        "events",
        "deliveries",
        "stale",
        "wrong facts",
        "missing",
        "duplicates",
        "regressions",
        "final view",
        "render/event",
        "latency p50",
        "latency p99"
    );
    for (name, t) in [
        ("inline", &r.ledger.by_timing.inline),
        ("deferred", &r.ledger.by_timing.deferred),
    ]
    .into_iter()
    .chain(r.ledger.by_timing.unknown.as_ref().map(|u| ("unknown", u)))
    {
        let _ = writeln!(
            out,
            "{:<9} {:>7} {:>10} {:>15} {:>11} {:>8} {:>10} {:>11} {:>10} {:>14} {:>12} {:>12}",
            name,
            t.events,
            t.deliveries,
            format!("{} ({:.1} %)", t.stale, t.stale_pct),
            t.wrong_facts,
            t.missing,
            t.duplicates,
            t.regressions,
            format!("{} wrong", t.final_view_wrong),
            opt(t.render_us_mean, "us"),
            opt(t.latency_ms_p50, "ms"),
            opt(t.latency_ms_p99, "ms"),
        );
    }
    let _ = writeln!(out);
    let _ = writeln!(
        out,
        "total: {} events, {} deliveries, {} missing, {} duplicates, {} bad signatures, {} unexpected, {} refused",
        r.ledger.events,
        r.ledger.deliveries,
        r.ledger.missing,
        r.ledger.duplicates,
        r.ledger.bad_signatures,
        r.ledger.unexpected,
        r.ledger.refused
    );
    let _ = writeln!(
        out,
        "stale: the delivered body differs from the Job Hook rendered at the moment of the transition. \
         Deferred payloads are rendered by the consumer from the build's state when it gets to the event \
         ({} ms later here), so builds that moved on meanwhile show later data; inline payloads were \
         rendered by the producer at the transition. (The Job Hook it is compared with comes from the \
         same renderer, so this measures when a body was rendered.)",
        r.consumer_lag_ms
    );
    let _ = writeln!(
        out,
        "wrong facts: the delivered body contradicts its transition (status, times, durations, failure \
         reason, runner or pipeline status at that moment), checked field by field without the renderer."
    );
    let _ = writeln!(
        out,
        "regressions: (hook, build) pairs whose accepted deliveries did not arrive in transition order; \
         final view wrong: pairs whose last accepted body is not the truth of the build's last transition."
    );
    out
}

/// Whether the run kept hookline's promises: everything owed arrived, inline is never stale
/// (rendered at its transition) and never contradicts its transition (checked without the
/// renderer), every signature verified.
pub fn check(r: &DemoReport) -> Result<(), CliError> {
    let mut broken = Vec::new();
    if r.ledger.missing > 0 {
        broken.push(format!(
            "{} deliveries missing (e.g. {:?})",
            r.ledger.missing, r.missing_sample
        ));
    }
    if r.ledger.by_timing.inline.stale > 0 {
        broken.push(format!(
            "{} stale inline deliveries",
            r.ledger.by_timing.inline.stale
        ));
    }
    if r.ledger.by_timing.inline.wrong_facts > 0 {
        broken.push(format!(
            "{} inline deliveries contradict their transition",
            r.ledger.by_timing.inline.wrong_facts
        ));
    }
    if r.ledger.bad_signatures > 0 {
        broken.push(format!(
            "{} deliveries with bad signatures",
            r.ledger.bad_signatures
        ));
    }
    if r.ledger.refused > 0 {
        broken.push(format!(
            "{} transitions refused by the producer",
            r.ledger.refused
        ));
    }
    if broken.is_empty() {
        Ok(())
    } else {
        Err(CliError::Violated(broken.join("; ")))
    }
}
