//! `hookline-consumer`: serve, manage hooks, inspect and replay dead letters.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use hookline_cistate::api_tokens::{self, TokenScope};
use hookline_cistate::delivery_log::{self, DeliveryLogQuery};
use hookline_cistate::{CiStore, PgStore, SecretKeys};
use hookline_consumer::api::AdminToken;
use hookline_consumer::config::{ConsumerConfig, RateLimitConfig};
use hookline_consumer::dead_letter::{self, DeadLetterKind, ReplayFilter};
use hookline_consumer::deliver::{AttemptOutcome, DeliverConfig, Deliverer};
use hookline_consumer::hook_admin::{self, HookAdmin, HookSpec};
use hookline_consumer::hook_ops;
use hookline_consumer::hooks::masked_url;
use hookline_consumer::schedule::{DEFAULT_RETRY_SCHEDULE, RetrySchedule};
use hookline_consumer::server::{ServeConfig, check_secrets, open_pg, open_store_sealed};
use hookline_shell::secret_file::{kafka_options_file, read_secret, secret_on_command_line};
use hookline_shell::server::ListenerArgs;
use hookline_shell::{
    LogArgs, cancel_on_signal, exit_code, init_tracing, parse_duration, parse_key_value,
};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "hookline-consumer",
    version,
    about = "Delivers GitLab-compatible Job Hooks for BuildEvents, at least once"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Consume BuildEvents and deliver Job Hooks; serve /metrics, /healthz, /readyz and, with
    /// --admin-token-file, the hooks API.
    Serve(Box<ServeArgs>),
    /// Manage project webhooks.
    #[command(subcommand)]
    Hooks(HooksCommand),
    /// Inspect and re-drive the dead-letter topic.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Per-root-namespace rate limits, over `serve --rate-limit-per-minute`.
    #[command(subcommand)]
    RateLimits(RateLimitsCommand),
    /// Hook secrets at rest: make a key, see how values are stored, re-seal them all.
    #[command(subcommand)]
    Secrets(SecretsCommand),
    /// The hooks API's tokens scoped to one project or one root namespace (the admin token is
    /// the operator's and sees every project).
    #[command(subcommand)]
    Tokens(TokensCommand),
}

#[derive(Args, Clone)]
struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "HOOKLINE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    brokers: String,
    /// Consumer group of the main topic (the retry worker uses `<group>.retry`).
    #[arg(long, env = "HOOKLINE_GROUP_ID", default_value = "hookline-consumer")]
    group_id: String,
    /// Topic of BuildEvents.
    #[arg(long, env = "HOOKLINE_TOPIC", default_value = "build-events")]
    topic: String,
    /// Retry topic [default: <topic>.retry].
    #[arg(long, env = "HOOKLINE_RETRY_TOPIC")]
    retry_topic: Option<String>,
    /// Dead-letter topic [default: <topic>.dlq].
    #[arg(long, env = "HOOKLINE_DLQ_TOPIC")]
    dlq_topic: Option<String>,
    /// librdkafka setting passed through, KEY=VALUE (repeatable; comma-separated in the env var),
    /// e.g. security.protocol=SASL_SSL. Secrets (sasl.password, ...) belong in
    /// --kafka-option-file: the command line is readable by every user of the machine.
    #[arg(long = "kafka-option", env = "HOOKLINE_KAFKA_OPTIONS", value_delimiter = ',', value_parser = parse_key_value)]
    kafka_options: Vec<(String, String)>,
    /// A file of librdkafka settings, KEY=VALUE a line (only its owner may read it): where
    /// secret settings such as sasl.password go. --kafka-option settings come after it.
    #[arg(long, env = "HOOKLINE_KAFKA_OPTION_FILE")]
    kafka_option_file: Option<PathBuf>,
}

