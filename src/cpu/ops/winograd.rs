//! The fast path under [`super::conv2d`] for 3x3 convolutions (padding 1, stride 1):
//! Winograd F(2x2, 3x3) in f32 (Lavin and Gray 2016). Each 2x2 output tile is computed from a
//! 4x4 input tile with 16 multiplies per (input, output) channel pair instead of 36, so the
//! convolution becomes 16 independent GEMMs `M[xi] (Cout, tiles) = U[xi] (Cout, Cin) @
//! V[xi] (Cin, tiles)` between transforms that cost O(C * H * W):
//!
//! ```text
//! U[xi] = G g G^T     (weights, per call; G is 4x3)        weights (Cout, Cin, 3, 3)
//! V[xi] = B^T d B     (each 4x4 input tile d, zero-padded)  input   (Cin, H, W)
//! Y     = A^T M A + bias  (2x2 outputs per tile)           output  (Cout, H, W)
//! ```
//!
//! The output image is processed in bands of tile rows so that V and M (16 * (Cin + Cout)
//! floats per tile) stay in cache; within a band each stage is parallel (input transform over
//! channels, GEMM over (xi, tile block), output transform over output channels). U and V are
//! written directly in the panel layout of a register-blocked micro-kernel (MR output channels
//! x NR tiles of accumulators: AVX-512 8 x 32, AVX2+FMA 6 x 16, portable 4 x 16, chosen at run
//! time), so nothing is packed twice. The scratch buffers are kept per thread and reused. The
//! stages are `#[inline(never)]` so that profiles name them.
//!
//! Numerics: the transforms only add and halve (exact up to rounding of sums of a few terms);
//! the sum over Cin is one f32 accumulator per output as in im2col + GEMM, in a different
//! order. Against an f64 direct convolution the error is of the order of f32 rounding of the
//! partial sums (the unit tests bound it, and the golden decode tests bound the whole decoder).

use crate::math::SharedPtr;
use rayon::prelude::*;
use std::cell::RefCell;

/// Which micro-kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Isa {
    Avx512,
    Avx2,
    Portable,
}

impl Isa {
    /// The best kernel this CPU supports.
    pub(crate) fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every kernel this CPU can run (tests cover them all).
    #[cfg(test)]
    pub(crate) fn available() -> Vec<Isa> {
        let mut v = vec![Isa::Portable];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                v.push(Isa::Avx2);
            }
            if std::arch::is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
        }
        v
    }

    /// Register block: (output channels, tiles).
    fn block(self) -> (usize, usize) {
        match self {
            Isa::Avx512 => (8, 32),
            Isa::Avx2 => (6, 16),
            Isa::Portable => (4, 16),
        }
    }
}

/// Target size of one band's V + M, in floats (4 MB: within the two cores' L2 and far inside
/// L3).
const BAND_FLOATS: usize = 1 << 20;

