//! Teacher-forced scoring on the GPU (SPEC.md section 9), the device twin of `cpu::score`: the
//! whole sequence (class token, then every block of every scale with the true codes as
//! inputs) as ONE transformer pass per batch with the block-causal mask.
//!
//! ```text
//! true codes (B, s, s) per scale -> grids;  class embeddings -> x row 0, silu -> AdaLN
//! per scale: scale_sources (upsample_codes of the previous true grid, code MLP, src_fold)
//!   per step: gather_inputs_at -> x (B, 1+N, C) at the step's offset in the sequence
//! forward (every layer, n = 1+N into an empty cache) with attention's block-causal mask:
//!   key j visible to query i iff block[j] <= block[i] (block (1+N) i32: class token 0, step
//!   t's tokens t+1); the kernel reads the block ids per key tile, no (1+N)^2 mask exists
//! final rmsnorm + head + bias -> logits (B, 1+N, V) f32 -> host: drop the class token's row,
//!   cross-entropy and top-1 per position (`ScoreStats::add`, f64 log-sum-exp)
//! ```
//! Weights and activations as in the sampler (bf16 storage, f32 residual and logits), so the
//! losses match the CPU's to bf16 accuracy (tests/gpu_score.rs).

use super::attention::BlockMask;
use super::embed::{SeqRows, gather_inputs};
use super::engine::{BatchKey, GpuModel, ScoreBuffers, to_bf16};
use super::gemm::linear;
use super::norm::{add_bias_f32, rmsnorm_adaln};
use crate::math;
use crate::order::Schedule;
use crate::score::{ScoreStats, check_inputs};
use anyhow::{Context, Result};

impl GpuModel {
    /// Logits `(B, N, V)` of every position of the sequence in schedule order (the class
    /// token's output dropped), from ONE masked pass on the device with the true codes
    /// `tokens` (per scale (B, s, s), raster order): `cpu::score::masked_logits` on the GPU.
    pub fn masked_logits(
        &self,
        schedule: &Schedule,
        labels: &[usize],
        tokens: &[Vec<u32>],
    ) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        check_inputs(cfg, schedule, labels, tokens)?;
        let g = &self.gpu;
        let (b, c, v) = (labels.len(), cfg.hidden_size, cfg.codebook_size());
        let n = schedule.total_tokens();
        let len = 1 + n;
        // The last call's buffers when the shape is the same (no allocation per call).
        let key = BatchKey::new(b, false, schedule);
        let mut slot = self.score_cache.lock().unwrap_or_else(|p| p.into_inner());
        let bufs = match slot.take() {
            Some(mut sb) if sb.key == key => {
                sb.bt.len = 0;
                sb
            }
            old => {
                drop(old); // free the other shape's buffers first
                ScoreBuffers {
                    key,
                    bt: self
                        .allocate(schedule, b, b, len)
                        .with_context(|| format!("allocating the scoring pass of {b} images"))?,
                    steps: self.step_indices(schedule)?,
                    cur: g.alloc(len)?,
                    prev: g.alloc(len)?,
                    block: g.alloc(len)?,
                }
            }
        };
        let sb = slot.insert(bufs);
        let bt = &mut sb.bt;
        for (grid, t) in bt.grids.iter_mut().zip(tokens) {
            let t: Vec<i32> = t.iter().map(|&x| x as i32).collect();
            g.upload_into(&t, grid, 0)?;
        }
        // Class token inputs at each row's start, and silu(class embedding) for AdaLN.
        let mut act = Vec::with_capacity(b * c);
        for (bi, &cls) in labels.iter().enumerate() {
            let row = &self.class_emb[cls * c..(cls + 1) * c];
            act.extend(row.iter().map(|&z| math::silu(z)));
            g.upload_into(row, &mut bt.x, bi * len * c)?;
        }
        g.upload_into(&to_bf16(&act), &mut bt.act, 0)?;
        self.modulate(bt)?;
        let steps = &sb.steps;
        // RoPE rows (own, paired previous-block; row N for the class token, N+1 = "empty")
        // and block ids of every position.
        let (mut cur, mut prev, mut block) = (vec![n as i32], vec![n as i32], vec![0i32]);
        let mut off = 1;
        for (si, scale) in schedule.scales.iter().enumerate() {
            self.scale_sources(bt, schedule, si)?;
            for st in schedule.steps.iter().filter(|st| st.scale == si) {
                let idx = &steps[st.t];
                let at = SeqRows { stride: len, off };
                let (src, grid) = (&bt.src, &bt.grids[si]);
                gather_inputs(
                    g,
                    &self.tables,
                    src,
                    grid,
                    idx,
                    &mut bt.x,
                    b,
                    b,
                    idx.n,
                    scale.tokens,
                    at,
                )?;
                let k = st.positions.len();
                cur.extend(schedule.global_positions(st).iter().map(|&p| p as i32));
                match schedule.global_prev(st) {
                    Some(q) => prev.extend(q.iter().map(|&p| p as i32)),
                    None => prev.extend(std::iter::repeat_n(n as i32 + 1, k)),
                }
                block.extend(std::iter::repeat_n(st.t as i32 + 1, k));
                off += k;
            }
        }
        debug_assert_eq!(off, len);
        g.upload_into(&cur, &mut sb.cur, 0)?;
        g.upload_into(&prev, &mut sb.prev, 0)?;
        g.upload_into(&block, &mut sb.block, 0)?;
        let bt = &mut sb.bt;
        let mask = BlockMask {
            key_block: &sb.block,
            query_block: &sb.block,
        };
        self.forward(bt, len, &sb.cur, &sb.prev, Some(mask))?;
        let t = b * len;
        let eps = cfg.rms_norm_eps as f32;
        rmsnorm_adaln(g, &bt.x, &self.final_norm, None, &mut bt.a, t, len, c, eps)?;
        linear(g, &bt.a, 0, &self.head, &mut bt.logits, 0, t, c, v, 0.0)?;
        add_bias_f32(g, &mut bt.logits, &self.head_b, t, v)?;
        let all = g.download_range(&bt.logits, 0..t * v)?; // (B, 1+N, V)
        let mut out = Vec::with_capacity(b * n * v);
        for row in all.chunks_exact(len * v) {
            out.extend_from_slice(&row[v..]);
        }
        Ok(out)
    }
}

/// `cpu::score::score_codes` on the GPU: score one batch of code pyramids (`tokens`: per scale
/// (B, s, s)) with class `labels` at `steps_per_scale`, adding to `stats`.
pub fn score_codes(
    gm: &GpuModel,
    scale_sizes: &[usize],
    labels: &[usize],
    tokens: &[Vec<u32>],
    steps_per_scale: usize,
    stats: &mut ScoreStats,
) -> Result<()> {
    let schedule = Schedule::uniform(scale_sizes, steps_per_scale)?;
    let logits = gm.masked_logits(&schedule, labels, tokens)?;
    stats.add(&schedule, &logits, tokens, gm.cfg.codebook_size())
}
