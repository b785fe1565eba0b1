// emu.cuh: the host emulator of the CUDA device, so kernels/*.cu compile unchanged with a
// host C++20 compiler (g++ -DCHECKERGEN_HOST_EMU, which makes common.cuh include this file
// instead of the CUDA headers) and run on machines without a GPU. Used by tools/emu/ and by
// build.rs, which compiles every kernels/*.cu against it into the crate and generates one
// C entry point per kernel, `cg_emu_NAME` (see emu_abi_launch at the end).
//
// How it runs: the CUDA threads of a block are fibers (user-level contexts with their own
// 64 KiB stack, pooled per OS thread) executed cooperatively by one OS thread; a fiber runs
// until it blocks at __syncthreads or at a warp collective, then the next one runs. Blocks
// are shared out between the launching thread and helper threads (CHECKERGEN_EMU_THREADS,
// see emu_workers). Static `__shared__` maps to a function-local `thread_local`, so it is
// the running block's shared memory and no two OS threads share it (concurrent launches from
// different threads are safe; no global lock).
// Supplies:
//   - CUDA keywords, threadIdx/blockIdx (per thread, set at every fiber switch) and
//     blockDim/gridDim (per launch); 3-D blocks up to 1024 threads, warps of 32 consecutive
//     linear thread ids, a last partial warp allowed;
//   - __nv_bfloat16 / __half (round to nearest even, NaN kept, f16 overflow to inf, f16
//     subnormals), the vector types and the device math the kernels use;
//   - __syncthreads (a block barrier; a thread that returns drops out of it) and the warp
//     collectives __shfl_{xor,up,down}_sync and __syncwarp: every live lane of the warp must
//     reach the same collective (an exited lane drops out, its last published value stays);
//     lanes at different collectives are a divergence error, and a block where no thread can
//     make progress (e.g. some lanes of a warp at __syncthreads, the others at a shuffle) is a
//     deadlock error: both fail the launch with a one-line message;
//   - the PTX wrappers of common.cuh, written from the PTX ISA independently of the kernels:
//     mma_16816<T> (mma.sync.m16n8k16 row.col, bf16 or f16 in, f32 accumulate, rebuilt from
//     the "Matrix Fragments for mma.m16n8k16 with floating point type" tables), ldmatrix_x4
//     (m8n8.x4.b16, with a bank-conflict count per 8-row phase and an alignment check) and
//     cp.async (16-byte copies queued per thread that land only at cp.async.wait_group, the
//     latest moment the hardware may land them; alignment checked);
//   - __trap() and assert() in kernels fail the launch;
//   - emu_launch(kernel, grid, block, params) for tools/emu/selftest_emu.cpp (an error prints
//     "EMU ERROR" and counts) and emu_report() (emulator errors and ldmatrix bank conflicts;
//     non-zero means failure).
// Not emulated: timing, memory-ordering races between threads or blocks (a block's threads
// interleave only at barriers and collectives), occupancy and register
// limits, `extern __shared__` declarations (dynamic shared memory is size-checked only),
// atomics, the hardware's own mma rounding (the model accumulates in f32, k ascending).
// See tools/emu/README.md.
#pragma once
#include <assert.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <atomic>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define EMU_ASAN 1
#endif
#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// A block-scope thread_local is static: one copy per OS thread, i.e. per running block.
#define __shared__ thread_local
#define __align__(n) __attribute__((aligned(n)))

// ---- launch geometry --------------------------------------------------------------------------
struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

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

// ---- context switch ------------------------------------------------------------------------------
// cg_emu_switch(save, to): saves the callee-saved registers on the current stack, stores the
// stack pointer in *save, and resumes the context whose stack pointer is `to`. Everything else
// is caller-saved in the SysV ABI, so the compiler saves it around the call.
#if defined(__x86_64__)
extern "C" void cg_emu_switch(void** save, void* to);
__asm__(
    ".pushsection .text.cg_emu_switch,\"axG\",@progbits,cg_emu_switch,comdat\n"
    ".weak cg_emu_switch\n"
    ".hidden cg_emu_switch\n"
    ".type cg_emu_switch,@function\n"
    "cg_emu_switch:\n"
    "  pushq %rbp\n"
    "  pushq %rbx\n"
    "  pushq %r12\n"
    "  pushq %r13\n"
    "  pushq %r14\n"
    "  pushq %r15\n"
    "  movq %rsp, (%rdi)\n"
    "  movq %rsi, %rsp\n"
    "  popq %r15\n"
    "  popq %r14\n"
    "  popq %r13\n"
    "  popq %r12\n"
    "  popq %rbx\n"
    "  popq %rbp\n"
    "  ret\n"
    ".size cg_emu_switch, .-cg_emu_switch\n"
    ".popsection\n");
#endif

// ---- fibers, blocks, warps -----------------------------------------------------------------------
enum EmuState : int { EMU_READY, EMU_AT_BARRIER, EMU_AT_WARP, EMU_DONE };
// Warp collectives; lanes of a warp must all reach the same kind.
enum EmuKind : int { EMU_K_NONE, EMU_K_SYNCWARP, EMU_K_SHFL, EMU_K_LDMATRIX, EMU_K_MMA_BF16, EMU_K_MMA_F16 };
inline const char* emu_kind_name(int k) {
    static const char* names[] = {"none", "__syncwarp", "a shuffle", "ldmatrix", "mma.sync bf16", "mma.sync f16"};
    return names[k];
}

