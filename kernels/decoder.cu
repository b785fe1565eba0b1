// decoder.cu: the VQ decoder (SPEC.md section 7) on NHWC activations; host side in
// src/cuda/decoder/, f32 oracle in src/cpu/decoder.rs. Why here: decoding is ~0.25 TFLOP per
// 256 px image (PERF.md); its 3x3 convs, GroupNorm and the glue kernels run on the device
// next to the sampler so activations never leave it (1x1 convs and attention GEMMs: cuBLAS).
//
// 16-bit storage type T: every kernel that reads or writes 16-bit values is instantiated for
// bf16 (__nv_bfloat16, suffix _bf16) and fp16 (__half, suffix _f16); the host picks one per
// decoder (fp16 by default: 3 more mantissa bits, see PERF.md "VQ decoder"). The kernels
// without tensor cores are also instantiated for f32 storage (suffix _f32: conv3x3_direct,
// conv3x3_down_direct, conv3x3_narrow, gn_partial, gn_apply, bias_cast, attn_softmax): the
// encoder's exact mode (src/cuda/decoder/encoder.rs), where a near-tie of the nearest code
// must resolve as on the CPU.
//
// Dataflow (issue 21): every activation is stored in T, the residual stream included; the only
// f32 tensors are 1x1-conv GEMM outputs before their bias (bias_cast), conv_out's output and
// the pixels. A GroupNorm is never a pass over its tensor: the conv that writes the tensor
// leaves per-128-pixel statistics in its epilogue (conv_tile_stats), gn_finalize turns them
// into a per-(image, channel) scale and shift, and the conv that reads the tensor applies
// scale, shift and SiLU in its input loader (conv3x3_tc_gn, and the direct and narrow kernels
// when p.ss is set). Nearest x2 upsampling is the upsampled conv's input indexing. Bias and
// residual are added in the conv epilogue. What is left as a pass: gn_partial where a conv
// cannot leave the statistics (the attention block's output, H*W not a multiple of 128, the
// direct kernel), gn_apply before the attention block's q|k|v GEMM (cuBLAS has no loader).
//
// Layouts (row-major, innermost last):
//   activations   (B, H, W, C) NHWC T. NHWC makes a 1x1 conv a plain GEMM
//                 (B*H*W, Cin) x (Cout, Cin)^T (cuBLAS, see gemm.rs) and gives a 3x3 conv
//                 contiguous Cin runs per (pixel, tap) for the implicit GEMM below.
//   conv3x3 weight (Cout, 3, 3, Cin) T = row-major (Cout, K), K = 9*Cin, k = (ky*3+kx)*Cin+ci
//                 (PyTorch (Cout, Cin, 3, 3) permuted at load time); bias (Cout) f32.
//   GroupNorm statistics (B, ceil(HW/128), C, 2) f32 (mean, M2) per chunk of 128 pixels;
//                 scale/shift (B, C, 2) f32.
//
// conv3x3_direct (the on-device reference): y[b,oy,ox,co] = round_O(bias[co] (+ res[b,oy,ox,co])
//   + sum_{ky,kx,ci} x'[b, iy, ix, ci] * w[co, ky, kx, ci]), padding 1, where (iy, ix) =
//   (oy+ky-1, ox+kx-1), or (that >> 1) when `upsample` (nearest x2 upsample fused into the
//   input indexing: the conv runs on the 2Hin x 2Win upsampled image, padded by 1 there), and
//   x' = x, or with p.ss round_T(SiLU?(x * scale[b,ci] + shift[b,ci])) (conv_in_value; the
//   padding stays 0). Output O = T, or f32 (`_out32`, conv_out when the narrow kernel does not
//   run). One thread per output element (co fastest), grid-stride; f32 accumulation. Slow and
//   obviously right.
// conv3x3_tc / conv3x3_tc_gn: the same conv (O = T) as an implicit GEMM on 16-bit tensor cores:
//   Y (M = B*H*W, N = Cout) = A (M, K) W^T (N, K), A[m, k] = x' at pixel m shifted by tap(k).
//   Block tile 128 x 128 x 32, 256 threads = 8 warps as 2 (M) x 4 (N), warp tile 64 x 32 =
//   4 x 4 mma.sync.m16n8k16 (T in, f32 accumulate, 64 accumulators per thread).
//   B tiles go global -> shared with 16-byte cp.async (zero-fill for rows past Cout); A tiles
//   the same in conv3x3_tc, and in conv3x3_tc_gn global -> registers (issued a pipeline depth
//   ahead, before the MMAs) -> GroupNorm + SiLU + round to T -> shared (after the MMAs).
//   3-stage pipeline (48 KiB static shared memory), XOR-swizzled 64-byte rows so ldmatrix.x4
//   is bank-conflict free. Needs Cin % 32 == 0 (a 32-wide K tile stays inside one tap); any
//   Cout (the tail tile is zero-padded). Epilogue from registers: + bias (+ residual, which may
//   alias y: each element is read then written by one thread), rounded to T; with p.stats
//   (launcher: only when H*W % 128 == 0, so a tile's rows are one image) the tile's per-column
//   (mean, M2) of the stored values, two passes over the registers (conv_tile_stats).
//   launch: grid (ceil(M/128), ceil(Cout/128)), block 256.
// conv3x3_down_{direct,tc}: the encoder's Downsample (SPEC.md section 9; cpu::ops::conv2d_down),
//   the same two kernels instantiated with DOWN: x (B, 2H, 2W, Cin) zero-padded right and
//   bottom by 1, 3x3 conv at stride 2 without other padding, y (B, H, W, Cout) T:
//   y[b,oy,ox,co] = bias[co] + sum x[b, 2oy+ky, 2ox+kx, ci] w[co,ky,kx,ci] over taps inside
//   the input; `upsample` must be 0 and no GroupNorm is fused. Same tiles and launch shapes.
// conv3x3_narrow: the same conv for Cout <= 8 (conv_out: 3 channels, where the 128-wide N
//   tile is >97 % padding), output f32: one thread per output pixel, all Cout channels in
//   registers, the weights staged in 32 KiB of shared memory; same summation order as
//   conv3x3_direct, same fused GroupNorm. launch: grid-stride over B*H*W pixels, block 256.
// gn_partial / gn_finalize / gn_apply: GroupNorm (32 groups, affine, biased variance) + SiLU.
//   x (B, HW, C) T. Statistics in f32 and numerically safe for large means: gn_partial reduces
//   chunks of 128 pixels per channel to (mean, M2) around a per-chunk shift (the chunk's first
//   pixel) (the conv epilogue's conv_tile_stats writes the same layout, two-pass), gn_finalize
//   merges them per (b, group) with the parallel-variance formula (M2 = sum M2_i + n_i
//   (mean_i - mean)^2) and writes the folded per-channel (scale, shift), gn_apply is
//   elementwise (4 T in, 4 T out) and runs only where no conv can apply it on load.
// bias_cast: y (rows, c) T = round_T(x + bias[col] (+ y)), x f32: a 1x1 conv's bias, residual
//   and storage rounding in one pass (post_quant_conv, the attention's q|k|v and proj_out).
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
template <typename T>
__device__ __forceinline__ T bits_to(uint32_t b);
template <>
__device__ __forceinline__ __nv_bfloat16 bits_to<__nv_bfloat16>(uint32_t b) {
    __nv_bfloat16_raw r;
    r.x = (unsigned short)b;
    return __nv_bfloat16(r);
}
template <>
__device__ __forceinline__ __half bits_to<__half>(uint32_t b) {
    __half_raw r;
    r.x = (unsigned short)b;
    return __half(r);
}

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

