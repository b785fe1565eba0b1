// ffn.cu: the transformer FFN's gate, h = silu(a @ w1^T) * (a @ w3^T), as ONE tensor-core GEMM
// launch with SwiGLU in its epilogue. Why here: unfused it is a cuBLAS GEMM writing
// g (M, 2F) bf16 and a silu_mul pass reading it back (norm.cu), two launches per layer and
// g's write and read; fused, g lives only in registers. Host side src/cuda/ffn.rs, reference
// cpu::ops::ffn::swiglu (the composition matmul + silu_mul).
//
// swiglu_tc_m{64,128}: h (M, F) bf16 = silu(g1) * g3 with g = a @ w^T, where
//   a   (M, K) bf16 row-major (the FFN norm's output, K = C)
//   w   (2F, K) bf16 row-major, w1 and w3 INTERLEAVED by row at load time: row 2j = w1 row j,
//       row 2j+1 = w3 row j (src/cuda/ffn.rs interleave_gate_up), so GEMM column 2j is g1_j
//       and column 2j+1 is g3_j: the mma accumulator pair a thread holds (c0, c1) = columns
//       (2t, 2t+1) of its 16x8 tile is exactly (g1_j, g3_j) of one output h_j.
//   h   (M, F) bf16 row-major.
// Mainloop (the conv3x3_tc design of decoder.cu, with a plain row-major A): block tile
// BM x BN x 32, warps WM (M) x WN (N), warp tile (BM/WM) x (BN/WN) of mma.sync.m16n8k16
// (bf16 in, f32 accumulate); A and B tiles global -> shared by 16-byte cp.async (zero-fill
// for rows past M and past 2F), STAGES-deep pipeline, 64-byte rows XOR-swizzled so that
// ldmatrix.x4 is bank-conflict free.
//   swiglu_tc_m128: 128 x 128 tile, 8 warps (2 x 4, warp tile 64 x 32), 3 stages (48 KiB);
//   swiglu_tc_m64:  64 x 64 tile, 4 warps (2 x 2, warp tile 32 x 32), 4 stages (32 KiB),
//                   for small M (the batch-1 steps), where the 128 tile leaves most SMs idle.
//   launch: grid (ceil(M/BM), ceil(2F/BN)), block 32 * WM * WN. Needs K % 32 == 0 (checked
//   by the launcher) and 16-byte aligned a and w; any M and F (tails zero-filled, masked).
//
// Batch invariance by construction: there is no split-K and no reduction across threads.
// Every output's accumulator is summed by one thread over k = 0, 16, 32, ... K-16 in that
// order (one mma per 16-wide k step, k tiles ascending), in both tile variants, whatever M
// is and whichever tile or fragment row a token falls in; the epilogue is elementwise. So a
// row's h depends only on that row of a and on w, never on M or on the variant the launcher
// picks for M (tests/gpu_swiglu.rs checks rows bitwise across M on the emulator; the GPU
// bundle runs the same test on hardware, where the mma's internal order is also fixed per
// element).
//
// Numerics, as the unfused composition it replaces (cuBLAS bf16 GEMM, then silu_mul): f32
// accumulation; g1 and g3 rounded to bf16 first (what the GEMM stored as g), then
// h = bf16( g1 / (1 + exp(-g1)) * g3 ) in f32 with __expf, the formula of norm.cu's silu_mul.
#include "common.cuh"

// =============================================================================================
// CUDA kernels
// =============================================================================================

struct SwigluParams {
    const __nv_bfloat16* a;  // (M, K)
    const __nv_bfloat16* w;  // (2F, K), w1/w3 rows interleaved
    __nv_bfloat16* h;        // (M, F)
    int m, f, k;
};
static_assert(sizeof(SwigluParams) == 40, "SwigluParams: mirrored in src/cuda/ffn.rs");

#define FFN_BK 32

// Byte offset of 16-byte chunk c (0..3) of row r in a [rows][32] bf16 tile (64-byte rows),
// chunks XOR-swizzled with (r >> 1) & 3: the 8 rows one ldmatrix matrix reads (the same
// logical chunk) land in 8 different 16-byte bank groups. (decoder.cu's tile_off.)
__device__ __forceinline__ uint32_t ffn_tile_off(int r, int c) {
    return (uint32_t)(r * 64 + ((c ^ ((r >> 1) & 3)) << 4));
}

