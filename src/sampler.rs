//! The serial step loop (SPEC.md sections 5-6): class-token prefill, per-step input gather,
//! transformer step, guided token choice, scatter into the scale grid, bilinear upscale +
//! normalize between scales, and the final decode.

use crate::cpu::transformer::CpuTransformer;
use crate::model::config::ModelConfig;
use crate::model::weights::{TransformerWeights, normalize_rows};
use crate::order::{Schedule, Step};
use crate::rng::token_uniform;
use crate::sampling::{TokenPolicy, cfg_combine, choose_token};
use anyhow::{Result, bail};
use std::time::Instant;

/// Steps per scale: the same k everywhere, or one value per scale.
#[derive(Clone, Debug, PartialEq)]
pub enum Steps {
    Uniform(usize),
    PerScale(Vec<usize>),
}

/// Everything one sampling call needs besides the model.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    /// One class id per image.
    pub labels: Vec<usize>,
    /// Guidance strength (the reference's `cfg`: logits = cond + cfg * (cond - uncond));
    /// 0 disables guidance and the unconditional half.
    pub cfg: f32,
    /// First global step at which guidance applies.
    pub cfg_start_step: usize,
    pub steps: Steps,
    pub policy: TokenPolicy,
    pub seed: u64,
    /// Teacher forcing: per scale, (B, s, s) raster tokens to use instead of sampling.
    pub forced_tokens: Option<Vec<Vec<u32>>>,
    /// Keep every step's post-guidance logits of the conditional rows.
    pub record_logits: bool,
}

impl SampleOptions {
    /// The reference's released sampling settings (cfg 2.0 from step 5, T = 1, 4 steps).
    pub fn new(labels: Vec<usize>) -> Self {
        SampleOptions {
            labels,
            cfg: 2.0,
            cfg_start_step: 5,
            steps: Steps::Uniform(4),
            policy: TokenPolicy {
                temperature: 1.0,
                top_k: None,
                top_p: None,
            },
            seed: 0,
            forced_tokens: None,
            record_logits: false,
        }
    }
}

/// Result of the token loop.
#[derive(Clone, Debug)]
pub struct TokenOutput {
    pub schedule: Schedule,
    /// Per scale, ascending size: (B, s, s) token ids in raster order.
    pub tokens: Vec<Vec<u32>>,
    /// If recorded: per step, (B, n_t, V) logits used for the choice (after guidance).
    pub step_logits: Vec<Vec<f32>>,
    /// Wall time of each serial step in milliseconds.
    pub step_ms: Vec<f64>,
    /// Wall time of the class-token prefill in milliseconds.
    pub prefill_ms: f64,
}

/// Check a request against a model configuration; every error is one line.
pub fn validate_options(cfg: &ModelConfig, scale_count: usize, o: &SampleOptions) -> Result<()> {
    if o.labels.is_empty() {
        bail!("no labels: give at least one class id");
    }
    if let Some(&bad) = o.labels.iter().find(|&&l| l >= cfg.num_classes) {
        bail!(
            "class id {bad} is out of range: this model has {} classes (0..{})",
            cfg.num_classes,
            cfg.num_classes - 1
        );
    }
    match &o.steps {
        Steps::Uniform(0) => bail!("steps per scale must be at least 1"),
        Steps::PerScale(v) if v.len() != scale_count => bail!(
            "{} per-scale step counts given, but the model has {scale_count} scales",
            v.len()
        ),
        Steps::PerScale(v) if v.contains(&0) => bail!("steps per scale must be at least 1"),
        _ => {}
    }
    if !o.cfg.is_finite() || o.cfg < 0.0 {
        bail!("cfg must be a finite number >= 0, got {}", o.cfg);
    }
    let t = o.policy.temperature;
    if !t.is_finite() || t < 0.0 {
        bail!("temperature must be a finite number >= 0, got {t}");
    }
    if o.policy.top_k == Some(0) {
        bail!("top-k must be at least 1");
    }
    if let Some(p) = o.policy.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        bail!("top-p must be in (0, 1], got {p}");
    }
    Ok(())
}

