//! The transformer step on the CPU in f32 (SPEC.md section 5): AdaLN-modulated RMSNorm,
//! dual-position RoPE with per-head key mixing, attention over a KV cache plus the new block
//! (no mask), SwiGLU FFN, final norm and head.

use super::ops;
use crate::model::config::ModelConfig;
use crate::model::weights::TransformerWeights;
use rayon::prelude::*;

/// Per-batch state: KV cache and the per-row AdaLN modulations.
pub struct CpuTransformer<'w> {
    w: &'w TransformerWeights,
    c: usize,
    h: usize,
    d: usize,
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

fn rmsnorm_rows(x: &[f32], w: &[f32], eps: f32, c: usize) -> Vec<f32> {
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .for_each(|(o, xr)| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for i in 0..c {
                o[i] = xr[i] * inv * w[i];
            }
        });
    out
}

/// `rope(u, R)` of SPEC.md section 5 for one head vector of D dims.
#[inline]
fn rope(u: &[f32], re: &[f32], im: &[f32], out: &mut [f32]) {
    let half = u.len() / 2;
    for i in 0..half {
        out[i] = u[i] * re[i] - u[i + half] * im[i];
    }
    for i in half..u.len() {
        out[i] = u[i] * re[i] + u[i - half] * im[i];
    }
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
        let h = cfg.num_heads;
        let d = cfg.head_dim();
        // SiLU(class_emb) per row, then each layer's two modulation linears.
        let mut act = Vec::with_capacity(rows * c);
        for &cls in classes {
            act.extend(
                w.class_embeddings[cls * c..(cls + 1) * c]
                    .iter()
                    .map(|&v| ops::silu(v)),
            );
        }
        let modulation = w
            .layers
            .iter()
            .map(|l| {
                let m1 = l.input_mod.forward(&act, rows); // (rows, 2C)
                let m2 = l.post_attention_mod.forward(&act, rows);
                let mut m = Vec::with_capacity(rows * 4 * c);
                for r in 0..rows {
                    m.extend_from_slice(&m1[r * 2 * c..(r + 1) * 2 * c]);
                    m.extend_from_slice(&m2[r * 2 * c..(r + 1) * 2 * c]);
                }
                m
            })
            .collect();
        let cache = || vec![vec![0.0f32; rows * h * capacity * d]; cfg.num_layers];
        CpuTransformer {
            w,
            c,
            h,
            d,
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

    /// Run `n` new tokens per row through the transformer, appending their keys and values
    /// to the cache. `x` is (rows, n, C); `cur` and `prev` are each token's RoPE table rows
    /// (its own position, and the paired previous-block position), shared by all rows.
    /// Returns the final normed hidden states (rows, n, C).
    pub fn forward(&mut self, x: &[f32], cur: &[usize], prev: &[usize]) -> Vec<f32> {
        let (c, h, d, rows) = (self.c, self.h, self.d, self.rows);
        let n = cur.len();
        assert_eq!(prev.len(), n);
        assert_eq!(x.len(), rows * n * c);
        assert!(self.len + n <= self.capacity, "KV cache overflow");
        let mut x = x.to_vec(); // (rows, n, C) residual stream
        let start = self.len;
        let total = start + n;
        let w = self.w;
        for (li, layer) in w.layers.iter().enumerate() {
            let m = &self.modulation[li];
            // a = RMSNorm(x) * attention_norm, then AdaLN: a * scale1 + shift1.
            let mut a = rmsnorm_rows(&x, &layer.attention_norm, self.eps, c);
            modulate(&mut a, m, rows, n, c, 0);
            let qkv = layer.wqkv.forward(&a, rows * n); // (rows, n, 3C)

            // Rotate q with the current position; k with the mixed position (first layers).
            let mut q = vec![0.0f32; rows * h * n * d]; // (rows, H, n, D)
            let kc = &mut self.k_cache[li];
            let vc = &mut self.v_cache[li];
            let cap = self.capacity;
            let mixing = li < self.num_mixing;
            let mut rbuf = vec![0.0f32; 2 * d];
            for r in 0..rows {
                for t in 0..n {
                    let base = (r * n + t) * 3 * c;
                    let (cr, pr) = (cur[t] * d, prev[t] * d);
                    for hh in 0..h {
                        let qs = &qkv[base + hh * d..base + (hh + 1) * d];
                        let ks = &qkv[base + c + hh * d..base + c + (hh + 1) * d];
                        let vs = &qkv[base + 2 * c + hh * d..base + 2 * c + (hh + 1) * d];
                        let qo = ((r * h + hh) * n + t) * d;
                        rope(
                            qs,
                            &w.rope_re[cr..cr + d],
                            &w.rope_im[cr..cr + d],
                            &mut q[qo..qo + d],
                        );
                        let ko = ((r * h + hh) * cap + start + t) * d;
                        let (re, im) = rbuf.split_at_mut(d);
                        if mixing {
                            let a = w.mix[li * h + hh];
                            for i in 0..d {
                                re[i] = a * w.rope_re[cr + i] + (1.0 - a) * w.rope_re[pr + i];
                                im[i] = a * w.rope_im[cr + i] + (1.0 - a) * w.rope_im[pr + i];
                            }
                        } else {
                            re.copy_from_slice(&w.rope_re[cr..cr + d]);
                            im.copy_from_slice(&w.rope_im[cr..cr + d]);
                        }
                        rope(ks, re, im, &mut kc[ko..ko + d]);
                        vc[ko..ko + d].copy_from_slice(vs);
                    }
                }
            }

            // Attention per (row, head): softmax(q K^T / sqrt(D)) V over the cache + block.
            let scale = 1.0 / (d as f32).sqrt();
            let kc = &self.k_cache[li];
            let vc = &self.v_cache[li];
            let mut o = vec![0.0f32; rows * n * c]; // (rows, n, C) heads concatenated
            let heads: Vec<Vec<f32>> = (0..rows * h)
                .into_par_iter()
                .map(|rh| {
                    let qh = &q[rh * n * d..(rh + 1) * n * d];
                    let kh = &kc[rh * cap * d..rh * cap * d + total * d];
                    let vh = &vc[rh * cap * d..rh * cap * d + total * d];
                    let mut s = vec![0.0f32; n * total]; // (n, total)
                    ops::matmul_bt(qh, kh, &mut s, n, d, total, 0.0);
                    for row in s.chunks_exact_mut(total) {
                        row.iter_mut().for_each(|v| *v *= scale);
                        ops::softmax_inplace(row);
                    }
                    let mut oh = vec![0.0f32; n * d];
                    ops::matmul(&s, vh, &mut oh, n, total, d, 0.0);
                    oh
                })
                .collect();
            for (rh, oh) in heads.iter().enumerate() {
                let (r, hh) = (rh / h, rh % h);
                for t in 0..n {
                    let dst = (r * n + t) * c + hh * d;
                    o[dst..dst + d].copy_from_slice(&oh[t * d..(t + 1) * d]);
                }
            }
            let attn = layer.wo.forward(&o, rows * n);
            x.iter_mut().zip(&attn).for_each(|(xv, av)| *xv += av);

            // FFN: f = AdaLN(RMSNorm(x) * ffn_norm); x += w2(SiLU(w1 f) * w3 f).
            let mut f = rmsnorm_rows(&x, &layer.ffn_norm, self.eps, c);
            modulate(&mut f, m, rows, n, c, 2 * c);
            let mut g = layer.w1.forward(&f, rows * n);
            let u = layer.w3.forward(&f, rows * n);
            g.par_iter_mut()
                .zip(u.par_iter())
                .for_each(|(gv, uv)| *gv = ops::silu(*gv) * uv);
            let y = layer.w2.forward(&g, rows * n);
            x.iter_mut().zip(&y).for_each(|(xv, yv)| *xv += yv);
        }
        self.len = total;
        rmsnorm_rows(&x, &w.final_norm, self.eps, c)
    }

    /// Logits (rows*n, V) from final hidden states.
    pub fn head(&self, hidden: &[f32], tokens: usize) -> Vec<f32> {
        self.w.head.forward(hidden, tokens)
    }
}

/// AdaLN: `a = a * scale + shift` per row, with (shift, scale) at `offset` in the row's
/// (4C) modulation vector.
fn modulate(a: &mut [f32], m: &[f32], rows: usize, n: usize, c: usize, offset: usize) {
    for r in 0..rows {
        let mr = &m[r * 4 * c + offset..r * 4 * c + offset + 2 * c];
        let (shift, scale) = mr.split_at(c);
        for t in 0..n {
            let row = &mut a[(r * n + t) * c..(r * n + t + 1) * c];
            for i in 0..c {
                row[i] = row[i] * scale[i] + shift[i];
            }
        }
    }
}
