//! The VQ decoder on the GPU (SPEC.md section 7): typed launchers for kernels/decoder.cu, the
//! 1x1 convs and attention GEMMs on cuBLAS, and [`GpuDecoder`], which runs the whole decoder
//! in the layer order of the f32 reference (`cpu::decoder`).
//!
//! ```text
//! tokens (B, s, s) i32 -> gather_codes: codebook rows, L2-normalized   z (B*s*s, e) T
//!   -> post_quant_conv 1x1 (cuBLAS) + bias -> cast                      (B, s, s, z_ch) T
//!   -> conv_in 3x3                                                      x (B, s, s, C) f32
//!   -> mid: Res, Attn, Res -> conv_blocks.0 .. L-1 (Res [+ Attn]) x (num_res_blocks+1),
//!      then cast + upsample-fused conv 3x3 (2H x 2W)
//!   -> GroupNorm + SiLU -> conv_out 3x3 -> dec_pixels            (B, 3, H, W) f32 and u8
//! ```
//! Activations are NHWC. The residual stream and every conv output are f32; every conv input
//! (GroupNorm output or a cast of the residual stream) and every conv weight (3x3 as
//! (Cout, 3, 3, Cin), 1x1 as (Cout, Cin)) is 16-bit [`Storage`] T: fp16 by default, bf16 as
//! an option ([`Precision`]); biases, norm affines and the codebook are f32; accumulation f32.
//! Why fp16 by default: on the golden decoder, a host model of exactly this data flow gives a
//! relative error of 1.4e-2 to 2.2e-2 with bf16 storage and 1.8e-3 to 3.2e-3 with fp16
//! (PERF.md, "VQ decoder"); the tensor-core rate is the same.
//! ResBlock: `t = GN1(x)`, `h = conv1(t)`, `t = GN2(h)`, `x = conv2(t) + b + x` with the
//! residual added in the conv epilogue in place (or onto `nin_shortcut(x)`, computed first into
//! the other residual buffer). AttnBlock: GN, one stacked q|k|v GEMM, scores and P V as
//! strided-batched cuBLAS GEMMs, row softmax kernel, proj_out GEMM accumulated onto x (beta 1).

use super::gemm::{Operand, gemm};
use super::{Gpu, Kernel, k, norm};
use crate::model::config::DecoderConfig;
use crate::model::decoder::{self as host, GN_EPS, GN_GROUPS};
use anyhow::{Context, Result, ensure};
use cudarc::cublas::sys;
use cudarc::driver::{CudaSlice, DeviceRepr, ValidAsZeroBits};
use half::{bf16, f16};
use std::sync::Mutex;

/// Pixels per gn_partial chunk.
const GN_CHUNK: usize = 64;
/// Block tile (M and N) of conv3x3_tc.
const TC_TILE: usize = 128;

/// The 16-bit type of conv inputs and weights (kernels exist for both, suffix `_bf16`/`_f16`).
pub trait Storage:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Unpin + Send + Sync + std::fmt::Debug + 'static
{
    /// Kernel-name suffix.
    const TAG: &'static str;
    /// cuBLAS data type.
    const CUDA: sys::cudaDataType;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl Storage for bf16 {
    const TAG: &'static str = "bf16";
    const CUDA: sys::cudaDataType = sys::cudaDataType::CUDA_R_16BF;
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
}

impl Storage for f16 {
    const TAG: &'static str = "f16";
    const CUDA: sys::cudaDataType = sys::cudaDataType::CUDA_R_16F;
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
}

/// Which 16-bit storage a [`GpuDecoder`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// IEEE half: 10 mantissa bits, range +-65504; the default (meets the 1e-2 golden gate).
    F16,
    /// bfloat16: 7 mantissa bits, f32's range.
    Bf16,
}

/// Which 3x3 convolution kernel runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvKernel {
    /// v1 `conv3x3_direct`: one thread per output, the on-device reference.
    Direct,
    /// v2 `conv3x3_tc`: implicit GEMM on 16-bit tensor cores (needs Cin % 32 == 0; the launcher
    /// falls back to v1 for other Cin).
    TensorCore,
}

impl ConvKernel {
    pub fn name(self) -> &'static str {
        match self {
            ConvKernel::Direct => "v1 direct",
            ConvKernel::TensorCore => "v2 tensor-core implicit GEMM",
        }
    }
}

fn grid_stride(total: usize) -> u32 {
    total.div_ceil(256).clamp(1, 1 << 20) as u32
}

/// The `_bf16` or `_f16` instance of a kernel, by storage type.
fn pick<T: Storage>(bf16: Kernel, f16: Kernel) -> Kernel {
    match T::TAG {
        "bf16" => bf16,
        "f16" => f16,
        other => unreachable!("no kernels for storage {other}"),
    }
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).with_context(|| format!("{what} = {v} does not fit the kernels' int32"))
}

// ---------------------------------------------------------------------------------------------
// Weights

/// A conv layer on the device: 3x3 weight (Cout, 3, 3, Cin) or 1x1 weight (Cout, Cin) in T;
/// bias (Cout) f32.
pub struct ConvWeights<T: Storage> {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    w: CudaSlice<T>,
    b: CudaSlice<f32>,
}

impl<T: Storage> ConvWeights<T> {
    /// From a PyTorch weight (Cout, Cin, k, k) f32 and bias (Cout); k is 1 or 3.
    pub fn new(
        gpu: &Gpu,
        cin: usize,
        cout: usize,
        k: usize,
        weight: &[f32],
        bias: &[f32],
    ) -> Result<ConvWeights<T>> {
        ensure!(k == 1 || k == 3, "conv kernel size {k} (1 or 3 supported)");
        ensure!(
            weight.len() == cout * cin * k * k && bias.len() == cout,
            "conv weights: {} and {} values for ({cout}, {cin}, {k}, {k})",
            weight.len(),
            bias.len()
        );
        let w: Vec<T> = if k == 1 {
            weight.iter().map(|&v| T::from_f32(v)).collect()
        } else {
            // (Cout, Cin, 3, 3) -> (Cout, 3, 3, Cin)
            let mut w = vec![T::default(); cout * 9 * cin];
            for o in 0..cout {
                for c in 0..cin {
                    for t in 0..9 {
                        w[(o * 9 + t) * cin + c] = T::from_f32(weight[(o * cin + c) * 9 + t]);
                    }
                }
            }
            w
        };
        Ok(ConvWeights {
            cin,
            cout,
            k,
            w: gpu.upload(&w)?,
            b: gpu.upload(bias)?,
        })
    }

    fn from_host(gpu: &Gpu, c: &host::Conv) -> Result<ConvWeights<T>> {
        ConvWeights::new(gpu, c.cin, c.cout, c.k, &c.weight, &c.bias)
    }
}

