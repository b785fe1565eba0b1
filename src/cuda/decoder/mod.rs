//! The VQ decoder on the GPU (SPEC.md section 7): [`GpuDecoder`] runs the whole decoder in the
//! layer order of the f32 reference (`cpu::decoder`). Files: `launch.rs` (typed launchers for
//! kernels/decoder.cu, the 1x1 convs and attention GEMMs on cuBLAS), this file (device
//! weights, workspaces, the decoder), `bench.rs` (FLOP counts and `bench_decode`).
//!
//! ```text
//! tokens (B, s, s) i32 -> gather_codes: codebook rows, L2-normalized   z (B*s*s, e) T
//!   -> post_quant_conv 1x1 (cuBLAS, f32) -> bias_cast                   (B, s, s, z_ch) T
//!   -> conv_in 3x3 (+ GroupNorm statistics in its epilogue)              x (B, s, s, C) T
//!   -> mid: Res, Attn, Res -> conv_blocks.0 .. L-1 (Res [+ Attn]) x (num_res_blocks+1),
//!      then the upsample-fused conv 3x3 (2H x 2W)
//!   -> conv_out 3x3 with GroupNorm + SiLU in its loader (f32 out) -> dec_pixels
//!                                                                 (B, 3, H, W) f32 and u8
//! ```
//! Activations are NHWC and every one is 16-bit [`Storage`] T (fp16 by default, bf16 as an
//! option, [`StorageDtype`]), the residual stream included; conv weights are T (3x3 as
//! (Cout, 3, 3, Cin), 1x1 as (Cout, Cin)); biases, norm affines and the codebook are f32;
//! accumulation f32. Why fp16 by default: on the golden decoder fp16 storage gives a relative
//! error of 2.8e-3 to 3.3e-3, bf16 2.2e-2 to 3.0e-2 (PERF.md, "VQ decoder"); the tensor-core
//! rate is the same.
//! No GroupNorm is a pass of its own where a conv can take it: the conv that writes a tensor
//! leaves its GroupNorm statistics ([`ConvGn::stats`], its epilogue), `gn_finalize` folds them
//! into a scale and shift, and the conv that reads it applies them with SiLU in its loader
//! ([`ConvGn::apply`]). Between layers, the scratch `Acts::gn` holds the statistics of the
//! residual stream.
//! ResBlock: `h = conv1(SiLU(GN1(x)))`, `x = conv2(SiLU(GN2(h))) + b + x` with the residual
//! added in the conv epilogue in place (or onto `W_nin x`, the nin_shortcut's GEMM without its
//! bias, computed first into the other residual buffer; conv2's bias holds both biases).
//! AttnBlock: GN (statistics, finalize, apply), one stacked q|k|v GEMM + bias_cast, scores and
//! P V as strided-batched cuBLAS GEMMs, row softmax kernel, proj_out GEMM + bias_cast onto x,
//! then a statistics pass over the new x.

mod bench;
pub mod encoder;
pub mod launch;

pub use bench::{DecodeBench, StageFlops, bench_decode, decoder_flops};
pub use encoder::GpuEncoder;
pub use launch::*;

use super::gemm::{GemmCall, Op, Operand, gemm};
use super::{DevBuf, DevElem, Gpu, Kernel, k, norm, row_grid, stride_grid};
use crate::model::autoenc::{self as host, GN_EPS, GN_GROUPS};
use crate::model::config::DecoderConfig;
use crate::model::decoder::DecoderWeights;
use anyhow::{Context, Result, ensure};
use cudarc::cublaslt::sys;
use half::{bf16, f16};
use std::sync::Mutex;

/// Pixels per GroupNorm statistics chunk: gn_partial's, and one 128-row tile of the
/// tensor-core conv, whose epilogue writes the same statistics (kernels/decoder.cu TC_BM).
pub const GN_CHUNK: usize = super::c_defines::decoder::TC_BM;
/// Block tile (M and N) of conv3x3_tc (kernels/decoder.cu TC_BM, TC_BN).
const TC_TILE: usize = super::c_defines::decoder::TC_BM;
const _: () = assert!(
    super::c_defines::decoder::TC_BN == TC_TILE,
    "conv3x3_tc: the launcher assumes square block tiles"
);
const _: () = assert!(
    super::c_defines::decoder::GN_GROUPS == GN_GROUPS,
    "model::autoenc::GN_GROUPS differs from kernels/decoder.cu's GN_GROUPS"
);

