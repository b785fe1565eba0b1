//! The GPU sampler backend: weights uploaded once in bf16 (norms, tables, biases in f32), every
//! buffer allocated once per batch, and the serial step loop as kernel launches and cuBLAS
//! GEMMs on one stream. Implements [`Backend`] (the loop itself is pipeline.rs's; `run_loop`
//! carries out the graph cache's choice of replay, capture or eager launches) and [`Stepper`].
//!
//! Per step (T = rows * n tokens, rows = B or 2B with guidance):
//!   gather_inputs -> x (T, C) f32 residual
//!   per layer: rmsnorm_adaln -> a (T, C) bf16; a @ wqkv^T -> qkv (T, 3C) bf16;
//!              attention (RoPE + cache append + attention, one launch) -> o (T, C);
//!              x += o @ wo^T (f32 output, beta 1); rmsnorm_adaln -> a; a @ [w1; w3]^T ->
//!              h (T, F) = silu(a @ w1^T) * (a @ w3^T) in one launch (swiglu, ffn.cu);
//!              x += h @ w2^T
//!   rmsnorm -> a; a @ head^T + b -> logits (T, V) f32; guided_sample -> tokens into the grid
//! Per batch, before the class token: the AdaLN modulations of every layer, one GEMM with the
//! stacked (L*4C, C) weight and one bias add (`modulate`).

use super::attention;
use super::decoder::DecodeBuffers;
use super::embed::{self, CodevecMlp, InputTables, StepIndex};
use super::ffn::{SWIGLU_K_TILE, interleave_gate_up, swiglu, swiglu_fits};
use super::gemm::linear;
use super::graphs::{Decision, FailReason, GraphCache, GraphKey};
use super::norm::{AdaLn, add_bias_f32, rmsnorm_adaln};
use super::sampling;
use super::{DevBuf, Gpu, Marks};
use crate::math;
use crate::model::Model;
use crate::model::config::ModelConfig;
use crate::order::{Schedule, Step};
use crate::pipeline::{
    Backend, Decoded, DeviceTimes, Grids, LoopOutcome, LoopPlan, LoopSteps, StepChoice, StepLogits,
    Stepper, elapsed_ms,
};
use anyhow::{Context, Result, bail, ensure};
use half::bf16;
use std::time::Instant;

pub(super) fn to_bf16(v: &[f32]) -> Vec<bf16> {
    v.iter().map(|&x| bf16::from_f32(x)).collect()
}

/// Per-layer device weights (the AdaLN modulation weights of every layer are stacked in
/// [`GpuModel`]).
struct GpuLayer {
    wqkv: DevBuf<bf16>, // (3C, C)
    wo: DevBuf<bf16>,   // (C, C)
    /// (2F, C): w1 and w3 rows interleaved (row 2j = w1 row j, 2j+1 = w3 row j) for the
    /// fused swiglu kernel (`ffn::interleave_gate_up`).
    w13: DevBuf<bf16>,
    w2: DevBuf<bf16>, // (C, F)
    attn_norm: DevBuf<f32>,
    ffn_norm: DevBuf<f32>,
}

/// A model on the GPU: weights uploaded and folded once.
pub struct GpuModel {
    pub gpu: Gpu,
    pub cfg: ModelConfig,
    /// The VQ decoder on the device.
    pub decoder: super::decoder::GpuDecoder,
    layers: Vec<GpuLayer>,
    /// Every layer's AdaLN modulation linear, stacked: (L*4C, C), layer l's (4C, C)
    /// [input_modulation; post_attention_modulation] at rows l*4C, and its bias (L*4C): one
    /// GEMM and one bias add compute all of a batch's modulations.
    mod_w: DevBuf<bf16>,
    mod_b: DevBuf<f32>,
    pub(super) final_norm: DevBuf<f32>,
    pub(super) head: DevBuf<bf16>,  // (V, C)
    pub(super) head_b: DevBuf<f32>, // (V)
    rope_re: DevBuf<f32>,           // (N+2, D)
    rope_im: DevBuf<f32>,
    /// sigmoid(mixing_coeffs) (num_mixing_layers, H).
    mix: DevBuf<f32>,
    /// Attention kernel version (tensor cores by default; v1 is the on-device reference).
    pub attention_impl: attention::AttentionImpl,
    pub(super) tables: InputTables,
    mlp: CodevecMlp,
    srcfold: DevBuf<bf16>,  // (C, 64) = Wb Wsrc W4
    srcfold_b: DevBuf<f32>, // (C)
    codebook: DevBuf<f32>,  // (V, e)
    /// Host copy of the class embeddings (num_classes+1, C), for prefill and AdaLN inputs.
    pub(super) class_emb: Vec<f32>,
    /// The class token's RoPE row (N) for both positions.
    class_rope: DevBuf<i32>,
    /// The buffers of the last batch shape, reused by the next batch of the same shape.
    cache: std::sync::Mutex<Option<(BatchKey, Batch, Vec<StepIndex>)>>,
    /// The scoring pass's buffers of the last shape (`cuda::score`), reused by the next call
    /// of the same shape: nothing is allocated per call.
    pub(super) score_cache: std::sync::Mutex<Option<ScoreBuffers>>,
}

