//! The main path: `build-events` records to deliveries.
//!
//! # Ordering
//!
//! Records of a batch are submitted to the engine in partition order, one delivery per hook.
//! The engine never runs two deliveries of one (hook, build) at once and starts them in arrival
//! order (see `fair`), so a receiver sees one build's transitions in order (key = build id keeps
//! them in one partition). Different builds, different hooks and different partitions run
//! concurrently; a slow receiver holds only its own hook's slots. Across retries the
//! order is kept by `strict` (the default; see `order`): a build's later events queue behind its
//! delivery waiting for a retry. With `--ordering relaxed` they go ahead of it.
//!
//! # Waits
//!
//! A batch is decoded and its hooks and snapshots are loaded in one lookup before its deliveries
//! are spawned. An unreachable schema registry or CI store is waited out (a stall, see
//! `shutdown`) and holds the batch: there is nothing to deliver without them. While dispatch
//! waits for in-flight room the consumer still serves its group (see `intake`); while it waits
//! out the registry or the store it does not (past `max.poll.interval.ms` the group moves on
//! without this member).

use std::collections::HashMap;
use std::sync::Arc;

use hookline_cistate::{Hook, RenderSnapshot};
use rdkafka::Message;
use rdkafka::error::KafkaError;
use rdkafka::message::OwnedMessage;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::context::Context;
use crate::decode::{self, Decoded};
use crate::engine::Work;
use crate::handoff::DeadLetterReason;
use crate::intake::Taken;
use crate::metrics::Stall;
use crate::path::Path;
use crate::resolve::{self, ResolvedPayload};
use crate::shutdown::{Abandoned, wait_out};
use crate::strict;
use crate::task::{DeliveryTask, H_ONLY_HOOK, Source, header};

/// A record of a batch, read: the registry being unreachable is waited out, not returned.
enum Read {
    Event(Box<hookline_schemas::BuildEvent>),
    Undecodable(decode::Undecodable),
}

/// Decodes every record of a batch, waiting out a schema registry that cannot be reached.
async fn decode_batch<'m>(
    cx: &Context,
    batch: impl ExactSizeIterator<Item = &'m OwnedMessage>,
    shutdown: &CancellationToken,
) -> Result<Vec<Read>, Abandoned> {
    let mut out = Vec::with_capacity(batch.len());
    for msg in batch {
        let read = wait_out(
            &cx.metrics,
            Stall::SchemaRegistry,
            "schema registry unavailable",
            shutdown,
            || async {
                match decode::record(&cx.codec, msg.payload()).await {
                    Decoded::Transient(error) => Err(error),
                    Decoded::Event(event) => Ok(Read::Event(event)),
                    Decoded::Undecodable(u) => Ok(Read::Undecodable(u)),
                }
            },
        )
        .await?;
        out.push(read);
    }
    Ok(out)
}

type Lookup = (HashMap<i64, Arc<Vec<Hook>>>, HashMap<i64, RenderSnapshot>);

/// The hooks of every project in the batch and the snapshots of every build to render: one
/// lookup per batch. The store being down holds the batch (and so the partition) until it is
/// back: there is nothing to deliver without it.
async fn lookup(
    cx: &Context,
    decoded: &[Read],
    shutdown: &CancellationToken,
) -> Result<Lookup, Abandoned> {
    let events: Vec<_> = decoded
        .iter()
        .filter_map(|d| match d {
            Read::Event(e) => Some(e.as_ref()),
            Read::Undecodable(_) => None,
        })
        .collect();
    wait_out(
        &cx.metrics,
        Stall::Store,
        "store unavailable; batch waits",
        shutdown,
        || async {
            let hooks = cx
                .hooks
                .for_projects(events.iter().map(|e| e.project_id))
                .await?;
            // Only builds with someone to deliver to need a render.
            let with_hooks = events
                .iter()
                .copied()
                .filter(|e| hooks.get(&e.project_id).is_some_and(|h| !h.is_empty()));
            let snapshots = resolve::load_snapshots(cx.store.as_ref(), with_hooks).await?;
            Ok::<_, hookline_cistate::StoreError>((hooks, snapshots))
        },
    )
    .await
}

/// The main path: `build-events` to deliveries, until `shutdown` (or a fatal error of its
/// client, returned with the path). The engine's drain and the last commit are the caller's.
pub(crate) async fn run(path: Path, shutdown: CancellationToken) -> (Path, Option<KafkaError>) {
    let mut intake = path.intake();
    while let Some(batch) = intake
        .next_batch(path.cx.config.poll_batch, &shutdown)
        .await
    {
        if dispatch(&path, batch, &shutdown).await.is_err() {
            break;
        }
    }
    let fatal = intake.fatal();
    drop(intake);
    (path, fatal)
}