// 4 consecutive values x[4i .. 4i+4) as f32: one 8-byte word for a 16-bit T, one float4 for f32.
template <typename T>
__device__ __forceinline__ float4 load4(const T* x, size_t i) {
    const uint2 v = ((const uint2*)x)[i];
    return make_float4(to_f32(bits_to<T>(v.x & 0xffffu)), to_f32(bits_to<T>(v.x >> 16)),
                       to_f32(bits_to<T>(v.y & 0xffffu)), to_f32(bits_to<T>(v.y >> 16)));
}
__device__ __forceinline__ float4 load4(const float* x, size_t i) { return ((const float4*)x)[i]; }

// ---------------------------------------------------------------------------------------------
// 3x3 convolution

struct Conv3x3Params {
    const void* x;         // (B, Hin, Win, Cin) T
    const void* w;         // (Cout, 3, 3, Cin) T
    const float* bias;     // (Cout)
    const void* residual;  // (B, H, W, Cout) O or null; may equal y
    void* y;               // (B, H, W, Cout) O
    const float* ss;       // (B, Cin, 2) GroupNorm (scale, shift) applied to x on load, or null
    float* stats;          // (B, H*W/128, Cout, 2) (mean, M2) of y per 128 pixels, or null (tc)
    int batch, height, width;     // output (= upsampled input) size
    int cin, cout, upsample, silu, pad_;
};
static_assert(sizeof(Conv3x3Params) == 88, "Conv3x3Params: mirrored in src/cuda/decoder/launch.rs");

