//! The `hookline` binary: parse options, set up logging, run a command.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use hookline::CliError;
use hookline::demo::{self, DemoOptions};
use hookline::experiment::{self, ExperimentOptions};
use hookline::receiver::{self, SampleConfig};
use hookline::simulate::{self, SimulateOptions};
use tokio_util::sync::CancellationToken;

/// hookline turns CI job transitions into GitLab-compatible Job Hook webhooks through Kafka.
#[derive(Debug, Parser)]
#[command(name = "hookline", version, about)]
struct Cli {
    #[command(flatten)]
    log: hookline_shell::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the whole pipeline in this process (no services needed) and show how many delivered
    /// payloads were stale under each payload timing.
    Demo(DemoArgs),
    /// Run the demo over a grid of consumer lags and inline percentages (one seed) and draw the
    /// rollout chart: stale deliveries against lag, and the producer's render cost.
    Experiment(ExperimentArgs),
    /// Feed a simulated CI to a running producer (HTTP API), writing its state to PostgreSQL.
    Simulate(SimulateArgs),
    /// A sample webhook receiver: logs every delivery and checks its signature.
    Receiver(ReceiverArgs),
}

#[derive(Debug, Args)]
#[command(after_help = "\
Everything runs in this process: librdkafka's mock cluster as the broker, the in-memory CI store, \
in-memory flags, the real producer and consumer, and a receiver on 127.0.0.1 that compares every \
delivered body with the Job Hook rendered at the moment of its transition (the truth). A \
delivery is stale when the bodies differ.

Progress goes to stderr; the report (a table, or one JSON object with --json) to stdout. The exit \
status is 0 when every owed delivery arrived, no inline delivery was stale and every signature \
verified; 1 otherwise (the report is printed either way); 2 for bad options.")]
struct DemoArgs {
    /// Projects in the simulated CI (each gets one webhook).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    projects: u32,
    /// Builds in total (retries and skipped builds included).
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    builds: u32,
    /// Percentage of projects whose Job Hooks are rendered inline by the producer: the rollout
    /// flag's percentage-of-actors gate (GitLab's CRC-32 bucketing of `Project:<id>`), 0 to 100,
    /// up to three decimals. The other projects get deferred rendering.
    #[arg(long, default_value_t = 50.0, value_parser = parse_percent)]
    inline_percent: f64,
    /// How far the consumer trails the producer, in milliseconds. The producer writes to
    /// `build-events.incoming`; a delay line in the demo copies each record to `build-events`
    /// (the consumer's topic) once the record is this old, keeping keys, bytes and order per
    /// partition. So every event reaches the consumer about this long after it was emitted, like
    /// a hook queue that is this far behind. Builds live tens to hundreds of milliseconds, so a
    /// lag of a second or more lets deferred renders see builds that have moved on.
    #[arg(long, default_value_t = 1500, value_parser = clap::value_parser!(u64).range(0..=600_000))]
    consumer_lag_ms: u64,
    /// Seed of the simulated CI: the same seed gives the same projects, builds, outcomes and timings.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the report as one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Seconds to wait for the last deliveries after the simulation ends (on top of the lag);
    /// what has not arrived by then is reported missing.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=3600))]
    wait_secs: u64,
    /// No progress lines on stderr.
    #[arg(long, short)]
    quiet: bool,
    /// Percentage of first delivery attempts the receiver answers 500 (picked by the seed; never
    /// more than two in a row to one hook, below the consumer's auto-disable threshold), 0 to
    /// 100. They are retried on the demo's short schedule (1 s, 2 s, 4 s).
    #[arg(long, default_value_t = 0.0, value_parser = parse_percent)]
    receiver_failure_percent: f64,
    /// The consumer's per-(hook, build) order across retries: strict (a build's later events
    /// wait behind its delivery waiting for a retry) or relaxed (they go ahead).
    #[arg(long, default_value = "strict")]
    ordering: hookline_consumer::config::Ordering,
}

