//! `C = A B^T + beta C` with B stored in bf16 (a Linear weight `[out, in]`, read in place)
//! and A in f32, converted to bf16 once per call; products of two bf16 values are exact in
//! f32 and every sum is accumulated in f32. The CPU path's opt-in `--precision bf16`
//! (`model::weights::Linear::to_bf16`): at the transformer's small M the step streams its
//! weights from DRAM, and bf16 halves those bytes; at large M `vdpbf16ps` does 32
//! multiply-adds per instruction where an f32 FMA does 16.
//!
//! Kernels, chosen once at run time ([`kernel`]; `CHECKERGEN_GEMM_BF16=avx2|scalar` forces a
//! lower one, for tests and comparisons):
//! - AVX512-BF16 (`_mm512_dpbf16_ps`): the blocking of the f32 NT kernel (`math::gemm`: k
//!   blocks, tiles of 8 weight rows, the next tile prefetched), with a register tile of 4 A
//!   rows x 4 weight rows: 16 zmm accumulators of 16 lanes, each lane summing bf16 pairs
//!   along k, 32 k per instruction (a 3 x 8 tile of 24 accumulators spilled to the stack:
//!   PERF.md); k % 32 tails read with masked 16-bit loads (zero-filled, so odd k needs no
//!   padding). AMX (tile matrix multiply) is not used: the CPU this was written on (AMD Zen 5)
//!   has AVX512-BF16 but no AMX.
//! - AVX2+FMA fallback for CPUs without AVX512-BF16 (AVX-512F-only Intel parts, AVX2 parts):
//!   each bf16 widened to f32 by a 16-bit shift, then FMA; 3 x 4 tile, 8 lanes.
//! - Scalar: the same products in plain loops (any CPU; also the tests' second opinion).
//!
//! Every kernel computes the same products (A rounded to bf16 by [`to_bf16_bits`], B as
//! stored); they differ only in the order of the f32 additions. Within one kernel each output
//! element's sum runs in one fixed order whatever m, n and the thread count, so rows come out
//! the same at any batch size (tests/batching.rs holds for bf16 too).

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;
use std::sync::OnceLock;

/// The bf16 kernel family this process uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// `vdpbf16ps` (AVX512-BF16, with AVX512-BW masked loads).
    Avx512Bf16,
    /// bf16 widened to f32 and FMA (AVX2 + FMA).
    Avx2,
    /// Plain loops.
    Scalar,
}

impl Kernel {
    pub fn name(self) -> &'static str {
        match self {
            Kernel::Avx512Bf16 => "avx512bf16",
            Kernel::Avx2 => "avx2+fma (bf16 widened)",
            Kernel::Scalar => "scalar",
        }
    }
}

/// Every kernel, best first. (Not an associated `pub const`: cbindgen, which reads the whole
/// crate for include/checkergen.h, would export it and an opaque `Kernel` with it.)
const ALL_KERNELS: [Kernel; 3] = [Kernel::Avx512Bf16, Kernel::Avx2, Kernel::Scalar];

/// Whether `kern` can run on this CPU.
pub fn supported(kern: Kernel) -> bool {
    match kern {
        Kernel::Scalar => true,
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx2 => is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512Bf16 => {
            is_x86_feature_detected!("avx512bf16")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512f")
        }
        #[cfg(not(target_arch = "x86_64"))]
        _ => false,
    }
}

/// The best kernel this CPU supports, detected once; `CHECKERGEN_GEMM_BF16=avx2` or `scalar`
/// selects a lower one (never one the CPU lacks).
pub fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| {
        let forced = match std::env::var("CHECKERGEN_GEMM_BF16").ok().as_deref() {
            Some("scalar") => Some(Kernel::Scalar),
            Some("avx2") => Some(Kernel::Avx2),
            _ => None,
        };
        let best = ALL_KERNELS.into_iter().find(|&k| supported(k));
        match (forced, best) {
            (Some(f), _) if supported(f) => f,
            (_, Some(b)) => b,
            _ => Kernel::Scalar,
        }
    })
}

