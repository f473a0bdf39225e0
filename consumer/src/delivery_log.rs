//! The delivery log's writer and keeper: every attempt (main path, retry path, test, resend)
//! becomes a row of `delivery_log` (see `hookline_cistate::delivery_log`), written off the
//! delivery path.
//!
//! ```text
//! step --record (try_send, never waits)--> bounded channel --> writer: one INSERT per 100 ms or 500 rows
//!                  | full (rows or bytes): row dropped, counted      | failed or too slow: batch dropped, counted
//! keeper: at start and every hour, partitions for today + 2 days; partitions past the retention dropped
//! ```
//!
//! A delivery never waits for the log: when the database is slow or down, rows are dropped and
//! counted (`hookline_consumer_delivery_log_dropped_total`), and the delivery goes on.
//!
//! The buffer is bounded twice: by rows (`buffer`) and by the bytes those rows hold
//! (`buffer_bytes`, about what each row's strings and headers take in memory). A row is up to
//! 16 KB of request body, 8 KB of answer and 50 headers of 1 KB, so 10,000 rows alone could hold
//! most of a gigabyte while the database is away; the byte bound keeps that to what the operator
//! chose.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use chrono::{Days, Utc};
use hookline_cistate::PgPool;
use hookline_cistate::delivery_log::{self, DeliveryLogEntry};
use hookline_shell::supervise::Supervisor;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::metrics::ConsumerMetrics;

/// The log's options.
#[derive(Debug, Clone)]
pub struct DeliveryLogConfig {
    /// Write the log (PostgreSQL stores only; with the in-memory store there is none).
    pub enabled: bool,
    /// Daily partitions older than this are dropped (GitLab keeps 14 days).
    pub retention: Duration,
    /// Rows waiting to be written; past it rows are dropped.
    pub buffer: usize,
    /// Bytes those rows may hold ([`approx_bytes`]); past it rows are dropped.
    pub buffer_bytes: usize,
    /// Rows per INSERT, at most.
    pub batch: usize,
    /// How long a row may wait for its batch to fill.
    pub flush_interval: Duration,
    /// How long one INSERT may take before its rows are dropped.
    pub write_timeout: Duration,
    /// How often partitions are created ahead and old ones dropped.
    pub maintenance_interval: Duration,
}

impl Default for DeliveryLogConfig {
    fn default() -> Self {
        DeliveryLogConfig {
            enabled: true,
            retention: DEFAULT_RETENTION,
            buffer: 10_000,
            buffer_bytes: DEFAULT_BUFFER_BYTES,
            batch: 500,
            flush_interval: Duration::from_millis(100),
            write_timeout: Duration::from_secs(5),
            maintenance_interval: Duration::from_secs(3600),
        }
    }
}

/// The default byte bound of the buffer: 32 MiB, a few thousand typical rows or over a
/// thousand of the largest.
pub const DEFAULT_BUFFER_BYTES: usize = 32 * 1024 * 1024;

/// About what a row holds in memory: its strings, its headers' names and values, and a fixed
/// part for the rest. An estimate (allocator slack is not counted), cheap enough for every
/// attempt.
pub fn approx_bytes(entry: &DeliveryLogEntry) -> usize {
    fn json(value: &serde_json::Value) -> usize {
        match value {
            serde_json::Value::String(s) => s.len() + 24,
            serde_json::Value::Array(items) => items.iter().map(json).sum::<usize>() + 24,
            serde_json::Value::Object(map) => {
                map.iter()
                    .map(|(k, v)| k.len() + 24 + json(v))
                    .sum::<usize>()
                    + 48
            }
            _ => 16,
        }
    }
    let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
    std::mem::size_of::<DeliveryLogEntry>()
        + entry.idempotency_key.len()
        + entry.url.len()
        + entry.request_body_sha256.len()
        + text(&entry.request_body)
        + text(&entry.internal_error)
        + text(&entry.response_body)
        + json(&entry.request_headers)
        + entry.response_headers.as_ref().map_or(0, json)
}

/// GitLab's retention of `web_hook_logs`.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(14 * 86_400);
/// Partitions are created for today and this many days ahead.
pub const DAYS_AHEAD: u32 = 2;

