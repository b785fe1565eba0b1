//! Typed launchers for kernels/decoder.cu, and the decoder's 1x1 convs and attention GEMMs
//! on cuBLAS (through `cuda::gemm`). Layouts: NHWC activations (see the module comment of `cuda::decoder`).

use super::weights::{
    AttnWeights, ConvKernel, ConvWeights, GN_CHUNK, GnWeights, Storage, TC_TILE, i32_of, pick,
    pick3,
};
use crate::cuda::Traffic;
use crate::cuda::embed::Codebook;
use crate::cuda::gemm::{GemmCall, Op, Operand, gemm};
use crate::cuda::{DevBuf, DevElem, Gpu, k, norm, row_grid, stride_grid};
use crate::model::autoenc::{GN_EPS, GN_GROUPS};
use anyhow::{Context, Result, ensure};
use cudarc::cublaslt::sys;

// ---------------------------------------------------------------------------------------------
// Convolutions

kernel_params! {
    /// The parameters of kernels/decoder.cu's `Conv3x3Params`.
    struct Conv3x3Params {
        x: u64,
        w: u64,
        bias: u64,
        residual: u64,
        y: u64,
        ss: u64,
        stats: u64,
        batch: i32,
        height: i32,
        width: i32,
        cin: i32,
        cout: i32,
        upsample: i32,
        silu: i32,
        pad_: i32,
    }
}

/// Output channels up to which the fast path runs `conv3x3_narrow` (one thread per pixel, all
/// channels) instead of the 128-wide tensor-core tile; kernels/decoder.cu NARROW_MAX_COUT.
const NARROW_MAX_COUT: usize = crate::cuda::c_defines::decoder::NARROW_MAX_COUT;
/// Weight bytes `conv3x3_narrow` stages in shared memory; kernels/decoder.cu NARROW_W_BYTES.
const NARROW_W_BYTES: usize = crate::cuda::c_defines::decoder::NARROW_W_BYTES;

/// What a conv epilogue adds after the bias (in the output's type O).
pub enum Residual<'a, O: DevElem = f32> {
    None,
    /// `y += conv(x) + bias`: the output buffer already holds the residual.
    InPlace,
    /// `y = conv(x) + bias + r`, `r` shaped like `y`.
    Add(&'a DevBuf<O>),
}

impl<O: DevElem> Clone for Residual<'_, O> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<O: DevElem> Copy for Residual<'_, O> {}

/// GroupNorm fused into a 3x3 conv (the scratch's buffers, see [`GnScratch`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConvGn {
    /// Normalize the input on load with the per-(image, channel) scale and shift that
    /// [`gn_finalize`] left in the scratch, then SiLU when `Some(true)`; rounded to T, as a
    /// separate GroupNorm kernel would have stored it. Zero padding stays zero.
    pub apply: Option<bool>,
    /// Leave the output's GroupNorm statistics in the scratch (chunks of [`GN_CHUNK`]
    /// pixels, for [`gn_finalize`]): from the tensor-core kernel's epilogue when every
    /// 128-row tile lies in one image (H*W % 128 == 0), else by [`gn_stats`] after the conv.
    pub stats: bool,
}

/// How a 3x3 conv's input relates to its (H, W) output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resample {
    /// x (B, H, W, Cin), padding 1.
    Same,
    /// x (B, H/2, W/2, Cin) read through a nearest x2 upsample, padding 1 on the upsampled
    /// image (the decoder's Upsample).
    Up,
    /// x (B, 2H, 2W, Cin) zero-padded right and bottom by 1, stride 2 (the encoder's
    /// Downsample, `cpu::ops::conv2d_down`: `conv3x3_down_{direct,tc}`).
    Down,
}

