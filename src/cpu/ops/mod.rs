//! The CPU reference of every CUDA kernel family: one public function per kernel (or fused
//! kernel group), with the kernel's inputs, layouts and numerics (f32, accumulation order
//! noted where it matters). The CPU backend is composed from these, and every GPU test
//! compares a kernel against its function here. One file per kernels/*.cu file:
//!
//! | file          | kernels/           | functions                                                |
//! |---------------|--------------------|----------------------------------------------------------|
//! | norm.rs       | norm.cu            | rmsnorm_adaln, silu_mul, add_bias                        |
//! | ffn.rs        | ffn.cu             | swiglu (the w13 GEMM + silu_mul, fused on the GPU)       |
//! | embed.rs      | embed.cu           | upsample_codes (upsample_bilinear), codevec_hidden,      |
//! |               |                    | gather_inputs                                            |
//! | attention.rs  | attention.cu       | rope_kv_append -> attention (optional block-causal mask) |
//! |               |                    | composed: the one fused kernel per layer                 |
//! | sampling.rs   | sampling.cu        | guided_sample                                            |
//! | decoder.rs    | decoder.cu         | conv2d (1x1, 3x3), conv2d_down (encoder, stride 2),      |
//! |               |                    | group_norm(+SiLU), upsample_nearest2,                    |
//! |               |                    | softmax_rows, spatial_attention, gather_codes, pixels    |
//!
//! The 3x3 convolutions of `conv2d` run Winograd F(2x2, 3x3) with run-time-selected
//! AVX-512 / AVX2 / portable micro-kernels (winograd.rs, the CPU fast path; the plain
//! im2col + GEMM form stays as `decoder::conv2d_banded`, which the tests check it against).
//! The `*_into` variants write into a caller's buffer so the decoder can reuse its buffers.
//!
//! cuBLAS GEMMs (`cuda::gemm`) are checked against [`crate::math::linear`].

pub mod attention;
pub mod decoder;
pub mod embed;
pub mod ffn;
pub mod norm;
pub mod sampling;
mod winograd;

pub use attention::{AttnShape, BlockMask, attention, rope_kv_append};
pub use decoder::{
    conv2d, conv2d_down, conv2d_into, gather_codes, group_norm, group_norm_into, pixels,
    softmax_rows, spatial_attention, upsample_nearest2, upsample_nearest2_into,
};
pub use embed::{codevec_hidden, gather_inputs, upsample_bilinear, upsample_codes};
pub use ffn::swiglu;
pub use norm::{add_bias, rmsnorm_adaln, silu_mul};
pub use sampling::guided_sample;
