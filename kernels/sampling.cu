// sampling.cu: classifier-free guidance combine and token choice for one serial step. Why
// here: choosing the tokens on the device keeps the logits (rows x V f32) there; only the
// chosen tokens come back, with the same rules and RNG bits as the CPU's src/sampling.rs.
//
// guided_sample: for every image b < B and every token j < n of this step
//   0. bias (p.bias != 0): the head's bias is added to the cond and uncond rows as they are
//      read (the separate add_bias pass folded in; the same f32 additions, bit for bit).
//   1. guidance (p.guided): l = cond + cfg * (cond - uncond), written back in place into the
//      conditional row so the host can record the guided logits; else l = cond (written back
//      when a bias was added).
//   2. token: forced[b, local_pos[j]] when p.forced != 0 (teacher forcing); else
//      T == 0: argmax(l), first index on exact ties (torch.argmax, src/sampling.rs argmax);
//      T > 0:  w_i = exp((l_i - max) / T), restricted to the top-k set, then to the top-p set,
//              and drawn by the inverse CDF with u = token_uniform(seed, image0 + b, step, global_pos[j]):
//              the first kept id, walking ids in ascending order, whose cumulative weight
//              exceeds u * (total kept weight). Same rule as src/sampling.rs choose_token.
//   3. the token goes to grid[b, local_pos[j]] and to tokens_out[b, j].
//   4. statistics (p.prob != 0, for the maps): prob[b, local_pos[j]] = softmax(l / T)[token]
//      and entropy[b, local_pos[j]] = -sum p ln(p + 1e-8) (top-k/top-p do not enter; one-hot
//      at the argmax when T == 0), as src/sampling.rs token_stats; NaN for a forced token
//      outside [0, V).
//
// Layouts (row-major, f32/i32):
//   logits     (rows * n, V) f32, rows = B (no guidance) or 2B: conditional rows b*n + j first,
//              then the unconditional rows (B + b)*n + j. Only the first B*n rows are written.
//   forced     (B, cells) i32 tokens of this scale's grid, or 0 (null) for no forcing
//   grid       (B, cells) i32 this scale's token grid; only cells local_pos[0..n) are written
//   tokens_out (B, n) i32 the tokens of this step, in step order
//   prob, entropy (B, cells) f32, or both 0: written at the same cells as grid
//   local_pos  (n) i32 cell index in the scale grid, distinct within a step (two tokens on
//              one cell would race); global_pos (n) i32 global position id (the RNG counter).
//              A local_pos outside [0, cells) skips the grid write and the forced read (the
//              token is then chosen); tokens_out is always written.
//
// Launch: grid B*n (one block per token, block r = b*n + j), block SAMPLE_THREADS = 512,
//   no dynamic shared memory. Every block reads only its own rows, so the in-place write of
//   the guided logits races with nothing.
//
// Selection order (the CPU's): tokens sorted by weight descending, lower id first on ties.
//   The weights are a strictly increasing function of the logit wherever they are > 0, so the
//   kernel orders by the logit instead, through an order-preserving u32 key of the f32 bits
//   (-0 is folded onto +0 first so the two compare equal, as they do as floats). Tokens whose
//   weight underflows to 0 may be ordered differently from the CPU, but they carry no mass
//   and are never drawn (the walk skips weights of 0, as the CPU does). Two different logits
//   can also share one f64 weight when they differ by less than ~1e-16 * |l - max| (e.g. both
//   within 1e-20 of 0 while max is 1); the CPU then orders them by id, the kernel by logit,
//   which can move a top-k/top-p boundary between them. Contrived; accepted.
//   top-k: the threshold key tau = the k-th largest key, found by a bitwise binary search
//     over the 32 key bits (the largest t with count(key >= t) >= k, one block-wide count per
//     bit). Kept: key > tau, plus the first (k - count(key > tau)) ids with key == tau in
//     ascending id order (ties to the lower id).
//   top-p: target = top_p * (weight of the top-k set); the kept set is the shortest prefix of
//     the selection order whose weight reaches the target (>=). Its last key is the largest t
//     with mass(kept by top-k, key >= t) >= target (and > 0), found by the same bitwise search
//     with block-wide f64 weight sums; then keys > t are kept and of the ties at t (same
//     weight w_t) the first m in ascending id order, m = ceil((target - mass(key > t)) / w_t)
//     clamped to [1, ties available]. top_p <= 0 keeps the single best token; top_p >= 1 is
//     off (the launcher passes 1 for "off").
//   The tie ranks (how many tied ids precede an id) come from a block-wide exclusive scan of
//   per-thread tie counts, with thread t owning the contiguous ids [t*chunk, (t+1)*chunk).
//
// Numerics:
//   guidance uses __fadd_rn/__fmul_rn/__fsub_rn so nvcc does not contract it into an FMA: the
//     written logits are bit-identical to the CPU's cfg_combine.
//   the weights are f64, w_i = exp(((double)l_i - (double)max) * (1.0 / (double)T)), the CPU's
//     formula term for term, and every sum and cumulative walk is f64. The only differences
//     from the CPU are exp's last-ulp rounding and the summation order (tree vs sequential),
//     both ~1e-16 relative, so GPU and CPU choose different tokens only when u * total lands
//     within ~1e-16 of a cumulative boundary (or a top-p target on one). All reductions run in
//     a fixed order: the result is deterministic run to run.
//   the draw: each thread walks its contiguous chunk starting from the exclusive prefix of
//     the chunk weights; the answer is the smallest id any thread finds whose cumulative
//     weight exceeds u * total. If rounding leaves none (u * total >= the walked sum), the
//     last kept id with weight > 0 is taken, as the CPU does. The token is always a kept
//     token of weight > 0 (the max-logit token always qualifies: its weight is exactly 1).
//   a row whose max is not finite (all -inf, or +inf present) falls back to argmax; NaN
//     logits give an unspecified, but in-range, token.
//
// Cost per block (V = 16384, 512 threads): T == 0 reads the row once. T > 0 adds two passes
//   over the row with one f64 exp per logit each (plus a tie-counting pass when filtering).
//   top-k adds 33 counting passes (loads and compares only); top-p adds up to 34 passes with
//   an f64 exp per logit. The row (64 KB)
//   stays in L1/L2 across passes. The default paths (T == 0; T > 0 without top-k/top-p) are
//   cheap next to the lm_head GEMM that produced the logits; top-k/top-p are not tuned
//   (a radix-256 select in shared memory would cut the 32 search passes to 4).
#include "common.cuh"

