//! `hookline-producer bench`: the two costs operators weigh before a rollout, in one run.
//!
//! 1. Render cost per event: the inline render of the sample build, timed one by one, median
//!    and p99 in microseconds (no I/O: the snapshot is in memory).
//! 2. Events/s with the flag off, then on, against a real broker: the same transitions through
//!    the same [`Emitter`] (in-memory CI store, a fresh topic), each awaited until acknowledged.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use hookline_cistate::fixtures::{sample, write_snapshot};
use hookline_cistate::{CiStore, MemoryStore, Transition};
use hookline_schemas::BuildStatus;

use crate::emit::{Emitter, EmitterConfig, TransitionRequest};
use crate::error::ProducerError;
use crate::flags::{Change, Flags, INLINE_FLAG};
use crate::metrics::ProducerMetrics;
use crate::render;

#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    /// Kafka bootstrap servers to measure against.
    #[arg(long, env = "HOOKLINE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Extra librdkafka settings, KEY=VALUE.
    #[arg(long = "kafka-option", value_delimiter = ',', value_parser = hookline_shell::parse_key_value)]
    pub kafka_options: Vec<(String, String)>,
    /// Events emitted with the flag off, and again with it on.
    #[arg(long, default_value_t = 20_000)]
    pub events: usize,
    /// Renders timed for the render cost.
    #[arg(long, default_value_t = 20_000)]
    pub renders: usize,
    /// Transitions in flight at once (callers waiting for their ack).
    #[arg(long, default_value_t = 256)]
    pub concurrency: usize,
    /// Partitions of the bench topic (created as `hookline-bench-<random>`).
    #[arg(long, default_value_t = 3)]
    pub partitions: i32,
}

/// Events/s of one run.
#[derive(Debug, Clone)]
pub struct Throughput {
    pub events: usize,
    pub failed: usize,
    pub elapsed: Duration,
}

impl Throughput {
    pub fn per_second(&self) -> f64 {
        self.events as f64 / self.elapsed.as_secs_f64().max(f64::EPSILON)
    }
}

#[derive(Debug, Clone)]
pub struct BenchReport {
    pub render_median_us: f64,
    pub render_p99_us: f64,
    pub payload_bytes: usize,
    pub flag_off: Throughput,
    pub flag_on: Throughput,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "render: median {:.1} µs, p99 {:.1} µs per event ({} byte payload)",
            self.render_median_us, self.render_p99_us, self.payload_bytes
        )?;
        for (name, t) in [
            ("flag off (deferred)", &self.flag_off),
            ("flag on (inline)", &self.flag_on),
        ] {
            writeln!(
                f,
                "emit, {name}: {} events in {:.2} s = {:.0} events/s ({} failed)",
                t.events,
                t.elapsed.as_secs_f64(),
                t.per_second(),
                t.failed
            )?;
        }
        Ok(())
    }
}

/// Median and 99th percentile of the inline render of the sample build, in µs.
pub fn render_cost(renders: usize) -> (f64, f64, usize) {
    let snapshot = sample(0);
    let transition = Transition::of_current(&snapshot.build).unwrap_or(Transition {
        status: BuildStatus::Running,
        facts: Default::default(),
    });
    let mut bytes = 0;
    let mut samples: Vec<f64> = (0..renders.max(1))
        .map(|_| {
            let rendered = render::inline(&snapshot, &transition);
            bytes = rendered.payload.len();
            rendered.took.as_secs_f64() * 1e6
        })
        .collect();
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.99), bytes)
}

pub async fn run(args: &BenchArgs) -> Result<BenchReport, ProducerError> {
    let (render_median_us, render_p99_us, payload_bytes) = render_cost(args.renders);

    let store = MemoryStore::new();
    let mut builds = Vec::new();
    for i in 0..64 {
        let snapshot = sample(i * 1_000_000);
        write_snapshot(&store, &snapshot).await?;
        builds.push(snapshot.build.id);
    }
    let store: Arc<dyn CiStore> = Arc::new(store);
    let flags = Flags::in_memory();
    let mut config = EmitterConfig::new(&args.brokers);
    config.topic = format!(
        "hookline-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    config.kafka = args.kafka_options.clone();
    config.create_topic_partitions = Some(args.partitions);
    let emitter = Emitter::new(
        config,
        store,
        flags.clone(),
        Arc::new(ProducerMetrics::new()),
    )
    .await?;

    // Warm up: connections, metadata, producer id.
    measure(&emitter, &builds, 200, args.concurrency).await;
    let flag_off = measure(&emitter, &builds, args.events, args.concurrency).await;
    flags
        .set(INLINE_FLAG, "bench", Change::Boolean(true))
        .await?;
    let flag_on = measure(&emitter, &builds, args.events, args.concurrency).await;
    Ok(BenchReport {
        render_median_us,
        render_p99_us,
        payload_bytes,
        flag_off,
        flag_on,
    })
}

async fn measure(
    emitter: &Emitter,
    builds: &[i64],
    events: usize,
    concurrency: usize,
) -> Throughput {
    let started = Instant::now();
    let statuses = [
        BuildStatus::Pending,
        BuildStatus::Running,
        BuildStatus::Success,
    ];
    let failed = futures::stream::iter(0..events)
        .map(|i| {
            emitter.emit(TransitionRequest::new(
                builds[i % builds.len()],
                statuses[i % statuses.len()],
            ))
        })
        .buffer_unordered(concurrency.max(1))
        .filter(|r| futures::future::ready(r.is_err()))
        .count()
        .await;
    Throughput {
        events: events - failed,
        failed,
        elapsed: started.elapsed(),
    }
}
