//! Files that hold secrets (API tokens, the hook secrets' keys): who may read them, reading one
//! (or standard input) instead of taking a secret on the command line, and noticing a change
//! without a restart.
//!
//! - [`check_private`]: a file group or others may read is refused, as ssh refuses such a
//!   private key; `--allow-readable-secret-files` ([`ALLOW_READABLE_ENV`], [`allow_readable`])
//!   lifts that for containers, whose mounted secrets are often mode 0644 but visible only inside
//!   the container.
//! - [`read_secret`]: a secret from a file, or from standard input for `-`.
//! - [`watch`]: calls back when a file changes (modification time, size or inode: an editor's
//!   rename or a Kubernetes secret's symlink swap) or on SIGHUP.
//! - [`secret_on_command_line`]: the warning for a secret given as an argument, which every
//!   user of the machine can read in `/proc/<pid>/cmdline`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The environment variable of the services' `--allow-readable-secret-files` flag.
pub const ALLOW_READABLE_ENV: &str = "HOOKLINE_ALLOW_READABLE_SECRET_FILES";

static ALLOW_READABLE: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Accepts secret files group or others may read from now on (the process's
/// `--allow-readable-secret-files`, set once at start).
pub fn allow_readable(allow: bool) {
    ALLOW_READABLE.store(allow, std::sync::atomic::Ordering::Relaxed);
}

/// Whether secret files group or others may read are accepted.
pub fn readable_allowed() -> bool {
    ALLOW_READABLE.load(std::sync::atomic::Ordering::Relaxed)
}

/// Refuses a secret file that group or others may write, or (unless [`readable_allowed`]) read.
/// `what` names the option in the error (`--api-token-file`).
pub fn check_private(path: &Path, what: &str) -> Result<(), String> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(path)
            .map_err(|e| format!("{what}: {}: {e}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o022 != 0 {
            return Err(format!(
                "{what}: {} may be written by group or others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            ));
        }
        if mode & 0o044 != 0 && !readable_allowed() {
            return Err(format!(
                "{what}: {} may be read by group or others (mode {:o}); chmod 600 it (or, in a container whose mounted secrets only it sees, set {ALLOW_READABLE_ENV}=1)",
                path.display(),
                mode & 0o777
            ));
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
    Ok(())
}

/// A secret from `path`, or from standard input when `path` is `-`; surrounding whitespace
/// (the file's final newline) trimmed. A file is checked with [`check_private`] first.
pub fn read_secret(path: &Path, what: &str) -> Result<String, String> {
    let text = if path == Path::new("-") {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| format!("{what}: standard input: {e}"))?;
        text
    } else {
        check_private(path, what)?;
        std::fs::read_to_string(path).map_err(|e| format!("{what}: {}: {e}", path.display()))?
    };
    Ok(text.trim().to_owned())
}

/// The warning for a secret passed as a command-line argument.
pub fn secret_on_command_line(option: &str, instead: &str) -> String {
    format!(
        "{option} was given on the command line, where every user of this machine can read it (/proc/<pid>/cmdline, ps); use {instead} instead"
    )
}

/// Whether a librdkafka setting holds a secret (`sasl.password`, `ssl.key.password`,
/// `sasl.oauthbearer.client.secret`, `ssl.key.pem`, `sasl.jaas.config`, ...).
pub fn is_secret_kafka_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key == "ssl.key.pem"
        || key == "sasl.jaas.config"
        || key == "sasl.oauthbearer.config"
}

/// Kafka settings from a file, one `KEY=VALUE` a line (blank lines and `#` comments skipped),
/// checked with [`check_private`]: where secret settings belong instead of the command line.
pub fn kafka_options_file(path: &Path, what: &str) -> Result<Vec<(String, String)>, String> {
    check_private(path, what)?;
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("{what}: {}: {e}", path.display()))?;
    let mut options = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) if !k.trim().is_empty() => {
                options.push((k.trim().to_owned(), v.trim().to_owned()))
            }
            // The line number, never the line: it may be a secret.
            _ => {
                return Err(format!(
                    "{what}: {} line {}: expected KEY=VALUE",
                    path.display(),
                    n + 1
                ));
            }
        }
    }
    Ok(options)
}