// The conv input value v of image b, channel ci as the conv sees it: with GroupNorm fused
// (p.ss), round_T(silu?(v * scale + shift)), what gn_apply would have stored; else v.
template <typename T>
__device__ __forceinline__ float conv_in_value(const Conv3x3Params& p, int b, int ci, float v) {
    if (!p.ss) return v;
    const float* s = p.ss + ((size_t)b * p.cin + ci) * 2;
    float o = v * s[0] + s[1];
    if (p.silu) o = o / (1.f + expf(-o));
    return to_f32(from_f32<T>(o));
}

// The Cin input values conv tap (ky, kx) of output pixel (b, oy, ox) reads (the nearest x2
// upsample folded into the indexing), or null where the tap falls in the padding (the padding
// is zero after the fused GroupNorm too, as in the reference). DOWN: the encoder's
// Downsample, input (2H, 2W), tap (2oy + ky, 2ox + kx), zero padding right and bottom only.
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

// Output element y[i] = round_O(v + residual[i]) (v = conv + bias) for O in {T, f32}.
template <typename O>
__device__ __forceinline__ void conv_store(const Conv3x3Params& p, size_t i, float v) {
    if (p.residual) v += to_f32(((const O*)p.residual)[i]);
    ((O*)p.y)[i] = from_f32<O>(v);
}

template <typename T, typename O, bool DOWN>
__device__ __forceinline__ void conv3x3_direct_impl(const Conv3x3Params& p) {
    const size_t total = (size_t)p.batch * p.height * p.width * p.cout;
    const T* w = (const T*)p.w;             // (cout, 3, 3, cin)
    const float* bias = p.bias;     // (cout)
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
                for (int ci = 0; ci < p.cin; ++ci)
                    acc += conv_in_value<T>(p, b, ci, to_f32(xp[ci])) * to_f32(wp[ci]);
            }
        }
        conv_store<O>(p, i, acc + bias[co]);
    }
}

// conv3x3_narrow: convs with few output channels (the decoder's conv_out, Cout = 3), where
// the tensor-core tile (128 output channels) would be >97 % padding. One thread per output
// pixel computes all Cout <= NARROW_MAX_COUT channels; the block stages the whole weight
// tensor in shared memory (the launcher checks Cout*9*Cin*sizeof(T) <= NARROW_W_BYTES), and
// every thread reads the same weight at a time (a broadcast). Sums in the order of
// conv3x3_direct (taps, then Cin), f32. Output f32.
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
                    const float xv = conv_in_value<T>(p, b, ci, to_f32(xp[ci]));
#pragma unroll
                    for (int co = 0; co < NARROW_MAX_COUT; ++co)
                        if (co < p.cout) acc[co] += xv * to_f32(wt[co * 9 * p.cin + ci]);
                }
            }
        }
