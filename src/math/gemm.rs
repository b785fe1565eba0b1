//! Hand-written f32 GEMM for `C = A B^T + beta C` where both A's rows and B's rows are
//! contiguous in k ("NT": B is a PyTorch Linear weight `[out, in]`, read in place, never
//! packed or copied).
//!
//! Why this shape: the CPU transformer's GEMMs at batch 1 have M = 1..128 rows (batch x
//! positions per step, times 2 with guidance) against weights of 1024 x 1024 .. 6144 x 1024;
//! small M is bound by streaming the weights once from DRAM, so a kernel that reads each
//! weight row exactly once per step in its stored layout (no per-call packing, no second copy
//! of the weights) is what the step needs (the next tile of weight rows is prefetched while
//! the current one is used); large M is FMA-bound, and a register tile of 3 A rows x 8
//! weight rows with accumulators along k keeps two 512-bit FMA pipes busy with A (L2) and B
//! (L1, one k-block of 8 rows) streaming. Each accumulator is reduced horizontally once per
//! k-block (four at a time by a transpose-add), a few per cent of the FMAs. Every output
//! element's sum runs in one fixed order whatever m, n and the threads: rows come out the
//! same at any batch size.
//!
//! Kernels: AVX-512F (16 lanes, 3 x 8 tile, 24 accumulators), AVX2+FMA (8 lanes, 3 x 4 tile,
//! 12 accumulators), chosen once at run time ([`kernel`]); `CHECKERGEN_GEMM=avx2|portable`
//! forces a lower one (tests and comparisons). Portable: no NT kernel; `math` then uses
//! gemm-f32 for every layout.
//!
//! Threads: the caller's rayon pool (no pool of its own, so nesting inside a rayon loop
//! cannot oversubscribe); the output is split into tasks over columns (disjoint weight rows:
//! each thread streams its own share of the weights) and, for large M, row blocks.

use super::SharedPtr;
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// The NT kernel family this process uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    Avx512,
    Avx2,
    /// No SIMD kernel: `math` uses gemm-f32.
    Portable,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512 => "avx512f",
            Kernel::Avx2 => "avx2+fma",
            Kernel::Portable => "portable (gemm-f32)",
        }
    }
}

/// The best kernel this CPU supports, detected once; `CHECKERGEN_GEMM=avx2` or `portable`
/// selects a lower one (never a higher one than the CPU has).
pub fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| {
        let best = detect();
        match std::env::var("CHECKERGEN_GEMM").ok().as_deref() {
            Some("portable") => Kernel::Portable,
            Some("avx2") if best != Kernel::Portable => Kernel::Avx2,
            _ => best,
        }
    })
}

fn detect() -> Kernel {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") {
            return Kernel::Avx512;
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Kernel::Avx2;
        }
    }
    Kernel::Portable
}

/// Whether `kern` can run on this CPU (tests run every supported kernel).
pub fn supported(kern: Kernel) -> bool {
    match kern {
        Kernel::Portable => true,
        Kernel::Avx2 => detect() != Kernel::Portable,
        Kernel::Avx512 => detect() == Kernel::Avx512,
    }
}

/// k-block: a tile of NR B rows x KC floats (32 KiB) stays in L1 while every row tile of A
/// passes over it.
const KC: usize = 1024;
/// Row block of one task: MC x KC floats of A (512 KiB) stay in L2 while B streams by.
const MC: usize = 128;
/// Below this many multiply-adds a GEMM runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 20;
/// Columns (weight rows) of one register tile: 8 rows of B stream at once.
const NR: usize = 8;
/// Rows of the largest AVX-512 register tile: 3 x 8 = 24 accumulators, 3 A vectors and one
/// B vector in the 32 zmm registers.
const MR_MAX: usize = 3;

