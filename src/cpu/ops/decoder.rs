//! CPU reference of kernels/decoder.cu (the VQ decoder's kernels), on one image's (C, H, W)
//! activations; the GPU kernels run batched NHWC, and their tests transpose. 3x3 convs run
//! Winograd F(2x2, 3x3) with register-blocked SIMD micro-kernels (`super::winograd`); the
//! straightforward im2col + one GEMM per band of output rows ([`conv2d_banded`], the band sized
//! so the im2col buffer stays under [`COL_BUDGET`] floats) is kept as the reference that the
//! tests check it against. 1x1 convs are plain GEMMs (`math::matmul`). rayon parallelizes the
//! element-wise passes. The `*_into` forms write into the caller's buffer (the decoder reuses
//! its activations' buffers; fresh 32 MB allocations cost a page fault per 4 KB page).

use super::winograd;
use crate::math;
use crate::math::normalize_rows;
use crate::model::autoenc::{Conv, GN_EPS, GN_GROUPS, GroupNorm};
use rayon::prelude::*;

/// Largest im2col buffer, in floats (16 MB), for one band of a 3x3 conv.
pub const COL_BUDGET: usize = 1 << 22;

/// `conv(x (Cin, H, W)) + bias` -> (Cout, H, W): kernel 1 (padding 0) or 3 (padding 1),
/// stride 1.
pub fn conv2d(conv: &Conv, x: &[f32], h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; conv.cout * h * w]; // (Cout, H, W)
    conv2d_into(conv, x, h, w, &mut out);
    out
}

/// [`conv2d`] into `out` (Cout, H, W), which is overwritten.
pub fn conv2d_into(conv: &Conv, x: &[f32], h: usize, w: usize, out: &mut [f32]) {
    assert_eq!(x.len(), conv.cin * h * w, "conv: input must be (Cin, H, W)");
    assert_eq!(
        out.len(),
        conv.cout * h * w,
        "conv: output must be (Cout, H, W)"
    );
    if conv.k == 3 {
        winograd::conv3x3(
            winograd::Isa::detect(),
            &conv.weight,
            &conv.bias,
            conv.cin,
            conv.cout,
            x,
            h,
            w,
            out,
        );
    } else {
        assert_eq!(conv.k, 1, "conv: kernel 1 or 3");
        let n = h * w;
        // Start from the bias; the GEMM accumulates into it (beta = 1).
        for (plane, &b) in out.chunks_exact_mut(n).zip(&conv.bias) {
            plane.fill(b);
        }
        math::matmul(&conv.weight, x, out, conv.cout, conv.cin, n, 1.0);
    }
}

/// [`conv2d`] as im2col + GEMM with the im2col buffer capped at `col_budget` floats (tests
/// force many bands): the plain reference form of the Winograd fast path.
pub fn conv2d_banded(conv: &Conv, x: &[f32], h: usize, w: usize, col_budget: usize) -> Vec<f32> {
    assert_eq!(x.len(), conv.cin * h * w, "conv: input must be (Cin, H, W)");
    let n = h * w;
    // Start from the bias; the GEMMs accumulate into it (beta = 1).
    let mut out = vec![0.0f32; conv.cout * n]; // (Cout, H, W)
    for (plane, &b) in out.chunks_exact_mut(n).zip(&conv.bias) {
        plane.fill(b);
    }
    if conv.k == 1 {
        math::matmul(&conv.weight, x, &mut out, conv.cout, conv.cin, n, 1.0);
    } else {
        let kk = conv.cin * 9;
        let band_rows = (col_budget / (kk * w)).clamp(1, h);
        let mut col = vec![0.0f32; kk * band_rows * w]; // (Cin*9, band_rows*W)
        for y0 in (0..h).step_by(band_rows) {
            let y1 = (y0 + band_rows).min(h);
            let nb = (y1 - y0) * w;
            math::im2col_3x3(x, conv.cin, h, w, y0, y1, &mut col);
            // out[:, y0*W .. y1*W] (Cout, nb), row stride H*W, += weight @ col
            math::matmul_strided(
                &conv.weight,
                [kk, 1],
                &col,
                [nb, 1],
                &mut out[y0 * w..],
                n,
                conv.cout,
                kk,
                nb,
                1.0,
            );
        }
    }
    out
}

