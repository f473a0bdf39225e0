//! `bench`: the driver `scripts/bench` runs (see `hookline_tests::bench`). It expects the broker
//! and the database to be running (`HOOKLINE_TEST_KAFKA`, `HOOKLINE_TEST_DATABASE_URL`), prints
//! a table on stdout (progress on stderr), and with `--json FILE` writes the report to FILE.
//! Exit status 0 when every measurement ran, 1 when one failed, 2 for bad options.

use std::path::PathBuf;

use clap::Parser;
use hookline_tests::bench::{self, Bench, Sizes};

#[derive(Parser, Debug)]
#[command(
    name = "bench",
    about = "hookline's benchmark: every published figure, in one run"
)]
struct Options {
    /// A smaller version of every measurement (under 4 minutes).
    #[arg(long)]
    quick: bool,
    /// Also write the report as one JSON object to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Where hookline-producer and hookline-consumer are.
    #[arg(long, default_value = "target/release")]
    bin_dir: PathBuf,
    /// Measure only these parts (comma-separated): consumer, real_backlog, isolation,
    /// delivery_log, latency, memory, producer, relay.
    #[arg(long, value_delimiter = ',', value_parser = ["consumer", "real_backlog", "isolation", "delivery_log", "latency", "memory", "producer", "relay"])]
    only: Vec<String>,
    /// One more option for every `hookline-consumer serve` the bench starts (repeatable), e.g.
    /// `--consumer-arg=--commit-interval=1s`: a setting measured against the defaults.
    #[arg(long = "consumer-arg", allow_hyphen_values = true)]
    consumer_args: Vec<String>,
    /// Where the children's logs go.
    #[arg(long, default_value = "target/bench")]
    work_dir: PathBuf,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let options = Options::parse();
    let bench = Bench {
        bin_dir: options.bin_dir,
        work_dir: options.work_dir,
        only: options.only,
        consumer_args: options.consumer_args,
        sizes: if options.quick {
            Sizes::quick()
        } else {
            Sizes::full()
        },
    };
    if let Err(error) = std::fs::create_dir_all(&bench.work_dir) {
        eprintln!("bench: cannot create {}: {error}", bench.work_dir.display());
        return std::process::ExitCode::from(2);
    }
    let mut report = match bench::run(&bench).await {
        Ok(report) => report,
        Err(error) => {
            eprintln!("bench: failed: {error:#}");
            return std::process::ExitCode::FAILURE;
        }
    };
    report["mode"] = if options.quick { "quick" } else { "full" }.into();
    report["date"] = chrono::Utc::now().to_rfc3339().into();
    print!("{}", bench::table(&report));
    if let Some(path) = options.json {
        let text = serde_json::to_string_pretty(&report).unwrap_or_default();
        if let Err(error) = std::fs::write(&path, text + "\n") {
            eprintln!("bench: cannot write {}: {error}", path.display());
            return std::process::ExitCode::FAILURE;
        }
    }
    std::process::ExitCode::SUCCESS
}
