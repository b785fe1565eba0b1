// embed.cu: the step-input path of the sampler (SPEC.md section 5), with the constant parts of
// combine_inputs folded at load time (src/cuda/engine.rs builds the tables). Why here: the
// inputs of every serial step are gathered on the device from the token grid it already
// holds, so a step needs no host round trip.
//
// With combine_inputs.weight = [Wa | Wb | Wc | Wd] (C x 4C) and bias bc, one input row is
//   x = Wa pos[g] + Wb src_proj(E(z0[p])) + Wc posemb(q) + Wd codeemb(q) + bc
// and the engine precomputes  PA = pos Wa^T (N, C), PC = pos Wc^T (N, C),
// DC = E(codebook) Wd^T (V, C), EMPTY = Wc empty_pos + Wd empty_emb (C), and per scale
// SRC = Wb src_proj(E(z0)) (B*s*s, C) from codevec_hidden + one GEMM.
//
// upsample_codes: z0 (B, so*so, e) f32 = normalize_e( bilinear(codebook[grid_prev]) ), the
//   previous scale's code vectors (B, si*si) tokens -> (B, e, si, si) resized to so x so with
//   align_corners = false (source = (dst + 0.5) * si/so - 0.5, clamped at 0) in f32 exactly as
//   src/sampler.rs, then L2-normalized per cell (eps 1e-12). One thread per output cell.
// codevec_hidden: h2 (M, 64) bf16 = silu(W2 silu(W0 z + b0) + b2) for z (M, e) f32, the
//   first two layers of embed_codevecs_mlp (weights f32, row-major [out, in]); one thread per
//   row, e <= 16, hidden 64.
// gather_inputs: x (rows*n, C) f32 for the rows of one step; row r uses image b = r % B
//   (the unconditional rows repeat the conditional inputs). grid (B, cells) i32 holds the
//   tokens sampled so far in this scale. launch: grid rows*n, block 256 (loop over C).
#include "common.cuh"

// =============================================================================================
// CUDA kernels
// =============================================================================================

struct UpsampleParams {
    const int* grid_prev;   // (B, si*si)
    const float* codebook;  // (V, e)
    float* z0;              // (B, so*so, e)
    int batch, si, so, e;
};
static_assert(sizeof(UpsampleParams) == 40, "UpsampleParams: mirrored in src/cuda/embed.rs");

__device__ __forceinline__ void upsample_codes_impl(const UpsampleParams& p) {
    const int cells = p.so * p.so;
    const int idx = blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= p.batch * cells) return;
    const int b = idx / cells, cell = idx % cells;
    const int y = cell / p.so, x = cell % p.so;
    const int* g = p.grid_prev + (size_t)b * p.si * p.si;
    const float* cb = p.codebook;
    const float scale = (float)p.si / (float)p.so;
    float sy = fmaxf(((float)y + 0.5f) * scale - 0.5f, 0.f);
    float sx = fmaxf(((float)x + 0.5f) * scale - 0.5f, 0.f);
    int y0 = min((int)sy, p.si - 1), x0 = min((int)sx, p.si - 1);
    int y1 = min(y0 + 1, p.si - 1), x1 = min(x0 + 1, p.si - 1);
    float ly = sy - (float)y0, lx = sx - (float)x0;
    const float* c00 = cb + (size_t)g[y0 * p.si + x0] * p.e;
    const float* c01 = cb + (size_t)g[y0 * p.si + x1] * p.e;
    const float* c10 = cb + (size_t)g[y1 * p.si + x0] * p.e;
    const float* c11 = cb + (size_t)g[y1 * p.si + x1] * p.e;
    float v[16];
    float ss = 0.f;
    for (int c = 0; c < p.e; ++c) {
        float top = (1.f - lx) * c00[c] + lx * c01[c];
        float bot = (1.f - lx) * c10[c] + lx * c11[c];
        v[c] = (1.f - ly) * top + ly * bot;
        ss += v[c] * v[c];
    }
    const float n = fmaxf(sqrtf(ss), 1e-12f);
    float* out = p.z0 + (size_t)idx * p.e;
    for (int c = 0; c < p.e; ++c) out[c] = v[c] / n;
}