/// The buffers of one scoring shape (`cuda::score`, which fills them): the batch's activations, KV cache, logits and grids,
/// and the positions' RoPE rows and block ids.
pub(super) struct ScoreBuffers {
    /// Images and the schedule's shape (unguided: one row per image).
    pub(super) key: BatchKey,
    pub(super) bt: Batch,
    /// The steps' index tables on the device.
    pub(super) steps: Vec<StepIndex>,
    pub(super) cur: DevBuf<i32>,
    pub(super) prev: DevBuf<i32>,
    pub(super) block: DevBuf<i32>,
}

/// What a batch's buffers depend on: images, guidance, and the schedule's shape (also the
/// key of the scoring pass's buffers, `cuda::score`).
#[derive(Clone, PartialEq, Eq)]
pub(super) struct BatchKey {
    b: usize,
    guided: bool,
    scales: Vec<(usize, usize)>,
}

impl BatchKey {
    pub(super) fn new(b: usize, guided: bool, schedule: &Schedule) -> BatchKey {
        BatchKey {
            b,
            guided,
            scales: schedule.scales.iter().map(|s| (s.size, s.steps)).collect(),
        }
    }
}

impl GpuModel {
    /// Upload a loaded model: the transformer's folded host weights (model::weights) in bf16
    /// (norms, tables and biases in f32), and the VQ decoder.
    pub fn new(gpu: Gpu, model: &Model) -> Result<GpuModel> {
        let (cfg, w) = (&model.config, &model.weights);
        // The upload reads the f32 weights; the CPU's bf16 conversion frees them.
        anyhow::ensure!(
            w.precision() == crate::model::weights::Precision::F32,
            "the GPU engine uploads from f32 host weights; convert to bf16 only for the CPU"
        );
        let decoder = super::decoder::GpuDecoder::new(&gpu, &model.decoder)?;
        let up = |x: &[f32]| gpu.upload(x);
        let upb = |x: &[f32]| gpu.upload(&to_bf16(x));
        let (c, f) = (cfg.hidden_size, cfg.ffn_dim);
        // Always true of a model the engine runs: its attention kernels need head_dim 32, 64
        // or 128, so C = heads * head_dim is a multiple of 32.
        ensure!(
            swiglu_fits(c),
            "hidden_size {c} is not a multiple of {SWIGLU_K_TILE} (the FFN kernel's K tile)"
        );
        let mut layers = Vec::new();
        let (mut mod_w, mut mod_b) = (Vec::new(), Vec::new());
        for lw in &w.layers {
            layers.push(GpuLayer {
                wqkv: upb(&lw.wqkv.w)?,
                wo: upb(&lw.wo.w)?,
                w13: gpu.upload(&interleave_gate_up(&to_bf16(&lw.w13.w), f, c))?,
                w2: upb(&lw.w2.w)?,
                attn_norm: up(&lw.attention_norm)?,
                ffn_norm: up(&lw.ffn_norm)?,
            });
            mod_w.extend(lw.modulation.w.iter().map(|&x| bf16::from_f32(x)));
            mod_b.extend_from_slice(lw.modulation.b.as_deref().context("modulation bias")?);
        }
        let (mod_w, mod_b) = (gpu.upload(&mod_w)?, gpu.upload(&mod_b)?);
        let tables = InputTables::upload(&gpu, &w.tables, cfg.hidden_size)?;
        let ch = &w.code_hidden;
        let bias = |l: &crate::model::weights::Linear| -> Result<DevBuf<f32>> {
            up(l.b.as_deref().context("code MLP bias")?)
        };
        let mlp = CodevecMlp {
            w0: up(&ch.l0.w)?,
            b0: bias(&ch.l0)?,
            w2: up(&ch.l2.w)?,
            b2: bias(&ch.l2)?,
            e: cfg.code_dim(),
        };
        Ok(GpuModel {
            layers,
            mod_w,
            mod_b,
            final_norm: up(&w.final_norm)?,
            head: upb(&w.head.w)?,
            head_b: bias(&w.head)?,
            rope_re: up(&w.rope_re)?,
            rope_im: up(&w.rope_im)?,
            // (an unused 1-element buffer when the model mixes no layer)
            mix: if w.mix.is_empty() {
                gpu.zeros(1)?
            } else {
                gpu.upload(&w.mix)?
            },
            attention_impl: attention::AttentionImpl::default(),
            tables,
            mlp,
            srcfold: upb(&w.src_fold.w)?,
            srcfold_b: bias(&w.src_fold)?,
            codebook: up(&w.codebook)?,
            class_emb: w.class_embeddings.clone(),
            cfg: cfg.clone(),
            decoder,
            cache: std::sync::Mutex::new(None),
            score_cache: std::sync::Mutex::new(None),
            class_rope: gpu.upload(&[w.n_tokens as i32])?,
            gpu,
        })
    }
}

