//! The ADM evaluator without TensorFlow (issue 24): the FID Inception-v3 network
//! ([`inception`]: images -> `pool_3`, `spatial`, `logits` per image, the features ADM's
//! `evaluations/evaluator.py` reads from the 2015-12-05 TF graph), the evaluator's metrics
//! ([`metrics`]: FID, sFID, Inception Score, precision and recall from activations), the
//! activation file format ([`activations`]), the image inputs it reads ([`input`]), and one
//! evaluation end to end ([`run`]).

pub mod activations;
pub mod inception;
pub mod input;
pub mod metrics;
pub mod resize;
pub mod run;
