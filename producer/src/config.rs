//! Every option of the producer: a typed field with one documenting line, settable by flag and
//! by `HOOKLINE_*` environment variable, validated on start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hookline_cistate::{PgOptions, PgStore};
use hookline_schemas::SchemaVersion;

use hookline_shell::server::ListenerArgs;
use hookline_shell::{parse_duration, parse_key_value};

use crate::emit::EmitterConfig;
use crate::error::ProducerError;
use crate::flags::{FileFlagStore, FlagStore, PgFlagStore};

/// Where the events go.
#[derive(clap::Args, Debug, Clone)]
pub struct KafkaOptions {
    /// Kafka bootstrap servers (host:port, comma separated).
    #[arg(long, env = "HOOKLINE_KAFKA_BROKERS", default_value = "127.0.0.1:9092")]
    pub brokers: String,
    /// Topic the BuildEvents are written to.
    #[arg(long, env = "HOOKLINE_TOPIC", default_value = "build-events")]
    pub topic: String,
    /// Any librdkafka producer setting as KEY=VALUE (TLS, SASL, batching...); repeat the flag, or
    /// comma-separate in the variable. Applied after hookline's own settings.
    /// Secrets (sasl.password, ...) belong in --kafka-option-file: the command line is readable
    /// by every user of the machine.
    #[arg(long = "kafka-option", env = "HOOKLINE_KAFKA_OPTIONS", value_delimiter = ',', value_parser = parse_key_value)]
    pub kafka_options: Vec<(String, String)>,
    /// A file of librdkafka settings, KEY=VALUE a line (only its owner may read it): where
    /// secret settings such as sasl.password go. --kafka-option settings come after it.
    #[arg(long, env = "HOOKLINE_KAFKA_OPTION_FILE")]
    pub kafka_option_file: Option<std::path::PathBuf>,
    /// Avro schema version to write: v2 (current), or v1 to act as a legacy producer (no payload,
    /// never renders inline) when exercising a mixed fleet.
    #[arg(long, env = "HOOKLINE_WRITER_SCHEMA", default_value = "v2", value_parser = parse_writer)]
    pub writer_schema: SchemaVersion,
    /// Create the topic with this many partitions when it is missing (skipped with a warning
    /// when the cluster has no admin API).
    #[arg(long, env = "HOOKLINE_CREATE_TOPIC_PARTITIONS")]
    pub create_topic_partitions: Option<i32>,
    /// How long an event may wait for Kafka's acknowledgement before the transition is refused
    /// with 503, e.g. 30s, 500ms. The default outlasts a broker failover (session timeout plus
    /// election); librdkafka keeps the record half as long again (`message.timeout.ms`) and a
    /// later ack is counted in `hookline_producer_late_acks_total`.
    #[arg(long, env = "HOOKLINE_DELIVERY_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub delivery_timeout: Duration,
    /// Base URL of a Confluent-compatible schema registry: the writer schema is registered there
    /// at startup and its id written in every record. Unset: the embedded registry (ids fixed in
    /// schemas/avro/manifest.json).
    #[arg(long, env = "HOOKLINE_SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// Largest encoded event in bytes; larger ones are refused with 413 before producing. Also
    /// sets librdkafka's `message.max.bytes` (plus a record's framing), and is checked at
    /// startup against the topic's `max.message.bytes`.
    #[arg(long, env = "HOOKLINE_MAX_EVENT_BYTES", default_value_t = crate::emit::DEFAULT_MAX_EVENT_BYTES)]
    pub max_event_bytes: usize,
}

impl KafkaOptions {
    /// Puts the settings of `--kafka-option-file` (if any) before the `--kafka-option` ones.
    pub fn load_option_file(&mut self) -> Result<(), ProducerError> {
        if let Some(path) = self.kafka_option_file.take() {
            let mut options =
                hookline_shell::secret_file::kafka_options_file(&path, "--kafka-option-file")
                    .map_err(ProducerError::Invalid)?;
            options.append(&mut self.kafka_options);
            self.kafka_options = options;
        }
        Ok(())
    }

    pub fn emitter_config(&self) -> EmitterConfig {
        EmitterConfig {
            brokers: self.brokers.clone(),
            topic: self.topic.clone(),
            kafka: self.kafka_options.clone(),
            writer: self.writer_schema,
            create_topic_partitions: self.create_topic_partitions,
            delivery_timeout: self.delivery_timeout,
            schema_registry_url: self.schema_registry_url.clone(),
            max_event_bytes: self.max_event_bytes,
            // `serve` adds the PostgreSQL store once it is connected.
            event_ids: None,
        }
    }