/// The 16-bit type of conv inputs and weights (kernels exist for both, suffix `_bf16`/`_f16`).
pub trait Storage: DevElem {
    /// Kernel-name suffix.
    const TAG: &'static str;
    /// cuBLAS data type.
    const CUDA: sys::cudaDataType;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

/// `impl Storage` for a `half` type.
macro_rules! storage {
    ($t:ident, $tag:literal, $cuda:ident) => {
        impl Storage for $t {
            const TAG: &'static str = $tag;
            const CUDA: sys::cudaDataType = sys::cudaDataType::$cuda;
            fn from_f32(v: f32) -> Self {
                $t::from_f32(v)
            }
            fn to_f32(self) -> f32 {
                $t::to_f32(self)
            }
        }
    };
}
storage!(bf16, "bf16", CUDA_R_16BF);
storage!(f16, "f16", CUDA_R_16F);

/// f32 "storage": the encoder's exact mode (kernels without tensor cores only; the conv
/// launchers run the direct kernels for it).
impl Storage for f32 {
    const TAG: &'static str = "f32";
    const CUDA: sys::cudaDataType = sys::cudaDataType::CUDA_R_32F;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

/// Which 16-bit storage a [`GpuDecoder`] uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageDtype {
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
    /// falls back to v1 for other Cin), and `conv3x3_narrow` for convs of at most 8 output
    /// channels (conv_out), where the 128-wide tile would be nearly all padding.
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

/// The `_bf16` or `_f16` instance of a kernel, by storage type.
fn pick<T: Storage>(bf16: Kernel, f16: Kernel) -> Kernel {
    match T::TAG {
        "bf16" => bf16,
        "f16" => f16,
        other => unreachable!("no kernels for storage {other}"),
    }
}

/// The `_bf16`, `_f16` or `_f32` instance of a kernel that has all three.
fn pick3<T: Storage>(bf16: Kernel, f16: Kernel, f32: Kernel) -> Kernel {
    match T::TAG {
        "f32" => f32,
        _ => pick::<T>(bf16, f16),
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
    w: DevBuf<T>,
    b: DevBuf<f32>,
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
    gamma: DevBuf<f32>,
    beta: DevBuf<f32>,
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
// The decoder

struct GpuResBlock<T: Storage> {
    norm1: GnWeights,
    conv1: ConvWeights<T>,
    norm2: GnWeights,
    conv2: ConvWeights<T>,
    nin_shortcut: Option<ConvWeights<T>>,
}

impl<T: Storage> GpuResBlock<T> {
    /// With a nin_shortcut, conv2's device bias is conv2.bias + nin_shortcut.bias: the block
    /// computes `x' = conv2(t) + b2 + (W_nin x + b_nin)` as conv2 with the summed bias onto
    /// `W_nin x` (the shortcut's GEMM writes 16-bit values without a bias pass).
    fn from_host(gpu: &Gpu, r: &host::ResBlock) -> Result<GpuResBlock<T>> {
        let c2 = &r.conv2;
        let bias2: Vec<f32> = match &r.nin_shortcut {
            Some(nin) => {
                ensure!(
                    nin.bias.len() == c2.bias.len(),
                    "nin_shortcut bias {} vs conv2 bias {}",
                    nin.bias.len(),
                    c2.bias.len()
                );
                c2.bias.iter().zip(&nin.bias).map(|(a, b)| a + b).collect()
            }
            None => c2.bias.clone(),
        };
        Ok(GpuResBlock {
            norm1: GnWeights::from_host(gpu, &r.norm1)?,
            conv1: ConvWeights::from_host(gpu, &r.conv1)?,
            norm2: GnWeights::from_host(gpu, &r.norm2)?,
            conv2: ConvWeights::new(gpu, c2.cin, c2.cout, c2.k, &c2.weight, &bias2)?,
            nin_shortcut: r
                .nin_shortcut
                .as_ref()
                .map(|c| ConvWeights::from_host(gpu, c))
                .transpose()?,
        })
    }
}

/// One resolution level of the decoder or the encoder: ResBlocks, their AttnBlocks (none, or
/// one per ResBlock), and the level's resampling conv (the decoder's upsample, the encoder's
/// downsample).
struct GpuLevel<T: Storage> {
    res: Vec<GpuResBlock<T>>,
    attn: Vec<AttnWeights<T>>,
    resample: Option<ConvWeights<T>>,
}

impl<T: Storage> GpuLevel<T> {
    fn from_host(
        gpu: &Gpu,
        res: &[host::ResBlock],
        attn: &[host::AttnBlock],
        resample: Option<&host::Conv>,
    ) -> Result<GpuLevel<T>> {
        Ok(GpuLevel {
            res: res
                .iter()
                .map(|r| GpuResBlock::from_host(gpu, r))
                .collect::<Result<_>>()?,
            attn: attn
                .iter()
                .map(|a| AttnWeights::from_host(gpu, a))
                .collect::<Result<_>>()?,
            resample: resample
                .map(|c| ConvWeights::from_host(gpu, c))
                .transpose()?,
        })
    }
}

/// Device buffers for one (batch, s); see the module comment for what flows through them.
/// The batch is decoded in equal passes of at most `chunk` images (one pass when it fits the
/// kernels' int32 indexing and the memory, `GpuDecoder::max_batch`): tokens and pixels are
/// the whole batch's, codes and activations one pass's, so every batch decodes in one launch
/// sequence (inside the sampler's graph) on one workspace.
struct Workspace<T: Storage> {
    batch: usize,
    chunk: usize,
    s: usize,
    side: usize,
    tokens: DevBuf<i32>, // (B, s, s)
    z: DevBuf<T>,        // (chunk*s*s, e)
    a: Acts<T>,          // chunk images'
    img: DevBuf<f32>,    // (B, 3, side, side)
    px: DevBuf<u8>,      // (B, 3, side, side)
}

/// The activation buffers the layers of the decoder and the encoder run on, all in the
/// storage type T but the f32 scratch `f`.
struct Acts<T: Storage> {
    x: [DevBuf<T>; 2], // residual stream ping-pong, (B, H, W, C) up to max_act per image
    h: DevBuf<T>,      // conv1 outputs (and the encoder's conv_out output)
    t: DevBuf<T>,      // conv_in's input: the decoder's post_quant output, the encoder's image
    f: DevBuf<f32>,    // the post_quant GEMM output, the decoder's conv_out output (f32)
    /// GroupNorm statistics and scale/shift: between layers it holds the statistics of the
    /// residual stream x[cur] (every producer of x leaves them; see `res_block`).
    gn: GnScratch,
    attn: AttnScratch<T>, // the attention blocks (at the lowest resolution)
}

/// Per-image element counts of the buffers of [`Acts`].
struct ActsPlan {
    max_act: usize,
    t: usize,
    f: usize,
    max_hw: usize,
    max_c: usize,
    attn_n: usize,
    attn_c: usize,
}

impl<T: Storage> Acts<T> {
    fn new(gpu: &Gpu, batch: usize, p: &ActsPlan) -> Result<Acts<T>> {
        let act = batch * p.max_act;
        Ok(Acts {
            x: [gpu.alloc(act)?, gpu.alloc(act)?],
            h: gpu.alloc(act)?,
            t: gpu.alloc(batch * p.t.max(1))?,
            f: gpu.alloc(batch * p.f.max(1))?,
            gn: GnScratch::new(gpu, batch, p.max_hw, p.max_c)?,
            attn: AttnScratch::new(gpu, batch, p.attn_n, p.attn_c)?,
        })
    }

    /// A ResBlock on the residual stream `x[*cur]` of `b` images of hgt x hgt, whose
    /// GroupNorm statistics are in `gn` (left by x's producer): `h = conv1(SiLU(GN1(x)))`,
    /// `x = conv2(SiLU(GN2(h))) + b + x`, each GroupNorm applied in the conv's loader from
    /// the statistics the previous conv's epilogue left; the residual is added in conv2's
    /// epilogue in place, or onto `W_nin x` (computed first into the other buffer, which
    /// becomes the stream; conv2's bias includes the shortcut's). Leaves the new x's
    /// statistics in `gn`.
    fn res_block(
        &mut self,
        gpu: &Gpu,
        k: ConvKernel,
        cur: &mut usize,
        r: &GpuResBlock<T>,
        b: usize,
        hgt: usize,
    ) -> Result<()> {
        let hw = hgt * hgt;
        let [x0, x1] = &mut self.x;
        let (x, other) = if *cur == 0 { (x0, x1) } else { (x1, x0) };
        let (h, gn) = (&mut self.h, &mut self.gn);
        if let Some(nin) = &r.nin_shortcut {
            conv1x1_nobias(gpu, nin, x, other, b * hw)?;
        }
        let fused = ConvGn {
            apply: Some(true),
            stats: true,
        };
        let same = Resample::Same;
        gn_finalize(gpu, &r.norm1, gn, b, hw)?;
        conv3x3(
            gpu,
            k,
            &r.conv1,
            x,
            h,
            Residual::None,
            b,
            hgt,
            hgt,
            same,
            Some((gn, fused)),
        )?;
        gn_finalize(gpu, &r.norm2, gn, b, hw)?;
        let out = if r.nin_shortcut.is_some() {
            *cur = 1 - *cur;
            other
        } else {
            x
        };
        let res = Residual::InPlace;
        conv3x3(
            gpu,
            k,
            &r.conv2,
            h,
            out,
            res,
            b,
            hgt,
            hgt,
            same,
            Some((gn, fused)),
        )
    }

    /// An AttnBlock on x[cur] (its own GroupNorm statistics pass), then the new x's
    /// statistics into `gn`.
    fn attn(
        &mut self,
        gpu: &Gpu,
        cur: usize,
        w: &AttnWeights<T>,
        b: usize,
        n: usize,
    ) -> Result<()> {
        attn_block(gpu, w, &mut self.x[cur], &mut self.attn, b, n)?;
        gn_stats(gpu, &self.x[cur], &mut self.gn, b, n, w.c)
    }

    /// A level's ResBlocks, each followed by its AttnBlock when the level has them (`name`
    /// for the error context, e.g. `conv_blocks.2`).
    #[allow(clippy::too_many_arguments)]
    fn level_blocks(
        &mut self,
        gpu: &Gpu,
        k: ConvKernel,
        cur: &mut usize,
        level: &GpuLevel<T>,
        b: usize,
        hgt: usize,
        name: &str,
    ) -> Result<()> {
        for (j, res) in level.res.iter().enumerate() {
            self.res_block(gpu, k, cur, res, b, hgt)
                .with_context(|| format!("{name}.res.{j}"))?;
            if let Some(attn) = level.attn.get(j) {
                self.attn(gpu, *cur, attn, b, hgt * hgt)
                    .with_context(|| format!("{name}.attn.{j}"))?;
            }
        }
        Ok(())
    }

    /// The mid blocks: ResBlock, AttnBlock, ResBlock.
    fn mid(
        &mut self,
        gpu: &Gpu,
        k: ConvKernel,
        cur: &mut usize,
        mid: &(GpuResBlock<T>, AttnWeights<T>, GpuResBlock<T>),
        b: usize,
        hgt: usize,
    ) -> Result<()> {
        self.res_block(gpu, k, cur, &mid.0, b, hgt)
            .context("mid.0")?;
        self.attn(gpu, *cur, &mid.1, b, hgt * hgt)
            .context("mid.1")?;
        self.res_block(gpu, k, cur, &mid.2, b, hgt).context("mid.2")
    }

    /// A conv producing the residual stream `x[1 - cur]` from x[cur] (up- or downsampling,
    /// no GroupNorm on its input), leaving its statistics; the stream moves there.
    #[allow(clippy::too_many_arguments)]
    fn resample(
        &mut self,
        gpu: &Gpu,
        k: ConvKernel,
        cur: &mut usize,
        conv: &ConvWeights<T>,
        b: usize,
        hgt: usize,
        mode: Resample,
    ) -> Result<()> {
        let [x0, x1] = &mut self.x;
        let (src, dst) = if *cur == 0 { (x0, x1) } else { (x1, x0) };
        let stats = ConvGn {
            apply: None,
            stats: true,
        };
        conv3x3(
            gpu,
            k,
            conv,
            src,
            dst,
            Residual::None,
            b,
            hgt,
            hgt,
            mode,
            Some((&mut self.gn, stats)),
        )?;
        *cur = 1 - *cur;
        Ok(())
    }
}

/// [`GpuDecoder::max_batch`] for a decoder configuration.
pub fn max_pass(cfg: &DecoderConfig, s: usize, free_bytes: Option<usize>) -> usize {
    let (max_act, _, _) = cfg.activation_plan(s);
    let by_index = i32::MAX as usize / max_act.max(1);
    let per_image = cfg.workspace_bytes_per_image(s) as usize;
    let by_memory = free_bytes.map_or(usize::MAX, |f| f / 2 / per_image.max(1));
    by_index.min(by_memory).max(1)
}

/// Images per pass when `batch` images are decoded in passes of at most `max`: the fewest
/// passes, all of equal size but the last (which may be smaller by less than one per pass).
pub fn equal_passes(batch: usize, max: usize) -> usize {
    let passes = batch.div_ceil(max.max(1)).max(1);
    batch.div_ceil(passes).max(1)
}

impl<T: Storage> Workspace<T> {
    fn new(
        gpu: &Gpu,
        cfg: &DecoderConfig,
        batch: usize,
        s: usize,
        chunk: usize,
    ) -> Result<Workspace<T>> {
        let (max_act, max_hw, max_c) = cfg.activation_plan(s);
        let n = s * s;
        let side = s * cfg.stride();
        let c_last = cfg.ch * cfg.ch_mult[cfg.ch_mult.len() - 1];
        let chunk = chunk.clamp(1, batch.max(1));
        let plan = ActsPlan {
            max_act,
            t: n * cfg.z_channels,
            f: (n * cfg.z_channels).max(3 * side * side),
            max_hw,
            max_c,
            attn_n: n,
            attn_c: c_last,
        };
        Ok(Workspace {
            batch,
            chunk,
            s,
            side,
            tokens: gpu.alloc(batch * n)?,
            z: gpu.alloc(chunk * n * cfg.embed_dim)?,
            a: Acts::new(gpu, chunk, &plan)?,
            img: gpu.alloc(batch * 3 * side * side)?,
            px: gpu.alloc(batch * 3 * side * side)?,
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
    pub fn new(gpu: &Gpu, dec: &DecoderWeights) -> Result<GpuDecoder> {
        GpuDecoder::with_dtype(gpu, dec, StorageDtype::F16)
    }

    /// Upload the weights of a loaded CPU decoder with the given 16-bit storage.
    pub fn with_dtype(gpu: &Gpu, dec: &DecoderWeights, dtype: StorageDtype) -> Result<GpuDecoder> {
        let inner = match dtype {
            StorageDtype::F16 => Inner::F16(Decoder::new(gpu, dec)?),
            StorageDtype::Bf16 => Inner::Bf16(Decoder::new(gpu, dec)?),
        };
        Ok(GpuDecoder { inner })
    }

    pub fn dtype(&self) -> StorageDtype {
        match self.inner {
            Inner::F16(_) => StorageDtype::F16,
            Inner::Bf16(_) => StorageDtype::Bf16,
        }
    }

    pub fn config(&self) -> &DecoderConfig {
        dispatch!(&self.inner, d => &d.cfg)
    }

    /// The most images one pass of a decode of an s x s latent takes: the kernels index a
    /// pass's activations (B x H x W x C at the widest level) with int32, and the workspace
    /// should take at most half of `free_bytes` (device memory free now, when known). Larger
    /// batches are decoded in equal passes ([`GpuDecoder::chunk`]) on one workspace.
    pub fn max_batch(&self, s: usize, free_bytes: Option<usize>) -> usize {
        max_pass(self.config(), s, free_bytes)
    }

    /// Images per pass when `batch` images of an s x s latent are decoded: the fewest equal
    /// passes within [`GpuDecoder::max_batch`] (free memory now) and `limit` (tests).
    pub fn chunk(&self, gpu: &Gpu, batch: usize, s: usize, limit: Option<usize>) -> usize {
        let free = gpu.mem_get_info().ok().map(|(free, _)| free);
        let max = self.max_batch(s, free).min(limit.unwrap_or(usize::MAX));
        equal_passes(batch, max)
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

    /// Decode host tokens (B, s, s) (raster order per image) and read back `P`: with `u8` the
    /// 8-bit pixels (B, 3, H, W), with `f32` the raw images (B, 3, H, W) (the CPU decoder's
    /// output).
    pub fn decode_tokens<P: Readback>(
        &self,
        gpu: &Gpu,
        tokens: &[u32],
        batch: usize,
        s: usize,
    ) -> Result<Vec<P>> {
        ensure!(
            tokens.len() == batch * s * s,
            "decode: {} tokens for (B {batch}, {s}, {s})",
            tokens.len()
        );
        let n_embed = self.config().n_embed;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= n_embed) {
            anyhow::bail!("decode: token {t} out of range (codebook size {n_embed})");
        }
        let host: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let chunk = || self.chunk(gpu, batch, s, None);
        dispatch!(&self.inner, d => {
            let mut guard = d.ws.lock().unwrap();
            let ws = d.workspace(gpu, &mut guard, batch, s, chunk)?;
            gpu.upload_into(&host, &mut ws.tokens, 0)
                .context("uploading tokens")?;
            d.run(gpu, ws, None)?;
            gpu.download(P::of(&ws.px, &ws.img))
        })
    }

    /// Decode device tokens (B, s, s) i32; with `read`, download the 8-bit pixels (B, 3, H, W),
    /// otherwise only enqueue the work (benchmarks). Tokens are not range checked on the host:
    /// an out-of-range token decodes to NaN, hence 0-valued pixels.
    pub fn decode_device(
        &self,
        gpu: &Gpu,
        tokens: &DevBuf<i32>,
        batch: usize,
        s: usize,
        read: bool,
    ) -> Result<Option<Vec<u8>>> {
        let chunk = || self.chunk(gpu, batch, s, None);
        dispatch!(&self.inner, d => {
            let mut guard = d.ws.lock().unwrap();
            let ws = d.workspace(gpu, &mut guard, batch, s, chunk)?;
            d.run(gpu, ws, Some(tokens))?;
            read.then(|| gpu.download(&ws.px)).transpose()
        })
    }
}

/// Decoder buffers for one (batch, s) that the caller owns: a CUDA graph that decodes into
/// them ([`GpuDecoder::decode_into`]) stays valid exactly as long as they live, whatever
/// other shapes the decoder's own workspace is reallocated for.
pub struct DecodeBuffers {
    inner: BufInner,
}

enum BufInner {
    F16(Workspace<f16>),
    Bf16(Workspace<bf16>),
}

impl DecodeBuffers {
    /// Whether these buffers are for `batch` images of an s x s latent.
    pub fn fits(&self, batch: usize, s: usize) -> bool {
        let (b, ws) = match &self.inner {
            BufInner::F16(w) => (w.batch, w.s),
            BufInner::Bf16(w) => (w.batch, w.s),
        };
        (b, ws) == (batch, s)
    }

    /// Images per pass of a decode into these buffers.
    pub fn chunk(&self) -> usize {
        match &self.inner {
            BufInner::F16(w) => w.chunk,
            BufInner::Bf16(w) => w.chunk,
        }
    }

    /// The 8-bit pixels (B, 3, H, W) of the last decode into these buffers.
    pub fn pixels(&self) -> &DevBuf<u8> {
        match &self.inner {
            BufInner::F16(w) => &w.px,
            BufInner::Bf16(w) => &w.px,
        }
    }
}

impl GpuDecoder {
    /// Buffers for decodes of `batch` images of an s x s latent (see [`DecodeBuffers`]), in
    /// passes of [`GpuDecoder::chunk`] images (`limit`: at most that many, for tests).
    pub fn buffers(
        &self,
        gpu: &Gpu,
        batch: usize,
        s: usize,
        limit: Option<usize>,
    ) -> Result<DecodeBuffers> {
        ensure!(batch > 0 && s > 0, "decode: empty batch or latent");
        let ctx = || format!("allocating decoder buffers for batch {batch}, s {s}");
        let chunk = self.chunk(gpu, batch, s, limit);
        let inner = match &self.inner {
            Inner::F16(d) => {
                BufInner::F16(Workspace::new(gpu, &d.cfg, batch, s, chunk).with_context(ctx)?)
            }
            Inner::Bf16(d) => {
                BufInner::Bf16(Workspace::new(gpu, &d.cfg, batch, s, chunk).with_context(ctx)?)
            }
        };
        Ok(DecodeBuffers { inner })
    }

    /// Enqueue the decode of device tokens (B, s, s) i32 into `bufs` (for B and s the buffers
    /// were made for); nothing is read back, nothing is allocated (graph-capturable). The
    /// pixels are then in [`DecodeBuffers::pixels`].
    pub fn decode_into(
        &self,
        gpu: &Gpu,
        bufs: &mut DecodeBuffers,
        tokens: &DevBuf<i32>,
    ) -> Result<()> {
        match (&self.inner, &mut bufs.inner) {
            (Inner::F16(d), BufInner::F16(ws)) => d.run(gpu, ws, Some(tokens)),
            (Inner::Bf16(d), BufInner::Bf16(ws)) => d.run(gpu, ws, Some(tokens)),
            _ => anyhow::bail!("decoder buffers of the other 16-bit storage"),
        }
    }
}

/// What a host-token decode reads back: 8-bit pixels (`u8`) or raw f32 images (`f32`).
pub trait Readback: DevElem {
    /// The workspace buffer that holds this output.
    fn of<'a>(px: &'a DevBuf<u8>, img: &'a DevBuf<f32>) -> &'a DevBuf<Self>;
}

impl Readback for u8 {
    fn of<'a>(px: &'a DevBuf<u8>, _: &'a DevBuf<f32>) -> &'a DevBuf<u8> {
        px
    }
}

impl Readback for f32 {
    fn of<'a>(_: &'a DevBuf<u8>, img: &'a DevBuf<f32>) -> &'a DevBuf<f32> {
        img
    }
}

/// The decoder for one storage type.
struct Decoder<T: Storage> {
    cfg: DecoderConfig,
    conv_kernel: ConvKernel,
    codebook: DevBuf<f32>, // (V, e), as in the CPU decoder (rows normalized when `normalize`)
    post_quant_conv: ConvWeights<T>,
    conv_in: ConvWeights<T>,
    mid: (GpuResBlock<T>, AttnWeights<T>, GpuResBlock<T>),
    levels: Vec<GpuLevel<T>>,
    norm_out: GnWeights,
    conv_out: ConvWeights<T>,
    ws: Mutex<Option<Workspace<T>>>,
}

impl<T: Storage> Decoder<T> {
    fn new(gpu: &Gpu, dec: &DecoderWeights) -> Result<Decoder<T>> {
        let levels = dec
            .levels
            .iter()
            .map(|l| GpuLevel::from_host(gpu, &l.res, &l.attn, l.upsample.as_ref()))
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

    fn workspace<'a>(
        &self,
        gpu: &Gpu,
        slot: &'a mut Option<Workspace<T>>,
        batch: usize,
        s: usize,
        chunk: impl FnOnce() -> usize,
    ) -> Result<&'a mut Workspace<T>> {
        ensure!(batch > 0 && s > 0, "decode: empty batch or latent");
        if slot.as_ref().is_some_and(|w| w.batch == batch && w.s == s) {
            return Ok(slot.as_mut().unwrap());
        }
        *slot = None; // free the old buffers first (the free memory then decides the passes)
        let ws = Workspace::new(gpu, &self.cfg, batch, s, chunk())
            .with_context(|| format!("allocating decoder buffers for batch {batch}, s {s}"))?;
        Ok(slot.insert(ws))
    }

    /// The whole decoder on `tokens` (or the workspace's uploaded tokens), in equal passes
    /// of `ws.chunk` images (one launch sequence either way).
    fn run(&self, gpu: &Gpu, ws: &mut Workspace<T>, tokens: Option<&DevBuf<i32>>) -> Result<()> {
        let (batch, chunk, s) = (ws.batch, ws.chunk, ws.s);
        let n = s * s;
        let tok = tokens.unwrap_or(&ws.tokens);
        ensure!(
            tok.len() >= batch * n,
            "decode: token buffer shorter than B*s*s"
        );
        let mut first = 0;
        while first < batch {
            let b = chunk.min(batch - first);
            self.pass(gpu, ws, tokens, first, b)?;
            first += b;
        }
        Ok(())
    }

    /// One pass: images `first .. first + b` of the batch.
    fn pass(
        &self,
        gpu: &Gpu,
        ws: &mut Workspace<T>,
        tokens: Option<&DevBuf<i32>>,
        first: usize,
        b: usize,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (s, k) = (ws.s, self.conv_kernel);
        let n = s * s;
        let tok = tokens.unwrap_or(&ws.tokens);
        gather_codes(
            gpu,
            tok,
            first * n,
            &self.codebook,
            &mut ws.z,
            b * n,
            cfg.embed_dim,
            cfg.n_embed,
            cfg.normalize,
        )?;
        let a = &mut ws.a;
        conv1x1_cast(
            gpu,
            &self.post_quant_conv,
            &ws.z,
            &mut a.f,
            &mut a.t,
            b * n,
            false,
        )
        .context("post_quant_conv")?;
        let mut cur = 0usize;
        let stats = ConvGn {
            apply: None,
            stats: true,
        };
        let (none, same) = (Residual::None, Resample::Same);
        conv3x3(
            gpu,
            k,
            &self.conv_in,
            &a.t,
            &mut a.x[cur],
            none,
            b,
            s,
            s,
            same,
            Some((&mut a.gn, stats)),
        )
        .context("conv_in")?;
        let mut hgt = s;
        a.mid(gpu, k, &mut cur, &self.mid, b, hgt)?;
        for (i, level) in self.levels.iter().enumerate() {
            let name = format!("conv_blocks.{i}");
            a.level_blocks(gpu, k, &mut cur, level, b, hgt, &name)?;
            if let Some(up) = &level.resample {
                hgt *= 2;
                a.resample(gpu, k, &mut cur, up, b, hgt, Resample::Up)
                    .with_context(|| format!("{name}.upsample"))?;
            }
        }
        debug_assert_eq!(hgt, ws.side);
        let hw = hgt * hgt;
        // norm_out + SiLU in conv_out's loader; conv_out writes f32 for the pixels.
        gn_finalize(gpu, &self.norm_out, &mut a.gn, b, hw).context("norm_out")?;
        let apply = ConvGn {
            apply: Some(true),
            stats: false,
        };
        conv3x3(
            gpu,
            k,
            &self.conv_out,
            &a.x[cur],
            &mut a.f,
            Residual::None,
            b,
            hgt,
            hgt,
            same,
            Some((&mut a.gn, apply)),
        )
        .context("conv_out")?;
        let off = first * 3 * hw;
        pixels(
            gpu,
            &ws.a.f,
            Some(&mut ws.img),
            Some(&mut ws.px),
            off,
            b,
            hw,
            3,
        )
    }
}