#[derive(Args)]
struct ServeArgs {
    #[command(flatten)]
    kafka: KafkaArgs,
    /// CI state store: a PostgreSQL URL, or `memory`.
    #[arg(long, env = "HOOKLINE_DATABASE_URL")]
    database_url: String,
    /// PostgreSQL schema of the store [default: public].
    #[arg(long, env = "HOOKLINE_DATABASE_SCHEMA")]
    database_schema: Option<String>,
    /// A file holding the hooks API's admin token, an operator credential that sees every
    /// project (trimmed; at least 32 bytes; refused if group or others may read it; re-read when
    /// it changes or on SIGHUP). Without it the API under /api/v4 is not served.
    #[arg(long, env = "HOOKLINE_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// Accept token and key files that group or others may read (by default refused, as ssh
    /// refuses such a key): for containers, whose mounted secrets are often mode 0644 but seen
    /// only inside the container.
    #[arg(long, env = "HOOKLINE_ALLOW_READABLE_SECRET_FILES")]
    allow_readable_secret_files: bool,
    /// A file of keys that seal hook URLs, tokens and signing secrets at rest (`<id> <base64 of
    /// 32 bytes>` a line, the first sealing; see `secrets new-key`). Without it they are stored
    /// in plaintext.
    #[arg(long, env = "HOOKLINE_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
    /// Address of /metrics, /healthz, /readyz, /openapi.json and the hooks API.
    #[arg(long, env = "HOOKLINE_LISTEN", default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// The listener's limits: connections, time to first byte, head, body and idle timeouts.
    #[command(flatten)]
    listener: ListenerArgs,
    /// Largest event a producer writes, in bytes: set it as the producers' --max-event-bytes
    /// (the same HOOKLINE_MAX_EVENT_BYTES). The Avro decoder allocates no more than this for a
    /// field a record claims; a record claiming more is dead-lettered as `field_too_large`.
    #[arg(long, env = "HOOKLINE_MAX_EVENT_BYTES", default_value_t = hookline_schemas::codec::DEFAULT_MAX_EVENT_BYTES)]
    max_event_bytes: usize,
    /// Base URL of a Confluent-compatible schema registry to fetch writer schemas from by id
    /// [default: the embedded registry, ids in schemas/avro/manifest.json].
    #[arg(long, env = "HOOKLINE_SCHEMA_REGISTRY_URL")]
    schema_registry_url: Option<String>,
    /// Records per path being worked on or finished but not yet committed (backpressure; bounds
    /// re-deliveries after a crash), and deliveries in flight at once, every hook together.
    #[arg(long, env = "HOOKLINE_MAX_IN_FLIGHT", default_value_t = 256)]
    max_in_flight: usize,
    /// Deliveries in flight at once to one hook: a slow receiver holds this many and no more.
    #[arg(long, env = "HOOKLINE_HOOK_IN_FLIGHT", default_value_t = hookline_consumer::config::DEFAULT_HOOK_IN_FLIGHT)]
    hook_in_flight: usize,
    /// Deliveries in flight at once to one receiver (scheme, host and port), whatever the hooks
    /// pointing at it.
    #[arg(long, env = "HOOKLINE_HOST_IN_FLIGHT", default_value_t = hookline_consumer::config::DEFAULT_HOST_IN_FLIGHT)]
    host_in_flight: usize,
    /// The longest a delivery waits (or would wait, judging by the hook's answer times) for its
    /// hook's slot before it is handed on to the retry topic, due when the hook can take it.
    #[arg(long, env = "HOOKLINE_HOOK_WAIT", default_value = "1s", value_parser = parse_duration)]
    hook_wait: Duration,
    /// Records per poll batch (one snapshot query per batch).
    #[arg(long, env = "HOOKLINE_POLL_BATCH", default_value_t = 128)]
    poll_batch: usize,
    /// Delays between attempts, comma-separated (e.g. 10ms,20ms).
    #[arg(
        long,
        env = "HOOKLINE_RETRY_SCHEDULE",
        default_value = DEFAULT_RETRY_SCHEDULE
    )]
    retry_schedule: RetrySchedule,
    /// Longest a retry record is held in memory before it is re-queued.
    #[arg(long, env = "HOOKLINE_RETRY_HOLD", default_value = "30s", value_parser = parse_duration)]
    retry_hold: Duration,
    /// Per-(hook, build) order across retries: strict (later events of a build wait behind its
    /// delivery waiting for a retry) or relaxed (they go ahead).
    #[arg(long, env = "HOOKLINE_ORDERING", default_value = "strict")]
    ordering: hookline_consumer::config::Ordering,
    #[command(flatten)]
    deliver: DeliverArgs,
    /// The delivery log (one row per attempt, in PostgreSQL): on or off. With the in-memory
    /// store there is none.
    #[arg(long, env = "HOOKLINE_DELIVERY_LOG", default_value = "on")]
    delivery_log: Switch,
    /// Most bytes of log rows held in memory waiting to be written (e.g. 32MiB); rows past it are
    /// dropped and counted, as when the row bound is reached.
    #[arg(long, env = "HOOKLINE_DELIVERY_LOG_BUFFER_BYTES", default_value = "32MiB", value_parser = parse_bytes)]
    delivery_log_buffer_bytes: usize,
    /// How long the delivery log keeps rows (whole days: daily partitions are dropped).
    #[arg(long, env = "HOOKLINE_DELIVERY_LOG_RETENTION", default_value = "14d", value_parser = parse_duration)]
    delivery_log_retention: Duration,
    /// How long a project's hook list is cached.
    #[arg(long, env = "HOOKLINE_HOOK_CACHE_TTL", default_value = "5s", value_parser = parse_duration)]
    hook_cache_ttl: Duration,
    /// How often offsets are committed; 0 commits as records finish, one commit at a time
    /// (after a crash at most --max-in-flight records per path are delivered again). A longer
    /// interval trades more re-deliveries after a crash for fewer commits.
    #[arg(long, env = "HOOKLINE_COMMIT_INTERVAL", default_value = "0s", value_parser = parse_duration)]
    commit_interval: Duration,
    /// On shutdown, how long in-flight work may take to finish.
    #[arg(long, env = "HOOKLINE_DRAIN_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// A stable identity for this instance (Kafka static membership): a restarted instance with
    /// the same id takes its partitions back at once instead of waiting out the session timeout.
    /// Set it where instances have stable names (a StatefulSet pod, a systemd unit); never give
    /// two running instances the same id.
    #[arg(long, env = "HOOKLINE_INSTANCE_ID")]
    instance_id: Option<String>,
    /// How long the group waits for an instance that stopped heartbeating before its partitions
    /// go to others.
    #[arg(long, env = "HOOKLINE_SESSION_TIMEOUT", default_value = "15s", value_parser = parse_duration)]
    session_timeout: Duration,
    /// Do not create the retry and dead-letter topics at start; they must exist.
    #[arg(long, env = "HOOKLINE_NO_CREATE_TOPICS")]
    no_create_topics: bool,
    /// Partitions of the retry and dead-letter topics when the consumer creates them (default:
    /// as many as the main topic).
    #[arg(long, env = "HOOKLINE_RETRY_PARTITIONS")]
    retry_partitions: Option<i32>,
    /// Deliveries per minute per root namespace without an override (`rate-limits set`); the
    /// excess is deferred to the retry topic, never dropped [default: no limit].
    #[arg(long, env = "HOOKLINE_RATE_LIMIT_PER_MINUTE", value_parser = clap::value_parser!(u32).range(1..))]
    rate_limit_per_minute: Option<u32>,
    /// How much time's worth of tokens a namespace's bucket holds: what a quiet namespace may
    /// send at once (the default lets a minute's allowance out at once, like GitLab's window).
    #[arg(long, env = "HOOKLINE_RATE_LIMIT_BURST", default_value = "60s", value_parser = parse_duration)]
    rate_limit_burst: Duration,
}