#[derive(Default)]
struct Scratch {
    u: Vec<f32>,
    v: Vec<f32>,
    m: Vec<f32>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// Grows `v` to at least `n` floats; the contents are not meaningful (every use overwrites).
fn ensure(v: &mut Vec<f32>, n: usize) {
    if v.len() < n {
        v.resize(n, 0.0);
    }
}

/// `out (Cout, H, W) = conv3x3(x (Cin, H, W), weight (Cout, Cin, 3, 3), padding 1) + bias`
/// with the micro-kernel of `isa` (callers pass [`Isa::detect`]; the tests every kernel).
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv3x3(
    isa: Isa,
    weight: &[f32],
    bias: &[f32],
    cin: usize,
    cout: usize,
    x: &[f32],
    h: usize,
    w: usize,
    out: &mut [f32],
) {
    assert_eq!(
        weight.len(),
        cout * cin * 9,
        "conv3x3: weight (Cout, Cin, 3, 3)"
    );
    assert_eq!(bias.len(), cout, "conv3x3: bias (Cout,)");
    assert_eq!(x.len(), cin * h * w, "conv3x3: input (Cin, H, W)");
    assert_eq!(out.len(), cout * h * w, "conv3x3: output (Cout, H, W)");
    if h == 0 || w == 0 || cout == 0 {
        return;
    }
    if cin == 0 {
        for (plane, &b) in out.chunks_exact_mut(h * w).zip(bias) {
            plane.fill(b);
        }
        return;
    }
    // Take this thread's scratch (a nested call on the same thread, e.g. from a rayon job
    // stolen while this one waits, finds it empty and allocates its own).
    let mut s = SCRATCH.with(|c| std::mem::take(&mut *c.borrow_mut()));
    let (mr, nr) = isa.block();
    let coutp = cout.div_ceil(mr) * mr;
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let band = (BAND_FLOATS / (16 * (cin + coutp) * tw)).clamp(1, th); // tile rows per band
    let njp_max = (band * tw).div_ceil(nr) * nr;
    ensure(&mut s.u, 16 * coutp * cin);
    ensure(&mut s.v, 16 * cin * njp_max);
    ensure(&mut s.m, 16 * coutp * njp_max);
    let u = &mut s.u[..16 * coutp * cin];
    transform_weights(weight, cin, cout, mr, u);
    for ty0 in (0..th).step_by(band) {
        let ty1 = (ty0 + band).min(th);
        let nj = (ty1 - ty0) * tw;
        let njp = nj.div_ceil(nr) * nr;
        let band = Band {
            h,
            w,
            ty0,
            ty1,
            njp,
        };
        let v = &mut s.v[..16 * cin * njp];
        transform_input(isa, x, cin, band, nr, v);
        let m = &mut s.m[..16 * coutp * njp];
        batched_gemm(isa, u, v, m, cin, coutp, njp);
        transform_output(isa, m, bias, cout, band, out);
    }
    SCRATCH.with(|c| *c.borrow_mut() = s);
}

/// One band of an H x W image: tile rows `ty0..ty1`, their tiles padded to `njp` (a multiple
/// of the register block's NR).
#[derive(Clone, Copy)]
struct Band {
    h: usize,
    w: usize,
    ty0: usize,
    ty1: usize,
    njp: usize,
}

/// U = G g G^T for every (o, c), written as panels `u[ob][xi][c][mr]` (o = ob * mr + r; rows
/// past Cout are zero).
#[inline(never)]
fn transform_weights(weight: &[f32], cin: usize, cout: usize, mr: usize, u: &mut [f32]) {
    const MR_MAX: usize = 8;
    assert!(mr <= MR_MAX);
    u.par_chunks_mut(16 * cin * mr)
        .enumerate()
        .for_each(|(ob, panel)| {
            let rows = cout.saturating_sub(ob * mr).min(mr); // real output channels here
            for c in 0..cin {
                // g[k][r]: tap k of output channel ob * mr + r (zero past Cout), so that every
                // step below is a loop over r and each store a run of mr floats.
                let mut g = [[0.0f32; MR_MAX]; 9];
                for r in 0..rows {
                    let src = &weight[((ob * mr + r) * cin + c) * 9..][..9];
                    for k in 0..9 {
                        g[k][r] = src[k];
                    }
                }
                // Gg (4x3): rows g0, (g0+g1+g2)/2, (g0-g1+g2)/2, g2 of the 3x3 kernel.
                let mut gg = [[[0.0f32; MR_MAX]; 3]; 4];
                for k in 0..3 {
                    for r in 0..MR_MAX {
                        let (g0, g1, g2) = (g[k][r], g[3 + k][r], g[6 + k][r]);
                        gg[0][k][r] = g0;
                        gg[1][k][r] = 0.5 * (g0 + g1 + g2);
                        gg[2][k][r] = 0.5 * (g0 - g1 + g2);
                        gg[3][k][r] = g2;
                    }
                }
                // (Gg) G^T (4x4): the same combination along each row; xi = 4 * i + j.
                for (i, row) in gg.iter().enumerate() {
                    let mut t = [[0.0f32; MR_MAX]; 4];
                    for r in 0..MR_MAX {
                        let (a, b, cc) = (row[0][r], row[1][r], row[2][r]);
                        t[0][r] = a;
                        t[1][r] = 0.5 * (a + b + cc);
                        t[2][r] = 0.5 * (a - b + cc);
                        t[3][r] = cc;
                    }
                    for (j, tj) in t.iter().enumerate() {
                        let xi = 4 * i + j;
                        panel[(xi * cin + c) * mr..][..mr].copy_from_slice(&tj[..mr]);
                    }
                }
            }
        });
}

/// V = B^T d B for every input channel and every tile of tile rows `ty0..ty1`, written as
/// panels `v[xi][jb][c][nr]` with tile j = (ty - ty0) * TW + tx = jb * nr + lane (lanes past
/// the band's tiles are zero).
#[inline(never)]
fn transform_input(isa: Isa, x: &[f32], cin: usize, band: Band, nr: usize, v: &mut [f32]) {
    let tw = band.w.div_ceil(2);
    let nty = band.ty1 - band.ty0;
    let nrows = 2 * nty + 2; // input rows 2ty0-1 .. 2ty1, zero outside the image
    let dst = SharedPtr(v.as_mut_ptr());
    let vlen = v.len();
    (0..cin).into_par_iter().for_each_init(
        || InScratch {
            eo: vec![0.0f32; 2 * (tw + 1)],
            hr: vec![0.0f32; nrows * 4 * tw],
            tv: vec![0.0f32; 16 * tw],
        },
        |t, c| {
            let a = InArgs {
                x,
                cin,
                band,
                nr,
                dst,
                vlen,
            };
            match isa {
                // SAFETY: the ISA was detected (Isa::detect / available).
                #[cfg(target_arch = "x86_64")]
                Isa::Avx512 => unsafe { input_channel_avx512(&a, c, t) },
                #[cfg(target_arch = "x86_64")]
                Isa::Avx2 => unsafe { input_channel_avx2(&a, c, t) },
                _ => input_channel(&a, c, t),
            }
        },
    );
}
/// The arguments of one channel's input transform.
#[derive(Clone, Copy)]
struct InArgs<'a> {
    x: &'a [f32],
    cin: usize,
    band: Band,
    nr: usize,
    dst: SharedPtr<*mut f32>,
    vlen: usize,
}

