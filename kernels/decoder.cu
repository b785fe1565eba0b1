// decoder.cu: the VQ decoder (SPEC.md section 7) on NHWC activations; host side in
// src/cuda/decoder.rs, f32 oracle in src/cpu/decoder.rs. Why here: decoding is ~0.25 TFLOP per
// 256 px image (PERF.md); its 3x3 convs, GroupNorm and the glue kernels run on the device
// next to the sampler so activations never leave it (1x1 convs and attention GEMMs: cuBLAS).
//
// 16-bit storage type T: every kernel that reads or writes 16-bit values is instantiated for
// bf16 (__nv_bfloat16, suffix _bf16) and fp16 (__half, suffix _f16); the host picks one per
// decoder (fp16 by default: 3 more mantissa bits, see PERF.md "VQ decoder"). The kernels
// without tensor cores are also instantiated for f32 storage (suffix _f32: conv3x3_direct,
// conv3x3_down_direct, conv3x3_narrow, gn_apply, cast_f32, attn_softmax): the encoder's exact
// mode (src/cuda/decoder/encoder.rs), where a near-tie of the nearest code must resolve as on
// the CPU.
//
// Layouts (row-major, innermost last):
//   activations   (B, H, W, C) NHWC: the residual stream and conv outputs f32, conv inputs
//                 (GroupNorm outputs, casts) T. NHWC makes a 1x1 conv a plain GEMM
//                 (B*H*W, Cin) x (Cout, Cin)^T (cuBLAS, see gemm.rs) and gives a 3x3 conv
//                 contiguous Cin runs per (pixel, tap) for the implicit GEMM below.
//   conv3x3 weight (Cout, 3, 3, Cin) T = row-major (Cout, K), K = 9*Cin, k = (ky*3+kx)*Cin+ci
//                 (PyTorch (Cout, Cin, 3, 3) permuted at load time); bias (Cout) f32.
//
// conv3x3_direct (the on-device reference): y[b,oy,ox,co] = bias[co] (+ res[b,oy,ox,co])
//   + sum_{ky,kx,ci} x[b, iy, ix, ci] * w[co, ky, kx, ci], padding 1, where (iy, ix) =
//   (oy+ky-1, ox+kx-1), or (that >> 1) when `upsample` (nearest x2 upsample fused into the
//   input indexing: the conv runs on the 2Hin x 2Win upsampled image, padded by 1 there).
//   One thread per output element (co fastest), grid-stride; f32 accumulation. Slow and
//   obviously right.
// conv3x3_tc: the same conv as an implicit GEMM on 16-bit tensor cores:
//   Y (M = B*H*W, N = Cout) = A (M, K) W^T (N, K), A[m, k] = x at pixel m shifted by tap(k).
//   Block tile 128 x 128 x 32, 256 threads = 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 =
//   4 x 4 mma.sync.m16n8k16 (T in, f32 accumulate, 64 accumulators per thread).
//   A and B tiles go global -> shared with 16-byte cp.async (zero-fill for padding, rows past
//   M and channels past Cout), 3-stage pipeline (48 KiB static shared memory), XOR-swizzled
//   64-byte rows so ldmatrix.x4 is bank-conflict free. Needs Cin % 32 == 0 (a 32-wide K tile
//   stays inside one tap); any Cout (the tail tile is zero-padded). Epilogue from registers:
//   + bias (+ residual, which may alias y: each element is read then written by one thread).
//   launch: grid (ceil(M/128), ceil(Cout/128)), block 256.
// conv3x3_down_{direct,tc}: the encoder's Downsample (SPEC.md section 9; cpu::ops::conv2d_down),
//   the same two kernels instantiated with DOWN: x (B, 2H, 2W, Cin) zero-padded right and
//   bottom by 1, 3x3 conv at stride 2 without other padding, y (B, H, W, Cout):
//   y[b,oy,ox,co] = bias[co] + sum x[b, 2oy+ky, 2ox+kx, ci] w[co,ky,kx,ci] over taps inside
//   the input; `upsample` must be 0. Same tiles, launch shapes and numerics as above.
// conv3x3_narrow: the same conv for Cout <= 8 (conv_out: 3 channels, where the 128-wide N
//   tile is >97 % padding): one thread per output pixel, all Cout channels in registers, the
//   weights staged in 32 KiB of shared memory; same summation order as conv3x3_direct.
//   launch: grid-stride over B*H*W pixels, block 256.
// gn_partial / gn_finalize / gn_apply: GroupNorm (32 groups, affine, biased variance) + SiLU.
//   x (B, HW, C) f32 -> y (B, HW, C) T. Statistics in f32 and numerically safe for large
//   means: gn_partial reduces chunks of GN_CHUNK pixels per channel to (mean, M2) around a
//   per-chunk shift (the chunk's first pixel), gn_finalize merges them per (b, group) with
//   the parallel-variance formula (M2 = sum M2_i + n_i (mean_i - mean)^2) and writes the
//   folded per-channel (scale, shift), gn_apply is elementwise (float4 in, 4 x T out).
// cast_f32: y = T(x), n elements (round to nearest; fp16 overflow gives inf, not a clamp).
// gather_codes: z (B*s*s, e) T = codebook[tokens] L2-normalized (eps 1e-12) when asked;
//   an out-of-range token writes NaN (the host API checks host tokens first).
// attn_softmax: P (rows, N) T = softmax(S * scale) per row, S f32; one block per row.
// dec_pixels: y (B, H*W, 3) f32 NHWC -> (B, 3, H, W) f32 and/or 8-bit
//   clamp((x+1)/2, 0, 1)*255 truncated (the same f32 operations as cpu::decoder::to_pixels_u8).
#include "common.cuh"

