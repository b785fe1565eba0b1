//! The f32 CPU backend of the step loop: host grids, [`CpuTransformer`] for the steps, the
//! per-kernel references of [`crate::cpu::ops`] for everything around them, and the f32 VQ
//! decoder.

use super::ops;
use super::transformer::CpuTransformer;
use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::model::decoder::DecoderWeights;
use crate::model::weights::TransformerWeights;
use crate::order::{Schedule, Step};
use crate::pipeline::{
    Backend, Decoded, Grids, LoopOutcome, LoopPlan, LoopSteps, SampleOptions, StepChoice,
    StepLogits, Stepper, TokenOutput, elapsed_ms, run_steps,
};
use anyhow::{Context, Result};
use std::time::Instant;

/// The f32 CPU backend.
pub struct CpuBackend<'w> {
    cfg: &'w ModelConfig,
    w: &'w TransformerWeights,
    /// None: a transformer-only backend (golden token tests); `decode` then fails.
    decoder: Option<&'w DecoderWeights>,
    tf: Option<CpuTransformer<'w>>,
    batch: usize,
    guided: bool,
    /// Finished grids, one per scale, and the grid of the current scale; likewise the
    /// probability and entropy grids when the steps record stats.
    grids: Vec<Vec<u32>>,
    grid: Vec<u32>,
    probs: Vec<Vec<f32>>,
    prob: Vec<f32>,
    entropies: Vec<Vec<f32>>,
    entropy: Vec<f32>,
    /// src_fold(h(z0)) of every cell of the current scale, (B, s*s, C).
    src: Vec<f32>,
}

impl<'w> CpuBackend<'w> {
    /// A backend for a whole loaded model (sampling and decoding).
    pub fn new(model: &'w Model) -> Self {
        Self::with_parts(&model.config, &model.weights, Some(&model.decoder))
    }

    /// A backend from the transformer weights alone (and optionally a decoder).
    pub fn with_parts(
        cfg: &'w ModelConfig,
        w: &'w TransformerWeights,
        decoder: Option<&'w DecoderWeights>,
    ) -> Self {
        CpuBackend {
            cfg,
            w,
            decoder,
            tf: None,
            batch: 0,
            guided: false,
            grids: Vec::new(),
            grid: Vec::new(),
            probs: Vec::new(),
            prob: Vec::new(),
            entropies: Vec::new(),
            entropy: Vec::new(),
            src: Vec::new(),
        }
    }

    /// Start a batch of `labels` (doubled with null-class rows when `guided`): the KV cache
    /// and AdaLN modulations, and the class token.
    fn begin(&mut self, schedule: &Schedule, labels: &[usize], guided: bool) {
        let (w, c) = (self.w, self.cfg.hidden_size);
        let n_total = schedule.total_tokens();
        let mut classes = labels.to_vec();
        if guided {
            classes.extend(std::iter::repeat_n(self.cfg.num_classes, labels.len()));
        }
        let mut tf = CpuTransformer::new(self.cfg, w, &classes, 1 + n_total);
        // Class token: input class_embeddings[label], RoPE row N for both positions.
        let mut x = Vec::with_capacity(classes.len() * c);
        for &cls in &classes {
            x.extend_from_slice(&w.class_embeddings[cls * c..(cls + 1) * c]);
        }
        tf.forward(&mut x, &[n_total], &[n_total]);
        self.tf = Some(tf);
        self.batch = labels.len();
        self.guided = guided;
        self.grids.clear();
        self.probs.clear();
        self.entropies.clear();
    }

    /// The sampled grids, per scale (and the statistics' grids when recorded).
    fn finish(&mut self) -> Grids {
        self.tf = None;
        Grids {
            tokens: self.grids.clone(),
            prob: std::mem::take(&mut self.probs),
            entropy: std::mem::take(&mut self.entropies),
        }
    }
}

/// Run the token loop on the CPU from transformer weights alone (no decode).
pub fn sample_tokens(
    cfg: &ModelConfig,
    w: &TransformerWeights,
    o: &SampleOptions,
) -> Result<TokenOutput> {
    run_steps(&mut CpuBackend::with_parts(cfg, w, None), o)
}

/// src_fold(h(z0)) of every cell of scale `si`, (B, s*s, C), codes of `e` dims: z0 is zeros on the first scale,
/// else the previous scale's grid `prev (B, sp, sp)` upscaled and normalized.
pub(crate) fn scale_sources(
    w: &TransformerWeights,
    e: usize,
    schedule: &Schedule,
    si: usize,
    prev: Option<&Vec<u32>>,
    b: usize,
) -> Vec<f32> {
    let s = schedule.scales[si].size;
    let cells = b * s * s;
    let z0 = match prev {
        Some(grid) if si > 0 => {
            let sp = schedule.scales[si - 1].size;
            ops::upsample_codes(&w.codebook, e, grid, b, sp, s)
        }
        _ => vec![0.0f32; cells * e],
    };
    let hid = ops::codevec_hidden(&w.code_hidden, &z0, cells);
    w.src_fold.forward(&hid, cells)
}