/// Decodes a batch, loads what it needs in one lookup, and submits its deliveries.
async fn dispatch(
    path: &Path,
    batch: Vec<Taken>,
    shutdown: &CancellationToken,
) -> Result<(), Abandoned> {
    let cx = &path.cx;
    let decoded = decode_batch(cx, batch.iter().map(|(msg, _, _)| msg), shutdown).await?;
    // Which builds have an order queue (strict ordering) is read beside the hooks and
    // snapshots, so it adds no round trip to the batch.
    let ((hooks, snapshots), queued) = tokio::try_join!(
        lookup(cx, &decoded, shutdown),
        strict::queued_pairs(
            cx,
            decoded.iter().filter_map(|d| match d {
                Read::Event(e) => Some(e.build_id),
                Read::Undecodable(_) => None,
            }),
            shutdown,
        )
    )?;
    for ((msg, ticket, permit), decoded) in batch.into_iter().zip(decoded) {
        let taken = (ticket, permit);
        let event = match decoded {
            Read::Event(event) => event,
            Read::Undecodable(u) => {
                warn!(partition = msg.partition(), offset = msg.offset(), reason = u.reason, detail = %u.detail, "undecodable record; dead-lettered");
                path.spawn_record(path.claim(taken, 1), move |cx, abandon| async move {
                    let reason = DeadLetterReason::Undecodable(u.reason);
                    cx.handoff
                        .dead_letter_record(&msg, reason, &u.detail, &abandon)
                        .await
                        .map(drop)
                });
                continue;
            }
        };
        let mut project_hooks = hooks.get(&event.project_id).cloned().unwrap_or_default();
        let only_hook = header(msg.headers(), H_ONLY_HOOK);
        if let Some(only) = &only_hook {
            // A replay of one dead-lettered delivery: the other hooks already had this event.
            let only: Option<i64> = only.parse().ok();
            project_hooks = Arc::new(
                project_hooks
                    .iter()
                    .filter(|h| Some(h.id) == only)
                    .cloned()
                    .collect(),
            );
        }
        if project_hooks.is_empty() {
            path.finish_record(taken);
            continue;
        }
        if let Some(skip) = resolve::skip(&event, &snapshots) {
            // Nothing to deliver, by design: the record is finished.
            cx.metrics.event_skipped(skip.as_str());
            info!(build_id = event.build_id, event_id = %event.event_id, reason = skip.as_str(), ?skip, "no hook sent: {skip}");
            path.finish_record(taken);
            continue;
        }
        let resolved = match resolve::payload(&event, &snapshots) {
            Ok(resolved) => resolved,
            Err(missing) => {
                warn!(build_id = missing.build_id, event_id = %event.event_id, "build no longer exists; dead-lettered");
                path.spawn_record(path.claim(taken, 1), move |cx, abandon| async move {
                    let detail =
                        format!("build {} not found in the CI state store", missing.build_id);
                    let reason = DeadLetterReason::BuildNotFound;
                    cx.handoff
                        .dead_letter_record(&msg, reason, &detail, &abandon)
                        .await
                        .map(drop)
                });
                continue;
            }
        };
        if let ResolvedPayload::RenderedFromCurrentState {
            stale: true,
            current_status,
            ..
        } = &resolved
        {
            cx.metrics.stale_render();
            info!(build_id = event.build_id, event_status = %event.status, %current_status, event_id = %event.event_id, "stale render: the build has moved on");
        }
        let body = resolved.body().clone();
        let source = Source::of(&msg);
        // Finished when every hook's delivery reached an end (none abandoned).
        let claim = path.claim(taken, project_hooks.len());
        for hook in project_hooks.iter() {
            let task = DeliveryTask {
                event_id: event.event_id,
                build_id: event.build_id,
                project_id: event.project_id,
                hook_id: hook.id,
                attempts: 0,
                occurred_at: event.occurred_at,
                body: body.clone(),
                last_error: None,
                source: Some(source.clone()),
                replayed: only_hook.is_some(),
                rate_token_for: None,
                resend: false,
            };
            let queued = queued.contains(&(hook.id, event.build_id));
            path.engine.submit(
                Work::Main {
                    task,
                    hook: hook.clone(),
                    queued,
                },
                claim.clone(),
            );
        }
    }
    Ok(())
}
