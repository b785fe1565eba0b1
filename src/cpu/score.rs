//! Teacher-forced likelihood of real images on the CPU (SPEC.md section 9): the whole
//! sequence (class token, then every block of every scale with the true codes as inputs) as
//! ONE transformer pass with the block-causal mask, then the cross-entropy of every true code.

use super::backend::{scale_sources, step_inputs};
use super::transformer::CpuTransformer;
use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::model::weights::TransformerWeights;
use crate::order::Schedule;
use crate::score::check_inputs;
use anyhow::Result;

/// The statistics type of [`score_codes`] (host-side, shared with the GPU's scorer).
pub use crate::score::ScoreStats;

/// Logits `(B, N, V)` of every position of the sequence, in schedule order (step by step,
/// each step's positions in its order; the class token's output is dropped), from ONE masked
/// pass with the true codes `tokens` (per scale (B, s, s), raster order) as inputs.
pub fn masked_logits(
    cfg: &ModelConfig,
    w: &TransformerWeights,
    schedule: &Schedule,
    labels: &[usize],
    tokens: &[Vec<u32>],
) -> Result<Vec<f32>> {
    let (b, c, v) = (labels.len(), cfg.hidden_size, cfg.codebook_size());
    let n = schedule.total_tokens();
    check_inputs(cfg, schedule, labels, tokens)?;
    let len = 1 + n;
    let mut x = vec![0.0f32; b * len * c]; // (B, 1+N, C)
    for (bi, &cls) in labels.iter().enumerate() {
        x[bi * len * c..][..c].copy_from_slice(&w.class_embeddings[cls * c..(cls + 1) * c]);
    }
    // Class token: RoPE row N for both positions, block 0.
    let (mut cur, mut prev, mut block) = (vec![n], vec![n], vec![0i32]);
    let mut off = 1;
    for si in 0..schedule.scales.len() {
        let src = scale_sources(
            w,
            cfg.code_dim(),
            schedule,
            si,
            tokens.get(si.wrapping_sub(1)),
            b,
        );
        for step in schedule.steps.iter().filter(|st| st.scale == si) {
            let (xs, cs, ps) = step_inputs(w, schedule, step, &src, &tokens[si], b, b);
            let k = cs.len();
            for bi in 0..b {
                x[(bi * len + off) * c..][..k * c].copy_from_slice(&xs[bi * k * c..][..k * c]);
            }
            cur.extend(cs);
            prev.extend(ps);
            block.extend(std::iter::repeat_n(step.t as i32 + 1, k));
            off += k;
        }
    }
    let mut tf = CpuTransformer::new(cfg, w, labels, len);
    tf.forward_masked(&mut x, &cur, &prev, &block);
    let mut out = Vec::with_capacity(b * n * v);
    for bi in 0..b {
        out.extend(tf.logits(&x[(bi * len + 1) * c..(bi + 1) * len * c]));
    }
    Ok(out)
}

/// Score one batch of code pyramids (`tokens`: per scale (B, s, s)) with class `labels` at
/// `steps_per_scale`, adding to `stats`.
pub fn score_codes(
    model: &Model,
    labels: &[usize],
    tokens: &[Vec<u32>],
    steps_per_scale: usize,
    stats: &mut ScoreStats,
) -> Result<()> {
    let (cfg, v) = (&model.config, model.config.codebook_size());
    let schedule = Schedule::uniform(&model.scale_sizes, steps_per_scale)?;
    let logits = masked_logits(cfg, &model.weights, &schedule, labels, tokens)?;
    stats.add(&schedule, &logits, tokens, v)
}