// =============================================================================================
// CUDA kernels
// =============================================================================================

// 16-bit storage helpers, overloaded for bf16 and fp16.
__device__ __forceinline__ float to_f32(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(float v) { return v; }
template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ __nv_bfloat16 from_f32<__nv_bfloat16>(float v) {
    return __float2bfloat16(v);
}
template <>
__device__ __forceinline__ __half from_f32<__half>(float v) {
    return __float2half(v);
}
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
    return v;
}
__device__ __forceinline__ uint32_t bits16(__nv_bfloat16 v) {
    return ((__nv_bfloat16_raw)v).x;
}
__device__ __forceinline__ uint32_t bits16(__half v) { return ((__half_raw)v).x; }

// Store 4 consecutive values o[0..4] as T at y[4i .. 4i+4): one 8-byte word for a 16-bit T,
// one float4 for f32.
template <typename T>
__device__ __forceinline__ void store4(T* y, size_t i, const float* o) {
    uint2 packed;
    packed.x = bits16(from_f32<T>(o[0])) | (bits16(from_f32<T>(o[1])) << 16);
    packed.y = bits16(from_f32<T>(o[2])) | (bits16(from_f32<T>(o[3])) << 16);
    ((uint2*)y)[i] = packed;
}
__device__ __forceinline__ void store4(float* y, size_t i, const float* o) {
    ((float4*)y)[i] = make_float4(o[0], o[1], o[2], o[3]);
}

// ---------------------------------------------------------------------------------------------
// 3x3 convolution

struct Conv3x3Params {
    const void* x;         // (B, Hin, Win, Cin) T
    const void* w;         // (Cout, 3, 3, Cin) T
    const float* bias;     // (Cout)
    const float* residual; // (B, H, W, Cout) or null; may equal y
    float* y;              // (B, H, W, Cout)
    int batch, height, width;     // output (= upsampled input) size
    int cin, cout, upsample;
};
static_assert(sizeof(Conv3x3Params) == 64, "Conv3x3Params: mirrored in src/cuda/decoder.rs");

// The Cin input values conv tap (ky, kx) of output pixel (b, oy, ox) reads (the nearest x2
// upsample folded into the indexing), or null where the tap falls in the padding. DOWN: the
// encoder's Downsample, input (2H, 2W), tap (2oy + ky, 2ox + kx), zero padding right and
// bottom only.
template <typename T, bool DOWN>
__device__ __forceinline__ const T* conv_tap(const Conv3x3Params& p, int b, int oy, int ox,
                                             int ky, int kx) {
    if (DOWN) {
        const int iy = 2 * oy + ky, ix = 2 * ox + kx;
        if (iy >= 2 * p.height || ix >= 2 * p.width) return nullptr;
        return (const T*)p.x + (((size_t)b * 2 * p.height + iy) * 2 * p.width + ix) * p.cin;
    }
    const int yy = oy + ky - 1, xx = ox + kx - 1;  // in the (upsampled) input
    if (yy < 0 || yy >= p.height || xx < 0 || xx >= p.width) return nullptr;
    const int hin = p.upsample ? p.height >> 1 : p.height;
    const int win = p.upsample ? p.width >> 1 : p.width;
    const int iy = p.upsample ? yy >> 1 : yy, ix = p.upsample ? xx >> 1 : xx;
    return (const T*)p.x + (((size_t)b * hin + iy) * win + ix) * p.cin;
}

