//! `soak`: the driver `scripts/soak` runs (see `hookline_tests::soak`). It expects the broker and
//! the database to be running already and prints one JSON line on stdout; progress goes to
//! stderr. Exit status 0 when the run is ok, 1 when it is not (the line says why), 2 for bad
//! options.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use hookline_tests::soak::{self, Environment, Mode, SoakConfig};

#[derive(Parser, Debug)]
#[command(
    name = "soak",
    about = "hookline's soak: at-least-once, counted at scale"
)]
struct Options {
    /// About 10,000 transitions, 3 kills, a 10 s outage (instead of 100,000, 10, 30 s).
    #[arg(long)]
    quick: bool,
    /// Bootstrap servers of the soak's own broker.
    #[arg(long)]
    brokers: String,
    /// PostgreSQL URL of the soak's own database.
    #[arg(long)]
    database_url: String,
    /// Where hookline-producer and hookline-consumer are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Where the children's logs go.
    #[arg(long)]
    work_dir: PathBuf,
    /// scripts/kafka, run with HOOKLINE_CACHE=--kafka-cache (ports and run dir from the env).
    #[arg(long)]
    kafka_ctl: PathBuf,
    #[arg(long)]
    kafka_cache: PathBuf,
    /// scripts/pg, run with HOOKLINE_CACHE=--pg-cache (port from the env).
    #[arg(long)]
    pg_ctl: PathBuf,
    #[arg(long)]
    pg_cache: PathBuf,
    /// Seed of the chaos plan and the event ids [default: the clock].
    #[arg(long)]
    seed: Option<u64>,
    /// Override: transitions to post.
    #[arg(long)]
    transitions: Option<usize>,
    /// Override: seconds the feed is spread over.
    #[arg(long)]
    feed_secs: Option<u64>,
    /// Override: consumer kills.
    #[arg(long)]
    kills: Option<usize>,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let options = Options::parse();
    let seed = options.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_secs())
    });
    let mode = if options.quick {
        Mode::Quick
    } else {
        Mode::Full
    };
    let mut config = SoakConfig::for_mode(
        mode,
        seed,
        Environment {
            brokers: options.brokers,
            database_url: options.database_url,
            bin_dir: options.bin_dir,
            work_dir: options.work_dir,
            kafka_ctl: options.kafka_ctl,
            kafka_cache: options.kafka_cache,
            pg_ctl: options.pg_ctl,
            pg_cache: options.pg_cache,
        },
    );
    if let Some(n) = options.transitions {
        config.transitions = n;
    }
    if let Some(s) = options.feed_secs {
        config.post_for = Duration::from_secs(s);
    }
    if let Some(k) = options.kills {
        config.kills = k;
    }
    config.fit_batch();
    eprintln!(
        "soak: {:?}, seed {seed}, {} transitions over {:?}, {} kills, logs in {}",
        mode,
        config.transitions,
        config.post_for,
        config.kills,
        config.work_dir.display()
    );
    // A signal ends the run early; dropping it kills every child (they are kill-on-drop).
    let outcome = tokio::select! {
        outcome = soak::run(config) => outcome,
        _ = stop_signal() => {
            eprintln!("soak: interrupted; stopping the children");
            return std::process::ExitCode::from(130);
        }
    };
    match outcome {
        Ok(report) => {
            match serde_json::to_string(&report) {
                Ok(line) => println!("{line}"),
                Err(e) => {
                    eprintln!("soak: cannot encode the report: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            }
            for failure in &report.failures {
                eprintln!("soak: FAILED: {failure}");
            }
            if report.ok {
                std::process::ExitCode::SUCCESS
            } else {
                std::process::ExitCode::FAILURE
            }
        }
        // The run could not be played to the end: still one JSON line, saying why.
        Err(error) => {
            eprintln!("soak: error: {error:#}");
            let line = serde_json::json!({
                "soak": mode,
                "ok": false,
                "failures": [format!("{error:#}")],
                "seed": seed,
            });
            println!("{line}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn stop_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
