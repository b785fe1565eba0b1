//! Dense f32 maths at the bottom of the crate: GEMMs (SIMD, multi-threaded on rayon, never
//! naive loops), the activation functions and row normalization. Used by load-time folding
//! (model/) and by the CPU backend's ops (cpu/ops/); depends on nothing.
//!
//! GEMM dispatch ([`matmul_strided`], which the other GEMMs call): when A's rows and B's
//! columns are both contiguous in k (`A B^T` with B a Linear weight `[out, in]`: every
//! transformer projection, the head, attention scores, load-time folding), the hand-written
//! kernels of [`gemm`] (AVX-512F, else AVX2+FMA), which read the weight once in place; any
//! other layout (the decoder's convolutions, `P V`) goes to `gemm-f32` (the f32 kernels of
//! the `gemm` crate that candle uses: packed, AVX-512F or FMA chosen at run time). Both
//! thread on the caller's rayon pool, so a GEMM inside a rayon loop never oversubscribes the
//! cores. [`kernel_names`] says which kernels this CPU gets.

pub mod gemm;
pub mod gemm_bf16;

/// A raw pointer that the tasks of one parallel call share (`Send` + `Sync`): each task reads
/// or writes only elements no other task writes, while the call holds the borrow the pointer
/// comes from (every user says why at its call site).
#[derive(Clone, Copy)]
pub struct SharedPtr<P>(pub P);
// SAFETY: see the type's docs; users uphold it at each dereference.
unsafe impl<P> Send for SharedPtr<P> {}
unsafe impl<P> Sync for SharedPtr<P> {}

impl<P: Copy> SharedPtr<P> {
    /// The pointer (a method, so that closures capture the `Send` + `Sync` wrapper, not its
    /// field).
    pub fn get(self) -> P {
        self.0
    }
}

/// The kernels this process's GEMMs use, e.g. `"NT avx512f, general gemm-f32 (avx512f), bf16
/// weights avx512bf16"` (the last: `--precision bf16`'s linears).
pub fn kernel_names() -> String {
    let general = if gemm::supported(gemm::Kernel::Avx512) {
        "avx512f"
    } else if gemm::supported(gemm::Kernel::Avx2) {
        "fma"
    } else {
        "scalar"
    };
    format!(
        "NT {}, general gemm-f32 ({general}), bf16 weights {}",
        gemm::kernel().name(),
        gemm_bf16::kernel().name()
    )
}

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
    linear_with(bias, rows, dout, |y, beta| {
        matmul_bt(x, w, y, rows, din, dout, beta)
    })
}