/// The HTTP stage's options, shared by `serve` and `hooks test`.
#[derive(Args)]
struct DeliverArgs {
    /// Whole-request timeout of one delivery.
    #[arg(long, env = "HOOKLINE_DELIVERY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    delivery_timeout: Duration,
    /// `X-Gitlab-Instance`: the CI instance's base URL.
    #[arg(
        long,
        env = "HOOKLINE_INSTANCE_URL",
        default_value = "http://localhost"
    )]
    instance_url: String,
    #[command(flatten)]
    guard: GuardArgs,
}

/// The SSRF guard's options, shared by deliveries and by `hooks add`, which checks a URL on
/// save as deliveries check it.
#[derive(Args)]
struct GuardArgs {
    /// CIDRs the SSRF guard lets through (comma-separated), e.g. 127.0.0.0/8 for local receivers.
    #[arg(long, env = "HOOKLINE_ALLOW_CIDRS", value_delimiter = ',')]
    allow_cidr: Vec<String>,
    /// Turn the SSRF guard off (never in production).
    #[arg(long, env = "HOOKLINE_NO_SSRF_GUARD")]
    no_ssrf_guard: bool,
    /// Ports below 1024 a hook URL may use (comma-separated); 1024 and above always may.
    #[arg(
        long,
        env = "HOOKLINE_ALLOW_PORTS",
        value_delimiter = ',',
        default_value = "80,443"
    )]
    allow_port: Vec<u16>,
}

impl DeliverArgs {
    fn config(self) -> DeliverConfig {
        DeliverConfig {
            timeout: self.delivery_timeout,
            instance_url: self.instance_url,
            allow_cidrs: self.guard.allow_cidr,
            ssrf_guard: !self.guard.no_ssrf_guard,
            allow_ports: self.guard.allow_port,
        }
    }
}

impl GuardArgs {
    fn guard(&self) -> anyhow::Result<Option<hookline_consumer::ssrf::SsrfGuard>> {
        if self.no_ssrf_guard {
            return Ok(None);
        }
        Ok(Some(
            hookline_consumer::ssrf::SsrfGuard::new(&self.allow_cidr)?
                .with_allowed_ports(&self.allow_port),
        ))
    }
}

/// A size in bytes: a number, or with a unit (`512KiB`, `32MiB`, `1GiB`; `k`, `M`, `G` are
/// binary too).
fn parse_bytes(input: &str) -> Result<usize, String> {
    let s = input.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let n: usize = number
        .parse()
        .map_err(|_| format!("invalid size {s:?}: expected e.g. 33554432, 512KiB, 32MiB"))?;
    let scale: usize = match unit.trim() {
        "" | "B" => 1,
        "k" | "K" | "KiB" | "KB" => 1 << 10,
        "M" | "MiB" | "MB" => 1 << 20,
        "G" | "GiB" | "GB" => 1 << 30,
        other => return Err(format!("invalid size unit {other:?}: use KiB, MiB or GiB")),
    };
    n.checked_mul(scale)
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("invalid size {s:?}: above zero, and not that large"))
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Switch {
    On,
    Off,
}

