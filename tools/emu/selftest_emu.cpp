// selftest_emu.cpp: the emulator's own semantics (kernels/emu.cuh), through the same entry
// point build.rs generates for the crate (emu_abi_launch): barriers with early exits, warp
// shuffles with a partial last warp, 3-D blocks, per-block shared memory, and the launch
// errors (bad shapes, __launch_bounds__, barrier deadlock, warp divergence, __trap, assert,
// misaligned cp.async), then launch timings of norm.cu kernels at the tiny preset's shapes.
// Run with tools/emu/run.sh; exits non-zero on failure.
#include "../../kernels/norm.cu"
#include "check.hpp"

#include <chrono>
#include <random>
#include <string>

struct TestParams {
    int* out;
    int n, mode;
};

// mode 0: block sum through shared memory after some threads exit early.
// mode 1: shuffle-xor warp sums (partial last warp: exited lanes keep their value).
// mode 2: 3-D block: out[linear] = packed thread and block indices.
// mode 3: deadlock (even warps at __syncthreads, odd warps: lane 0 at __syncthreads, the
//         rest at a shuffle).
// mode 4: warp divergence (lane 0 at __syncwarp, the others at a shuffle).
// mode 5: __trap in one thread; mode 6: assert; mode 7: misaligned cp.async.
static void test_impl(const TestParams& p) {
    __shared__ int acc[1024];
    const unsigned t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    const unsigned nt = blockDim.x * blockDim.y * blockDim.z;
    switch (p.mode) {
        case 0: {
            acc[t] = (int)t;
            __syncthreads();
            if (t % 3 == 1) return;  // drops out of the next barriers
            __syncthreads();
            if (t == 0) {
                int s = 0;
                for (unsigned i = 0; i < nt; ++i) s += acc[i];
                p.out[blockIdx.x] = s;
            }
            break;
        }
        case 1: {
            int v = (int)t;
            for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
            p.out[blockIdx.x * nt + t] = v;
            break;
        }
        case 2:
            p.out[(blockIdx.x * nt) + t] =
                (int)(threadIdx.x | threadIdx.y << 8 | threadIdx.z << 16 | blockIdx.x << 24);
            break;
        case 3:
            if (((t >> 5) & 1) && (t & 31) != 0) {
                (void)__shfl_xor_sync(0xffffffffu, 1, 1);
            }
            __syncthreads();
            break;
        case 4:
            if ((t & 31) == 0)
                __syncwarp();
            else
                (void)__shfl_xor_sync(0xffffffffu, 1, 1);
            break;
        case 5:
            if (t == 7 && blockIdx.x == 1) __trap();
            break;
        case 6: assert(t != 3); break;
        case 7: {
            __shared__ __align__(16) unsigned char buf[64];
            cp_async16(smem_addr(buf + 4), p.out, true);
            cp_async_commit();
            cp_async_wait<0>();
            break;
        }
    }
}
extern "C" __global__ void __launch_bounds__(512) emu_test_f32(const TestParams p) { test_impl(p); }

static int run(TestParams p, dim3 grid, dim3 block, std::string* err = nullptr) {
    const uint32_t g[3] = {grid.x, grid.y, grid.z}, b[3] = {block.x, block.y, block.z};
    char e[512];
    const int rc = emu_abi_launch(emu_test_f32, "emu_test_f32", 512, g, b, 0, &p, e, sizeof e);
    if (err) *err = e;
    return rc;
}

static void expect_error(const char* label, int mode, dim3 grid, dim3 block, const char* needle) {
    std::vector<int> out(4096);
    std::string e;
    const int rc = run({out.data(), 0, mode}, grid, block, &e);
    const bool ok = rc != 0 && e.find(needle) != std::string::npos;
    std::printf("%-4s %-40s %s\n", ok ? "ok" : "FAIL", label, e.c_str());
    if (!ok) failures++;
}

template <class F>
static double time_ms(int reps, F f) {
    const auto t0 = std::chrono::steady_clock::now();
    for (int i = 0; i < reps; ++i) f();
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count() / reps;
}

