//! Teacher-forced likelihood of real images on the CPU (SPEC.md section 9): the whole
//! sequence (class token, then every block of every scale with the true codes as inputs) as
//! ONE transformer pass with the block-causal mask, then the cross-entropy of every true code.

use super::backend::{scale_sources, step_inputs};
use super::transformer::CpuTransformer;
use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::model::weights::TransformerWeights;
use crate::order::Schedule;
use anyhow::{Result, bail};

/// Sums of one or more scored batches at one steps-per-scale value.
#[derive(Clone, Debug, PartialEq)]
pub struct ScoreStats {
    pub steps_per_scale: usize,
    pub serial_steps: usize,
    /// Scale sides, ascending.
    pub scale_sizes: Vec<usize>,
    pub images: usize,
    /// Per scale: the sum of -ln p(true code) over its positions and images (nats).
    pub nll_sum: Vec<f64>,
    /// Per scale: how many true codes were the argmax (lowest index on a tie).
    pub top1_hits: Vec<usize>,
}

impl ScoreStats {
    pub fn new(schedule: &Schedule, steps_per_scale: usize) -> Self {
        let n = schedule.scales.len();
        ScoreStats {
            steps_per_scale,
            serial_steps: schedule.total_steps(),
            scale_sizes: schedule.scale_sizes(),
            images: 0,
            nll_sum: vec![0.0; n],
            top1_hits: vec![0; n],
        }
    }

    fn tokens(&self, si: usize) -> f64 {
        (self.images * self.scale_sizes[si].pow(2)) as f64
    }

    /// Mean cross-entropy of each scale's codes, nats.
    pub fn loss_by_scale(&self) -> Vec<f64> {
        (0..self.scale_sizes.len())
            .map(|si| self.nll_sum[si] / self.tokens(si))
            .collect()
    }

    /// Mean cross-entropy over every position and image, nats.
    pub fn loss_total(&self) -> f64 {
        let n: f64 = (0..self.scale_sizes.len()).map(|si| self.tokens(si)).sum();
        self.nll_sum.iter().sum::<f64>() / n
    }

    /// Top-1 accuracy of each scale.
    pub fn top1_by_scale(&self) -> Vec<f64> {
        (0..self.scale_sizes.len())
            .map(|si| self.top1_hits[si] as f64 / self.tokens(si))
            .collect()
    }

    /// One JSON object (the `score --json` line).
    pub fn to_json(&self) -> serde_json::Value {
        let ln2 = std::f64::consts::LN_2;
        let by = |v: Vec<f64>| -> serde_json::Map<String, serde_json::Value> {
            self.scale_sizes
                .iter()
                .zip(v)
                .map(|(s, x)| (s.to_string(), serde_json::json!(x)))
                .collect()
        };
        serde_json::json!({
            "steps_per_scale": self.steps_per_scale,
            "serial_steps": self.serial_steps,
            "images": self.images,
            "loss_total": self.loss_total(),
            "bits_per_token": self.loss_total() / ln2,
            "loss_by_scale": by(self.loss_by_scale()),
            "top1_by_scale": by(self.top1_by_scale()),
        })
    }
}

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

/// The one check of a scoring batch (labels, code grids per scale, code range) for both
/// backends: a clear error, never a panic.
pub fn check_inputs(
    cfg: &ModelConfig,
    schedule: &Schedule,
    labels: &[usize],
    tokens: &[Vec<u32>],
) -> Result<()> {
    let b = labels.len();
    if b == 0 {
        bail!("no images to score");
    }
    if let Some(&bad) = labels.iter().find(|&&l| l >= cfg.num_classes) {
        bail!(
            "class id {bad} is out of range: this model has {} classes (0..{})",
            cfg.num_classes,
            cfg.num_classes - 1
        );
    }
    if tokens.len() != schedule.scales.len()
        || tokens
            .iter()
            .zip(&schedule.scales)
            .any(|(t, s)| t.len() != b * s.size * s.size)
    {
        bail!("codes must hold (B, s, s) ids for every scale of the model");
    }
    let v = cfg.codebook_size();
    if tokens.iter().flatten().any(|&t| t as usize >= v) {
        bail!("code id out of range (the codebook has {v} entries)");
    }
    Ok(())
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

impl ScoreStats {
    /// Add one batch: `logits (B, N, V)` of every position in schedule order (as
    /// [`masked_logits`] returns them) against the true codes `tokens` (per scale (B, s, s)).
    pub fn add(
        &mut self,
        schedule: &Schedule,
        logits: &[f32],
        tokens: &[Vec<u32>],
        v: usize,
    ) -> Result<()> {
        let n = schedule.total_tokens();
        let b = logits.len() / (n * v).max(1);
        if logits.len() != b * n * v || self.scale_sizes != schedule.scale_sizes() {
            bail!("score: logits or schedule do not match the statistics");
        }
        for bi in 0..b {
            let mut k = 0;
            for step in &schedule.steps {
                let si = step.scale;
                let cells = schedule.scales[si].size.pow(2);
                for &p in &step.positions {
                    let row = &logits[(bi * n + k) * v..][..v];
                    let truth = tokens[si][bi * cells + p] as usize;
                    let (nll, top) = cross_entropy(row, truth);
                    self.nll_sum[si] += nll;
                    self.top1_hits[si] += usize::from(top == truth);
                    k += 1;
                }
            }
        }
        self.images += b;
        Ok(())
    }
}

/// -ln softmax(row)[truth] (f64 log-sum-exp) and the argmax (lowest index on a tie).
fn cross_entropy(row: &[f32], truth: usize) -> (f64, usize) {
    let (mut top, mut mx) = (0usize, f32::NEG_INFINITY);
    for (i, &x) in row.iter().enumerate() {
        if x > mx {
            (top, mx) = (i, x);
        }
    }
    let lse = row
        .iter()
        .map(|&x| ((x - mx) as f64).exp())
        .sum::<f64>()
        .ln()
        + mx as f64;
    (lse - row[truth] as f64, top)
}