/// bf16 bits of `x`: round to nearest even, as `vcvtneps2bf16` does, including its
/// treatment of subnormal inputs as signed zero; NaN stays a (quiet) NaN, values beyond the
/// bf16 range become infinity. The one f32 -> bf16 rounding of the CPU's bf16 path (weights
/// at load, activations per call), so every kernel sees the same operands.
#[inline]
pub fn to_bf16_bits(x: f32) -> u16 {
    let b = x.to_bits();
    if b & 0x7f80_0000 == 0 {
        return ((b >> 16) & 0x8000) as u16;
    }
    if x.is_nan() {
        return ((b >> 16) | 0x0040) as u16;
    }
    ((b + 0x7fff + ((b >> 16) & 1)) >> 16) as u16
}

/// The f32 value of bf16 bits (exact).
#[inline]
pub fn bf16_to_f32(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `xs` rounded to bf16 ([`to_bf16_bits`]).
pub fn to_bf16(xs: &[f32]) -> Vec<u16> {
    let mut out = vec![0u16; xs.len()];
    convert_rows(xs, xs.len(), 1, xs.len(), &mut out);
    out
}

/// Rows `m` x `k` of `a` (row stride `lda`) into `out` (m x k, packed), as bf16 bits.
fn convert_rows(a: &[f32], k: usize, m: usize, lda: usize, out: &mut [u16]) {
    for (i, dst) in out.chunks_exact_mut(k.max(1)).take(m).enumerate() {
        let src = &a[i * lda..i * lda + k];
        #[cfg(target_arch = "x86_64")]
        if supported(Kernel::Avx512Bf16) {
            // SAFETY: the features were just detected; src and dst both hold k elements.
            unsafe { avx512::convert(src, dst) };
            continue;
        }
        for (d, &s) in dst.iter_mut().zip(src) {
            *d = to_bf16_bits(s);
        }
    }
}

/// k-block: a tile of NR weight rows x KC bf16 (32 KiB) stays in L1 while every row tile of
/// A passes over it.
const KC: usize = 2048;
/// Row block of one task.
const MC: usize = 128;
/// Below this many multiply-adds a GEMM runs on the calling thread.
const PAR_MIN_MACS: usize = 1 << 20;
/// Weight rows per register tile.
const NR: usize = 8;

/// Raw pointers of one call, shared by its tasks (each writes a disjoint block of C).
#[derive(Clone, Copy)]
struct Operands {
    a: *const u16,
    b: *const u16,
    c: *mut f32,
    k: usize,
    ldb: usize,
    ldc: usize,
}
// SAFETY: the pointers are only dereferenced inside `gemm_nt_bf16`'s call, while the slices
// they come from are borrowed; tasks write disjoint blocks of C.
unsafe impl Send for Operands {}
unsafe impl Sync for Operands {}

/// C (m x n, row stride `ldc`) = A (m x k, row stride `lda`, f32) · B^T + beta C, with B
/// (n x k, row stride `ldb`) bf16 bits. beta = 0 never reads C (NaN there is overwritten).
/// Threads on the caller's rayon pool; panics if a slice is too short for its shape or
/// `kern` is not [`supported`].
#[allow(clippy::too_many_arguments)]
pub fn gemm_nt_bf16(
    kern: Kernel,
    m: usize,
    n: usize,
    k: usize,
    a: &[f32],
    lda: usize,
    b: &[u16],
    ldb: usize,
    c: &mut [f32],
    ldc: usize,
    beta: f32,
) {
    assert!(supported(kern), "bf16 kernel {} not supported", kern.name());
    if m == 0 || n == 0 {
        return;
    }
    assert!(lda >= k && ldb >= k && ldc >= n, "gemm_nt_bf16: strides");
    assert!(c.len() >= (m - 1) * ldc + n, "gemm_nt_bf16: C too short");
    if k == 0 {
        for row in c.chunks_mut(ldc).take(m) {
            row[..n].iter_mut().for_each(|v| *v *= beta);
            if beta == 0.0 {
                row[..n].fill(0.0);
            }
        }
        return;
    }
    assert!(a.len() >= (m - 1) * lda + k, "gemm_nt_bf16: A too short");
    assert!(b.len() >= (n - 1) * ldb + k, "gemm_nt_bf16: B too short");
    // A as bf16, packed (m x k). The buffer is taken from this thread's slot and put back,
    // so a nested call (a rayon task run while this thread waits) gets a fresh one.
    thread_local! {
        static A16: std::cell::Cell<Vec<u16>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut a16 = A16.with(|s| s.take());
    a16.clear();
    a16.resize(m * k, 0);
    convert_rows(a, k, m, lda, &mut a16);
    let ops = Operands {
        a: a16.as_ptr(),
        b: b.as_ptr(),
        c: c.as_mut_ptr(),
        k,
        ldb,
        ldc,
    };
    // SAFETY (both calls): blocks lie within the checked shapes; tasks' blocks are disjoint.
    if rayon::current_num_threads() <= 1 || m * n * k < PAR_MIN_MACS {
        unsafe { block(kern, ops, 0..m, 0..n, beta) };
    } else {
        // Tasks: row blocks of at most MC rows times column chunks (multiples of NR), about
        // four per thread, each streaming its own share of the weight rows.
        use rayon::prelude::*;
        let row_blocks = m.div_ceil(MC);
        let rows = m.div_ceil(row_blocks);
        let per_block = (4 * rayon::current_num_threads()).div_ceil(row_blocks);
        let cols = n.div_ceil(per_block.max(1)).next_multiple_of(NR);
        let col_blocks = n.div_ceil(cols);
        // A reference to the whole struct (Sync), not its raw-pointer fields, is captured.
        let shared = &ops;
        (0..row_blocks * col_blocks).into_par_iter().for_each(|t| {
            let (r0, c0) = ((t / col_blocks) * rows, (t % col_blocks) * cols);
            unsafe {
                block(
                    kern,
                    *shared,
                    r0..(r0 + rows).min(m),
                    c0..(c0 + cols).min(n),
                    beta,
                )
            };
        });
    }
    A16.with(|s| s.set(a16));
}

/// Rows `rs` x columns `cs` of C, all of k, on the calling thread.
///
/// # Safety
/// `o`'s pointers valid for these rows and columns (A packed with row stride k).
unsafe fn block(
    kern: Kernel,
    o: Operands,
    rs: std::ops::Range<usize>,
    cs: std::ops::Range<usize>,
    beta: f32,
) {
    let k = o.k;
    for mc in rs.clone().step_by(MC) {
        let mc1 = (mc + MC).min(rs.end);
        for k0 in (0..k).step_by(KC) {
            let kc = KC.min(k - k0);
            // The first k-block applies beta; later ones add to what it stored.
            let beta = if k0 == 0 { beta } else { 1.0 };
            for j in cs.clone().step_by(NR) {
                let nc = NR.min(cs.end - j);
                // Missing columns of a tail tile read row j again and are not stored.
                let bt: [*const u16; NR] = std::array::from_fn(|q| unsafe {
                    o.b.add((j + if q < nc { q } else { 0 }) * o.ldb + k0)
                });
                let next = j + NR;
                let pf: Option<[*const u16; NR]> = (next < cs.end).then(|| {
                    std::array::from_fn(|q| unsafe {
                        o.b.add((next + q).min(cs.end - 1) * o.ldb + k0)
                    })
                });
                let mut i = mc;
                while i < mc1 {
                    let tile = Tile {
                        a: unsafe { o.a.add(i * k + k0) },
                        lda: k,
                        b: &bt,
                        pf: if i == mc { pf.as_ref() } else { None },
                        k: kc,
                        c: unsafe { o.c.add(i * o.ldc + j) },
                        ldc: o.ldc,
                        nc,
                        beta,
                    };
                    let left = mc1 - i;
                    i += unsafe {
                        match kern {
                            #[cfg(target_arch = "x86_64")]
                            Kernel::Avx512Bf16 => avx512::tile(left, &tile),
                            #[cfg(target_arch = "x86_64")]
                            Kernel::Avx2 => avx2::tile(left, &tile),
                            _ => scalar_tile(left, &tile),
                        }
                    };
                }
            }
        }
    }
}

/// One register tile's operands: up to 4 rows of A (bf16, stride `lda`) from `a`, the NR
/// weight rows `b` (at the same k offset), `k` elements; C from `c`, first `nc` columns.
struct Tile<'p> {
    a: *const u16,
    lda: usize,
    b: &'p [*const u16; NR],
    pf: Option<&'p [*const u16; NR]>,
    k: usize,
    c: *mut f32,
    ldc: usize,
    nc: usize,
    beta: f32,
}

impl Tile<'_> {
    /// Store row `i`'s sums `s` (columns j..j+NR) into its first `nc` columns of C.
    #[inline(always)]
    unsafe fn store(&self, i: usize, s: &[f32]) {
        for (q, &v) in s.iter().enumerate().take(self.nc) {
            let p = unsafe { self.c.add(i * self.ldc + q) };
            unsafe {
                *p = match self.beta {
                    0.0 => v,
                    1.0 => *p + v,
                    beta => beta * *p + v,
                }
            };
        }
    }
}