/// A (rows, dout) output started from the bias (then `gemm(y, 1.0)` accumulates) or
/// written whole (`gemm(y, 0.0)`): [`linear`], and the bf16 linears of
/// `model::weights::Linear`.
pub fn linear_with(
    bias: Option<&[f32]>,
    rows: usize,
    dout: usize,
    gemm: impl FnOnce(&mut [f32], f32),
) -> Vec<f32> {
    let mut y = vec![0.0f32; rows * dout];
    if let Some(b) = bias {
        assert_eq!(b.len(), dout);
        for r in y.chunks_exact_mut(dout) {
            r.copy_from_slice(b);
        }
        gemm(&mut y, 1.0);
    } else {
        gemm(&mut y, 0.0);
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
    // (stride ldc >= n, unit column stride) do not overlap, and C (a `&mut`) overlaps neither
    // A nor B.
    unsafe {
        if a_strides[1] == 1
            && b_strides[0] == 1
            && gemm::gemm_nt(
                gemm::kernel(),
                m,
                n,
                k,
                a.as_ptr(),
                a_strides[0],
                b.as_ptr(),
                b_strides[1],
                c.as_mut_ptr(),
                ldc,
                beta,
            )
        {
            return;
        }
        general_gemm(
            m,
            k,
            n,
            a.as_ptr(),
            a_strides,
            b.as_ptr(),
            b_strides,
            c.as_mut_ptr(),
            ldc,
            beta,
        );
    }
}

/// Every other layout: `gemm-f32`. Its `dst = alpha dst + beta (lhs rhs)` with `read_dst`
/// false does not read C, like our beta = 0.
///
/// # Safety
/// As [`matmul_strided`] checks: every index in bounds, C disjoint from A and B.
#[allow(clippy::too_many_arguments)]
unsafe fn general_gemm(
    m: usize,
    k: usize,
    n: usize,
    a: *const f32,
    [ars, acs]: [usize; 2],
    b: *const f32,
    [brs, bcs]: [usize; 2],
    c: *mut f32,
    ldc: usize,
    beta: f32,
) {
    let par = if m * n * k >= 1 << 20 {
        gemm_common::Parallelism::Rayon(0) // 0: rayon::current_num_threads()
    } else {
        gemm_common::Parallelism::None
    };
    unsafe {
        gemm_f32::gemm::f32::get_gemm_fn()(
            m,
            n,
            k,
            c,
            1,
            ldc as isize,
            beta != 0.0,
            a,
            acs as isize,
            ars as isize,
            b,
            bcs as isize,
            brs as isize,
            beta,
            1.0,
            false,
            false,
            false,
            par,
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

    /// Every NT kernel this CPU has, and the general path, against an f64 reference: shapes
    /// around the register tiles' edges (rows 1..=7, columns not a multiple of 8, k not a
    /// multiple of 16, k past one k-block), padded strides, beta 0 (C holds NaN: never read),
    /// 1 and 0.5, serial and threaded sizes.
    #[test]
    fn gemm_kernels_match_f64_reference() {
        use gemm::{Kernel, gemm_nt, supported};
        let mut g = crate::rng::XorShift32(0x9E37_79B9);
        let mut rnd = |n: usize| g.vec(n);
        let shapes = [
            (1, 1, 1),
            (1, 9, 17),
            (2, 8, 16),
            (3, 23, 15),
            (4, 5, 33),
            (5, 64, 1),
            (7, 13, 1030),
            (13, 31, 2100),
            (130, 70, 300),
            (40, 260, 300),
        ];
        let mut checked = 0;
        for &(m, n, k) in &shapes {
            let (lda, ldb, ldc) = (k + 3, k + 5, n + 2);
            let a = rnd(m * lda);
            let b = rnd(n * ldb);
            let c0 = rnd(m * ldc);
            for beta in [0.0f32, 1.0, 0.5] {
                let want: Vec<f64> = (0..m * n)
                    .map(|idx| {
                        let (i, j) = (idx / n, idx % n);
                        let dot: f64 = (0..k)
                            .map(|p| a[i * lda + p] as f64 * b[j * ldb + p] as f64)
                            .sum();
                        dot + if beta == 0.0 {
                            0.0
                        } else {
                            beta as f64 * c0[i * ldc + j] as f64
                        }
                    })
                    .collect();
                let check = |c: &[f32], what: &str| {
                    for i in 0..m {
                        for j in 0..n {
                            let (got, w) = (c[i * ldc + j] as f64, want[i * n + j]);
                            assert!(
                                (got - w).abs() <= 1e-5 * (1.0 + (k as f64).sqrt()),
                                "{what} m {m} n {n} k {k} beta {beta}: C[{i},{j}] {got} vs {w}"
                            );
                        }
                        // The padding columns are never written.
                        for j in n..ldc {
                            assert_eq!(c[i * ldc + j].to_bits(), c0[i * ldc + j].to_bits());
                        }
                    }
                };
                let start = |c: &mut Vec<f32>| {
                    c.copy_from_slice(&c0);
                    if beta == 0.0 {
                        for i in 0..m {
                            c[i * ldc..i * ldc + n].fill(f32::NAN);
                        }
                    }
                };
                let mut c = c0.clone();
                for kern in [Kernel::Avx512, Kernel::Avx2] {
                    if !supported(kern) {
                        continue;
                    }
                    start(&mut c);
                    // SAFETY: sizes and strides as allocated above.
                    let done = unsafe {
                        gemm_nt(
                            kern,
                            m,
                            n,
                            k,
                            a.as_ptr(),
                            lda,
                            b.as_ptr(),
                            ldb,
                            c.as_mut_ptr(),
                            ldc,
                            beta,
                        )
                    };
                    assert!(done);
                    check(&c, kern.name());
                    checked += 1;
                }
                // The general path: B^T read through strides [1, ldb] is NT again, so pass B
                // as an explicit (k x n) copy.
                let bt: Vec<f32> = (0..k * n).map(|idx| b[(idx % n) * ldb + idx / n]).collect();
                start(&mut c);
                matmul_strided(&a, [lda, 1], &bt, [n, 1], &mut c, ldc, m, k, n, beta);
                check(&c, "gemm-f32");
            }
        }
        assert!(
            checked > 0 || !supported(Kernel::Avx2),
            "no SIMD kernel ran"
        );
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
