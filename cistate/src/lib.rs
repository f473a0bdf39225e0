//! The CI state hookline renders Job Hooks from, its stores, and the one renderer.
//!
//! # Layout
//!
//! ```text
//! CI system --writes--> store (pg.rs | memory.rs) --snapshot(build)--> render.rs --> Job Hook bytes
//!                                  ^ one round trip per build, one query per batch
//! ```
//!
//! - [`model`]: namespaces, projects, users, runners, pipelines, builds, hooks (with GitLab's
//!   auto-disable arithmetic), and the [`model::RenderSnapshot`] of one build.
//! - [`store`]: the [`store::CiStore`] trait.
//! - [`pg`]: PostgreSQL, with migrations applied on connect.
//! - [`memory`]: in-memory, for the embedded demo and fast tests.
//! - [`outbox`]: the transactional outbox: the CI records a transition in its own transaction,
//!   the producer's relay claims, publishes and deletes it.
//! - [`render`](mod@render): the pure renderer, shared by producer (inline) and consumer (deferred).
//! - [`api_tokens`]: the hooks API's tokens scoped to a project or a namespace (digests only).
//! - [`delivery_log`]: one row per attempt to deliver to a hook, for the operator.
//! - [`rate_limit`]: per-root-namespace limit overrides and the shared token buckets (GCRA).
//! - [`secrets`]: hook URLs, tokens and signing secrets sealed at rest (XChaCha20-Poly1305,
//!   keys from a file, a key id per value for rotation).
//! - [`stored_time`]: a stored `timestamptz` read as whatever it holds, `infinity` included:
//!   no value the database can hold panics a decode.
//! - [`fixtures`]: a realistic build, for tests and examples.

pub mod api_tokens;
pub mod delivery_log;
pub mod fixtures;
pub mod memory;
pub mod model;
pub mod outbox;
pub mod pg;
pub mod rate_limit;
pub mod render;
pub mod secrets;
pub mod store;
pub mod stored_time;

pub use memory::MemoryStore;
pub use model::*;
pub use outbox::{Outbox, OutboxRow, OutboxTransition};
pub use pg::{PgOptions, PgStore, SecretsCensus, write_build, write_pipeline};
pub use rate_limit::{Bucket, RateLimitOverride};
pub use render::{NoHook, Transition, is_stale, job_hook, no_hook, render};
pub use secrets::{SecretError, SecretKeys};
/// The pool type of [`PgStore::pool`] and [`CiStore::pg_pool`], for crates without `sqlx`.
pub use sqlx::PgPool;
pub use store::{CiStore, StoreError};
pub use stored_time::StoredTime;
