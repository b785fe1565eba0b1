//! The serial step loop (SPEC.md sections 5-6): class-token prefill, per-step input gather,
//! transformer step, guided token choice, scatter into the scale grid, bilinear upscale +
//! normalize between scales, and the final decode.

use crate::config::ModelConfig;
use crate::cpu::transformer::CpuTransformer;
use crate::order::Schedule;
use crate::rng::token_uniform;
use crate::sampling::{TokenPolicy, cfg_combine, choose_token};
use crate::weights::{TransformerWeights, normalize_rows};
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

/// Run the token loop of SPEC.md section 5 on the CPU.
pub fn sample_tokens(
    cfg: &ModelConfig,
    w: &TransformerWeights,
    scale_sizes: &[usize],
    o: &SampleOptions,
) -> Result<TokenOutput> {
    validate_options(cfg, scale_sizes.len(), o)?;
    let schedule = match &o.steps {
        Steps::Uniform(k) => Schedule::uniform(scale_sizes, *k)?,
        Steps::PerScale(v) => Schedule::with_steps(scale_sizes, v)?,
    };
    let n_total = schedule.total_tokens();
    if n_total != w.n_tokens {
        bail!(
            "the model's position tables have {} rows but its scales {:?} have {n_total} tokens",
            w.n_tokens,
            scale_sizes
        );
    }
    let b = o.labels.len();
    let (c, e, v) = (cfg.hidden_size, cfg.code_dim(), cfg.codebook_size());
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
    let rows = if guided { 2 * b } else { b };
    let mut classes = o.labels.clone();
    if guided {
        classes.extend(std::iter::repeat_n(cfg.num_classes, b));
    }
    let mut tf = CpuTransformer::new(cfg, w, &classes, 1 + n_total);

    // Class token: input class_embeddings[label], RoPE row N for both positions.
    let t0 = Instant::now();
    let mut x = Vec::with_capacity(rows * c);
    for &cls in &classes {
        x.extend_from_slice(&w.class_embeddings[cls * c..(cls + 1) * c]);
    }
    tf.forward(&x, &[n_total], &[n_total]);
    let prefill_ms = t0.elapsed().as_secs_f64() * 1e3;

    let mut tokens: Vec<Vec<u32>> = Vec::with_capacity(scale_sizes.len());
    let mut step_logits = Vec::new();
    let mut step_ms = Vec::new();
    // Code-MLP of the constant first-scale z0 = 0 and of the empty token embeddings.
    for (si, scale) in schedule.scales.iter().enumerate() {
        let s = scale.size;
        let cells = s * s;
        // z0 (B, s*s, e): zeros on the first scale, else upscaled previous codes.
        let z0 = if si == 0 {
            vec![0.0f32; b * cells * e]
        } else {
            let sp = schedule.scales[si - 1].size;
            next_scale_latents(&w.codebook, e, &tokens[si - 1], b, sp, s)
        };
        // src_latents_proj(E(z0)) for every cell: (B, s*s, C).
        let src = w
            .src_latents_proj
            .forward(&w.codevec_mlp.forward(&z0, b * cells), b * cells);
        let mut grid = vec![u32::MAX; b * cells];
        for step in schedule.steps.iter().filter(|st| st.scale == si) {
            let ts = Instant::now();
            let n = step.positions.len();
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
                        .copy_from_slice(&src[(bi * cells + p) * c..(bi * cells + p + 1) * c]);
                    match (&step.prev, &prev_codes) {
                        (Some(q), Some(pc)) => {
                            let gq = scale.offset + q[j];
                            row[2 * c..3 * c]
                                .copy_from_slice(&w.embed_positions[gq * c..(gq + 1) * c]);
                            row[3 * c..]
                                .copy_from_slice(&pc[(bi * n + j) * c..(bi * n + j + 1) * c]);
                        }
                        _ => {
                            row[2 * c..3 * c].copy_from_slice(&w.empty_token_pos);
                            row[3 * c..].copy_from_slice(&w.empty_token_emb);
                        }
                    }
                }
            }
            let xb = w.combine_inputs.forward(&cat, b * n); // (B, n, C)
            let x = if guided {
                [xb.as_slice(), xb.as_slice()].concat()
            } else {
                xb
            };
            let cur: Vec<usize> = step.positions.iter().map(|p| scale.offset + p).collect();
            let prev: Vec<usize> = match &step.prev {
                Some(q) => q.iter().map(|p| scale.offset + p).collect(),
                None => vec![n_total + 1; n],
            };
            let hidden = tf.forward(&x, &cur, &prev);
            let mut logits = tf.head(&hidden, rows * n); // (rows, n, V)
            if guided {
                let (cond, uncond) = logits.split_at_mut(b * n * v);
                if step.t >= o.cfg_start_step {
                    cfg_combine(cond, uncond, o.cfg);
                }
                logits.truncate(b * n * v);
            }
            for bi in 0..b {
                for (j, &p) in step.positions.iter().enumerate() {
                    let l = &logits[(bi * n + j) * v..(bi * n + j + 1) * v];
                    let tok = match &o.forced_tokens {
                        Some(f) => f[si][bi * cells + p],
                        None => {
                            let u = token_uniform(
                                o.seed,
                                bi as u32,
                                step.t as u32,
                                (scale.offset + p) as u32,
                            );
                            choose_token(l, &o.policy, u) as u32
                        }
                    };
                    grid[bi * cells + p] = tok;
                }
            }
            if o.record_logits {
                step_logits.push(logits);
            }
            step_ms.push(ts.elapsed().as_secs_f64() * 1e3);
        }
        debug_assert!(grid.iter().all(|&t| t != u32::MAX));
        tokens.push(grid);
    }
    Ok(TokenOutput {
        schedule,
        tokens,
        step_logits,
        step_ms,
        prefill_ms,
    })
}
