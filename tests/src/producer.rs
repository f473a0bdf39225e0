//! `hookline-producer serve`'s API in-process on a loopback port: the real router, emitter and
//! Kafka producer, stopped through its shutdown token as the binary's signal handler would.

use std::sync::Arc;
use std::time::Duration;

use hookline_cistate::CiStore;
use hookline_producer::{AppState, Emitter, EmitterConfig, Flags, ProducerMetrics, run};
use tokio_util::sync::CancellationToken;

/// A running producer API.
pub struct Producer {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    pub metrics: Arc<ProducerMetrics>,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), hookline_producer::ProducerError>>,
}

impl Producer {
    /// Serves `config`'s emitter over `store` and `flags`; `state` adjusts the API's settings
    /// (body limit, `Retry-After`, tokens) from the defaults.
    pub async fn start(
        config: EmitterConfig,
        store: Arc<dyn CiStore>,
        flags: Flags,
        state: impl FnOnce(AppState) -> AppState,
    ) -> Producer {
        let metrics = Arc::new(ProducerMetrics::new());
        let emitter = Emitter::new(config, store, flags, metrics.clone())
            .await
            .expect("emitter");
        let state = state(AppState::new(emitter));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the producer API");
        let url = format!("http://{}", listener.local_addr().unwrap());
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(
            listener,
            state,
            shutdown.clone(),
            Duration::from_secs(10),
        ));
        Producer {
            url,
            metrics,
            shutdown,
            task,
        }
    }

    /// Tells it to stop, as SIGTERM would, without waiting ([`Producer::stop`] waits).
    pub fn begin_stop(&self) {
        self.shutdown.cancel();
    }

    /// Stops it as SIGTERM would, and waits until it has drained.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.expect("join").expect("producer ran");
    }

    /// `GET /metrics`.
    pub async fn metrics_text(&self) -> String {
        reqwest::get(format!("{}/metrics", self.url))
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body")
    }
}