template <typename T, bool DOWN>
__device__ __forceinline__ void conv3x3_direct_impl(const Conv3x3Params& p) {
    const size_t total = (size_t)p.batch * p.height * p.width * p.cout;
    const T* w = (const T*)p.w;             // (cout, 3, 3, cin)
    const float* bias = p.bias;     // (cout)
    const float* res = p.residual;  // (B, H, W, cout) or null
    float* y = p.y;                 // (B, H, W, cout)
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int co = (int)(i % p.cout);
        const size_t m = i / p.cout;  // output pixel (b, oy, ox)
        const int ox = (int)(m % p.width);
        const int oy = (int)((m / p.width) % p.height);
        const int b = (int)(m / ((size_t)p.width * p.height));
        float acc = 0.f;
        for (int ky = 0; ky < 3; ++ky) {
            for (int kx = 0; kx < 3; ++kx) {
                const T* xp = conv_tap<T, DOWN>(p, b, oy, ox, ky, kx);
                if (!xp) continue;
                const T* wp = w + ((size_t)co * 9 + ky * 3 + kx) * p.cin;
                for (int ci = 0; ci < p.cin; ++ci) acc += to_f32(xp[ci]) * to_f32(wp[ci]);
            }
        }
        float v = acc + bias[co];
        if (res) v += res[i];
        y[i] = v;
    }
}

// conv3x3_narrow: convs with few output channels (the decoder's conv_out, Cout = 3), where
// the tensor-core tile (128 output channels) would be >97 % padding. One thread per output
// pixel computes all Cout <= NARROW_MAX_COUT channels; the block stages the whole weight
// tensor in shared memory (the launcher checks Cout*9*Cin*sizeof(T) <= NARROW_W_BYTES), and
// every thread reads the same weight at a time (a broadcast). Sums in the order of
// conv3x3_direct (taps, then Cin), f32.
#define NARROW_MAX_COUT 8
#define NARROW_W_BYTES 32768

template <typename T>
__device__ __forceinline__ void conv3x3_narrow_impl(const Conv3x3Params& p) {
    __shared__ __align__(16) unsigned char wsm[NARROW_W_BYTES];
    T* ws = (T*)wsm;  // (cout, 3, 3, cin)
    const T* w = (const T*)p.w;
    const int nw = p.cout * 9 * p.cin;
    for (int i = threadIdx.x; i < nw; i += blockDim.x) ws[i] = w[i];
    __syncthreads();
    const int hw = p.height * p.width;
    const int total = p.batch * hw;  // < 2^31: checked by the launcher
    for (int m = blockIdx.x * blockDim.x + threadIdx.x; m < total; m += gridDim.x * blockDim.x) {
        const int b = m / hw, q = m - b * hw;
        const int oy = q / p.width, ox = q - oy * p.width;
        float acc[NARROW_MAX_COUT];
#pragma unroll
        for (int co = 0; co < NARROW_MAX_COUT; ++co) acc[co] = 0.f;
        for (int ky = 0; ky < 3; ++ky) {
            for (int kx = 0; kx < 3; ++kx) {
                const T* xp = conv_tap<T, false>(p, b, oy, ox, ky, kx);
                if (!xp) continue;
                const T* wt = ws + (ky * 3 + kx) * p.cin;
                for (int ci = 0; ci < p.cin; ++ci) {
                    const float xv = to_f32(xp[ci]);
#pragma unroll
                    for (int co = 0; co < NARROW_MAX_COUT; ++co)
                        if (co < p.cout) acc[co] += xv * to_f32(wt[co * 9 * p.cin + ci]);
                }
            }
        }
        float* y = p.y + (size_t)m * p.cout;
        const float* res = p.residual ? p.residual + (size_t)m * p.cout : nullptr;
#pragma unroll
        for (int co = 0; co < NARROW_MAX_COUT; ++co) {
            if (co >= p.cout) break;
            float v = acc[co] + p.bias[co];
            if (res) v += res[co];
            y[co] = v;
        }
    }
}