struct EmuCopy {  // one cp.async: lands at wait_group once its group is old enough
    unsigned char* dst;
    unsigned group;
    unsigned char data[16];
};

// A saved execution context: the stack pointer (x86-64, cg_emu_switch) or a ucontext.
struct EmuCtx {
    void* sp = nullptr;
#if !defined(__x86_64__)
    ucontext_t uc;
#endif
};

struct EmuFiber {
    EmuCtx ctx;
    unsigned char* stack = nullptr;  // lowest usable address (a guard page below)
    size_t stack_size = 0;
    dim3 tid;
    unsigned linear = 0;
    int state = EMU_DONE;
    std::vector<EmuCopy> copies;  // cp.async copies not yet landed, in issue order
    unsigned committed = 0;       // cp.async.commit_group count
};

struct EmuWarpState {
    unsigned lanes = 0, live = 0, arrived = 0;  // lanes: 32, or fewer in a last partial warp
    int kind = EMU_K_NONE;
    uint32_t in[32][12];  // what each lane publishes for the collective
    uint32_t out[32][4];  // what each lane receives
};

// One launch on one OS thread.
struct EmuRun {
    const char* name = "kernel";
    void (*body)(void*) = nullptr;
    void* arg = nullptr;
    EmuCtx sched, dead;                 // the scheduler; where a finished fiber's context goes
    const void* sched_stack = nullptr;  // the OS thread's stack, for ASan fiber switches
    size_t sched_stack_size = 0;
    EmuFiber* cur = nullptr;
    EmuFiber* fibers = nullptr;
    unsigned nt = 0, live = 0, bar_arrived = 0, nwarps = 0;
    // Ready fibers (a ring, at most nt at a time: a fiber is queued only when released):
    // released by a barrier at the back, by a warp collective at the front.
    unsigned ready[1024];
    unsigned head = 0, tail = 0;
    EmuWarpState warps[32];
    bool failed = false;
    char msg[400] = {0};
};
inline thread_local EmuRun* t_emu = nullptr;