struct CodevecParams {
    const float* z;           // (rows, e)
    const float *w0, *b0;     // (64, e), (64)
    const float *w2, *b2;     // (64, 64), (64)
    __nv_bfloat16* h2;        // (rows, 64)
    int rows, e;
};
static_assert(sizeof(CodevecParams) == 56, "CodevecParams: mirrored in src/cuda/embed.rs");

__device__ __forceinline__ void codevec_hidden_impl(const CodevecParams& p) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= p.rows) return;
    const float* z = p.z + (size_t)r * p.e;
    const float* w0 = p.w0;  // (64, e)
    const float* b0 = p.b0;
    const float* w2 = p.w2;  // (64, 64)
    const float* b2 = p.b2;
    float h1[64];
    for (int i = 0; i < 64; ++i) {
        float s = b0[i];
        for (int c = 0; c < p.e; ++c) s += w0[i * p.e + c] * z[c];
        h1[i] = s / (1.f + expf(-s));
    }
    __nv_bfloat16* out = p.h2 + (size_t)r * 64;
    for (int i = 0; i < 64; ++i) {
        float s = b2[i];
        for (int c = 0; c < 64; ++c) s += w2[i * 64 + c] * h1[c];
        out[i] = f2bf(s / (1.f + expf(-s)));
    }
}

struct GatherParams {
    const float *pa, *pc;   // (N, C)
    const float* dc;        // (V, C)
    const float *empty, *bias;  // (C)
    const float* src;       // (B*cells, C)
    const int* grid;        // (B, cells)
    const int *cur_global, *local, *prev_global, *prev_local;  // (n) each; prev_* unused when first
    float* x;               // (rows, row_stride, C): token (r, j) at row r*row_stride + row_off + j
    int rows, batch, n, c, cells, first;
    int row_stride, row_off;  // n and 0 for a step's (rows*n, C); (1+N, off) in a whole sequence
};
static_assert(sizeof(GatherParams) == 128, "GatherParams: mirrored in src/cuda/embed.rs");

__device__ __forceinline__ void gather_inputs_impl(const GatherParams& p) {
    const int t = blockIdx.x;  // token index r * n + j
    if (t >= p.rows * p.n) return;
    const int r = t / p.n, j = t % p.n, b = r % p.batch;
    const float* pa = p.pa + (size_t)p.cur_global[j] * p.c;
    const float* src = p.src + ((size_t)b * p.cells + p.local[j]) * p.c;
    const float* bias = p.bias;
    const float* prev_a;
    const float* prev_b = nullptr;
    if (p.first) {
        prev_a = p.empty;
    } else {
        prev_a = p.pc + (size_t)p.prev_global[j] * p.c;
        const int tok = p.grid[(size_t)b * p.cells + p.prev_local[j]];
        prev_b = p.dc + (size_t)tok * p.c;
    }
    float* x = p.x + ((size_t)r * p.row_stride + p.row_off + j) * p.c;
    for (int i = threadIdx.x; i < p.c; i += blockDim.x) {
        float v = pa[i] + src[i] + bias[i] + prev_a[i];
        if (prev_b) v += prev_b[i];
        x[i] = v;
    }
}

// =============================================================================================
// Entry points: extern "C", named <op>_<variant>_<dtype>, one declaration per line (build.rs
// registers each as a k::* constant for src/cuda/), each with __launch_bounds__(the largest block
// its launcher uses): the registry records it, Gpu::launch refuses a larger block, and
// scripts/kernel-resources.sh checks registers and shared memory against it
// =============================================================================================

extern "C" __global__ void __launch_bounds__(128) upsample_codes_f32(const UpsampleParams p) { upsample_codes_impl(p); }
extern "C" __global__ void __launch_bounds__(64) codevec_hidden_bf16(const CodevecParams p) { codevec_hidden_impl(p); }
extern "C" __global__ void __launch_bounds__(256) gather_inputs_f32(const GatherParams p) { gather_inputs_impl(p); }
