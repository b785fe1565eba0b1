//! CPU reference of kernels/ffn.cu.

use super::norm::silu_mul;
use crate::math;

/// `h (T, F) = silu(a @ w1^T) * (a @ w3^T)` for `a (T, K)` and the stacked `w13 (2F, K)` =
/// `[w1; w3]` (the CPU's layout): the composition the fused GPU kernel replaces,
/// `math::matmul_bt` (f32) then [`silu_mul`]. With `round_g` the GEMM's output is rounded to
/// `round_g` (e.g. to bf16, as the unfused GPU path stored g and as the fused kernel's
/// epilogue rounds it) before the gate.
pub fn swiglu(
    a: &[f32],
    w13: &[f32],
    k: usize,
    f: usize,
    round_g: Option<fn(f32) -> f32>,
) -> Vec<f32> {
    assert!(a.len().is_multiple_of(k) && w13.len() == 2 * f * k);
    let t = a.len() / k;
    let mut g = vec![0.0f32; t * 2 * f];
    math::matmul_bt(a, w13, &mut g, t, k, 2 * f, 0.0);
    if let Some(r) = round_g {
        g.iter_mut().for_each(|v| *v = r(*v));
    }
    silu_mul(&g, f)
}
