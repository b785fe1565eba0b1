//! What every layer of the GPU decoder and encoder is made of: the activation storage types
//! ([`Storage`], [`StorageDtype`]), the 3x3 conv kernel choice ([`ConvKernel`]) and the
//! device weights of a conv, a GroupNorm and an attention block. Below the launchers.

use crate::cuda::{DevBuf, DevElem, Gpu, Kernel};
use crate::model::autoenc::{self as host, GN_GROUPS};
use anyhow::{Context, Result, ensure};
use cudarc::cublaslt::sys;
use half::{bf16, f16};

/// Pixels per GroupNorm statistics chunk: gn_partial's, and one 128-row tile of the
/// tensor-core conv, whose epilogue writes the same statistics (kernels/decoder.cu TC_BM).
pub const GN_CHUNK: usize = crate::cuda::c_defines::decoder::TC_BM;
/// Block tile (M and N) of conv3x3_tc (kernels/decoder.cu TC_BM, TC_BN).
pub(super) const TC_TILE: usize = crate::cuda::c_defines::decoder::TC_BM;
const _: () = assert!(
    crate::cuda::c_defines::decoder::TC_BN == TC_TILE,
    "conv3x3_tc: the launcher assumes square block tiles"
);
const _: () = assert!(
    crate::cuda::c_defines::decoder::GN_GROUPS == GN_GROUPS,
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

/// Which 16-bit storage a [`GpuDecoder`](super::GpuDecoder) uses.
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
pub(super) fn pick<T: Storage>(bf16: Kernel, f16: Kernel) -> Kernel {
    match T::TAG {
        "bf16" => bf16,
        "f16" => f16,
        other => unreachable!("no kernels for storage {other}"),
    }
}

/// The `_bf16`, `_f16` or `_f32` instance of a kernel that has all three.
pub(super) fn pick3<T: Storage>(bf16: Kernel, f16: Kernel, f32: Kernel) -> Kernel {
    match T::TAG {
        "f32" => f32,
        _ => pick::<T>(bf16, f16),
    }
}

pub(super) fn i32_of(v: usize, what: &str) -> Result<i32> {
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
    pub(super) w: DevBuf<T>,
    pub(super) b: DevBuf<f32>,
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

    pub(super) fn from_host(gpu: &Gpu, c: &host::Conv) -> Result<ConvWeights<T>> {
        ConvWeights::new(gpu, c.cin, c.cout, c.k, &c.weight, &c.bias)
    }
}

/// GroupNorm affine parameters (C) f32.
pub struct GnWeights {
    pub c: usize,
    pub(super) gamma: DevBuf<f32>,
    pub(super) beta: DevBuf<f32>,
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

    pub(super) fn from_host(gpu: &Gpu, g: &host::GroupNorm) -> Result<GnWeights> {
        GnWeights::new(gpu, &g.gamma, &g.beta)
    }
}

/// An attention block: GroupNorm, q|k|v stacked as one 1x1 conv (C -> 3C), proj_out.
pub struct AttnWeights<T: Storage> {
    pub c: usize,
    pub(super) norm: GnWeights,
    pub(super) qkv: ConvWeights<T>,
    pub(super) proj: ConvWeights<T>,
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

    pub(super) fn from_host(gpu: &Gpu, a: &host::AttnBlock) -> Result<AttnWeights<T>> {
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
