// emu.cuh: the host emulator of the CUDA device, so kernels/*.cu compile unchanged with a
// host C++20 compiler (g++ -DCHECKERGEN_HOST_EMU, which makes common.cuh include this file
// instead of the CUDA headers) and run on machines without a GPU. Used by tools/emu/ today;
// written so that every kernels/*.cu can be compiled the same way to run the whole engine on
// the CPU (emu_entry below gives each entry point one type-erased launch signature).
//
// One OS thread per CUDA thread; blocks run one after another, so `__shared__` (mapped to
// `static`) is the running block's shared memory. Supplies:
//   - CUDA keywords, dim3 threadIdx/blockIdx (per thread) and blockDim/gridDim (per launch);
//   - __nv_bfloat16 / __half (round to nearest even, NaN kept, f16 overflow to inf, f16
//     subnormals), the vector types and the device math the kernels use;
//   - __syncthreads (a block barrier; a thread that returns drops out of it) and the warp
//     collectives __shfl_{xor,up,down}_sync and __syncwarp, through a per-warp exchange
//     between two warp barriers (every lane of a warp must reach each collective; true for
//     these kernels);
//   - the PTX wrappers of common.cuh, written from the PTX ISA independently of the kernels:
//     mma_16816<T> (mma.sync.m16n8k16 row.col, bf16 or f16 in, f32 accumulate, rebuilt from
//     the "Matrix Fragments for mma.m16n8k16 with floating point type" tables), ldmatrix_x4
//     (m8n8.x4.b16, with a bank-conflict count per 8-row phase and an alignment check) and
//     cp.async (16-byte copies queued per thread that land only at cp.async.wait_group, the
//     latest moment the hardware may land them; alignment checked);
//   - emu_launch(kernel, grid, block, params) and emu_report() (emulator errors and ldmatrix
//     bank conflicts; non-zero means failure).
// Not emulated: timing, memory-ordering races between threads, dynamic shared memory,
// atomics, the hardware's own mma rounding (the model accumulates in f32, k ascending).
#pragma once
#include <math.h>
#include <stdint.h>
#include <string.h>

#include <atomic>
#include <barrier>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

// ---- launch geometry --------------------------------------------------------------------------
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

// ---- 16-bit types -----------------------------------------------------------------------------
struct __nv_bfloat16_raw {
    unsigned short x;
};
struct __half_raw {
    unsigned short x;
};
struct __nv_bfloat16 {
    unsigned short x;
    __nv_bfloat16() = default;
    constexpr __nv_bfloat16(__nv_bfloat16_raw r) : x(r.x) {}
    constexpr operator __nv_bfloat16_raw() const { return {x}; }
};
struct __half {
    unsigned short x;
    __half() = default;
    constexpr __half(__half_raw r) : x(r.x) {}
    constexpr operator __half_raw() const { return {x}; }
};

inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline float __int_as_float(int i) { return __uint_as_float((unsigned)i); }
inline unsigned __float_as_uint(float f) {
    unsigned u;
    memcpy(&u, &f, 4);
    return u;
}
inline int __float_as_int(float f) { return (int)__float_as_uint(f); }

inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.x << 16); }
inline __nv_bfloat16 __float2bfloat16(float f) {  // round to nearest even, quiet NaN kept
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16_raw{(unsigned short)((u >> 16) | 0x40)};
    u += 0x7fffu + ((u >> 16) & 1u);
    return __nv_bfloat16_raw{(unsigned short)(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }

inline float __half2float(__half h) {
    const unsigned s = (unsigned)(h.x & 0x8000u) << 16, e = (h.x >> 10) & 0x1fu, m = h.x & 0x3ffu;
    if (e == 0) {  // zero or subnormal: m * 2^-24
        const float v = (float)m * 5.9604644775390625e-8f;
        return s ? -v : v;
    }
    if (e == 31) return __uint_as_float(s | 0x7f800000u | (m << 13));
    return __uint_as_float(s | ((e + 112) << 23) | (m << 13));
}
inline __half __float2half(float f) {  // round to nearest even
    const unsigned u = __float_as_uint(f), s = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    unsigned short h;
    if (a > 0x7f800000u) {
        h = (unsigned short)(s | 0x7e00u);  // NaN
    } else if (a >= 0x477ff000u) {
        h = (unsigned short)(s | 0x7c00u);  // >= 65520 (and inf) rounds to inf
    } else if (a < 0x38800000u) {           // below 2^-14: subnormal, round(|f| * 2^24)
        h = (unsigned short)(s | (unsigned)nearbyintf(__uint_as_float(a) * 16777216.f));
    } else {
        const unsigned r = a - 0x38000000u;  // rebias the exponent (127 -> 15)
        h = (unsigned short)(s | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
    }
    return __half_raw{h};
}

// ---- vector types and device math ---------------------------------------------------------------
struct uint2 {
    unsigned x, y;
};
struct uint4 {
    unsigned x, y, z, w;
};
struct float2 {
    float x, y;
};
struct float4 {
    float x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }
// Single roundings, never contracted into an fma (build with -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((uint64_t)a * b) >> 32); }

// ---- errors -----------------------------------------------------------------------------------
inline std::atomic<long> g_emu_errors{0};
inline void emu_error(const char* what) {
    if (g_emu_errors.fetch_add(1) < 10) std::fprintf(stderr, "EMU ERROR: %s\n", what);
}

// ---- block and warp synchronization -------------------------------------------------------------
// Per-warp exchange: 16 words per lane (a shuffle uses 2, an mma 10, an ldmatrix 1).
struct EmuWarp {
    std::unique_ptr<std::barrier<>> bar;
    uint32_t slot[32][16];
};
struct EmuBlock {
    std::unique_ptr<std::barrier<>> bar;
    std::vector<std::unique_ptr<EmuWarp>> warps;
};
inline EmuBlock* g_emu_block = nullptr;  // the running block (one at a time)

inline int emu_lane() { return (int)threadIdx.x & 31; }
inline EmuWarp& emu_warp() { return *g_emu_block->warps[threadIdx.x >> 5]; }
inline void __syncthreads() { g_emu_block->bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp().bar->arrive_and_wait(); }

// Every lane publishes v, then reads lane src's value (its own where src is out of range).
template <typename T>
inline T emu_exchange(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    EmuWarp& w = emu_warp();
    const int l = emu_lane();
    memcpy(&w.slot[l][0], &v, sizeof(T));
    w.bar->arrive_and_wait();
    T r = v;
    if (src >= 0 && src < 32) memcpy(&r, &w.slot[src][0], sizeof(T));
    w.bar->arrive_and_wait();  // nobody overwrites the slots before every lane has read
    return r;
}
// The kernels only shuffle with the full mask.
template <typename T>
inline T __shfl_xor_sync(unsigned, T v, int lane_mask) {
    return emu_exchange(v, emu_lane() ^ lane_mask);
}
template <typename T>
inline T __shfl_up_sync(unsigned, T v, unsigned delta) {
    return emu_exchange(v, emu_lane() - (int)delta);
}
template <typename T>
inline T __shfl_down_sync(unsigned, T v, unsigned delta) {
    return emu_exchange(v, emu_lane() + (int)delta);
}

// ---- shared-memory addresses ----------------------------------------------------------------------
// A 32-bit "shared address" is the low half of the host address; the high half is common to
// all static (shared) arrays and kept here.
inline std::atomic<uintptr_t> g_emu_smem_hi{0};
inline uint32_t smem_addr(const void* p) {
    const uintptr_t u = (uintptr_t)p;
    g_emu_smem_hi.store(u & ~(uintptr_t)0xffffffffu);
    return (uint32_t)u;
}
inline unsigned char* emu_smem_ptr(uint32_t a) { return (unsigned char*)(g_emu_smem_hi.load() | a); }

// ---- cp.async -------------------------------------------------------------------------------------
struct EmuCopy {
    unsigned char* dst;
    unsigned char data[16];
};
inline thread_local std::vector<EmuCopy> t_emu_open;               // not yet committed
inline thread_local std::deque<std::vector<EmuCopy>> t_emu_groups;  // committed, in flight

// The source is read at issue (the kernels never write a source while a copy is in flight);
// the destination is written at wait_group.
inline void cp_async16(uint32_t dst, const void* src, bool valid) {
    EmuCopy c;
    c.dst = emu_smem_ptr(dst);
    if (((uintptr_t)c.dst & 15) != 0) emu_error("cp.async: shared address not 16-byte aligned");
    if (valid) {
        if (((uintptr_t)src & 15) != 0) emu_error("cp.async: global address not 16-byte aligned");
        memcpy(c.data, src, 16);
    } else {
        memset(c.data, 0, 16);
    }
    t_emu_open.push_back(c);
}
inline void cp_async_commit() {
    t_emu_groups.push_back(std::move(t_emu_open));
    t_emu_open.clear();
}
template <int N>
inline void cp_async_wait() {
    while ((int)t_emu_groups.size() > N) {
        for (auto& c : t_emu_groups.front()) memcpy(c.dst, c.data, 16);
        t_emu_groups.pop_front();
    }
}

// ---- ldmatrix / mma -------------------------------------------------------------------------------
inline std::atomic<long> g_emu_ldm_phases{0}, g_emu_ldm_conflicted{0};

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 give the row addresses of matrix j;
// lane l receives, for each matrix j, the 32-bit word (l % 4) of row (l / 4).
inline void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
    EmuWarp& w = emu_warp();
    const int l = emu_lane();
    w.slot[l][0] = addr;
    w.bar->arrive_and_wait();
    uint32_t out[4];
    for (int j = 0; j < 4; ++j) memcpy(&out[j], emu_smem_ptr(w.slot[8 * j + l / 4][0]) + 4 * (l % 4), 4);
    if (l == 0) {
        for (int j = 0; j < 4; ++j) {  // one phase per matrix: 8 rows of 16 bytes
            int count[8] = {0}, worst = 0;
            for (int i = 0; i < 8; ++i) {
                const uint32_t a = w.slot[8 * j + i][0];
                if (a & 15) emu_error("ldmatrix: row address not 16-byte aligned");
                const int c = ++count[(a >> 4) & 7];
                worst = c > worst ? c : worst;
            }
            g_emu_ldm_phases++;
            if (worst > 1) g_emu_ldm_conflicted++;
        }
    }
    w.bar->arrive_and_wait();
    r0 = out[0];
    r1 = out[1];
    r2 = out[2];
    r3 = out[3];
}

// One 16-bit element (half 0 = low 16 bits) of a register, as f32.
template <typename T>
inline float emu_elem(uint32_t reg, int half);
template <>
inline float emu_elem<__nv_bfloat16>(uint32_t reg, int half) {
    return __bfloat162float(__nv_bfloat16_raw{(unsigned short)(half ? reg >> 16 : reg & 0xffffu)});
}
template <>
inline float emu_elem<__half>(uint32_t reg, int half) {
    return __half2float(__half_raw{(unsigned short)(half ? reg >> 16 : reg & 0xffffu)});
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32 d, a, b, d over the warp.
// From the PTX ISA tables, groupID = lane >> 2, threadID_in_group = lane % 4:
//   A: a_i (i = 0..7, two per register, low half first)
//      row = groupID for i in {0,1,4,5}, groupID + 8 otherwise
//      col = threadID_in_group*2 + (i & 1) (+ 8 for i >= 4)
//   B: b_i (i = 0..3): row = threadID_in_group*2 + (i & 1) (+ 8 for i >= 2), col = groupID
//   C/D: c_i (i = 0..3): row = groupID (+ 8 for i >= 2), col = threadID_in_group*2 + (i & 1)
template <typename T>
inline void mma_16816(float* d, const uint32_t* a, const uint32_t* b) {
    EmuWarp& w = emu_warp();
    const int lane = emu_lane();
    uint32_t* s = w.slot[lane];
    for (int i = 0; i < 4; ++i) s[i] = a[i];
    s[4] = b[0];
    s[5] = b[1];
    memcpy(&s[6], d, 16);
    w.bar->arrive_and_wait();
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        const int gid = l >> 2, tig = l & 3;
        for (int i = 0; i < 8; ++i) {
            const int row = (i < 2 || (i >= 4 && i < 6)) ? gid : gid + 8;
            const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = emu_elem<T>(w.slot[l][i / 2], i & 1);
        }
        for (int i = 0; i < 4; ++i) {
            const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            B[row][gid] = emu_elem<T>(w.slot[l][4 + i / 2], i & 1);
        }
        for (int i = 0; i < 4; ++i) memcpy(&C[gid + (i >= 2 ? 8 : 0)][tig * 2 + (i & 1)], &w.slot[l][6 + i], 4);
    }
    const int gid = lane >> 2, tig = lane & 3;
    float out[4];
    for (int i = 0; i < 4; ++i) {
        const int row = gid + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
        float acc = C[row][col];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        out[i] = acc;
    }
    w.bar->arrive_and_wait();  // nobody overwrites the slots before every lane has read
    memcpy(d, out, 16);
}

// ---- launch ---------------------------------------------------------------------------------------
// Run kernel(p) over grid x block (block (n, 1, 1), n <= 1024; a last partial warp is allowed),
// one block at a time, one host thread per CUDA thread.
template <class P>
void emu_launch(void (*kernel)(P), dim3 grid, dim3 block, const P& p) {
    const unsigned nt = block.x;
    if (block.y != 1 || block.z != 1 || nt == 0 || nt > 1024) {
        std::fprintf(stderr, "emu_launch: block must be (n, 1, 1) with 0 < n <= 1024\n");
        std::abort();
    }
    blockDim = block;
    gridDim = grid;
    for (unsigned bz = 0; bz < grid.z; ++bz)
        for (unsigned by = 0; by < grid.y; ++by)
            for (unsigned bx = 0; bx < grid.x; ++bx) {
                EmuBlock blk;
                blk.bar = std::make_unique<std::barrier<>>((std::ptrdiff_t)nt);
                for (unsigned w = 0; w * 32 < nt; ++w) {
                    blk.warps.push_back(std::make_unique<EmuWarp>());
                    const unsigned lanes = nt - 32 * w < 32 ? nt - 32 * w : 32;
                    blk.warps.back()->bar = std::make_unique<std::barrier<>>((std::ptrdiff_t)lanes);
                }
                g_emu_block = &blk;
                std::vector<std::thread> threads;
                threads.reserve(nt);
                for (unsigned t = 0; t < nt; ++t)
                    threads.emplace_back([&, t] {
                        threadIdx = dim3{t, 0, 0};
                        blockIdx = dim3{bx, by, bz};
                        t_emu_open.clear();
                        t_emu_groups.clear();
                        kernel(p);
                        if (!t_emu_open.empty()) emu_error("thread exited with uncommitted cp.async copies");
                        for (auto& g : t_emu_groups)
                            if (!g.empty()) emu_error("thread exited with cp.async copies in flight");
                        emu_warp().bar->arrive_and_drop();
                        blk.bar->arrive_and_drop();
                    });
                for (auto& th : threads) th.join();
                g_emu_block = nullptr;
            }
}

// One launch signature for every entry point (for a generated table of entry points):
// emu_entry<RopeKvParams, rope_kv_append_bf16> launches from a pointer to the parameters.
template <class P, void (*K)(P)>
void emu_entry(dim3 grid, dim3 block, const void* params) {
    emu_launch(K, grid, block, *static_cast<const P*>(params));
}

// Prints the ldmatrix phase and bank-conflict counts and the emulator errors; returns the
// number of problems (bank conflicts count as one).
inline int emu_report() {
    const long phases = g_emu_ldm_phases.load(), conflicted = g_emu_ldm_conflicted.load();
    if (phases) std::printf("ldmatrix phases %ld, with bank conflicts %ld\n", phases, conflicted);
    if (g_emu_errors.load()) std::printf("emulator errors: %ld\n", g_emu_errors.load());
    return (conflicted ? 1 : 0) + (g_emu_errors.load() ? 1 : 0);
}