// Per-OS-thread pool of fiber stacks, kept across launches.
#ifdef EMU_ASAN
inline constexpr size_t EMU_STACK = 256 * 1024;
#else
inline constexpr size_t EMU_STACK = 64 * 1024;
#endif
struct EmuPool {
    std::vector<EmuFiber> fibers;
    std::unique_ptr<EmuRun> run;
    size_t page = 4096;
    EmuPool() : page((size_t)sysconf(_SC_PAGESIZE)) {}
    ~EmuPool() {
        for (auto& f : fibers)
            if (f.stack) munmap(f.stack - page, f.stack_size + page);
    }
    // At least n fibers with stacks; false when out of memory.
    bool reserve(unsigned n) {
        if (fibers.size() >= n) return true;
        fibers.reserve(n);
        while (fibers.size() < n) {
            void* m = mmap(nullptr, EMU_STACK + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
            if (m == MAP_FAILED) return false;
            mprotect(m, page, PROT_NONE);  // guard page: a stack overflow faults
            fibers.emplace_back();
            fibers.back().stack = (unsigned char*)m + page;
            fibers.back().stack_size = EMU_STACK;
        }
        return true;
    }
};
inline thread_local EmuPool t_emu_pool;

// ---- errors -----------------------------------------------------------------------------------
inline std::atomic<long> g_emu_errors{0};  // emu_launch failures (tools/emu/selftest_emu.cpp)
inline void emu_error(const char* what) {
    if (g_emu_errors.fetch_add(1) < 10) std::fprintf(stderr, "EMU ERROR: %s\n", what);
}

inline void emu_switch_to_sched(bool dying);

// Records the launch's first error (kernel name, block, thread, message) and, from inside a
// CUDA thread, ends the launch: the thread never resumes.
[[noreturn]] inline void emu_fatal(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
inline void emu_fatal(const char* fmt, ...) {
    char what[300];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    EmuRun* r = t_emu;
    if (!r || !r->cur) {
        std::fprintf(stderr, "EMU FATAL outside a kernel: %s\n", what);
        std::abort();
    }
    if (!r->failed) {
        r->failed = true;
        snprintf(r->msg, sizeof r->msg, "%s: block (%u,%u,%u) thread (%u,%u,%u): %s", r->name, blockIdx.x, blockIdx.y,
                 blockIdx.z, r->cur->tid.x, r->cur->tid.y, r->cur->tid.z, what);
    }
    emu_switch_to_sched(true);
    __builtin_unreachable();
}
[[noreturn]] inline void __trap() { emu_fatal("__trap()"); }
#undef assert
#define EMU_STR2(x) #x
#define EMU_STR(x) EMU_STR2(x)
#define assert(e) ((e) ? (void)0 : emu_fatal("assert(%s) failed at %s:%d", #e, __FILE__, __LINE__))

// ---- switching -------------------------------------------------------------------------------------
inline void emu_ctx_switch(EmuCtx* save, EmuCtx* to, const void* to_stack, size_t to_size, bool dying) {
#ifdef EMU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(dying ? nullptr : &fake, to_stack, to_size);
#else
    (void)to_stack, (void)to_size, (void)dying;
#endif
#if defined(__x86_64__)
    cg_emu_switch(&save->sp, to->sp);
#else
    swapcontext(&save->uc, &to->uc);
#endif
#ifdef EMU_ASAN
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

inline void emu_push_ready(EmuRun* r, unsigned t) {
    r->fibers[t].state = EMU_READY;
    r->ready[r->tail++ & 1023] = t;
}
inline void emu_push_ready_front(EmuRun* r, unsigned t) {
    r->fibers[t].state = EMU_READY;
    r->ready[--r->head & 1023] = t;
}

// Leaves the running fiber (already marked waiting, or finished when dying) for the next
// ready one, or for the scheduler when none is ready or the launch failed. Returns when
// another fiber or the scheduler switches back to it.
inline void emu_switch_to_sched(bool dying);
inline void emu_yield(bool dying) {
    EmuRun* r = t_emu;
    EmuFiber* me = r->cur;
    EmuCtx* save = dying ? &r->dead : &me->ctx;
    if (!r->failed && r->head != r->tail) {
        EmuFiber* next = &r->fibers[r->ready[r->head++ & 1023]];
        r->cur = next;
        threadIdx = next->tid;
        emu_ctx_switch(save, &next->ctx, next->stack, next->stack_size, dying);
    } else {
        emu_ctx_switch(save, &r->sched, r->sched_stack, r->sched_stack_size, dying);
    }
}
inline void emu_switch_to_sched(bool dying) {
    EmuRun* r = t_emu;
    emu_ctx_switch(dying ? &r->dead : &r->cur->ctx, &r->sched, r->sched_stack, r->sched_stack_size, dying);
}

// The running thread waits (state already set); returns once it has been released and run.
inline void emu_block_here() { emu_yield(false); }

inline void emu_release_barrier(EmuRun* r) {
    r->bar_arrived = 0;
    for (unsigned t = 0; t < r->nt; ++t)
        if (r->fibers[t].state == EMU_AT_BARRIER) emu_push_ready(r, t);
}

inline void emu_complete_warp(EmuRun* r, unsigned w);

inline void emu_release_warp(EmuRun* r, unsigned w) {
    emu_complete_warp(r, w);
    EmuWarpState& ws = r->warps[w];
    ws.arrived = 0;
    ws.kind = EMU_K_NONE;
    // The warp's lanes run next, in lane order: a warp goes from collective to collective
    // with only its own 32 stacks in cache, until it waits at a block barrier.
    const unsigned end = 32 * w + 32 < r->nt ? 32 * w + 32 : r->nt;
    for (unsigned t = end; t-- > 32 * w;)
        if (r->fibers[t].state == EMU_AT_WARP) emu_push_ready_front(r, t);
}

[[noreturn]] inline void emu_fiber_main() {
    EmuRun* r = t_emu;
#ifdef EMU_ASAN
    // The first fiber of a launch is entered from the scheduler: that gives its stack.
    const void* from;
    size_t from_size;
    __sanitizer_finish_switch_fiber(nullptr, &from, &from_size);
    if (!r->sched_stack) r->sched_stack = from, r->sched_stack_size = from_size;
#endif
    r->body(r->arg);
    EmuFiber* f = r->cur;
    if (f->copies.size()) {
        for (auto& c : f->copies)
            if (c.group >= f->committed) emu_fatal("thread exited with uncommitted cp.async copies");
        emu_fatal("thread exited with cp.async copies in flight");
    }
    f->state = EMU_DONE;
    r->live--;
    const unsigned w = f->linear >> 5;
    EmuWarpState& ws = r->warps[w];
    ws.live--;
    // Dropping out may complete what the others wait for.
    if (ws.arrived && ws.arrived == ws.live) emu_release_warp(r, w);
    if (r->bar_arrived && r->bar_arrived == r->live) emu_release_barrier(r);
    emu_yield(true);
    __builtin_unreachable();
}
#if !defined(__x86_64__)
inline void emu_fiber_main_uc() { emu_fiber_main(); }
#endif

inline int emu_lane() { return (int)(t_emu->cur->linear & 31); }

inline void __syncthreads() {
    EmuRun* r = t_emu;
    if (++r->bar_arrived == r->live) {  // the last one releases the others and goes on
        emu_release_barrier(r);
        return;
    }
    r->cur->state = EMU_AT_BARRIER;
    emu_block_here();
}

// Arrive at warp collective `kind` with this lane's inputs already in in[lane]; returns when
// out[lane] holds the result.
inline void emu_warp_arrive(int kind) {
    EmuRun* r = t_emu;
    EmuFiber* f = r->cur;
    const unsigned w = f->linear >> 5;
    EmuWarpState& ws = r->warps[w];
    if (ws.arrived == 0) {
        ws.kind = kind;
    } else if (ws.kind != kind) {
        emu_fatal("warp divergence: lane %u reaches %s while other lanes of warp %u wait at %s", f->linear & 31,
                  emu_kind_name(kind), w, emu_kind_name(ws.kind));
    }
    if (++ws.arrived == ws.live) {
        emu_release_warp(r, w);
        return;
    }
    f->state = EMU_AT_WARP;
    emu_block_here();
}

inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_arrive(EMU_K_SYNCWARP); }

inline EmuWarpState& emu_warp() { return t_emu->warps[t_emu->cur->linear >> 5]; }

// Every lane publishes v, then reads lane src's value (its own where src is out of range).
template <typename T>
inline T emu_exchange(T v, int src) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    EmuWarpState& w = emu_warp();
    const int l = emu_lane();
    memcpy(&w.in[l][0], &v, sizeof(T));
    w.in[l][2] = (uint32_t)src;
    emu_warp_arrive(EMU_K_SHFL);
    T r;
    memcpy(&r, &w.out[l][0], sizeof(T));
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
// A 32-bit "shared address" is the offset from a 128-byte aligned anchor in this OS thread's
// static TLS block, which holds every `__shared__` array (so offsets are small and keep the
// low 7 address bits: alignment and bank groups are those of the host address).
alignas(128) inline thread_local unsigned char t_emu_smem_anchor[128];
inline uint32_t smem_addr(const void* p) {
    // The anchor's address passes through an empty asm: else GCC may fold `p - anchor` for a
    // `__shared__` p into `sub GOTTPOFF(%rip), reg` (the difference of two initial-exec TLS
    // offsets), which lld refuses ("R_X86_64_GOTTPOFF must be used in MOVQ or ADDQ
    // instructions only"; seen with ffn.cu's templated tile and decoder.cu's conv3x3_tc_gn).
    const unsigned char* anchor = t_emu_smem_anchor;
    asm("" : "+r"(anchor));
    const intptr_t d = (intptr_t)p - (intptr_t)anchor;
    if (d < INT32_MIN || d > INT32_MAX) emu_fatal("smem_addr: %p is not shared memory", p);
    return (uint32_t)(int32_t)d;
}
inline unsigned char* emu_smem_ptr(uint32_t a) { return t_emu_smem_anchor + (int32_t)a; }

// ---- cp.async -------------------------------------------------------------------------------------
// The source is read at issue (the kernels never write a source while a copy is in flight);
// the destination is written at wait_group.
inline void cp_async16(uint32_t dst, const void* src, bool valid) {
    EmuFiber* f = t_emu->cur;
    EmuCopy c;
    c.dst = emu_smem_ptr(dst);
    c.group = f->committed;
    if (((uintptr_t)c.dst & 15) != 0) emu_fatal("cp.async: shared address not 16-byte aligned");
    if (valid) {
        if (((uintptr_t)src & 15) != 0) emu_fatal("cp.async: global address %p not 16-byte aligned", src);
        memcpy(c.data, src, 16);
    } else {
        memset(c.data, 0, 16);
    }
    f->copies.push_back(c);
}
inline void cp_async_commit() { t_emu->cur->committed++; }
// Lands every copy of the groups older than the N most recent.
template <int N>
inline void cp_async_wait() {
    EmuFiber* f = t_emu->cur;
    if (f->copies.empty() || f->committed < (unsigned)N) return;
    const unsigned limit = f->committed - N;  // groups < limit must have landed
    size_t keep = 0;
    for (size_t i = 0; i < f->copies.size(); ++i) {
        EmuCopy& c = f->copies[i];
        if (c.group < limit)
            memcpy(c.dst, c.data, 16);
        else
            f->copies[keep++] = c;
    }
    f->copies.resize(keep);
}

// ---- ldmatrix / mma -------------------------------------------------------------------------------
inline std::atomic<long> g_emu_ldm_phases{0}, g_emu_ldm_conflicted{0};

// ldmatrix.sync.aligned.m8n8.x4.shared.b16: lanes 8j..8j+7 give the row addresses of matrix j;
// lane l receives, for each matrix j, the 32-bit word (l % 4) of row (l / 4).
inline void ldmatrix_x4(uint32_t& r0, uint32_t& r1, uint32_t& r2, uint32_t& r3, uint32_t addr) {
    EmuWarpState& w = emu_warp();
    const int l = emu_lane();
    w.in[l][0] = addr;
    emu_warp_arrive(EMU_K_LDMATRIX);
    r0 = w.out[l][0];
    r1 = w.out[l][1];
    r2 = w.out[l][2];
    r3 = w.out[l][3];
}
inline void emu_ldmatrix_all(EmuWarpState& w) {
    long conflicted = 0;
    for (int j = 0; j < 4; ++j) {  // one phase per matrix: 8 rows of 16 bytes
        int count[8] = {0}, worst = 0;
        for (int i = 0; i < 8; ++i) {
            const uint32_t a = w.in[8 * j + i][0];
            if (a & 15) emu_fatal("ldmatrix: row address (lane %d) not 16-byte aligned", 8 * j + i);
            const int c = ++count[(a >> 4) & 7];
            worst = c > worst ? c : worst;
        }
        if (worst > 1) conflicted++;
    }
    g_emu_ldm_phases += 4;
    if (conflicted) g_emu_ldm_conflicted += conflicted;
    for (int l = 0; l < 32; ++l)
        for (int j = 0; j < 4; ++j) memcpy(&w.out[l][j], emu_smem_ptr(w.in[8 * j + l / 4][0]) + 4 * (l % 4), 4);
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
// Lane l publishes a[0..3] in in[l][0..3], b[0..1] in in[l][4..5], c[0..3] in in[l][6..9];
// the last lane to arrive computes the whole 16x8 D once.
template <typename T>
inline void mma_16816(float* d, const uint32_t* a, const uint32_t* b) {
    EmuWarpState& w = emu_warp();
    const int lane = emu_lane();
    uint32_t* s = w.in[lane];
    for (int i = 0; i < 4; ++i) s[i] = a[i];
    s[4] = b[0];
    s[5] = b[1];
    memcpy(&s[6], d, 16);
    emu_warp_arrive(std::is_same_v<T, __half> ? EMU_K_MMA_F16 : EMU_K_MMA_BF16);
    memcpy(d, w.out[lane], 16);
}
// The PTX ISA element formulas above, element by element: the reference the fast model
// below is checked against (tools/emu/selftest_emu.cpp, bitwise). in: the 32 lanes' a[4],
// b[2], c[4] as published; out: each lane's d[4].
template <typename T>
inline void emu_mma_reference(const uint32_t in[32][12], float out[32][4]) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        const int gid = l >> 2, tig = l & 3;
        for (int i = 0; i < 8; ++i) {
            const int row = (i < 2 || (i >= 4 && i < 6)) ? gid : gid + 8;
            const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = emu_elem<T>(in[l][i / 2], i & 1);
        }
        for (int i = 0; i < 4; ++i) {
            const int row = tig * 2 + (i & 1) + (i >= 2 ? 8 : 0);
            B[row][gid] = emu_elem<T>(in[l][4 + i / 2], i & 1);
        }
        for (int i = 0; i < 4; ++i) memcpy(&C[gid + (i >= 2 ? 8 : 0)][tig * 2 + (i & 1)], &in[l][6 + i], 4);
    }
    for (int l = 0; l < 32; ++l) {
        const int gid = l >> 2, tig = l & 3;
        for (int i = 0; i < 4; ++i) {
            const int row = gid + (i >= 2 ? 8 : 0), col = tig * 2 + (i & 1);
            float acc = C[row][col];
            for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
            out[l][i] = acc;
        }
    }
}

// The model the emulator runs: the same tables in their per-register form (common.cuh),
// the product vectorized over the 8 columns with the same operation order.
// The two 16-bit elements of a register as f32 (low half first).
inline void emu_unpack2(float* d, uint32_t reg, __nv_bfloat16*) {
    d[0] = __uint_as_float(reg << 16);
    d[1] = __uint_as_float(reg & 0xffff0000u);
}
inline void emu_unpack2(float* d, uint32_t reg, __half*) {
    d[0] = __half2float(__half_raw{(unsigned short)(reg & 0xffffu)});
    d[1] = __half2float(__half_raw{(unsigned short)(reg >> 16)});
}
template <typename T>
inline void emu_mma_all(EmuWarpState& w) {
    typedef float v4f __attribute__((vector_size(16)));
    float A[16][16];
    alignas(16) float B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t2 = 2 * (l & 3);
        const uint32_t* in = w.in[l];
        // A: reg0 = A[g][2t..2t+1], reg1 = A[g+8][2t..], reg2 = A[g][2t+8..], reg3 = A[g+8][2t+8..]
        emu_unpack2(&A[g][t2], in[0], (T*)nullptr);
        emu_unpack2(&A[g + 8][t2], in[1], (T*)nullptr);
        emu_unpack2(&A[g][t2 + 8], in[2], (T*)nullptr);
        emu_unpack2(&A[g + 8][t2 + 8], in[3], (T*)nullptr);
        // B: reg0 = B[2t..2t+1][g], reg1 = B[2t+8..2t+9][g]
        float b[4];
        emu_unpack2(&b[0], in[4], (T*)nullptr);
        emu_unpack2(&b[2], in[5], (T*)nullptr);
        B[t2][g] = b[0];
        B[t2 + 1][g] = b[1];
        B[t2 + 8][g] = b[2];
        B[t2 + 9][g] = b[3];
        // C: c0, c1 = C[g][2t..2t+1], c2, c3 = C[g+8][2t..2t+1]
        memcpy(&C[g][t2], &in[6], 8);
        memcpy(&C[g + 8][t2], &in[8], 8);
    }
    // D = C + A B, each element accumulated in f32 with k ascending (one rounding per
    // multiply and per add, vectorized over the 8 columns).
    for (int row = 0; row < 16; ++row) {
        v4f d0, d1;
        memcpy(&d0, &C[row][0], 16);
        memcpy(&d1, &C[row][4], 16);
        for (int k = 0; k < 16; ++k) {
            const float a = A[row][k];
            v4f b0, b1;
            memcpy(&b0, &B[k][0], 16);
            memcpy(&b1, &B[k][4], 16);
            const v4f av = {a, a, a, a};
            d0 = d0 + av * b0;
            d1 = d1 + av * b1;
        }
        memcpy(&C[row][0], &d0, 16);
        memcpy(&C[row][4], &d1, 16);
    }
    for (int l = 0; l < 32; ++l) {
        const int g = l >> 2, t2 = 2 * (l & 3);
        memcpy(&w.out[l][0], &C[g][t2], 8);
        memcpy(&w.out[l][2], &C[g + 8][t2], 8);
    }
}

