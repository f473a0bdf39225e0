//! The benchmark behind `scripts/bench` (binary `bench`): every speed and memory figure hookline
//! publishes, measured against the real broker, the real database and a receiver on loopback,
//! each throughput against a baseline measured in the same run (this machine is shared and
//! noisy, so ratios are what compare across runs).
//!
//! - `consumer.many_builds` / `consumer.hot_builds`: `hookline-consumer serve` draining a backlog
//!   of inline events against a bare consume-and-POST loop on the same records and receiver.
//! - `latency.<rate>`: an open load at a fixed schedule, scheduled moment to arrival.
//! - `delivery_log`: the same drain of 30,000 events with `--delivery-log on` and `off`,
//!   alternating, and their ratio (the log's throughput cost); and the database's CPU per 1,000
//!   log rows, compressed with lz4 and with pglz.
//! - `consumer.real_backlog`: a backlog written through `hookline-producer serve` one
//!   transition at a time (20 projects), drained by hookline and by the bare loop, with CPU
//!   seconds per 10,000 deliveries of each (see `backlog`).
//! - `isolation`: one hook answering after 8 s with 1,000 events waiting beside twelve fast
//!   hooks under 500 events/s: the fast hooks' latency and missing events.
//! - `memory`: the consumer's peak RSS while draining a small and a large backlog.
//! - `producer`: CPU per event of `hookline-producer serve` through `POST /v1/transitions` with
//!   the flag off and on, and PostgreSQL's CPU per event beside it.
//! - `relay`: `hookline-producer relay` from COMMIT to the event read from Kafka under an open
//!   load, and its rate draining a backlog ([`relay`]).
//!
//! Nothing here asserts a timing: a benchmark reports, the reader judges.

pub mod backlog;
pub mod consumer;
pub mod producer;
pub mod receiver;
pub mod relay;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::{Value, json};
use tokio::process::Child;

use receiver::BenchReceiver;

/// Where the binaries are and where logs go, and how much to measure.
#[derive(Debug, Clone)]
pub struct Bench {
    pub bin_dir: PathBuf,
    pub work_dir: PathBuf,
    pub sizes: Sizes,
    /// Measure only these parts (`consumer`, `delivery_log`, `latency`, `memory`, `producer`,
    /// `relay`);
    /// all when empty.
    pub only: Vec<String>,
    /// More `hookline-consumer serve` options for every consumer the bench starts (to measure
    /// a setting against the defaults).
    pub consumer_args: Vec<String>,
}

impl Bench {
    fn runs(&self, part: &str) -> bool {
        self.only.is_empty() || self.only.iter().any(|p| p == part)
    }
}

/// How much each measurement does.
#[derive(Debug, Clone)]
pub struct Sizes {
    /// Events per throughput workload, and runs of each (the ratio is their median).
    pub throughput_events: usize,
    pub runs: usize,
    /// Seconds of open load at each rate.
    pub latency_secs: u64,
    pub rates: Vec<u64>,
    /// The two backlogs whose peak RSS is compared.
    pub backlogs: [usize; 2],
    /// Transitions posted per producer run.
    pub producer_events: usize,
    /// Events of the real backlog (20 projects, written through the producer).
    pub real_backlog_events: usize,
    /// Seconds of the others' open load in the isolation run.
    pub isolation_secs: u64,
    /// The outbox relay's load, backlog and runs.
    pub relay: relay::RelaySizes,
}

impl Sizes {
    pub fn full() -> Sizes {
        Sizes {
            throughput_events: 10_000,
            runs: 3,
            latency_secs: 30,
            rates: vec![500, 2_000, 8_000],
            backlogs: [10_000, 1_000_000],
            producer_events: 20_000,
            real_backlog_events: 20_000,
            isolation_secs: 30,
            relay: relay::RelaySizes::full(),
        }
    }

    /// Under 3 minutes: every measurement, smaller.
    pub fn quick() -> Sizes {
        Sizes {
            throughput_events: 4_000,
            runs: 1,
            latency_secs: 5,
            rates: vec![500, 2_000, 8_000],
            backlogs: [10_000, 100_000],
            producer_events: 3_000,
            real_backlog_events: 6_000,
            isolation_secs: 10,
            relay: relay::RelaySizes::quick(),
        }
    }
}

/// A progress bar on stderr when it is a terminal.
pub use hookline_shell::progress_bar as progress;

/// SIGTERM (the drain), SIGKILL after 30 s.
pub(crate) async fn stop(mut child: Child) {
    crate::soak::services::terminate(&mut child, Duration::from_secs(30)).await;
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    match xs.len() {
        0 => 0.0,
        n if n % 2 == 1 => xs[n / 2],
        n => (xs[n / 2 - 1] + xs[n / 2]) / 2.0,
    }
}

