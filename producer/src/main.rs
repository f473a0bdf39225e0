//! `hookline-producer`: parse options, set up logging, run the command.

use clap::{CommandFactory, FromArgMatches, Subcommand};
use hookline_producer::bench::{self, BenchArgs};
use hookline_producer::feature::{self, FeatureArgs};
use hookline_producer::relay::{self, RelayConfig};
use hookline_producer::{ServeConfig, serve};
use hookline_shell::{LogArgs, cancel_on_signal, exit_code, init_tracing};
use tokio_util::sync::CancellationToken;

/// Turns CI build transitions into BuildEvents on Kafka, rendering the Job Hook inline when the
/// `execute_build_hooks_inline` flag is on for the build's project.
#[derive(clap::Parser, Debug)]
#[command(name = "hookline-producer", version, about)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serves the ingestion API (POST /v1/transitions, /v1/transitions/batch), /metrics,
    /// /healthz and /readyz until Ctrl-C or SIGTERM.
    Serve(Box<ServeConfig>),
    /// Publishes the transactional outbox (table hookline_outbox) to Kafka, serving /metrics,
    /// /healthz and /readyz, until Ctrl-C or SIGTERM.
    Relay(Box<RelayConfig>),
    /// Shows and changes rollout flags.
    Feature(FeatureArgs),
    /// Measures the render cost per event and events/s with the flag off and on.
    Bench(BenchArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Errors end in one line for a person, not anyhow's debug form (which prints a backtrace
    // whenever RUST_BACKTRACE is set in the environment).
    exit_code(run().await)
}

async fn run() -> anyhow::Result<()> {
    let matches = Cli::command().get_matches();
    let cli = Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    init_tracing(cli.log.log_format, "info");
    // `/proc/<pid>/cmdline` shows arguments to every user of the machine.
    hookline_shell::secret_file::warn_of_secrets_on_command_line(&matches, &[]);
    match cli.command {
        Command::Serve(mut config) => {
            config.kafka.load_option_file()?;
            let shutdown = CancellationToken::new();
            cancel_on_signal(shutdown.clone());
            serve(*config, shutdown).await?;
        }
        Command::Relay(mut config) => {
            config.kafka.load_option_file()?;
            let shutdown = CancellationToken::new();
            cancel_on_signal(shutdown.clone());
            relay::relay(*config, shutdown).await?;
        }
        Command::Feature(args) => {
            print!("{}", feature::run(&args).await?);
        }
        Command::Bench(args) => {
            print!("{}", bench::run(&args).await?);
        }
    }
    Ok(())
}