/// One thread's rows for [`input_channel`]: a padded input row split into even and odd
/// columns, the band's rows times B, and one tile row's 16 x TW transformed values.
struct InScratch {
    eo: Vec<f32>,
    hr: Vec<f32>,
    tv: Vec<f32>,
}

/// Input channel c's tiles of the band into the V panels (see [`transform_input`]); inlined
/// into per-ISA copies so the compiler vectorizes it for the detected vector width.
#[inline(always)]
fn input_channel(a: &InArgs, c: usize, t: &mut InScratch) {
    let InScratch { eo, hr, tv } = t;
    let (tw, nj) = (
        a.band.w.div_ceil(2),
        (a.band.ty1 - a.band.ty0) * a.band.w.div_ceil(2),
    );
    let plane = &a.x[c * a.band.h * a.band.w..][..a.band.h * a.band.w];
    // d B along every input row once: with the padded row p (p[i] = x[i - 1]) split
    // into even E[q] = p[2q] and odd O[q] = p[2q+1] columns, tile tx's four values are
    // E[tx] - E[tx+1], O[tx] + E[tx+1], E[tx+1] - O[tx], O[tx] - O[tx+1].
    for (lr, hrow) in hr.chunks_exact_mut(4 * tw).enumerate() {
        let y = (2 * a.band.ty0 + lr) as isize - 1;
        let (e, o) = eo.split_at_mut(tw + 1);
        e.fill(0.0);
        o.fill(0.0);
        if y >= 0 && (y as usize) < a.band.h {
            let row = &plane[y as usize * a.band.w..][..a.band.w];
            let pairs = row.chunks_exact(2);
            if let [last] = pairs.remainder() {
                o[tw - 1] = *last;
            }
            for ((pair, oq), eq) in pairs.zip(o.iter_mut()).zip(e[1..].iter_mut()) {
                *oq = pair[0];
                *eq = pair[1];
            }
        }
        let (h0, rest) = hrow.split_at_mut(tw);
        let (h1, rest) = rest.split_at_mut(tw);
        let (h2, h3) = rest.split_at_mut(tw);
        for tx in 0..tw {
            h0[tx] = e[tx] - e[tx + 1];
            h1[tx] = o[tx] + e[tx + 1];
            h2[tx] = e[tx + 1] - o[tx];
            h3[tx] = o[tx] - o[tx + 1];
        }
    }
    for ty in a.band.ty0..a.band.ty1 {
        // B^T (d B): down the tile's four rows, for all tiles of the row at once.
        let rows = &hr[2 * (ty - a.band.ty0) * 4 * tw..][..16 * tw];
        let (r0, r1, r2, r3) = (
            &rows[..4 * tw],
            &rows[4 * tw..8 * tw],
            &rows[8 * tw..12 * tw],
            &rows[12 * tw..],
        );
        let (v0, rest) = tv.split_at_mut(4 * tw);
        let (v1, rest) = rest.split_at_mut(4 * tw);
        let (v2, v3) = rest.split_at_mut(4 * tw);
        for i in 0..4 * tw {
            v0[i] = r0[i] - r2[i];
            v1[i] = r1[i] + r2[i];
            v2[i] = r2[i] - r1[i];
            v3[i] = r1[i] - r3[i];
        }
        // Scatter this tile row's 16 x TW values (xi = 4 * row + column) into the
        // panels.
        let j0 = (ty - a.band.ty0) * tw;
        for xi in 0..16 {
            let src = &tv[xi * tw..][..tw];
            let mut tx = 0;
            while tx < tw {
                let j = j0 + tx;
                let (jb, lane) = (j / a.nr, j % a.nr);
                let run = (a.nr - lane).min(tw - tx);
                let off = ((xi * (a.band.njp / a.nr) + jb) * a.cin + c) * a.nr + lane;
                debug_assert!(off + run <= a.vlen);
                // SAFETY: (xi, jb, c, lane..lane+run) is in bounds and only channel
                // c's task writes channel c's elements.
                unsafe {
                    std::ptr::copy_nonoverlapping(src[tx..].as_ptr(), a.dst.0.add(off), run);
                }
                tx += run;
            }
        }
    }
    // Zero the padding lanes of the last tile block.
    if a.band.njp > nj {
        let (jb, lane) = (nj / a.nr, nj % a.nr);
        for xi in 0..16 {
            let off = ((xi * (a.band.njp / a.nr) + jb) * a.cin + c) * a.nr + lane;
            // SAFETY: as above, channel c's own elements.
            unsafe { std::ptr::write_bytes(a.dst.0.add(off), 0, a.nr - lane) };
        }
    }
}

