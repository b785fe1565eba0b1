//! Launchers for kernels/norm.cu: RMSNorm + AdaLN, SwiGLU gating, bias add. The param
//! structs are also used by the emulator ABI tests in src/cuda/mod.rs.

use super::{DevBuf, Gpu, Traffic, k, row_grid};
use anyhow::{Result, ensure};
use half::bf16;

kernel_params! {
    /// The parameters of kernels/norm.cu's `RmsNormParams`.
    pub(super) struct RmsNormParams {
        pub(super) x: u64,
        pub(super) w: u64,
        pub(super) modulation: u64,
        pub(super) out: u64,
        pub(super) tokens: i32,
        pub(super) n: i32,
        pub(super) c: i32,
        pub(super) mod_offset: i32,
        pub(super) mod_stride: i32,
        pub(super) eps: f32,
    }
}

/// Where `rmsnorm_adaln` reads a layer's AdaLN pair: sequence row r's shift (C values) at
/// `r * row_stride + offset` of `buf`, its scale right after.
#[derive(Clone, Copy, Debug)]
pub struct AdaLn<'a> {
    pub buf: &'a DevBuf<f32>,
    pub offset: usize,
    pub row_stride: usize,
}

/// `out (T, C) = RMSNorm(x) * w`, then `* scale + shift` from `modulation` when given; token t
/// belongs to sequence row t / n.
#[allow(clippy::too_many_arguments)]
pub fn rmsnorm_adaln(
    gpu: &Gpu,
    x: &DevBuf<f32>,
    w: &DevBuf<f32>,
    modulation: Option<AdaLn<'_>>,
    out: &mut DevBuf<bf16>,
    tokens: usize,
    n: usize,
    c: usize,
    eps: f32,
) -> Result<()> {
    ensure!(
        x.len() >= tokens * c && out.len() >= tokens * c && w.len() == c,
        "rmsnorm shapes"
    );
    let (mp, off, stride) = match modulation {
        Some(AdaLn {
            buf,
            offset,
            row_stride,
        }) => {
            let rows = tokens.div_ceil(n.max(1));
            ensure!(
                n > 0
                    && offset + 2 * c <= row_stride
                    && row_stride <= i32::MAX as usize
                    && (rows == 0 || buf.len() >= (rows - 1) * row_stride + offset + 2 * c),
                "adaln shapes: {rows} rows of stride {row_stride}, a {}-value (shift, scale) \
                 pair at {offset}, modulation buffer {}",
                2 * c,
                buf.len()
            );
            (gpu.ptr(buf), offset, row_stride)
        }
        None => (0, 0, 0),
    };
    let p = RmsNormParams {
        x: gpu.ptr(x),
        w: gpu.ptr(w),
        modulation: mp,
        out: gpu.ptr(out),
        tokens: tokens as i32,
        n: n.max(1) as i32,
        c: c as i32,
        mod_offset: off as i32,
        mod_stride: stride as i32,
        eps,
    };
    // x and w read, the scale and shift halves of each sequence row's modulation, out written.
    let mod_bytes = if mp != 0 {
        tokens.div_ceil(n) * 2 * c * 4
    } else {
        0
    };
    let traffic = Traffic::new(
        tokens * c * 4 + c * 4 + mod_bytes,
        tokens * c * 2,
        5 * tokens * c,
    );
    gpu.launch_256(k::RMSNORM_ADALN_BF16, (tokens as u32, 1, 1), &p, traffic)
}

kernel_params! {
    /// The parameters of kernels/norm.cu's `SiluMulParams`.
    struct SiluMulParams {
        g: u64,
        h: u64,
        tokens: i32,
        f: i32,
    }
}

/// `h (T, F) = silu(g[:, :F]) * g[:, F:]` with `g (T, 2F)`.
pub fn silu_mul(
    gpu: &Gpu,
    g: &DevBuf<bf16>,
    h: &mut DevBuf<bf16>,
    tokens: usize,
    f: usize,
) -> Result<()> {
    ensure!(
        g.len() >= tokens * 2 * f && h.len() >= tokens * f,
        "silu_mul shapes"
    );
    let p = SiluMulParams {
        g: gpu.ptr(g),
        h: gpu.ptr(h),
        tokens: tokens as i32,
        f: f as i32,
    };
    let traffic = Traffic::new(tokens * 2 * f * 2, tokens * f * 2, 5 * tokens * f);
    gpu.launch_256(k::SILU_MUL_BF16, row_grid(f, tokens)?, &p, traffic)
}

kernel_params! {
    /// The parameters of kernels/norm.cu's `AddBiasParams`.
    pub(super) struct AddBiasParams {
        pub(super) y: u64,
        pub(super) b: u64,
        pub(super) rows: i32,
        pub(super) n: i32,
    }
}

/// `y (rows, n) += b (n)`.
pub fn add_bias_f32(
    gpu: &Gpu,
    y: &mut DevBuf<f32>,
    b: &DevBuf<f32>,
    rows: usize,
    n: usize,
) -> Result<()> {
    ensure!(y.len() >= rows * n && b.len() == n, "add_bias shapes");
    let p = AddBiasParams {
        y: gpu.ptr(y),
        b: gpu.ptr(b),
        rows: rows as i32,
        n: n as i32,
    };
    let traffic = Traffic::new(rows * n * 4 + n * 4, rows * n * 4, rows * n);
    gpu.launch_256(k::ADD_BIAS_F32, row_grid(n, rows)?, &p, traffic)
}