#[derive(Args)]
struct StoreArgs {
    /// CI state store (PostgreSQL URL).
    #[arg(long, env = "HOOKLINE_DATABASE_URL")]
    database_url: String,
    /// PostgreSQL schema of the store [default: public].
    #[arg(long, env = "HOOKLINE_DATABASE_SCHEMA")]
    database_schema: Option<String>,
    /// The keys hook secrets are sealed with (as `serve --secrets-key-file`); needed to read or
    /// write hooks whose secrets are sealed.
    #[arg(long, env = "HOOKLINE_SECRETS_KEY_FILE")]
    secrets_key_file: Option<PathBuf>,
}

impl StoreArgs {
    fn keys(&self) -> anyhow::Result<Option<Arc<SecretKeys>>> {
        read_keys(self.secrets_key_file.as_deref())
    }

    /// The store, hook secrets sealed with the key file when one is given.
    async fn open(&self) -> anyhow::Result<Arc<dyn CiStore>> {
        open_store_sealed(
            &self.database_url,
            self.database_schema.as_deref(),
            1,
            self.keys()?,
        )
        .await
        .context("opening the store")
    }

    /// The PostgreSQL store (the commands that need its own tables).
    async fn open_pg(&self) -> anyhow::Result<PgStore> {
        open_pg(
            &self.database_url,
            self.database_schema.as_deref(),
            1,
            self.keys()?,
        )
        .await
        .context("opening the store")?
        .context("this command needs a PostgreSQL store")
    }
}

/// The key file, checked as every secret file is (private unless
/// `--allow-readable-secret-files`).
fn read_keys(path: Option<&std::path::Path>) -> anyhow::Result<Option<Arc<SecretKeys>>> {
    let Some(path) = path else {
        return Ok(None);
    };
    hookline_shell::secret_file::check_private(path, "--secrets-key-file")
        .map_err(anyhow::Error::msg)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("--secrets-key-file: {}", path.display()))?;
    let keys = SecretKeys::parse(&text)
        .map_err(|e| anyhow::anyhow!("--secrets-key-file {}: {e}", path.display()))?;
    Ok(Some(Arc::new(keys)))
}

#[derive(Subcommand)]
enum HooksCommand {
    /// Add a job-events webhook to a project. Its URL is checked by the SSRF guard (resolved
    /// now, with --allow-cidr) as deliveries check it.
    Add {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        guard: GuardArgs,
        #[arg(long)]
        project: i64,
        /// http(s) URL of the receiver (credentials in it are secrets too: prefer --url-file).
        #[arg(long, required_unless_present = "url_file")]
        url: Option<String>,
        /// A file holding the receiver's URL (`-`: standard input).
        #[arg(long, conflicts_with = "url")]
        url_file: Option<PathBuf>,
        /// Sent as X-Gitlab-Token. On the command line every user can read it: prefer
        /// --token-file or the environment variable.
        #[arg(long, env = "HOOKLINE_HOOK_TOKEN", conflicts_with = "token_file")]
        token: Option<String>,
        /// A file holding the token (`-`: standard input).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Standard Webhooks secret, whsec_<base64 of 24 to 64 bytes>. Prefer
        /// --signing-secret-file or the environment variable.
        #[arg(
            long,
            env = "HOOKLINE_HOOK_SIGNING_SECRET",
            conflicts_with = "signing_secret_file"
        )]
        signing_secret: Option<String>,
        /// A file holding the signing secret (`-`: standard input).
        #[arg(long)]
        signing_secret_file: Option<PathBuf>,
        /// Add the hook even though the project is not in the store (yet).
        #[arg(long)]
        force: bool,
        /// Under strict ordering, when several events of one build wait behind a failing
        /// delivery, send only the latest (for receivers that only want the current state).
        #[arg(long)]
        collapse: bool,
    },
    /// List hooks, all or a project's.
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        project: Option<i64>,
    },
    /// Remove a hook.
    Remove {
        #[command(flatten)]
        store: StoreArgs,
        id: i64,
    },
    /// Re-enable a hook that was disabled after failures.
    Enable {
        #[command(flatten)]
        store: StoreArgs,
        id: i64,
    },
    /// Show a hook's delivery log, newest first.
    Log {
        #[command(flatten)]
        store: StoreArgs,
        id: i64,
        /// Only attempts that got no 2xx answer.
        #[arg(long)]
        failed: bool,
        /// Only attempts of this event (its X-Gitlab-Event-UUID).
        #[arg(long)]
        event: Option<uuid::Uuid>,
        /// How many entries (at most 100).
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// One JSON object per line, every field (request and response headers and bodies).
        #[arg(long)]
        json: bool,
    },
    /// Send the hook a Job Hook for its project's latest build now, and show the answer.
    Test {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        deliver: DeliverArgs,
        id: i64,
    },
    /// Re-send a logged delivery through the retry topic (same event, same Idempotency-Key).
    Resend {
        #[command(flatten)]
        store: StoreArgs,
        #[command(flatten)]
        kafka: KafkaArgs,
        log_id: i64,
    },
}