#define TC_BM 128
#define TC_BN 128
#define TC_BK 32
#define TC_STAGES 3
#define TC_A_BYTES (TC_BM * TC_BK * 2)
#define TC_STAGE_BYTES ((TC_BM + TC_BN) * TC_BK * 2)

// Byte offset of 16-byte chunk c (0..3) of row r in a [rows][32] 16-bit tile (64-byte rows).
// Chunks are XOR-swizzled with (r >> 1) & 3 so that the 8 rows one ldmatrix matrix reads
// (same logical chunk) land in 8 different 16-byte bank groups.
__device__ __forceinline__ uint32_t tile_off(int r, int c) {
    return (uint32_t)(r * 64 + ((c ^ ((r >> 1) & 3)) << 4));
}

template <typename T, bool DOWN>
__device__ __forceinline__ void conv3x3_tc_impl(const Conv3x3Params& p) {
    __shared__ __align__(128) unsigned char smem[TC_STAGES * TC_STAGE_BYTES];  // 48 KiB
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp >> 2;  // 0..1: rows warp_m*64 .. +64 of the block tile
    const int warp_n = warp & 3;   // 0..3: cols warp_n*32 .. +32
    const int M = p.batch * p.height * p.width;
    const int K = 9 * p.cin;
    const int KT = K / TC_BK;
    const int m0 = blockIdx.x * TC_BM, n0 = blockIdx.y * TC_BN;
    const int hin = DOWN ? 2 * p.height : p.upsample ? p.height >> 1 : p.height;
    const int win = DOWN ? 2 * p.width : p.upsample ? p.width >> 1 : p.width;
    const T* x = (const T*)p.x;  // (B, hin, win, cin)
    const T* w = (const T*)p.w;  // (cout, K)

    // Loader mapping: thread copies 16-byte chunk lc (8 channels) of tile rows lr and lr + 64,
    // for A (pixels) and for B (output channels).
    const int lc = tid & 3, lr = tid >> 2;
    int a_b[2], a_y[2], a_x[2];
    bool a_ok[2], b_ok[2];
    const T* b_src[2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        const int m = m0 + lr + i * 64;
        a_ok[i] = m < M;
        const int mm = a_ok[i] ? m : 0;
        a_x[i] = mm % p.width;
        a_y[i] = (mm / p.width) % p.height;
        a_b[i] = mm / (p.width * p.height);
        const int n = n0 + lr + i * 64;
        b_ok[i] = n < p.cout;
        b_src[i] = w + (size_t)(b_ok[i] ? n : 0) * K + lc * 8;
    }

    auto load_tile = [&](int kt, int stage) {
        const int k0 = kt * TC_BK;
        const int tap = k0 / p.cin;
        const int ci = k0 - tap * p.cin + lc * 8;
        const int ky = tap / 3, kx = tap - 3 * (tap / 3);
        const uint32_t sa = smem_addr(smem + stage * TC_STAGE_BYTES);
        const uint32_t sb = sa + TC_A_BYTES;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            // DOWN: input pixel (2y + ky, 2x + kx), padded right and bottom only.
            const int yy = DOWN ? 2 * a_y[i] + ky : a_y[i] + ky - 1;
            const int xx = DOWN ? 2 * a_x[i] + kx : a_x[i] + kx - 1;
            const bool ok = DOWN ? a_ok[i] && yy < hin && xx < win
                                 : a_ok[i] && yy >= 0 && yy < p.height && xx >= 0 && xx < p.width;
            const T* src = x;
            if (ok) {
                const int iy = !DOWN && p.upsample ? yy >> 1 : yy;
                const int ix = !DOWN && p.upsample ? xx >> 1 : xx;
                src = x + (((size_t)a_b[i] * hin + iy) * win + ix) * p.cin + ci;
            }
            cp_async16(sa + tile_off(lr + i * 64, lc), src, ok);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) cp_async16(sb + tile_off(lr + i * 64, lc), b_src[i] + k0, b_ok[i]);
    };

    float acc[4][4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < KT) load_tile(s, s);
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        // Tile kt has landed (at most STAGES-2 younger groups pending); the barrier also
        // tells every warp that the stage read at kt-1 is free for the prefetch below.
        cp_async_wait<TC_STAGES - 2>();
        __syncthreads();
        const int nk = kt + TC_STAGES - 1;
        if (nk < KT) load_tile(nk, nk % TC_STAGES);
        cp_async_commit();

        const uint32_t sa = smem_addr(smem + (kt % TC_STAGES) * TC_STAGE_BYTES);
        const uint32_t sb = sa + TC_A_BYTES;
