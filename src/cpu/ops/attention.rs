//! CPU reference of kernels/attention.cu: dual-position RoPE with per-head key mixing and the
//! KV-cache append, and attention over the cache with an optional block-causal mask.

use anyhow::{Result, ensure};
use rayon::prelude::*;

/// Shapes shared by [`rope_kv_append`] and [`attention`] (and their kernels).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttnShape {
    /// Sequence rows (B, or 2B with classifier-free guidance).
    pub rows: usize,
    /// Heads H.
    pub heads: usize,
    /// Head dim D (32, 64 or 128).
    pub head_dim: usize,
    /// New tokens per row in this step.
    pub n: usize,
    /// Tokens already in the cache before this step; the new ones go to start..start+n.
    pub start: usize,
    /// Cache capacity per row (tokens).
    pub capacity: usize,
}

impl AttnShape {
    /// Model width C = H * D.
    pub fn c(&self) -> usize {
        self.heads * self.head_dim
    }

    /// Tokens in this step, T = rows * n.
    pub fn tokens(&self) -> usize {
        self.rows * self.n
    }

    /// Keys after the append, L = start + n.
    pub fn keys(&self) -> usize {
        self.start + self.n
    }

    /// Elements of one cache buffer (rows, H, capacity, D).
    pub fn cache_len(&self) -> usize {
        self.rows * self.heads * self.capacity * self.head_dim
    }

    /// Elements of the rotated queries (rows, H, n, D).
    pub fn q_len(&self) -> usize {
        self.rows * self.heads * self.n * self.head_dim
    }

    /// Launch limits the kernels rely on; every launcher checks them.
    pub fn check(&self) -> Result<()> {
        let s = self;
        ensure!(
            s.rows >= 1 && s.heads >= 1 && s.n >= 1,
            "attention shape {s:?}: rows, heads and n must be >= 1"
        );
        ensure!(
            s.head_dim.is_multiple_of(2) && s.head_dim >= 2,
            "attention shape {s:?}: head_dim must be even"
        );
        ensure!(
            s.start + s.n <= s.capacity,
            "attention shape {s:?}: KV cache overflow (start + n > capacity)"
        );
        ensure!(
            s.rows <= 65535 && s.heads <= 65535,
            "attention shape {s:?}: rows and heads must fit a grid dimension (65535)"
        );
        let big = s.cache_len().max(s.tokens() * 3 * s.c());
        ensure!(
            s.capacity <= i32::MAX as usize && big < (1usize << 62),
            "attention shape {s:?}: too large"
        );
        Ok(())
    }
}

/// `rope(u, R)` of SPEC.md section 5 for one head vector of D dims (halves as re, im).
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

/// Rotate the new block's queries and keys and append keys and values to the cache.
///
/// * `qkv (T, 3C)`, T = rows * n, `[q | k | v]` with head h at h*D.
/// * `rope_re`, `rope_im (table_rows, D)`: unit complex numbers of each position.
/// * `cur`, `prev (n)`: table rows of each new token's position and of its paired
///   previous-block position (shared by all rows).
/// * `mix`: on key-mixing layers, the (H) sigmoid weights `a` of the current position: keys
///   rotate by `a R[cur] + (1 - a) R[prev]`; `None` rotates keys by `R[cur]`.
/// * `q_out (rows, H, n, D)` gets q'; `k_cache`, `v_cache (rows, H, capacity, D)` get k' and v
///   at positions start..start+n.
#[allow(clippy::too_many_arguments)]
pub fn rope_kv_append(
    qkv: &[f32],
    rope_re: &[f32],
    rope_im: &[f32],
    cur: &[usize],
    prev: &[usize],
    mix: Option<&[f32]>,
    q_out: &mut [f32],
    k_cache: &mut [f32],
    v_cache: &mut [f32],
    s: AttnShape,
) {
    let (h, d, n, c, cap, start) = (s.heads, s.head_dim, s.n, s.c(), s.capacity, s.start);
    assert_eq!(qkv.len(), s.tokens() * 3 * c);
    assert!(q_out.len() >= s.q_len() && k_cache.len() >= s.cache_len());
    assert!(cur.len() == n && prev.len() == n);
    let mut rbuf = vec![0.0f32; 2 * d];
    for r in 0..s.rows {
        for t in 0..n {
            let base = (r * n + t) * 3 * c;
            let (cr, pr) = (cur[t] * d, prev[t] * d);
            for hh in 0..h {
                let qs = &qkv[base + hh * d..][..d];
                let ks = &qkv[base + c + hh * d..][..d];
                let vs = &qkv[base + 2 * c + hh * d..][..d];
                let qo = ((r * h + hh) * n + t) * d;
                rope(
                    qs,
                    &rope_re[cr..cr + d],
                    &rope_im[cr..cr + d],
                    &mut q_out[qo..qo + d],
                );
                let ko = ((r * h + hh) * cap + start + t) * d;
                let (re, im) = rbuf.split_at_mut(d);
                match mix {
                    Some(m) => {
                        let a = m[hh];
                        for i in 0..d {
                            re[i] = a * rope_re[cr + i] + (1.0 - a) * rope_re[pr + i];
                            im[i] = a * rope_im[cr + i] + (1.0 - a) * rope_im[pr + i];
                        }
                    }
                    None => {
                        re.copy_from_slice(&rope_re[cr..cr + d]);
                        im.copy_from_slice(&rope_im[cr..cr + d]);
                    }
                }
                rope(ks, re, im, &mut k_cache[ko..ko + d]);
                v_cache[ko..ko + d].copy_from_slice(vs);
            }
        }
    }
}