/// Runs `f` on each group of 4 weight rows of `t` (the last may be partial): the group's
/// sub-tile (its C columns; the next tile's prefetch with the first group only) and its 4
/// row pointers. Both SIMD kernels hold 4 columns x up to 4 rows of accumulators.
#[inline(always)]
fn column_groups(t: &Tile, mut f: impl FnMut(&Tile, [*const u16; 4])) {
    for g in 0..t.nc.div_ceil(4) {
        let sub = Tile {
            c: t.c.wrapping_add(4 * g),
            nc: (t.nc - 4 * g).min(4),
            pf: if g == 0 { t.pf } else { None },
            ..*t
        };
        f(&sub, std::array::from_fn(|q| t.b[4 * g + q]));
    }
}

/// One k-step of a SIMD tile at k offset `$p` (`$n`: how many k the loads take): `R` A
/// vectors, then each of the 4 weight rows' vectors against all of them, `$mac` into the
/// accumulators. A macro, not a closure, so the accumulators stay in registers.
#[cfg(target_arch = "x86_64")]
macro_rules! simd_step {
    ($acc:ident, $t:ident, $b:ident, $p:expr, $n:expr, $load:ident, $mac:ident) => {{
        let av: [_; R] = std::array::from_fn(|i| $load($t.a.add(i * $t.lda + $p), $n));
        for q in 0..4 {
            let bv = $load($b[q].add($p), $n);
            for i in 0..R {
                $acc[i][q] = $mac($acc[i][q], av[i], bv);
            }
        }
    }};
}