#pragma unroll
        for (int co = 0; co < NARROW_MAX_COUT; ++co) {
            if (co >= p.cout) break;
            conv_store<float>(p, (size_t)m * p.cout + co, acc[co] + p.bias[co]);
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

// 8 consecutive 16-bit values (one 16-byte chunk) -> the fused GroupNorm (+ SiLU) of each,
// channel ci + j of image b, rounded back to T and repacked.
template <typename T>
__device__ __forceinline__ uint4 norm_chunk(const Conv3x3Params& p, int b, int ci, uint4 raw) {
    const float4* s4 = (const float4*)(p.ss + ((size_t)b * p.cin + ci) * 2);
    const uint32_t in[4] = {raw.x, raw.y, raw.z, raw.w};
    uint32_t out[4];
#pragma unroll
    for (int q = 0; q < 4; ++q) {
        const float4 s = s4[q];  // (scale, shift) of channels ci + 2q, ci + 2q + 1
        float o0 = to_f32(bits_to<T>(in[q] & 0xffffu)) * s.x + s.y;
        float o1 = to_f32(bits_to<T>(in[q] >> 16)) * s.z + s.w;
        if (p.silu) {
            o0 = o0 / (1.f + expf(-o0));
            o1 = o1 / (1.f + expf(-o1));
        }
        out[q] = bits16(from_f32<T>(o0)) | (bits16(from_f32<T>(o1)) << 16);
    }
    return make_uint4(out[0], out[1], out[2], out[3]);
}

// GroupNorm statistics of a finished 128 x 128 output tile whose rows all lie in one image
// (the launcher passes p.stats only when H*W % 128 == 0): per column, the mean of the 128
// stored values and M2 = sum (v - mean)^2, two passes over the values in registers (lanes of
// one column: shuffles over lane bits 2-4, then the two warp_m halves through shared memory),
// written as chunk (m0 % HW) / 128 of image m0 / HW, the layout gn_partial writes. Reuses the
// first 4 KiB of the pipeline's shared memory.
__device__ __forceinline__ void conv_tile_stats(const Conv3x3Params& p, float (&acc)[4][4][4],
                                                unsigned char* smem, int m0, int n0, int warp_m,
                                                int warp_n, int lane) {
    float* red = (float*)smem;  // [2][TC_BN] column sums, then [2][TC_BN] sums of squares
    __syncthreads();            // every warp is done with the pipeline's shared memory
    float mean[4][2];
#pragma unroll
    for (int pass = 0; pass < 2; ++pass) {
        float s[4][2];
#pragma unroll
        for (int nj = 0; nj < 4; ++nj)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                float a = 0.f;
#pragma unroll
                for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                    for (int h = 0; h < 2; ++h) {
                        const float v = acc[mi][nj][2 * h + j];
                        const float d = pass ? v - mean[nj][j] : v;
                        a += pass ? d * d : d;
                    }
                a += __shfl_xor_sync(0xffffffffu, a, 4);
                a += __shfl_xor_sync(0xffffffffu, a, 8);
                a += __shfl_xor_sync(0xffffffffu, a, 16);
                s[nj][j] = a;
            }
        float* r = red + pass * 2 * TC_BN;
        if (lane < 4) {
#pragma unroll
            for (int nj = 0; nj < 4; ++nj)
#pragma unroll
                for (int j = 0; j < 2; ++j)
                    r[warp_m * TC_BN + warp_n * 32 + nj * 8 + 2 * lane + j] = s[nj][j];
        }
        __syncthreads();
#pragma unroll
        for (int nj = 0; nj < 4; ++nj)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int c = warp_n * 32 + nj * 8 + 2 * (lane & 3) + j;
                if (pass == 0) mean[nj][j] = (r[c] + r[TC_BN + c]) * (1.f / TC_BM);
            }
    }
    if (warp_m != 0 || lane >= 4) return;
    const int hw = p.height * p.width;
    const int b = m0 / hw, nchunk = hw / TC_BM, chunk = (m0 - b * hw) / TC_BM;
    const float* m2 = red + 2 * TC_BN;
#pragma unroll
    for (int nj = 0; nj < 4; ++nj)
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int c = warp_n * 32 + nj * 8 + 2 * lane + j;
            if (n0 + c >= p.cout) continue;
            float* out = p.stats + (((size_t)b * nchunk + chunk) * p.cout + n0 + c) * 2;
            out[0] = mean[nj][j];
            out[1] = m2[c] + m2[TC_BN + c];
        }
}