// The collective every live lane of warp w has reached, computed once.
inline void emu_complete_warp(EmuRun* r, unsigned w) {
    EmuWarpState& ws = r->warps[w];
    switch (ws.kind) {
        case EMU_K_SHFL:
            // A source lane out of range, or one a partial warp does not have, gives the
            // lane's own value; one that has exited, the last value it published.
            for (int l = 0; l < (int)ws.lanes; ++l) {
                const int src = (int)ws.in[l][2];
                const int from = (src >= 0 && src < (int)ws.lanes) ? src : l;
                ws.out[l][0] = ws.in[from][0];
                ws.out[l][1] = ws.in[from][1];
            }
            break;
        case EMU_K_LDMATRIX: emu_ldmatrix_all(ws); break;
        case EMU_K_MMA_BF16: emu_mma_all<__nv_bfloat16>(ws); break;
        case EMU_K_MMA_F16: emu_mma_all<__half>(ws); break;
        default: break;
    }
}

// ---- launch ---------------------------------------------------------------------------------------
inline int emu_fail(char* err, size_t err_len, const char* fmt, ...) __attribute__((format(printf, 3, 4)));
inline int emu_fail(char* err, size_t err_len, const char* fmt, ...) {
    if (err && err_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err, err_len, fmt, ap);
        va_end(ap);
    }
    return 1;
}

