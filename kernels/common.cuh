// common.cuh: what every checkergen kernel file shares, so each .cu file holds only its own
// op family: the 16-bit types, warp/block reductions, the Philox RNG of src/rng.rs, and the
// inline-PTX wrappers (mma.sync, ldmatrix, cp.async) of the tensor-core kernels.
//
// Conventions: storage bf16 (the decoder: bf16 or f16), accumulation and reductions f32;
// every kernel takes one parameter struct by value with typed pointers, checked by a
// static_assert on its size and mirrored field for field by a #[repr(C)] Rust struct in
// src/cuda/ (pointers as u64 there). Entry points are named <op>_<variant>_<dtype>.
//
// Three ways to compile this header: nvcc (build.rs, cubins + PTX), NVRTC (build.rs inlines
// this file into each source; no libc headers there, see below), and the host C++ compiler with CHECKERGEN_HOST_EMU defined,
// where kernels/emu.cuh stands in for the CUDA headers and the PTX wrappers below (see
// tools/emu/README.md).
#pragma once
#ifdef CHECKERGEN_HOST_EMU
#include "emu.cuh"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif
#ifdef __CUDACC_RTC__
// NVRTC ships no libc headers (no <stdint.h>) and the runtime passes only the CUDA include
// directory (for cuda_bf16.h / cuda_fp16.h). The kernels need only uint32_t; size_t is built
// into NVRTC. Same width as <stdint.h>'s on every CUDA target, checked below.
typedef unsigned int uint32_t;
#else
#include <stdint.h>
#endif
static_assert(sizeof(uint32_t) == 4, "uint32_t");

typedef unsigned long long u64;

__device__ __forceinline__ float bf2f(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ __nv_bfloat16 f2bf(float v) { return __float2bfloat16(v); }

// Sum over a warp.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Max over a warp.
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of up to 1024 threads (blockDim.x a multiple of 32). `scratch` holds 32
// floats of shared memory. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? scratch[threadIdx.x] : 0.f;
    if (warp == 0) v = warp_sum(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

// Philox4x32-10 (Salmon et al. 2011), identical to src/rng.rs.
__device__ __forceinline__ void philox4x32_10(uint32_t ctr[4], uint32_t key0, uint32_t key1) {
    const uint32_t M0 = 0xD2511F53u, M1 = 0xCD9E8D57u, W0 = 0x9E3779B9u, W1 = 0xBB67AE85u;
    uint32_t k0 = key0, k1 = key1;
    for (int r = 0; r < 10; ++r) {
        if (r > 0) { k0 += W0; k1 += W1; }
        uint32_t hi0 = __umulhi(M0, ctr[0]), lo0 = M0 * ctr[0];
        uint32_t hi1 = __umulhi(M1, ctr[2]), lo1 = M1 * ctr[2];
        uint32_t c0 = hi1 ^ ctr[1] ^ k0, c2 = hi0 ^ ctr[3] ^ k1;
        ctr[0] = c0; ctr[1] = lo1; ctr[2] = c2; ctr[3] = lo0;
    }
}

// The uniform in [0, 1) drawn for (row, step, position): same bits as rng.rs token_uniform.
__device__ __forceinline__ double token_uniform(u64 seed, uint32_t row, uint32_t step, uint32_t pos) {
    uint32_t c[4] = {row, step, pos, 0u};
    philox4x32_10(c, (uint32_t)seed, (uint32_t)(seed >> 32));
    unsigned long long bits = ((unsigned long long)c[0] << 21) | ((unsigned long long)c[1] >> 11);
    return (double)bits * (1.0 / 9007199254740992.0);
}

// ---------------------------------------------------------------------------------------------
// Inline-PTX wrappers. With CHECKERGEN_HOST_EMU, kernels/emu.cuh defines the same functions as
// warp-level emulations written from the PTX ISA (fragment tables, cp.async group semantics).
//
// mma.m16n8k16 fragment layouts (PTX ISA "Matrix Fragments for mma.m16n8k16 with floating
// point type"), g = lane >> 2, t = lane & 3, the lower-indexed element in the low 16 bits:
//   A (16x16, row): reg0 = A[g][2t..2t+1]   reg1 = A[g+8][2t..2t+1]
//                   reg2 = A[g][2t+8..+9]   reg3 = A[g+8][2t+8..+9]
//   B (16x8, col):  reg0 = B[2t..2t+1][g]   reg1 = B[2t+8..2t+9][g]
//   C (16x8) f32:   c0,c1 = C[g][2t..2t+1]  c2,c3 = C[g+8][2t..2t+1]
#ifndef CHECKERGEN_HOST_EMU
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
    return (uint32_t)__cvta_generic_to_shared(p);
}

// 16-byte global -> shared copy; with valid == false nothing is read and 16 zero bytes are
// written (cp.async src-size 0).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool valid) {
    const int n = valid ? 16 : 0;
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
// The "memory" clobbers keep the compiler from moving shared-memory accesses across them.
__device__ __forceinline__ void cp_async_commit() {
    asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3,
                                            uint32_t addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
                 : "r"(addr));
}

// d += a (16x16, row) * b (16x8, col); T (bf16 or f16) inputs, f32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float* d, const uint32_t* a, const uint32_t* b);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float* d, const uint32_t* a,
                                                         const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif  // CHECKERGEN_HOST_EMU