#[derive(Subcommand)]
enum SecretsCommand {
    /// Print a new key line (`<id> <base64>`) for --secrets-key-file; put it first to seal with it.
    NewKey {
        /// The key's id, stored with every value it seals (letters, digits, '-', '_', '.').
        #[arg(long)]
        id: String,
    },
    /// How the stored hook secrets are kept: plaintext, or sealed and with which key.
    Status {
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Re-seal every hook secret not sealed with the current (first) key: plaintext ones and
    /// those of older keys. Then the older keys can leave the key file.
    Reencrypt {
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum TokensCommand {
    /// Create a token for one project or one root namespace; it is printed once, keep it.
    Create {
        #[command(flatten)]
        store: StoreArgs,
        /// The project the token manages the hooks of.
        #[arg(
            long,
            required_unless_present = "namespace",
            conflicts_with = "namespace"
        )]
        project: Option<i64>,
        /// The root namespace whose projects' hooks the token manages.
        #[arg(long)]
        namespace: Option<i64>,
        /// What it is for (shown in listings).
        #[arg(long)]
        name: String,
        /// When it stops working (RFC 3339) [default: never].
        #[arg(long)]
        expires_at: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// List tokens (never their text), all or one scope's.
    List {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long, conflicts_with = "namespace")]
        project: Option<i64>,
        #[arg(long)]
        namespace: Option<i64>,
    },
    /// Revoke a token: it stops working at once.
    Revoke {
        #[command(flatten)]
        store: StoreArgs,
        id: i64,
    },
}

#[derive(Subcommand)]
enum RateLimitsCommand {
    /// Set a root namespace's own limit: deliveries per minute, or `off` for none.
    Set {
        #[command(flatten)]
        store: StoreArgs,
        namespace: i64,
        /// N (per minute) or `off`.
        #[arg(value_parser = parse_limit)]
        limit: Limit,
    },
    /// Forget a namespace's own limit: the default applies again.
    Clear {
        #[command(flatten)]
        store: StoreArgs,
        namespace: i64,
    },
    /// List the namespaces with a limit of their own.
    List {
        #[command(flatten)]
        store: StoreArgs,
    },
}

/// A namespace's own limit as typed: `None` is `off`.
#[derive(Clone, Copy)]
struct Limit(Option<u32>);

fn parse_limit(s: &str) -> Result<Limit, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Limit(None));
    }
    match s.parse::<u32>() {
        Ok(n) if n > 0 => Ok(Limit(Some(n))),
        _ => Err(format!(
            "{s:?}: expected a number of deliveries per minute (1 or more) or `off`"
        )),
    }
}

#[derive(Subcommand)]
enum DlqCommand {
    /// Print every dead letter.
    List {
        #[command(flatten)]
        kafka: KafkaArgs,
    },
    /// Re-drive dead letters: deliveries to the retry topic, records to their source topic.
    Replay {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Only those dead-lettered since this RFC 3339 time.
        #[arg(long)]
        since: Option<chrono::DateTime<chrono::Utc>>,
        /// Only deliveries to this hook.
        #[arg(long)]
        hook: Option<i64>,
    },
}

impl KafkaArgs {
    fn config(&self) -> anyhow::Result<ConsumerConfig> {
        let mut c = ConsumerConfig::new(&self.brokers, &self.group_id).with_topic(&self.topic);
        if let Some(t) = &self.retry_topic {
            c.retry_topic = t.clone();
        }
        if let Some(t) = &self.dlq_topic {
            c.dlq_topic = t.clone();
        }
        if let Some(path) = &self.kafka_option_file {
            c.kafka =
                kafka_options_file(path, "--kafka-option-file").map_err(anyhow::Error::msg)?;
        }
        c.kafka.extend(self.kafka_options.iter().cloned());
        Ok(c)
    }
}