#pragma unroll
        for (int kk = 0; kk < 2; ++kk) {  // two k16 steps per 32-wide tile
            uint32_t af[4][4], bfr[4][2];
#pragma unroll
            for (int mi = 0; mi < 4; ++mi) {
                // matrices: rows 0-7/8-15 (lane bit 3) x k 0-7/8-15 (lane bit 4) = a0..a3
                const int r = warp_m * 64 + mi * 16 + (lane & 15);
                ldmatrix_x4(af[mi][0], af[mi][1], af[mi][2], af[mi][3],
                            sa + tile_off(r, kk * 2 + (lane >> 4)));
            }
#pragma unroll
            for (int nj = 0; nj < 2; ++nj) {
                // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
                const int r = warp_n * 32 + nj * 16 + (lane & 7) + ((lane >> 4) << 3);
                ldmatrix_x4(bfr[2 * nj][0], bfr[2 * nj][1], bfr[2 * nj + 1][0], bfr[2 * nj + 1][1],
                            sb + tile_off(r, kk * 2 + ((lane >> 3) & 1)));
            }
#pragma unroll
            for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                for (int nj = 0; nj < 4; ++nj) mma_16816<T>(acc[mi][nj], af[mi], bfr[nj]);
        }
    }
    cp_async_wait<0>();

    // Epilogue: accumulator (mi, nj, e) is row (lane>>2) + 8*(e>>1), col 2*(lane&3) + (e&1)
    // of the 16x8 tile (mi, nj).
    const float* bias = p.bias;
    const float* res = p.residual;
    float* y = p.y;
    const bool pairs = (p.cout & 1) == 0;
#pragma unroll
    for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
        for (int nj = 0; nj < 4; ++nj) {
            const int col = n0 + warp_n * 32 + nj * 8 + 2 * (lane & 3);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int row = m0 + warp_m * 64 + mi * 16 + (lane >> 2) + 8 * h;
                if (row >= M) continue;
                const size_t o = (size_t)row * p.cout + col;
                const float v0 = acc[mi][nj][2 * h], v1 = acc[mi][nj][2 * h + 1];
                if (pairs && col + 1 < p.cout) {
                    float2 r = make_float2(v0 + bias[col], v1 + bias[col + 1]);
                    if (res) {
                        const float2 q = *(const float2*)(res + o);
                        r.x += q.x;
                        r.y += q.y;
                    }
                    *(float2*)(y + o) = r;
                } else {
                    if (col < p.cout) y[o] = v0 + bias[col] + (res ? res[o] : 0.f);
                    if (col + 1 < p.cout) y[o + 1] = v1 + bias[col + 1] + (res ? res[o + 1] : 0.f);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU)

#define GN_GROUPS 32

struct GnPartialParams {
    const float* x;  // (B, hw, c)
    float* part;     // (B, nchunk, c, 2): (mean, M2) per chunk and channel
    int batch, hw, c, chunk, nchunk;
};
static_assert(sizeof(GnPartialParams) == 40, "GnPartialParams: mirrored in src/cuda/decoder.rs");

// grid (nchunk, B), block 256; needs c % 4 == 0 and c <= 1024. Thread = (row r, float4 column
// col); rows = 256 / (c/4) pixels are read per iteration.
__device__ __forceinline__ void gn_partial_impl(const GnPartialParams& p) {
    __shared__ float4 s1[256], s2[256];
    const int chunk = blockIdx.x, b = blockIdx.y;
    const int cols = p.c >> 2, rows = blockDim.x / cols;
    const int col = threadIdx.x % cols, r = threadIdx.x / cols;
    const int p0 = chunk * p.chunk, p1 = min(p0 + p.chunk, p.hw);
    const float4* x = (const float4*)(p.x + (size_t)b * p.hw * p.c);
    // Every row of a column uses the same shift: the chunk's first pixel.
    const float4 sh = x[(size_t)p0 * cols + col];
    float4 a1 = make_float4(0.f, 0.f, 0.f, 0.f), a2 = a1;
    if (r < rows) {
        for (int q = p0 + r; q < p1; q += rows) {
            const float4 v = x[(size_t)q * cols + col];
            const float dx = v.x - sh.x, dy = v.y - sh.y, dz = v.z - sh.z, dw = v.w - sh.w;
            a1.x += dx; a1.y += dy; a1.z += dz; a1.w += dw;
            a2.x += dx * dx; a2.y += dy * dy; a2.z += dz * dz; a2.w += dw * dw;
        }
    }
    s1[threadIdx.x] = a1;
    s2[threadIdx.x] = a2;
    __syncthreads();
    if (r != 0) return;
    for (int k = 1; k < rows; ++k) {
        const float4 u = s1[k * cols + col], v = s2[k * cols + col];
        a1.x += u.x; a1.y += u.y; a1.z += u.z; a1.w += u.w;
        a2.x += v.x; a2.y += v.y; a2.z += v.z; a2.w += v.w;
    }
    const float n = (float)(p1 - p0);
    const float s1v[4] = {a1.x, a1.y, a1.z, a1.w}, s2v[4] = {a2.x, a2.y, a2.z, a2.w};
    const float shv[4] = {sh.x, sh.y, sh.z, sh.w};
    float* out = p.part + (((size_t)b * p.nchunk + chunk) * p.c + col * 4) * 2;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        out[2 * j] = shv[j] + s1v[j] / n;
        out[2 * j + 1] = fmaxf(s2v[j] - s1v[j] * s1v[j] / n, 0.f);
    }
}