/// The handle attempts are recorded through; cheap to clone. Off, it records nothing.
#[derive(Debug, Clone)]
pub struct DeliveryLog {
    sender: Option<mpsc::Sender<Queued>>,
    metrics: Arc<ConsumerMetrics>,
    /// Bytes of the rows queued and not yet taken by the writer.
    queued_bytes: Arc<AtomicUsize>,
    buffer_bytes: usize,
}

/// A row in the buffer and the bytes it was counted as.
#[derive(Debug)]
struct Queued {
    entry: DeliveryLogEntry,
    bytes: usize,
}

/// The writer and keeper tasks of a running log; dropped, they stop (the writer after one last
/// flush). They run under the consumer's supervisor: a writer that died would leave every row
/// dropped for good, so it stops the consumer instead.
#[derive(Debug)]
pub struct DeliveryLogTasks {
    stop: CancellationToken,
    writer: Option<JoinHandle<()>>,
    /// The consumer's stop: the log stops only when the consumer does.
    consumer_stop: CancellationToken,
}

impl DeliveryLogTasks {
    /// Stops the keeper, and the writer after it flushed what it holds (within its write
    /// timeout).
    pub async fn stop(mut self) {
        self.consumer_stop.cancel();
        self.stop.cancel();
        if let Some(writer) = self.writer.take() {
            let _ = writer.await;
        }
    }
}

impl Drop for DeliveryLogTasks {
    fn drop(&mut self) {
        self.consumer_stop.cancel();
        self.stop.cancel();
    }
}

impl DeliveryLog {
    /// A log that records nothing.
    pub fn off(metrics: Arc<ConsumerMetrics>) -> DeliveryLog {
        DeliveryLog {
            sender: None,
            metrics,
            queued_bytes: Arc::default(),
            buffer_bytes: 0,
        }
    }

    /// Starts the writer and the keeper on `pool`, as tasks of `supervisor`.
    pub fn start(
        pool: PgPool,
        config: &DeliveryLogConfig,
        metrics: Arc<ConsumerMetrics>,
        supervisor: &Supervisor,
    ) -> (DeliveryLog, DeliveryLogTasks) {
        let (sender, receiver) = mpsc::channel(config.buffer.max(1));
        let stop = CancellationToken::new();
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        let writing = write(
            pool.clone(),
            Buffered {
                receiver,
                queued_bytes: queued_bytes.clone(),
            },
            config.clone(),
            metrics.clone(),
            stop.clone(),
        );
        let writer = supervisor.spawn_service("delivery-log writer", async move {
            writing.await;
            Ok::<(), std::convert::Infallible>(())
        });
        let keeping = keep(pool, config.clone(), stop.clone());
        supervisor.spawn_service("delivery-log keeper", async move {
            keeping.await;
            Ok::<(), std::convert::Infallible>(())
        });
        (
            DeliveryLog {
                sender: Some(sender),
                metrics,
                queued_bytes,
                buffer_bytes: config.buffer_bytes.max(1),
            },
            DeliveryLogTasks {
                stop,
                writer: Some(writer),
                consumer_stop: supervisor.stop().clone(),
            },
        )
    }

    pub fn is_on(&self) -> bool {
        self.sender.is_some()
    }

    /// Queues `entry` for writing, never waiting: a buffer full of rows or of bytes drops it
    /// (counted).
    pub fn record(&self, entry: DeliveryLogEntry) {
        let Some(sender) = &self.sender else {
            return;
        };
        let bytes = approx_bytes(&entry);
        // Reserve the bytes first, so concurrent recorders cannot overshoot the bound together.
        let reserved = self
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + bytes <= self.buffer_bytes).then_some(queued + bytes)
            })
            .is_ok();
        if !reserved {
            self.metrics.delivery_log_dropped_rows(1);
            return;
        }
        if sender.try_send(Queued { entry, bytes }).is_err() {
            self.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.metrics.delivery_log_dropped_rows(1);
        }
    }

    /// Bytes of the rows waiting to be written (for tests and diagnostics).
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Acquire)
    }
}

/// The writer's end of the buffer: taking a row gives its bytes back.
struct Buffered {
    receiver: mpsc::Receiver<Queued>,
    queued_bytes: Arc<AtomicUsize>,
}

impl Buffered {
    fn taken(&self, queued: Queued) -> DeliveryLogEntry {
        self.queued_bytes.fetch_sub(queued.bytes, Ordering::AcqRel);
        queued.entry
    }