    /// The size bound is one setting (`--max-event-bytes`, not a free-form Kafka option), and the
    /// settings an acknowledgement rests on are hookline's.
    pub fn validate(&self) -> Result<(), ProducerError> {
        if self.max_event_bytes < 1000 {
            return Err(ProducerError::Invalid(
                "--max-event-bytes must be at least 1000 (librdkafka's smallest message.max.bytes)"
                    .into(),
            ));
        }
        self.emitter_config().check_kafka_options()
    }
}

/// Where the CI state and the flags are.
#[derive(clap::Args, Debug, Clone, Default)]
// `global`: `feature set NAME 5 --actors --flags-file f.json` works as well as
// `feature --flags-file f.json set ...`.
pub struct StoreOptions {
    /// PostgreSQL URL of the CI state store; also holds the flags unless --flags-file is given.
    #[arg(long, env = "HOOKLINE_DATABASE_URL", global = true)]
    pub database_url: Option<String>,
    /// PostgreSQL schema to use instead of `public` (created if missing).
    #[arg(long, env = "HOOKLINE_DATABASE_SCHEMA", global = true)]
    pub database_schema: Option<String>,
    /// JSON file holding the feature flags (embedded mode); used for flags instead of the database.
    #[arg(long, env = "HOOKLINE_FLAGS_FILE", global = true)]
    pub flags_file: Option<PathBuf>,
}

impl StoreOptions {
    /// The PostgreSQL store, migrated; an error when no URL is configured. For a command: one
    /// attempt.
    pub async fn pg_store(&self) -> Result<PgStore, ProducerError> {
        self.pg_store_within(1).await
    }

    /// The PostgreSQL store for a service starting: an unreachable database is asked again,
    /// [`hookline_cistate::pg::CONNECT_ATTEMPTS`] times in all.
    pub async fn pg_store_for_service(&self) -> Result<PgStore, ProducerError> {
        self.pg_store_within(hookline_cistate::pg::CONNECT_ATTEMPTS)
            .await
    }

    async fn pg_store_within(&self, attempts: usize) -> Result<PgStore, ProducerError> {
        let url = self.database_url.as_deref().ok_or_else(|| {
            ProducerError::Invalid(
                "no database: set --database-url or HOOKLINE_DATABASE_URL".into(),
            )
        })?;
        let mut options = PgOptions::new(url);
        options.schema = self.database_schema.clone();
        Ok(PgStore::connect_patiently(&options, attempts).await?)
    }

    /// The flag store: the file when one is named, else PostgreSQL (`pg` when already connected).
    pub async fn flag_store(
        &self,
        pg: Option<&PgStore>,
    ) -> Result<Arc<dyn FlagStore>, ProducerError> {
        if let Some(path) = &self.flags_file {
            return Ok(Arc::new(FileFlagStore::new(path)));
        }
        if self.database_url.is_none() {
            return Err(ProducerError::Invalid(
                "no flag store: set HOOKLINE_DATABASE_URL (--database-url) or HOOKLINE_FLAGS_FILE (--flags-file)".into(),
            ));
        }
        let pool = match pg {
            Some(store) => store.pool().clone(),
            None => self.pg_store().await?.pool().clone(),
        };
        Ok(Arc::new(PgFlagStore::new(pool)))
    }
}