/// Bilinear resize (align_corners = false, no antialias) of (B, e, si, si) to (B, e, so, so),
/// computed in f32 as PyTorch's CPU kernel does.
pub fn upsample_bilinear(src: &[f32], batch: usize, e: usize, si: usize, so: usize) -> Vec<f32> {
    if si == so {
        return src.to_vec();
    }
    let scale = si as f32 / so as f32;
    // Source index and weight per output coordinate (the same for rows and columns).
    let taps: Vec<(usize, usize, f32)> = (0..so)
        .map(|o| {
            let s = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (s as usize).min(si - 1);
            let i1 = (i0 + 1).min(si - 1);
            (i0, i1, s - i0 as f32)
        })
        .collect();
    let mut out = vec![0.0f32; batch * e * so * so];
    for plane in 0..batch * e {
        let s = &src[plane * si * si..(plane + 1) * si * si];
        let o = &mut out[plane * so * so..(plane + 1) * so * so];
        for (y, &(y0, y1, ly)) in taps.iter().enumerate() {
            for (x, &(x0, x1, lx)) in taps.iter().enumerate() {
                let top = (1.0 - lx) * s[y0 * si + x0] + lx * s[y0 * si + x1];
                let bot = (1.0 - lx) * s[y1 * si + x0] + lx * s[y1 * si + x1];
                o[y * so + x] = (1.0 - ly) * top + ly * bot;
            }
        }
    }
    out
}

/// Code vectors of a token grid: (B, s*s) tokens -> (B, s*s, e) rows of the codebook.
fn code_vectors(codebook: &[f32], e: usize, tokens: &[u32]) -> Vec<f32> {
    let mut out = Vec::with_capacity(tokens.len() * e);
    for &t in tokens {
        out.extend_from_slice(&codebook[t as usize * e..(t as usize + 1) * e]);
    }
    out
}

/// z0 of the next scale: the previous grid's code vectors upscaled to `s` and L2-normalized
/// per cell. Returns (B, s*s, e).
pub fn next_scale_latents(
    codebook: &[f32],
    e: usize,
    prev_tokens: &[u32],
    batch: usize,
    sp: usize,
    s: usize,
) -> Vec<f32> {
    // (B, sp*sp, e) -> (B, e, sp, sp)
    let cv = code_vectors(codebook, e, prev_tokens);
    let mut nchw = vec![0.0f32; batch * e * sp * sp];
    for b in 0..batch {
        for p in 0..sp * sp {
            for c in 0..e {
                nchw[(b * e + c) * sp * sp + p] = cv[(b * sp * sp + p) * e + c];
            }
        }
    }
    let up = upsample_bilinear(&nchw, batch, e, sp, s);
    let mut z = vec![0.0f32; batch * s * s * e];
    for b in 0..batch {
        for p in 0..s * s {
            for c in 0..e {
                z[(b * s * s + p) * e + c] = up[(b * e + c) * s * s + p];
            }
        }
    }
    normalize_rows(&mut z, e);
    z
}

/// How one step chooses its tokens.
pub struct StepChoice<'a> {
    /// Guidance strength when guidance applies at this step (cfg > 0 and t >= cfg_start_step).
    pub guidance: Option<f32>,
    pub policy: &'a TokenPolicy,
    pub seed: u64,
    /// Teacher forcing: this scale's (B, s, s) tokens.
    pub forced: Option<&'a [u32]>,
    /// Return the step's post-guidance logits of the conditional rows, (B, n, V).
    pub record: bool,
}

/// What the serial step loop needs from a backend (CPU f32 reference, CUDA).
pub trait StepBackend {
    /// Start a batch of `labels` (doubled with null-class rows when `guided`): allocate the
    /// KV cache and grids, compute AdaLN modulations, run the class token.
    fn begin(&mut self, schedule: &Schedule, labels: &[usize], guided: bool) -> Result<()>;
    /// Start scale `si`: z0 from the previous scale's grid, and its source embeddings.
    fn begin_scale(&mut self, schedule: &Schedule, si: usize) -> Result<()>;
    /// One serial step: inputs, transformer, guidance, token choice, scatter into the grid.
    fn step(
        &mut self,
        schedule: &Schedule,
        step: &Step,
        choice: &StepChoice,
    ) -> Result<Option<Vec<f32>>>;
    /// The sampled grids, per scale (B, s, s), raster order.
    fn finish(&mut self, schedule: &Schedule) -> Result<Vec<Vec<u32>>>;
}

