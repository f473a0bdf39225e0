//! `hookline-consumer`: serve, manage hooks, inspect and replay dead letters.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};
use hookline_cistate::NewHook;
use hookline_consumer::config::ConsumerConfig;
use hookline_consumer::dead_letter::{self, DeadLetterKind, ReplayFilter};
use hookline_consumer::deliver::DeliverConfig;
use hookline_consumer::hooks::{masked_url, validate_token, validate_url};
use hookline_consumer::schedule::{DEFAULT_RETRY_SCHEDULE, RetrySchedule};
use hookline_consumer::server::{ServeConfig, open_store};
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
    /// Consume BuildEvents and deliver Job Hooks; serve /metrics, /healthz, /readyz.
    Serve(Box<ServeArgs>),
    /// Manage project webhooks.
    #[command(subcommand)]
    Hooks(HooksCommand),
    /// Inspect and re-drive the dead-letter topic.
    #[command(subcommand)]
    Dlq(DlqCommand),
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
    /// e.g. security.protocol=SASL_SSL.
    #[arg(long = "kafka-option", env = "HOOKLINE_KAFKA_OPTIONS", value_delimiter = ',', value_parser = parse_key_value)]
    kafka_options: Vec<(String, String)>,
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
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "HOOKLINE_LISTEN", default_value = "127.0.0.1:9464")]
    listen: SocketAddr,
    /// Base URL of a Confluent-compatible schema registry to fetch writer schemas from by id
    /// [default: the embedded registry, ids in schemas/avro/manifest.json].
    #[arg(long, env = "HOOKLINE_SCHEMA_REGISTRY_URL")]
    schema_registry_url: Option<String>,
    /// Records in flight per path (backpressure; bounds re-deliveries after a crash).
    #[arg(long, env = "HOOKLINE_MAX_IN_FLIGHT", default_value_t = 256)]
    max_in_flight: usize,
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
    /// How long a project's hook list is cached.
    #[arg(long, env = "HOOKLINE_HOOK_CACHE_TTL", default_value = "5s", value_parser = parse_duration)]
    hook_cache_ttl: Duration,
    /// How often stored offsets are committed; 0 commits after every finished record.
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
}

#[derive(Args)]
struct StoreArgs {
    /// CI state store (PostgreSQL URL).
    #[arg(long, env = "HOOKLINE_DATABASE_URL")]
    database_url: String,
    /// PostgreSQL schema of the store [default: public].
    #[arg(long, env = "HOOKLINE_DATABASE_SCHEMA")]
    database_schema: Option<String>,
}

#[derive(Subcommand)]
enum HooksCommand {
    /// Add a job-events webhook to a project.
    Add {
        #[command(flatten)]
        store: StoreArgs,
        #[arg(long)]
        project: i64,
        /// http(s) URL of the receiver.
        #[arg(long)]
        url: String,
        /// Sent as X-Gitlab-Token.
        #[arg(long)]
        token: Option<String>,
        /// Standard Webhooks secret, whsec_<base64>.
        #[arg(long)]
        signing_secret: Option<String>,
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
    fn config(&self) -> ConsumerConfig {
        let mut c = ConsumerConfig::new(&self.brokers, &self.group_id).with_topic(&self.topic);
        if let Some(t) = &self.retry_topic {
            c.retry_topic = t.clone();
        }
        if let Some(t) = &self.dlq_topic {
            c.dlq_topic = t.clone();
        }
        c.kafka = self.kafka_options.clone();
        c
    }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Errors end in one line for a person, not anyhow's debug form (which prints a backtrace
    // whenever RUST_BACKTRACE is set in the environment).
    exit_code(run().await)
}

async fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_tracing(cli.log.log_format, "info,rdkafka=warn");
    match cli.command {
        Command::Serve(args) => {
            let mut consumer = args.kafka.config();
            consumer.max_in_flight = args.max_in_flight;
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
            consumer.deliver = DeliverConfig {
                timeout: args.delivery_timeout,
                instance_url: args.instance_url,
                allow_cidrs: args.allow_cidr,
                ssrf_guard: !args.no_ssrf_guard,
                allow_ports: args.allow_port,
            };
            let token = CancellationToken::new();
            cancel_on_signal(token.clone());
            hookline_consumer::serve(
                ServeConfig {
                    consumer,
                    database_url: args.database_url,
                    database_schema: args.database_schema,
                    listen: args.listen,
                    schema_registry_url: args.schema_registry_url,
                },
                token,
            )
            .await?;
        }
        Command::Hooks(cmd) => hooks(cmd).await?,
        Command::Dlq(DlqCommand::List { kafka }) => {
            for letter in dead_letter::list(&kafka.config()).await? {
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
                &kafka.config(),
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

async fn hooks(cmd: HooksCommand) -> anyhow::Result<()> {
    let (url, schema) = match &cmd {
        HooksCommand::Add { store, .. }
        | HooksCommand::List { store, .. }
        | HooksCommand::Remove { store, .. }
        | HooksCommand::Enable { store, .. } => {
            (store.database_url.clone(), store.database_schema.clone())
        }
    };
    // Check the hook before touching the database, so a bad URL is refused on its own.
    if let HooksCommand::Add {
        url,
        token,
        signing_secret,
        ..
    } = &cmd
    {
        if let Err(message) = validate_url(url) {
            bail!("hook refused: {message}");
        }
        if let Some(Err(message)) = token.as_deref().map(validate_token) {
            bail!("hook refused: {message}");
        }
        if let Some(secret) = signing_secret
            && !secret.starts_with("whsec_")
        {
            bail!("hook refused: a signing secret must look like whsec_<base64>");
        }
    }
    let store = open_store(&url, schema.as_deref())
        .await
        .context("opening the store")?;
    match cmd {
        HooksCommand::Add {
            project,
            url,
            token,
            signing_secret,
            force,
            collapse,
            ..
        } => {
            if !force && !store.project_exists(project).await? {
                bail!(
                    "hook refused: project {project} is not in the CI state store (add it first, or pass --force if the store is filled later)"
                );
            }
            let hook = store
                .add_hook(&NewHook {
                    project_id: project,
                    url,
                    token,
                    signing_secret,
                    job_events: true,
                    collapse,
                })
                .await?;
            println!("{}\t{}", hook.id, hook.uuid);
        }
        HooksCommand::List { project, .. } => {
            for h in store.list_hooks(project).await? {
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
            if !store.remove_hook(id).await? {
                bail!("no hook {id}");
            }
            println!("removed hook {id}");
        }
        HooksCommand::Enable { id, .. } => {
            if !store.enable_hook(id).await? {
                bail!("no hook {id}");
            }
            println!("enabled hook {id}");
        }
    }
    Ok(())
}
