//! `hookline-producer`: parse options, set up logging, run the command.

use clap::{Parser, Subcommand};
use hookline_producer::bench::{self, BenchArgs};
use hookline_producer::feature::{self, FeatureArgs};
use hookline_producer::{ServeConfig, serve};
use tokio_util::sync::CancellationToken;

/// Turns CI build transitions into BuildEvents on Kafka, rendering the Job Hook inline when the
/// `execute_build_hooks_inline` flag is on for the build's project.
#[derive(Parser, Debug)]
#[command(name = "hookline-producer", version, about)]
struct Cli {
    /// Log format: text or json.
    #[arg(
        long,
        env = "HOOKLINE_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serves the ingestion API (POST /v1/transitions, /v1/transitions/batch), /metrics,
    /// /healthz and /readyz until Ctrl-C or SIGTERM.
    Serve(Box<ServeConfig>),
    /// Shows and changes rollout flags.
    Feature(FeatureArgs),
    /// Measures the render cost per event and events/s with the flag off and on.
    Bench(BenchArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Errors end in one line for a person, not anyhow's debug form (which prints a backtrace
    // whenever RUST_BACKTRACE is set in the environment).
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match cli.command {
        Command::Serve(config) => {
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            serve(*config, shutdown).await?;
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

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = match tokio::signal::unix::signal(
            tokio::signal::unix::SignalKind::terminate(),
        ) {
            Ok(term) => term,
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops the producer");
                let _ = ctrl_c.await;
                shutdown.cancel();
                return;
            }
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown requested");
    shutdown.cancel();
}