/// Buffers of one batch, allocated once in `begin`.
pub(super) struct Batch {
    pub(super) b: usize,
    pub(super) rows: usize,
    pub(super) cap: usize,
    pub(super) len: usize,
    pub(super) x: DevBuf<f32>,        // (rows*nmax, C)
    pub(super) a: DevBuf<bf16>,       // (rows*nmax, C)
    pub(super) qkv: DevBuf<bf16>,     // (rows*nmax, 3C)
    pub(super) o: DevBuf<bf16>,       // (rows*nmax, C)
    pub(super) h: DevBuf<bf16>,       // (rows*nmax, F)
    pub(super) logits: DevBuf<f32>,   // (rows*nmax, V)
    pub(super) kc: Vec<DevBuf<bf16>>, // per layer (rows, H, cap, D)
    pub(super) vc: Vec<DevBuf<bf16>>,
    pub(super) modulation: Modulations,
    pub(super) grids: Vec<DevBuf<i32>>, // per scale (B, s*s)
    pub(super) forced: Vec<Option<DevBuf<i32>>>,
    /// Per scale, (prob, entropy) (B, s*s) when the steps record statistics (allocated on
    /// the scale's first such step, NaN-filled there).
    pub(super) stats: Vec<Option<(DevBuf<f32>, DevBuf<f32>)>>,
    pub(super) z0: DevBuf<f32>,     // (B*maxcells, e)
    pub(super) hid: DevBuf<bf16>,   // (B*maxcells, 64)
    pub(super) src: DevBuf<f32>,    // (B*maxcells, C)
    pub(super) tokens: DevBuf<i32>, // (B, nmax)
    pub(super) act: DevBuf<bf16>,   // (rows, C) silu(class embedding): the AdaLN GEMMs' input
    pub(super) run: DevBuf<u64>, // (2) {seed, image0}, read by guided_sample (a replay gets new ones)
    /// Timestamps of the loop: 0 start, 1 after the prefill, 2 + t after step t, then one
    /// after the in-loop decode.
    pub(super) marks: Marks,
    /// The decode of the planned scale ([`LoopPlan::decode`]) when it fits one launch
    /// sequence: enqueued at the end of the loop (inside its graph), read by `decode`.
    pub(super) dec: Option<DecodeBuffers>,
    /// Recorded loops of this batch's buffers and the state of every plan ([`GraphCache`]);
    /// a graph lives exactly as long as the buffers it launches on.
    pub(super) graphs: GraphCache,
}

/// A batch's AdaLN modulations of every layer, computed once per batch by
/// [`GpuModel::modulate`]: (rows, L*4C) f32, sequence row r's layer l at r*L*4C + l*4C:
/// [shift1 | scale1 | shift2 | scale2] (C each).
pub(super) struct Modulations {
    buf: DevBuf<f32>,
    c: usize,
    layers: usize,
}

impl Modulations {
    /// Layer `l`'s (shift, scale) pair at `at` within its 4C values (0 before attention, 2C
    /// before the FFN), as `rmsnorm_adaln` reads it.
    pub(super) fn layer(&self, l: usize, at: usize) -> AdaLn<'_> {
        debug_assert!(l < self.layers && at <= 2 * self.c);
        AdaLn {
            buf: &self.buf,
            offset: l * 4 * self.c + at,
            row_stride: self.layers * 4 * self.c,
        }
    }
}

/// [`Backend`] on the GPU.
pub struct GpuBackend<'m> {
    m: &'m GpuModel,
    batch: Option<Batch>,
    key: Option<BatchKey>,
    /// Per step index arrays, uploaded in `begin`.
    steps: Vec<StepIndex>,
    guided: bool,
    /// The current loop takes timestamps (eagerly, or recorded into its graph).
    timed: bool,
    /// The scale the current loop decodes at its end (chosen in `begin`).
    loop_decode: Option<usize>,
    /// The scale whose pixels the loop decoded into the batch's `dec` buffers.
    decoded: Option<usize>,
    /// A launch of the pipeline's steps failed during a capture (its message): the capture
    /// failed, rather than the steps being stopped (a cancellation).
    capture_fault: Option<String>,
    /// At most this many images per pass of the in-loop decode (on top of
    /// `GpuDecoder::max_batch`); None = no extra limit. For tests of the multi-pass decode.
    pub decode_batch_limit: Option<usize>,
    /// Synchronize the stream after every step. A test hook: a capture refuses
    /// synchronization, so every capture then fails inside the loop, as a real refusal would
    /// (tests/gpu_graph.rs); eager launches are unaffected.
    #[doc(hidden)]
    pub sync_after_steps: bool,
}

impl Drop for GpuBackend<'_> {
    /// Hand the batch's buffers back to the model for the next batch of the same shape.
    fn drop(&mut self) {
        if let (Some(key), Some(bt)) = (self.key.take(), self.batch.take())
            && let Ok(mut c) = self.m.cache.lock()
        {
            *c = Some((key, bt, std::mem::take(&mut self.steps)));
        }
    }
}

impl<'m> GpuBackend<'m> {
    pub fn new(m: &'m GpuModel) -> Self {
        GpuBackend {
            m,
            batch: None,
            key: None,
            steps: Vec::new(),
            guided: false,
            timed: false,
            loop_decode: None,
            decoded: None,
            capture_fault: None,
            decode_batch_limit: None,
            sync_after_steps: false,
        }
    }
}