fn round(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    (x * f).round() / f
}

fn label(n: usize) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}m", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// Projects of the real backlog (each with one hook).
const REAL_BACKLOG_PROJECTS: usize = 20;

/// The backlog the delivery log's cost is measured on.
const DELIVERY_LOG_EVENTS: usize = 30_000;

/// Runs every measurement and returns the report (see the module docs for its keys).
pub async fn run(bench: &Bench) -> anyhow::Result<Value> {
    let s = &bench.sizes;
    let receiver = BenchReceiver::start().await?;
    let mut report = json!({
        "settings": {
            "throughput_events": s.throughput_events,
            "runs": s.runs,
            "latency_secs": s.latency_secs,
            "compression": "zstd",
            "consumer": "hookline-consumer serve, default settings",
            "bare_concurrency": 256,
            "cores": std::thread::available_parallelism().map_or(0, |n| n.get()),
        }
    });

    let workloads = [
        ("many_builds", s.throughput_events / 2),
        ("hot_builds", 100),
    ];
    for (name, builds) in workloads.into_iter().filter(|_| bench.runs("consumer")) {
        eprintln!(
            "bench: consumer throughput, {name} ({} events over {builds} builds)",
            s.throughput_events
        );
        let runs =
            consumer::throughput(bench, &receiver, s.throughput_events, builds, s.runs).await?;
        let ratios: Vec<f64> = runs
            .iter()
            .map(|r| r.hookline_per_s / r.bare_per_s)
            .collect();
        report["consumer"][name] = json!({
            "events": s.throughput_events,
            "builds": builds,
            "hookline_per_s": round(median(runs.iter().map(|r| r.hookline_per_s).collect()), 0),
            "bare_per_s": round(median(runs.iter().map(|r| r.bare_per_s).collect()), 0),
            "ratio": round(median(ratios.clone()), 3),
            "ratios": ratios.iter().map(|r| round(*r, 3)).collect::<Vec<_>>(),
        });
    }

    if bench.runs("real_backlog") {
        let (projects, events) = (REAL_BACKLOG_PROJECTS, s.real_backlog_events);
        // About 3.5 transitions per build, as the simulated CI writes them.
        let builds = (events * 2 / 7 / projects).max(1);
        eprintln!(
            "bench: real backlog, {events} events over {projects} projects x {builds} builds through hookline-producer serve, {} runs",
            s.runs
        );
        let runs =
            backlog::real_backlog(bench, &receiver, projects, builds, events, s.runs).await?;
        let ratios: Vec<f64> = runs
            .iter()
            .map(|r| r.hookline_per_s / r.bare_per_s)
            .collect();
        report["consumer"]["real_backlog"] = json!({
            "events": events,
            "projects": projects,
            "builds": builds * projects,
            "hookline_per_s": round(median(runs.iter().map(|r| r.hookline_per_s).collect()), 0),
            "bare_per_s": round(median(runs.iter().map(|r| r.bare_per_s).collect()), 0),
            "ratio": round(median(ratios.clone()), 3),
            "ratios": ratios.iter().map(|r| round(*r, 3)).collect::<Vec<_>>(),
            "hookline_cpu_s_per_10k": round(median(runs.iter().map(|r| r.hookline_cpu_s_per_10k).collect()), 2),
            "bare_cpu_s_per_10k": round(median(runs.iter().map(|r| r.bare_cpu_s_per_10k).collect()), 2),
        });
    }

    if bench.runs("isolation") {
        eprintln!(
            "bench: isolation, one hook answering after {:?} with {} events waiting, {} fast hooks at {}/s for {} s",
            backlog::SLOW_ANSWER,
            backlog::SLOW_BACKLOG,
            backlog::OTHERS,
            backlog::OTHERS_RATE,
            s.isolation_secs
        );
        let i = backlog::isolation(bench, &receiver, s.isolation_secs).await?;
        report["isolation"] = json!({
            "slow_answer_s": backlog::SLOW_ANSWER.as_secs(),
            "slow_events": i.slow_events,
            "slow_answered": i.slow_answered,
            "others_rate": backlog::OTHERS_RATE,
            "others_sent": i.others_sent,
            "others_missing": i.others_missing,
            "others_p50_ms": round(i.others_p50_ms, 2),
            "others_p99_ms": round(i.others_p99_ms, 2),
            "others_max_ms": round(i.others_max_ms, 2),
        });
    }

    if bench.runs("delivery_log") {
        // Twice the runs of a throughput workload (at least four), so each side goes first as
        // often as the other and one disturbed run does not decide the median.
        let runs = (s.runs * 2).max(4);
        // The same backlog in both modes, three times the full throughput workload's: a drain of
        // a few seconds on each side, so a hiccup of the shared machine moves the ratio less
        // (a drain of 10,000 lasts about 1.3 s here, and its single ratios ranged 0.6 to 1.0).
        let events = DELIVERY_LOG_EVENTS;
        let builds = events / 2;
        eprintln!(
            "bench: delivery log cost, {events} events over {builds} builds, {runs} runs alternating on and off"
        );
        let (costs, sample) =
            consumer::delivery_log_cost(bench, &receiver, events, builds, runs).await?;
        let ratios: Vec<f64> = costs.iter().map(|c| c.on_per_s / c.off_per_s).collect();
        let ratio = median(ratios.clone());
        report["delivery_log"] = json!({
            "events": events,
            "builds": builds,
            "on_per_s": round(median(costs.iter().map(|c| c.on_per_s).collect()), 0),
            "off_per_s": round(median(costs.iter().map(|c| c.off_per_s).collect()), 0),
            "ratio": round(ratio, 3),
            "ratios": ratios.iter().map(|r| round(*r, 3)).collect::<Vec<_>>(),
            "cost_pct": round((1.0 - ratio) * 100.0, 1),
            "rows_logged": costs.iter().map(|c| c.rows_logged).collect::<Vec<_>>(),
        });
        // A run that logged fewer rows than it delivered did less work than its "off" twin:
        // its ratio flatters the log. Flagged in the report and the table, not hidden.
        let short: Vec<i64> = costs
            .iter()
            .map(|c| c.rows_logged)
            .filter(|&rows| rows < events as i64)
            .collect();
        report["delivery_log"]["rows_short"] = json!(!short.is_empty());
        if !short.is_empty() {
            eprintln!(
                "bench: WARNING: delivery log runs logged fewer rows than the {events} events delivered ({short:?}): the on/off ratio is not comparable"
            );
        }
        let sample = sample.context("the drains with the log on logged no row")?;
        eprintln!("bench: delivery log, the database's CPU per 1,000 rows with lz4 and pglz");
        for (method, ms) in consumer::delivery_log_server_cost(&sample, runs).await? {
            report["delivery_log"]["server_cpu_ms_per_1k_rows"][method] = json!(round(ms, 1));
        }
        eprintln!(
            "bench: delivery log on/off throughput ratio {:.3} (median of {runs})",
            ratio
        );
    }

    for &rate in s.rates.iter().filter(|_| bench.runs("latency")) {
        eprintln!("bench: latency at {rate} events/s for {} s", s.latency_secs);
        let l = consumer::latency(bench, &receiver, rate, s.latency_secs).await?;
        report["latency"][rate.to_string()] = json!({
            "p50_ms": round(l.p50_ms, 2),
            "p99_ms": round(l.p99_ms, 2),
            "p999_ms": round(l.p999_ms, 2),
            "max_ms": round(l.max_ms, 2),
            "sent": l.sent,
            "delivered": l.delivered,
            "sustained": l.sustained(),
        });
    }

    let mut rss = Vec::new();
    for backlog in s.backlogs.into_iter().filter(|_| bench.runs("memory")) {
        eprintln!("bench: consumer memory draining a backlog of {backlog}");
        let mb = consumer::backlog_rss(bench, &receiver, backlog).await?;
        report["memory"][format!("backlog_{}_rss_mb", label(backlog))] = json!(round(mb, 1));
        rss.push(mb);
    }
    if let [small, large] = rss[..] {
        report["memory"]["ratio"] = json!(round(large / small, 3));
    }
    if bench.runs("relay") {
        report["relay"] = relay::measure(bench, &s.relay).await?;
    }
    if !bench.runs("producer") {
        return Ok(report);
    }
    eprintln!(
        "bench: producer cost, {} transitions flag off then on",
        s.producer_events
    );
    let (deferred, inline) = producer::cost(bench, &receiver, s.producer_events).await?;
    // PostgreSQL's CPU beside the producer's: inline rendering reads a snapshot per event there.
    let pg = |r: &producer::ProducerRun| r.pg_cpu_us_per_event.map(|c| round(c, 1));
    let with_pg = |r: &producer::ProducerRun| r.pg_cpu_us_per_event.map(|c| c + r.cpu_us_per_event);
    report["producer"] = json!({
        "events": s.producer_events,
        "inline_cpu_us_per_event": round(inline.cpu_us_per_event, 1),
        "deferred_cpu_us_per_event": round(deferred.cpu_us_per_event, 1),
        "cpu_ratio": round(inline.cpu_us_per_event / deferred.cpu_us_per_event, 3),
        "inline_pg_cpu_us_per_event": pg(&inline),
        "deferred_pg_cpu_us_per_event": pg(&deferred),
        "cpu_ratio_with_pg": with_pg(&inline)
            .zip(with_pg(&deferred))
            .map(|(i, d)| round(i / d, 3)),
        "inline_per_s": round(inline.per_s, 0),
        "deferred_per_s": round(deferred.per_s, 0),
        "render_us_p50": round(inline.render_us_p50, 1),
        "payload_bytes_mean": round(inline.payload_bytes_mean, 0),
    });
    Ok(report)
}