/// Warns (through `tracing`) of every secret given as a command-line argument rather than
/// through the environment or a file, in `matches` and its subcommands: `secrets` lists clap ids
/// with the option's name and what to use instead; every `kafka_options` value whose key
/// [`is_secret_kafka_key`] is warned about too.
pub fn warn_of_secrets_on_command_line(matches: &clap::ArgMatches, secrets: &[(&str, &str, &str)]) {
    let from_argv = |id: &str| {
        matches.try_contains_id(id).unwrap_or(false)
            && matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine)
    };
    for (id, option, instead) in secrets {
        if from_argv(id) {
            tracing::warn!("{}", secret_on_command_line(option, instead));
        }
    }
    if from_argv("kafka_options")
        && let Ok(Some(options)) = matches.try_get_many::<(String, String)>("kafka_options")
    {
        for (key, _) in options.filter(|(k, _)| is_secret_kafka_key(k)) {
            tracing::warn!(
                "{}",
                secret_on_command_line(&format!("--kafka-option {key}=..."), "--kafka-option-file")
            );
        }
    }
    if let Some((_, sub)) = matches.subcommand() {
        warn_of_secrets_on_command_line(sub, secrets);
    }
}

/// What identifies a file's content cheaply.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<std::time::SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let meta = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: meta.modified().ok(),
        len: meta.len(),
        #[cfg(unix)]
        inode: std::os::unix::fs::MetadataExt::ino(&meta),
    })
}

/// Calls `reload` whenever `path` changes (looked at every `every`) or the process gets SIGHUP,
/// until `stop`. `reload` decides what to do with a file that is now broken (keep the old
/// secret and say so, typically).
pub fn watch(
    path: PathBuf,
    every: Duration,
    stop: CancellationToken,
    mut reload: impl FnMut() + Send + 'static,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut hangup =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let mut last = stamp(&path);
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            #[cfg(unix)]
            let hup = async {
                match hangup.as_mut() {
                    Some(signal) => signal.recv().await,
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let hup = std::future::pending::<Option<()>>();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = hup => {
                    last = stamp(&path);
                    reload();
                }
                _ = tick.tick() => {
                    let now = stamp(&path);
                    if now != last {
                        last = now;
                        reload();
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn file(mode: u32) -> PathBuf {
        let path = std::env::temp_dir().join(format!("hookline-secret-{}", uuid_like()));
        std::fs::write(&path, "s3cret\n").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        path
    }

    fn uuid_like() -> String {
        format!(
            "{}-{:?}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )
    }

    #[test]
    fn only_private_files_are_read() {
        let private = file(0o600);
        assert_eq!(read_secret(&private, "--x").unwrap(), "s3cret");
        for mode in [0o640, 0o644, 0o604, 0o620, 0o602] {
            let path = file(mode);
            let error = read_secret(&path, "--x").unwrap_err();
            assert!(
                error.contains("chmod 600") && error.contains("--x"),
                "{mode:o}: {error}"
            );
            assert!(!error.contains("s3cret"));
            std::fs::remove_file(path).unwrap();
        }
        std::fs::remove_file(private).unwrap();
    }

    #[test]
    fn kafka_secrets_are_recognised_and_read_from_a_private_file() {
        for key in [
            "sasl.password",
            "ssl.key.password",
            "ssl.keystore.password",
            "sasl.oauthbearer.client.secret",
            "ssl.key.pem",
            "sasl.jaas.config",
        ] {
            assert!(is_secret_kafka_key(key), "{key}");
        }
        for key in ["security.protocol", "sasl.username", "linger.ms"] {
            assert!(!is_secret_kafka_key(key), "{key}");
        }
        let path = file(0o600);
        std::fs::write(&path, "# SASL\nsasl.username=ci\nsasl.password = p=w\n\n").unwrap();
        assert_eq!(
            kafka_options_file(&path, "--kafka-option-file").unwrap(),
            [
                ("sasl.username".to_owned(), "ci".to_owned()),
                ("sasl.password".to_owned(), "p=w".to_owned())
            ]
        );
        std::fs::write(&path, "sasl.password\n").unwrap();
        let error = kafka_options_file(&path, "--kafka-option-file").unwrap_err();
        assert!(
            error.contains("line 1") && !error.contains("sasl.password"),
            "{error}"
        );
        std::fs::remove_file(path).unwrap();
    }

    #[tokio::test]
    async fn a_changed_file_is_noticed() {
        let path = file(0o600);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let watcher = watch(
            path.clone(),
            Duration::from_millis(20),
            stop.clone(),
            move || {
                let _ = tx.send(());
            },
        );
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert!(rx.try_recv().is_err(), "nothing changed yet");
        std::fs::write(&path, "another, longer secret\n").unwrap();
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("the change is noticed")
            .unwrap();
        stop.cancel();
        watcher.await.unwrap();
        std::fs::remove_file(path).unwrap();
    }
}