// =============================================================================================
// CUDA kernels
// =============================================================================================

#define SAMPLE_THREADS 512
#define FULL_MASK 0xffffffffu
#define NO_INDEX 0x7fffffff  // "no index" in argmax / min reductions (INT_MAX; no <climits> under NVRTC)
#define NEG_INF __int_as_float(0xff800000)

struct GuidedSampleParams {
    float* logits;                    // (rows * n, V); the conditional rows are guided in place
    const int* forced;                // (B, cells) or null
    int* grid;                        // (B, cells)
    int* tokens_out;                  // (B, n)
    const int *local_pos, *global_pos;  // (n)
    float *prob, *entropy;            // (B, cells) or null: the chosen token's p and the entropy
    const float* bias;                // (V) or null: added to every row read (the head's bias)
    const u64* run;                   // (2) or null: {seed, image0} read at run time, replacing
                                      // the two fields below (a replayed graph gets new values)
    u64 seed;
    int batch, n, v, cells;
    int guided;         // 1: combine with the unconditional rows
    float cfg;
    float temperature;  // <= 0: argmax
    int top_k;          // in [1, V]; V = off
    float top_p;        // < 1: on; 1 = off
    int step;           // step counter t (RNG counter word 1)
    uint32_t image0;    // run-wide index of image 0 of the batch (RNG counter word 0 = image0 + b)
};
static_assert(sizeof(GuidedSampleParams) == 136, "GuidedSampleParams: mirrored in src/cuda/sampling.rs");

// ---------------------------------------------------------------------------------------
// Block-wide reductions and scans (blockDim.x a multiple of 32, at most 1024). Each starts
// with __syncthreads() so its scratch can be reused right after the previous call, and every
// thread gets the result. Fixed reduction trees: results are deterministic.

__device__ __forceinline__ double block_sum_f64(double v, double* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double w = lane < nw ? scratch[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) w += __shfl_xor_sync(FULL_MASK, w, o);
        if (lane == 0) scratch[0] = w;
    }
    __syncthreads();
    return scratch[0];
}