#[derive(Debug, Args)]
struct SimulateArgs {
    /// PostgreSQL URL of the CI state store the producer and consumer read.
    #[arg(long, env = "HOOKLINE_DATABASE_URL")]
    database_url: String,
    /// PostgreSQL schema (default: the connection's search path).
    #[arg(long, env = "HOOKLINE_DATABASE_SCHEMA")]
    database_schema: Option<String>,
    /// How transitions leave the simulated CI: `http` commits the state and then POSTs the
    /// transition to the producer; `outbox` writes it into the outbox table in the same
    /// transaction as the state change (published by `hookline-producer relay`).
    #[arg(long, env = "HOOKLINE_SIM_VIA", value_enum, default_value = "http")]
    via: simulate::Via,
    /// Base URL of a running producer (`hookline-producer serve`); required with `--via http`.
    #[arg(long, env = "HOOKLINE_PRODUCER_URL")]
    producer_url: Option<String>,
    /// Bearer token for the producer's API (one line of its --api-token-file); omit only for a
    /// producer serving with --no-auth.
    #[arg(long, env = "HOOKLINE_API_TOKEN", hide_env_values = true)]
    api_token: Option<String>,
    /// File holding the token instead (the producer's --api-token-file: its first token is sent).
    #[arg(long, env = "HOOKLINE_API_TOKEN_FILE", conflicts_with = "api_token")]
    api_token_file: Option<std::path::PathBuf>,
    /// Base URL of the webhook receiver; each project's hook is `<URL>/projects/<id>`.
    #[arg(long, env = "HOOKLINE_RECEIVER_URL")]
    receiver_url: String,
    /// Standard Webhooks secret (`whsec_<base64>`) given to every hook.
    #[arg(long, env = "HOOKLINE_SIGNING_SECRET")]
    signing_secret: Option<String>,
    #[arg(long, env = "HOOKLINE_SIM_PROJECTS", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    projects: u32,
    /// Builds in total (retries and skipped builds included).
    #[arg(long, env = "HOOKLINE_SIM_BUILDS", default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    builds: u32,
    /// Transitions per second at most; 0 = as fast as the producer accepts them.
    #[arg(long, env = "HOOKLINE_SIM_RATE", default_value_t = 0.0, value_parser = parse_rate)]
    rate: f64,
    #[arg(long, env = "HOOKLINE_SIM_SEED", default_value_t = 1)]
    seed: u64,
    /// Added to every id the simulator creates, so runs with different bases do not overwrite
    /// each other's builds.
    #[arg(long, env = "HOOKLINE_SIM_ID_BASE", default_value_t = 0)]
    id_base: i64,
    /// Seconds to keep retrying one transition (503s as told by Retry-After, connection errors).
    #[arg(long, default_value_t = 120)]
    retry_secs: u64,
    /// Only the summary, not one line per transition.
    #[arg(long, short)]
    quiet: bool,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
#[command(after_help = "\
Each point of the grid is one `hookline demo` run (same projects, builds and seed; see `hookline \
demo --help`). Writes <OUT>/rollout.svg (the chart) and <OUT>/rollout.json (every point's \
figures) and prints one line per point. The default grid is 25 demo runs: a few minutes.")]
struct ExperimentArgs {
    /// Where the chart and the figures go.
    #[arg(long, default_value = "docs")]
    out: std::path::PathBuf,
    /// Consumer lags to run, in milliseconds.
    #[arg(long, value_delimiter = ',', default_value = "0,100,500,1500,5000")]
    lags_ms: Vec<u64>,
    /// Inline percentages (of projects) to run.
    #[arg(long, value_delimiter = ',', default_value = "0,25,50,75,100", value_parser = parse_percent)]
    inline_percents: Vec<f64>,
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    projects: u32,
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    builds: u32,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Args)]
struct ReceiverArgs {
    /// Address to listen on.
    #[arg(long, env = "HOOKLINE_LISTEN", default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// Standard Webhooks secret (`whsec_<base64>`): deliveries whose signature does not verify
    /// are answered 401 and logged (the consumer treats a 401 as final and dead-letters it).
    #[arg(long, env = "HOOKLINE_SIGNING_SECRET")]
    secret: Option<String>,
    /// The listener's limits: connections, time to first byte, head, body and idle timeouts.
    #[command(flatten)]
    listener: hookline_shell::server::ListenerArgs,
}

fn parse_percent(s: &str) -> Result<f64, String> {
    let p: f64 = s
        .trim()
        .trim_end_matches('%')
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !(0.0..=100.0).contains(&p) {
        return Err(format!("{p} is not a percentage: use 0 to 100"));
    }
    Ok(p)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let r: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number"))?;
    if !r.is_finite() || r < 0.0 {
        return Err(format!(
            "{r} is not a rate: use 0 (unpaced) or more transitions per second"
        ));
    }
    Ok(r)
}

fn fail(error: &CliError) -> ExitCode {
    eprintln!("hookline: {error}");
    match error {
        CliError::Usage(_) => ExitCode::from(2),
        _ => ExitCode::FAILURE,
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo(args) => {
            // librdkafka's mock cluster logs connection churn at warn; the demo's own progress
            // lines say what matters.
            hookline_shell::init_tracing(cli.log.log_format, "error");
            let options = DemoOptions {
                projects: args.projects as usize,
                builds: args.builds as usize,
                inline_percent: args.inline_percent,
                consumer_lag: Duration::from_millis(args.consumer_lag_ms),
                seed: args.seed,
                wait: Duration::from_secs(args.wait_secs),
                progress: !args.quiet,
                receiver_failure_percent: args.receiver_failure_percent,
                ordering: args.ordering,
            };
            let report = tokio::select! {
                r = demo::run(options) => r,
                _ = hookline_shell::shutdown_signal() => {
                    eprintln!("hookline: interrupted");
                    return ExitCode::from(130);
                }
            };
            let report = match report {
                Ok(r) => r,
                Err(e) => return fail(&e),
            };
            if args.json {
                match serde_json::to_string(&report) {
                    Ok(s) => println!("{s}"),
                    Err(e) => return fail(&CliError::Internal(e.to_string())),
                }
            } else {
                print!("{}", demo::table(&report));
            }
            match demo::check(&report) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
        Command::Experiment(args) => {
            hookline_shell::init_tracing(cli.log.log_format, "error");
            let options = ExperimentOptions {
                lags: args
                    .lags_ms
                    .iter()
                    .map(|&ms| Duration::from_millis(ms))
                    .collect(),
                inline_percents: args.inline_percents,
                projects: args.projects as usize,
                builds: args.builds as usize,
                seed: args.seed,
                out: args.out,
            };
            let report = tokio::select! {
                r = experiment::run(&options) => r,
                _ = hookline_shell::shutdown_signal() => {
                    eprintln!("hookline: interrupted");
                    return ExitCode::from(130);
                }
            };
            match report {
                Ok(report) => {
                    for p in &report.points {
                        println!(
                            "lag {:>5} ms  inline {:>5.1} %  stale {:>6.2} % ({}/{})  render {:.2} us/event  missing {}",
                            p.consumer_lag_ms,
                            p.inline_percent,
                            p.stale_pct,
                            p.stale,
                            p.deliveries,
                            p.render_us_per_event,
                            p.missing
                        );
                    }
                    println!(
                        "chart: {}\nfigures: {}",
                        report.svg.display(),
                        report.json.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&e),
            }
        }
        Command::Simulate(args) => {
            hookline_shell::init_tracing(cli.log.log_format, "warn");
            let json = args.json;
            let api_token = match (&args.api_token, &args.api_token_file) {
                (_, Some(path)) => match simulate::first_token(path) {
                    Ok(token) => Some(token),
                    Err(e) => return fail(&e),
                },
                (token, None) => token.clone(),
            };
            let options = SimulateOptions {
                database_url: args.database_url,
                database_schema: args.database_schema,
                via: args.via,
                producer_url: args.producer_url.unwrap_or_default(),
                api_token,
                receiver_url: args.receiver_url,
                signing_secret: args.signing_secret,
                projects: args.projects as usize,
                builds: args.builds as usize,
                rate: args.rate,
                seed: args.seed,
                id_base: args.id_base,
                retry_for: Duration::from_secs(args.retry_secs),
                verbose: !args.quiet,
            };
            let report = tokio::select! {
                r = simulate::run(options) => r,
                _ = hookline_shell::shutdown_signal() => {
                    eprintln!("hookline: interrupted");
                    return ExitCode::from(130);
                }
            };
            match report {
                Ok(r) => {
                    if json {
                        println!("{}", serde_json::to_string(&r).unwrap_or_default());
                    } else {
                        println!(
                            "simulate: {} transitions sent, {} accepted, {} failed ({} builds in {} projects, {:.1} s); by status: {:?}",
                            r.sent,
                            r.accepted,
                            r.failed,
                            r.builds,
                            r.projects,
                            r.elapsed_ms as f64 / 1e3,
                            r.by_status
                        );
                    }
                    if r.failed > 0 {
                        ExitCode::FAILURE
                    } else {
                        ExitCode::SUCCESS
                    }
                }
                Err(e) => fail(&e),
            }
        }
        Command::Receiver(args) => {
            hookline_shell::init_tracing(cli.log.log_format, "info");
            let shutdown = CancellationToken::new();
            hookline_shell::cancel_on_signal(shutdown.clone());
            let limits = match args.listener.limits() {
                Ok(limits) => limits,
                Err(e) => return fail(&CliError::Usage(e)),
            };
            match receiver::run_sample(
                SampleConfig {
                    listen: args.listen,
                    secret: args.secret,
                    limits,
                },
                shutdown,
            )
            .await
            {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => fail(&e),
            }
        }
    }
}