/// Warns of every secret given as a command-line argument (not through the environment or a
/// file): `/proc/<pid>/cmdline` shows it to every user of the machine.
fn warn_of_secrets_on_command_line(matches: &ArgMatches) {
    hookline_shell::secret_file::warn_of_secrets_on_command_line(
        matches,
        &[
            ("token", "--token", "--token-file or HOOKLINE_HOOK_TOKEN"),
            (
                "signing_secret",
                "--signing-secret",
                "--signing-secret-file or HOOKLINE_HOOK_SIGNING_SECRET",
            ),
        ],
    );
    // A URL only when it carries credentials.
    if let Some(("hooks", hooks)) = matches.subcommand()
        && let Some(("add", add)) = hooks.subcommand()
        && add.value_source("url") == Some(ValueSource::CommandLine)
        && let Some(url) = add.get_one::<String>("url")
        && masked_url(url) != *url
    {
        tracing::warn!(
            "{}",
            secret_on_command_line("--url with credentials", "--url-file")
        );
    }
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
    init_tracing(cli.log.log_format, "info,rdkafka=warn");
    warn_of_secrets_on_command_line(&matches);
    match cli.command {
        Command::Serve(args) => {
            let mut consumer = args.kafka.config()?;
            consumer.max_in_flight = args.max_in_flight;
            consumer.hook_in_flight = args.hook_in_flight;
            consumer.host_in_flight = args.host_in_flight;
            consumer.hook_wait = args.hook_wait;
            consumer.poll_batch = args.poll_batch;
            consumer.retry_schedule = args.retry_schedule;
            consumer.retry_hold = args.retry_hold;
            consumer.ordering = args.ordering;
            consumer.hook_cache_ttl = args.hook_cache_ttl;
            consumer.drain_timeout = args.drain_timeout;
            consumer.instance_id = args.instance_id;
            consumer.session_timeout = args.session_timeout;
            consumer.create_topics = !args.no_create_topics;
            consumer.retry_partitions = args.retry_partitions;
            consumer.commit_interval = args.commit_interval;
            consumer.rate_limit = RateLimitConfig {
                per_minute: args.rate_limit_per_minute,
                burst: args.rate_limit_burst,
            };
            consumer.deliver = args.deliver.config();
            consumer.delivery_log.enabled = matches!(args.delivery_log, Switch::On);
            consumer.delivery_log.retention = args.delivery_log_retention;
            consumer.delivery_log.buffer_bytes = args.delivery_log_buffer_bytes;
            hookline_shell::secret_file::allow_readable(args.allow_readable_secret_files);
            let admin_token = args
                .admin_token_file
                .as_deref()
                .map(AdminToken::read)
                .transpose()?;
            let secrets = read_keys(args.secrets_key_file.as_deref())?;
            let token = CancellationToken::new();
            cancel_on_signal(token.clone());
            hookline_consumer::serve(
                ServeConfig {
                    consumer,
                    database_url: args.database_url,
                    database_schema: args.database_schema,
                    listen: args.listen,
                    listener: args.listener.limits().map_err(anyhow::Error::msg)?,
                    max_event_bytes: args.max_event_bytes,
                    schema_registry_url: args.schema_registry_url,
                    admin_token,
                    admin_token_file: args.admin_token_file,
                    secrets,
                },
                token,
            )
            .await?;
        }
        Command::Hooks(cmd) => hooks(cmd).await?,
        Command::RateLimits(cmd) => rate_limits(cmd).await?,
        Command::Secrets(cmd) => secrets(cmd).await?,
        Command::Tokens(cmd) => tokens(cmd).await?,
        Command::Dlq(DlqCommand::List { kafka }) => {
            for letter in dead_letter::list(&kafka.config()?).await? {
                let at = letter.timestamp.map(|t| t.to_rfc3339()).unwrap_or_default();
                let what = match &letter.kind {
                    DeadLetterKind::Delivery(t) => format!(
                        "delivery hook={} event={} build={} attempts={}",
                        t.hook_id, t.event_id, t.build_id, t.attempts
                    ),
                    DeadLetterKind::Record { source_topic } => {
                        format!("record from {source_topic} ({} bytes)", letter.value.len())
                    }
                    DeadLetterKind::Reference {
                        source,
                        hook_id,
                        idempotency_key,
                        body_bytes,
                        body_sha256,
                    } => format!(
                        "reference hook={} idempotency_key={} source={} body_bytes={} body_sha256={}",
                        hook_id.map_or("-".into(), |h| h.to_string()),
                        idempotency_key.as_deref().unwrap_or("-"),
                        source.as_ref().map_or("-".into(), |s| format!(
                            "{}/{}@{}",
                            s.topic, s.partition, s.offset
                        )),
                        body_bytes.map_or("-".into(), |b| b.to_string()),
                        body_sha256.as_deref().unwrap_or("-"),
                    ),
                };
                println!(
                    "{}:{}\t{at}\t{}\t{what}\t{}",
                    letter.partition, letter.offset, letter.reason, letter.detail
                );
            }
        }
        Command::Dlq(DlqCommand::Replay { kafka, since, hook }) => {
            let summary = dead_letter::replay(
                &kafka.config()?,
                &ReplayFilter {
                    since,
                    hook_id: hook,
                },
            )
            .await?;
            println!(
                "replayed {} deliveries, {} records and {} references; {} references whose source record is gone; {} left out by the filter",
                summary.deliveries,
                summary.records,
                summary.references,
                summary.unreplayable,
                summary.skipped
            );
        }
    }
    Ok(())
}

async fn rate_limits(cmd: RateLimitsCommand) -> anyhow::Result<()> {
    let (RateLimitsCommand::Set { store, .. }
    | RateLimitsCommand::Clear { store, .. }
    | RateLimitsCommand::List { store }) = &cmd;
    let store = store.open().await?;
    match cmd {
        RateLimitsCommand::Set {
            namespace, limit, ..
        } => {
            store.set_rate_limit(namespace, limit.0).await?;
            match limit.0 {
                Some(n) => println!("namespace {namespace}: {n} per minute"),
                None => println!("namespace {namespace}: no limit"),
            }
        }
        RateLimitsCommand::Clear { namespace, .. } => {
            if !store.clear_rate_limit(namespace).await? {
                bail!("namespace {namespace} has no limit of its own");
            }
            println!("namespace {namespace}: the default applies");
        }
        RateLimitsCommand::List { .. } => {
            for o in store.rate_limit_overrides().await? {
                match o.per_minute {
                    Some(n) => println!("{}\t{n}/min", o.namespace_id),
                    None => println!("{}\toff", o.namespace_id),
                }
            }
        }
    }
    Ok(())
}

