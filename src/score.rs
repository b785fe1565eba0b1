//! The host side of scoring and encoding real images (SPEC.md section 9) that both backends
//! share: the 8-bit image to float conversion and the nearest-code quantization of the
//! pyramid encoding ([`EncodedPyramid`], [`to_planar`], [`quantize`]), the one check of a
//! scoring batch ([`check_inputs`]), and the statistics of teacher-forced scoring
//! ([`ScoreStats`]: f64 cross-entropy and top-1 per scale). `cpu::score` / `cpu::encoder` and
//! `cuda::score` / `cuda::decoder::encoder` compute the logits and code vectors; this module
//! sits below both and uses only `model` and `order`.

use crate::model::config::ModelConfig;
use crate::order::Schedule;
use anyhow::{Result, bail};
use rayon::prelude::*;

/// One image's encoding at every scale of a pyramid (`cuda::decoder::GpuEncoder` fills it
/// for a batch: the images' layouts one after another).
pub struct EncodedPyramid {
    /// Per scale: (e, s, s) normalized code vectors (before quantization).
    pub z: Vec<Vec<f32>>,
    /// Per scale: (s, s) raster code ids.
    pub codes: Vec<Vec<u32>>,
}

/// One 8-bit RGB image `(H, W, 3)` (H = W = `side`) to float `(3, H, W)` by (x / 255 - 0.5) / 0.5.
pub fn to_planar(rgb: &[u8], side: usize) -> Vec<f32> {
    let n = side * side;
    assert_eq!(rgb.len(), 3 * n, "encode: image must be (H, W, 3)");
    let mut img = vec![0.0f32; 3 * n]; // (3, H, W)
    for (p, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            img[c * n + p] = (px[c] as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    img
}

/// Nearest codebook row (Euclidean distance, f64, lowest index on a tie) of each of the `n`
/// cells of `z (e, n)`.
pub fn quantize(z: &[f32], e: usize, n: usize, codebook: &[f32]) -> Vec<u32> {
    assert_eq!(z.len(), e * n);
    (0..n)
        .into_par_iter()
        .map(|p| {
            let mut best = (f64::INFINITY, 0u32);
            for (i, row) in codebook.chunks_exact(e).enumerate() {
                let d: f64 = row
                    .iter()
                    .enumerate()
                    .map(|(c, &v)| (z[c * n + p] as f64 - v as f64).powi(2))
                    .sum();
                if d < best.0 {
                    best = (d, i as u32);
                }
            }
            best.1
        })
        .collect()
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

impl ScoreStats {
    /// Add one batch: `logits (B, N, V)` of every position in schedule order (as
    /// `cpu::score::masked_logits` and `GpuModel::masked_logits` return them) against the true codes `tokens` (per scale (B, s, s)).
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