/// GroupNorm affine parameters (C) f32.
pub struct GnWeights {
    pub c: usize,
    gamma: CudaSlice<f32>,
    beta: CudaSlice<f32>,
}

impl GnWeights {
    pub fn new(gpu: &Gpu, gamma: &[f32], beta: &[f32]) -> Result<GnWeights> {
        let c = gamma.len();
        ensure!(
            beta.len() == c,
            "group norm: gamma {c} vs beta {}",
            beta.len()
        );
        ensure!(
            c.is_multiple_of(GN_GROUPS) && c <= 1024,
            "group norm: {c} channels (a multiple of {GN_GROUPS}, at most 1024)"
        );
        Ok(GnWeights {
            c,
            gamma: gpu.upload(gamma)?,
            beta: gpu.upload(beta)?,
        })
    }

    fn from_host(gpu: &Gpu, g: &host::GroupNorm) -> Result<GnWeights> {
        GnWeights::new(gpu, &g.gamma, &g.beta)
    }
}

/// An attention block: GroupNorm, q|k|v stacked as one 1x1 conv (C -> 3C), proj_out.
pub struct AttnWeights<T: Storage> {
    pub c: usize,
    norm: GnWeights,
    qkv: ConvWeights<T>,
    proj: ConvWeights<T>,
}

impl<T: Storage> AttnWeights<T> {
    /// From f32 PyTorch tensors: norm (gamma, beta); q, k, v, proj_out as (weight (C, C, 1, 1),
    /// bias (C)).
    pub fn new(
        gpu: &Gpu,
        norm: (&[f32], &[f32]),
        q: (&[f32], &[f32]),
        k: (&[f32], &[f32]),
        v: (&[f32], &[f32]),
        proj: (&[f32], &[f32]),
    ) -> Result<AttnWeights<T>> {
        let c = norm.0.len();
        let w: Vec<f32> = [q.0, k.0, v.0].concat(); // (3C, C)
        let b: Vec<f32> = [q.1, k.1, v.1].concat(); // (3C)
        Ok(AttnWeights {
            c,
            norm: GnWeights::new(gpu, norm.0, norm.1)?,
            qkv: ConvWeights::new(gpu, c, 3 * c, 1, &w, &b)?,
            proj: ConvWeights::new(gpu, c, c, 1, proj.0, proj.1)?,
        })
    }