// min (is_min) or max over ints.
__device__ __forceinline__ int block_minmax_i32(int v, bool is_min, int* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        int y = __shfl_xor_sync(FULL_MASK, v, o);
        v = is_min ? min(v, y) : max(v, y);
    }
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    if (warp == 0) {
        int w = lane < nw ? scratch[lane] : scratch[0];
        for (int o = 16; o > 0; o >>= 1) {
            int y = __shfl_xor_sync(FULL_MASK, w, o);
            w = is_min ? min(w, y) : max(w, y);
        }
        if (lane == 0) scratch[0] = w;
    }
    __syncthreads();
    return scratch[0];
}

// Exclusive prefix sum over threads in threadIdx order; *total gets the block total.
template <typename T>
__device__ __forceinline__ T block_exclusive_scan(T v, T* scratch, T* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    T x = v;  // inclusive scan within the warp
    for (int o = 1; o < 32; o <<= 1) {
        T y = __shfl_up_sync(FULL_MASK, x, o);
        if (lane >= o) x += y;
    }
    T ex = __shfl_up_sync(FULL_MASK, x, 1);  // exclusive within the warp
    if (lane == 0) ex = T(0);
    __syncthreads();
    if (lane == 31) scratch[warp] = x;
    __syncthreads();
    if (warp == 0) {  // inclusive scan of the warp totals
        T w = lane < nw ? scratch[lane] : T(0);
        for (int o = 1; o < 32; o <<= 1) {
            T y = __shfl_up_sync(FULL_MASK, w, o);
            if (lane >= o) w += y;
        }
        if (lane < nw) scratch[lane] = w;
    }
    __syncthreads();
    *total = scratch[nw - 1];
    return (warp > 0 ? scratch[warp - 1] : T(0)) + ex;
}

// (value, index) argmax, larger value first, lower index on ties; index NO_INDEX = empty.
__device__ __forceinline__ void argmax_merge(float& v, int& i, float v2, int i2) {
    if (i2 == NO_INDEX) return;
    if (i == NO_INDEX || v2 > v || (v2 == v && i2 < i)) { v = v2; i = i2; }
}

__device__ __forceinline__ void block_argmax(float& v, int& i, float* sv, int* si) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) {
        float v2 = __shfl_xor_sync(FULL_MASK, v, o);
        int i2 = __shfl_xor_sync(FULL_MASK, i, o);
        argmax_merge(v, i, v2, i2);
    }
    __syncthreads();
    if (lane == 0) { sv[warp] = v; si[warp] = i; }
    __syncthreads();
    if (warp == 0) {
        float w = NEG_INF;
        int wi = NO_INDEX;
        if (lane < nw) { w = sv[lane]; wi = si[lane]; }
        for (int o = 16; o > 0; o >>= 1) {
            float v2 = __shfl_xor_sync(FULL_MASK, w, o);
            int i2 = __shfl_xor_sync(FULL_MASK, wi, o);
            argmax_merge(w, wi, v2, i2);
        }
        if (lane == 0) { sv[0] = w; si[0] = wi; }
    }
    __syncthreads();
    v = sv[0];
    i = si[0];
}

// ---------------------------------------------------------------------------------------

// Order-preserving key: a < b as floats <=> key(a) < key(b) (non-NaN); -0 and +0 share a key.
__device__ __forceinline__ uint32_t order_key(float x) {
    if (x == 0.f) x = 0.f;
    const uint32_t b = __float_as_uint(x);
    return (b & 0x80000000u) ? ~b : (b | 0x80000000u);
}

__device__ __forceinline__ float key_to_float(uint32_t k) {
    return __uint_as_float((k & 0x80000000u) ? (k & 0x7fffffffu) : ~k);
}

// The sampling weight of logit l: the CPU's ((l as f64 - max) * inv_t).exp().
__device__ __forceinline__ double weight(float l, float mx, double inv_t) {
    return exp(((double)l - (double)mx) * inv_t);
}