/// A secret given directly, or read from its file (`-`: standard input).
fn secret_from(
    given: Option<String>,
    file: Option<&std::path::Path>,
    what: &str,
) -> anyhow::Result<Option<String>> {
    match file {
        Some(path) => Ok(Some(read_secret(path, what).map_err(anyhow::Error::msg)?)),
        None => Ok(given),
    }
}

async fn hooks(mut cmd: HooksCommand) -> anyhow::Result<()> {
    // Secrets from their files (or standard input) first, and the hook checked before the
    // database is touched, so a bad value is refused on its own.
    if let HooksCommand::Add {
        url,
        url_file,
        token,
        token_file,
        signing_secret,
        signing_secret_file,
        ..
    } = &mut cmd
    {
        *url = secret_from(url.take(), url_file.as_deref(), "--url-file")?;
        *token = secret_from(token.take(), token_file.as_deref(), "--token-file")?;
        *signing_secret = secret_from(
            signing_secret.take(),
            signing_secret_file.as_deref(),
            "--signing-secret-file",
        )?;
        hook_admin::check(url.as_deref(), token.as_deref(), signing_secret.as_deref())?;
    }
    let store_args = match &cmd {
        HooksCommand::Add { store, .. }
        | HooksCommand::List { store, .. }
        | HooksCommand::Remove { store, .. }
        | HooksCommand::Enable { store, .. }
        | HooksCommand::Log { store, .. }
        | HooksCommand::Test { store, .. }
        | HooksCommand::Resend { store, .. } => store,
    };
    let store = store_args.open().await?;
    let admin = HookAdmin::new(store.clone());
    match cmd {
        HooksCommand::Add {
            project,
            url,
            token,
            signing_secret,
            force,
            collapse,
            guard,
            ..
        } => {
            let admin = admin.with_guard(guard.guard()?);
            let url = url.context("--url or --url-file is required")?;
            let spec = HookSpec {
                url,
                token,
                signing_secret,
                job_events: true,
                collapse,
            };
            let hook = admin.add(project, spec, force).await?;
            println!("{}\t{}", hook.id, hook.uuid);
        }
        HooksCommand::List { project, .. } => {
            for h in admin.list(project).await? {
                let state = match h.state(chrono::Utc::now()) {
                    hookline_cistate::HookState::Executable => "active".to_owned(),
                    hookline_cistate::HookState::TemporarilyDisabled(until) => {
                        format!("disabled until {}", until.to_rfc3339())
                    }
                    hookline_cistate::HookState::PermanentlyDisabled => "disabled".to_owned(),
                };
                println!(
                    "{}\tproject={}\t{}\t{state}\tfailures={}\ttoken={}\tsigned={}{}",
                    h.id,
                    h.project_id,
                    masked_url(&h.url),
                    h.recent_failures,
                    if h.token.is_some() { "[set]" } else { "-" },
                    h.signing_secret.is_some(),
                    if h.collapse { "\tcollapse" } else { "" }
                );
            }
        }
        HooksCommand::Remove { id, .. } => {
            admin.remove(None, id).await?;
            println!("removed hook {id}");
        }
        HooksCommand::Enable { id, .. } => {
            admin.enable(id).await?;
            println!("enabled hook {id}");
        }
        HooksCommand::Log {
            id,
            failed,
            event,
            limit,
            json,
            ..
        } => {
            let Some(pool) = store.pg_pool() else {
                bail!("the delivery log needs a PostgreSQL store");
            };
            if store.hook(id).await?.is_none() {
                bail!("no hook {id}");
            }
            let entries = delivery_log::recent(
                pool,
                &DeliveryLogQuery {
                    hook_id: id,
                    failed_only: failed,
                    event_id: event,
                    limit,
                    ..DeliveryLogQuery::default()
                },
            )
            .await?;
            for e in entries {
                if json {
                    println!("{}", serde_json::to_string(&e)?);
                    continue;
                }
                let answer = match (e.response_status, &e.internal_error) {
                    (Some(status), _) => status.to_string(),
                    (None, Some(error)) => format!("error: {error}"),
                    (None, None) => "-".to_owned(),
                };
                println!(
                    "{}\t{}\t{}\tattempt={}\tevent={}\t{}ms\t{answer}",
                    e.id,
                    e.attempted_at.to_rfc3339(),
                    e.trigger.as_str(),
                    e.attempt,
                    e.event_id,
                    e.duration_ms
                );
            }
        }
        HooksCommand::Test { id, deliver, .. } => {
            let deliverer = Deliverer::new(deliver.config())?;
            // The namespaces' own limits apply (the default one is `serve`'s option).
            let tested = hook_ops::test(store.as_ref(), &deliverer, id).await?;
            let answer = match tested.status {
                Some(status) => status.to_string(),
                None => format!("no answer: {}", outcome_reason(&tested.outcome)),
            };
            println!(
                "{answer}\t{}ms\tlog={}{}",
                tested.duration.as_millis(),
                tested.entry.id,
                if tested.synthetic {
                    "\tsample build (the project has none)"
                } else {
                    ""
                }
            );
            if let Some(body) = tested.body.filter(|b| !b.is_empty()) {
                println!("{body}");
            }
            if !matches!(tested.outcome, AttemptOutcome::Delivered { .. }) {
                bail!(
                    "the test delivery failed: {}",
                    outcome_reason(&tested.outcome)
                );
            }
        }
        HooksCommand::Resend { log_id, kafka, .. } => {
            let config = kafka.config()?;
            config.check_kafka_options()?;
            let resent =
                hook_ops::resend_with_config(&config, store.as_ref(), None, log_id).await?;
            println!(
                "resent log entry {} to hook {}: event {} idempotency_key {}",
                resent.log_id, resent.hook_id, resent.event_id, resent.idempotency_key
            );
        }
    }
    Ok(())
}

