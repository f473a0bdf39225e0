//! The body to send for an event: the producer's embedded payload as it is, or a render from the
//! build's current state with the event's own facts pinned (legacy and deferred events).
//!
//! Snapshots are loaded for a whole poll batch in one store query ([`load_snapshots`]); the
//! per-event steps ([`skip`], [`payload`]) are pure.
//!
//! Builds of blocked users send no hooks (as in GitLab). The producer does not emit events for
//! them at all; a deferred event whose build's user was blocked after the transition is caught
//! here, when the consumer renders from current state, as GitLab's worker decided when it loaded
//! the build. An embedded payload was decided at the transition and is sent.

use std::collections::HashMap;

use bytes::Bytes;
use hookline_cistate::{CiStore, NoHook, RenderSnapshot, StoreError, Transition, is_stale, render};
use hookline_schemas::BuildEvent;

/// Where an event's body came from.
#[derive(Debug, Clone, PartialEq)]
pub enum ResolvedPayload {
    /// Rendered by the producer at the transition; sent byte for byte.
    Embedded(Bytes),
    /// Rendered now from the current state, the event's facts pinned. `stale` when the build's
    /// current status is no longer the event's.
    RenderedFromCurrentState {
        body: Bytes,
        stale: bool,
        current_status: String,
    },
}

impl ResolvedPayload {
    pub fn body(&self) -> &Bytes {
        match self {
            ResolvedPayload::Embedded(body)
            | ResolvedPayload::RenderedFromCurrentState { body, .. } => body,
        }
    }
}

/// The event's build is gone from the store: nothing to render from.
#[derive(Debug, Clone, PartialEq)]
pub struct BuildMissing {
    pub build_id: i64,
}

/// Whether `event` sends no hook: only events rendered from current state are checked, and a
/// missing snapshot is [`payload`]'s to report.
pub fn skip(event: &BuildEvent, snapshots: &HashMap<i64, RenderSnapshot>) -> Option<NoHook> {
    if !needs_snapshot(event) {
        return None;
    }
    hookline_cistate::no_hook(snapshots.get(&event.build_id)?)
}

/// True when the event needs a snapshot to be delivered.
pub fn needs_snapshot(event: &BuildEvent) -> bool {
    event.payload.is_none()
}

/// The snapshots of every build in `events` that carries no payload, in one query.
pub async fn load_snapshots<'a>(
    store: &dyn CiStore,
    events: impl IntoIterator<Item = &'a BuildEvent>,
) -> Result<HashMap<i64, RenderSnapshot>, StoreError> {
    let mut ids: Vec<i64> = events
        .into_iter()
        .filter(|e| needs_snapshot(e))
        .map(|e| e.build_id)
        .collect();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(HashMap::new());
    }
    store.snapshots(&ids).await
}

/// The body for `event`, given the batch's snapshots.
pub fn payload(
    event: &BuildEvent,
    snapshots: &HashMap<i64, RenderSnapshot>,
) -> Result<ResolvedPayload, BuildMissing> {
    if let Some(payload) = &event.payload {
        return Ok(ResolvedPayload::Embedded(Bytes::copy_from_slice(payload)));
    }
    let snapshot = snapshots.get(&event.build_id).ok_or(BuildMissing {
        build_id: event.build_id,
    })?;
    Ok(ResolvedPayload::RenderedFromCurrentState {
        body: Bytes::from(render(snapshot, &Transition::of_event(event))),
        stale: is_stale(snapshot, event.status),
        current_status: snapshot.build.status.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use hookline_cistate::fixtures::sample;
    use hookline_schemas::{BuildStatus, PayloadTiming, TransitionFacts};
    use uuid::Uuid;

    fn event(
        snapshot: &RenderSnapshot,
        status: BuildStatus,
        payload: Option<Vec<u8>>,
    ) -> BuildEvent {
        BuildEvent {
            event_id: Uuid::new_v4(),
            build_id: snapshot.build.id,
            project_id: snapshot.project.id,
            pipeline_id: snapshot.pipeline.id,
            status,
            occurred_at: Utc::now(),
            facts: TransitionFacts::default(),
            payload,
            payload_timing: PayloadTiming::Deferred,
        }
    }

    #[test]
    fn embedded_bytes_are_sent_as_they_are() {
        let snap = sample(0);
        let e = event(
            &snap,
            BuildStatus::Running,
            Some(b"{\"exact\": 1 }".to_vec()),
        );
        let resolved = payload(&e, &HashMap::new()).unwrap();
        assert_eq!(
            resolved,
            ResolvedPayload::Embedded(Bytes::from_static(b"{\"exact\": 1 }"))
        );
    }

    #[test]
    fn legacy_event_is_rendered_with_its_status_pinned_and_marked_stale() {
        let snap = sample(0); // currently running
        let e = event(&snap, BuildStatus::Pending, None);
        let snapshots = HashMap::from([(snap.build.id, snap.clone())]);
        let ResolvedPayload::RenderedFromCurrentState {
            body,
            stale,
            current_status,
        } = payload(&e, &snapshots).unwrap()
        else {
            panic!("expected a render");
        };
        let json: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(json["build_status"], "pending");
        assert!(stale);
        assert_eq!(current_status, "running");

        let current = event(&snap, BuildStatus::Running, None);
        let resolved = payload(&current, &snapshots).unwrap();
        assert!(matches!(
            resolved,
            ResolvedPayload::RenderedFromCurrentState { stale: false, .. }
        ));
    }

    #[test]
    fn a_blocked_user_skips_rendered_events_but_not_embedded_ones() {
        let mut snap = sample(0);
        let deferred = event(&snap, BuildStatus::Running, None);
        let embedded = event(&snap, BuildStatus::Running, Some(b"{}".to_vec()));
        let unblocked = HashMap::from([(snap.build.id, snap.clone())]);
        assert_eq!(skip(&deferred, &unblocked), None);
        snap.user.blocked = true;
        let blocked = HashMap::from([(snap.build.id, snap.clone())]);
        assert_eq!(
            skip(&deferred, &blocked),
            Some(NoHook::UserBlocked {
                user_id: snap.user.id
            })
        );
        assert_eq!(skip(&embedded, &blocked), None, "decided at the transition");
        assert_eq!(
            skip(&deferred, &HashMap::new()),
            None,
            "missing is payload's"
        );
    }

    #[test]
    fn missing_build_is_reported() {
        let snap = sample(0);
        let e = event(&snap, BuildStatus::Pending, None);
        assert_eq!(
            payload(&e, &HashMap::new()),
            Err(BuildMissing {
                build_id: snap.build.id
            })
        );
    }
}