    async fn recv(&mut self) -> Option<DeliveryLogEntry> {
        let queued = self.receiver.recv().await?;
        Some(self.taken(queued))
    }

    fn try_recv(&mut self) -> Option<DeliveryLogEntry> {
        let queued = self.receiver.try_recv().ok()?;
        Some(self.taken(queued))
    }
}

/// Writes batches until `stop`, then flushes what is left once.
async fn write(
    pool: PgPool,
    mut receiver: Buffered,
    config: DeliveryLogConfig,
    metrics: Arc<ConsumerMetrics>,
    stop: CancellationToken,
) {
    let batch_size = config.batch.max(1);
    let mut batch: Vec<DeliveryLogEntry> = Vec::with_capacity(batch_size);
    // Whether the last write failed, so an outage is logged once, not every 100 ms.
    let mut failing = false;
    loop {
        let deadline = tokio::time::sleep(config.flush_interval);
        tokio::pin!(deadline);
        let mut closed = false;
        while batch.len() < batch_size {
            tokio::select! {
                _ = &mut deadline => break,
                _ = stop.cancelled() => { closed = true; break }
                received = receiver.recv() => match received {
                    Some(entry) => batch.push(entry),
                    None => { closed = true; break }
                },
            }
        }
        if closed {
            // Take what is already queued, then write it all.
            receiver.receiver.close();
            while let Some(entry) = receiver.try_recv() {
                batch.push(entry);
            }
        }
        for chunk in batch.chunks(batch_size) {
            flush(&pool, chunk, &config, &metrics, &mut failing).await;
        }
        batch.clear();
        if closed {
            return;
        }
    }
}

async fn flush(
    pool: &PgPool,
    rows: &[DeliveryLogEntry],
    config: &DeliveryLogConfig,
    metrics: &ConsumerMetrics,
    failing: &mut bool,
) {
    if rows.is_empty() {
        return;
    }
    let n = rows.len() as u64;
    // The server gives up on the statement itself (a row dropped is then not written later
    // behind the client's back); the client's own bound, a little longer, covers a database
    // that does not answer at all.
    let bound = config.write_timeout + Duration::from_secs(1);
    let write = delivery_log::append_within(pool, rows, config.write_timeout);
    match tokio::time::timeout(bound, write).await {
        Ok(Ok(written)) => {
            metrics.delivery_log_wrote(written);
            if std::mem::take(failing) {
                info!("delivery log writes resumed");
            }
        }
        Ok(Err(error)) => {
            metrics.delivery_log_dropped_rows(n);
            if !std::mem::replace(failing, true) {
                warn!(%error, rows = n, "delivery log write failed; rows dropped until it works again");
            }
        }
        Err(_) => {
            metrics.delivery_log_dropped_rows(n);
            if !std::mem::replace(failing, true) {
                warn!(timeout = ?config.write_timeout, rows = n, "delivery log write too slow; rows dropped until it works again");
            }
        }
    }
}

/// Creates the coming days' partitions and drops those past the retention, now and every
/// `maintenance_interval`. A failure is logged and tried again next time: rows of a day
/// without its partition land in the default partition meanwhile.
async fn keep(pool: PgPool, config: DeliveryLogConfig, stop: CancellationToken) {
    let mut tick = tokio::time::interval(config.maintenance_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(error) = maintain(&pool, config.retention).await {
            warn!(%error, "delivery log maintenance failed; trying again later");
        }
    }
}

/// One round of the keeper: partitions for today and [`DAYS_AHEAD`] days, and the days before
/// `now - retention` dropped (a day goes once all of it is past the retention).
pub async fn maintain(
    pool: &PgPool,
    retention: Duration,
) -> Result<delivery_log::Pruned, hookline_cistate::StoreError> {
    let today = Utc::now().date_naive();
    let created = delivery_log::ensure_partitions(pool, today, DAYS_AHEAD).await?;
    let days = retention.as_secs().div_ceil(86_400);
    let keep_from = today
        .checked_sub_days(Days::new(days))
        .unwrap_or(chrono::NaiveDate::MIN);
    let pruned = delivery_log::prune(pool, keep_from).await?;
    debug!(created, dropped = pruned.partitions, default_rows = pruned.default_rows, %keep_from, "delivery log maintained");
    Ok(pruned)
}