// The one-line state of a block where no thread can run.
inline void emu_deadlock(EmuRun* r) {
    unsigned at_bar = 0, at_warp = 0;
    for (unsigned t = 0; t < r->nt; ++t) {
        at_bar += r->fibers[t].state == EMU_AT_BARRIER;
        at_warp += r->fibers[t].state == EMU_AT_WARP;
    }
    char detail[160] = "";
    for (unsigned w = 0; w < r->nwarps; ++w) {
        const EmuWarpState& ws = r->warps[w];
        if (!ws.arrived) continue;
        for (unsigned t = 32 * w; t < 32 * w + 32 && t < r->nt; ++t)
            if (r->fibers[t].state == EMU_AT_BARRIER) {
                snprintf(detail, sizeof detail, " (warp %u: %u lanes at %s, lane %u at __syncthreads)", w, ws.arrived,
                         emu_kind_name(ws.kind), t & 31);
                break;
            }
        if (detail[0]) break;
    }
    r->failed = true;
    snprintf(r->msg, sizeof r->msg,
             "%s: block (%u,%u,%u): deadlock: %u threads wait at __syncthreads and %u at warp collectives that "
             "cannot complete%s",
             r->name, blockIdx.x, blockIdx.y, blockIdx.z, at_bar, at_warp, detail);
}