/// Run the token loop of SPEC.md section 5 on any backend.
pub fn run_steps<B: StepBackend + ?Sized>(
    backend: &mut B,
    cfg: &ModelConfig,
    scale_sizes: &[usize],
    n_tokens: usize,
    o: &SampleOptions,
) -> Result<TokenOutput> {
    validate_options(cfg, scale_sizes.len(), o)?;
    let schedule = match &o.steps {
        Steps::Uniform(k) => Schedule::uniform(scale_sizes, *k)?,
        Steps::PerScale(v) => Schedule::with_steps(scale_sizes, v)?,
    };
    if schedule.total_tokens() != n_tokens {
        bail!(
            "the model's position tables have {n_tokens} rows but its scales {scale_sizes:?} have {} tokens",
            schedule.total_tokens()
        );
    }
    let b = o.labels.len();
    let v = cfg.codebook_size();
    if let Some(f) = &o.forced_tokens {
        if f.len() != scale_sizes.len()
            || f.iter()
                .zip(scale_sizes)
                .any(|(t, &s)| t.len() != b * s * s)
        {
            bail!("forced tokens must hold (B, s, s) ids for every scale");
        }
        if f.iter().flatten().any(|&t| t as usize >= v) {
            bail!("forced token id out of range (codebook has {v} entries)");
        }
    }
    let guided = o.cfg > 0.0;
    let t0 = Instant::now();
    backend.begin(&schedule, &o.labels, guided)?;
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;
    let mut step_logits = Vec::new();
    let mut step_ms = Vec::new();
    for si in 0..schedule.scales.len() {
        let ts = Instant::now();
        backend.begin_scale(&schedule, si)?;
        let mut carry = ts.elapsed().as_secs_f64() * 1e3; // charged to the scale's first step
        for step in schedule.steps.iter().filter(|st| st.scale == si) {
            let ts = Instant::now();
            let choice = StepChoice {
                guidance: (guided && step.t >= o.cfg_start_step).then_some(o.cfg),
                policy: &o.policy,
                seed: o.seed,
                forced: o.forced_tokens.as_ref().map(|f| f[si].as_slice()),
                record: o.record_logits,
            };
            if let Some(l) = backend.step(&schedule, step, &choice)? {
                step_logits.push(l);
            }
            step_ms.push(ts.elapsed().as_secs_f64() * 1e3 + carry);
            carry = 0.0;
        }
    }
    let tokens = backend.finish(&schedule)?;
    Ok(TokenOutput {
        schedule,
        tokens,
        step_logits,
        step_ms,
        prefill_ms,
    })
}

/// Run the token loop on the CPU (f32 reference).
pub fn sample_tokens(
    cfg: &ModelConfig,
    w: &TransformerWeights,
    scale_sizes: &[usize],
    o: &SampleOptions,
) -> Result<TokenOutput> {
    run_steps(
        &mut CpuBackend::new(cfg, w),
        cfg,
        scale_sizes,
        w.n_tokens,
        o,
    )
}

/// The f32 CPU backend: host grids, [`CpuTransformer`] for the steps.
pub struct CpuBackend<'w> {
    cfg: &'w ModelConfig,
    w: &'w TransformerWeights,
    tf: Option<CpuTransformer<'w>>,
    batch: usize,
    guided: bool,
    /// Finished grids, one per scale, and the grid of the current scale.
    grids: Vec<Vec<u32>>,
    grid: Vec<u32>,
    /// src_latents_proj(E(z0)) of every cell of the current scale, (B, s*s, C).
    src: Vec<f32>,
}

impl<'w> CpuBackend<'w> {
    pub fn new(cfg: &'w ModelConfig, w: &'w TransformerWeights) -> Self {
        CpuBackend {
            cfg,
            w,
            tf: None,
            batch: 0,
            guided: false,
            grids: Vec::new(),
            grid: Vec::new(),
            src: Vec::new(),
        }
    }
}