struct GnFinalizeParams {
    const float* part;            // (B, nchunk, c, 2)
    const float *gamma, *beta;    // (c)
    float* ss;                    // (B, c, 2): per-channel (scale, shift)
    int batch, hw, c, chunk, nchunk;
    float eps;
};
static_assert(sizeof(GnFinalizeParams) == 56, "GnFinalizeParams: mirrored in src/cuda/decoder.rs");

// grid (32, B), block 256: one block per (group, image).
__device__ __forceinline__ void gn_finalize_impl(const GnFinalizeParams& p) {
    __shared__ float scratch[32];
    const int g = blockIdx.x, b = blockIdx.y, cpg = p.c / GN_GROUPS;
    const float* part = p.part + (size_t)b * p.nchunk * p.c * 2;
    const int ne = p.nchunk * cpg;
    float s = 0.f;
    for (int e = threadIdx.x; e < ne; e += blockDim.x) {
        const int k = e / cpg, c = g * cpg + e % cpg;
        const float n = (float)min(p.chunk, p.hw - k * p.chunk);
        s += n * part[((size_t)k * p.c + c) * 2];
    }
    const float total = (float)p.hw * (float)cpg;
    const float mean = block_sum(s, scratch) / total;
    float m2 = 0.f;
    for (int e = threadIdx.x; e < ne; e += blockDim.x) {
        const int k = e / cpg, c = g * cpg + e % cpg;
        const float n = (float)min(p.chunk, p.hw - k * p.chunk);
        const float d = part[((size_t)k * p.c + c) * 2] - mean;
        m2 += part[((size_t)k * p.c + c) * 2 + 1] + n * d * d;
    }
    const float var = block_sum(m2, scratch) / total;
    const float rstd = 1.f / sqrtf(var + p.eps);
    const float* gamma = p.gamma;
    const float* beta = p.beta;
    float* ss = p.ss + (size_t)b * p.c * 2;
    for (int cc = threadIdx.x; cc < cpg; cc += blockDim.x) {
        const int c = g * cpg + cc;
        const float scale = rstd * gamma[c];
        ss[2 * c] = scale;
        ss[2 * c + 1] = beta[c] - mean * scale;
    }
}

struct GnApplyParams {
    const float* x;   // (B, hw, c)
    const float* ss;  // (B, c, 2)
    void* y;          // (B, hw, c) T
    int batch, hw, c, silu;
};
static_assert(sizeof(GnApplyParams) == 40, "GnApplyParams: mirrored in src/cuda/decoder.rs");

