//! Typed launchers for kernels/decoder.cu, and the decoder's 1x1 convs and attention GEMMs
//! on cuBLAS (through `cuda::gemm`). Layouts: NHWC activations (see the module above).

use super::*;
use crate::cuda::Traffic;

// ---------------------------------------------------------------------------------------------
// Convolutions

kernel_params! {
    /// The parameters of kernels/decoder.cu's `Conv3x3Params`.
    struct Conv3x3Params[64] {
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
}

/// Output channels up to which the fast path runs `conv3x3_narrow` (one thread per pixel, all
/// channels) instead of the 128-wide tensor-core tile; kernels/decoder.cu NARROW_MAX_COUT.
const NARROW_MAX_COUT: usize = 8;
/// Weight bytes `conv3x3_narrow` stages in shared memory; kernels/decoder.cu NARROW_W_BYTES.
const NARROW_W_BYTES: usize = 32768;

/// What a conv epilogue adds after the bias.
#[derive(Clone, Copy)]
pub enum Residual<'a> {
    None,
    /// `y += conv(x) + bias`: the output buffer already holds the residual.
    InPlace,
    /// `y = conv(x) + bias + r`, `r` shaped like `y`.
    Add(&'a DevBuf<f32>),
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

/// `y (B, H, W, Cout) f32 = conv3x3(x) + bias (+ residual)` with x as `mode` says.
/// `TensorCore` falls back to `Direct` when Cin is not a multiple of 32 (and always for f32
/// storage).
#[allow(clippy::too_many_arguments)]
pub fn conv3x3<T: Storage>(
    gpu: &Gpu,
    kernel: ConvKernel,
    conv: &ConvWeights<T>,
    x: &DevBuf<T>,
    y: &mut DevBuf<f32>,
    residual: Residual,
    batch: usize,
    height: usize,
    width: usize,
    mode: Resample,
) -> Result<()> {
    let (cin, cout) = (conv.cin, conv.cout);
    ensure!(conv.k == 3, "conv3x3 given a {}x{} conv", conv.k, conv.k);
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
        upsample: (mode == Resample::Up) as i32,
    };
    i32_of(m, "B*H*W")?;
    i32_of(batch * hin * win * cin, "B*Hin*Win*Cin")?;
    // x, the weights and bias, the residual once each; y written; 2 * 9 * Cin MACs per output.
    let res_bytes = if res_ptr != 0 { m * cout * 4 } else { 0 };
    let traffic = Traffic::new(
        batch * hin * win * cin * size_of::<T>() + conv.w.bytes() + conv.b.bytes() + res_bytes,
        m * cout * 4,
        2 * m * cout * 9 * cin,
    );
    let fast = kernel == ConvKernel::TensorCore;
    // f32 storage has no tensor-core kernel: it runs the direct (and narrow) ones.
    let tensor_cores = fast && T::TAG != "f32" && cin.is_multiple_of(32);
    let down = mode == Resample::Down;
    if fast && !down && cout <= NARROW_MAX_COUT && cout * 9 * cin * size_of::<T>() <= NARROW_W_BYTES
    {
        let narrow = pick3::<T>(
            k::CONV3X3_NARROW_BF16,
            k::CONV3X3_NARROW_F16,
            k::CONV3X3_NARROW_F32,
        );
        gpu.launch_256(narrow, (stride_grid(m), 1, 1), &p, traffic)
    } else if tensor_cores {
        let tc = if down {
            pick::<T>(k::CONV3X3_DOWN_TC_BF16, k::CONV3X3_DOWN_TC_F16)
        } else {
            pick::<T>(k::CONV3X3_TC_BF16, k::CONV3X3_TC_F16)
        };
        let grid = (m.div_ceil(TC_TILE) as u32, cout.div_ceil(TC_TILE) as u32, 1);
        gpu.launch_256(tc, grid, &p, traffic)
    } else {
        let direct = if down {
            pick3::<T>(
                k::CONV3X3_DOWN_DIRECT_BF16,
                k::CONV3X3_DOWN_DIRECT_F16,
                k::CONV3X3_DOWN_DIRECT_F32,
            )
        } else {
            pick3::<T>(
                k::CONV3X3_DIRECT_BF16,
                k::CONV3X3_DIRECT_F16,
                k::CONV3X3_DIRECT_F32,
            )
        };
        gpu.launch_256(direct, (stride_grid(m * cout), 1, 1), &p, traffic)
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
    x: &DevBuf<T>,
    y: &mut DevBuf<f32>,
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
        GemmCall::strided(
            Op::CUBLAS_OP_T,
            (cout, rows, cin),
            [
                operand::<T>(gpu.ptr(&conv.w), cin, 0),
                operand::<T>(gpu.ptr(x), cin, 0),
                Operand {
                    ptr: gpu.ptr(y),
                    dtype: sys::cudaDataType::CUDA_R_32F,
                    ld: cout,
                    stride: 0,
                },
            ],
            if accumulate { 1.0 } else { 0.0 },
            1,
        ),
    )
    .context("1x1 conv GEMM")?;
    norm::add_bias_f32(gpu, y, &conv.b, rows, cout)
}

// ---------------------------------------------------------------------------------------------
// GroupNorm

kernel_params! {
    /// The parameters of kernels/decoder.cu's `GnPartialParams`.
    struct GnPartialParams[40] {
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
    struct GnFinalizeParams[56] {
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
    struct GnApplyParams[40] {
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

impl GnScratch {
    pub fn new(gpu: &Gpu, batch: usize, max_hw: usize, max_c: usize) -> Result<GnScratch> {
        Ok(GnScratch {
            part: gpu.alloc(batch * max_hw.div_ceil(GN_CHUNK) * max_c * 2)?,
            ss: gpu.alloc(batch * max_c * 2)?,
        })
    }
}

/// `y (B, hw, C) T = GroupNorm(x) (then SiLU when `silu`)`, x (B, hw, C) f32; 32 groups,
/// eps 1e-6, biased variance, f32 statistics. Three launches: partial, finalize, apply.
#[allow(clippy::too_many_arguments)]
pub fn group_norm<T: Storage>(
    gpu: &Gpu,
    gn: &GnWeights,
    x: &DevBuf<f32>,
    y: &mut DevBuf<T>,
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
    let (xb, ssb) = (batch * hw * c * 4, batch * c * 2 * 4);
    let partb = batch * nchunk * c * 2 * 4;
    let t = Traffic::new(xb, partb, 3 * batch * hw * c);
    gpu.launch_256(k::GN_PARTIAL_F32, (nchunk as u32, batch as u32, 1), &pp, t)?;
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
    let t = Traffic::new(partb + 2 * c * 4, ssb, 8 * batch * nchunk * c);
    gpu.launch_256(
        k::GN_FINALIZE_F32,
        (GN_GROUPS as u32, batch as u32, 1),
        &fp,
        t,
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
    gpu.launch_256(
        pick3::<T>(k::GN_APPLY_BF16, k::GN_APPLY_F16, k::GN_APPLY_F32),
        row_grid(hw * c / 4, batch)?,
        &ap,
        Traffic::new(
            xb + ssb,
            batch * hw * c * size_of::<T>(),
            6 * batch * hw * c,
        ),
    )
}

// ---------------------------------------------------------------------------------------------
// Small kernels

kernel_params! {
    /// The parameters of kernels/decoder.cu's `CastParams`.
    struct CastParams[24] {
        x: u64,
        y: u64,
        n: u64,
    }
}

/// `y[..n] = T(x[..n])` (round to nearest; an fp16 overflow gives inf).
pub fn cast_f32<T: Storage>(gpu: &Gpu, x: &DevBuf<f32>, y: &mut DevBuf<T>, n: usize) -> Result<()> {
    ensure!(
        x.len() >= n && y.len() >= n,
        "cast: buffers shorter than {n}"
    );
    let p = CastParams {
        x: gpu.ptr(x),
        y: gpu.ptr(y),
        n: n as u64,
    };
    gpu.launch_256(
        pick3::<T>(k::CAST_F32_BF16, k::CAST_F32_F16, k::CAST_F32_F32),
        (stride_grid(n), 1, 1),
        &p,
        Traffic::new(n * 4, n * size_of::<T>(), n),
    )
}

kernel_params! {
    /// The parameters of kernels/decoder.cu's `GatherCodesParams`.
    struct GatherCodesParams[40] {
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
    codebook: &DevBuf<f32>,
    z: &mut DevBuf<T>,
    rows: usize,
    e: usize,
    n_embed: usize,
    normalize: bool,
) -> Result<()> {
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
    struct SoftmaxParams[32] {
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
    struct PixelsParams[40] {
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
    qkv: DevBuf<f32>,    // (B*N, 3C) q | k | v with bias
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

/// `x (B, N, C) f32 += proj_out(softmax(q k^T / sqrt(C)) v)` with q, k, v 1x1 convs of
/// GroupNorm(x): single-head attention over the N = H*W positions of each image.
pub fn attn_block<T: Storage>(
    gpu: &Gpu,
    w: &AttnWeights<T>,
    x: &mut DevBuf<f32>,
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
    let cb = (c * size_of::<T>()) as u64; // bytes of C values of T
    let (q, k, v) = (qkv, qkv + cb, qkv + 2 * cb);
    let ld = 3 * c;
    // scores (N query, N key) row-major = column-major (key, query): S^T = K Q^T, i.e.
    // op(A) = K^T-view transposed (A = K rows, lda 3C), B = Q rows (ldb 3C).
    gemm(
        gpu,
        GemmCall::strided(
            Op::CUBLAS_OP_T,
            (n, n, c),
            [
                operand::<T>(k, ld, n * ld),
                operand::<T>(q, ld, n * ld),
                Operand {
                    ptr: gpu.ptr(&s.scores),
                    dtype: sys::cudaDataType::CUDA_R_32F,
                    ld: n,
                    stride: n * n,
                },
            ],
            0.0,
            batch,
        ),
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
        GemmCall::strided(
            Op::CUBLAS_OP_N,
            (c, n, n),
            [
                operand::<T>(v, ld, n * ld),
                operand::<T>(gpu.ptr(&s.probs), n, n * n),
                Operand {
                    ptr: gpu.ptr(&s.att),
                    dtype: T::CUDA,
                    ld: c,
                    stride: n * c,
                },
            ],
            0.0,
            batch,
        ),
    )
    .context("attention P V")?;
    conv1x1(gpu, &w.proj, &s.att, x, rows, true)
}
