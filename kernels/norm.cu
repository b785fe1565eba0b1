// norm.cu: RMSNorm fused with the AdaLN modulation, SwiGLU gating, and bias add. Why here:
// these are the memory-bound elementwise steps between the cuBLAS GEMMs of a transformer
// layer; fusing the norm with the modulation and the bf16 cast reads the residual once.
//
// rmsnorm_adaln: out[t, :] = bf16( x[t, :] * rsqrt(mean(x[t, :]^2) + eps) * w * scale_r + shift_r )
//   x    (T, C) f32, the residual stream, T = rows * n (row r = t / n)
//   w    (C) f32 norm weight
//   modulation  per sequence row r, the AdaLN [shift | scale] (2C f32) at modulation +
//        r * mod_stride + mod_offset: the engine keeps every layer's [shift1 | scale1 |
//        shift2 | scale2] in one (rows, L*4C) buffer (mod_stride L*4C, mod_offset l*4C, + 2C
//        before the FFN); modulation == 0 skips the modulation (final norm).
//   out  (T, C) bf16
//   launch: grid T, block 256; one block per token, f32 sum of squares by block reduction.
// silu_mul: h[t, i] = bf16( silu(g[t, i]) * g[t, F + i] ), g (T, 2F) bf16 from one GEMM with
//   the stacked [w1; w3] weight; tokens in grid.y, a token's F outputs in grid.x (32-bit).
//   The engine no longer launches it (ffn.cu's swiglu fuses the gate into the w13 GEMM); it
//   stays as the separately tested gate (tests/gpu_norm.rs) and for timing against swiglu.
// add_bias_f32: y[t, j] += b[j], y (T, N) f32; rows in grid.y, a row's N in grid.x (32-bit).
#include "common.cuh"

// =============================================================================================
// CUDA kernels
// =============================================================================================

struct RmsNormParams {
    const float* x;           // (T, C)
    const float* w;           // (C)
    const float* modulation;  // row r's pair at r * mod_stride + mod_offset, or null
    __nv_bfloat16* out;       // (T, C)
    int tokens, n, c, mod_offset, mod_stride;
    float eps;
};
static_assert(sizeof(RmsNormParams) == 56, "RmsNormParams: mirrored in src/cuda/norm.rs");

__device__ __forceinline__ void rmsnorm_adaln_impl(const RmsNormParams& p) {
    __shared__ float scratch[32];
    const int t = blockIdx.x;
    if (t >= p.tokens) return;
    const float* x = p.x + (size_t)t * p.c;
    const float* w = p.w;
    __nv_bfloat16* out = p.out + (size_t)t * p.c;
    float ss = 0.f;
    for (int i = threadIdx.x; i < p.c; i += blockDim.x) ss += x[i] * x[i];
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)p.c + p.eps);
    const float* m = p.modulation ? p.modulation + (size_t)(t / p.n) * p.mod_stride + p.mod_offset : nullptr;
    for (int i = threadIdx.x; i < p.c; i += blockDim.x) {
        float v = x[i] * inv * w[i];
        if (m) v = v * m[p.c + i] + m[i];
        out[i] = f2bf(v);
    }
}

struct SiluMulParams {
    const __nv_bfloat16* g;  // (T, 2F)
    __nv_bfloat16* h;        // (T, F)
    int tokens, f;
};
static_assert(sizeof(SiluMulParams) == 24, "SiluMulParams: mirrored in src/cuda/norm.rs");

// grid.y strides over tokens, grid.x over a token's F outputs: 32-bit indexing in a row.
__device__ __forceinline__ void silu_mul_impl(const SiluMulParams& p) {
    for (unsigned t = blockIdx.y; t < (unsigned)p.tokens; t += gridDim.y) {
        const __nv_bfloat16* g = p.g + (size_t)t * 2 * p.f;
        __nv_bfloat16* h = p.h + (size_t)t * p.f;
        for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < (unsigned)p.f;
             j += gridDim.x * blockDim.x) {
            const float a = bf2f(g[j]), b = bf2f(g[p.f + j]);
            h[j] = f2bf(a / (1.f + __expf(-a)) * b);
        }
    }
}

struct AddBiasParams {
    float* y;        // (rows, N)
    const float* b;  // (N)
    int rows, n;
};
static_assert(sizeof(AddBiasParams) == 24, "AddBiasParams: mirrored in src/cuda/norm.rs");

// grid.y strides over rows, grid.x over a row's N values: 32-bit indexing in a row.
__device__ __forceinline__ void add_bias_impl(const AddBiasParams& p) {
    for (unsigned r = blockIdx.y; r < (unsigned)p.rows; r += gridDim.y) {
        float* y = p.y + (size_t)r * p.n;
        for (unsigned j = blockIdx.x * blockDim.x + threadIdx.x; j < (unsigned)p.n;
             j += gridDim.x * blockDim.x)
            y[j] += p.b[j];
    }
}

// =============================================================================================
// Entry points: extern "C", named <op>_<variant>_<dtype>, one declaration per line (build.rs
// registers each as a k::* constant for src/cuda/), each with __launch_bounds__(the largest block
// its launcher uses): the registry records it, Gpu::launch refuses a larger block, and
// scripts/kernel-resources.sh checks registers and shared memory against it
// =============================================================================================

extern "C" __global__ void __launch_bounds__(256) rmsnorm_adaln_bf16(const RmsNormParams p) { rmsnorm_adaln_impl(p); }
extern "C" __global__ void __launch_bounds__(256) silu_mul_bf16(const SiluMulParams p) { silu_mul_impl(p); }
extern "C" __global__ void __launch_bounds__(256) add_bias_f32(const AddBiasParams p) { add_bias_impl(p); }