// grid.y strides over images, grid.x over an image's hw*c/4 float4s (32-bit indexing inside
// an image); 4 T values stored as one 8-byte word.
template <typename T>
__device__ __forceinline__ void gn_apply_impl(const GnApplyParams& p) {
    const unsigned cols = (unsigned)p.c >> 2;
    const unsigned per_image = (unsigned)p.hw * cols;
    for (unsigned b = blockIdx.y; b < (unsigned)p.batch; b += gridDim.y) {
        const float4* x = (const float4*)p.x + (size_t)b * per_image;
        T* y = (T*)p.y + (size_t)b * per_image * 4;
        const float* ssb = p.ss + (size_t)b * p.c * 2;
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < per_image;
             i += gridDim.x * blockDim.x) {
            const float* ss = ssb + (i % cols) * 8;
            const float4 v = x[i];
            float o[4] = {v.x * ss[0] + ss[1], v.y * ss[2] + ss[3], v.z * ss[4] + ss[5],
                          v.w * ss[6] + ss[7]};
            if (p.silu) {
#pragma unroll
                for (int j = 0; j < 4; ++j) o[j] = o[j] / (1.f + expf(-o[j]));
            }
            store4(y, i, o);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Small elementwise kernels

struct CastParams {
    const float* x;  // (n)
    void* y;         // (n) T
    u64 n;
};
static_assert(sizeof(CastParams) == 24, "CastParams: mirrored in src/cuda/decoder.rs");

template <typename T>
__device__ __forceinline__ void cast_f32_impl(const CastParams& p) {
    const float* x = p.x;
    T* y = (T*)p.y;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < p.n;
         i += (size_t)gridDim.x * blockDim.x)
        y[i] = from_f32<T>(x[i]);
}

struct GatherCodesParams {
    const int* tokens;      // (rows)
    const float* codebook;  // (V, e)
    void* z;                // (rows, e) T
    int rows, e, n_embed, normalize;
};
static_assert(sizeof(GatherCodesParams) == 40, "GatherCodesParams: mirrored in src/cuda/decoder.rs");

// One thread per row.
template <typename T>
__device__ __forceinline__ void gather_codes_impl(const GatherCodesParams& p) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.rows) return;
    const int t = p.tokens[r];
    T* z = (T*)p.z + (size_t)r * p.e;
    if (t < 0 || t >= p.n_embed) {
        for (int d = 0; d < p.e; ++d) z[d] = from_f32<T>(__int_as_float(0x7fc00000));
        return;
    }
    const float* row = p.codebook + (size_t)t * p.e;
    float n = 1.f;
    if (p.normalize) {
        float ss = 0.f;
        for (int d = 0; d < p.e; ++d) ss += row[d] * row[d];
        n = fmaxf(sqrtf(ss), 1e-12f);
    }
    for (int d = 0; d < p.e; ++d) z[d] = from_f32<T>(row[d] / n);
}

// Max over a block (blockDim.x a multiple of 32, <= 1024); same barrier discipline as
// block_sum in common.cuh, so the two can share `scratch`.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int nw = (blockDim.x + 31) >> 5;
    v = (threadIdx.x < nw) ? scratch[threadIdx.x] : __int_as_float(0xff800000);
    if (warp == 0) v = warp_max(v);
    if (threadIdx.x == 0) scratch[0] = v;
    __syncthreads();
    return scratch[0];
}

struct SoftmaxParams {
    const float* s;  // (rows, n) raw scores
    void* p;         // (rows, n) T probabilities
    int rows, n;
    float scale;  // > 0
};
static_assert(sizeof(SoftmaxParams) == 32, "SoftmaxParams: mirrored in src/cuda/decoder.rs");

// grid rows, block 256.
template <typename T>
__device__ __forceinline__ void attn_softmax_impl(const SoftmaxParams& p) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    if (r >= p.rows) return;
    const float* s = p.s + (size_t)r * p.n;
    T* out = (T*)p.p + (size_t)r * p.n;
    float mx = __int_as_float(0xff800000);
    for (int j = threadIdx.x; j < p.n; j += blockDim.x) mx = fmaxf(mx, s[j]);
    mx = block_max(mx, scratch);
    float sum = 0.f;
    for (int j = threadIdx.x; j < p.n; j += blockDim.x) sum += expf((s[j] - mx) * p.scale);
    const float inv = 1.f / block_sum(sum, scratch);
    for (int j = threadIdx.x; j < p.n; j += blockDim.x)
        out[j] = from_f32<T>(expf((s[j] - mx) * p.scale) * inv);
}

