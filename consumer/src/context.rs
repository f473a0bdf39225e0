//! What both paths share: the configuration, the CI store and hook registry, the codec, the HTTP
//! stage, the hand-off writer and the metrics.

use std::sync::Arc;

use hookline_cistate::CiStore;
use hookline_schemas::Codec;

use crate::config::ConsumerConfig;
use crate::deliver::Deliverer;
use crate::delivery_log::DeliveryLog;
use crate::handoff::Handoff;
use crate::hooks::HookRegistry;
use crate::metrics::ConsumerMetrics;
use crate::rate_limit::RateLimiter;

/// Everything both paths share.
pub struct Context {
    pub config: ConsumerConfig,
    pub store: Arc<dyn CiStore>,
    pub codec: Codec,
    pub hooks: HookRegistry,
    pub deliverer: Deliverer,
    /// Where each attempt is recorded (off: nothing is).
    pub log: DeliveryLog,
    pub handoff: Handoff,
    pub metrics: Arc<ConsumerMetrics>,
    /// The per-root-namespace rate limits (see `rate_limit`).
    pub rate_limits: RateLimiter,
    /// (hook, build) pairs this instance put in an order queue lately, with when: the main
    /// path's per-batch read of which builds have a queue cannot see holds written since by the
    /// batch's own deliveries (see `strict`).
    pub held_here: std::sync::Mutex<std::collections::HashMap<(i64, i64), std::time::Instant>>,
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}