impl GpuModel {
    /// Run `n` tokens per row (inputs already in `bt.x`) through every layer, appending K/V at
    /// `bt.len`. `cur`/`prev` are the tokens' RoPE rows; `mask`: the block-causal mask of the
    /// teacher-forced pass (cuda::score), None when sampling.
    pub(super) fn forward(
        &self,
        bt: &mut Batch,
        n: usize,
        cur: &DevBuf<i32>,
        prev: &DevBuf<i32>,
        mask: Option<attention::BlockMask<'_>>,
    ) -> Result<()> {
        let g = &self.gpu;
        let cfg = &self.cfg;
        let (c, f, h, d) = (cfg.hidden_size, cfg.ffn_dim, cfg.num_heads, cfg.head_dim());
        let eps = cfg.rms_norm_eps as f32;
        let t = bt.rows * n;
        if bt.len + n > bt.cap {
            bail!("KV cache overflow ({} + {n} > {})", bt.len, bt.cap);
        }
        for (l, lw) in self.layers.iter().enumerate() {
            rmsnorm_adaln(
                g,
                &bt.x,
                &lw.attn_norm,
                Some(bt.modulation.layer(l, 0)),
                &mut bt.a,
                t,
                n,
                c,
                eps,
            )?;
            linear(g, &bt.a, 0, &lw.wqkv, &mut bt.qkv, 0, t, c, 3 * c, 0.0)?;
            let shape = attention::AttnShape {
                rows: bt.rows,
                heads: h,
                head_dim: d,
                n,
                start: bt.len,
                capacity: bt.cap,
            };
            let rope = attention::Rope {
                re: &self.rope_re,
                im: &self.rope_im,
                cur,
                prev,
                mix: (l < cfg.num_mixing_layers).then_some((&self.mix, l * h)),
            };
            attention::attention(
                g,
                self.attention_impl,
                &bt.qkv,
                rope,
                &mut bt.kc[l],
                &mut bt.vc[l],
                mask,
                &mut bt.o,
                shape,
            )?;
            linear(g, &bt.o, 0, &lw.wo, &mut bt.x, 0, t, c, c, 1.0)?;
            rmsnorm_adaln(
                g,
                &bt.x,
                &lw.ffn_norm,
                Some(bt.modulation.layer(l, 2 * c)),
                &mut bt.a,
                t,
                n,
                c,
                eps,
            )?;
            swiglu(g, &bt.a, &lw.w13, &mut bt.h, t, c, f)?;
            linear(g, &bt.h, 0, &lw.w2, &mut bt.x, 0, t, f, c, 1.0)?;
        }
        bt.len += n;
        Ok(())
    }
}

impl GpuModel {
    /// A batch's device-side start: the AdaLN modulations silu(class_emb[cls]) @ [W_in;
    /// W_post]^T + b, (rows, 4C) per layer, from `bt.act`, then the class token (its input
    /// class_embeddings[label] already in `bt.x`; RoPE row N for both positions).
    fn prefill(&self, bt: &mut Batch) -> Result<()> {
        self.modulate(bt)?;
        self.forward(bt, 1, &self.class_rope, &self.class_rope, None)
    }

    /// The AdaLN modulations of every layer from `bt.act` (see [`GpuModel::prefill`]): one
    /// GEMM with the stacked (L*4C, C) weight into `bt.modulation` (rows, L*4C), one bias add.
    pub(super) fn modulate(&self, bt: &mut Batch) -> Result<()> {
        let (g, c) = (&self.gpu, self.cfg.hidden_size);
        let n = self.layers.len() * 4 * c;
        let md = &mut bt.modulation.buf;
        linear(g, &bt.act, 0, &self.mod_w, md, 0, bt.rows, c, n, 0.0)?;
        add_bias_f32(g, md, &self.mod_b, bt.rows, n)
    }

    /// Allocate every buffer of a batch of `b` images (`rows` sequence rows), with room for
    /// `nmax` tokens per row in one forward (the largest block when sampling; the whole
    /// sequence when scoring).
    pub(super) fn allocate(
        &self,
        schedule: &Schedule,
        b: usize,
        rows: usize,
        nmax: usize,
    ) -> Result<Batch> {
        let g = &self.gpu;
        let cfg = &self.cfg;
        let (c, f, v, e) = (
            cfg.hidden_size,
            cfg.ffn_dim,
            cfg.codebook_size(),
            cfg.code_dim(),
        );
        let cap = 1 + schedule.total_tokens();
        let maxcells = schedule.scales.iter().map(|s| s.tokens).max().unwrap_or(1);
        let ctx = || format!("allocating GPU buffers for {rows} rows");
        let kv = rows * cap * c;
        let bt = Batch {
            b,
            rows,
            cap,
            len: 0,
            x: g.alloc(rows * nmax * c).with_context(ctx)?,
            a: g.alloc(rows * nmax * c).with_context(ctx)?,
            qkv: g.alloc(rows * nmax * 3 * c).with_context(ctx)?,
            o: g.alloc(rows * nmax * c).with_context(ctx)?,
            h: g.alloc(rows * nmax * f).with_context(ctx)?,
            logits: g.alloc(rows * nmax * v).with_context(ctx)?,
            kc: (0..cfg.num_layers)
                .map(|_| g.alloc(kv))
                .collect::<Result<_>>()?,
            vc: (0..cfg.num_layers)
                .map(|_| g.alloc(kv))
                .collect::<Result<_>>()?,
            modulation: Modulations {
                buf: g.alloc(rows * cfg.num_layers * 4 * c).with_context(ctx)?,
                c,
                layers: cfg.num_layers,
            },
            grids: schedule
                .scales
                .iter()
                .map(|s| g.alloc(b * s.tokens))
                .collect::<Result<_>>()?,
            forced: schedule.scales.iter().map(|_| None).collect(),
            stats: schedule.scales.iter().map(|_| None).collect(),
            z0: g.alloc(b * maxcells * e)?,
            hid: g.alloc(b * maxcells * 64)?,
            src: g.alloc(b * maxcells * c)?,
            tokens: g.alloc(b * nmax)?,
            act: g.alloc(rows * c)?,
            run: g.zeros(2)?,
            marks: g.marks(schedule.steps.len() + 3)?,
            dec: None,
            graphs: GraphCache::default(),
        };
        Ok(bt)
    }