struct PixelsParams {
    const float* y;          // (B, hw, c)
    float* out_f32;          // (B, c, hw) or null
    unsigned char* out_u8;   // (B, c, hw) or null
    int batch, hw, c;
};
static_assert(sizeof(PixelsParams) == 40, "PixelsParams: mirrored in src/cuda/decoder.rs");

// grid.y strides over images, grid.x over an image's c*hw outputs (32-bit indexing inside
// an image).
__device__ __forceinline__ void dec_pixels_impl(const PixelsParams& p) {
    const unsigned per_image = (unsigned)p.c * p.hw;
    for (unsigned b = blockIdx.y; b < (unsigned)p.batch; b += gridDim.y) {
        const float* y = p.y + (size_t)b * per_image;
        float* out_f32 = p.out_f32 ? p.out_f32 + (size_t)b * per_image : nullptr;
        unsigned char* out_u8 = p.out_u8 ? p.out_u8 + (size_t)b * per_image : nullptr;
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < per_image;
             i += gridDim.x * blockDim.x) {
            const unsigned q = i % p.hw, ch = i / p.hw;
            const float v = y[q * p.c + ch];
            if (out_f32) out_f32[i] = v;
            if (out_u8) {
                // Explicit roundings: no contraction into an fma, bit-identical to the CPU path.
                const float t = __fmul_rn(__fadd_rn(v, 1.f), 0.5f);
                out_u8[i] = (unsigned char)__fmul_rn(fminf(fmaxf(t, 0.f), 1.f), 255.f);
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

extern "C" __global__ void __launch_bounds__(256) conv3x3_direct_bf16(const Conv3x3Params p) { conv3x3_direct_impl<__nv_bfloat16, false>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_direct_f16(const Conv3x3Params p) { conv3x3_direct_impl<__half, false>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_narrow_bf16(const Conv3x3Params p) { conv3x3_narrow_impl<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_narrow_f16(const Conv3x3Params p) { conv3x3_narrow_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_tc_bf16(const Conv3x3Params p) { conv3x3_tc_impl<__nv_bfloat16, false>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_tc_f16(const Conv3x3Params p) { conv3x3_tc_impl<__half, false>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_down_direct_bf16(const Conv3x3Params p) { conv3x3_direct_impl<__nv_bfloat16, true>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_down_direct_f16(const Conv3x3Params p) { conv3x3_direct_impl<__half, true>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_down_tc_bf16(const Conv3x3Params p) { conv3x3_tc_impl<__nv_bfloat16, true>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_down_tc_f16(const Conv3x3Params p) { conv3x3_tc_impl<__half, true>(p); }
extern "C" __global__ void __launch_bounds__(256) gn_partial_f32(const GnPartialParams p) { gn_partial_impl(p); }
extern "C" __global__ void __launch_bounds__(256) gn_finalize_f32(const GnFinalizeParams p) { gn_finalize_impl(p); }
extern "C" __global__ void __launch_bounds__(256) gn_apply_bf16(const GnApplyParams p) { gn_apply_impl<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) gn_apply_f16(const GnApplyParams p) { gn_apply_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(256) cast_f32_bf16(const CastParams p) { cast_f32_impl<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) cast_f32_f16(const CastParams p) { cast_f32_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(128) gather_codes_bf16(const GatherCodesParams p) { gather_codes_impl<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(128) gather_codes_f16(const GatherCodesParams p) { gather_codes_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(256) attn_softmax_bf16(const SoftmaxParams p) { attn_softmax_impl<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) attn_softmax_f16(const SoftmaxParams p) { attn_softmax_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(256) dec_pixels_f32(const PixelsParams p) { dec_pixels_impl(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_direct_f32(const Conv3x3Params p) { conv3x3_direct_impl<float, false>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_down_direct_f32(const Conv3x3Params p) { conv3x3_direct_impl<float, true>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_narrow_f32(const Conv3x3Params p) { conv3x3_narrow_impl<float>(p); }
extern "C" __global__ void __launch_bounds__(256) gn_apply_f32(const GnApplyParams p) { gn_apply_impl<float>(p); }
extern "C" __global__ void __launch_bounds__(256) cast_f32_f32(const CastParams p) { cast_f32_impl<float>(p); }
extern "C" __global__ void __launch_bounds__(256) attn_softmax_f32(const SoftmaxParams p) { attn_softmax_impl<float>(p); }