/// M[o][xi][j] = sum_c U[xi][o][c] V[xi][c][j] for every xi, as register-blocked panels.
#[inline(never)]
fn batched_gemm(
    isa: Isa,
    u: &[f32],
    v: &[f32],
    m: &mut [f32],
    cin: usize,
    coutp: usize,
    njp: usize,
) {
    let (mr, nr) = isa.block();
    let nb = njp / nr;
    let ldc = 16 * njp;
    assert!(u.len() >= 16 * coutp * cin && v.len() >= 16 * cin * njp && m.len() >= coutp * ldc);
    let dst = SharedPtr(m.as_mut_ptr());
    (0..16 * nb).into_par_iter().for_each(|task| {
        let (xi, jb) = (task / nb, task % nb);
        let b = &v[(xi * nb + jb) * cin * nr..][..cin * nr];
        for ob in 0..coutp / mr {
            let a = &u[(ob * 16 + xi) * cin * mr..][..cin * mr];
            let off = ob * mr * ldc + xi * njp + jb * nr;
            // SAFETY: the tile (rows ob*mr .. +mr at stride ldc, columns xi*njp + jb*nr .. +nr)
            // lies inside m (checked above) and belongs to this (xi, jb) task alone; a and b
            // hold cin * mr and cin * nr floats.
            unsafe { kernel(isa, cin, a.as_ptr(), b.as_ptr(), dst.get().add(off), ldc) };
        }
    });
}