    /// The per-step index arrays of a schedule, uploaded.
    pub(super) fn step_indices(&self, schedule: &Schedule) -> Result<Vec<StepIndex>> {
        let g = &self.gpu;
        let mut steps = Vec::with_capacity(schedule.steps.len());
        let n_total = schedule.total_tokens() as i32;
        for st in &schedule.steps {
            let sc = &schedule.scales[st.scale];
            let gl = |p: &[usize]| {
                p.iter()
                    .map(|&x| (sc.offset + x) as i32)
                    .collect::<Vec<_>>()
            };
            let loc = |p: &[usize]| p.iter().map(|&x| x as i32).collect::<Vec<_>>();
            let cur = gl(&st.positions);
            let prev_rope = match &st.prev {
                Some(q) => gl(q),
                None => vec![n_total + 1; st.positions.len()],
            };
            steps.push(StepIndex {
                cur_global: g.upload(&cur)?,
                local: g.upload(&loc(&st.positions))?,
                prev_rope: g.upload(&prev_rope)?,
                prev_global: st.prev.as_ref().map(|q| g.upload(&gl(q))).transpose()?,
                prev_local: st.prev.as_ref().map(|q| g.upload(&loc(q))).transpose()?,
                n: st.positions.len(),
            });
        }
        Ok(steps)
    }

    /// Scale `si`'s source embeddings `bt.src (B, s*s, C)`: z0 from the previous scale's grid
    /// `bt.grids[si - 1]` (zeros on scale 0), the code MLP, the folded source linear.
    pub(super) fn scale_sources(
        &self,
        bt: &mut Batch,
        schedule: &Schedule,
        si: usize,
    ) -> Result<()> {
        let g = &self.gpu;
        let (c, e) = (self.cfg.hidden_size, self.cfg.code_dim());
        let s = schedule.scales[si].size;
        let cells = bt.b * s * s;
        if si == 0 {
            g.memset_zeros(&mut bt.z0)?;
        } else {
            let sp = schedule.scales[si - 1].size;
            embed::upsample_codes(
                g,
                &bt.grids[si - 1],
                embed::Codebook {
                    vectors: &self.codebook,
                    e,
                },
                &mut bt.z0,
                bt.b,
                sp,
                s,
            )?;
        }
        embed::codevec_hidden(g, &self.mlp, &bt.z0, &mut bt.hid, cells)?;
        linear(
            g,
            &bt.hid,
            0,
            &self.srcfold,
            &mut bt.src,
            0,
            cells,
            64,
            c,
            0.0,
        )?;
        add_bias_f32(g, &mut bt.src, &self.srcfold_b, cells, c)
    }
}

/// Why a captured loop stopped before its graph was kept.
enum Stop {
    /// The capture failed (a launch refused, the capture not begun or not ended): the loop
    /// runs again eagerly.
    Failed(FailReason),
    /// The steps stopped (a cancellation) or the graph's replay failed: returned as is.
    Error(anyhow::Error),
}