    fn from_host(gpu: &Gpu, a: &host::AttnBlock) -> Result<AttnWeights<T>> {
        fn pair(c: &host::Conv) -> (&[f32], &[f32]) {
            (&c.weight, &c.bias)
        }
        AttnWeights::new(
            gpu,
            (&a.norm.gamma, &a.norm.beta),
            pair(&a.q),
            pair(&a.k),
            pair(&a.v),
            pair(&a.proj_out),
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Convolutions

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Conv3x3Params {
    x: u64,
    w: u64,
    bias: u64,
    residual: u64,
    y: u64,
    batch: i32,
    height: i32,
    width: i32,
    cin: i32,
    cout: i32,
    upsample: i32,
}
// SAFETY: plain-old-data mirror of the C struct.
unsafe impl DeviceRepr for Conv3x3Params {}

/// What a conv epilogue adds after the bias.
pub enum Residual<'a> {
    None,
    /// `y += conv(x) + bias`: the output buffer already holds the residual.
    InPlace,
    /// `y = conv(x) + bias + r`, `r` shaped like `y`.
    Add(&'a CudaSlice<f32>),
}

/// `y (B, H, W, Cout) f32 = conv3x3(x) + bias (+ residual)`, padding 1. With `upsample`, x is
/// (B, H/2, W/2, Cin) and is read through a nearest x2 upsample; otherwise (B, H, W, Cin).
/// `TensorCore` falls back to `Direct` when Cin is not a multiple of 32.
#[allow(clippy::too_many_arguments)]
pub fn conv3x3<T: Storage>(
    gpu: &Gpu,
    kernel: ConvKernel,
    conv: &ConvWeights<T>,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<f32>,
    residual: Residual,
    batch: usize,
    height: usize,
    width: usize,
    upsample: bool,
) -> Result<()> {
    let (cin, cout) = (conv.cin, conv.cout);
    ensure!(conv.k == 3, "conv3x3 given a {}x{} conv", conv.k, conv.k);
    ensure!(
        !upsample || (height.is_multiple_of(2) && width.is_multiple_of(2)),
        "upsampled conv output {height}x{width} must be even"
    );
    let (hin, win) = if upsample {
        (height / 2, width / 2)
    } else {
        (height, width)
    };
    let m = batch * height * width;
    ensure!(m > 0, "conv3x3: empty output");
    ensure!(
        x.len() >= batch * hin * win * cin && y.len() >= m * cout,
        "conv3x3 buffers: x {} (need {}), y {} (need {})",
        x.len(),
        batch * hin * win * cin,
        y.len(),
        m * cout
    );
    let res_ptr = match residual {
        Residual::None => 0,
        Residual::InPlace => gpu.ptr(y),
        Residual::Add(r) => {
            ensure!(r.len() >= m * cout, "conv3x3 residual too short");
            gpu.ptr(r)
        }
    };
    let p = Conv3x3Params {
        x: gpu.ptr(x),
        w: gpu.ptr(&conv.w),
        bias: gpu.ptr(&conv.b),
        residual: res_ptr,
        y: gpu.ptr(y),
        batch: i32_of(batch, "batch")?,
        height: i32_of(height, "height")?,
        width: i32_of(width, "width")?,
        cin: i32_of(cin, "cin")?,
        cout: i32_of(cout, "cout")?,
        upsample: upsample as i32,
    };
    i32_of(m, "B*H*W")?;
    let tc = kernel == ConvKernel::TensorCore && cin.is_multiple_of(32);
    if tc {
        let grid = (m.div_ceil(TC_TILE) as u32, cout.div_ceil(TC_TILE) as u32, 1);
        gpu.launch(
            pick::<T>(k::CONV3X3_TC_BF16, k::CONV3X3_TC_F16),
            grid,
            (256, 1, 1),
            0,
            &p,
        )
    } else {
        let grid = grid_stride(m * cout);
        gpu.launch(
            pick::<T>(k::CONV3X3_DIRECT_BF16, k::CONV3X3_DIRECT_F16),
            (grid, 1, 1),
            (256, 1, 1),
            0,
            &p,
        )
    }
}

/// A 16-bit GEMM operand (address, leading dimension, batch stride) in the storage type.
fn operand<T: Storage>(ptr: u64, ld: usize, stride: usize) -> Operand {
    Operand {
        ptr,
        dtype: T::CUDA,
        ld,
        stride,
    }
}

/// `y (rows, Cout) f32 = x (rows, Cin) w^T + bias`, or `y += ...` with `accumulate`: a 1x1
/// conv on NHWC activations through cuBLAS, then the bias kernel.
pub fn conv1x1<T: Storage>(
    gpu: &Gpu,
    conv: &ConvWeights<T>,
    x: &CudaSlice<T>,
    y: &mut CudaSlice<f32>,
    rows: usize,
    accumulate: bool,
) -> Result<()> {
    let (cin, cout) = (conv.cin, conv.cout);
    ensure!(conv.k == 1, "conv1x1 given a {}x{} conv", conv.k, conv.k);
    ensure!(rows > 0, "conv1x1: no rows");
    ensure!(
        x.len() >= rows * cin && y.len() >= rows * cout,
        "conv1x1 buffers: x {} (need {}), y {} (need {})",
        x.len(),
        rows * cin,
        y.len(),
        rows * cout
    );
    // Row-major y (rows, Cout) = x (rows, Cin) w^T is column-major y^T (Cout x rows) =
    // op(A) B with A = w viewed column-major (Cin x Cout, lda Cin) transposed and
    // B = x viewed column-major (Cin x rows, ldb Cin), as gemm.rs `linear`.
    gemm(
        gpu,
        true,
        (cout, rows, cin),
        operand::<T>(gpu.ptr(&conv.w), cin, 0),
        operand::<T>(gpu.ptr(x), cin, 0),
        Operand {
            ptr: gpu.ptr(y),
            dtype: sys::cudaDataType::CUDA_R_32F,
            ld: cout,
            stride: 0,
        },
        if accumulate { 1.0 } else { 0.0 },
        1,
    )
    .context("1x1 conv GEMM")?;
    norm::add_bias_f32(gpu, y, &conv.b, rows, cout)
}

// ---------------------------------------------------------------------------------------------
// GroupNorm

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GnPartialParams {
    x: u64,
    part: u64,
    batch: i32,
    hw: i32,
    c: i32,
    chunk: i32,
    nchunk: i32,
}
// SAFETY: plain-old-data mirror of the C struct.
unsafe impl DeviceRepr for GnPartialParams {}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GnFinalizeParams {
    part: u64,
    gamma: u64,
    beta: u64,
    ss: u64,
    batch: i32,
    hw: i32,
    c: i32,
    chunk: i32,
    nchunk: i32,
    eps: f32,
}
// SAFETY: plain-old-data mirror of the C struct.
unsafe impl DeviceRepr for GnFinalizeParams {}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GnApplyParams {
    x: u64,
    ss: u64,
    y: u64,
    batch: i32,
    hw: i32,
    c: i32,
    silu: i32,
}
// SAFETY: plain-old-data mirror of the C struct.
unsafe impl DeviceRepr for GnApplyParams {}

/// Statistics scratch of [`group_norm`] for up to (batch, max_hw, max_c).
pub struct GnScratch {
    part: CudaSlice<f32>, // (B, ceil(hw / GN_CHUNK), C, 2): per chunk and channel (mean, M2)
    ss: CudaSlice<f32>,   // (B, C, 2): per channel (scale, shift)
}

impl GnScratch {
    pub fn new(gpu: &Gpu, batch: usize, max_hw: usize, max_c: usize) -> Result<GnScratch> {
        Ok(GnScratch {
            part: gpu.zeros(batch * max_hw.div_ceil(GN_CHUNK) * max_c * 2)?,
            ss: gpu.zeros(batch * max_c * 2)?,
        })
    }
}

/// `y (B, hw, C) T = GroupNorm(x) (then SiLU when `silu`)`, x (B, hw, C) f32; 32 groups,
/// eps 1e-6, biased variance, f32 statistics. Three launches: partial, finalize, apply.
#[allow(clippy::too_many_arguments)]
pub fn group_norm<T: Storage>(
    gpu: &Gpu,
    gn: &GnWeights,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<T>,
    scratch: &mut GnScratch,
    batch: usize,
    hw: usize,
    silu: bool,
) -> Result<()> {
    let c = gn.c;
    let nchunk = hw.div_ceil(GN_CHUNK);
    ensure!(batch > 0 && hw > 0, "group norm: empty input");
    ensure!(batch <= 65535, "group norm: batch {batch} > 65535");
    ensure!(
        x.len() >= batch * hw * c && y.len() >= batch * hw * c,
        "group norm buffers: x {}, y {}, need {}",
        x.len(),
        y.len(),
        batch * hw * c
    );
    ensure!(
        scratch.part.len() >= batch * nchunk * c * 2 && scratch.ss.len() >= batch * c * 2,
        "group norm scratch too small for (B {batch}, hw {hw}, C {c})"
    );
    let (b32, hw32, c32) = (i32_of(batch, "batch")?, i32_of(hw, "hw")?, i32_of(c, "C")?);
    i32_of(batch * hw * c, "B*hw*C")?;
    let pp = GnPartialParams {
        x: gpu.ptr(x),
        part: gpu.ptr(&scratch.part),
        batch: b32,
        hw: hw32,
        c: c32,
        chunk: GN_CHUNK as i32,
        nchunk: nchunk as i32,
    };
    gpu.launch(
        k::GN_PARTIAL_F32,
        (nchunk as u32, batch as u32, 1),
        (256, 1, 1),
        0,
        &pp,
    )?;
    let fp = GnFinalizeParams {
        part: gpu.ptr(&scratch.part),
        gamma: gpu.ptr(&gn.gamma),
        beta: gpu.ptr(&gn.beta),
        ss: gpu.ptr(&scratch.ss),
        batch: b32,
        hw: hw32,
        c: c32,
        chunk: GN_CHUNK as i32,
        nchunk: nchunk as i32,
        eps: GN_EPS,
    };
    gpu.launch(
        k::GN_FINALIZE_F32,
        (GN_GROUPS as u32, batch as u32, 1),
        (256, 1, 1),
        0,
        &fp,
    )?;
    let ap = GnApplyParams {
        x: gpu.ptr(x),
        ss: gpu.ptr(&scratch.ss),
        y: gpu.ptr(y),
        batch: b32,
        hw: hw32,
        c: c32,
        silu: silu as i32,
    };
    gpu.launch(
        pick::<T>(k::GN_APPLY_BF16, k::GN_APPLY_F16),
        (grid_stride(batch * hw * c / 4), 1, 1),
        (256, 1, 1),
        0,
        &ap,
    )
}

// ---------------------------------------------------------------------------------------------
// Small kernels

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CastParams {
    x: u64,
    y: u64,
    n: u64,
}
// SAFETY: plain-old-data mirror of the C struct.
unsafe impl DeviceRepr for CastParams {}

/// `y[..n] = T(x[..n])` (round to nearest; an fp16 overflow gives inf).
pub fn cast_f32<T: Storage>(
    gpu: &Gpu,
    x: &CudaSlice<f32>,
    y: &mut CudaSlice<T>,
    n: usize,
) -> Result<()> {
    ensure!(
        x.len() >= n && y.len() >= n,
        "cast: buffers shorter than {n}"
    );
    let p = CastParams {
        x: gpu.ptr(x),
        y: gpu.ptr(y),
        n: n as u64,
    };
    gpu.launch(
        pick::<T>(k::CAST_F32_BF16, k::CAST_F32_F16),
        (grid_stride(n), 1, 1),
        (256, 1, 1),
        0,
        &p,
    )
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct GatherCodesParams {
    tokens: u64,
    codebook: u64,
    z: u64,
    rows: i32,
    e: i32,
    n_embed: i32,
    normalize: i32,
}
// SAFETY: plain-old-data mirror of the C struct.
unsafe impl DeviceRepr for GatherCodesParams {}

/// `z (rows, e) T = codebook[tokens]`, each row L2-normalized (eps 1e-12) when `normalize`.
/// A token outside [0, n_embed) gives a NaN row.
#[allow(clippy::too_many_arguments)]
pub fn gather_codes<T: Storage>(
    gpu: &Gpu,
    tokens: &CudaSlice<i32>,
    codebook: &CudaSlice<f32>,
    z: &mut CudaSlice<T>,
    rows: usize,
    e: usize,
    n_embed: usize,
    normalize: bool,
) -> Result<()> {
    ensure!(
        tokens.len() >= rows && codebook.len() >= n_embed * e && z.len() >= rows * e,
        "gather_codes buffers"
    );
    let p = GatherCodesParams {
        tokens: gpu.ptr(tokens),
        codebook: gpu.ptr(codebook),
        z: gpu.ptr(z),
        rows: i32_of(rows, "rows")?,
        e: i32_of(e, "e")?,
        n_embed: i32_of(n_embed, "n_embed")?,
        normalize: normalize as i32,
    };
    gpu.launch(
        pick::<T>(k::GATHER_CODES_BF16, k::GATHER_CODES_F16),
        (rows.div_ceil(128).max(1) as u32, 1, 1),
        (128, 1, 1),
        0,
        &p,
    )
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct SoftmaxParams {
    s: u64,
    p: u64,
    rows: i32,
    n: i32,
    scale: f32,
}
// SAFETY: plain-old-data mirror of the C struct.
unsafe impl DeviceRepr for SoftmaxParams {}

/// `p (rows, n) T = softmax(s * scale)` per row, s (rows, n) f32, scale > 0.
pub fn softmax_rows<T: Storage>(
    gpu: &Gpu,
    s: &CudaSlice<f32>,
    p: &mut CudaSlice<T>,
    rows: usize,
    n: usize,
    scale: f32,
) -> Result<()> {
    ensure!(scale > 0.0, "softmax scale must be positive");
    ensure!(
        s.len() >= rows * n && p.len() >= rows * n,
        "softmax buffers"
    );
    let prm = SoftmaxParams {
        s: gpu.ptr(s),
        p: gpu.ptr(p),
        rows: i32_of(rows, "rows")?,
        n: i32_of(n, "n")?,
        scale,
    };
    gpu.launch(
        pick::<T>(k::ATTN_SOFTMAX_BF16, k::ATTN_SOFTMAX_F16),
        (rows as u32, 1, 1),
        (256, 1, 1),
        0,
        &prm,
    )
}

#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct PixelsParams {
    y: u64,
    out_f32: u64,
    out_u8: u64,
    batch: i32,
    hw: i32,
    c: i32,
}
// SAFETY: plain-old-data mirror of the C struct.
unsafe impl DeviceRepr for PixelsParams {}

/// `y (B, hw, c)` NHWC f32 -> planar (B, c, hw) f32 and/or 8-bit pixels
/// (clamp((x+1)/2, 0, 1) * 255, truncated, as `cpu::ops::pixels`).
pub fn pixels(
    gpu: &Gpu,
    y: &CudaSlice<f32>,
    out_f32: Option<&mut CudaSlice<f32>>,
    out_u8: Option<&mut CudaSlice<u8>>,
    batch: usize,
    hw: usize,
    c: usize,
) -> Result<()> {
    let n = batch * hw * c;
    ensure!(y.len() >= n, "pixels: input shorter than {n}");
    let pf = match out_f32 {
        Some(o) => {
            ensure!(o.len() >= n, "pixels: f32 output too short");
            gpu.ptr(o)
        }
        None => 0,
    };
    let pu = match out_u8 {
        Some(o) => {
            ensure!(o.len() >= n, "pixels: u8 output too short");
            gpu.ptr(o)
        }
        None => 0,
    };
    let p = PixelsParams {
        y: gpu.ptr(y),
        out_f32: pf,
        out_u8: pu,
        batch: i32_of(batch, "batch")?,
        hw: i32_of(hw, "hw")?,
        c: i32_of(c, "c")?,
    };
    gpu.launch(
        k::DEC_PIXELS_F32,
        (grid_stride(n), 1, 1),
        (256, 1, 1),
        0,
        &p,
    )
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Scratch of [`attn_block`] for up to (batch, n positions, c channels).
pub struct AttnScratch<T: Storage> {
    batch: usize,
    n: usize,
    c: usize,
    gn: GnScratch,
    hn: CudaSlice<T>,       // (B*N, C) GroupNorm output
    qkv: CudaSlice<f32>,    // (B*N, 3C) q | k | v with bias
    qkv_h: CudaSlice<T>,    // (B*N, 3C) the same in T
    scores: CudaSlice<f32>, // (B, N query, N key) raw q.k
    probs: CudaSlice<T>,    // (B, N, N) softmax
    att: CudaSlice<T>,      // (B*N, C) P V
}

impl<T: Storage> AttnScratch<T> {
    pub fn new(gpu: &Gpu, batch: usize, n: usize, c: usize) -> Result<AttnScratch<T>> {
        Ok(AttnScratch {
            batch,
            n,
            c,
            gn: GnScratch::new(gpu, batch, n, c)?,
            hn: gpu.zeros(batch * n * c)?,
            qkv: gpu.zeros(batch * n * 3 * c)?,
            qkv_h: gpu.zeros(batch * n * 3 * c)?,
            scores: gpu.zeros(batch * n * n)?,
            probs: gpu.zeros(batch * n * n)?,
            att: gpu.zeros(batch * n * c)?,
        })
    }
}

/// `x (B, N, C) f32 += proj_out(softmax(q k^T / sqrt(C)) v)` with q, k, v 1x1 convs of
/// GroupNorm(x): single-head attention over the N = H*W positions of each image.
pub fn attn_block<T: Storage>(
    gpu: &Gpu,
    w: &AttnWeights<T>,
    x: &mut CudaSlice<f32>,
    s: &mut AttnScratch<T>,
    batch: usize,
    n: usize,
) -> Result<()> {
    let c = w.c;
    ensure!(
        batch <= s.batch && n <= s.n && c <= s.c,
        "attention scratch ({}, {}, {}) too small for ({batch}, {n}, {c})",
        s.batch,
        s.n,
        s.c
    );
    ensure!(x.len() >= batch * n * c, "attention input too short");
    let rows = batch * n;
    group_norm(gpu, &w.norm, x, &mut s.hn, &mut s.gn, batch, n, false)?;
    conv1x1(gpu, &w.qkv, &s.hn, &mut s.qkv, rows, false)?;
    cast_f32(gpu, &s.qkv, &mut s.qkv_h, rows * 3 * c)?;
    let qkv = gpu.ptr(&s.qkv_h);
    let (q, k, v) = (qkv, qkv + 2 * c as u64, qkv + 4 * c as u64); // byte offsets: C x 16 bit
    let ld = 3 * c;
    // scores (N query, N key) row-major = column-major (key, query): S^T = K Q^T, i.e.
    // op(A) = K^T-view transposed (A = K rows, lda 3C), B = Q rows (ldb 3C).
    gemm(
        gpu,
        true,
        (n, n, c),
        operand::<T>(k, ld, n * ld),
        operand::<T>(q, ld, n * ld),
        Operand {
            ptr: gpu.ptr(&s.scores),
            dtype: sys::cudaDataType::CUDA_R_32F,
            ld: n,
            stride: n * n,
        },
        0.0,
        batch,
    )
    .context("attention scores")?;
    softmax_rows(
        gpu,
        &s.scores,
        &mut s.probs,
        rows,
        n,
        1.0 / (c as f32).sqrt(),
    )?;
    // out (N, C) row-major = column-major (C, N): O^T = V^T P^T, A = V rows (lda 3C, (C x N)
    // column-major view), B = P rows (ldb N).
    gemm(
        gpu,
        false,
        (c, n, n),
        operand::<T>(v, ld, n * ld),
        operand::<T>(gpu.ptr(&s.probs), n, n * n),
        Operand {
            ptr: gpu.ptr(&s.att),
            dtype: T::CUDA,
            ld: c,
            stride: n * c,
        },
        0.0,
        batch,
    )
    .context("attention P V")?;
    conv1x1(gpu, &w.proj, &s.att, x, rows, true)
}

// ---------------------------------------------------------------------------------------------
// The decoder

struct GpuResBlock<T: Storage> {
    norm1: GnWeights,
    conv1: ConvWeights<T>,
    norm2: GnWeights,
    conv2: ConvWeights<T>,
    nin_shortcut: Option<ConvWeights<T>>,
}

impl<T: Storage> GpuResBlock<T> {
    fn from_host(gpu: &Gpu, r: &host::ResBlock) -> Result<GpuResBlock<T>> {
        Ok(GpuResBlock {
            norm1: GnWeights::from_host(gpu, &r.norm1)?,
            conv1: ConvWeights::from_host(gpu, &r.conv1)?,
            norm2: GnWeights::from_host(gpu, &r.norm2)?,
            conv2: ConvWeights::from_host(gpu, &r.conv2)?,
            nin_shortcut: r
                .nin_shortcut
                .as_ref()
                .map(|c| ConvWeights::from_host(gpu, c))
                .transpose()?,
        })
    }
}

struct GpuLevel<T: Storage> {
    res: Vec<GpuResBlock<T>>,
    attn: Vec<AttnWeights<T>>,
    upsample: Option<ConvWeights<T>>,
}

/// Device buffers for one (batch, s); see the module comment for what flows through them.
struct Workspace<T: Storage> {
    batch: usize,
    s: usize,
    side: usize,
    tokens: CudaSlice<i32>, // (B, s, s)
    z: CudaSlice<T>,        // (B*s*s, e)
    x: [CudaSlice<f32>; 2], // residual stream ping-pong, (B, H, W, C) up to max_act per image
    h: CudaSlice<f32>,      // post_quant, conv1 and conv_out outputs (B, H, W, C)
    t: CudaSlice<T>,        // conv inputs: GroupNorm outputs and casts (B, H, W, C)
    gn: GnScratch,
    attn: AttnScratch<T>,
    img: CudaSlice<f32>, // (B, 3, side, side)
    px: CudaSlice<u8>,   // (B, 3, side, side)
}

/// Largest per-image activation (elements), largest H*W and largest channel count of the
/// decoder on an s x s latent.
fn plan(cfg: &DecoderConfig, s: usize) -> (usize, usize, usize) {
    let nl = cfg.ch_mult.len();
    let mut c = cfg.ch * cfg.ch_mult[nl - 1];
    let mut h = s;
    let mut max_act = (s * s * cfg.z_channels).max(s * s * c);
    let mut max_c = c.max(cfg.z_channels);
    for i in 0..nl {
        c = cfg.ch * cfg.ch_mult[nl - 1 - i];
        max_c = max_c.max(c);
        max_act = max_act.max(h * h * c);
        if i + 1 < nl {
            h *= 2;
            max_act = max_act.max(h * h * c);
        }
    }
    max_act = max_act.max(h * h * 3);
    (max_act, h * h, max_c)
}

impl<T: Storage> Workspace<T> {
    fn new(gpu: &Gpu, cfg: &DecoderConfig, batch: usize, s: usize) -> Result<Workspace<T>> {
        let (max_act, max_hw, max_c) = plan(cfg, s);
        let n = s * s;
        let side = s * cfg.stride();
        let act = batch * max_act;
        Ok(Workspace {
            batch,
            s,
            side,
            tokens: gpu.zeros(batch * n)?,
            z: gpu.zeros(batch * n * cfg.embed_dim)?,
            x: [gpu.zeros(act)?, gpu.zeros(act)?],
            h: gpu.zeros(act)?,
            t: gpu.zeros(act)?,
            gn: GnScratch::new(gpu, batch, max_hw, max_c)?,
            attn: AttnScratch::new(gpu, batch, n, cfg.ch * cfg.ch_mult[cfg.ch_mult.len() - 1])?,
            img: gpu.zeros(batch * 3 * side * side)?,
            px: gpu.zeros(batch * 3 * side * side)?,
        })
    }
}

/// The VQ decoder on the GPU: weights uploaded once (16-bit convs, f32 biases, norms and
/// codebook), buffers allocated on the first decode of each (batch, s) and reused.
pub struct GpuDecoder {
    inner: Inner,
}

enum Inner {
    F16(Decoder<f16>),
    Bf16(Decoder<bf16>),
}

/// `dispatch!(self, d => expr)`: run `expr` with `d` the typed decoder.
macro_rules! dispatch {
    ($self:expr, $d:ident => $e:expr) => {
        match $self {
            Inner::F16($d) => $e,
            Inner::Bf16($d) => $e,
        }
    };
}

impl GpuDecoder {
    /// Upload the weights of a loaded CPU decoder, fp16 storage.
    pub fn new(gpu: &Gpu, dec: &host::DecoderWeights) -> Result<GpuDecoder> {
        GpuDecoder::with_precision(gpu, dec, Precision::F16)
    }

    /// Upload the weights of a loaded CPU decoder with the given 16-bit storage.
    pub fn with_precision(
        gpu: &Gpu,
        dec: &host::DecoderWeights,
        precision: Precision,
    ) -> Result<GpuDecoder> {
        let inner = match precision {
            Precision::F16 => Inner::F16(Decoder::new(gpu, dec)?),
            Precision::Bf16 => Inner::Bf16(Decoder::new(gpu, dec)?),
        };
        Ok(GpuDecoder { inner })
    }

    pub fn precision(&self) -> Precision {
        match self.inner {
            Inner::F16(_) => Precision::F16,
            Inner::Bf16(_) => Precision::Bf16,
        }
    }

    pub fn config(&self) -> &DecoderConfig {
        dispatch!(&self.inner, d => &d.cfg)
    }

    pub fn conv_kernel(&self) -> ConvKernel {
        dispatch!(&self.inner, d => d.conv_kernel)
    }

    /// Choose the 3x3 conv kernel (tests run both; the default is `TensorCore`).
    pub fn set_conv_kernel(&mut self, k: ConvKernel) {
        dispatch!(&mut self.inner, d => d.conv_kernel = k)
    }

    /// Image side for an s x s latent.
    pub fn side(&self, s: usize) -> usize {
        s * self.config().stride()
    }

    /// Decode host tokens (B, s, s) (raster order per image) to 8-bit pixels (B, 3, H, W).
    pub fn decode_tokens_u8(
        &self,
        gpu: &Gpu,
        tokens: &[u32],
        batch: usize,
        s: usize,
    ) -> Result<Vec<u8>> {
        dispatch!(&self.inner, d => d.decode_host(gpu, tokens, batch, s, |gpu, px, _| gpu.download(px)))
    }

    /// Decode host tokens (B, s, s) to raw images (B, 3, H, W) f32 (the CPU decoder's output).
    pub fn decode_f32(
        &self,
        gpu: &Gpu,
        tokens: &[u32],
        batch: usize,
        s: usize,
    ) -> Result<Vec<f32>> {
        dispatch!(&self.inner, d => d.decode_host(gpu, tokens, batch, s, |gpu, _, img| gpu.download(img)))
    }

    /// Decode device tokens (B, s, s) i32 to 8-bit pixels (B, 3, H, W). Tokens are not range
    /// checked on the host: an out-of-range token decodes to NaN, hence 0-valued pixels.
    pub fn decode_device_u8(
        &self,
        gpu: &Gpu,
        tokens: &CudaSlice<i32>,
        batch: usize,
        s: usize,
    ) -> Result<Vec<u8>> {
        dispatch!(&self.inner, d => d.decode_device(gpu, tokens, batch, s, true))
            .map(|v| v.unwrap())
    }

    /// Enqueue a full decode of device tokens without reading the result back (benchmarks).
    pub fn decode_device(
        &self,
        gpu: &Gpu,
        tokens: &CudaSlice<i32>,
        batch: usize,
        s: usize,
    ) -> Result<()> {
        dispatch!(&self.inner, d => d.decode_device(gpu, tokens, batch, s, false)).map(|_| ())
    }
}

/// The decoder for one storage type.
struct Decoder<T: Storage> {
    cfg: DecoderConfig,
    conv_kernel: ConvKernel,
    codebook: CudaSlice<f32>, // (V, e), as in the CPU decoder (rows normalized when `normalize`)
    post_quant_conv: ConvWeights<T>,
    conv_in: ConvWeights<T>,
    mid: (GpuResBlock<T>, AttnWeights<T>, GpuResBlock<T>),
    levels: Vec<GpuLevel<T>>,
    norm_out: GnWeights,
    conv_out: ConvWeights<T>,
    ws: Mutex<Option<Workspace<T>>>,
}

impl<T: Storage> Decoder<T> {
    fn new(gpu: &Gpu, dec: &host::DecoderWeights) -> Result<Decoder<T>> {
        let levels = dec
            .levels
            .iter()
            .map(|l| -> Result<GpuLevel<T>> {
                Ok(GpuLevel {
                    res: l
                        .res
                        .iter()
                        .map(|r| GpuResBlock::from_host(gpu, r))
                        .collect::<Result<_>>()?,
                    attn: l
                        .attn
                        .iter()
                        .map(|a| AttnWeights::from_host(gpu, a))
                        .collect::<Result<_>>()?,
                    upsample: l
                        .upsample
                        .as_ref()
                        .map(|c| ConvWeights::from_host(gpu, c))
                        .transpose()?,
                })
            })
            .collect::<Result<Vec<_>>>()
            .context("uploading decoder levels")?;
        Ok(Decoder {
            cfg: dec.cfg.clone(),
            conv_kernel: ConvKernel::TensorCore,
            codebook: gpu.upload(&dec.codebook)?,
            post_quant_conv: ConvWeights::from_host(gpu, &dec.post_quant_conv)?,
            conv_in: ConvWeights::from_host(gpu, &dec.conv_in)?,
            mid: (
                GpuResBlock::from_host(gpu, &dec.mid.0)?,
                AttnWeights::from_host(gpu, &dec.mid.1)?,
                GpuResBlock::from_host(gpu, &dec.mid.2)?,
            ),
            levels,
            norm_out: GnWeights::from_host(gpu, &dec.norm_out)?,
            conv_out: ConvWeights::from_host(gpu, &dec.conv_out)?,
            ws: Mutex::new(None),
        })
    }

    /// Decode host tokens into the workspace and hand its (pixels, image) to `read`.
    fn decode_host<R>(
        &self,
        gpu: &Gpu,
        tokens: &[u32],
        batch: usize,
        s: usize,
        read: impl FnOnce(&Gpu, &CudaSlice<u8>, &CudaSlice<f32>) -> Result<R>,
    ) -> Result<R> {
        ensure!(
            tokens.len() == batch * s * s,
            "decode: {} tokens for (B {batch}, {s}, {s})",
            tokens.len()
        );
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= self.cfg.n_embed) {
            anyhow::bail!(
                "decode: token {t} out of range (codebook size {})",
                self.cfg.n_embed
            );
        }
        let host: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let mut guard = self.ws.lock().unwrap();
        let ws = self.workspace(gpu, &mut guard, batch, s)?;
        gpu.stream
            .memcpy_htod(&host, &mut ws.tokens)
            .context("uploading tokens")?;
        self.run(gpu, ws, None)?;
        read(gpu, &ws.px, &ws.img)
    }

    /// Decode device tokens; download the 8-bit pixels when `read`.
    fn decode_device(
        &self,
        gpu: &Gpu,
        tokens: &CudaSlice<i32>,
        batch: usize,
        s: usize,
        read: bool,
    ) -> Result<Option<Vec<u8>>> {
        let mut guard = self.ws.lock().unwrap();
        let ws = self.workspace(gpu, &mut guard, batch, s)?;
        self.run(gpu, ws, Some(tokens))?;
        read.then(|| gpu.download(&ws.px)).transpose()
    }

    fn workspace<'a>(
        &self,
        gpu: &Gpu,
        slot: &'a mut Option<Workspace<T>>,
        batch: usize,
        s: usize,
    ) -> Result<&'a mut Workspace<T>> {
        ensure!(batch > 0 && s > 0, "decode: empty batch or latent");
        if slot.as_ref().is_some_and(|w| w.batch == batch && w.s == s) {
            return Ok(slot.as_mut().unwrap());
        }
        *slot = None; // free the old buffers first
        let ws = Workspace::new(gpu, &self.cfg, batch, s)
            .with_context(|| format!("allocating decoder buffers for batch {batch}, s {s}"))?;
        Ok(slot.insert(ws))
    }

    /// The whole decoder on `tokens` (or the workspace's uploaded tokens).
    fn run(&self, gpu: &Gpu, ws: &mut Workspace<T>, tokens: Option<&CudaSlice<i32>>) -> Result<()> {
        let cfg = &self.cfg;
        let (b, s, k) = (ws.batch, ws.s, self.conv_kernel);
        let n = s * s;
        let tok = tokens.unwrap_or(&ws.tokens);
        ensure!(
            tok.len() >= b * n,
            "decode: token buffer shorter than B*s*s"
        );
        gather_codes(
            gpu,
            tok,
            &self.codebook,
            &mut ws.z,
            b * n,
            cfg.embed_dim,
            cfg.n_embed,
            cfg.normalize,
        )?;
        conv1x1(gpu, &self.post_quant_conv, &ws.z, &mut ws.h, b * n, false)?;
        cast_f32(gpu, &ws.h, &mut ws.t, b * n * cfg.z_channels)?;
        let mut cur = 0usize;
        conv3x3(
            gpu,
            k,
            &self.conv_in,
            &ws.t,
            &mut ws.x[cur],
            Residual::None,
            b,
            s,
            s,
            false,
        )
        .context("conv_in")?;
        let mut hgt = s;
        self.res_block(gpu, ws, &mut cur, &self.mid.0, hgt)
            .context("mid.0")?;
        attn_block(gpu, &self.mid.1, &mut ws.x[cur], &mut ws.attn, b, hgt * hgt)
            .context("mid.1")?;
        self.res_block(gpu, ws, &mut cur, &self.mid.2, hgt)
            .context("mid.2")?;
        for (i, level) in self.levels.iter().enumerate() {
            for (j, res) in level.res.iter().enumerate() {
                self.res_block(gpu, ws, &mut cur, res, hgt)
                    .with_context(|| format!("conv_blocks.{i}.res.{j}"))?;
                if let Some(attn) = level.attn.get(j) {
                    attn_block(gpu, attn, &mut ws.x[cur], &mut ws.attn, b, hgt * hgt)
                        .with_context(|| format!("conv_blocks.{i}.attn.{j}"))?;
                }
            }
            if let Some(up) = &level.upsample {
                let [x0, x1] = &mut ws.x;
                let (src, dst) = if cur == 0 { (x0, x1) } else { (x1, x0) };
                cast_f32(gpu, src, &mut ws.t, b * hgt * hgt * up.cin)?;
                hgt *= 2;
                conv3x3(gpu, k, up, &ws.t, dst, Residual::None, b, hgt, hgt, true)
                    .with_context(|| format!("conv_blocks.{i}.upsample"))?;
                cur = 1 - cur;
            }
        }
        debug_assert_eq!(hgt, ws.side);
        let hw = hgt * hgt;
        group_norm(
            gpu,
            &self.norm_out,
            &ws.x[cur],
            &mut ws.t,
            &mut ws.gn,
            b,
            hw,
            true,
        )
        .context("norm_out")?;
        conv3x3(
            gpu,
            k,
            &self.conv_out,
            &ws.t,
            &mut ws.h,
            Residual::None,
            b,
            hgt,
            hgt,
            false,
        )
        .context("conv_out")?;
        pixels(gpu, &ws.h, Some(&mut ws.img), Some(&mut ws.px), b, hw, 3)
    }

    /// ResBlock on the residual stream `ws.x[*cur]` (moves to the other buffer when the
    /// channel count changes).
    fn res_block(
        &self,
        gpu: &Gpu,
        ws: &mut Workspace<T>,
        cur: &mut usize,
        r: &GpuResBlock<T>,
        hgt: usize,
    ) -> Result<()> {
        let (b, hw, k) = (ws.batch, hgt * hgt, self.conv_kernel);
        let [x0, x1] = &mut ws.x;
        let (x, other) = if *cur == 0 { (x0, x1) } else { (x1, x0) };
        if let Some(nin) = &r.nin_shortcut {
            // other = nin_shortcut(x): conv2 then adds onto it in place.
            cast_f32(gpu, x, &mut ws.t, b * hw * nin.cin)?;
            conv1x1(gpu, nin, &ws.t, other, b * hw, false)?;
        }
        group_norm(gpu, &r.norm1, x, &mut ws.t, &mut ws.gn, b, hw, true)?;
        conv3x3(
            gpu,
            k,
            &r.conv1,
            &ws.t,
            &mut ws.h,
            Residual::None,
            b,
            hgt,
            hgt,
            false,
        )?;
        group_norm(gpu, &r.norm2, &ws.h, &mut ws.t, &mut ws.gn, b, hw, true)?;
        let out = if r.nin_shortcut.is_some() {
            *cur = 1 - *cur;
            other
        } else {
            x
        };
        conv3x3(
            gpu,
            k,
            &r.conv2,
            &ws.t,
            out,
            Residual::InPlace,
            b,
            hgt,
            hgt,
            false,
        )
    }
}

// ---------------------------------------------------------------------------------------------
// FLOPs and benchmark

/// Multiply-add FLOPs (2 per MAC) of one decoder stage for one image; GroupNorm, softmax and
/// other elementwise work are not counted (they are memory-bound and small in FLOPs).
#[derive(Clone, Debug)]
pub struct StageFlops {
    pub name: String,
    /// Output spatial side and channels of the stage.
    pub side: usize,
    pub channels: usize,
    pub conv3x3: f64,
    pub conv1x1: f64,
    pub attention: f64,
}

impl StageFlops {
    pub fn total(&self) -> f64 {
        self.conv3x3 + self.conv1x1 + self.attention
    }
}

/// FLOPs per decoder stage for one image from an s x s latent.
pub fn decoder_flops(cfg: &DecoderConfig, s: usize) -> Vec<StageFlops> {
    let f = |v: usize| v as f64;
    let c3 = |h: usize, ci: usize, co: usize| 2.0 * f(h * h) * 9.0 * f(ci) * f(co);
    let c1 = |h: usize, ci: usize, co: usize| 2.0 * f(h * h) * f(ci) * f(co);
    // (3x3, 1x1) of a ResBlock
    let res = |h: usize, ci: usize, co: usize| {
        let nin = if ci != co { c1(h, ci, co) } else { 0.0 };
        (c3(h, ci, co) + c3(h, co, co), nin)
    };
    // (1x1, attention matmuls) of an AttnBlock: q, k, v, proj_out; q k^T and P V.
    let attn = |h: usize, c: usize| (4.0 * c1(h, c, c), 2.0 * 2.0 * f(h * h) * f(h * h) * f(c));
    let nl = cfg.ch_mult.len();
    let mut c = cfg.ch * cfg.ch_mult[nl - 1];
    let mut h = s;
    let mut out = vec![StageFlops {
        name: "post_quant_conv + conv_in".into(),
        side: h,
        channels: c,
        conv3x3: c3(h, cfg.z_channels, c),
        conv1x1: c1(h, cfg.embed_dim, cfg.z_channels),
        attention: 0.0,
    }];
    let (r3, r1) = res(h, c, c);
    let (a1, aa) = attn(h, c);
    out.push(StageFlops {
        name: "mid (Res, Attn, Res)".into(),
        side: h,
        channels: c,
        conv3x3: 2.0 * r3,
        conv1x1: 2.0 * r1 + a1,
        attention: aa,
    });
    for i in 0..nl {
        let co = cfg.ch * cfg.ch_mult[nl - 1 - i];
        let mut st = StageFlops {
            name: format!("conv_blocks.{i}"),
            side: h,
            channels: co,
            conv3x3: 0.0,
            conv1x1: 0.0,
            attention: 0.0,
        };
        for _ in 0..=cfg.num_res_blocks {
            let (r3, r1) = res(h, c, co);
            st.conv3x3 += r3;
            st.conv1x1 += r1;
            c = co;
            if i == 0 {
                let (a1, aa) = attn(h, c);
                st.conv1x1 += a1;
                st.attention += aa;
            }
        }
        if i + 1 < nl {
            h *= 2;
            st.conv3x3 += c3(h, c, c);
            st.name = format!("conv_blocks.{i} + upsample");
            st.side = h;
        }
        out.push(st);
    }
    out.push(StageFlops {
        name: "norm_out + conv_out".into(),
        side: h,
        channels: 3,
        conv3x3: c3(h, c, 3),
        conv1x1: 0.0,
        attention: 0.0,
    });
    out
}

/// Timing of repeated full decodes of one batch (CUDA events, after warm-up).
#[derive(Clone, Debug)]
pub struct DecodeBench {
    pub device: String,
    pub precision: Precision,
    pub conv_kernel: ConvKernel,
    pub batch: usize,
    pub s: usize,
    pub side: usize,
    pub iters: usize,
    pub ms_median: f64,
    pub ms_min: f64,
    pub images_per_s: f64,
    /// Counted FLOPs (see [`decoder_flops`]) per second at the median time.
    pub tflops: f64,
}

/// Decode `iters` times a fixed pseudo-random token batch (B, s, s) after `warmup` decodes;
/// each decode is timed alone between two CUDA events.
pub fn bench_decode(
    gpu: &Gpu,
    dec: &GpuDecoder,
    batch: usize,
    s: usize,
    warmup: usize,
    iters: usize,
) -> Result<DecodeBench> {
    ensure!(iters > 0, "bench_decode: iters must be positive");
    let v = dec.config().n_embed as u64;
    let host: Vec<i32> = (0..(batch * s * s) as u64)
        .map(|i| (i.wrapping_mul(2654435761) % v) as i32)
        .collect();
    let tokens = gpu.upload(&host)?;
    for _ in 0..warmup {
        dec.decode_device(gpu, &tokens, batch, s)?;
    }
    gpu.sync()?;
    let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        let t0 = gpu.stream.record_event(flags).context("recording event")?;
        dec.decode_device(gpu, &tokens, batch, s)?;
        let t1 = gpu.stream.record_event(flags).context("recording event")?;
        ms.push(t0.elapsed_ms(&t1).context("event timing")? as f64);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let med = ms[ms.len() / 2];
    let flops: f64 = decoder_flops(dec.config(), s)
        .iter()
        .map(|st| st.total())
        .sum();
    Ok(DecodeBench {
        device: gpu.name.clone(),
        precision: dec.precision(),
        conv_kernel: dec.conv_kernel(),
        batch,
        s,
        side: dec.side(s),
        iters,
        ms_median: med,
        ms_min: ms[0],
        images_per_s: batch as f64 / (med / 1e3),
        tflops: flops * batch as f64 / (med / 1e3) / 1e12,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes of the C parameter structs as printed by tools/emu (sizeof on x86-64, the same
    /// C layout rules as nvcc's device side).
    #[test]
    fn param_structs_match_c() {
        use std::mem::size_of;
        assert_eq!(size_of::<Conv3x3Params>(), 64);
        assert_eq!(size_of::<GnPartialParams>(), 40);
        assert_eq!(size_of::<GnFinalizeParams>(), 56);
        assert_eq!(size_of::<GnApplyParams>(), 40);
        assert_eq!(size_of::<CastParams>(), 24);
        assert_eq!(size_of::<GatherCodesParams>(), 40);
        assert_eq!(size_of::<SoftmaxParams>(), 32);
        assert_eq!(size_of::<PixelsParams>(), 40);
    }

    #[test]
    fn released_decoder_flops() {
        let cfg = DecoderConfig {
            n_embed: 16384,
            ..crate::model::config::released_decoder()
        };
        let st = decoder_flops(&cfg, 16);
        let total: f64 = st.iter().map(|s| s.total()).sum();
        for s in &st {
            println!(
                "{:28} {:4}x{:<4} C {:4}: {:8.3} GFLOP (3x3 {:.3}, 1x1 {:.3}, attn {:.3})",
                s.name,
                s.side,
                s.side,
                s.channels,
                s.total() / 1e9,
                s.conv3x3 / 1e9,
                s.conv1x1 / 1e9,
                s.attention / 1e9
            );
        }
        println!("total {:.4} TFLOP per 256x256 image", total / 1e12);
        // Independently summed in PERF.md: 252.716253184 GFLOP.
        assert!((total - 252_716_253_184.0).abs() < 1.0, "{total}");
        assert_eq!(st.last().unwrap().side, 256);
        // Shapes the plan must cover: the 256x256x128 activations are the largest.
        assert_eq!(plan(&cfg, 16), (256 * 256 * 128, 256 * 256, 512));
    }
}
