// emu.hpp: run checkergen's CUDA kernels on the host, one OS thread per CUDA thread, to check
// index math, tiling and fragment layouts on machines without a GPU.
//
// The kernel file is compiled unchanged as C++ (with CHECKERGEN_EMU defined, which drops its
// inline-PTX wrappers). This header supplies:
//   - threadIdx/blockIdx (thread_local), blockDim/gridDim, __syncthreads (a block barrier);
//   - __shfl_xor_sync through a per-warp exchange with warp barriers;
//   - cp.async as a per-thread queue of 16-byte copies that land only at cp.async.wait_group
//     (the latest moment the hardware may land them), checking 16-byte alignment;
//   - ldmatrix.x4 and mma.sync.m16n8k16 (bf16/f16, f32 accumulate) written from the PTX ISA
//     fragment tables (independently of the kernel), plus a shared-memory bank-conflict count
//     for every ldmatrix phase.
// Blocks run one after another; `__shared__` becomes `static`, so shared arrays are shared by
// the threads of the running block. Every warp must execute the same sequence of warp-level
// operations (true for these kernels).
#pragma once
#include <cuda_bf16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <atomic>
#include <barrier>
#include <cassert>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>
#include <algorithm>

using std::max;
using std::min;

#undef __global__
#undef __device__
#undef __forceinline__
#undef __launch_bounds__
#undef __shared__
#undef __align__
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct EmuDim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local EmuDim3 threadIdx, blockIdx;
inline EmuDim3 blockDim, gridDim;

inline float __int_as_float(int v) {
    float f;
    std::memcpy(&f, &v, 4);
    return f;
}
inline float __int_as_float(unsigned v) { return __int_as_float((int)v); }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __expf(float x) { return std::exp(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }

// ---- block and warp synchronization ---------------------------------------------------------
inline std::barrier<>* g_block_bar = nullptr;
inline std::barrier<>* g_warp_bar[32] = {};
struct WarpSlots {
    uint32_t u[32][16];
};
inline WarpSlots g_slots[32];

inline void __syncthreads() { g_block_bar->arrive_and_wait(); }
inline int emu_warp() { return (int)threadIdx.x >> 5; }
inline int emu_lane() { return (int)threadIdx.x & 31; }
inline void emu_warp_sync() { g_warp_bar[emu_warp()]->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int o) {
    const int w = emu_warp(), l = emu_lane();
    std::memcpy(&g_slots[w].u[l][0], &v, 4);
    emu_warp_sync();
    float r;
    std::memcpy(&r, &g_slots[w].u[l ^ o][0], 4);
    emu_warp_sync();
    return r;
}

// ---- shared-memory addresses ----------------------------------------------------------------
inline std::atomic<uintptr_t> g_smem_hi{0};
inline uint32_t smem_addr(const void* p) {
    const uintptr_t u = (uintptr_t)p;
    g_smem_hi.store(u & ~(uintptr_t)0xffffffffu);
    return (uint32_t)u;
}
inline unsigned char* smem_ptr(uint32_t a) { return (unsigned char*)(g_smem_hi.load() | a); }

// ---- cp.async -------------------------------------------------------------------------------
struct EmuCopy {
    unsigned char* dst;
    unsigned char data[16];
};
inline thread_local std::vector<EmuCopy> t_open;
inline thread_local std::deque<std::vector<EmuCopy>> t_groups;
inline std::atomic<long> g_errors{0};

inline void emu_error(const char* what) {
    if (g_errors.fetch_add(1) < 10) std::fprintf(stderr, "EMU ERROR: %s\n", what);
}

inline void cp_async16(uint32_t dst, const void* src, bool valid) {
    EmuCopy c;
    c.dst = smem_ptr(dst);
    if (((uintptr_t)c.dst & 15) != 0) emu_error("cp.async: shared address not 16-byte aligned");
    if (valid) {
        if (((uintptr_t)src & 15) != 0) emu_error("cp.async: global address not 16-byte aligned");
        std::memcpy(c.data, src, 16);
    } else {
        std::memset(c.data, 0, 16);
    }
    t_open.push_back(c);
}
inline void cp_async_commit() {
    t_groups.push_back(std::move(t_open));
    t_open.clear();
}
template <int N>
inline void cp_async_wait() {
    while ((int)t_groups.size() > N) {
        for (auto& c : t_groups.front()) std::memcpy(c.dst, c.data, 16);
        t_groups.pop_front();
    }
}

// ---- ldmatrix / mma -------------------------------------------------------------------------
inline std::atomic<long> g_ldm_phases{0}, g_ldm_conflicted{0};

// ldmatrix.sync.aligned.m8n8.x4.b16: lanes 8j..8j+7 give the row addresses of matrix j; lane l
// receives, for each matrix j, the 32-bit word (l % 4) of row (l / 4).
inline void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
    const int w = emu_warp(), l = emu_lane();
    g_slots[w].u[l][0] = addr;
    emu_warp_sync();
    uint32_t out[4];
    for (int j = 0; j < 4; ++j) {
        const uint32_t row = g_slots[w].u[8 * j + l / 4][0];
        std::memcpy(&out[j], smem_ptr(row) + 4 * (l % 4), 4);
    }
    if (l == 0) {
        for (int j = 0; j < 4; ++j) {
            int count[8] = {0}, worst = 0;
            for (int i = 0; i < 8; ++i) {
                const uint32_t a = g_slots[w].u[8 * j + i][0];
                if (a & 15) emu_error("ldmatrix: row address not 16-byte aligned");
                worst = std::max(worst, ++count[(a >> 4) & 7]);
            }
            g_ldm_phases++;
            if (worst > 1) g_ldm_conflicted++;
        }
    }
    emu_warp_sync();
    r0 = out[0];
    r1 = out[1];
    r2 = out[2];
    r3 = out[3];
}