impl GpuBackend<'_> {
    /// Start a batch of the plan's labels: its buffers (this backend's or the model's
    /// cached ones when the shape matches, else new), its host inputs uploaded into them (before
    /// any capture: silu(class embeddings) for the AdaLN GEMMs, the class token's input, seed
    /// and image offset), the planned decode's buffers. Returns the key of the loop's
    /// recording when the plan lets it be recorded.
    fn begin(&mut self, plan: &LoopPlan) -> Result<Option<GraphKey>> {
        let (schedule, labels, guided) = (plan.schedule, plan.labels, plan.guided);
        let m = self.m;
        let g = &m.gpu;
        let cfg = &m.cfg;
        let c = cfg.hidden_size;
        let b = labels.len();
        let rows = if guided { 2 * b } else { b };
        let mut classes = labels.to_vec();
        if guided {
            classes.extend(std::iter::repeat_n(cfg.num_classes, b));
        }
        let key = BatchKey::new(b, guided, schedule);
        // This backend's previous batch, else the model's cached one (from a dropped backend).
        let cached = match (self.key.take(), self.batch.take()) {
            (Some(k), Some(bt)) => Some((k, bt, std::mem::take(&mut self.steps))),
            _ => m.cache.lock().ok().and_then(|mut c| c.take()),
        };
        let mut bt = match cached {
            Some((k, mut bt, steps)) if k == key => {
                bt.len = 0;
                // The previous batch may have dropped its unconditional rows (cfg_end_step).
                bt.rows = rows;
                bt.forced.iter_mut().for_each(|f| *f = None);
                bt.stats.iter_mut().for_each(|st| *st = None);
                self.steps = steps;
                bt
            }
            _ => {
                let bt = m.allocate(schedule, b, rows, schedule.max_block())?;
                self.steps = m.step_indices(schedule)?;
                bt
            }
        };
        let mut act = Vec::with_capacity(rows * c);
        let mut x0 = Vec::with_capacity(rows * c);
        for &cls in &classes {
            let row = &m.class_emb[cls * c..(cls + 1) * c];
            act.extend(row.iter().map(|&z| math::silu(z)));
            x0.extend_from_slice(row);
        }
        g.upload_into(&to_bf16(&act), &mut bt.act, 0)?;
        g.upload_into(&x0, &mut bt.x, 0)?;
        g.upload_into(&[plan.seed, plan.image0 as u64], &mut bt.run, 0)?;
        g.clear_marks(&bt.marks);
        // The planned decode joins the loop when one launch sequence takes the batch; its
        // buffers are the batch's (allocated before any capture, kept with its graphs).
        let decode = plan
            .decode
            .and_then(|si| Some((si, schedule.scales.get(si)?.size)));
        self.decoded = None;
        self.loop_decode = decode.map(|(si, _)| si);
        if let Some((_, s)) = decode
            && !bt.dec.as_ref().is_some_and(|d| d.fits(b, s))
        {
            // Graphs that decode launch on the old buffers: they go first.
            bt.graphs.drop_decoding();
            bt.dec = None;
            bt.dec = Some(m.decoder.buffers(g, b, s, self.decode_batch_limit)?);
        }
        self.key = Some(key);
        self.guided = guided;
        self.timed = true;
        self.batch = Some(bt);
        Ok(plan.graph.then(|| GraphKey {
            signature: plan.signature,
            decode: decode.map(|(si, _)| si),
        }))
    }

    /// The AdaLN modulations and the class token, between timestamps 0 and 1 when timed.
    fn enqueue_prefill(&mut self) -> Result<()> {
        let (m, timed) = (self.m, self.timed);
        let bt = self
            .batch
            .as_mut()
            .context("prefill before a batch began")?;
        if timed {
            m.gpu.mark(&bt.marks, 0)?;
        }
        m.prefill(bt)?;
        if timed {
            m.gpu.mark(&bt.marks, 1)?;
        }
        Ok(())
    }

    /// The loop with eager launches (timed): the prefill, the pipeline's steps, the planned
    /// decode. Returns the host milliseconds from `t0` to the prefill's end.
    fn eager(&mut self, schedule: &Schedule, t0: Instant, steps: &mut LoopSteps) -> Result<f64> {
        self.timed = true;
        self.enqueue_prefill()?;
        let prefill_ms = elapsed_ms(t0);
        steps(self)?;
        self.enqueue_decode(schedule)?;
        Ok(prefill_ms)
    }

    /// Record the loop (the prefill, the pipeline's steps, the planned decode) into a graph,
    /// with timestamps in it when `timed`; replay it and keep it under `key`. The capture is
    /// over when this returns, whatever happened inside it.
    fn capture(
        &mut self,
        key: &GraphKey,
        timed: bool,
        schedule: &Schedule,
        steps: &mut LoopSteps,
    ) -> std::result::Result<(), Stop> {
        let m = self.m;
        let g = &m.gpu;
        let failed = |e: anyhow::Error| Stop::Failed(FailReason::Capture(format!("{e:#}")));
        g.begin_capture()
            .map_err(|e| Stop::Failed(FailReason::BeginCapture(format!("{e:#}"))))?;
        self.timed = timed;
        self.capture_fault = None;
        let mut record = || -> std::result::Result<(), Stop> {
            self.enqueue_prefill().map_err(failed)?;
            steps(self).map_err(|e| match self.capture_fault.take() {
                Some(fault) => Stop::Failed(FailReason::Capture(fault)),
                None => Stop::Error(e),
            })?;
            self.enqueue_decode(schedule).map_err(failed)
        };
        let recorded = record();
        let ended = g.end_capture();
        recorded?;
        let graph = ended.map_err(failed)?;
        g.replay(&graph).map_err(Stop::Error)?;
        let bt = self.batch.as_mut().expect("a batch began");
        bt.graphs.captured(key.clone(), graph, timed);
        Ok(())
    }

    /// After the loop: its times as the timestamps on the stream measured them, when it
    /// took them (a warning and None when they cannot be read).
    fn device_times(&self) -> Option<DeviceTimes> {
        let bt = self.batch.as_ref()?;
        if !self.timed {
            return None;
        }
        let g = &self.m.gpu;
        let steps = bt.marks.len() - 3;
        let read = || -> Result<DeviceTimes> {
            Ok(DeviceTimes {
                prefill_ms: g.mark_ms(&bt.marks, 0, 1)?,
                step_ms: (0..steps)
                    .map(|t| g.mark_ms(&bt.marks, t + 1, t + 2))
                    .collect::<Result<_>>()?,
                decode_ms: self
                    .decoded
                    .map(|_| g.mark_ms(&bt.marks, steps + 1, steps + 2))
                    .transpose()?,
            })
        };
        match read() {
            Ok(t) => Some(t),
            Err(e) => {
                eprintln!("warning: {e:#}; this batch has no device step times");
                None
            }
        }
    }

    /// The loop's outcome: the grids read back, and its device times.
    fn outcome(
        &mut self,
        schedule: &Schedule,
        replayed: bool,
        prefill_ms: f64,
    ) -> Result<LoopOutcome> {
        Ok(LoopOutcome {
            grids: self.read_grids(schedule)?,
            replayed,
            prefill_ms,
            device_times: self.device_times(),
        })
    }

    /// During a capture, note a failed launch of the steps (the capture failed; see
    /// [`GpuBackend::capture`]).
    fn note_fault<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r
            && self.m.gpu.capturing()
        {
            self.capture_fault = Some(format!("{e:#}"));
        }
        r
    }
}

