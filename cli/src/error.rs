//! What can go wrong in the CLI, grouped by what the person running it does about it.

use hookline_cistate::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The options do not make sense together: fix the command line.
    #[error("invalid options: {0}")]
    Usage(String),
    /// A service (Kafka, PostgreSQL, the producer, a port) could not be used: check it, run again.
    #[error("service unavailable: {0}")]
    Unavailable(String),
    /// The CI state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The producer refused a transition for good (its answer is in the message).
    #[error("transition refused: {0}")]
    Refused(String),
    /// A guarantee was broken (missing or stale deliveries where there must be none): a bug.
    #[error("{0}")]
    Violated(String),
    /// A file of the output (a chart, a report) could not be written: check the path.
    #[error("cannot write output: {0}")]
    Io(String),
    /// Something that cannot happen did: a bug in hookline.
    #[error("internal error: {0}")]
    Internal(String),
}
