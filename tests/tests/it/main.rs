//! hookline's integration tests against the real services (Kafka and PostgreSQL, started by
//! `scripts/test`), in one test binary: one link step instead of one per file. Each module is
//! one area; run one with `scripts/test -p hookline-tests -- <module>::`.

mod cluster_failover;
mod consumer_api;
mod consumer_bench;
mod consumer_delivery;
mod consumer_fairness;
mod consumer_liveness;
mod consumer_ordering;
mod consumer_rate_limit;
mod consumer_reliability;
mod delivery_log;
mod foundation;
mod kafka_trust;
mod listeners;
mod monitoring;
mod poison_rows;
mod producer_emit;
mod producer_http;
mod producer_outbox;
mod producer_reliability;
mod promises;
mod registry_apicurio;
mod schema_registry;
mod schemas_http_registry;
mod soak_receiver;
