//! Two workloads the way a user meets them, rather than the friendly case:
//!
//! - `real_backlog`: a backlog written the way production writes it, through
//!   `hookline-producer serve` (`POST /v1/transitions` from a CI system's 16 workers, the flag
//!   on, so every event is inline), one transition per request: the producer's records sit in
//!   small, poorly compressed batches, unlike the bulk-produced records of `consumer`. hookline
//!   drains it against the bare loop on the same records; CPU seconds per 10,000 deliveries of
//!   both are reported beside the rates.
//! - `isolation`: one project's hook answers after 8 s (slow, never failing) with 1,000 of its
//!   events waiting when the consumer starts; twelve other projects' hooks answer at once under
//!   an open load of 500 events/s. The figure is the others' latency (scheduled moment to
//!   arrival) and how many of their events never arrived: one slow receiver must not slow
//!   anyone else.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::StreamExt;
use hdrhistogram::Histogram;
use hookline_schemas::BuildStatus;
use rdkafka::producer::FutureRecord;

use super::consumer::{Fleet, bare_loop, produce_all, producer, wait_for};
use super::producer::{cpu_seconds, post_all, set_flag, spawn, wait_ready};
use super::receiver::{BenchReceiver, rate};
use super::{Bench, progress, stop};
use crate::free_port;

/// One drain of the real backlog by each side.
#[derive(Debug, Clone, Copy)]
pub struct BacklogRun {
    pub hookline_per_s: f64,
    pub bare_per_s: f64,
    pub hookline_cpu_s_per_10k: f64,
    pub bare_cpu_s_per_10k: f64,
}

/// Writes `events` transitions over `projects` projects of `builds` builds each through
/// `hookline-producer serve`, then drains them `runs` times with hookline and with the bare loop.
pub async fn real_backlog(
    bench: &Bench,
    receiver: &BenchReceiver,
    projects: usize,
    builds: usize,
    events: usize,
    runs: usize,
) -> anyhow::Result<Vec<BacklogRun>> {
    let urls = vec![receiver.url.as_str(); projects];
    let fleet = Fleet::projects(4, &urls, builds).await;
    let ids: Vec<i64> = fleet.builds.iter().map(|b| b.build.id).collect();
    set_flag(bench, &fleet.schema, true).await?;
    let port = free_port();
    let mut child = spawn(bench, &fleet, port)?;
    let http = reqwest::Client::new();
    wait_ready(
        &http,
        &format!("http://127.0.0.1:{port}/readyz"),
        &mut child,
    )
    .await?;
    post_all(
        &http,
        &format!("http://127.0.0.1:{port}/v1/transitions"),
        &ids,
        events,
        true,
        "real backlog: writing through the producer",
    )
    .await?;
    stop(child).await;

    let me = std::process::id();
    let mut out = Vec::new();
    for _ in 0..runs {
        receiver.clear();
        let own_before = cpu_seconds(me)?;
        let child = fleet.spawn_consumer(bench);
        let pid = child.id().context("consumer pid")?;
        let before = cpu_seconds(pid)?;
        wait_for(receiver, events, Duration::from_secs(60))
            .await
            .context("hookline drain of the real backlog")?;
        let hookline_cpu = cpu_seconds(pid)? - before;
        // This process only received during hookline's drain: its CPU per request is the
        // receiver's share, taken off the bare loop's (which runs in this process too).
        let receiver_cpu_per_request = (cpu_seconds(me)? - own_before) / events as f64;
        let hookline_per_s = rate(&receiver.since(0));
        stop(child).await;

        receiver.clear();
        let own_before = cpu_seconds(me)?;
        bare_loop(
            &fleet.world.brokers,
            &fleet.world.topic,
            &receiver.url,
            events,
        )
        .await?;
        let bare_cpu =
            (cpu_seconds(me)? - own_before - receiver_cpu_per_request * events as f64).max(0.0);
        let bare_per_s = rate(&receiver.since(0));
        let per_10k = |cpu: f64| cpu * 10_000.0 / events as f64;
        out.push(BacklogRun {
            hookline_per_s,
            bare_per_s,
            hookline_cpu_s_per_10k: per_10k(hookline_cpu),
            bare_cpu_s_per_10k: per_10k(bare_cpu),
        });
    }
    receiver.clear();
    Ok(out)
}

/// The others' side of one isolation run.
#[derive(Debug, Clone)]
pub struct Isolation {
    pub slow_events: usize,
    pub slow_answered: usize,
    pub others_sent: usize,
    pub others_missing: usize,
    pub others_p50_ms: f64,
    pub others_p99_ms: f64,
    pub others_max_ms: f64,
}