int main(int argc, char** argv) {
    const bool bench = argc > 1 && std::string(argv[1]) == "bench";
    {  // barrier with early exits, 5 blocks of 100 threads
        std::vector<int> out(5, -1);
        const int rc = run({out.data(), 0, 0}, {5, 1, 1}, {100, 1, 1});
        long bad = rc != 0;
        for (int v : out) bad += v != 99 * 100 / 2;
        check_exact("barrier after early exits (block sum)", bad);
    }
    {  // shuffles, partial last warp (70 threads: warps of 32, 32, 6)
        std::vector<int> out(140, -1);
        const int rc = run({out.data(), 0, 1}, {2, 1, 1}, {70, 1, 1});
        long bad = rc != 0;
        for (int b = 0; b < 2; ++b)
            for (int t = 0; t < 70; ++t) {
                const int w = t / 32;
                int want = 0;
                if (w < 2) {
                    for (int l = 0; l < 32; ++l) want += 32 * w + l;
                } else {  // lanes 6..31 do not exist: a shuffle from them returns the lane's own value
                    int v[32];
                    for (int l = 0; l < 32; ++l) v[l] = 64 + l;
                    for (int o = 16; o > 0; o >>= 1) {
                        int nv[32];
                        for (int l = 0; l < 32; ++l) nv[l] = v[l] + ((l ^ o) < 6 ? v[l ^ o] : v[l]);
                        for (int l = 0; l < 32; ++l) v[l] = nv[l];
                    }
                    want = v[t - 64];
                }
                bad += out[b * 70 + t] != want;
            }
        check_exact("warp shuffle sums, partial last warp", bad);
    }
    {  // 3-D block (8, 4, 3), 2 blocks
        std::vector<int> out(2 * 96, -1);
        const int rc = run({out.data(), 0, 2}, {2, 1, 1}, {8, 4, 3});
        long bad = rc != 0;
        for (int b = 0; b < 2; ++b)
            for (int z = 0; z < 3; ++z)
                for (int y = 0; y < 4; ++y)
                    for (int x = 0; x < 8; ++x)
                        bad += out[b * 96 + x + 8 * (y + 4 * z)] != (x | y << 8 | z << 16 | b << 24);
        check_exact("3-D block indices", bad);
    }
    expect_error("block over 1024 threads", 2, {1, 1, 1}, {1025, 1, 1}, "bad launch: block");
    expect_error("block over __launch_bounds__", 2, {1, 1, 1}, {640, 1, 1}, "__launch_bounds__(512)");
    expect_error("empty grid", 2, {0, 1, 1}, {32, 1, 1}, "bad launch: grid");
    expect_error("barrier deadlock", 3, {1, 1, 1}, {128, 1, 1}, "deadlock");
    expect_error("warp divergence", 4, {1, 1, 1}, {64, 1, 1}, "warp divergence");
    expect_error("__trap", 5, {2, 1, 1}, {32, 1, 1}, "block (1,0,0) thread (7,0,0): __trap()");
    expect_error("assert", 6, {1, 1, 1}, {32, 1, 1}, "assert(t != 3) failed");
    expect_error("misaligned cp.async", 7, {1, 1, 1}, {32, 1, 1}, "not 16-byte aligned");
    {  // a failed launch leaves nothing behind: the next one runs normally
        std::vector<int> out(5, -1);
        const int rc = run({out.data(), 0, 0}, {5, 1, 1}, {100, 1, 1});
        check_exact("launch after failed launches", rc != 0 || out[4] != 4950);
    }

    {  // the mma model the emulator runs equals the PTX-table reference, bitwise
        std::mt19937 g(7);
        long bad = 0;
        for (int rep = 0; rep < 200; ++rep) {
            EmuWarpState w;
            float want[32][4];
            for (int l = 0; l < 32; ++l) {
                for (int i = 0; i < 6; ++i) {  // random 16-bit values, no NaN/inf
                    const uint32_t lo = g() & 0x3fff, hi = g() & 0x3fff;
                    w.in[l][i] = (lo | (g() & 0x8000)) | (hi | (g() & 0x8000)) << 16;
                }
                for (int i = 6; i < 10; ++i) {
                    const float c = (float)(int)(g() % 2001 - 1000) / 64.f;
                    memcpy(&w.in[l][i], &c, 4);
                }
            }
            for (int t = 0; t < 2; ++t) {
                if (t == 0) {
                    emu_mma_all<__nv_bfloat16>(w);
                    emu_mma_reference<__nv_bfloat16>(w.in, want);
                } else {
                    emu_mma_all<__half>(w);
                    emu_mma_reference<__half>(w.in, want);
                }
                bad += memcmp(w.out, want, sizeof want) != 0;
            }
        }
        check_exact("mma m16n8k16 model == PTX-table reference (bf16, f16)", bad);
    }
    if (!bench) return finish();
    // Launch timings at the tiny preset's shapes (hidden 64; 256 tokens at the last scale,
    // x2 with guidance) and a large one.
    for (int tokens : {512, 8192}) {
        const int c = 64;
        std::vector<float> x((size_t)tokens * c, 0.5f), w(c, 1.f), y((size_t)tokens * c, 1.f), b(c, 1.f);
        std::vector<__nv_bfloat16> out((size_t)tokens * c);
        // Designated initializers: a reordered or renamed field is a compile error here too.
        RmsNormParams rp{.x = x.data(), .w = w.data(), .modulation = nullptr, .out = out.data(),
                         .tokens = tokens, .n = 1, .c = c, .mod_offset = 0, .mod_stride = 0, .eps = 1e-6f};
        AddBiasParams ap{.y = y.data(), .b = b.data(), .rows = tokens, .n = c};
        const unsigned gb = (unsigned)std::min((tokens * c + 255) / 256, 4096);
        const double rms = time_ms(5, [&] { emu_launch(rmsnorm_adaln_bf16, {(unsigned)tokens, 1, 1}, {256, 1, 1}, rp); });
        const double bias = time_ms(5, [&] { emu_launch(add_bias_f32, {gb, 1, 1}, {256, 1, 1}, ap); });
        std::printf("time rmsnorm_adaln_bf16 %5d x %d (grid %d x 256): %8.3f ms   add_bias_f32 (grid %u x 256): %8.3f ms\n",
                    tokens, c, tokens, rms, gb, bias);
    }
    return finish();
}