/// Rows of the scalar and AVX2 tiles (the AVX-512 one has 4).
const MR: usize = 3;

/// The portable tile: up to MR rows, sequential f32 sums along k.
unsafe fn scalar_tile(left: usize, t: &Tile) -> usize {
    let r = left.min(MR);
    for i in 0..r {
        let mut s = [0.0f32; NR];
        for (q, sq) in s.iter_mut().enumerate().take(t.nc) {
            for p in 0..t.k {
                let (av, bv) = unsafe { (*t.a.add(i * t.lda + p), *t.b[q].add(p)) };
                *sq += bf16_to_f32(av) * bf16_to_f32(bv);
            }
        }
        unsafe { t.store(i, &s) };
    }
    r
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;

    /// Convert `src` to bf16 bits in `dst` (same length), 16 at a time.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    pub(super) unsafe fn convert(src: &[f32], dst: &mut [u16]) {
        let n = src.len().min(dst.len());
        let mut i = 0;
        unsafe {
            while i < n {
                let left = (n - i).min(16);
                let mask = ((1u32 << left) - 1) as u16;
                let v = _mm512_maskz_loadu_ps(mask, src.as_ptr().add(i));
                let h: __m256i = std::mem::transmute(_mm512_cvtneps_pbh(v));
                _mm256_mask_storeu_epi16(dst.as_mut_ptr().add(i) as *mut i16, mask, h);
                i += 16;
            }
        }
    }

    /// Rows of this kernel's register tile: 4 rows x 4 weight rows (16 accumulators, 4 A
    /// vectors and one weight vector: no spills), twice per 8-row weight tile.
    const MR4: usize = 4;

    /// Runs up to 4 rows over the tile's weight rows, 4 at a time, and returns its rows.
    #[inline]
    pub(super) unsafe fn tile(left: usize, t: &Tile) -> usize {
        let r = left.min(MR4);
        column_groups(t, |sub, b| unsafe {
            match (r, sub.pf.is_some()) {
                (1, false) => rows::<1, false>(sub, b),
                (1, true) => rows::<1, true>(sub, b),
                (2, false) => rows::<2, false>(sub, b),
                (2, true) => rows::<2, true>(sub, b),
                (3, false) => rows::<3, false>(sub, b),
                (3, true) => rows::<3, true>(sub, b),
                (_, false) => rows::<4, false>(sub, b),
                (_, true) => rows::<4, true>(sub, b),
            }
        });
        r
    }

    /// 16 lanes of 32-bit words (bf16 pairs) from `p`, the first `n` 16-bit halves only.
    /// (Every helper carries the kernel's target features, so that it inlines and the
    /// accumulators stay in registers.)
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    #[inline]
    unsafe fn load_pairs(p: *const u16, n: Option<u32>) -> __m512bh {
        unsafe {
            std::mem::transmute(match n {
                None => _mm512_loadu_si512(p as *const __m512i),
                Some(n) => _mm512_maskz_loadu_epi16(((1u64 << n) - 1) as u32, p as *const i16),
            })
        }
    }

    /// [sum v0, sum v1, sum v2, sum v3]: each folded to 8 lanes, then two rounds of
    /// horizontal adds and the two 128-bit halves added.
    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    #[inline]
    unsafe fn sum4(v0: __m512, v1: __m512, v2: __m512, v3: __m512) -> __m128 {
        let fold = |v: __m512| {
            let hi = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)));
            _mm256_add_ps(_mm512_castps512_ps256(v), hi)
        };
        let h = _mm256_hadd_ps(
            _mm256_hadd_ps(fold(v0), fold(v1)),
            _mm256_hadd_ps(fold(v2), fold(v3)),
        );
        _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps::<1>(h))
    }

    #[target_feature(enable = "avx512f,avx512bf16,avx512bw")]
    unsafe fn rows<const R: usize, const PF: bool>(t: &Tile, b: [*const u16; 4]) {
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        unsafe {
            // The k % 32 tail first (zero-filled masked loads), then whole vectors.
            let tail = t.k % 32;
            if tail != 0 {
                simd_step!(
                    acc,
                    t,
                    b,
                    0,
                    Some(tail as u32),
                    load_pairs,
                    _mm512_dpbf16_ps
                );
            }
            let mut p = tail;
            while p < t.k {
                if PF && let Some(pf) = t.pf {
                    for f in pf {
                        _mm_prefetch::<_MM_HINT_T0>(f.add(p) as *const i8);
                    }
                }
                simd_step!(acc, t, b, p, None, load_pairs, _mm512_dpbf16_ps);
                p += 32;
            }
            for (i, a) in acc.into_iter().enumerate() {
                let mut sums = [0.0f32; 4];
                _mm_storeu_ps(sums.as_mut_ptr(), sum4(a[0], a[1], a[2], a[3]));
                t.store(i, &sums);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;

    /// Runs up to 3 rows in groups of 4 columns (12 accumulators) and returns its rows.
    #[inline]
    pub(super) unsafe fn tile(left: usize, t: &Tile) -> usize {
        let r = left.min(MR);
        column_groups(t, |sub, b| unsafe {
            match r {
                1 => rows::<1>(sub, b),
                2 => rows::<2>(sub, b),
                _ => rows::<3>(sub, b),
            }
        });
        r
    }

    /// a * b + acc (the argument order of the step macro).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn fma(acc: __m256, a: __m256, b: __m256) -> __m256 {
        _mm256_fmadd_ps(a, b, acc)
    }

    /// 8 bf16 from `p` widened to f32 (the first `n` only, the rest 0).
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn widen(p: *const u16, n: usize) -> __m256 {
        unsafe {
            let h = if n >= 8 {
                _mm_loadu_si128(p as *const __m128i)
            } else {
                let mut buf = [0u16; 8];
                std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
                _mm_loadu_si128(buf.as_ptr() as *const __m128i)
            };
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
        }
    }

    #[target_feature(enable = "avx2,fma")]
    unsafe fn rows<const R: usize>(t: &Tile, b: [*const u16; 4]) {
        let mut acc = [[_mm256_setzero_ps(); 4]; R];
        unsafe {
            let tail = t.k % 8;
            if tail != 0 {
                simd_step!(acc, t, b, 0, tail, widen, fma);
            }
            let mut p = tail;
            while p < t.k {
                simd_step!(acc, t, b, p, 8, widen, fma);
                p += 8;
            }
            for (i, row) in acc.iter().enumerate() {
                let s: [f32; 4] = std::array::from_fn(|q| {
                    let v = row[q];
                    let h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
                    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
                    _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps::<1>(h, h)))
                });
                t.store(i, &s);
            }
        }
    }
}