/// The encoder's Downsample: zero-pad `x (Cin, H, W)` right and bottom by 1, then a 3x3 conv at
/// stride 2 without padding, plus bias -> (Cout, H/2, W/2) (H, W even). im2col + one GEMM.
pub fn conv2d_down(conv: &Conv, x: &[f32], h: usize, w: usize) -> Vec<f32> {
    assert_eq!(conv.k, 3, "downsample conv: kernel 3");
    assert_eq!(
        x.len(),
        conv.cin * h * w,
        "downsample conv: input must be (Cin, H, W)"
    );
    assert!(
        h.is_multiple_of(2) && w.is_multiple_of(2),
        "downsample conv: H, W even"
    );
    let (ho, wo) = (h / 2, w / 2);
    let n = ho * wo;
    let kk = conv.cin * 9;
    let mut col = vec![0.0f32; kk * n]; // (Cin*9, Ho*Wo)
    col.par_chunks_mut(9 * n)
        .zip(x.par_chunks(h * w))
        .for_each(|(taps, plane)| {
            for (tap, dst) in taps.chunks_exact_mut(n).enumerate() {
                let (dy, dx) = (tap / 3, tap % 3);
                for (yo, row) in dst.chunks_exact_mut(wo).enumerate() {
                    let ys = 2 * yo + dy;
                    if ys >= h {
                        continue; // the zero padding row
                    }
                    for (xo, v) in row.iter_mut().enumerate() {
                        let xs = 2 * xo + dx;
                        if xs < w {
                            *v = plane[ys * w + xs];
                        }
                    }
                }
            }
        });
    let mut out = vec![0.0f32; conv.cout * n];
    for (plane, &b) in out.chunks_exact_mut(n).zip(&conv.bias) {
        plane.fill(b);
    }
    math::matmul(&conv.weight, &col, &mut out, conv.cout, kk, n, 1.0);
    out
}

/// GroupNorm (32 groups, eps 1e-6, affine) of x (C, H*W), then SiLU when `silu`. Statistics in
/// f64, biased variance as in PyTorch.
pub fn group_norm(gn: &GroupNorm, x: &[f32], hw: usize, silu: bool) -> Vec<f32> {
    let mut out = vec![0.0f32; x.len()]; // (C, H, W)
    group_norm_into(gn, x, hw, silu, &mut out);
    out
}

/// [`group_norm`] into `out` (C, H, W), which is overwritten.
pub fn group_norm_into(gn: &GroupNorm, x: &[f32], hw: usize, silu: bool, out: &mut [f32]) {
    let c = gn.gamma.len();
    assert_eq!(x.len(), c * hw, "group norm: input must be (C, H, W)");
    assert_eq!(out.len(), x.len(), "group norm: output must be (C, H, W)");
    let group_len = (c / GN_GROUPS) * hw; // channels of a group are contiguous in (C, H, W)
    out.par_chunks_mut(group_len)
        .zip(x.par_chunks(group_len))
        .enumerate()
        .for_each(|(g, (dst, src))| {
            let (mean, var) = mean_var(src);
            let rstd = 1.0 / (var + GN_EPS as f64).sqrt();
            let ch0 = g * (c / GN_GROUPS);
            for (i, (d, s)) in dst
                .chunks_exact_mut(hw)
                .zip(src.chunks_exact(hw))
                .enumerate()
            {
                // Fold normalization and affine into one scale/shift per channel.
                let scale = (rstd * gn.gamma[ch0 + i] as f64) as f32;
                let shift = gn.beta[ch0 + i] - (mean * scale as f64) as f32;
                for (d, &s) in d.iter_mut().zip(s) {
                    *d = s * scale + shift;
                }
                if silu {
                    math::silu_inplace(d);
                }
            }
        });
}

/// Mean and biased variance, two passes, accumulated in f64 over 8 independent lanes (a single
/// serial f64 sum is latency-bound and was a visible share of GroupNorm time).
fn mean_var(xs: &[f32]) -> (f64, f64) {
    fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
        let mut acc = [0.0f64; 8];
        let chunks = xs.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v);
            }
        }
        acc.iter().sum::<f64>() + tail
    }
    let n = xs.len() as f64;
    let mean = lane_sum(xs, |v| v as f64) / n;
    let var = lane_sum(xs, |v| (v as f64 - mean).powi(2)) / n;
    (mean, var)
}