impl Backend for GpuBackend<'_> {
    fn config(&self) -> &ModelConfig {
        &self.m.cfg
    }

    fn memory(&self) -> Result<crate::pipeline::Memory> {
        self.m.gpu.memory()
    }

    /// Start the batch, then what the graph cache decides for the plan's key: replay its
    /// recording (the steps are not called), capture the loop (on a failure inside the
    /// capture: the failure recorded, the capture ended, a warning, and the loop run again
    /// eagerly from a fresh start), or launch eagerly. Eager and recorded loops take
    /// timestamps on the stream (a recording leaves them out after one failed with them).
    fn run_loop(&mut self, plan: &LoopPlan, steps: &mut LoopSteps) -> Result<LoopOutcome> {
        let t0 = Instant::now();
        let schedule = plan.schedule;
        let key = self.begin(plan)?;
        let m = self.m;
        let bt = self.batch.as_mut().expect("a batch began");
        let timed = match bt.graphs.decide(key.as_ref()) {
            Decision::Replay { graph, timed } => {
                m.gpu.replay(graph)?;
                self.timed = timed;
                self.decoded = self.loop_decode;
                return self.outcome(schedule, true, elapsed_ms(t0));
            }
            Decision::Capture { timed } => timed,
            Decision::Eager => {
                let prefill_ms = self.eager(schedule, t0, steps)?;
                return self.outcome(schedule, false, prefill_ms);
            }
        };
        let key = key.expect("the cache captures only loops that have a key");
        match self.capture(&key, timed, schedule, steps) {
            Ok(()) => self.outcome(schedule, true, elapsed_ms(t0)),
            Err(Stop::Error(e)) => Err(e),
            Err(Stop::Failed(reason)) => {
                let bt = self.batch.as_mut().expect("a batch began");
                let warning = format!("warning: graph capture failed: {reason}; ");
                if bt.graphs.capture_failed(&key, reason) {
                    eprintln!("{warning}this batch shape and plan run with eager launches");
                } else {
                    eprintln!(
                        "{warning}running the loop with eager launches (the next capture \
                         leaves its timestamps out)"
                    );
                }
                let t = Instant::now();
                self.begin(plan)?;
                let prefill_ms = self.eager(schedule, t, steps)?;
                self.outcome(schedule, false, prefill_ms)
            }
        }
    }

    /// Decode scale `si`'s grid on the device (conditional rows only; both guidance halves
    /// share tokens) and copy back 8-bit pixels (B, 3, H, W).
    fn decode(&mut self, schedule: &Schedule, si: usize) -> Result<Decoded> {
        let bt = self.batch.as_ref().context("decode before a batch ran")?;
        let s = schedule.scales.get(si).context("no such scale")?.size;
        let grid = bt.grids.get(si).context("no such scale")?;
        let (dec, g) = (&self.m.decoder, &self.m.gpu);
        if self.decoded == Some(si)
            && let Some(d) = &bt.dec
        {
            // Decoded at the end of the loop (inside its graph when replayed).
            return Ok(Decoded {
                pixels: g.download(d.pixels())?,
                images: None,
            });
        }
        // Every batch decodes in one launch sequence (equal passes within the kernels' int32
        // indexing and the free memory: `GpuDecoder::chunk`).
        let pixels = g
            .in_part(super::ledger::DECODER, || {
                dec.decode_device(g, grid, bt.b, s, true)
            })?
            .context("the decoder read back no pixels")?;
        Ok(Decoded {
            pixels,
            images: None,
        })
    }
}

impl Stepper for GpuBackend<'_> {
    fn begin_scale(&mut self, schedule: &Schedule, si: usize) -> Result<()> {
        let bt = self
            .batch
            .as_mut()
            .context("a scale before a batch began")?;
        let r = self.m.scale_sources(bt, schedule, si);
        self.note_fault(r)
    }

    fn step(&mut self, schedule: &Schedule, step: &Step, ch: &StepChoice) -> Result<StepLogits> {
        let r = self.enqueue_step(schedule, step, ch);
        self.note_fault(r)
    }

    fn rows(&self) -> Option<usize> {
        self.batch.as_ref().map(|bt| bt.rows)
    }
}

