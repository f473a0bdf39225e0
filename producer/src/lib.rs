//! The producer: turns CI build transitions into `BuildEvent`s on Kafka, rendering the Job Hook
//! inline when the rollout flag is on for the build's project.
//!
//! # Layout
//!
//! ```text
//! transition --(ingest.rs: HTTP | Emitter API)--> user blocked? skip (no hook, as GitLab)
//!            --> flag on for project? (flags/)
//!            --yes--> render.rs: snapshot -> Job Hook bytes (timed)
//!            --------> emit.rs: encode (Avro, Confluent frame) -> idempotent produce -> delivery report
//! ```
//!
//! - [`flags`]: flag definitions, Flipper-compatible gates and evaluation, the stores
//!   (PostgreSQL, JSON file, memory) and the cached evaluator [`Flags`]: a self-contained
//!   Flipper engine.
//! - [`feature`]: the `feature set|get|list|delete|history|enabled` CLI over a flag store.
//! - [`bounds`]: GitLab's failure reasons and the bounds of the CI state's free text, which
//!   keep every event under `--max-event-bytes`.
//! - [`render`]: the inline render of one transition, timed (the producer's cost of inline).
//! - [`emit`]: the [`Emitter`] library API: flag, render, encode, produce, await the ack.
//! - [`event_ids`]: recent event ids with a digest of their transition: a retry gets its first
//!   answer, a reuse for another transition is refused.
//! - [`ingest`]: the HTTP API (`POST /v1/transitions`, `/v1/transitions/batch`), health,
//!   readiness, metrics, graceful shutdown.
//! - [`relay`]: `hookline-producer relay`: the transactional outbox (`hookline_outbox`) to Kafka,
//!   through the same emitter, in order per build, rows deleted only after Kafka's ack.
//! - [`api`]: the API's request and response types; every error names its field.
//! - [`openapi`]: the shapes of the API's answers and the routes its OpenAPI 3.1 document
//!   describes; the document itself (`GET /openapi.json`) is generated beside the router, in
//!   `ingest`, from the handlers and types.
//! - [`auth`]: bearer tokens (constant-time, never logged) and the JSON-only content type.
//! - [`config`]: every option, by flag and `HOOKLINE_*` variable.
//! - [`metrics`]: the producer's Prometheus metrics, one registry per instance.
//! - [`bench`](mod@bench): render cost and events/s with the flag off and on, in one run.
//! - [`error`]: what can go wrong, grouped by what the caller does about it.

pub mod api;
pub mod auth;
pub mod bench;
pub mod bounds;
pub mod config;
pub mod emit;
pub mod error;
pub mod event_ids;
pub mod feature;
pub mod flags;
pub mod ingest;
pub mod metrics;
pub mod openapi;
pub mod relay;
pub mod render;

pub use auth::ApiTokens;
pub use config::{KafkaOptions, ServeConfig, StoreOptions};
pub use emit::{Emission, Emitted, Emitter, EmitterConfig, TransitionRequest};
pub use error::{EmitError, ProducerError};
pub use flags::{Change, Flags, Gates, INLINE_FLAG, Percentage};
/// The API listener's limits (connections, time to first byte, head, body, idle): the shared
/// server's ([`hookline_shell::server`]).
pub use hookline_shell::server::Limits as ConnectionLimits;
pub use ingest::{AppState, app, run, serve};
pub use metrics::ProducerMetrics;
pub use relay::{RelayConfig, RelayMetrics, RelaySettings};