/// Nearest-neighbour x2 upsample: (C, H, W) -> (C, 2H, 2W).
pub fn upsample_nearest2(x: &[f32], c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; c * 4 * h * w]; // (C, 2H, 2W)
    upsample_nearest2_into(x, c, h, w, &mut out);
    out
}

/// [`upsample_nearest2`] into `out` (C, 2H, 2W), which is overwritten.
pub fn upsample_nearest2_into(x: &[f32], c: usize, h: usize, w: usize, out: &mut [f32]) {
    assert_eq!(x.len(), c * h * w);
    assert_eq!(out.len(), c * 4 * h * w);
    out.par_chunks_mut(4 * h * w)
        .zip(x.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for (y, src_row) in src.chunks_exact(w).enumerate() {
                let row = &mut dst[2 * y * 2 * w..][..2 * w];
                for (pair, &v) in row.chunks_exact_mut(2).zip(src_row) {
                    pair.fill(v);
                }
                dst.copy_within(2 * y * 2 * w..(2 * y + 1) * 2 * w, (2 * y + 1) * 2 * w);
            }
        });
}

/// Row softmax of `x (rows, n)` scaled first: `softmax(scale * x)` per row, in place.
pub fn softmax_rows(x: &mut [f32], n: usize, scale: f32) {
    x.par_chunks_mut(n).for_each(|row| {
        row.iter_mut().for_each(|s| *s *= scale);
        math::softmax_inplace(row);
    });
}

/// Single-head spatial attention of the decoder's AttnBlock on `q, k, v (C, N)`:
/// `att[c, i] = sum_j v[c, j] softmax_j(q[:, i] . k[:, j] / sqrt(C))`; returns (C, N).
pub fn spatial_attention(q: &[f32], k: &[f32], v: &[f32], c: usize, n: usize) -> Vec<f32> {
    // scores[i, j] = sum_c q[c, i] k[c, j]: q read transposed (strides [1, N]).
    let mut p = vec![0.0f32; n * n]; // (N query, N key)
    math::matmul_strided(q, [1, n], k, [n, 1], &mut p, n, n, c, n, 0.0);
    softmax_rows(&mut p, n, 1.0 / (c as f32).sqrt());
    let mut att = vec![0.0f32; c * n]; // (C, N)
    math::matmul_bt(v, &p, &mut att, c, n, n, 0.0);
    att
}

/// Code vectors of `tokens (B, n)` (raster order per image, n = s*s) as `z (B, e, s, s)`, each
/// position L2-normalized over e when `normalize` (F.normalize before decoding; the codebook
/// rows already are normalized, so this only re-rounds).
pub fn gather_codes(
    codebook: &[f32],
    e: usize,
    tokens: &[u32],
    n: usize,
    normalize: bool,
) -> Vec<f32> {
    assert!(tokens.len().is_multiple_of(n));
    let v = codebook.len() / e;
    let mut z = vec![0.0f32; tokens.len() * e]; // (B, e, s, s)
    let mut t = vec![0.0f32; n * e]; // one image (s*s, e)
    for (zb, tb) in z.chunks_exact_mut(e * n).zip(tokens.chunks_exact(n)) {
        for (p, &tok) in tb.iter().enumerate() {
            let tok = tok as usize;
            assert!(tok < v, "gather_codes: token {tok} out of range");
            t[p * e..(p + 1) * e].copy_from_slice(&codebook[tok * e..(tok + 1) * e]);
        }
        if normalize {
            normalize_rows(&mut t, e);
        }
        for p in 0..n {
            for d in 0..e {
                zb[d * n + p] = t[p * e + d];
            }
        }
    }
    z
}

/// Raw decoder output to 8-bit: clamp((x + 1) / 2, 0, 1) * 255, truncated toward zero.
/// Same layout as the input.
pub fn pixels(img: &[f32]) -> Vec<u8> {
    img.iter()
        .map(|&x| (((x + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0) as u8)
        .collect()
}