impl GpuBackend<'_> {
    /// One serial step, enqueued (and synchronized in eager mode).
    fn enqueue_step(
        &mut self,
        schedule: &Schedule,
        step: &Step,
        ch: &StepChoice,
    ) -> Result<Option<Vec<f32>>> {
        let m = self.m;
        let g = &m.gpu;
        let bt = self.batch.as_mut().context("a step before a batch began")?;
        if ch.drop_uncond && self.guided {
            // Guidance is over: from here on only the conditional rows (the first B of every
            // row-major buffer: KV caches, modulations, activations) are computed.
            bt.rows = bt.b;
            self.guided = false;
        }
        let (c, v) = (m.cfg.hidden_size, m.cfg.codebook_size());
        let sc = &schedule.scales[step.scale];
        let n = step.positions.len();
        let idx = &self.steps[step.t];
        let cells = sc.tokens;
        if ch.stats && bt.stats[step.scale].is_none() {
            let nan = vec![f32::NAN; bt.b * cells];
            bt.stats[step.scale] = Some((g.upload(&nan)?, g.upload(&nan)?));
        }
        if let Some(f) = ch.forced
            && bt.forced[step.scale].is_none()
        {
            let fi: Vec<i32> = f.iter().map(|&t| t as i32).collect();
            bt.forced[step.scale] = Some(g.upload(&fi)?);
        }
        embed::gather_inputs(
            g,
            &m.tables,
            &bt.src,
            &bt.grids[step.scale],
            idx,
            &mut bt.x,
            bt.rows,
            bt.b,
            n,
            cells,
            embed::SeqRows::step(n),
        )?;
        m.forward(bt, n, &idx.cur_global, &idx.prev_rope, None)?;
        let knobs = ch.knobs(bt.b, v, cells, self.guided, step.t);
        // The head only on the rows the choice reads: without guidance at this step (t <
        // cfg_start_step) the unconditional rows' logits would be discarded. Its bias is added
        // inside guided_sample.
        let t = if knobs.guidance.is_some() {
            bt.rows * n
        } else {
            bt.b * n
        };
        let eps = m.cfg.rms_norm_eps as f32;
        rmsnorm_adaln(g, &bt.x, &m.final_norm, None, &mut bt.a, t, n, c, eps)?;
        linear(g, &bt.a, 0, &m.head, &mut bt.logits, 0, t, c, v, 0.0)?;
        let forced = if ch.forced.is_some() {
            bt.forced[step.scale].as_ref()
        } else {
            None
        };
        sampling::guided_sample(
            g,
            &knobs,
            n,
            &mut bt.logits,
            &idx.local,
            &idx.cur_global,
            forced,
            &mut bt.grids[step.scale],
            &mut bt.tokens,
            match &mut bt.stats[step.scale] {
                Some((p, e)) if ch.stats => Some((p, e)),
                _ => None,
            },
            Some(&m.head_b),
            Some(&bt.run),
        )?;
        if self.timed {
            g.mark(&bt.marks, step.t + 2)?;
        }
        if self.sync_after_steps {
            g.sync()?;
        }
        let out = if ch.record {
            Some(g.download_range(&bt.logits, 0..bt.b * n * v)?)
        } else {
            None
        };
        Ok(out)
    }

    /// At the end of the loop (before a capture ends): the planned decode into the batch's
    /// decoder buffers, and its closing timestamp.
    fn enqueue_decode(&mut self, schedule: &Schedule) -> Result<()> {
        let bt = self.batch.as_mut().expect("begin() not called");
        let (Some(si), Some(d)) = (self.loop_decode, bt.dec.as_mut()) else {
            return Ok(()); // none planned, or the batch is decoded in sub-batches by `decode`
        };
        let s = schedule.scales.get(si).context("no such scale")?.size;
        ensure!(d.fits(bt.b, s), "decoder buffers of another batch shape");
        let g = &self.m.gpu;
        g.in_part(super::ledger::DECODER, || {
            self.m.decoder.decode_into(g, d, &bt.grids[si])
        })?;
        if self.timed {
            g.mark(&bt.marks, bt.marks.len() - 1)?;
        }
        self.decoded = Some(si);
        Ok(())
    }

    /// Read the grids (and statistics) back.
    fn read_grids(&mut self, schedule: &Schedule) -> Result<Grids> {
        let g = &self.m.gpu;
        let bt = self.batch.as_ref().expect("begin() not called");
        let mut out = Vec::new();
        for (k, _) in schedule.scales.iter().enumerate() {
            let grid = g.download(&bt.grids[k])?;
            out.push(grid.into_iter().map(|t| t as u32).collect());
        }
        // Statistics come back only when every scale recorded them (as on the CPU).
        let (mut prob, mut entropy) = (Vec::new(), Vec::new());
        if bt.stats.iter().all(Option::is_some) {
            for (p, e) in bt.stats.iter().flatten() {
                prob.push(g.download(p)?);
                entropy.push(g.download(e)?);
            }
        }
        Ok(Grids {
            tokens: out,
            prob,
            entropy,
        })
    }
}