/// One MR x NR block: `c[r * ldc + l] = sum_p a[p * mr + r] * b[p * nr + l]` (overwrites).
///
/// # Safety
/// `a` holds k * mr floats, `b` k * nr, and c's mr rows of nr floats at stride ldc are valid.
unsafe fn kernel(isa: Isa, k: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: Isa::Avx512 / Avx2 are only chosen when the CPU has the features.
        Isa::Avx512 => unsafe { x86::kernel_avx512(k, a, b, c, ldc) },
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { x86::kernel_avx2(k, a, b, c, ldc) },
        _ => unsafe { kernel_portable(k, a, b, c, ldc) },
    }
}

/// 4 x 16, plain Rust (the compiler vectorizes the lane loop).
unsafe fn kernel_portable(k: usize, a: *const f32, b: *const f32, c: *mut f32, ldc: usize) {
    const MR: usize = 4;
    const NR: usize = 16;
    // SAFETY: the caller's contract.
    let (a, b) = unsafe {
        (
            std::slice::from_raw_parts(a, k * MR),
            std::slice::from_raw_parts(b, k * NR),
        )
    };
    let mut acc = [[0.0f32; NR]; MR];
    for (ap, bp) in a.chunks_exact(MR).zip(b.chunks_exact(NR)) {
        for (row, &av) in acc.iter_mut().zip(ap) {
            for (s, &bv) in row.iter_mut().zip(bp) {
                *s += av * bv;
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        // SAFETY: the caller's contract.
        unsafe { std::ptr::copy_nonoverlapping(row.as_ptr(), c.add(r * ldc), NR) };
    }
}

/// The per-ISA copies of the transforms' channel loops: the portable bodies, inlined under
/// `$feat` so that the compiler vectorizes them for that vector width.
macro_rules! transforms_for {
    ($feat:literal, $input:ident, $output:ident) => {
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        unsafe fn $input(a: &InArgs, c: usize, t: &mut InScratch) {
            input_channel(a, c, t)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = $feat)]
        unsafe fn $output(a: &OutArgs, o: usize, t: &mut OutScratch, plane: &mut [f32]) {
            output_channel(a, o, t, plane)
        }
    };
}

transforms_for!("avx512f", input_channel_avx512, output_channel_avx512);
transforms_for!("avx2,fma", input_channel_avx2, output_channel_avx2);

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// One MR x (2 vectors) block kernel for a target feature: MR broadcasts of A and two
    /// vector loads of B per k, 2 * MR accumulators (see [`super::kernel`] for the contract).
    macro_rules! block_kernel {
        (
            $(#[$doc:meta])*
            $name:ident, $feat:literal, mr: $mr:literal, lanes: $lanes:literal,
            $zero:ident, $load:ident, $set1:ident, $fmadd:ident, $store:ident
        ) => {
            $(#[$doc])*
            #[target_feature(enable = $feat)]
            pub(super) unsafe fn $name(
                k: usize,
                a: *const f32,
                b: *const f32,
                c: *mut f32,
                ldc: usize,
            ) {
                const MR: usize = $mr;
                const L: usize = $lanes;
                // SAFETY (whole body): the caller's contract on a, b, c.
                unsafe {
                    let mut acc = [[$zero(); 2]; MR];
                    for p in 0..k {
                        let b0 = $load(b.add(p * 2 * L));
                        let b1 = $load(b.add(p * 2 * L + L));
                        for (r, row) in acc.iter_mut().enumerate() {
                            let av = $set1(*a.add(p * MR + r));
                            row[0] = $fmadd(av, b0, row[0]);
                            row[1] = $fmadd(av, b1, row[1]);
                        }
                    }
                    for (r, row) in acc.iter().enumerate() {
                        $store(c.add(r * ldc), row[0]);
                        $store(c.add(r * ldc + L), row[1]);
                    }
                }
            }
        };
    }

    block_kernel!(
        /// 8 x 32: 16 zmm accumulators, two vector loads and eight broadcasts per k.
        kernel_avx512, "avx512f", mr: 8, lanes: 16,
        _mm512_setzero_ps, _mm512_loadu_ps, _mm512_set1_ps, _mm512_fmadd_ps, _mm512_storeu_ps
    );
    block_kernel!(
        /// 6 x 16: 12 ymm accumulators, two vector loads and six broadcasts per k.
        kernel_avx2, "avx2,fma", mr: 6, lanes: 8,
        _mm256_setzero_ps, _mm256_loadu_ps, _mm256_set1_ps, _mm256_fmadd_ps, _mm256_storeu_ps
    );
}

/// Y = A^T M A + bias for every output channel and tile of tile rows `ty0..ty1`, into the
/// band's output rows (the last tile row / column is cut when H / W is odd).
#[inline(never)]
fn transform_output(isa: Isa, m: &[f32], bias: &[f32], cout: usize, band: Band, out: &mut [f32]) {
    let tw = band.w.div_ceil(2);
    let a = OutArgs { m, bias, band };
    out.par_chunks_mut(band.h * band.w)
        .enumerate()
        .for_each_init(
            || OutScratch {
                s: vec![0.0f32; 8 * tw],
                out_row: vec![0.0f32; 2 * tw],
            },
            |t, (o, plane)| {
                debug_assert!(o < cout);
                match isa {
                    // SAFETY: the ISA was detected (Isa::detect / available).
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx512 => unsafe { output_channel_avx512(&a, o, t, plane) },
                    #[cfg(target_arch = "x86_64")]
                    Isa::Avx2 => unsafe { output_channel_avx2(&a, o, t, plane) },
                    _ => output_channel(&a, o, t, plane),
                }
            },
        );
}

/// The arguments of one output channel's transform.
#[derive(Clone, Copy)]
struct OutArgs<'a> {
    m: &'a [f32],
    bias: &'a [f32],
    band: Band,
}

/// One thread's rows for [`output_channel`]: A^T m for a tile row, and one output row's even
/// and odd columns.
struct OutScratch {
    s: Vec<f32>,
    out_row: Vec<f32>,
}

/// Output channel o's rows of the band (`plane`) from its M rows (see [`transform_output`]);
/// inlined into per-ISA copies like [`input_channel`].
#[inline(always)]
fn output_channel(a: &OutArgs, o: usize, t: &mut OutScratch, plane: &mut [f32]) {
    let (mo, b) = (&a.m[o * 16 * a.band.njp..][..16 * a.band.njp], a.bias[o]);
    let OutScratch { s, out_row } = t;
    let tw = a.band.w.div_ceil(2);
    for ty in a.band.ty0..a.band.ty1 {
        let j0 = (ty - a.band.ty0) * tw;
        let row = |xi: usize| &mo[xi * a.band.njp + j0..][..tw];
        // A^T m: s0[k] = m0k + m1k + m2k, s1[k] = m1k - m2k - m3k (vectors over tx).
        let (s0, s1) = s.split_at_mut(4 * tw);
        for k in 0..4 {
            let (m0, m1, m2, m3) = (row(k), row(4 + k), row(8 + k), row(12 + k));
            let d0 = &mut s0[k * tw..][..tw];
            for tx in 0..tw {
                d0[tx] = m0[tx] + m1[tx] + m2[tx];
            }
            let d1 = &mut s1[k * tw..][..tw];
            for tx in 0..tw {
                d1[tx] = m1[tx] - m2[tx] - m3[tx];
            }
        }
        // (A^T m) A, interleaved into output rows 2ty, 2ty+1.
        for (r, sa) in [&*s0, &*s1].into_iter().enumerate() {
            let y = 2 * ty + r;
            if y >= a.band.h {
                break;
            }
            let (c0, c1, c2, c3) = (
                &sa[..tw],
                &sa[tw..2 * tw],
                &sa[2 * tw..3 * tw],
                &sa[3 * tw..],
            );
            let dst = &mut plane[y * a.band.w..][..a.band.w];
            let (ye, yo) = out_row.split_at_mut(tw);
            for tx in 0..tw {
                ye[tx] = c0[tx] + c1[tx] + c2[tx] + b;
                yo[tx] = c1[tx] - c2[tx] - c3[tx] + b;
            }
            let mut pairs = dst.chunks_exact_mut(2);
            for (pair, (&e, &o)) in (&mut pairs).zip(ye.iter().zip(yo.iter())) {
                pair[0] = e;
                pair[1] = o;
            }
            if let [last] = pairs.into_remainder() {
                *last = ye[tw - 1];
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fill(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    /// f64 direct convolution with zero padding, for a shape of the table below.
    fn direct(
        wt: &[f32],
        bias: &[f32],
        x: &[f32],
        (cin, cout, h, w): (usize, usize, usize, usize),
    ) -> Vec<f64> {
        let mut out = vec![0.0f64; cout * h * w];
        for o in 0..cout {
            for y in 0..h {
                for xx in 0..w {
                    let mut acc = bias[o] as f64;
                    for c in 0..cin {
                        for ky in 0..3 {
                            for kx in 0..3 {
                                let (ys, xs) =
                                    (y as isize + ky as isize - 1, xx as isize + kx as isize - 1);
                                if ys < 0 || xs < 0 || ys >= h as isize || xs >= w as isize {
                                    continue;
                                }
                                acc += wt[(o * cin + c) * 9 + ky * 3 + kx] as f64
                                    * x[(c * h + ys as usize) * w + xs as usize] as f64;
                            }
                        }
                    }
                    out[(o * h + y) * w + xx] = acc;
                }
            }
        }
        out
    }

    #[test]
    fn every_kernel_matches_direct_convolution() {
        // Odd and even sizes, one-pixel images, channel counts off the register blocks, and
        // enough tiles for several tile blocks and (with 40 channels at 70 px) several bands.
        let shapes = [
            (1, 1, 1, 1),
            (3, 5, 1, 7),
            (5, 7, 9, 6),
            (8, 3, 16, 16),
            (17, 9, 13, 11),
            (40, 33, 70, 66),
        ];
        for isa in Isa::available() {
            for (i, &shape) in shapes.iter().enumerate() {
                let (cin, cout, h, w) = shape;
                let wt = fill(cout * cin * 9, 10 + i as u64, 0.5);
                let bias = fill(cout, 20 + i as u64, 0.5);
                let x = fill(cin * h * w, 30 + i as u64, 1.0);
                let want = direct(&wt, &bias, &x, shape);
                let mut got = vec![f32::NAN; cout * h * w];
                conv3x3(isa, &wt, &bias, cin, cout, &x, h, w, &mut got);
                let err = got
                    .iter()
                    .zip(&want)
                    .map(|(&a, &b)| (a as f64 - b).abs())
                    .fold(0.0, f64::max);
                // Sums of up to 9 * 40 terms of magnitude <= 0.5: f32 rounding is ~1e-6.
                assert!(err < 2e-5, "{isa:?} {cin}x{cout} {h}x{w}: max err {err}");
            }
        }
    }
}
