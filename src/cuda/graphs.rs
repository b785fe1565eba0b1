//! The CUDA graph cache of one batch's buffers, as a typed state machine: per [`GraphKey`]
//! (the loop's [`LoopSignature`] and the scale it decodes at its end), a [`GraphState`]:
//!
//! ```text
//! Cold --(first loop: eager, the warm-up)--> Warm --(second: captured)--> Captured
//!                                             |  \--(capture failed with timestamps in it:
//!                                             |      retried once without them)--> Warm
//!                                             \--(capture failed)--> Failed(reason)
//! ```
//! [`GraphCache::decide`] is the one place that chooses replay, capture or eager launches
//! (`GpuBackend::run_loop` in cuda/engine.rs carries the choice out, and reruns a loop whose
//! capture failed eagerly); a Captured graph is replayed for every later loop of its key, a
//! Failed key always runs eagerly. The graphs launch on the batch's buffers and are dropped
//! with them (the cache lives in the batch); the graphs that decode are dropped when the
//! decode buffers are replaced, their keys Warm again ([`GraphCache::drop_decoding`]).

use super::Graph;
use crate::pipeline::LoopSignature;
use std::collections::HashMap;

/// What a recorded loop's launches depend on besides the batch's shape (the cache is per
/// batch) and its inputs (labels, seed and first image, which a replay reads from device
/// memory).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct GraphKey {
    /// Guidance, its start step, the token policy ([`crate::pipeline::LoopPlan`]).
    pub signature: LoopSignature,
    /// The scale decoded at the end of the loop, inside the graph, if any.
    pub decode: Option<usize>,
}

/// Why a key runs eagerly for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// The stream could not enter capture mode.
    BeginCapture(String),
    /// A launch, GEMM or memset was refused during the capture, or ending it failed (after
    /// the retry without timestamps).
    Capture(String),
}

impl std::fmt::Display for FailReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FailReason::BeginCapture(e) => write!(f, "the capture could not begin: {e}"),
            FailReason::Capture(e) => f.write_str(e),
        }
    }
}

/// One key's state (a key absent from the cache is Cold: never run).
pub enum GraphState {
    /// Ran eagerly once: the next loop is captured.
    Warm,
    /// Recorded; `timed`: the graph records the loop's timestamps.
    Captured { graph: Graph, timed: bool },
    /// Never captured again.
    Failed(FailReason),
}

/// How the next loop of a key runs.
pub enum Decision<'a> {
    /// Replay this graph (it records timestamps when `timed`).
    Replay { graph: &'a Graph, timed: bool },
    /// Capture the loop, with timestamps in it when `timed`.
    Capture { timed: bool },
    /// Launch eagerly (with timestamps).
    Eager,
}

/// The graphs of one batch's buffers and what is known about each key.
#[derive(Default)]
pub struct GraphCache {
    states: HashMap<GraphKey, GraphState>,
    /// A capture with timestamps in it failed once: later captures leave them out (the loop is
    /// then untimed when replayed) before a key is given up.
    untimed: bool,
}

impl GraphCache {
    /// The one decision: replay a Captured key, capture a Warm one, run a Cold one eagerly
    /// (it becomes Warm) and a Failed one eagerly. `key` None: the loop may not be recorded.
    pub fn decide(&mut self, key: Option<&GraphKey>) -> Decision<'_> {
        let Some(key) = key else {
            return Decision::Eager;
        };
        let untimed = self.untimed;
        match self.states.get(key) {
            Some(GraphState::Captured { .. }) => match &self.states[key] {
                GraphState::Captured { graph, timed } => Decision::Replay {
                    graph,
                    timed: *timed,
                },
                _ => unreachable!(),
            },
            Some(GraphState::Warm) => Decision::Capture { timed: !untimed },
            Some(GraphState::Failed(_)) => Decision::Eager,
            None => {
                self.states.insert(key.clone(), GraphState::Warm);
                Decision::Eager
            }
        }
    }

    /// The capture of `key` succeeded.
    pub fn captured(&mut self, key: GraphKey, graph: Graph, timed: bool) {
        self.states
            .insert(key, GraphState::Captured { graph, timed });
    }

    /// The capture of `key` failed. A capture with timestamps in it is retried once without
    /// them (the key stays Warm, every later capture is untimed); otherwise the key is Failed.
    /// Returns whether it is (given up for good).
    pub fn capture_failed(&mut self, key: &GraphKey, reason: FailReason) -> bool {
        let retry = !self.untimed && matches!(reason, FailReason::Capture(_));
        if retry {
            self.untimed = true;
        } else {
            self.states.insert(key.clone(), GraphState::Failed(reason));
        }
        !retry
    }

    /// Drop the graphs that decode at the end of the loop (their decode buffers are being
    /// replaced): those Captured keys are Warm again (the next loop captures anew on the new
    /// buffers); Warm and Failed keys keep their state.
    pub fn drop_decoding(&mut self) {
        for (k, state) in self.states.iter_mut() {
            if k.decode.is_some() && matches!(state, GraphState::Captured { .. }) {
                *state = GraphState::Warm;
            }
        }
    }

    /// The state of `key` (None: Cold).
    pub fn state(&self, key: &GraphKey) -> Option<&GraphState> {
        self.states.get(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(decode: Option<usize>) -> GraphKey {
        GraphKey {
            signature: LoopSignature::default(),
            decode,
        }
    }

    #[test]
    fn cold_warm_capture_and_failures() {
        let mut c = GraphCache::default();
        let k = key(None);
        assert!(matches!(c.decide(None), Decision::Eager));
        assert!(matches!(c.decide(Some(&k)), Decision::Eager));
        assert!(matches!(c.state(&k), Some(GraphState::Warm)));
        assert!(matches!(
            c.decide(Some(&k)),
            Decision::Capture { timed: true }
        ));
        // A timed capture fails: retried untimed, then given up.
        assert!(!c.capture_failed(&k, FailReason::Capture("refused".into())));
        assert!(matches!(
            c.decide(Some(&k)),
            Decision::Capture { timed: false }
        ));
        assert!(c.capture_failed(&k, FailReason::Capture("refused".into())));
        assert!(matches!(c.state(&k), Some(GraphState::Failed(_))));
        assert!(matches!(c.decide(Some(&k)), Decision::Eager));
        // A decoding key's graph goes when its buffers are replaced (Warm: captured anew);
        // the other keys keep their state.
        let d = key(Some(3));
        c.decide(Some(&d));
        c.captured(d.clone(), Graph::empty_for_tests(), true);
        assert!(matches!(c.decide(Some(&d)), Decision::Replay { .. }));
        c.drop_decoding();
        assert!(matches!(c.state(&d), Some(GraphState::Warm)));
        assert!(matches!(c.state(&k), Some(GraphState::Failed(_))));
    }
}