/// C (m x n, row stride `ldc`) = A (m x k, row stride `lda`) · B^T + beta C, B (n x k, row
/// stride `ldb`); columns of A and B unit-stride. beta = 0 never reads C. Returns false
/// (nothing done) when `kern` is [`Kernel::Portable`].
///
/// # Safety
/// A, B and C must be valid for the elements this reads and writes; C's m x n elements must
/// not overlap A or B; `kern` must be [`supported`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm_nt(
    kern: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    c: *mut f32,
    ldc: usize,
    beta: f32,
) -> bool {
    if kern == Kernel::Portable {
        return false;
    }
    if m == 0 || n == 0 {
        return true;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let p = unsafe { c.add(i * ldc + j) };
                unsafe { *p = if beta == 0.0 { 0.0 } else { beta * *p } };
            }
        }
        return true;
    }
    let macs = m * n * k;
    let threads = rayon::current_num_threads();
    let (a, b, c) = (SharedPtr(a), SharedPtr(b), SharedPtr(c));
    // One task: rows m0..m1, columns n0..n1, all of k, on the calling thread. SAFETY: the
    // caller's contract; tasks write disjoint blocks of C.
    let block = move |m0: usize, m1: usize, n0: usize, n1: usize| {
        let (a, b, c) = (a.get(), b.get(), c.get());
        for mc in (m0..m1).step_by(MC) {
            let mc1 = (mc + MC).min(m1);
            for k0 in (0..k).step_by(KC) {
                let kc = KC.min(k - k0);
                let beta = if k0 == 0 { beta } else { 1.0 };
                for j in (n0..n1).step_by(NR) {
                    let nc = NR.min(n1 - j);
                    // Missing columns of a tail tile read row j again and are not stored.
                    let bt: [*const f32; NR] = std::array::from_fn(|q| unsafe {
                        b.add((j + if q < nc { q } else { 0 }) * ldb + k0)
                    });
                    // The next tile's rows, prefetched while the first row tile runs over this one
                    // (at small M the step is bound by the weight stream, and the k-loop alone
                    // leaves the DRAM idle while it computes from L1).
                    let jn = j + NR;
                    let pf: Option<[*const f32; NR]> = (jn < n1).then(|| {
                        std::array::from_fn(|q| unsafe { b.add((jn + q).min(n1 - 1) * ldb + k0) })
                    });
                    let mut i = mc;
                    while i < mc1 {
                        let pf = if i == mc { pf.as_ref() } else { None };
                        let ap = unsafe { a.add(i * lda + k0) };
                        let cp = unsafe { c.add(i * ldc + j) };
                        let left = mc1 - i;
                        unsafe {
                            i += match kern {
                                #[cfg(target_arch = "x86_64")]
                                Kernel::Avx512 => avx512::tile_dispatch(
                                    left, kc, ap, lda, &bt, pf, cp, ldc, nc, beta,
                                ),
                                #[cfg(target_arch = "x86_64")]
                                Kernel::Avx2 => avx2::tile_dispatch(
                                    left, kc, ap, lda, &bt, pf, cp, ldc, nc, beta,
                                ),
                                _ => unreachable!("portable has no NT kernel"),
                            };
                        }
                    }
                }
            }
        }
    };
    if threads <= 1 || macs < PAR_MIN_MACS {
        block(0, m, 0, n);
        return true;
    }
    // Tasks: row blocks of at most MC, and enough column chunks (multiples of NR) for about
    // four tasks per thread, so that a thread slowed by other work is balanced out.
    let mb = m.div_ceil(MC);
    let want_n = (4 * threads).div_ceil(mb).max(1);
    let nchunk = n.div_ceil(want_n).next_multiple_of(NR);
    let nb = n.div_ceil(nchunk);
    let mrows = m.div_ceil(mb);
    use rayon::prelude::*;
    (0..mb * nb).into_par_iter().for_each(|t| {
        let (bi, bj) = (t / nb, t % nb);
        let (m0, n0) = (bi * mrows, bj * nchunk);
        block(m0, (m0 + mrows).min(m), n0, (n0 + nchunk).min(n));
    });
    true
}

