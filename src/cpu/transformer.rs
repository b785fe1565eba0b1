//! The transformer step on the CPU in f32 (SPEC.md section 5), composed from the per-kernel
//! references in [`crate::cpu::ops`] in the order the CUDA engine launches them:
//!
//! ```text
//! per layer: rmsnorm_adaln -> a; a @ wqkv^T -> qkv; rope_kv_append -> q + cache append;
//!            attention -> o; x += o @ wo^T; rmsnorm_adaln -> a; a @ [w1; w3]^T -> g;
//!            silu_mul -> h; x += h @ w2^T
//! logits:    rmsnorm (final norm) -> a; a @ head^T + b
//! ```

use super::ops::{self, AttnShape};
use crate::math;
use crate::model::config::ModelConfig;
use crate::model::weights::TransformerWeights;

/// Per-batch state: KV cache and the per-row AdaLN modulations.
pub struct CpuTransformer<'w> {
    w: &'w TransformerWeights,
    c: usize,
    h: usize,
    d: usize,
    f: usize,
    eps: f32,
    num_mixing: usize,
    rows: usize,
    capacity: usize,
    /// Tokens cached so far (the same for every row).
    pub len: usize,
    /// Per layer: keys and values, each (rows, H, capacity, D).
    k_cache: Vec<Vec<f32>>,
    v_cache: Vec<Vec<f32>>,
    /// Per layer: (rows, 4C) = shift1, scale1, shift2, scale2.
    modulation: Vec<Vec<f32>>,
}

impl<'w> CpuTransformer<'w> {
    /// Allocate the cache for `classes.len()` rows and at most `capacity` tokens per row, and
    /// compute each row's AdaLN modulations from its class embedding.
    pub fn new(
        cfg: &ModelConfig,
        w: &'w TransformerWeights,
        classes: &[usize],
        capacity: usize,
    ) -> Self {
        let c = cfg.hidden_size;
        let rows = classes.len();
        let (h, d) = (cfg.num_heads, cfg.head_dim());
        // silu(class_emb) per row, then each layer's stacked modulation linear.
        let mut act = Vec::with_capacity(rows * c);
        for &cls in classes {
            act.extend_from_slice(&w.class_embeddings[cls * c..(cls + 1) * c]);
        }
        act.iter_mut().for_each(|v| *v = math::silu(*v));
        let modulation = w
            .layers
            .iter()
            .map(|l| l.modulation.forward(&act, rows)) // (rows, 4C)
            .collect();
        let cache = || vec![vec![0.0f32; rows * h * capacity * d]; cfg.num_layers];
        CpuTransformer {
            w,
            c,
            h,
            d,
            f: cfg.ffn_dim,
            eps: cfg.rms_norm_eps as f32,
            num_mixing: cfg.num_mixing_layers,
            rows,
            capacity,
            len: 0,
            k_cache: cache(),
            v_cache: cache(),
            modulation,
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Keep only the first `keep` rows (the conditional half once guidance is over): their
    /// caches and modulations stay, the rest is freed and no longer computed.
    pub fn keep_rows(&mut self, keep: usize) {
        assert!(keep <= self.rows, "keep_rows: {keep} of {} rows", self.rows);
        let per_row = self.h * self.capacity * self.d;
        for cache in self.k_cache.iter_mut().chain(self.v_cache.iter_mut()) {
            cache.truncate(keep * per_row);
            cache.shrink_to_fit();
        }
        for m in &mut self.modulation {
            m.truncate(keep * 4 * self.c);
        }
        self.rows = keep;
    }

    /// Run `n` new tokens per row through every layer, appending their keys and values to the
    /// cache. `x` is the residual stream (rows * n, C), updated in place; `cur` and `prev` are
    /// each token's RoPE table rows (its own position, and the paired previous-block position),
    /// shared by all rows.
    pub fn forward(&mut self, x: &mut [f32], cur: &[usize], prev: &[usize]) {
        self.forward_with(x, cur, prev, None);
    }

    /// The teacher-forced pass of SPEC.md section 9: the whole sequence (class token and every
    /// block) as ONE forward into an empty cache, token i attending to token j iff
    /// `block[j] <= block[i]` (the block-causal mask; `block (n)`, the class token is block 0).
    pub fn forward_masked(&mut self, x: &mut [f32], cur: &[usize], prev: &[usize], block: &[i32]) {
        assert_eq!(self.len, 0, "forward_masked: the cache must be empty");
        assert_eq!(block.len(), cur.len());
        let mask = ops::BlockMask {
            key_block: block,
            query_block: block,
        };
        self.forward_with(x, cur, prev, Some(mask));
    }

    fn forward_with(
        &mut self,
        x: &mut [f32],
        cur: &[usize],
        prev: &[usize],
        mask: Option<ops::BlockMask>,
    ) {
        let (c, rows) = (self.c, self.rows);
        let n = cur.len();
        assert_eq!(x.len(), rows * n * c);
        let w = self.w;
        let shape = AttnShape {
            rows,
            heads: self.h,
            head_dim: self.d,
            n,
            start: self.len,
            capacity: self.capacity,
        };
        assert!(shape.keys() <= self.capacity, "KV cache overflow");
        let t = rows * n;
        let mut q = vec![0.0f32; shape.q_len()]; // (rows, H, n, D)
        for (li, layer) in w.layers.iter().enumerate() {
            let m = &self.modulation[li];
            let a = ops::rmsnorm_adaln(x, &layer.attention_norm, Some((m, 0)), n, c, self.eps);
            let qkv = layer.wqkv.forward(&a, t); // (T, 3C)
            let mix = (li < self.num_mixing).then(|| &w.mix[li * self.h..(li + 1) * self.h]);
            ops::rope_kv_append(
                &qkv,
                &w.rope_re,
                &w.rope_im,
                cur,
                prev,
                mix,
                &mut q,
                &mut self.k_cache[li],
                &mut self.v_cache[li],
                shape,
            );
            let o = ops::attention(&q, &self.k_cache[li], &self.v_cache[li], mask, shape);
            let attn = layer.wo.forward(&o, t);
            x.iter_mut().zip(&attn).for_each(|(xv, av)| *xv += av);

            let a = ops::rmsnorm_adaln(x, &layer.ffn_norm, Some((m, 2 * c)), n, c, self.eps);
            let g = layer.w13.forward(&a, t); // (T, 2F)
            let hf = ops::silu_mul(&g, self.f); // (T, F)
            let y = layer.w2.forward(&hf, t);
            x.iter_mut().zip(&y).for_each(|(xv, yv)| *xv += yv);
        }
        self.len += n;
    }

    /// Logits (T, V) of residual states `x (T, C)`: final RMSNorm, then the head.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        let a = ops::rmsnorm_adaln(x, &self.w.final_norm, None, 1, self.c, self.eps);
        self.w.head.forward(&a, x.len() / self.c)
    }
}
