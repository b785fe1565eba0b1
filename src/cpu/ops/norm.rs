//! CPU reference of kernels/norm.cu.

use crate::math;
use rayon::prelude::*;

/// `out (T, C) = RMSNorm(x) * w`, then, with `modulation = Some((m, offset))`,
/// `* scale + shift` where `(shift, scale)` are the 2C values at `offset` of row `t / n` of
/// `m (rows, 4C)` (AdaLN). `n` = tokens per sequence row.
pub fn rmsnorm_adaln(
    x: &[f32],
    w: &[f32],
    modulation: Option<(&[f32], usize)>,
    n: usize,
    c: usize,
    eps: f32,
) -> Vec<f32> {
    assert_eq!(w.len(), c);
    assert!(x.len().is_multiple_of(c) && n > 0);
    let mut out = vec![0.0; x.len()];
    out.par_chunks_mut(c)
        .zip(x.par_chunks(c))
        .enumerate()
        .for_each(|(t, (o, xr))| {
            let ms = xr.iter().map(|v| v * v).sum::<f32>() / c as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for i in 0..c {
                o[i] = xr[i] * inv * w[i];
            }
            if let Some((m, offset)) = modulation {
                let base = (t / n) * 4 * c + offset;
                let (shift, scale) = m[base..base + 2 * c].split_at(c);
                for i in 0..c {
                    o[i] = o[i] * scale[i] + shift[i];
                }
            }
        });
    out
}

/// `h (T, F) = silu(g[:, :F]) * g[:, F:]` for `g (T, 2F)` (SwiGLU after the stacked w1|w3 GEMM).
pub fn silu_mul(g: &[f32], f: usize) -> Vec<f32> {
    assert!(g.len().is_multiple_of(2 * f));
    let mut h = vec![0.0; g.len() / 2];
    h.par_chunks_mut(f)
        .zip(g.par_chunks(2 * f))
        .for_each(|(o, gr)| {
            let (a, b) = gr.split_at(f);
            for i in 0..f {
                o[i] = math::silu(a[i]) * b[i];
            }
        });
    h
}

/// `y (rows, n) += b (n)`.
pub fn add_bias(y: &mut [f32], b: &[f32]) {
    for row in y.chunks_exact_mut(b.len()) {
        row.iter_mut().zip(b).for_each(|(v, bv)| *v += bv);
    }
}
