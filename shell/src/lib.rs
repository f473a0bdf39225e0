//! What every hookline binary (`hookline`, `hookline-producer`, `hookline-consumer`) does the
//! same way, written once.
//!
//! # Layout
//!
//! - [`parse_duration`], [`parse_key_value`]: the option values every binary reads (so
//!   `HOOKLINE_DELIVERY_TIMEOUT=10` means the same to both services);
//!   [`refuse_fixed_kafka_options`]: the pass-through Kafka settings a binary does not let through.
//! - [`LogArgs`], [`init_tracing`]: `--log-format text|json` and the `RUST_LOG` filter.
//! - [`kafka_log`]: librdkafka's logs and error events, transient transport failures at WARN
//!   and rate-limited, ERROR kept for what needs a person.
//! - [`secret_file`]: secret files (private, re-read on change or SIGHUP) and secrets kept off
//!   the command line. [`ready_cache`]: a readiness answer reused for a moment.
//! - [`shutdown_signal`], [`cancel_on_signal`]: Ctrl-C or SIGTERM.
//! - [`exit_code`]: an error as one line for a person, and the exit status.
//! - [`server`]: the one bounded HTTP/1.1 server under every listener (connection cap, time to
//!   the first byte, head, body and idle timeouts), and its options ([`server::ListenerArgs`]).
//! - [`supervise`]: the tasks a service cannot run without; the first that dies stops the
//!   service with an error (a non-zero exit), and `/readyz` says so meanwhile.

pub mod kafka_log;
pub mod ready_cache;
pub mod secret_file;
pub mod server;
pub mod supervise;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// A duration: a number and a unit (`250ms`, `5s`, `2m`, `1h`, `7d`), or a bare number of
/// seconds (`10`); decimals are allowed (`1.5s`).
pub fn parse_duration(input: &str) -> Result<Duration, String> {
    let s = input.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("invalid duration {s:?}: expected e.g. 250ms, 5s, 2m, 1h, 7d or 10")
    })?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        _ => {
            return Err(format!(
                "invalid duration unit in {s:?}: use ms, s, m, h or d"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("invalid duration {s:?}: {e}"))
}

/// A pass-through setting `KEY=VALUE` (a librdkafka option); the key is trimmed and must not be
/// empty, the value is kept as given.
pub fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!(
            "invalid option {s:?}: expected KEY=VALUE, e.g. security.protocol=SASL_SSL"
        )),
    }
}

/// Refuses a pass-through Kafka option that would change a setting the binary's guarantees rest
/// on (`fixed`: the librdkafka keys, aliases included). Such a setting is also applied after the
/// pass-through, so it would be ignored anyway: refusing says so instead of silently dropping
/// what the operator asked for.
pub fn refuse_fixed_kafka_options(
    options: &[(String, String)],
    fixed: &[(&str, &str)],
) -> Result<(), String> {
    for (key, value) in options {
        if let Some((_, why)) = fixed.iter().find(|(k, _)| k == key) {
            return Err(format!(
                "--kafka-option {key}={value} is refused: hookline sets {key} itself ({why})"
            ));
        }
    }
    Ok(())
}

/// How log lines are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// One readable line per event.
    Text,
    /// JSON lines, for a log pipeline.
    Json,
}

/// `--log-format`, the same option (and variable) for every binary and subcommand.
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log format: text or json (JSON lines).
    #[arg(
        long,
        env = "HOOKLINE_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,
}

/// Logs to stderr in `format`, filtered by `RUST_LOG` or else by `default_filter`. Text is
/// coloured only on a terminal (and never with `NO_COLOR` set): colour codes in a file or a log
/// pipeline are noise that breaks searching for `ERROR`.
pub fn init_tracing(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let colour = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// Returns on Ctrl-C or SIGTERM (on Ctrl-C only, with a warning, where SIGTERM cannot be
/// listened for).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only Ctrl-C stops this process");
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Cancels `token` on Ctrl-C or SIGTERM, from a task of its own.
pub fn cancel_on_signal(token: CancellationToken) {
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutdown requested; draining");
        token.cancel();
    });
}

/// The exit status of a run, printing its error as one line for a person: `error: <what>: <why>`,
/// not anyhow's debug form (which prints a backtrace whenever `RUST_BACKTRACE` is set).
pub fn exit_code(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// A progress bar of `len` steps on stderr when stderr is a terminal; hidden (every call a no-op)
/// when it is not, so logs and CI output stay free of redraws.
pub fn progress_bar(len: u64, label: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:>28} [{bar:30}] {pos}/{len} {per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_message(label.to_owned());
    bar
}

/// A counter with no known end (transitions sent, say) on stderr when stderr is a terminal;
/// hidden when it is not.
pub fn progress_counter(label: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    bar.set_style(
        indicatif::ProgressStyle::with_template("{spinner} {prefix}: {pos} {per_sec} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
    );
    bar.set_prefix(label.to_owned());
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// What [`progress_bar`] and [`progress_counter`] return.
pub use indicatif::ProgressBar;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_or_bare_seconds() {
        let secs = Duration::from_secs;
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(secs(5)));
        assert_eq!(parse_duration("2m"), Ok(secs(120)));
        assert_eq!(parse_duration("1h"), Ok(secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(secs(7 * 86400)));
        assert_eq!(parse_duration("10"), Ok(secs(10)));
        assert_eq!(parse_duration(" 1.5s "), Ok(Duration::from_millis(1500)));
        for bad in ["soon", "5y", "", "s", "-1s", "1e400"] {
            assert!(parse_duration(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn options_need_a_key_and_keep_the_value() {
        assert_eq!(
            parse_key_value("linger.ms=5"),
            Ok(("linger.ms".into(), "5".into()))
        );
        assert_eq!(
            parse_key_value(" sasl.password =a=b "),
            Ok(("sasl.password".into(), "a=b ".into()))
        );
        assert!(parse_key_value("linger.ms").is_err());
        assert!(parse_key_value("=5").is_err());
    }
}
