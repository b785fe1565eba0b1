//! Launcher for kernels/ffn.cu: the FFN gate `h = silu(a @ w1^T) * (a @ w3^T)` as one
//! tensor-core GEMM with SwiGLU in its epilogue (batch-invariant: the K order of every output
//! is fixed, whatever M and whichever tile variant runs; see the kernel's header).

use super::{DevBuf, Gpu, Traffic, k};
use anyhow::{Result, ensure};
use half::bf16;

/// The kernel's K tile (kernels/ffn.cu FFN_BK): K (the model's hidden size) must be a
/// multiple of it.
pub const SWIGLU_K_TILE: usize = super::c_defines::ffn::FFN_BK;

/// M (tokens) above which the 128 x 128 tile runs; at most this many, the 64 x 64 tile
/// (twice the blocks over N, for the small batches of the serial steps). Either gives the same
/// bits per row.
pub const SWIGLU_M128_FROM: usize = 257;

kernel_params! {
    /// The parameters of kernels/ffn.cu's `SwigluParams`.
    struct SwigluParams {
        a: u64,
        w: u64,
        h: u64,
        m: i32,
        f: i32,
        k: i32,
    }
}

/// The interleaved gate/up weight the kernel reads, from the stacked `[w1; w3]` (2F, K)
/// row-major weight of the model (`model::weights`, w1 rows then w3 rows): row 2j = w1 row j,
/// row 2j+1 = w3 row j.
pub fn interleave_gate_up<T: Copy>(w13: &[T], f: usize, k: usize) -> Vec<T> {
    assert_eq!(w13.len(), 2 * f * k, "w13 is (2F, K)");
    let (w1, w3) = w13.split_at(f * k);
    let mut out = Vec::with_capacity(w13.len());
    for (r1, r3) in w1.chunks_exact(k).zip(w3.chunks_exact(k)) {
        out.extend_from_slice(r1);
        out.extend_from_slice(r3);
    }
    out
}

/// Whether [`swiglu`] takes hidden size `k` (every model the engine runs: C = heads *
/// head_dim with head_dim 32, 64 or 128).
pub fn swiglu_fits(k: usize) -> bool {
    k > 0 && k.is_multiple_of(SWIGLU_K_TILE)
}

/// `h (m, f) = silu(g1) * g3`, `g = a (m, k) @ w^T` with `w` (2f, k) the interleaved weight
/// of [`interleave_gate_up`] (g1 = even columns, g3 = odd), g rounded to bf16 before the
/// gate (as the unfused GEMM stored it). Needs `k` a multiple of [`SWIGLU_K_TILE`].
pub fn swiglu(
    gpu: &Gpu,
    a: &DevBuf<bf16>,
    w: &DevBuf<bf16>,
    h: &mut DevBuf<bf16>,
    m: usize,
    k: usize,
    f: usize,
) -> Result<()> {
    ensure!(
        swiglu_fits(k),
        "swiglu: K = {k} is not a positive multiple of the kernel's {SWIGLU_K_TILE}-wide K tile \
         (linear + silu_mul compute the same for any K)"
    );
    ensure!(
        f > 0 && a.len() >= m * k && w.len() == 2 * f * k && h.len() >= m * f,
        "swiglu shapes: a {} (need {}), w {} (need {}), h {} (need {})",
        a.len(),
        m * k,
        w.len(),
        2 * f * k,
        h.len(),
        m * f
    );
    ensure!(
        m < i32::MAX as usize && 2 * f <= i32::MAX as usize && k <= i32::MAX as usize,
        "swiglu: m {m}, f {f}, k {k} past the kernel's 32-bit indices"
    );
    if m == 0 {
        return Ok(());
    }
    let (ap, wp) = (gpu.ptr(a), gpu.ptr(w));
    ensure!(
        ap % 16 == 0 && wp % 16 == 0,
        "swiglu: a and w must be 16-byte aligned (cp.async)"
    );
    let p = SwigluParams {
        a: ap,
        w: wp,
        h: gpu.ptr(h),
        m: m as i32,
        f: f as i32,
        k: k as i32,
    };
    let (kernel, tile, block) = if m >= SWIGLU_M128_FROM {
        (k::SWIGLU_TC_M128_BF16, 128, 256)
    } else {
        (k::SWIGLU_TC_M64_BF16, 64, 128)
    };
    let grid = (m.div_ceil(tile) as u32, (2 * f).div_ceil(tile) as u32, 1);
    ensure!(
        grid.1 <= 65535,
        "swiglu: F = {f} needs more than 65535 column tiles"
    );
    // a and w read once, h written; 2 m (2F) K FLOPs of the GEMM and ~5 per output of the gate.
    let traffic = Traffic::new(
        m * k * 2 + 2 * f * k * 2,
        m * f * 2,
        2 * m * 2 * f * k + 5 * m * f,
    );
    gpu.launch(kernel, grid, (block, 1, 1), 0, &p, traffic)
}