template <int BM, int BN, int WM, int WN, int STAGES>
__device__ __forceinline__ void swiglu_tc_impl(const SwigluParams& p) {
    constexpr int NT = 32 * WM * WN;          // threads
    constexpr int WTM = BM / WM, WTN = BN / WN;  // warp tile
    constexpr int MI = WTM / 16, NJ = WTN / 8;   // mma tiles per warp
    constexpr int A_BYTES = BM * FFN_BK * 2, STAGE_BYTES = (BM + BN) * FFN_BK * 2;
    constexpr int A_PER = BM * 4 / NT, B_PER = BN * 4 / NT;  // 16-byte chunks per thread
    static_assert(MI >= 1 && NJ >= 2 && NJ % 2 == 0, "warp tile");
    static_assert(A_PER >= 1 && B_PER >= 1 && BM * 4 % NT == 0 && BN * 4 % NT == 0, "loader");
    static_assert(STAGES * STAGE_BYTES <= 48 * 1024, "static shared memory");
    __shared__ __align__(128) unsigned char smem[STAGES * STAGE_BYTES];

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp / WN, warp_n = warp % WN;
    const int n2 = 2 * p.f;  // GEMM columns
    const int KT = p.k / FFN_BK;
    const int m0 = blockIdx.x * BM, n0 = blockIdx.y * BN;

    // Loader mapping: thread copies chunk lc (8 k values) of tile rows lr + i * NT/4. Rows past
    // M or 2F are zero-filled (nothing read) and their source clamped to row 0.
    const int lc = tid & 3, lr = tid >> 2;
    const __nv_bfloat16* a_src[A_PER];
    const __nv_bfloat16* b_src[B_PER];
    bool a_ok[A_PER], b_ok[B_PER];
#pragma unroll
    for (int i = 0; i < A_PER; ++i) {
        const int m = m0 + lr + i * (NT / 4);
        a_ok[i] = m < p.m;
        a_src[i] = p.a + (size_t)(a_ok[i] ? m : 0) * p.k + lc * 8;
    }
#pragma unroll
    for (int i = 0; i < B_PER; ++i) {
        const int n = n0 + lr + i * (NT / 4);
        b_ok[i] = n < n2;
        b_src[i] = p.w + (size_t)(b_ok[i] ? n : 0) * p.k + lc * 8;
    }
    auto load_tile = [&](int kt, int stage) {
        const int k0 = kt * FFN_BK;
        const uint32_t sa = smem_addr(smem + stage * STAGE_BYTES);
        const uint32_t sb = sa + A_BYTES;
#pragma unroll
        for (int i = 0; i < A_PER; ++i)
            cp_async16(sa + ffn_tile_off(lr + i * (NT / 4), lc), a_src[i] + k0, a_ok[i]);
#pragma unroll
        for (int i = 0; i < B_PER; ++i)
            cp_async16(sb + ffn_tile_off(lr + i * (NT / 4), lc), b_src[i] + k0, b_ok[i]);
    };

    float acc[MI][NJ][4];
#pragma unroll
    for (int i = 0; i < MI; ++i)
#pragma unroll
        for (int j = 0; j < NJ; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
        if (s < KT) load_tile(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        // Tile kt has landed (at most STAGES-2 younger groups pending); the barrier also tells
        // every warp that the stage read at kt-1 is free for the prefetch below.
        cp_async_wait<STAGES - 2>();
        __syncthreads();
        const int nk = kt + STAGES - 1;
        if (nk < KT) load_tile(nk, nk % STAGES);
        cp_async_commit();

        const uint32_t sa = smem_addr(smem + (kt % STAGES) * STAGE_BYTES);
        const uint32_t sb = sa + A_BYTES;
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {  // two k16 steps per 32-wide tile, ascending
            uint32_t af[MI][4], bfr[NJ][2];
#pragma unroll
            for (int mi = 0; mi < MI; ++mi) {
                // matrices: rows 0-7/8-15 (lane bit 3) x k 0-7/8-15 (lane bit 4) = a0..a3
                const int r = warp_m * WTM + mi * 16 + (lane & 15);
                ldmatrix_x4(af[mi][0], af[mi][1], af[mi][2], af[mi][3],
                            sa + ffn_tile_off(r, kk * 2 + (lane >> 4)));
            }
#pragma unroll
            for (int nj = 0; nj < NJ / 2; ++nj) {
                // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
                const int r = warp_n * WTN + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
                ldmatrix_x4(bfr[2 * nj][0], bfr[2 * nj][1], bfr[2 * nj + 1][0],
                            bfr[2 * nj + 1][1], sb + ffn_tile_off(r, kk * 2 + ((lane >> 3) & 1)));
            }
#pragma unroll
            for (int mi = 0; mi < MI; ++mi)
#pragma unroll
                for (int nj = 0; nj < NJ; ++nj) mma_16816<__nv_bfloat16>(acc[mi][nj], af[mi], bfr[nj]);
        }
    }
    cp_async_wait<0>();

    // Epilogue: accumulator (mi, nj, e) is row (lane>>2) + 8*(e>>1), column 2*(lane&3) + (e&1)
    // of the 16x8 tile (mi, nj); the even column is g1_j, the odd one g3_j, j = column / 2.
#pragma unroll
    for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
        for (int nj = 0; nj < NJ; ++nj) {
            const int j = (n0 + warp_n * WTN + nj * 8) / 2 + (lane & 3);
            if (j >= p.f) continue;
#pragma unroll
            for (int hh = 0; hh < 2; ++hh) {
                const int row = m0 + warp_m * WTM + mi * 16 + (lane >> 2) + 8 * hh;
                if (row >= p.m) continue;
                const float g1 = bf2f(f2bf(acc[mi][nj][2 * hh]));
                const float g3 = bf2f(f2bf(acc[mi][nj][2 * hh + 1]));
                p.h[(size_t)row * p.f + j] = f2bf(g1 / (1.f + __expf(-g1)) * g3);
            }
        }
    }
}

// =============================================================================================
// Entry points: extern "C", named <op>_<variant>_<dtype>, one declaration per line (build.rs
// registers each as a k::* constant for src/cuda/), each with __launch_bounds__(the largest block
// its launcher uses): the registry records it, Gpu::launch refuses a larger block, and
// scripts/kernel-resources.sh checks registers and shared memory against it
// =============================================================================================

extern "C" __global__ void __launch_bounds__(256, 2) swiglu_tc_m128_bf16(const SwigluParams p) { swiglu_tc_impl<128, 128, 2, 4, 3>(p); }
extern "C" __global__ void __launch_bounds__(128, 4) swiglu_tc_m64_bf16(const SwigluParams p) { swiglu_tc_impl<64, 64, 2, 2, 4>(p); }
