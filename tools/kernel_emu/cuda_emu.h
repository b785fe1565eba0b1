// cuda_emu.h: just enough of CUDA to compile kernels/*.cu with g++ and run them on the host,
// one std::thread per CUDA thread, to check index math, barriers and fragment layouts on a
// machine with no GPU. Not a simulator of timing or memory ordering: blocks run one after
// another; warps are emulated by barriers at every collective (shuffle, mma).
//
//   __syncthreads          -> std::barrier over the block (threads that return drop out)
//   __shfl_xor_sync        -> per-warp exchange buffer + std::barrier over the warp
//   mma m16n8k16 bf16      -> emu_mma_bf16_16816: gathers the warp's fragments, rebuilds the
//                             16x16 A and 16x8 B from the PTX ISA layout formulas, multiplies
//                             in f32 (the kernel calls it when CHECKERGEN_HOST_EMU is defined)
//   __shared__             -> static (one block at a time, so statics are the block's smem)
#pragma once
#define CHECKERGEN_HOST_EMU 1
#include <barrier>
#include <cstdio>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

struct uint4 {
    unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }

struct __nv_bfloat16 {
    uint16_t x;
};
inline float __bfloat162float(__nv_bfloat16 h) {
    uint32_t u = (uint32_t)h.x << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, quiet NaN kept
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(uint16_t)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(uint16_t)(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline float __int_as_float(int i) {
    float f;
    std::memcpy(&f, &i, 4);
    return f;
}
inline float __uint_as_float(unsigned u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint32_t __umulhi(uint32_t a, uint32_t b) { return (uint32_t)(((uint64_t)a * b) >> 32); }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
using std::exp2f;
using std::fmaxf;

// ---- block and warp context of the calling host thread
struct EmuWarp {
    std::barrier<> bar{32};
    float f[32];
    uint32_t a[32][4], b[32][2];
    float c[32][4];
};
struct EmuBlock {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<std::unique_ptr<EmuWarp>> warps;
};
inline thread_local EmuBlock* emu_block = nullptr;
inline thread_local EmuWarp* emu_warp = nullptr;

inline void __syncthreads() { emu_block->bar->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
    (void)mask;  // kernels here only shuffle with the full mask
    const int lane = threadIdx.x & 31;
    emu_warp->f[lane] = v;
    emu_warp->bar.arrive_and_wait();
    const float r = emu_warp->f[lane ^ lane_mask];
    emu_warp->bar.arrive_and_wait();
    return r;
}

inline float emu_bf16_bits(uint32_t reg, int half) {
    return __bfloat162float({(uint16_t)(half ? reg >> 16 : reg & 0xffffu)});
}

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 d, a, {b0, b1}, d over the warp.
// Layouts straight from the PTX ISA ("Matrix Fragments for mma.m16n8k16 with floating point
// type"), groupID = lane >> 2, threadID_in_group = lane % 4:
//   A: a_i (i = 0..7, two per register, low half first)
//      row = groupID for i in {0,1,4,5}, groupID + 8 otherwise
//      col = threadID_in_group*2 + (i & 1) (+ 8 for i >= 4)
//   B: b_i (i = 0..3): row = threadID_in_group*2 + (i & 1) (+ 8 for i >= 2), col = groupID
//   C/D: c_i (i = 0..3): row = groupID (+ 8 for i >= 2), col = threadID_in_group*2 + (i & 1)
inline void emu_mma_bf16_16816(float d[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    EmuWarp& w = *emu_warp;
    const int lane = threadIdx.x & 31;
    for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i], w.c[lane][i] = d[i];
    w.b[lane][0] = b0;
    w.b[lane][1] = b1;
    w.bar.arrive_and_wait();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int gid = l >> 2, tig = l & 3;
        for (int i = 0; i < 8; ++i) {
            const int row = (i < 2 || (i >= 4 && i < 6)) ? gid : gid + 8;
            const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = emu_bf16_bits(w.a[l][i / 2], i & 1);
        }
        for (int i = 0; i < 4; ++i) {
            const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            B[row][gid] = emu_bf16_bits(w.b[l][i / 2], i & 1);
        }
    }
    const int gid = lane >> 2, tig = lane & 3;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int row = gid + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
        float s = w.c[lane][i];
        for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
        out[i] = s;
    }
    w.bar.arrive_and_wait();  // nobody overwrites the exchange buffers before all have read
    for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// Run kernel(p) over grid x block, one block at a time, one host thread per CUDA thread.
template <class P>
void emu_launch(void (*kernel)(const P), dim3 grid, dim3 block, const P& p) {
    const unsigned nt = block.x * block.y * block.z;
    if (block.y != 1 || block.z != 1 || nt % 32 != 0 || nt == 0 || nt > 1024) {
        std::fprintf(stderr, "emu_launch: block must be (32k, 1, 1)\n");
        std::abort();
    }
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                EmuBlock blk;
                blk.bar = std::make_unique<std::barrier<>>(nt);
                for (unsigned w = 0; w < nt / 32; ++w) blk.warps.push_back(std::make_unique<EmuWarp>());
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < nt; ++t)
                    threads.emplace_back([&, t] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {bx, by, bz};
                        blockDim = block;
                        gridDim = grid;
                        emu_block = &blk;
                        emu_warp = blk.warps[t / 32].get();
                        kernel(p);
                        emu_warp->bar.arrive_and_drop();
                        blk.bar->arrive_and_drop();
                    });
                for (auto& th : threads) th.join();
            }
}