/// How long the slow hook takes to answer (inside the default 10 s delivery timeout, so it
/// never counts as a failure).
pub const SLOW_ANSWER: Duration = Duration::from_secs(8);
/// The slow project's events waiting when the consumer starts.
pub const SLOW_BACKLOG: usize = 1_000;
/// Projects whose hooks answer at once.
pub const OTHERS: usize = 12;
/// The open load on the other projects, events per second.
pub const OTHERS_RATE: u64 = 500;

/// One project's hook answers after [`SLOW_ANSWER`] with [`SLOW_BACKLOG`] events waiting; the
/// other projects get [`OTHERS_RATE`] events/s for `secs` seconds. The others' events that have
/// not arrived 10 s after the feed ended count as missing.
pub async fn isolation(
    bench: &Bench,
    receiver: &BenchReceiver,
    secs: u64,
) -> anyhow::Result<Isolation> {
    let slow_url = receiver.slow_url(SLOW_ANSWER);
    let mut urls = vec![slow_url.as_str()];
    urls.extend(std::iter::repeat_n(receiver.url.as_str(), OTHERS));
    // 50 builds per project: the slow project's backlog spans many builds, as a busy project's
    // would, and the others' events spread over every partition.
    let fleet = Fleet::projects(4, &urls, 50).await;
    let projects = urls.len();
    let slow_builds: Vec<_> = fleet.builds.iter().step_by(projects).cloned().collect();
    let other_builds: Vec<_> = fleet
        .builds
        .iter()
        .enumerate()
        .filter(|(i, _)| i % projects != 0)
        .map(|(_, b)| b.clone())
        .collect();
    let codec = hookline_schemas::Codec::embedded();
    let encode = |b: &hookline_cistate::RenderSnapshot, status| {
        let event = crate::world::inline_event(b, status);
        let bytes = codec.encode(&event).expect("encode");
        (event.build_id.to_string(), event.event_id, bytes)
    };
    let producer = producer(&fleet.world.brokers);
    // The slow project's backlog: its builds' transitions in order, round after round.
    let statuses = [
        BuildStatus::Created,
        BuildStatus::Pending,
        BuildStatus::Running,
        BuildStatus::Success,
    ];
    let slow: Vec<_> = (0..SLOW_BACKLOG)
        .map(|i| {
            let b = &slow_builds[i % slow_builds.len()];
            encode(b, statuses[(i / slow_builds.len()) % statuses.len()])
        })
        .collect();
    produce_all(
        &producer,
        &fleet.world.topic,
        slow.into_iter().map(|(k, _, b)| (k, b)),
    )
    .await?;

    receiver.clear();
    let child = fleet.spawn_consumer(bench);
    // The consumer is running and busy with the slow hook before the others' load starts.
    let started = Instant::now();
    while receiver.slow_count() == 0 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    if receiver.slow_count() == 0 {
        bail!("isolation: the slow hook got no answer within a minute");
    }

    let total = (OTHERS_RATE * secs) as usize;
    let bar = progress(total as u64, "isolation: the others' load");
    let start = Instant::now();
    let mut due = HashMap::with_capacity(total);
    let mut acks = futures::stream::FuturesUnordered::new();
    for i in 0..total {
        let b = &other_builds[i % other_builds.len()];
        let status = statuses[(i / other_builds.len()) % statuses.len()];
        let (key, id, bytes) = encode(b, status);
        let at = start + Duration::from_nanos(i as u64 * 1_000_000_000 / OTHERS_RATE);
        if at > Instant::now() {
            tokio::time::sleep_until(at.into()).await;
        }
        due.insert(id, at);
        match producer.send_result(
            FutureRecord::to(&fleet.world.topic)
                .key(&key)
                .payload(&bytes),
        ) {
            Ok(ack) => acks.push(ack),
            Err((e, _)) => bail!("isolation: produce: {e}"),
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
    let _ = wait_for(receiver, total, Duration::from_secs(10)).await;
    let arrivals = receiver.since(0);
    let slow_answered = receiver.slow_count();
    stop(child).await;
    receiver.clear();

    let mut histogram = Histogram::<u64>::new_with_bounds(1, 600_000_000, 3)?;
    let mut arrived = std::collections::HashSet::new();
    for a in &arrivals {
        if let Some((id, at)) = a.event.and_then(|e| due.get_key_value(&e))
            && arrived.insert(*id)
        {
            let latency = a.at.saturating_duration_since(*at);
            histogram.saturating_record((latency.as_micros() as u64).max(1));
        }
    }
    let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1_000.0;
    Ok(Isolation {
        slow_events: SLOW_BACKLOG,
        slow_answered,
        others_sent: total,
        others_missing: total - arrived.len(),
        others_p50_ms: ms(0.5),
        others_p99_ms: ms(0.99),
        others_max_ms: histogram.max() as f64 / 1_000.0,
    })
}
