//! Dense f32 maths at the bottom of the crate: GEMMs (through `matrixmultiply`: packed, SIMD,
//! multi-threaded, never naive loops), the activation functions and row normalization. Used by
//! load-time folding (model/) and by the CPU backend's ops (cpu/ops/); depends on nothing.

/// C (m x n) = A (m x k) @ B^T where B is stored (n x k) row-major, i.e. a PyTorch Linear
/// weight `[out, in]`. `beta` = 0 overwrites C, 1 accumulates into it.
pub fn matmul_bt(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, beta: f32) {
    matmul_strided(a, [k, 1], b, [1, k], c, n, m, k, n, beta);
}

/// C (m x n) = A (m x k) @ B (k x n), all row-major.
pub fn matmul(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, beta: f32) {
    matmul_strided(a, [k, 1], b, [n, 1], c, n, m, k, n, beta);
}

/// y (rows x out) = x (rows x in) @ w^T + bias, with `w` a Linear weight `[out, in]`.
pub fn linear(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    rows: usize,
    din: usize,
    dout: usize,
) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * dout];
    if let Some(b) = bias {
        assert_eq!(b.len(), dout);
        for r in y.chunks_exact_mut(dout) {
            r.copy_from_slice(b);
        }
        matmul_bt(x, w, &mut y, rows, din, dout, 1.0);
    } else {
        matmul_bt(x, w, &mut y, rows, din, dout, 0.0);
    }
    y
}

/// C (m x n, row-major with leading dimension `ldc`) = A (m x k) @ B (k x n) + beta * C, where A
/// and B are read through arbitrary element strides `[row_stride, col_stride]`. This lets a
/// caller multiply transposed views (e.g. a channel-major (C, N) activation read as (N, C)) and
/// write into a column band of a wider output without copying.
#[allow(clippy::too_many_arguments)]
pub fn matmul_strided(
    a: &[f32],
    a_strides: [usize; 2],
    b: &[f32],
    b_strides: [usize; 2],
    c: &mut [f32],
    ldc: usize,
    m: usize,
    k: usize,
    n: usize,
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    // Index of the last element each operand touches must be in bounds.
    let last = |rows: usize, cols: usize, [rs, cs]: [usize; 2]| (rows - 1) * rs + (cols - 1) * cs;
    assert!(ldc >= n, "matmul_strided: ldc {ldc} < n {n}");
    assert!(
        c.len() > last(m, n, [ldc, 1]),
        "matmul_strided: C too short"
    );
    if k > 0 {
        assert!(
            a.len() > last(m, k, a_strides),
            "matmul_strided: A too short"
        );
        assert!(
            b.len() > last(k, n, b_strides),
            "matmul_strided: B too short"
        );
    }
    // SAFETY: every element read or written lies within the slices (checked above); C's rows
    // (stride ldc >= n, unit column stride) do not overlap.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            a_strides[0] as isize,
            a_strides[1] as isize,
            b.as_ptr(),
            b_strides[0] as isize,
            b_strides[1] as isize,
            beta,
            c.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// im2col for a 3x3 convolution with padding 1 and stride 1, for output rows `y0..y1`.
///
/// `x` is one image (C, H, W). `col` receives (C*9, (y1-y0)*W) row-major, row index
/// `c*9 + ky*3 + kx` (the flattening order of a PyTorch weight (Cout, C, 3, 3)), column index
/// `(y-y0)*W + x`; out-of-image taps are 0. Then `out = weight (Cout, C*9) @ col`.
/// Parallel over input channels.
pub fn im2col_3x3(x: &[f32], c: usize, h: usize, w: usize, y0: usize, y1: usize, col: &mut [f32]) {
    use rayon::prelude::*;
    assert!(y0 <= y1 && y1 <= h && x.len() == c * h * w);
    let n = (y1 - y0) * w;
    assert!(col.len() >= c * 9 * n);
    if n == 0 {
        return;
    }
    col[..c * 9 * n]
        .par_chunks_mut(9 * n) // (9, n): the 9 taps of one input channel
        .zip(x.par_chunks(h * w)) // (H, W): that channel
        .for_each(|(taps, plane)| {
            for (tap, dst) in taps.chunks_exact_mut(n).enumerate() {
                let (dy, dx) = (tap / 3, tap % 3);
                for (yo, row) in dst.chunks_exact_mut(w).enumerate() {
                    // Source row = output row + dy - 1; zero if outside the image.
                    let ys = (y0 + yo + dy) as isize - 1;
                    if ys < 0 || ys >= h as isize {
                        row.fill(0.0);
                        continue;
                    }
                    let src = &plane[ys as usize * w..][..w];
                    // Source column = output column + dx - 1.
                    match dx {
                        0 => {
                            row[0] = 0.0;
                            row[1..].copy_from_slice(&src[..w - 1]);
                        }
                        1 => row.copy_from_slice(src),
                        _ => {
                            row[..w - 1].copy_from_slice(&src[1..]);
                            row[w - 1] = 0.0;
                        }
                    }
                }
            }
        });
}

#[inline]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// exp(x) for f32 without a libm call, so that loops over slices auto-vectorize (a libm `expf`
/// per element made SiLU the slowest part of the decoder's GroupNorm).
///
/// Cephes-style: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, and 2^n built
/// in the exponent bits. Relative error about 2e-7 over [-87.3, 88.3]; x is clamped to that
/// range.
#[inline]
pub fn exp_fast(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding 1.5 * 2^23 rounds to an integer and leaves it in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    let x = x.clamp(-87.3, 88.3);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t.to_bits() as i32 - ROUND.to_bits() as i32; // round(x / ln2), in [-126, 127]
    let nf = t - ROUND;
    let r = x - nf * LN2_HI - nf * LN2_LO;
    let p = 1.987_569_1e-4;
    let p = p * r + 1.398_2e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    er * f32::from_bits(((n + 127) as u32) << 23)
}

/// SiLU over a slice in place, using [`exp_fast`] (vectorizes).
pub fn silu_inplace(xs: &mut [f32]) {
    for v in xs.iter_mut() {
        *v /= 1.0 + exp_fast(-*v);
    }
}

/// L2-normalize each row of a (rows, dim) matrix like `F.normalize(eps=1e-12)`.
pub fn normalize_rows(x: &mut [f32], dim: usize) {
    for row in x.chunks_exact_mut(dim) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= n);
    }
}

