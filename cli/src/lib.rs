//! `hookline`: the demo, the simulated CI and the sample receiver.
//!
//! # Layout
//!
//! ```text
//! sim.rs  (seeded world, pipelines on the real clock) --commit--> CiStore --transition--> Sink
//!   demo.rs:     Sink = in-process Emitter -> mock Kafka -> delay line -> Consumer -> receiver.rs -> ledger.rs
//!   simulate.rs: Sink = POST {producer}/v1/transitions (PostgreSQL store, hooks at --receiver-url)
//! ```
//!
//! - [`sim`]: the simulated CI, in two halves: planning (from the seed) and playing (timeline,
//!   commit-then-notify, the truth).
//! - [`transition`]: what the simulated CI hands on (a transition, the answer, the `Sink`) and
//!   the `Witness` told the truth of each transition (the ledger is one).
//! - [`ledger`]: truth against deliveries: stale, wrong facts, duplicates, missing, signatures,
//!   latency.
//! - [`facts`]: what a delivered body must say about its transition, written down without the
//!   renderer (so the ledger's check can fail where the renderer is wrong).
//! - [`receiver`]: the demo's receiver (feeds the ledger) and the sample receiver (logs).
//! - [`demo`]: `hookline demo`, everything in one process on librdkafka's mock cluster.
//! - [`experiment`]: `hookline experiment`, the demo over a grid of lags and inline percentages,
//!   drawn as an SVG chart.
//! - [`simulate`]: `hookline simulate`, the same CI against a real producer and PostgreSQL.
//! - [`error`]: what can go wrong, by what the person running it does.

pub mod demo;
pub mod error;
pub mod experiment;
pub mod facts;
pub mod ledger;
pub mod receiver;
pub mod sim;
pub mod simulate;
pub mod transition;

pub use error::CliError;
