//! Errors, grouped by what the caller does about them.

use hookline_cistate::StoreError;

/// Setting up the producer or managing flags failed.
#[derive(Debug, thiserror::Error)]
pub enum ProducerError {
    /// An operator's input (flag name or value, option) is wrong: fix it and try again.
    #[error("unknown feature flag {name:?}: defined flags are {defined}")]
    UnknownFlag { name: String, defined: String },
    #[error("{0}")]
    Invalid(String),
    /// A store or Kafka could not be reached or failed: retry later.
    #[error("store unavailable: {0}")]
    Store(String),
    #[error("kafka: {0}")]
    Kafka(String),
    /// The schema registry could not register the writer schema at startup.
    #[error("schema registry: {0}")]
    SchemaRegistry(String),
    /// A task the service needs ended before shutdown (a bug): the process exits non-zero so
    /// its supervisor restarts it.
    #[error("{0}")]
    Stopped(String),
    /// Local I/O (flags file, listening socket) failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// A task of the running service died (panicked, failed, or ended early): it stopped; start
    /// it again, and look at the logs for the cause.
    #[error(transparent)]
    TaskFailed(#[from] hookline_shell::supervise::TaskFailure),
}

impl ProducerError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        ProducerError::Io {
            context: context.into(),
            source,
        }
    }
}

impl From<StoreError> for ProducerError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Invalid(m) => ProducerError::Invalid(m),
            other => ProducerError::Store(other.to_string()),
        }
    }
}

impl From<sqlx::Error> for ProducerError {
    fn from(e: sqlx::Error) -> Self {
        ProducerError::Store(e.to_string())
    }
}

/// Emitting one transition failed. Nothing was acknowledged: the transition is not durable.
#[derive(Debug, thiserror::Error)]
pub enum EmitError {
    /// The build is not in the CI state store: the caller sent a wrong id (HTTP 404).
    #[error("build {0} not found")]
    UnknownBuild(i64),
    /// Kafka or the store did not answer in time: retry later (HTTP 503 with Retry-After).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The event cannot be encoded: a bug, not the caller's fault (HTTP 500).
    #[error("cannot emit: {0}")]
    Rejected(String),
    /// The event is larger than `--max-event-bytes` (or Kafka says so), or a field of the CI
    /// state it carries is over its bound: retrying the same transition cannot help (HTTP 413).
    #[error("event too large: {0}")]
    TooLarge(String),
    /// The event id was used before for a different transition (HTTP 409 naming `event_id`).
    #[error("event id {0} was used before for a different transition; send a new id")]
    Conflict(uuid::Uuid),
    /// Kafka refused this one event for good (HTTP 422 with the reason).
    #[error("refused: {0}")]
    Refused(String),
}

impl EmitError {
    /// Every [`EmitError::kind`], so the metrics present each label at 0 from the start.
    pub const KINDS: [&'static str; 6] = [
        "unknown_build",
        "unavailable",
        "rejected",
        "too_large",
        "refused",
        "conflict",
    ];

    /// A short stable name for metrics labels.
    pub fn kind(&self) -> &'static str {
        match self {
            EmitError::UnknownBuild(_) => "unknown_build",
            EmitError::Unavailable(_) => "unavailable",
            EmitError::Rejected(_) => "rejected",
            EmitError::TooLarge(_) => "too_large",
            EmitError::Refused(_) => "refused",
            EmitError::Conflict(_) => "conflict",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::EmitError;

    #[test]
    fn kinds_lists_every_kind_once() {
        // An exhaustive match: a new variant fails to compile here until it is listed.
        let every = |e: &EmitError| match e {
            EmitError::UnknownBuild(_)
            | EmitError::Unavailable(_)
            | EmitError::Rejected(_)
            | EmitError::TooLarge(_)
            | EmitError::Conflict(_)
            | EmitError::Refused(_) => e.kind(),
        };
        let kinds: Vec<&str> = [
            EmitError::UnknownBuild(1),
            EmitError::Unavailable(String::new()),
            EmitError::Rejected(String::new()),
            EmitError::TooLarge(String::new()),
            EmitError::Conflict(uuid::Uuid::nil()),
            EmitError::Refused(String::new()),
        ]
        .iter()
        .map(every)
        .collect();
        let mut sorted = kinds.clone();
        sorted.sort_unstable();
        let mut listed = EmitError::KINDS.to_vec();
        listed.sort_unstable();
        assert_eq!(sorted, listed, "{kinds:?}");
    }
}
