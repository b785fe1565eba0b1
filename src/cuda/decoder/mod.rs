//! The VQ decoder on the GPU (SPEC.md section 7): [`GpuDecoder`] runs the whole decoder in the
//! layer order of the f32 reference (`cpu::decoder`). This file only declares and re-exports;
//! bottom up: `weights.rs` (storage types, the conv kernel choice, device weights of a conv,
//! a GroupNorm and an attention block), `launch.rs` (typed launchers for kernels/decoder.cu,
//! the 1x1 convs and attention GEMMs on cuBLAS), `blocks.rs` (ResBlocks, levels and `Acts`,
//! the activation buffers and layer sequences the decoder and the encoder share),
//! `decode.rs` (the decoder: workspaces, passes), `encoder.rs` (the VQ encoder), `bench.rs`
//! (FLOP counts and `bench_decode`).
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
mod blocks;
mod decode;
pub mod encoder;
pub mod launch;
mod weights;

pub use bench::{DecodeBench, StageFlops, bench_decode, decoder_flops};
pub use decode::{DecodeBuffers, GpuDecoder, Readback, equal_passes, max_pass};
pub use encoder::GpuEncoder;
pub use launch::*;
pub use weights::{
    AttnWeights, ConvKernel, ConvWeights, GN_CHUNK, GnWeights, Storage, StorageDtype,
};
