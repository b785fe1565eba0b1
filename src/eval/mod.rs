//! Evaluation: the metrics of OpenAI's ADM evaluator (openai/guided-diffusion
//! `evaluations/evaluator.py`: FID, sFID, Inception Score, precision and recall) computed
//! from Inception activations, the activation file format, and the image inputs it reads.

pub mod activations;
pub mod input;
pub mod metrics;