__device__ __forceinline__ void guided_sample_impl(const GuidedSampleParams& p) {
    __shared__ double sd[32];
    __shared__ int si[32];
    __shared__ float sf[32];
    const int r = blockIdx.x;  // r = b * n + j
    if (r >= p.batch * p.n) return;
    const int b = r / p.n, j = r % p.n;
    const int V = p.v, tid = threadIdx.x, bd = blockDim.x;
    float* row = p.logits + (size_t)r * V;  // (V) conditional row, guided in place
    const int lp = p.local_pos[j];
    const bool lp_ok = lp >= 0 && lp < p.cells;

    // Pass 1 (coalesced): guidance combine, written back; argmax of the result.
    float best = NEG_INF;
    int best_i = NO_INDEX;
    const float* bias = p.bias;
    if (p.guided) {
        const float* un = p.logits + ((size_t)p.batch * p.n + r) * V;  // (V)
        for (int i = tid; i < V; i += bd) {
            float c = row[i], u = un[i];
            if (bias) {
                c = __fadd_rn(c, bias[i]);
                u = __fadd_rn(u, bias[i]);
            }
            const float l = __fadd_rn(c, __fmul_rn(p.cfg, __fsub_rn(c, u)));
            row[i] = l;
            argmax_merge(best, best_i, l, i);
        }
    } else {
        for (int i = tid; i < V; i += bd) {
            float l = row[i];
            if (bias) {
                l = __fadd_rn(l, bias[i]);
                row[i] = l;
            }
            argmax_merge(best, best_i, l, i);
        }
    }
    // Each thread reads back only the elements it wrote itself (same i = tid + k*bd) in the
    // strided passes below; the chunked passes read other threads' writes, which
    // __syncthreads() (inside every block reduction) makes visible within the block.
    block_argmax(best, best_i, sf, si);
    if (best_i == NO_INDEX) best_i = 0;  // V >= 1 is checked by the launcher; defensive only

    int token;
    if (p.forced && lp_ok) {
        token = p.forced[(size_t)b * p.cells + lp];
    } else if (p.temperature <= 0.f || !isfinite(best)) {
        token = best_i;
    } else {
        const float mx = best;
        const double inv_t = 1.0 / (double)p.temperature;
        const bool topk = p.top_k < V, topp = p.top_p < 1.f;
        const bool filter = topk || topp;
        // Kept set: key > tau, or key == tau and tie rank (ascending id) < rcap.
        uint32_t tau = 0;
        int rcap = NO_INDEX;

        if (topk) {
            const int k = max(p.top_k, 1);
            uint32_t t = 0;  // largest t with count(key >= t) >= k
            for (int bit = 31; bit >= 0; --bit) {
                const uint32_t cand = t | (1u << bit);
                double c = 0.0;
                for (int i = tid; i < V; i += bd) c += order_key(row[i]) >= cand ? 1.0 : 0.0;
                if (block_sum_f64(c, sd) >= (double)k) t = cand;
            }
            double gt = 0.0;
            for (int i = tid; i < V; i += bd) gt += order_key(row[i]) > t ? 1.0 : 0.0;
            tau = t;
            rcap = k - (int)block_sum_f64(gt, sd);  // >= 1: count(key > tau) < k
        }

        if (topp) {
            // Weight of the top-k set: keys above tau plus rcap ties at tau (all of weight
            // w(tau)); without top-k, the whole row.
            double mk = 0.0;
            for (int i = tid; i < V; i += bd) {
                const float l = row[i];
                if (!topk || order_key(l) > tau) mk += weight(l, mx, inv_t);
            }
            mk = block_sum_f64(mk, sd);
            if (topk) mk += (double)rcap * weight(key_to_float(tau), mx, inv_t);
            const double target = (double)p.top_p * mk;
            // Largest t with mass(top-k set, key >= t) >= target and > 0. For t <= tau (top-k
            // on) that mass is mk >= target, so those candidates pass without a pass.
            uint32_t t = 0;
            for (int bit = 31; bit >= 0; --bit) {
                const uint32_t cand = t | (1u << bit);
                if (topk && cand <= tau) { t = cand; continue; }
                double m = 0.0;
                for (int i = tid; i < V; i += bd) {
                    const float l = row[i];
                    if (order_key(l) >= cand) m += weight(l, mx, inv_t);
                }
                m = block_sum_f64(m, sd);
                if (m >= target && m > 0.0) t = cand;
            }
            // Mass strictly above t, and the ties at t.
            double mgt = 0.0, eq = 0.0;
            for (int i = tid; i < V; i += bd) {
                const float l = row[i];
                const uint32_t kk = order_key(l);
                if (kk > t) mgt += weight(l, mx, inv_t);
                else if (kk == t) eq += 1.0;
            }
            mgt = block_sum_f64(mgt, sd);
            eq = block_sum_f64(eq, sd);
            const int avail = (topk && t == tau) ? rcap : (int)eq;
            const double wt = weight(key_to_float(t), mx, inv_t);
            const double need = target - mgt;
            double m = 1.0;
            if (need > 0.0 && wt > 0.0) m = ceil(need / wt);
            m = fmin(m, (double)avail);
            tau = t;
            rcap = max(1, (int)m);
        }

        // The draw, over contiguous chunks: thread tid owns ids [lo, hi).
        const int chunk = (V + bd - 1) / bd;
        const int lo = min(V, tid * chunk), hi = min(V, lo + chunk);
        int rank0 = 0;  // ties at tau with a lower id than lo
        if (filter) {
            int ties = 0, total_ties;
            for (int i = lo; i < hi; ++i) ties += order_key(row[i]) == tau;
            rank0 = block_exclusive_scan<int>(ties, si, &total_ties);
        }
        // kept(): the kept-set test, in ascending id order within the chunk.
        auto kept = [&](float l, int& rank) -> bool {
            if (!filter) return true;
            const uint32_t kk = order_key(l);
            if (kk > tau) return true;
            if (kk == tau) return rank++ < rcap;
            return false;
        };
        double s = 0.0;
        int rank = rank0;
        for (int i = lo; i < hi; ++i) {
            const float l = row[i];
            if (kept(l, rank)) s += weight(l, mx, inv_t);
        }
        double total;
        double acc = block_exclusive_scan<double>(s, sd, &total);
        const u64 seed = p.run ? p.run[0] : p.seed;
        const uint32_t image0 = p.run ? (uint32_t)p.run[1] : p.image0;
        const double u = token_uniform(seed, image0 + (uint32_t)b, (uint32_t)p.step,
                                       (uint32_t)p.global_pos[j]);
        const double target = u * total;
        int found = NO_INDEX, last = -1;
        rank = rank0;
        for (int i = lo; i < hi; ++i) {
            const float l = row[i];
            if (!kept(l, rank)) continue;
            const double w = weight(l, mx, inv_t);
            if (w > 0.0) {
                acc += w;
                last = i;
                if (acc > target) { found = i; break; }
            }
        }
        token = block_minmax_i32(found, true, si);
        if (token == NO_INDEX) token = block_minmax_i32(last, false, si);
        if (token < 0) token = best_i;  // unreachable: the argmax token is kept, weight 1
    }

    // Statistics of the choice (the CPU's token_stats): p = softmax(row / T)[token] and the
    // entropy -sum p ln(p + 1e-8) in nats, in f64; one-hot at the argmax when T <= 0. lp_ok
    // and token are the same in every thread of the block, so the reductions are uniform.
    if (p.prob && lp_ok) {
        const bool token_ok = token >= 0 && token < V;
        double q, h;
        if (p.temperature <= 0.f) {
            q = token == best_i ? 1.0 : 0.0;
            h = -log(1.0 + 1e-8);
        } else {
            const double inv_t = 1.0 / (double)p.temperature;
            double z = 0.0;
            for (int i = tid; i < V; i += bd) z += weight(row[i], best, inv_t);
            z = block_sum_f64(z, sd);
            double e = 0.0;
            for (int i = tid; i < V; i += bd) {
                const double pi = weight(row[i], best, inv_t) / z;
                e -= pi * log(pi + 1e-8);
            }
            h = block_sum_f64(e, sd);
            // row[token] was written by another thread: visible after the barriers above.
            q = token_ok ? weight(row[token], best, inv_t) / z : 0.0;
        }
        if (!token_ok) q = nan("");
        if (tid == 0) {
            p.prob[(size_t)b * p.cells + lp] = (float)q;
            p.entropy[(size_t)b * p.cells + lp] = (float)h;
        }
    }

    if (tid == 0) {
        if (lp_ok) p.grid[(size_t)b * p.cells + lp] = token;
        p.tokens_out[(size_t)b * p.n + j] = token;
    }
}

// =============================================================================================
// Entry points: extern "C", named <op>_<variant>_<dtype>, one declaration per line (build.rs
// registers each as a k::* constant for src/cuda/), each with __launch_bounds__(the largest block
// its launcher uses): the registry records it, Gpu::launch refuses a larger block, and
// scripts/kernel-resources.sh checks registers and shared memory against it
// =============================================================================================

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) guided_sample_f32(const GuidedSampleParams p) { guided_sample_impl(p); }