/// The block-causal mask of the multi-block (teacher-forced) path: key j is visible to query i
/// iff `key_block[j] <= query_block[i]`.
#[derive(Clone, Copy, Debug)]
pub struct BlockMask<'a> {
    /// (start + n): block id of every key in the cache after the append.
    pub key_block: &'a [i32],
    /// (n): block id of every new query.
    pub query_block: &'a [i32],
}

/// `o = softmax(q' K^T / sqrt(D)) V` per (row, head) over cache keys 0..start+n (the cache
/// already holds this step's keys), f32.
///
/// * `q (rows, H, n, D)` from [`rope_kv_append`]; `k_cache`, `v_cache (rows, H, capacity, D)`.
/// * `mask`: optional block-causal mask; a query with no visible key gets o = 0.
/// * returns `(T, C)`, `out[(r*n + i)*C + h*D + d]`: heads concatenated, ready for wo.
pub fn attention(
    q: &[f32],
    k_cache: &[f32],
    v_cache: &[f32],
    mask: Option<BlockMask>,
    s: AttnShape,
) -> Vec<f32> {
    let (h, d, n, c, cap, total) = (s.heads, s.head_dim, s.n, s.c(), s.capacity, s.keys());
    assert!(
        q.len() >= s.q_len() && k_cache.len() >= s.cache_len() && v_cache.len() >= s.cache_len()
    );
    if let Some(m) = mask {
        assert!(m.key_block.len() >= total && m.query_block.len() >= n);
    }
    let scale = 1.0 / (d as f32).sqrt();
    let heads: Vec<Vec<f32>> = (0..s.rows * h)
        .into_par_iter()
        .map(|rh| {
            let qh = &q[rh * n * d..(rh + 1) * n * d];
            let kh = &k_cache[rh * cap * d..rh * cap * d + total * d];
            let vh = &v_cache[rh * cap * d..rh * cap * d + total * d];
            let mut sc = vec![0.0f32; n * total]; // (n, total)
            crate::math::matmul_bt(qh, kh, &mut sc, n, d, total, 0.0);
            let mut oh = vec![0.0f32; n * d];
            for (i, row) in sc.chunks_exact_mut(total).enumerate() {
                row.iter_mut().for_each(|v| *v *= scale);
                match mask {
                    None => crate::math::softmax_inplace(row),
                    Some(m) => {
                        let qb = m.query_block[i];
                        let visible: Vec<bool> =
                            m.key_block[..total].iter().map(|&kb| kb <= qb).collect();
                        if !visible.iter().any(|&v| v) {
                            row.fill(0.0);
                            continue;
                        }
                        let mx = row
                            .iter()
                            .zip(&visible)
                            .filter(|(_, v)| **v)
                            .map(|(x, _)| *x)
                            .fold(f32::NEG_INFINITY, f32::max);
                        let mut sum = 0.0f32;
                        for (x, &v) in row.iter_mut().zip(&visible) {
                            *x = if v { (*x - mx).exp() } else { 0.0 };
                            sum += *x;
                        }
                        row.iter_mut().for_each(|x| *x /= sum);
                    }
                }
            }
            crate::math::matmul(&sc, vh, &mut oh, n, total, d, 0.0);
            oh
        })
        .collect();
    let mut out = vec![0.0f32; s.tokens() * c];
    for (rh, oh) in heads.iter().enumerate() {
        let (r, hh) = (rh / h, rh % h);
        for t in 0..n {
            let dst = (r * n + t) * c + hh * d;
            out[dst..dst + d].copy_from_slice(&oh[t * d..(t + 1) * d]);
        }
    }
    out
}