// One 16-bit element (low or high half of a register) as f32.
inline float emu_elem(__nv_bfloat16*, uint32_t reg, int half) {
    const uint32_t f = (half ? reg >> 16 : reg & 0xffff) << 16;
    float v;
    std::memcpy(&v, &f, 4);
    return v;
}
inline float emu_elem(__half*, uint32_t reg, int half) {
    __half_raw r;
    r.x = (unsigned short)(half ? reg >> 16 : reg & 0xffff);
    return __half2float(__half(r));
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, fragments per the PTX ISA
// (g = lane / 4, t = lane % 4):
//   A regs: 0 (row g, k 2t..2t+1), 1 (row g+8, k 2t..), 2 (row g, k 2t+8..), 3 (row g+8, k 2t+8..)
//   B regs: 0 (k 2t..2t+1, col g), 1 (k 2t+8.., col g)
//   C/D:    0,1 (row g, cols 2t, 2t+1), 2,3 (row g+8, cols 2t, 2t+1)
template <typename T>
inline void mma_16816(float* d, const uint32_t* a, const uint32_t* b) {
    const int w = emu_warp(), l = emu_lane();
    uint32_t* s = g_slots[w].u[l];
    for (int i = 0; i < 4; ++i) s[i] = a[i];
    s[4] = b[0];
    s[5] = b[1];
    std::memcpy(&s[6], d, 16);
    emu_warp_sync();
    T* tag = nullptr;
    auto A = [&](int row, int k) {
        const int lane = (row % 8) * 4 + (k % 8) / 2;
        const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
        return emu_elem(tag, g_slots[w].u[lane][reg], k % 2);
    };
    auto B = [&](int k, int col) {
        const int lane = col * 4 + (k % 8) / 2;
        return emu_elem(tag, g_slots[w].u[lane][4 + (k >= 8 ? 1 : 0)], k % 2);
    };
    auto C = [&](int row, int col) {
        const int lane = (row % 8) * 4 + col / 2;
        float v;
        std::memcpy(&v, &g_slots[w].u[lane][6 + (row >= 8 ? 2 : 0) + col % 2], 4);
        return v;
    };
    const int g = l / 4, t = l % 4;
    float out[4];
    for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), col = 2 * t + (e & 1);
        float acc = C(row, col);
        for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
        out[e] = acc;
    }
    emu_warp_sync();
    std::memcpy(d, out, 16);
}

// ---- launch ---------------------------------------------------------------------------------
template <class P>
void emu_launch(void (*kernel)(P), EmuDim3 grid, unsigned threads, const P& p) {
    blockDim = EmuDim3{threads, 1, 1};
    gridDim = grid;
    const unsigned nw = (threads + 31) / 32;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                std::barrier<> block_bar((std::ptrdiff_t)threads);
                std::vector<std::unique_ptr<std::barrier<>>> warp_bars;
                for (unsigned w = 0; w < nw; ++w) {
                    warp_bars.push_back(std::make_unique<std::barrier<>>(
                        (std::ptrdiff_t)std::min(32u, threads - 32 * w)));
                    g_warp_bar[w] = warp_bars.back().get();
                }
                g_block_bar = &block_bar;
                std::vector<std::thread> ts;
                for (unsigned t = 0; t < threads; ++t)
                    ts.emplace_back([&, t] {
                        threadIdx = EmuDim3{t, 0, 0};
                        blockIdx = EmuDim3{bx, by, bz};
                        t_open.clear();
                        t_groups.clear();
                        kernel(p);
                        if (!t_open.empty() || !t_groups.empty())
                            for (auto& g : t_groups)
                                if (!g.empty()) emu_error("thread exited with copies in flight");
                        g_warp_bar[t >> 5]->arrive_and_drop();
                        g_block_bar->arrive_and_drop();
                    });
                for (auto& th : ts) th.join();
            }
}