// NORM: the A (input) tile goes global -> registers -> GroupNorm + SiLU -> shared memory
// (the loads for tile kt + STAGES - 1 are issued before the MMAs of tile kt and stored after
// them, so their latency hides behind the MMAs); otherwise global -> shared by cp.async.
template <typename T, bool DOWN, bool NORM>
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

    // The source of A chunk i of tile kt (null: zero padding) and its first channel.
    auto a_src = [&](int kt, int i, int& ci) -> const T* {
        const int k0 = kt * TC_BK;
        const int tap = k0 / p.cin;
        ci = k0 - tap * p.cin + lc * 8;
        const int ky = tap / 3, kx = tap - 3 * (tap / 3);
        // DOWN: input pixel (2y + ky, 2x + kx), padded right and bottom only.
        const int yy = DOWN ? 2 * a_y[i] + ky : a_y[i] + ky - 1;
        const int xx = DOWN ? 2 * a_x[i] + kx : a_x[i] + kx - 1;
        const bool ok = DOWN ? a_ok[i] && yy < hin && xx < win
                             : a_ok[i] && yy >= 0 && yy < p.height && xx >= 0 && xx < p.width;
        if (!ok) return nullptr;
        const int iy = !DOWN && p.upsample ? yy >> 1 : yy;
        const int ix = !DOWN && p.upsample ? xx >> 1 : xx;
        return x + (((size_t)a_b[i] * hin + iy) * win + ix) * p.cin + ci;
    };
    auto load_b = [&](int kt, int stage) {
        const uint32_t sb = smem_addr(smem + stage * TC_STAGE_BYTES) + TC_A_BYTES;
#pragma unroll
        for (int i = 0; i < 2; ++i)
            cp_async16(sb + tile_off(lr + i * 64, lc), b_src[i] + kt * TC_BK, b_ok[i]);
    };
    auto load_a_async = [&](int kt, int stage) {
        const uint32_t sa = smem_addr(smem + stage * TC_STAGE_BYTES);
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            int ci;
            const T* src = a_src(kt, i, ci);
            cp_async16(sa + tile_off(lr + i * 64, lc), src ? src : x, src != nullptr);
        }
    };
    // NORM: raw chunks in registers between fetch_a and put_a.
    uint4 a_raw[2];
    int a_ci[2];
    bool a_in[2];
    auto fetch_a = [&](int kt) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const T* src = a_src(kt, i, a_ci[i]);
            a_in[i] = src != nullptr;
            a_raw[i] = a_in[i] ? *(const uint4*)src : make_uint4(0u, 0u, 0u, 0u);
        }
    };
    auto put_a = [&](int stage) {
        unsigned char* sa = smem + stage * TC_STAGE_BYTES;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const uint4 v = a_in[i] ? norm_chunk<T>(p, a_b[i], a_ci[i], a_raw[i]) : a_raw[i];
            *(uint4*)(sa + tile_off(lr + i * 64, lc)) = v;
        }
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
        if (s < KT) {
            if (NORM) {
                fetch_a(s);
                put_a(s);
            } else {
                load_a_async(s, s);
            }
            load_b(s, s);
        }
        cp_async_commit();
    }
    for (int kt = 0; kt < KT; ++kt) {
        // Tile kt has landed (at most STAGES-2 younger groups pending; NORM: its A chunks were
        // stored before this barrier); the barrier also tells every warp that the stage read
        // at kt-1 is free for the prefetch below.
        cp_async_wait<TC_STAGES - 2>();
        __syncthreads();
        const int nk = kt + TC_STAGES - 1;
        if (nk < KT) {
            if (NORM) {
                fetch_a(nk);
            } else {
                load_a_async(nk, nk % TC_STAGES);
            }
            load_b(nk, nk % TC_STAGES);
        }
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
        // Stage nk % STAGES was last read at kt - 1: every warp passed this iteration's
        // barrier after those reads.
        if (NORM && nk < KT) put_a(nk % TC_STAGES);
    }
    cp_async_wait<0>();

    // Epilogue: accumulator (mi, nj, e) is row (lane>>2) + 8*(e>>1), col 2*(lane&3) + (e&1)
    // of the 16x8 tile (mi, nj). acc becomes the stored values (bias, residual, T rounding).
    const float* bias = p.bias;
    const T* res = (const T*)p.residual;
    T* y = (T*)p.y;
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
                float v0 = acc[mi][nj][2 * h] + (col < p.cout ? bias[col] : 0.f);
                float v1 = acc[mi][nj][2 * h + 1] + (col + 1 < p.cout ? bias[col + 1] : 0.f);
                if (pairs && col + 1 < p.cout) {
                    if (res) {
                        const uint32_t r2 = *(const uint32_t*)(res + o);
                        v0 += to_f32(bits_to<T>(r2 & 0xffffu));
                        v1 += to_f32(bits_to<T>(r2 >> 16));
                    }
                    const T t0 = from_f32<T>(v0), t1 = from_f32<T>(v1);
                    *(uint32_t*)(y + o) = bits16(t0) | (bits16(t1) << 16);
                    v0 = to_f32(t0);
                    v1 = to_f32(t1);
                } else {
                    if (col < p.cout) {
                        if (res) v0 += to_f32(res[o]);
                        const T t0 = from_f32<T>(v0);
                        y[o] = t0;
                        v0 = to_f32(t0);
                    }
                    if (col + 1 < p.cout) {
                        if (res) v1 += to_f32(res[o + 1]);
                        const T t1 = from_f32<T>(v1);
                        y[o + 1] = t1;
                        v1 = to_f32(t1);
                    }
                }
                acc[mi][nj][2 * h] = v0;
                acc[mi][nj][2 * h + 1] = v1;
            }
        }
    }
    if (p.stats) conv_tile_stats(p, acc, smem, m0, n0, warp_m, warp_n, lane);
}
// ---------------------------------------------------------------------------------------------
// GroupNorm (+ SiLU)