async fn secrets(cmd: SecretsCommand) -> anyhow::Result<()> {
    match cmd {
        SecretsCommand::NewKey { id } => {
            println!("{}", SecretKeys::new_key_line(&id)?);
        }
        SecretsCommand::Status { store } => {
            let pg = store.open_pg().await?;
            let census = pg.secrets_census().await?;
            println!("plaintext\t{}", census.plaintext);
            for (key, n) in &census.sealed {
                let known = match pg.secrets() {
                    Some(keys) if keys.current_id() == key => "\tcurrent key",
                    Some(keys) if keys.holds(key) => "\tolder key",
                    _ => "\tkey not in the key file",
                };
                println!("sealed:{key}\t{n}{known}");
            }
            check_secrets(&pg).await?;
        }
        SecretsCommand::Reencrypt { store } => {
            if store.secrets_key_file.is_none() {
                bail!("reencrypt needs --secrets-key-file (HOOKLINE_SECRETS_KEY_FILE)");
            }
            let pg = store.open_pg().await?;
            let rewritten = pg.reseal_hooks().await?;
            let key = pg.secrets().map(SecretKeys::current_id).unwrap_or_default();
            println!("re-sealed the secrets of {rewritten} hooks with key {key}");
        }
    }
    Ok(())
}

async fn tokens(cmd: TokensCommand) -> anyhow::Result<()> {
    let scope_of = |project: Option<i64>, namespace: Option<i64>| {
        project
            .map(TokenScope::Project)
            .or(namespace.map(TokenScope::Namespace))
    };
    match cmd {
        TokensCommand::Create {
            store,
            project,
            namespace,
            name,
            expires_at,
        } => {
            let pg = store.open_pg().await?;
            let scope = scope_of(project, namespace).context("--project or --namespace")?;
            if let TokenScope::Project(id) = scope
                && !pg.project_exists(id).await?
            {
                bail!("project {id} is not in the CI state store");
            }
            let created = api_tokens::create(pg.pool(), &name, scope, expires_at).await?;
            eprintln!(
                "token {} for {scope} created; it is shown this once:",
                created.row.id
            );
            println!("{}", created.token);
        }
        TokensCommand::List {
            store,
            project,
            namespace,
        } => {
            let pg = store.open_pg().await?;
            let now = chrono::Utc::now();
            for t in api_tokens::list(pg.pool(), scope_of(project, namespace)).await? {
                let state = if t.revoked_at.is_some() {
                    "revoked"
                } else if !t.active(now) {
                    "expired"
                } else {
                    "active"
                };
                println!(
                    "{}\t{}\t{state}\t{}\tcreated={}\texpires={}\tlast_used={}",
                    t.id,
                    t.scope,
                    t.name,
                    t.created_at.to_rfc3339(),
                    t.expires_at.map_or("-".into(), |e| e.to_rfc3339()),
                    t.last_used_at.map_or("-".into(), |e| e.to_rfc3339()),
                );
            }
        }
        TokensCommand::Revoke { store, id } => {
            let pg = store.open_pg().await?;
            if !api_tokens::revoke(pg.pool(), id, None).await? {
                bail!("no active token {id}");
            }
            println!("revoked token {id}");
        }
    }
    Ok(())
}

fn outcome_reason(outcome: &AttemptOutcome) -> String {
    match outcome {
        AttemptOutcome::Delivered { status, .. } => format!("delivered ({status})"),
        AttemptOutcome::Retry { reason, .. } | AttemptOutcome::Final { reason, .. } => {
            reason.clone()
        }
    }
}