/// The report as a table for people.
pub fn table(report: &Value) -> String {
    let mut out = String::new();
    let mut row = |k: &str, v: String| out.push_str(&format!("{k:<44} {v}\n"));
    for name in ["many_builds", "hot_builds", "real_backlog"] {
        let c = &report["consumer"][name];
        if c.is_null() {
            continue;
        }
        row(
            &format!(
                "consumer {name} ({} events, {} builds)",
                c["events"], c["builds"]
            ),
            format!(
                "hookline {}/s, bare {}/s, ratio {} (runs {})",
                c["hookline_per_s"], c["bare_per_s"], c["ratio"], c["ratios"]
            ),
        );
    }
    let rb = &report["consumer"]["real_backlog"];
    if !rb.is_null() {
        row(
            "real backlog CPU s per 10k (hookline / bare)",
            format!(
                "{} / {}",
                rb["hookline_cpu_s_per_10k"], rb["bare_cpu_s_per_10k"]
            ),
        );
    }
    let iso = &report["isolation"];
    if !iso.is_null() {
        row(
            &format!(
                "isolation (1 hook at {} s, {} others at {}/s)",
                iso["slow_answer_s"], 12, iso["others_rate"]
            ),
            format!(
                "others p50 {} ms, p99 {} ms, max {} ms, missing {}/{}; slow answered {}",
                iso["others_p50_ms"],
                iso["others_p99_ms"],
                iso["others_max_ms"],
                iso["others_missing"],
                iso["others_sent"],
                iso["slow_answered"]
            ),
        );
    }
    let log = &report["delivery_log"];
    if !log.is_null() {
        row(
            &format!("delivery log on/off ({} events)", log["events"]),
            format!(
                "{}/s / {}/s, ratio {} (runs {}){}",
                log["on_per_s"],
                log["off_per_s"],
                log["ratio"],
                log["ratios"],
                if log["rows_short"] == true {
                    format!(
                        "; ROWS LOGGED SHORT of {} events: {}, not comparable",
                        log["events"], log["rows_logged"]
                    )
                } else {
                    String::new()
                }
            ),
        );
        let cpu = &log["server_cpu_ms_per_1k_rows"];
        row(
            "delivery log database CPU per 1,000 rows",
            format!("lz4 {} ms, pglz {} ms", cpu["lz4"], cpu["pglz"]),
        );
    }
    if let Some(rates) = report["latency"].as_object() {
        let mut rates: Vec<_> = rates.iter().collect();
        rates.sort_by_key(|(rate, _)| rate.parse::<u64>().unwrap_or(0));
        for (rate, l) in rates {
            row(
                &format!("latency at {rate}/s"),
                format!(
                    "p50 {} ms, p99 {} ms, p99.9 {} ms, max {} ms, {}/{} delivered{}",
                    l["p50_ms"],
                    l["p99_ms"],
                    l["p999_ms"],
                    l["max_ms"],
                    l["delivered"],
                    l["sent"],
                    if l["sustained"] == true {
                        ""
                    } else {
                        " (NOT sustained)"
                    }
                ),
            );
        }
    }
    relay::table(report, &mut row);
    if let Some(memory) = report["memory"].as_object() {
        for (k, v) in memory {
            row(&format!("memory {k}"), v.to_string());
        }
    }
    let p = &report["producer"];
    if p.is_null() {
        return out;
    }
    row(
        "producer CPU per event (inline / deferred)",
        format!(
            "{} us / {} us, ratio {}",
            p["inline_cpu_us_per_event"], p["deferred_cpu_us_per_event"], p["cpu_ratio"]
        ),
    );
    row(
        "PostgreSQL CPU per event (inline / deferred)",
        format!(
            "{} us / {} us; producer + PostgreSQL ratio {}",
            p["inline_pg_cpu_us_per_event"],
            p["deferred_pg_cpu_us_per_event"],
            p["cpu_ratio_with_pg"]
        ),
    );
    row(
        "producer events/s (inline / deferred)",
        format!("{} / {}", p["inline_per_s"], p["deferred_per_s"]),
    );
    row(
        "producer render p50, payload mean",
        format!(
            "{} us, {} bytes",
            p["render_us_p50"], p["payload_bytes_mean"]
        ),
    );
    out
}