// A launch shared by the calling thread and the helper threads: blocks are handed out by
// an atomic counter; the first error wins.
struct EmuJob {
    const char* name;
    void (*body)(void*);
    void* arg;
    uint32_t grid[3], block[3];
    uint64_t nblocks = 0;
    std::atomic<uint64_t> next{0};
    std::atomic<bool> failed{false};
    std::mutex mu;
    char msg[400] = {0};
    unsigned joined = 0, finished = 0;  // helpers (under EmuWorkers::mu)
};

inline void emu_job_fail(EmuJob& job, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
inline void emu_job_fail(EmuJob& job, const char* fmt, ...) {
    std::lock_guard<std::mutex> lk(job.mu);
    if (job.failed.load()) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(job.msg, sizeof job.msg, fmt, ap);
    va_end(ap);
    job.failed.store(true);
}

// Runs blocks of `job` on this OS thread (its own fibers and shared memory) until none is left.
inline void emu_run_blocks(EmuJob& job) {
    const uint32_t* grid = job.grid;
    const uint32_t* block = job.block;
    const unsigned nt = block[0] * block[1] * block[2];
    if (!t_emu_pool.reserve(nt)) {
        emu_job_fail(job, "%s: cannot map fiber stacks", job.name);
        return;
    }

    // The launch state (~70 KiB, mostly the warps' exchange slots) lives with the pool, not
    // on the caller's stack.
    if (!t_emu_pool.run) t_emu_pool.run.reset(new EmuRun);
    EmuRun& run = *t_emu_pool.run;
    run.sched_stack = nullptr;
    run.sched_stack_size = 0;
    run.cur = nullptr;
    run.failed = false;
    run.msg[0] = 0;
    run.name = job.name;
    run.body = job.body;
    run.arg = job.arg;
    run.nt = nt;
    run.nwarps = (nt + 31) / 32;
    run.fibers = t_emu_pool.fibers.data();
    t_emu = &run;
    blockDim = dim3{block[0], block[1], block[2]};
    gridDim = dim3{grid[0], grid[1], grid[2]};
    // Blocks are taken in order from the job's counter, by this thread and any helpers.
    for (;;) {
        if (job.failed.load(std::memory_order_relaxed)) break;
        const uint64_t b = job.next.fetch_add(1);
        if (b >= job.nblocks) break;
        {
                const unsigned bx = (unsigned)(b % grid[0]), by = (unsigned)(b / grid[0] % grid[1]),
                               bz = (unsigned)(b / ((uint64_t)grid[0] * grid[1]));
                blockIdx = dim3{bx, by, bz};
                run.live = nt;
                run.bar_arrived = 0;
                for (unsigned w = 0; w < run.nwarps; ++w) {
                    EmuWarpState& ws = run.warps[w];
                    ws.lanes = ws.live = nt - 32 * w < 32 ? nt - 32 * w : 32;
                    ws.arrived = 0;
                    ws.kind = EMU_K_NONE;
                    // Lanes a partial warp does not have give zeros to ldmatrix and mma.
                    if (ws.lanes < 32) memset(ws.in[ws.lanes], 0, sizeof(ws.in[0]) * (32 - ws.lanes));
                }
                for (unsigned t = 0; t < nt; ++t) {
                    EmuFiber& f = run.fibers[t];
                    f.linear = t;
                    f.tid = dim3{t % block[0], (t / block[0]) % block[1], t / (block[0] * block[1])};
                    f.copies.clear();
                    f.committed = 0;
#ifdef EMU_ASAN
                    __asan_unpoison_memory_region(f.stack, f.stack_size);
#endif
#if defined(__x86_64__)
                    // Fresh stack: six zero registers, then emu_fiber_main as the return
                    // address, entered with rsp = 8 (mod 16) like any called function.
                    // The tops are staggered by 64 bytes (mod 4 KiB) so that the hot stack
                    // lines of different fibers do not all fall in the same cache sets.
                    const size_t color = (size_t)(t & 63) * 64;
                    void** s = (void**)(((uintptr_t)(f.stack + f.stack_size - color)) & ~(uintptr_t)15);
                    *--s = nullptr;
                    *--s = (void*)&emu_fiber_main;
                    for (int i = 0; i < 6; ++i) *--s = nullptr;
                    f.ctx.sp = s;
#else
                    getcontext(&f.ctx.uc);
                    f.ctx.uc.uc_stack.ss_sp = f.stack;
                    f.ctx.uc.uc_stack.ss_size = f.stack_size;
                    f.ctx.uc.uc_link = nullptr;
                    makecontext(&f.ctx.uc, emu_fiber_main_uc, 0);
#endif
                }
                run.head = run.tail = 0;
                for (unsigned t = 0; t < nt; ++t) emu_push_ready(&run, t);
                // Fibers switch among themselves; control comes back here when none is
                // ready (all done, or a deadlock) or the launch failed.
                while (!run.failed && run.head != run.tail) {
                    EmuFiber* f = &run.fibers[run.ready[run.head++ & 1023]];
                    run.cur = f;
                    threadIdx = f->tid;
                    emu_ctx_switch(&run.sched, &f->ctx, f->stack, f->stack_size, false);
                }
                run.cur = nullptr;
                if (!run.failed && run.live) emu_deadlock(&run);
                if (run.failed) {
                    emu_job_fail(job, "%s", run.msg);
                    break;
                }
        }
    }
    t_emu = nullptr;
}

// Helper threads for the blocks of a launch: CHECKERGEN_EMU_THREADS threads in all (default:
// the hardware's, at most 8), i.e. that many minus one helpers beside the launching thread.
// They live for the whole process (detached), each with its own fiber stacks and shared
// memory. One launch at a time uses them; a concurrent launch on another thread runs on its
// own thread alone.
struct EmuWorkers {
    std::mutex mu;
    std::condition_variable cv, done_cv;
    EmuJob* job = nullptr;
    unsigned long generation = 0;
    std::atomic<bool> in_use{false};
    std::vector<std::thread::id> threads;
};
inline void emu_helper_main(EmuWorkers* w) {
    unsigned long seen = 0;
    for (;;) {
        EmuJob* job;
        {
            std::unique_lock<std::mutex> lk(w->mu);
            w->cv.wait(lk, [&] { return w->generation != seen; });
            seen = w->generation;
            job = w->job;
            if (!job) continue;
            job->joined++;
        }
        emu_run_blocks(*job);
        {
            std::lock_guard<std::mutex> lk(w->mu);
            job->finished++;
        }
        w->done_cv.notify_all();
    }
}
inline EmuWorkers& emu_workers() {
    static EmuWorkers* w = [] {
        EmuWorkers* p = new EmuWorkers;  // never destroyed: the helpers outlive main
        unsigned n = std::thread::hardware_concurrency();
        if (n > 8) n = 8;
        if (const char* e = getenv("CHECKERGEN_EMU_THREADS")) n = (unsigned)atoi(e);
        for (unsigned i = 1; i < n; ++i) {
            std::thread t(emu_helper_main, p);
            p->threads.push_back(t.get_id());
            t.detach();
        }
        return p;
    }();
    return *w;
}

// Runs body(arg) as every thread of every block of the launch, on this OS thread and the
// helpers. Returns 0, or 1 with a one-line message in err.
inline int emu_run(const char* name, void (*body)(void*), void* arg, const uint32_t grid[3], const uint32_t block[3],
                   uint32_t dyn_smem, unsigned max_threads, char* err, size_t err_len) {
    if (err && err_len) err[0] = 0;
    const uint64_t nt64 = (uint64_t)block[0] * block[1] * block[2];
    if (block[0] == 0 || block[1] == 0 || block[2] == 0 || block[0] > 1024 || block[1] > 1024 || block[2] > 64 ||
        nt64 > 1024)
        return emu_fail(err, err_len, "%s: bad launch: block (%u,%u,%u) (each dimension >= 1, x, y <= 1024, z <= 64, "
                        "at most 1024 threads)", name, block[0], block[1], block[2]);
    if (max_threads && nt64 > max_threads)
        return emu_fail(err, err_len, "%s: bad launch: block of %llu threads over its __launch_bounds__(%u)", name,
                        (unsigned long long)nt64, max_threads);
    if (grid[0] == 0 || grid[1] == 0 || grid[2] == 0 || grid[0] > 0x7fffffffu || grid[1] > 65535 || grid[2] > 65535)
        return emu_fail(err, err_len, "%s: bad launch: grid (%u,%u,%u) (x in 1..2^31-1, y, z in 1..65535)", name, grid[0],
                        grid[1], grid[2]);
    // No kernel opts in to more (cudaFuncAttributeMaxDynamicSharedMemorySize), so the
    // default limit applies; static shared memory is checked by ptxas (48 KiB).
    if (dyn_smem > 48 * 1024)
        return emu_fail(err, err_len, "%s: bad launch: %u bytes of dynamic shared memory over the 48 KiB default limit",
                        name, dyn_smem);
    if (t_emu) return emu_fail(err, err_len, "%s: launch from inside a kernel", name);
    EmuJob job;
    job.name = name;
    job.body = body;
    job.arg = arg;
    memcpy(job.grid, grid, sizeof job.grid);
    memcpy(job.block, block, sizeof job.block);
    job.nblocks = (uint64_t)grid[0] * grid[1] * grid[2];
    EmuWorkers& pool = emu_workers();
    // Helpers join when the launch has several blocks and no other launch holds them.
    const bool parallel = job.nblocks > 1 && !pool.threads.empty() && !pool.in_use.exchange(true);
    if (parallel) {
        {
            std::lock_guard<std::mutex> lk(pool.mu);
            pool.job = &job;
            pool.generation++;
        }
        pool.cv.notify_all();
    }
    emu_run_blocks(job);
    if (parallel) {
        std::unique_lock<std::mutex> lk(pool.mu);
        pool.job = nullptr;  // no helper joins from here on
        pool.done_cv.wait(lk, [&] { return job.finished == job.joined; });
        lk.unlock();
        pool.in_use.store(false);
    }
    if (job.failed.load()) {
        if (err && err_len) snprintf(err, err_len, "%s", job.msg);
        return 1;
    }
    return 0;
}

template <class P>
struct EmuCall {
    void (*kernel)(P);
    const P* p;
    static void run(void* a) {
        const EmuCall* c = (const EmuCall*)a;
        c->kernel(*c->p);
    }
};

// The body of every generated `cg_emu_NAME`: copies the parameter struct (the kernel's one
// by-value parameter, deduced from its signature) from `params` and runs the launch.
template <class P>
int emu_abi_launch(void (*kernel)(P), const char* name, unsigned max_threads, const uint32_t grid[3],
                   const uint32_t block[3], uint32_t dyn_smem, const void* params, char* err, size_t err_len) {
    static_assert(std::is_trivially_copyable_v<P>, "kernel parameters must be plain data");
    if (!grid || !block || !params) return emu_fail(err, err_len, "%s: null grid, block or params", name);
    P p;
    memcpy((void*)&p, params, sizeof(P));
    EmuCall<P> call{kernel, &p};
    return emu_run(name, &EmuCall<P>::run, &call, grid, block, dyn_smem, max_threads, err, err_len);
}

// For tools/emu/selftest_emu.cpp: run kernel(p) over grid x block; an error prints "EMU ERROR"
// and counts in emu_report().
template <class P>
void emu_launch(void (*kernel)(P), dim3 grid, dim3 block, const P& p) {
    const uint32_t g[3] = {grid.x, grid.y, grid.z}, b[3] = {block.x, block.y, block.z};
    char err[512];
    EmuCall<P> call{kernel, &p};
    if (emu_run("kernel", &EmuCall<P>::run, &call, g, b, 0, 0, err, sizeof err) != 0) emu_error(err);
}

// Prints the ldmatrix phase and bank-conflict counts and the emulator errors; returns the
// number of problems (bank conflicts count as one).
inline int emu_report() {
    const long phases = g_emu_ldm_phases.load(), conflicted = g_emu_ldm_conflicted.load();
    if (phases) std::printf("ldmatrix phases %ld, with bank conflicts %ld\n", phases, conflicted);
    if (g_emu_errors.load()) std::printf("emulator errors: %ld\n", g_emu_errors.load());
    return (conflicted ? 1 : 0) + (g_emu_errors.load() ? 1 : 0);
}