/// Store `s` (the sums for columns j..j+NR of one C row) into the first `nc` columns.
#[inline(always)]
unsafe fn store(s: &[f32], c: *mut f32, nc: usize, beta: f32) {
    for (q, &v) in s.iter().enumerate().take(nc) {
        let p = unsafe { c.add(q) };
        unsafe {
            *p = if beta == 0.0 {
                v
            } else if beta == 1.0 {
                *p + v
            } else {
                beta * *p + v
            }
        };
    }
}

/// One instruction set's NT kernel: `tile_dispatch` (the row tile for the rows left, over
/// groups of `cols` columns of the NR-column tile) and `tile` (MR rows x `cols` columns,
/// accumulators along k, one horizontal reduction per k-block). Both instruction sets run
/// this one body, so their sums come out in the same order per lane group.
///
/// * the target feature of `tile` and its vector type; `lanes`: floats per vector;
/// * `prefetch`: whether `tile` prefetches the next tile's weight rows;
/// * `ops`: the vector operations zero, load, mul and fmadd;
/// * `tail_load(r, p) { setup } => expr`: loads the first `r` (k % lanes) floats at `p`,
///   zero past them, reading nothing beyond (after `setup`, run once per tile);
/// * `lane_sums`: the add, unpacklo, unpackhi and shuffle of the vector width, with which
///   `reduce4` (four horizontal sums at once into an `__m128`) first sums v0..v3 within each
///   128-bit lane (a 4 x 4 transpose-add);
/// * `to_m128(e) => expr`: adds the lanes of that result `e` into one `__m128`.
#[cfg(target_arch = "x86_64")]
macro_rules! nt_kernel {
    (
        $feat:literal, $v:ty, lanes: $lanes:literal, cols: $cols:expr, prefetch: $prefetch:literal,
        ops: $zero:path, $load:path, $mul:path, $fmadd:path,
        tail_load($r:ident, $p:ident) { $($setup:tt)* } => $tail:expr,
        lane_sums: $add:ident, $lo:ident, $hi:ident, $shuffle:ident,
        to_m128($e:ident) => $to128:expr $(,)?
    ) => {
        /// Four horizontal sums at once: [sum v0, sum v1, sum v2, sum v3].
        #[inline(always)]
        unsafe fn reduce4(v0: $v, v1: $v, v2: $v, v3: $v) -> __m128 {
            unsafe {
                let s01 = $add($lo(v0, v1), $hi(v0, v1));
                let s23 = $add($lo(v2, v3), $hi(v2, v3));
                let $e = $add(
                    $shuffle::<0b01_00_01_00>(s01, s23),
                    $shuffle::<0b11_10_11_10>(s01, s23),
                );
                $to128
            }
        }

        /// Columns of one `tile` call.
        const COLS: usize = $cols;
        const _: () = assert!(NR % COLS == 0 && COLS % 4 == 0);

        /// Runs the largest row tile up to `left` rows and returns its rows.
        #[allow(clippy::too_many_arguments)]
        #[inline]
        pub(super) unsafe fn tile_dispatch(
            left: usize,
            k: usize,
            a: *const f32,
            lda: usize,
            b: &[*const f32; NR],
            pf: Option<&[*const f32; NR]>,
            c: *mut f32,
            ldc: usize,
            nc: usize,
            beta: f32,
        ) -> usize {
            const _: () = assert!(MR_MAX == 3, "tile_dispatch instantiates rows 1..=3");
            let r = left.min(MR_MAX);
            let pf = if $prefetch { pf } else { None };
            for g in 0..nc.div_ceil(COLS) {
                let bg: [*const f32; COLS] = std::array::from_fn(|q| b[COLS * g + q]);
                let (cg, ng) = (unsafe { c.add(COLS * g) }, (nc - COLS * g).min(COLS));
                macro_rules! rows {
                    ($mr:literal) => {
                        match pf {
                            Some(pf) => tile::<$mr, true>(k, a, lda, &bg, pf, cg, ldc, ng, beta),
                            None => tile::<$mr, false>(k, a, lda, &bg, b, cg, ldc, ng, beta),
                        }
                    };
                }
                unsafe {
                    match r {
                        1 => rows!(1),
                        2 => rows!(2),
                        _ => rows!(3),
                    }
                }
            }
            r
        }

        #[allow(clippy::too_many_arguments)]
        #[target_feature(enable = $feat)]
        unsafe fn tile<const MR: usize, const PF: bool>(
            k: usize,
            a: *const f32,
            lda: usize,
            b: &[*const f32; COLS],
            pf: &[*const f32; NR],
            c: *mut f32,
            ldc: usize,
            nc: usize,
            beta: f32,
        ) {
            let mut acc = [[$zero(); COLS]; MR];
            unsafe {
                // The k % lanes tail first (masked loads read nothing past the row), so the
                // loop below is all full vectors and the accumulators stay in registers.
                let $r = k % $lanes;
                if $r != 0 {
                    $($setup)*
                    let av: [$v; MR] = std::array::from_fn(|i| {
                        let $p = a.add(i * lda);
                        $tail
                    });
                    for q in 0..COLS {
                        let bv = {
                            let $p = b[q];
                            $tail
                        };
                        for i in 0..MR {
                            acc[i][q] = $mul(av[i], bv);
                        }
                    }
                }
                let mut p = $r;
                while p < k {
                    let av: [$v; MR] = std::array::from_fn(|i| $load(a.add(i * lda + p)));
                    if PF {
                        for f in pf {
                            _mm_prefetch::<_MM_HINT_T0>(f.add(p) as *const i8);
                        }
                    }
                    for q in 0..COLS {
                        let bv = $load(b[q].add(p));
                        for i in 0..MR {
                            acc[i][q] = $fmadd(av[i], bv, acc[i][q]);
                        }
                    }
                    p += $lanes;
                }
                let mut s = [[0.0f32; COLS]; MR];
                for i in 0..MR {
                    for g in 0..COLS / 4 {
                        let x = reduce4(
                            acc[i][4 * g],
                            acc[i][4 * g + 1],
                            acc[i][4 * g + 2],
                            acc[i][4 * g + 3],
                        );
                        _mm_storeu_ps(s[i].as_mut_ptr().add(4 * g), x);
                    }
                }
                for (i, row) in s.iter().enumerate() {
                    store(row, c.add(i * ldc), nc, beta);
                }
            }
        }
    };
}