impl StepBackend for CpuBackend<'_> {
    fn begin(&mut self, schedule: &Schedule, labels: &[usize], guided: bool) -> Result<()> {
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
        tf.forward(&x, &[n_total], &[n_total]);
        self.tf = Some(tf);
        self.batch = labels.len();
        self.guided = guided;
        self.grids.clear();
        Ok(())
    }

    fn begin_scale(&mut self, schedule: &Schedule, si: usize) -> Result<()> {
        let (w, b, e) = (self.w, self.batch, self.cfg.code_dim());
        let s = schedule.scales[si].size;
        let cells = s * s;
        // z0 (B, s*s, e): zeros on the first scale, else upscaled previous codes.
        let z0 = if si == 0 {
            vec![0.0f32; b * cells * e]
        } else {
            let sp = schedule.scales[si - 1].size;
            next_scale_latents(&w.codebook, e, &self.grids[si - 1], b, sp, s)
        };
        self.src = w
            .src_latents_proj
            .forward(&w.codevec_mlp.forward(&z0, b * cells), b * cells);
        self.grid = vec![u32::MAX; b * cells];
        Ok(())
    }

    fn step(
        &mut self,
        schedule: &Schedule,
        step: &Step,
        ch: &StepChoice,
    ) -> Result<Option<Vec<f32>>> {
        let (w, b) = (self.w, self.batch);
        let (c, e, v) = (
            self.cfg.hidden_size,
            self.cfg.code_dim(),
            self.cfg.codebook_size(),
        );
        let scale = &schedule.scales[step.scale];
        let cells = scale.size * scale.size;
        let n_total = schedule.total_tokens();
        let n = step.positions.len();
        let grid = &mut self.grid;
        // Inputs of the conditional rows (the unconditional rows are identical).
        // concat = [embed_positions[P], src[P], posemb(Q), codeemb(Q)]: (B, n, 4C)
        let prev_codes = step.prev.as_ref().map(|q| {
            let toks: Vec<u32> = (0..b)
                .flat_map(|bi| q.iter().map(move |&p| (bi, p)))
                .map(|(bi, p)| grid[bi * cells + p])
                .collect();
            w.codevec_mlp
                .forward(&code_vectors(&w.codebook, e, &toks), b * n)
        });
        let mut cat = vec![0.0f32; b * n * 4 * c];
        for bi in 0..b {
            for (j, &p) in step.positions.iter().enumerate() {
                let row = &mut cat[(bi * n + j) * 4 * c..(bi * n + j + 1) * 4 * c];
                let g = scale.offset + p;
                row[..c].copy_from_slice(&w.embed_positions[g * c..(g + 1) * c]);
                row[c..2 * c]
                    .copy_from_slice(&self.src[(bi * cells + p) * c..(bi * cells + p + 1) * c]);
                match (&step.prev, &prev_codes) {
                    (Some(q), Some(pc)) => {
                        let gq = scale.offset + q[j];
                        row[2 * c..3 * c].copy_from_slice(&w.embed_positions[gq * c..(gq + 1) * c]);
                        row[3 * c..].copy_from_slice(&pc[(bi * n + j) * c..(bi * n + j + 1) * c]);
                    }
                    _ => {
                        row[2 * c..3 * c].copy_from_slice(&w.empty_token_pos);
                        row[3 * c..].copy_from_slice(&w.empty_token_emb);
                    }
                }
            }
        }
        let xb = w.combine_inputs.forward(&cat, b * n); // (B, n, C)
        let x = if self.guided {
            [xb.as_slice(), xb.as_slice()].concat()
        } else {
            xb
        };
        let cur: Vec<usize> = step.positions.iter().map(|p| scale.offset + p).collect();
        let prev: Vec<usize> = match &step.prev {
            Some(q) => q.iter().map(|p| scale.offset + p).collect(),
            None => vec![n_total + 1; n],
        };
        let tf = self.tf.as_mut().expect("begin() not called");
        let rows = tf.rows();
        let hidden = tf.forward(&x, &cur, &prev);
        let mut logits = tf.head(&hidden, rows * n); // (rows, n, V)
        if self.guided {
            let (cond, uncond) = logits.split_at_mut(b * n * v);
            if let Some(cfg) = ch.guidance {
                cfg_combine(cond, uncond, cfg);
            }
            logits.truncate(b * n * v);
        }
        for bi in 0..b {
            for (j, &p) in step.positions.iter().enumerate() {
                let l = &logits[(bi * n + j) * v..(bi * n + j + 1) * v];
                grid[bi * cells + p] = match ch.forced {
                    Some(f) => f[bi * cells + p],
                    None => {
                        let u = token_uniform(
                            ch.seed,
                            bi as u32,
                            step.t as u32,
                            (scale.offset + p) as u32,
                        );
                        choose_token(l, ch.policy, u) as u32
                    }
                };
            }
        }
        let last_step_of_scale = step.t + 1 == scale.first_step + scale.steps;
        if last_step_of_scale {
            debug_assert!(grid.iter().all(|&t| t != u32::MAX));
            self.grids.push(std::mem::take(grid));
        }
        Ok(ch.record.then_some(logits))
    }

    fn finish(&mut self, _schedule: &Schedule) -> Result<Vec<Vec<u32>>> {
        self.tf = None;
        Ok(std::mem::take(&mut self.grids))
    }
}
