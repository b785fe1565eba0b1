// common.cuh: shared helpers for every checkergen kernel file.
// Conventions: storage bf16, accumulation and reductions f32; every kernel takes one
// parameter struct by value, mirrored field for field by a #[repr(C)] Rust struct in
// src/cuda/ (device pointers as unsigned long long). NVRTC builds get this header inlined.
#pragma once
#include <cuda_bf16.h>
#include <stdint.h>

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