#define GN_GROUPS 32

struct GnPartialParams {
    const void* x;   // (B, hw, c) T
    float* part;     // (B, nchunk, c, 2): (mean, M2) per chunk and channel
    int batch, hw, c, chunk, nchunk;
};
static_assert(sizeof(GnPartialParams) == 40, "GnPartialParams: mirrored in src/cuda/decoder/launch.rs");

// grid (nchunk, B), block 256; needs c % 4 == 0 and c <= 1024. Thread = (row r, float4 column
// col); rows = 256 / (c/4) pixels are read per iteration.
template <typename T>
__device__ __forceinline__ void gn_partial_impl(const GnPartialParams& p) {
    __shared__ float4 s1[256], s2[256];
    const int chunk = blockIdx.x, b = blockIdx.y;
    const int cols = p.c >> 2, rows = blockDim.x / cols;
    const int col = threadIdx.x % cols, r = threadIdx.x / cols;
    const int p0 = chunk * p.chunk, p1 = min(p0 + p.chunk, p.hw);
    const T* x = (const T*)p.x + (size_t)b * p.hw * p.c;
    // Every row of a column uses the same shift: the chunk's first pixel.
    const float4 sh = load4(x, (size_t)p0 * cols + col);
    float4 a1 = make_float4(0.f, 0.f, 0.f, 0.f), a2 = a1;
    if (r < rows) {
        for (int q = p0 + r; q < p1; q += rows) {
            const float4 v = load4(x, (size_t)q * cols + col);
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
static_assert(sizeof(GnFinalizeParams) == 56, "GnFinalizeParams: mirrored in src/cuda/decoder/launch.rs");

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
    const void* x;    // (B, hw, c) T
    const float* ss;  // (B, c, 2)
    void* y;          // (B, hw, c) T
    int batch, hw, c, silu;
};
static_assert(sizeof(GnApplyParams) == 40, "GnApplyParams: mirrored in src/cuda/decoder/launch.rs");

// grid.y strides over images, grid.x over an image's hw*c/4 float4s (32-bit indexing inside
// an image); 4 T values stored as one 8-byte word.
template <typename T>
__device__ __forceinline__ void gn_apply_impl(const GnApplyParams& p) {
    const unsigned cols = (unsigned)p.c >> 2;
    const unsigned per_image = (unsigned)p.hw * cols;
    for (unsigned b = blockIdx.y; b < (unsigned)p.batch; b += gridDim.y) {
        const T* x = (const T*)p.x + (size_t)b * per_image * 4;
        T* y = (T*)p.y + (size_t)b * per_image * 4;
        const float* ssb = p.ss + (size_t)b * p.c * 2;
        for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < per_image;
             i += gridDim.x * blockDim.x) {
            const float* ss = ssb + (i % cols) * 8;
            const float4 v = load4(x, i);
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

struct BiasCastParams {
    const float* x;        // (rows, c) f32: a 1x1 conv's GEMM output
    const float* bias;     // (c) or null
    const void* residual;  // (rows, c) T or null; may equal y
    void* y;               // (rows, c) T
    u64 n;                 // rows * c
    int c, pad_;
};
static_assert(sizeof(BiasCastParams) == 48, "BiasCastParams: mirrored in src/cuda/decoder/launch.rs");

// y = T(x + bias (+ residual)), in that order, in f32; one rounding.
template <typename T>
__device__ __forceinline__ void bias_cast_impl(const BiasCastParams& p) {
    const T* res = (const T*)p.residual;
    T* y = (T*)p.y;
    for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < p.n;
         i += (size_t)gridDim.x * blockDim.x) {
        float v = p.x[i];
        if (p.bias) v += p.bias[i % p.c];
        if (res) v += to_f32(res[i]);
        y[i] = from_f32<T>(v);
    }
}

struct GatherCodesParams {
    const int* tokens;      // (rows)
    const float* codebook;  // (V, e)
    void* z;                // (rows, e) T
    int rows, e, n_embed, normalize;
};
static_assert(sizeof(GatherCodesParams) == 40, "GatherCodesParams: mirrored in src/cuda/decoder/launch.rs");

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
static_assert(sizeof(SoftmaxParams) == 32, "SoftmaxParams: mirrored in src/cuda/decoder/launch.rs");

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
static_assert(sizeof(PixelsParams) == 40, "PixelsParams: mirrored in src/cuda/decoder/launch.rs");

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
// scripts/kernel-resources.sh checks registers and shared memory against it. Each op's variants
// stand together, the ops in the order of their definitions above
// =============================================================================================

extern "C" __global__ void __launch_bounds__(256) conv3x3_direct_bf16(const Conv3x3Params p) { conv3x3_direct_impl<__nv_bfloat16, __nv_bfloat16, false>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_direct_out32_bf16(const Conv3x3Params p) { conv3x3_direct_impl<__nv_bfloat16, float, false>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_direct_f16(const Conv3x3Params p) { conv3x3_direct_impl<__half, __half, false>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_direct_out32_f16(const Conv3x3Params p) { conv3x3_direct_impl<__half, float, false>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_direct_f32(const Conv3x3Params p) { conv3x3_direct_impl<float, float, false>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_down_direct_bf16(const Conv3x3Params p) { conv3x3_direct_impl<__nv_bfloat16, __nv_bfloat16, true>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_down_direct_f16(const Conv3x3Params p) { conv3x3_direct_impl<__half, __half, true>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_down_direct_f32(const Conv3x3Params p) { conv3x3_direct_impl<float, float, true>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_narrow_bf16(const Conv3x3Params p) { conv3x3_narrow_impl<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_narrow_f16(const Conv3x3Params p) { conv3x3_narrow_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(256) conv3x3_narrow_f32(const Conv3x3Params p) { conv3x3_narrow_impl<float>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_tc_bf16(const Conv3x3Params p) { conv3x3_tc_impl<__nv_bfloat16, false, false>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_tc_gn_bf16(const Conv3x3Params p) { conv3x3_tc_impl<__nv_bfloat16, false, true>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_tc_f16(const Conv3x3Params p) { conv3x3_tc_impl<__half, false, false>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_tc_gn_f16(const Conv3x3Params p) { conv3x3_tc_impl<__half, false, true>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_down_tc_bf16(const Conv3x3Params p) { conv3x3_tc_impl<__nv_bfloat16, true, false>(p); }
extern "C" __global__ void __launch_bounds__(256, 2) conv3x3_down_tc_f16(const Conv3x3Params p) { conv3x3_tc_impl<__half, true, false>(p); }
extern "C" __global__ void __launch_bounds__(256) gn_partial_bf16(const GnPartialParams p) { gn_partial_impl<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) gn_partial_f16(const GnPartialParams p) { gn_partial_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(256) gn_partial_f32(const GnPartialParams p) { gn_partial_impl<float>(p); }
extern "C" __global__ void __launch_bounds__(256) gn_finalize_f32(const GnFinalizeParams p) { gn_finalize_impl(p); }
extern "C" __global__ void __launch_bounds__(256) gn_apply_bf16(const GnApplyParams p) { gn_apply_impl<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) gn_apply_f16(const GnApplyParams p) { gn_apply_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(256) gn_apply_f32(const GnApplyParams p) { gn_apply_impl<float>(p); }
extern "C" __global__ void __launch_bounds__(256) bias_cast_bf16(const BiasCastParams p) { bias_cast_impl<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) bias_cast_f16(const BiasCastParams p) { bias_cast_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(256) bias_cast_f32(const BiasCastParams p) { bias_cast_impl<float>(p); }
extern "C" __global__ void __launch_bounds__(128) gather_codes_bf16(const GatherCodesParams p) { gather_codes_impl<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(128) gather_codes_f16(const GatherCodesParams p) { gather_codes_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(256) attn_softmax_bf16(const SoftmaxParams p) { attn_softmax_impl<__nv_bfloat16>(p); }
extern "C" __global__ void __launch_bounds__(256) attn_softmax_f16(const SoftmaxParams p) { attn_softmax_impl<__half>(p); }
extern "C" __global__ void __launch_bounds__(256) attn_softmax_f32(const SoftmaxParams p) { attn_softmax_impl<float>(p); }
extern "C" __global__ void __launch_bounds__(256) dec_pixels_f32(const PixelsParams p) { dec_pixels_impl(p); }