/// 16 lanes, the whole 8-column tile at once (3 x 8 = 24 accumulators), weight rows of the
/// next tile prefetched.
#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;

    nt_kernel! {
        "avx512f", __m512, lanes: 16, cols: NR, prefetch: true,
        ops: _mm512_setzero_ps, _mm512_loadu_ps, _mm512_mul_ps, _mm512_fmadd_ps,
        tail_load(r, p) {
            let mask: __mmask16 = ((1u32 << r) - 1) as u16;
        } => _mm512_maskz_loadu_ps(mask, p),
        lane_sums: _mm512_add_ps, _mm512_unpacklo_ps, _mm512_unpackhi_ps, _mm512_shuffle_ps,
        to_m128(e) => {
            let lo = _mm512_castps512_ps256(e);
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e)));
            let h = _mm256_add_ps(lo, hi);
            _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
        },
    }
}

/// 8 lanes, groups of 4 columns (12 accumulators of the 16 registers at 3 rows), no
/// prefetch.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    nt_kernel! {
        "avx2,fma", __m256, lanes: 8, cols: 4, prefetch: false,
        ops: _mm256_setzero_ps, _mm256_loadu_ps, _mm256_mul_ps, _mm256_fmadd_ps,
        tail_load(r, p) {
            let lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
            let mask = _mm256_cmpgt_epi32(_mm256_set1_epi32(r as i32), lane);
        } => _mm256_maskload_ps(p, mask),
        lane_sums: _mm256_add_ps, _mm256_unpacklo_ps, _mm256_unpackhi_ps, _mm256_shuffle_ps,
        to_m128(e) => _mm_add_ps(_mm256_castps256_ps128(e), _mm256_extractf128_ps::<1>(e)),
    }
}
