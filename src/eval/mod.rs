//! The ADM evaluator without TensorFlow (issue 24): the FID Inception-v3 network
//! ([`inception`]: images -> `pool_3`, `spatial`, `logits` per image, the features ADM's
//! `evaluations/evaluator.py` reads from the 2015-12-05 TF graph).

pub mod inception;
pub mod resize;