#[inline]
pub fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

/// Softmax in place over one row, max-subtracted, f32.
pub fn softmax_inplace(row: &mut [f32]) {
    let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let mut s = 0.0f32;
    for v in row.iter_mut() {
        *v = (*v - m).exp();
        s += *v;
    }
    let inv = 1.0 / s;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_fast_and_silu_match_std() {
        let mut worst = 0.0f64;
        for i in -87_000..=88_000 {
            let x = i as f32 * 1e-3 + 1.234e-4;
            let (got, want) = (exp_fast(x) as f64, (x as f64).exp());
            worst = worst.max((got - want).abs() / want);
        }
        assert!(worst < 5e-7, "exp_fast rel err {worst}");
        let xs: Vec<f32> = (-2000..2000).map(|i| i as f32 * 0.01).collect();
        let mut ys = xs.clone();
        silu_inplace(&mut ys);
        for (x, y) in xs.iter().zip(&ys) {
            assert!((y - silu(*x)).abs() <= 1e-6 * (1.0 + x.abs()), "silu({x})");
        }
        // Far outside the clamp range: ~0 for large negative x, x for large positive x.
        let mut ends = [-1e30, -100.0, 100.0, 1e30];
        silu_inplace(&mut ends);
        assert!(ends[0].abs() < 1e-8 && ends[1].abs() < 1e-30);
        assert_eq!(&ends[2..], &[100.0, 1e30]);
    }

    #[test]
    fn matmul_bt_matches_naive() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
        let b: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect();
        let mut c = vec![0.0; m * n];
        matmul_bt(&a, &b, &mut c, m, k, n, 0.0);
        for i in 0..m {
            for j in 0..n {
                let r: f32 = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
                assert!((c[i * n + j] - r).abs() < 1e-5);
            }
        }
        let mut c2 = vec![0.0; m * n];
        // B^T stored (k x n)
        let bt: Vec<f32> = (0..k * n).map(|idx| b[(idx % n) * k + idx / n]).collect();
        matmul(&a, &bt, &mut c2, m, k, n, 0.0);
        for (x, y) in c.iter().zip(&c2) {
            assert!((x - y).abs() < 1e-5);
        }
    }
}
