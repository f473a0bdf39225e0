//! The inline render: the Job Hook of one transition, rendered at the moment it happens by the
//! one renderer the consumer also uses, and timed (the cost operators weigh during a rollout).

use std::time::{Duration, Instant};

use hookline_cistate::{RenderSnapshot, Transition};

/// Job Hook bytes and what they cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Rendered {
    pub payload: Vec<u8>,
    pub took: Duration,
}

/// Renders `transition` over `snapshot` (the transition's facts pinned).
pub fn inline(snapshot: &RenderSnapshot, transition: &Transition) -> Rendered {
    let started = Instant::now();
    let payload = hookline_cistate::render(snapshot, transition);
    Rendered {
        payload,
        took: started.elapsed(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hookline_cistate::fixtures::sample;

    /// The producer renders the moment of the transition, not the build's row as stored: a
    /// transition to `success` over a row still saying `running` is a `success` hook with the
    /// transition's own duration.
    #[test]
    fn an_inline_render_describes_the_transition_not_the_stored_row() {
        let snapshot = sample(0);
        assert_eq!(snapshot.build.status, "running");
        let mut transition = Transition::of_current(&snapshot.build).unwrap();
        transition.status = hookline_schemas::BuildStatus::Success;
        transition.facts.duration = Some(12.5);
        let rendered = inline(&snapshot, &transition);
        let json: serde_json::Value = serde_json::from_slice(&rendered.payload).unwrap();
        assert_eq!(json["build_status"], "success");
        assert_eq!(json["build_duration"], 12.5);
    }
}
