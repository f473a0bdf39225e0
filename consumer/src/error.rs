//! Why the consumer could not start or run, grouped by what to do about it.

use hookline_cistate::StoreError;
use rdkafka::error::KafkaError;

/// Why the consumer could not start or run, grouped by what to do about it.
#[derive(Debug, thiserror::Error)]
pub enum ConsumerError {
    /// An option is wrong (or a topic it names is missing): fix the configuration and start
    /// again.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Kafka refused a client, a subscription or a request: check the brokers and settings.
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    /// The CI state store failed: check the database, then try again.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The HTTP listener for `/metrics` could not be opened.
    #[error("listener: {0}")]
    Listen(#[from] std::io::Error),
    /// The schema registry did not answer at startup (or refused the reader's schema).
    #[error("schema registry: {0}")]
    SchemaRegistry(String),
    /// A task of the running consumer died (panicked, failed, or ended early): the consumer
    /// stopped; start it again, and look at the logs for the cause.
    #[error(transparent)]
    TaskFailed(#[from] hookline_shell::supervise::TaskFailure),
}
