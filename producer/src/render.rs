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

    #[test]
    fn inline_render_is_the_shared_renderer_output() {
        let snapshot = sample(0);
        let transition = Transition::of_current(&snapshot.build).unwrap();
        let rendered = inline(&snapshot, &transition);
        assert_eq!(
            rendered.payload,
            hookline_cistate::render(&snapshot, &transition)
        );
        let json: serde_json::Value = serde_json::from_slice(&rendered.payload).unwrap();
        assert_eq!(json["build_status"], "running");
    }
}