/// One step's inputs `x (rows * n, C)` (see [`ops::gather_inputs`]) and its RoPE rows: each
/// cell's own position, and its paired previous-block cell (row N+1, "empty", on a scale's
/// first step). `src (b, s*s, C)` from [`scale_sources`]; `grid (b, s*s)` holds the scale's
/// tokens known so far.
pub(crate) fn step_inputs(
    w: &TransformerWeights,
    schedule: &Schedule,
    step: &Step,
    src: &[f32],
    grid: &[u32],
    rows: usize,
    b: usize,
) -> (Vec<f32>, Vec<usize>, Vec<usize>) {
    let scale = &schedule.scales[step.scale];
    let cur: Vec<usize> = schedule.global_positions(step);
    let prev_global: Option<Vec<usize>> = step
        .prev
        .as_ref()
        .map(|q| q.iter().map(|p| scale.offset + p).collect());
    let x = ops::gather_inputs(
        &w.tables,
        src,
        grid,
        &cur,
        &step.positions,
        prev_global.as_deref().zip(step.prev.as_deref()),
        rows,
        b,
        scale.size * scale.size,
    );
    let n = step.positions.len();
    let prev_rope = prev_global.unwrap_or_else(|| vec![schedule.total_tokens() + 1; n]);
    (x, cur, prev_rope)
}

impl Backend for CpuBackend<'_> {
    fn config(&self) -> &ModelConfig {
        self.cfg
    }

    /// Begin, the pipeline's steps, finish: the CPU records nothing.
    fn run_loop(&mut self, plan: &LoopPlan, steps: &mut LoopSteps) -> Result<LoopOutcome> {
        let t = Instant::now();
        self.begin(plan.schedule, plan.labels, plan.guided);
        let prefill_ms = elapsed_ms(t);
        steps(self)?;
        Ok(LoopOutcome {
            grids: self.finish(),
            replayed: false,
            prefill_ms,
            device_times: None,
        })
    }

    fn decode(&mut self, schedule: &Schedule, si: usize) -> Result<Decoded> {
        let dec = self
            .decoder
            .context("this CPU backend was built without a decoder")?;
        let s = schedule.scales.get(si).context("no such scale")?.size;
        let grid = self.grids.get(si).context("decode before a batch ran")?;
        let images = dec.decode_tokens(grid, self.batch, s);
        Ok(Decoded {
            pixels: ops::pixels(&images),
            images: Some(images),
        })
    }
}

impl Stepper for CpuBackend<'_> {
    fn begin_scale(&mut self, schedule: &Schedule, si: usize) -> Result<()> {
        let b = self.batch;
        let cells = b * schedule.scales[si].size.pow(2);
        self.src = scale_sources(
            self.w,
            self.cfg.code_dim(),
            schedule,
            si,
            self.grids.get(si.wrapping_sub(1)),
            b,
        );
        self.grid = vec![u32::MAX; cells];
        self.prob = vec![f32::NAN; cells];
        self.entropy = vec![f32::NAN; cells];
        Ok(())
    }

    fn step(&mut self, schedule: &Schedule, step: &Step, ch: &StepChoice) -> Result<StepLogits> {
        let (w, b) = (self.w, self.batch);
        let v = self.cfg.codebook_size();
        let scale = &schedule.scales[step.scale];
        let cells = scale.size * scale.size;
        let n = step.positions.len();
        let tf = self.tf.as_mut().context("step before begin")?;
        if ch.drop_uncond && self.guided {
            // Guidance is over: the unconditional half is never read again.
            tf.keep_rows(b);
            self.guided = false;
        }
        let rows = tf.rows();
        let (mut x, cur, prev_rope) =
            step_inputs(w, schedule, step, &self.src, &self.grid, rows, b);
        tf.forward(&mut x, &cur, &prev_rope);
        let mut logits = tf.logits(&x); // (rows, n, V)
        let knobs = ch.knobs(b, v, cells, self.guided, step.t);
        ops::guided_sample(
            &knobs,
            &mut logits,
            &step.positions,
            &cur,
            ch.forced,
            &mut self.grid,
            ch.stats
                .then_some((self.prob.as_mut_slice(), self.entropy.as_mut_slice())),
        );
        logits.truncate(b * n * v);
        let last_step_of_scale = step.t + 1 == scale.first_step + scale.steps;
        if last_step_of_scale {
            debug_assert!(self.grid.iter().all(|&t| t != u32::MAX));
            self.grids.push(std::mem::take(&mut self.grid));
            if ch.stats {
                self.probs.push(std::mem::take(&mut self.prob));
                self.entropies.push(std::mem::take(&mut self.entropy));
            }
        }
        Ok(ch.record.then_some(logits))
    }

    fn rows(&self) -> Option<usize> {
        self.tf.as_ref().map(|tf| tf.rows())
    }
}