/// `y (B, H, W, Cout) O = conv3x3(x') + bias (+ residual)` with x as `mode` says, x' = x or
/// its fused GroupNorm (`gn`), O = T (the tensor-core path) or f32 (conv_out: the narrow
/// path). `TensorCore` falls back to `Direct` when Cin is not a multiple of 32 (and always
/// for f32 storage).
#[allow(clippy::too_many_arguments)]
pub fn conv3x3<T: Storage, O: Storage>(
    gpu: &Gpu,
    kernel: ConvKernel,
    conv: &ConvWeights<T>,
    x: &DevBuf<T>,
    y: &mut DevBuf<O>,
    residual: Residual<O>,
    batch: usize,
    height: usize,
    width: usize,
    mode: Resample,
    gn: Option<(&mut GnScratch, ConvGn)>,
) -> Result<()> {
    let (cin, cout) = (conv.cin, conv.cout);
    ensure!(conv.k == 3, "conv3x3 given a {}x{} conv", conv.k, conv.k);
    ensure!(
        O::TAG == T::TAG || O::TAG == "f32",
        "conv3x3: {} output from {} storage",
        O::TAG,
        T::TAG
    );
    ensure!(
        mode != Resample::Up || (height.is_multiple_of(2) && width.is_multiple_of(2)),
        "upsampled conv output {height}x{width} must be even"
    );
    let (hin, win) = match mode {
        Resample::Same => (height, width),
        Resample::Up => (height / 2, width / 2),
        Resample::Down => (2 * height, 2 * width),
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
    let (scratch, fuse) = match gn {
        Some((s, f)) => (Some(s), f),
        None => (None, ConvGn::default()),
    };
    let ss = match (fuse.apply, &scratch) {
        (None, _) => 0,
        (Some(_), Some(s)) => {
            ensure!(
                mode != Resample::Down,
                "conv3x3: no fused GroupNorm on a downsampling conv"
            );
            ensure!(
                s.ss.len() >= batch * cin * 2,
                "conv3x3: GroupNorm scale/shift for fewer than {batch} x {cin} channels"
            );
            gpu.ptr(&s.ss)
        }
        (Some(_), None) => unreachable!("ConvGn without a scratch"),
    };
    let fast = kernel == ConvKernel::TensorCore;
    let out32 = O::TAG == "f32";
    let down = mode == Resample::Down;
    let narrow = fast
        && out32
        && !down
        && cout <= NARROW_MAX_COUT
        && cout * 9 * cin * size_of::<T>() <= NARROW_W_BYTES;
    // f32 storage has no tensor-core kernel: it runs the direct (and narrow) ones.
    let tensor_cores =
        !narrow && fast && T::TAG != "f32" && O::TAG == T::TAG && cin.is_multiple_of(32);
    let hw = height * width;
    let fused_stats = fuse.stats && tensor_cores && hw.is_multiple_of(GN_CHUNK);
    let stats_ptr = match (&scratch, fused_stats) {
        (Some(s), true) => {
            ensure!(
                s.part.len() >= batch * (hw / GN_CHUNK) * cout * 2,
                "conv3x3: GroupNorm statistics scratch too small"
            );
            gpu.ptr(&s.part)
        }
        _ => 0,
    };
    let p = Conv3x3Params {
        x: gpu.ptr(x),
        w: gpu.ptr(&conv.w),
        bias: gpu.ptr(&conv.b),
        residual: res_ptr,
        y: gpu.ptr(y),
        ss,
        stats: stats_ptr,
        batch: i32_of(batch, "batch")?,
        height: i32_of(height, "height")?,
        width: i32_of(width, "width")?,
        cin: i32_of(cin, "cin")?,
        cout: i32_of(cout, "cout")?,
        upsample: (mode == Resample::Up) as i32,
        silu: (fuse.apply == Some(true)) as i32,
        pad_: 0,
    };
    i32_of(m, "B*H*W")?;
    i32_of(batch * hin * win * cin, "B*Hin*Win*Cin")?;
    // x, the weights and bias, the residual, the GroupNorm scale/shift once each; y and the
    // statistics written; 2 * 9 * Cin MACs per output.
    let res_bytes = if res_ptr != 0 {
        m * cout * size_of::<O>()
    } else {
        0
    };
    let ss_bytes = if ss != 0 { batch * cin * 2 * 4 } else { 0 };
    let stats_bytes = if stats_ptr != 0 {
        batch * (hw / GN_CHUNK) * cout * 2 * 4
    } else {
        0
    };
    let traffic = Traffic::new(
        batch * hin * win * cin * size_of::<T>()
            + conv.w.bytes()
            + conv.b.bytes()
            + res_bytes
            + ss_bytes,
        m * cout * size_of::<O>() + stats_bytes,
        2 * m * cout * 9 * cin,
    );
    if narrow {
        let narrow = pick3::<T>(
            k::CONV3X3_NARROW_BF16,
            k::CONV3X3_NARROW_F16,
            k::CONV3X3_NARROW_F32,
        );
        gpu.launch_256(narrow, (stride_grid(m), 1, 1), &p, traffic)?;
    } else if tensor_cores {
        let tc = match (down, fuse.apply.is_some()) {
            (true, _) => pick::<T>(k::CONV3X3_DOWN_TC_BF16, k::CONV3X3_DOWN_TC_F16),
            (false, false) => pick::<T>(k::CONV3X3_TC_BF16, k::CONV3X3_TC_F16),
            (false, true) => pick::<T>(k::CONV3X3_TC_GN_BF16, k::CONV3X3_TC_GN_F16),
        };
        let grid = (m.div_ceil(TC_TILE) as u32, cout.div_ceil(TC_TILE) as u32, 1);
        gpu.launch_256(tc, grid, &p, traffic)?;
    } else {
        let direct = match (down, out32 && T::TAG != "f32") {
            (true, false) => pick3::<T>(
                k::CONV3X3_DOWN_DIRECT_BF16,
                k::CONV3X3_DOWN_DIRECT_F16,
                k::CONV3X3_DOWN_DIRECT_F32,
            ),
            (true, true) => anyhow::bail!("conv3x3: no f32-output downsampling conv"),
            (false, false) => pick3::<T>(
                k::CONV3X3_DIRECT_BF16,
                k::CONV3X3_DIRECT_F16,
                k::CONV3X3_DIRECT_F32,
            ),
            (false, true) => pick::<T>(k::CONV3X3_DIRECT_OUT32_BF16, k::CONV3X3_DIRECT_OUT32_F16),
        };
        gpu.launch_256(direct, (stride_grid(m * cout), 1, 1), &p, traffic)?;
    }
    if fuse.stats && !fused_stats {
        let s = scratch.context("ConvGn statistics without a scratch")?;
        gn_stats(gpu, y, s, batch, hw, cout)?;
    }
    Ok(())
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

/// Where a 1x1 conv writes (rows, Cout), and what it adds to the GEMM `x w^T` (see
/// [`conv1x1`]).
pub enum Conv1x1Out<'a, T: Storage> {
    /// `y f32 = x w^T + bias`, or `y += ...` with `accumulate`: the GEMM, then the bias kernel.
    F32 {
        y: &'a mut DevBuf<f32>,
        accumulate: bool,
    },
    /// `y T = T(x w^T + bias (+ y when `residual`))`: the GEMM into the f32 `tmp`, then
    /// [`bias_cast`] (one rounding).
    Cast {
        tmp: &'a mut DevBuf<f32>,
        y: &'a mut DevBuf<T>,
        residual: bool,
    },
    /// `y T = T(x w^T)`, the bias NOT added: a ResBlock's nin_shortcut, whose bias the block's
    /// conv2 adds (folded into conv2's bias at load).
    NoBias(&'a mut DevBuf<T>),
}

/// A 1x1 conv on NHWC activations `x (rows, Cin) T` through cuBLAS, into `out`.
pub fn conv1x1<T: Storage>(
    gpu: &Gpu,
    conv: &ConvWeights<T>,
    x: &DevBuf<T>,
    rows: usize,
    out: Conv1x1Out<'_, T>,
) -> Result<()> {
    let (cin, cout) = (conv.cin, conv.cout);
    ensure!(conv.k == 1, "conv1x1 given a {}x{} conv", conv.k, conv.k);
    ensure!(rows > 0, "conv1x1: no rows");
    ensure!(
        x.len() >= rows * cin,
        "conv1x1 input: {} values (need {})",
        x.len(),
        rows * cin
    );
    let f32_out = sys::cudaDataType::CUDA_R_32F;
    // The GEMM's output (address, data type, length) and beta.
    let (y_ptr, y_dtype, y_len, beta) = match &out {
        Conv1x1Out::F32 { y, accumulate } => {
            let beta = if *accumulate { 1.0 } else { 0.0 };
            (gpu.ptr(&**y), f32_out, y.len(), beta)
        }
        Conv1x1Out::Cast { tmp, .. } => (gpu.ptr(&**tmp), f32_out, tmp.len(), 0.0),
        Conv1x1Out::NoBias(y) => (gpu.ptr(&**y), T::CUDA, y.len(), 0.0),
    };
    ensure!(
        y_len >= rows * cout,
        "conv1x1 output: {y_len} values (need {})",
        rows * cout
    );
    // Row-major y (rows, Cout) = x (rows, Cin) w^T is column-major y^T (Cout x rows) =
    // op(A) B with A = w viewed column-major (Cin x Cout, lda Cin) transposed and
    // B = x viewed column-major (Cin x rows, ldb Cin), as gemm.rs `linear`.
    gemm(
        gpu,
        GemmCall::strided(
            Op::CUBLAS_OP_T,
            (cout, rows, cin),
            [
                operand::<T>(gpu.ptr(&conv.w), cin, 0),
                operand::<T>(gpu.ptr(x), cin, 0),
                Operand {
                    ptr: y_ptr,
                    dtype: y_dtype,
                    ld: cout,
                    stride: 0,
                },
            ],
            beta,
            1,
        ),
    )
    .context("1x1 conv GEMM")?;
    match out {
        Conv1x1Out::F32 { y, .. } => norm::add_bias_f32(gpu, y, &conv.b, rows, cout),
        Conv1x1Out::Cast { tmp, y, residual } => {
            bias_cast(gpu, tmp, Some(&conv.b), residual, y, rows, cout)
        }
        Conv1x1Out::NoBias(_) => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// GroupNorm

kernel_params! {
    /// The parameters of kernels/decoder.cu's `GnPartialParams`.
    struct GnPartialParams {
        x: u64,
        part: u64,
        batch: i32,
        hw: i32,
        c: i32,
        chunk: i32,
        nchunk: i32,
    }
}

kernel_params! {
    /// The parameters of kernels/decoder.cu's `GnFinalizeParams`.
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
}

kernel_params! {
    /// The parameters of kernels/decoder.cu's `GnApplyParams`.
    struct GnApplyParams {
        x: u64,
        ss: u64,
        y: u64,
        batch: i32,
        hw: i32,
        c: i32,
        silu: i32,
    }
}

/// Statistics scratch of [`group_norm`] for up to (batch, max_hw, max_c).
pub struct GnScratch {
    part: DevBuf<f32>, // (B, ceil(hw / GN_CHUNK), C, 2): per chunk and channel (mean, M2)
    ss: DevBuf<f32>,   // (B, C, 2): per channel (scale, shift)
}

/// The shape of a GroupNorm's statistics and finishing passes in the kernels' 32-bit ints:
/// (B, hw, C) and the chunks of [`GN_CHUNK`] pixels ([`GnScratch::dims`]).
struct GnDims {
    batch: i32,
    hw: i32,
    c: i32,
    chunk: i32,
    nchunk: i32,
}

/// `$name { fields given.., batch, hw, c, chunk, nchunk }` with the last five from a
/// [`GnDims`]: the parameter structs of [`gn_stats`] and [`gn_finalize`] (GnPartialParams,
/// GnFinalizeParams) share them.
macro_rules! with_gn_dims {
    ($name:ident { $($f:ident: $v:expr),* $(,)? }, $dims:expr) => {{
        let d: GnDims = $dims;
        $name { $($f: $v,)* batch: d.batch, hw: d.hw, c: d.c, chunk: d.chunk, nchunk: d.nchunk }
    }};
}

impl GnScratch {
    /// The checks [`gn_stats`] and [`gn_finalize`] share: a nonempty (B <= 65535, hw), C
    /// channels, and room in the scratch for its chunk statistics.
    fn dims(&self, batch: usize, hw: usize, c: usize) -> Result<GnDims> {
        let nchunk = hw.div_ceil(GN_CHUNK);
        ensure!(batch > 0 && hw > 0, "group norm: empty input");
        ensure!(batch <= 65535, "group norm: batch {batch} > 65535");
        ensure!(
            self.part.len() >= batch * nchunk * c * 2,
            "group norm scratch too small for (B {batch}, hw {hw}, C {c})"
        );
        Ok(GnDims {
            batch: i32_of(batch, "batch")?,
            hw: i32_of(hw, "hw")?,
            c: i32_of(c, "C")?,
            chunk: GN_CHUNK as i32,
            nchunk: nchunk as i32,
        })
    }

    /// The per-(image, channel) (scale, shift) of the last [`gn_finalize`], (B, C, 2).
    pub fn scale_shift(&self) -> &DevBuf<f32> {
        &self.ss
    }

    pub fn new(gpu: &Gpu, batch: usize, max_hw: usize, max_c: usize) -> Result<GnScratch> {
        Ok(GnScratch {
            part: gpu.alloc(batch * max_hw.div_ceil(GN_CHUNK) * max_c * 2)?,
            ss: gpu.alloc(batch * max_c * 2)?,
        })
    }
}

/// The statistics pass of a GroupNorm: per chunk of [`GN_CHUNK`] pixels and channel of
/// x (B, hw, C) T, (mean, M2) into the scratch (what a fused conv epilogue writes too).
pub fn gn_stats<T: Storage>(
    gpu: &Gpu,
    x: &DevBuf<T>,
    scratch: &mut GnScratch,
    batch: usize,
    hw: usize,
    c: usize,
) -> Result<()> {
    let nchunk = hw.div_ceil(GN_CHUNK);
    let dims = scratch.dims(batch, hw, c)?;
    ensure!(
        c.is_multiple_of(4) && c <= 1024,
        "group norm: {c} channels (a multiple of 4, at most 1024)"
    );
    ensure!(
        x.len() >= batch * hw * c,
        "group norm input: {} values, need {}",
        x.len(),
        batch * hw * c
    );
    i32_of(batch * hw * c, "B*hw*C")?;
    let pp = with_gn_dims!(
        GnPartialParams {
            x: gpu.ptr(x),
            part: gpu.ptr(&scratch.part),
        },
        dims
    );
    let t = Traffic::new(
        batch * hw * c * size_of::<T>(),
        batch * nchunk * c * 2 * 4,
        3 * batch * hw * c,
    );
    let kernel = pick3::<T>(k::GN_PARTIAL_BF16, k::GN_PARTIAL_F16, k::GN_PARTIAL_F32);
    gpu.launch_256(kernel, (nchunk as u32, batch as u32, 1), &pp, t)
}

/// The finishing pass of a GroupNorm (32 groups, eps 1e-6, biased variance): the chunk
/// statistics in the scratch -> per-(image, channel) (scale, shift) in the scratch, for
/// [`gn_apply`] or a conv that applies it on load ([`ConvGn`]).
pub fn gn_finalize(
    gpu: &Gpu,
    gn: &GnWeights,
    scratch: &mut GnScratch,
    batch: usize,
    hw: usize,
) -> Result<()> {
    let c = gn.c;
    let nchunk = hw.div_ceil(GN_CHUNK);
    let dims = scratch.dims(batch, hw, c)?;
    ensure!(
        scratch.ss.len() >= batch * c * 2,
        "group norm scratch too small for (B {batch}, C {c})"
    );
    let fp = with_gn_dims!(
        GnFinalizeParams {
            part: gpu.ptr(&scratch.part),
            gamma: gpu.ptr(&gn.gamma),
            beta: gpu.ptr(&gn.beta),
            ss: gpu.ptr(&scratch.ss),
            eps: GN_EPS,
        },
        dims
    );
    let partb = batch * nchunk * c * 2 * 4;
    let t = Traffic::new(partb + 2 * c * 4, batch * c * 2 * 4, 8 * batch * nchunk * c);
    gpu.launch_256(
        k::GN_FINALIZE_F32,
        (GN_GROUPS as u32, batch as u32, 1),
        &fp,
        t,
    )
}

/// `y (B, hw, C) T = x * scale + shift` per (image, channel) from the scratch (then SiLU
/// when `silu`), x (B, hw, C) T.
#[allow(clippy::too_many_arguments)]
pub fn gn_apply<T: Storage>(
    gpu: &Gpu,
    x: &DevBuf<T>,
    y: &mut DevBuf<T>,
    scratch: &GnScratch,
    batch: usize,
    hw: usize,
    c: usize,
    silu: bool,
) -> Result<()> {
    ensure!(
        x.len() >= batch * hw * c && y.len() >= batch * hw * c,
        "group norm buffers: x {}, y {}, need {}",
        x.len(),
        y.len(),
        batch * hw * c
    );
    ensure!(
        scratch.ss.len() >= batch * c * 2,
        "group norm scale/shift too small"
    );
    let ap = GnApplyParams {
        x: gpu.ptr(x),
        ss: gpu.ptr(&scratch.ss),
        y: gpu.ptr(y),
        batch: i32_of(batch, "batch")?,
        hw: i32_of(hw, "hw")?,
        c: i32_of(c, "C")?,
        silu: silu as i32,
    };
    let n = batch * hw * c;
    gpu.launch_256(
        pick3::<T>(k::GN_APPLY_BF16, k::GN_APPLY_F16, k::GN_APPLY_F32),
        row_grid(hw * c / 4, batch)?,
        &ap,
        Traffic::new(
            n * size_of::<T>() + batch * c * 2 * 4,
            n * size_of::<T>(),
            6 * n,
        ),
    )
}

/// `y (B, hw, C) T = GroupNorm(x) (then SiLU when `silu`)`, x (B, hw, C) T; 32 groups,
/// eps 1e-6, biased variance, f32 statistics. Three launches: [`gn_stats`],
/// [`gn_finalize`], [`gn_apply`].
#[allow(clippy::too_many_arguments)]
pub fn group_norm<T: Storage>(
    gpu: &Gpu,
    gn: &GnWeights,
    x: &DevBuf<T>,
    y: &mut DevBuf<T>,
    scratch: &mut GnScratch,
    batch: usize,
    hw: usize,
    silu: bool,
) -> Result<()> {
    gn_stats(gpu, x, scratch, batch, hw, gn.c)?;
    gn_finalize(gpu, gn, scratch, batch, hw)?;
    gn_apply(gpu, x, y, scratch, batch, hw, gn.c, silu)
}

// ---------------------------------------------------------------------------------------------
// Small kernels

kernel_params! {
    /// The parameters of kernels/decoder.cu's `BiasCastParams`.
    struct BiasCastParams {
        x: u64,
        bias: u64,
        residual: u64,
        y: u64,
        n: u64,
        c: i32,
        pad_: i32,
    }
}

/// `y (rows, c) T = T(x + bias (+ y when `residual`))`, x (rows, c) f32, bias (c): the
/// bias and residual of a 1x1 conv's f32 GEMM output, and the cast to storage, in one pass.
pub fn bias_cast<T: Storage>(
    gpu: &Gpu,
    x: &DevBuf<f32>,
    bias: Option<&DevBuf<f32>>,
    residual: bool,
    y: &mut DevBuf<T>,
    rows: usize,
    c: usize,
) -> Result<()> {
    let n = rows * c;
    ensure!(n > 0, "bias_cast: empty");
    ensure!(
        x.len() >= n && y.len() >= n,
        "bias_cast: buffers shorter than {n}"
    );
    if let Some(b) = bias {
        ensure!(b.len() >= c, "bias_cast: bias shorter than {c}");
    }
    let p = BiasCastParams {
        x: gpu.ptr(x),
        bias: bias.map_or(0, |b| gpu.ptr(b)),
        residual: if residual { gpu.ptr(y) } else { 0 },
        y: gpu.ptr(y),
        n: n as u64,
        c: i32_of(c, "c")?,
        pad_: 0,
    };
    let read = n * 4 + bias.map_or(0, |_| c * 4) + if residual { n * size_of::<T>() } else { 0 };
    gpu.launch_256(
        pick3::<T>(k::BIAS_CAST_BF16, k::BIAS_CAST_F16, k::BIAS_CAST_F32),
        (stride_grid(n), 1, 1),
        &p,
        Traffic::new(read, n * size_of::<T>(), 2 * n),
    )
}

kernel_params! {
    /// The parameters of kernels/decoder.cu's `GatherCodesParams`.
    struct GatherCodesParams {
        tokens: u64,
        codebook: u64,
        z: u64,
        rows: i32,
        e: i32,
        n_embed: i32,
        normalize: i32,
    }
}

/// `z (rows, e) T = codebook[tokens]`, each row L2-normalized (eps 1e-12) when `normalize`.
/// A token outside [0, n_embed) gives a NaN row.
/// Reads the `rows` tokens from element `tok_off` of `tokens` on (a decode that runs a batch
/// in equal passes starts each pass at its first image's tokens).
#[allow(clippy::too_many_arguments)]
pub fn gather_codes<T: Storage>(
    gpu: &Gpu,
    tokens: &DevBuf<i32>,
    tok_off: usize,
    codebook: Codebook<'_>,
    n_embed: usize,
    normalize: bool,
    z: &mut DevBuf<T>,
    rows: usize,
) -> Result<()> {
    let Codebook {
        vectors: codebook,
        e,
    } = codebook;
    ensure!(
        tokens.len() >= tok_off + rows && codebook.len() >= n_embed * e && z.len() >= rows * e,
        "gather_codes buffers"
    );
    let p = GatherCodesParams {
        tokens: gpu.ptr(tokens) + (tok_off * std::mem::size_of::<i32>()) as u64,
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
        // The tokens, the code vectors they name (at most the codebook), z written.
        Traffic::new(
            rows * 4 + (n_embed * e * 4).min(rows * e * 4),
            rows * e * size_of::<T>(),
            3 * rows * e,
        ),
    )
}

kernel_params! {
    /// The parameters of kernels/decoder.cu's `SoftmaxParams`.
    struct SoftmaxParams {
        s: u64,
        p: u64,
        rows: i32,
        n: i32,
        scale: f32,
    }
}

/// `p (rows, n) T = softmax(s * scale)` per row, s (rows, n) f32, scale > 0.
pub fn softmax_rows<T: Storage>(
    gpu: &Gpu,
    s: &DevBuf<f32>,
    p: &mut DevBuf<T>,
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
    gpu.launch_256(
        pick3::<T>(
            k::ATTN_SOFTMAX_BF16,
            k::ATTN_SOFTMAX_F16,
            k::ATTN_SOFTMAX_F32,
        ),
        (rows as u32, 1, 1),
        &prm,
        Traffic::new(rows * n * 4, rows * n * size_of::<T>(), 5 * rows * n),
    )
}

kernel_params! {
    /// The parameters of kernels/decoder.cu's `PixelsParams`.
    struct PixelsParams {
        y: u64,
        out_f32: u64,
        out_u8: u64,
        batch: i32,
        hw: i32,
        c: i32,
    }
}

/// `y (B, hw, c)` NHWC f32 -> planar (B, c, hw) f32 and/or 8-bit pixels
/// (clamp((x+1)/2, 0, 1) * 255, truncated, as `cpu::ops::pixels`).
/// Writes the outputs from element `out_off` on (a decode that runs a batch in equal passes
/// writes each pass at its first image's pixels).
#[allow(clippy::too_many_arguments)]
pub fn pixels(
    gpu: &Gpu,
    y: &DevBuf<f32>,
    out_f32: Option<&mut DevBuf<f32>>,
    out_u8: Option<&mut DevBuf<u8>>,
    out_off: usize,
    batch: usize,
    hw: usize,
    c: usize,
) -> Result<()> {
    let n = batch * hw * c;
    ensure!(y.len() >= n, "pixels: input shorter than {n}");
    let pf = match out_f32 {
        Some(o) => {
            ensure!(o.len() >= out_off + n, "pixels: f32 output too short");
            gpu.ptr(o) + (out_off * std::mem::size_of::<f32>()) as u64
        }
        None => 0,
    };
    let pu = match out_u8 {
        Some(o) => {
            ensure!(o.len() >= out_off + n, "pixels: u8 output too short");
            gpu.ptr(o) + out_off as u64
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
    let written = if pf != 0 { n * 4 } else { 0 } + if pu != 0 { n } else { 0 };
    let t = Traffic::new(n * 4, written, 3 * n);
    gpu.launch_256(k::DEC_PIXELS_F32, row_grid(hw * c, batch)?, &p, t)
}

// ---------------------------------------------------------------------------------------------
// Attention

/// Scratch of [`attn_block`] for up to (batch, n positions, c channels).
pub struct AttnScratch<T: Storage> {
    batch: usize,
    n: usize,
    c: usize,
    gn: GnScratch,
    hn: DevBuf<T>,       // (B*N, C) GroupNorm output
    qkv: DevBuf<f32>,    // (B*N, 3C) q | k | v before the bias; then proj_out's output
    qkv_h: DevBuf<T>,    // (B*N, 3C) the same in T
    scores: DevBuf<f32>, // (B, N query, N key) raw q.k
    probs: DevBuf<T>,    // (B, N, N) softmax
    att: DevBuf<T>,      // (B*N, C) P V
}

impl<T: Storage> AttnScratch<T> {
    pub fn new(gpu: &Gpu, batch: usize, n: usize, c: usize) -> Result<AttnScratch<T>> {
        Ok(AttnScratch {
            batch,
            n,
            c,
            gn: GnScratch::new(gpu, batch, n, c)?,
            hn: gpu.alloc(batch * n * c)?,
            qkv: gpu.alloc(batch * n * 3 * c)?,
            qkv_h: gpu.alloc(batch * n * 3 * c)?,
            scores: gpu.alloc(batch * n * n)?,
            probs: gpu.alloc(batch * n * n)?,
            att: gpu.alloc(batch * n * c)?,
        })
    }
}

/// `x (B, N, C) T += proj_out(softmax(q k^T / sqrt(C)) v)` with q, k, v 1x1 convs of
/// GroupNorm(x): single-head attention over the N = H*W positions of each image. The new x
/// is one rounding of x + proj_out(...) + bias (f32).
pub fn attn_block<T: Storage>(
    gpu: &Gpu,
    w: &AttnWeights<T>,
    x: &mut DevBuf<T>,
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
    let qkv_out = Conv1x1Out::Cast {
        tmp: &mut s.qkv,
        y: &mut s.qkv_h,
        residual: false,
    };
    conv1x1(gpu, &w.qkv, &s.hn, rows, qkv_out)?;
    let qkv = gpu.ptr(&s.qkv_h);
    let cb = (c * size_of::<T>()) as u64; // bytes of C values of T
    let (q, k, v) = (qkv, qkv + cb, qkv + 2 * cb);
    let ld = 3 * c;
    // The two per-image GEMMs below: D = op(A) B for each of the `batch` images, A and B in
    // T, each operand (address, ld) strided by ld * N from one image to the next.
    let per_image = |op: Op, dims, [a, b, d]: [(u64, usize); 3], d_dtype| {
        let opnd = |(ptr, ld): (u64, usize), dtype| Operand {
            ptr,
            dtype,
            ld,
            stride: ld * n,
        };
        let abd = [opnd(a, T::CUDA), opnd(b, T::CUDA), opnd(d, d_dtype)];
        gemm(gpu, GemmCall::strided(op, dims, abd, 0.0, batch))
    };
    // scores (N query, N key) row-major = column-major (key, query): S^T = K Q^T, i.e.
    // op(A) = K^T-view transposed (A = K rows, lda 3C), B = Q rows (ldb 3C).
    let scores = [(k, ld), (q, ld), (gpu.ptr(&s.scores), n)];
    per_image(
        Op::CUBLAS_OP_T,
        (n, n, c),
        scores,
        sys::cudaDataType::CUDA_R_32F,
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
    let out = [(v, ld), (gpu.ptr(&s.probs), n), (gpu.ptr(&s.att), c)];
    per_image(Op::CUBLAS_OP_N, (c, n, n), out, T::CUDA).context("attention P V")?;
    // (s.qkv, rows x 3C f32, is free again: the proj GEMM's f32 output)
    let proj_out = Conv1x1Out::Cast {
        tmp: &mut s.qkv,
        y: x,
        residual: true,
    };
    conv1x1(gpu, &w.proj, &s.att, rows, proj_out)
}