/// `hookline-producer serve`.
#[derive(clap::Args, Debug, Clone)]
pub struct ServeConfig {
    #[command(flatten)]
    pub kafka: KafkaOptions,
    #[command(flatten)]
    pub store: StoreOptions,
    /// Address the HTTP API, /metrics, /healthz and /readyz listen on.
    #[arg(long, env = "HOOKLINE_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// File of bearer tokens the API accepts, one per line (blank lines and `#` comments
    /// ignored); several allow rotation. Required unless --no-auth.
    #[arg(long, env = "HOOKLINE_API_TOKEN_FILE")]
    pub api_token_file: Option<PathBuf>,
    /// Serve the API without authentication; refused unless --listen is a loopback address.
    #[arg(long, env = "HOOKLINE_NO_AUTH")]
    pub no_auth: bool,
    /// Accept a token file that group or others may read (by default refused, as ssh refuses
    /// such a key): for containers, whose mounted secrets are often mode 0644 but seen only
    /// inside the container.
    #[arg(long, env = "HOOKLINE_ALLOW_READABLE_SECRET_FILES")]
    pub allow_readable_secret_files: bool,
    /// Serve /metrics without a token (for a scraper that cannot send one); otherwise /metrics
    /// takes the same bearer token as the API.
    #[arg(long, env = "HOOKLINE_METRICS_PUBLIC")]
    pub metrics_public: bool,
    /// The listener's limits: connections, time to first byte, head, body and idle timeouts.
    #[command(flatten)]
    pub listener: ListenerArgs,
    /// How long event ids are remembered with a digest of their transition: within it, a
    /// retry gets its first answer and a reuse for another transition gets 409 (e.g. 7d).
    #[arg(long, env = "HOOKLINE_EVENT_ID_RETENTION", default_value = "7d", value_parser = parse_duration)]
    pub event_id_retention: Duration,
    /// Largest accepted request body in bytes; larger bodies get 413.
    #[arg(long, env = "HOOKLINE_BODY_LIMIT", default_value_t = 1024 * 1024)]
    pub body_limit: usize,
    /// Most transitions in one batch request; more get 422.
    #[arg(long, env = "HOOKLINE_BATCH_LIMIT", default_value_t = 1000)]
    pub batch_limit: usize,
    /// How often the flags are re-read from their store (a change reaches this producer within it).
    #[arg(long, env = "HOOKLINE_FLAGS_RELOAD_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub flags_reload_interval: Duration,
    /// The Retry-After sent with 503 answers.
    #[arg(long, env = "HOOKLINE_RETRY_AFTER", default_value = "5s", value_parser = parse_duration)]
    pub retry_after: Duration,
    /// On shutdown, how long in-flight requests may take to be acknowledged (at least the
    /// delivery timeout, so an accepted event is not abandoned while Kafka may still ack it;
    /// the default also leaves librdkafka's extra half for events already answered).
    #[arg(long, env = "HOOKLINE_SHUTDOWN_TIMEOUT", default_value = "45s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
}

impl ServeConfig {
    /// Cross-checks the options before anything starts.
    pub fn validate(&self) -> Result<(), ProducerError> {
        self.kafka.validate()?;
        if self.api_token_file.is_some() && self.no_auth {
            return Err(ProducerError::Invalid(
                "--api-token-file and --no-auth contradict each other: choose one".into(),
            ));
        }
        if self.api_token_file.is_none() && !self.no_auth {
            return Err(ProducerError::Invalid(
                "the API needs bearer tokens: set --api-token-file (HOOKLINE_API_TOKEN_FILE), or --no-auth when listening on loopback".into(),
            ));
        }
        if self.no_auth && !self.listen.ip().is_loopback() {
            return Err(ProducerError::Invalid(format!(
                "--no-auth is allowed only on a loopback address, not {}: anyone who can reach the port could inject transitions",
                self.listen
            )));
        }
        self.listener.limits().map_err(ProducerError::Invalid)?;
        if self.body_limit == 0 || self.batch_limit == 0 {
            return Err(ProducerError::Invalid(
                "--body-limit and --batch-limit must be above 0".into(),
            ));
        }
        if self.event_id_retention.is_zero() {
            return Err(ProducerError::Invalid(
                "--event-id-retention must be above 0: retries and reused ids are told apart within it".into(),
            ));
        }
        if self.flags_reload_interval.is_zero() {
            return Err(ProducerError::Invalid(
                "--flags-reload-interval must be above 0".into(),
            ));
        }
        if self.shutdown_timeout < self.kafka.delivery_timeout {
            return Err(ProducerError::Invalid(format!(
                "--shutdown-timeout ({:?}) is below --delivery-timeout ({:?}): in-flight events could be abandoned on shutdown",
                self.shutdown_timeout, self.kafka.delivery_timeout
            )));
        }
        Ok(())
    }
}

fn parse_writer(s: &str) -> Result<SchemaVersion, String> {
    match s {
        "v1" | "1" => Ok(SchemaVersion::V1),
        "v2" | "2" => Ok(SchemaVersion::V2),
        _ => Err(format!("invalid schema version {s:?}: expected v1 or v2")),
    }
}
