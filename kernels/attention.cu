// attention.cu: one transformer layer's attention step (SPEC.md section 5): RoPE of the new
// tokens' queries and keys, their append to the KV cache, and attention over the cache, in ONE
// launch per layer.
// Why here: the transformer step's attention is the one op cuBLAS cannot do alone (the mask,
// the per-layer RoPE mixing and the KV cache layout); a plain warp-per-query kernel is kept
// next to the tensor-core one as the on-device reference. RoPE and the append used to be a
// separate kernel (rope_kv_append) whose q' went through DRAM; folding them into the
// attention loaders saves a launch per layer and the q' write + read and the re-read of the
// n new keys and values (4 T C bf16 per layer).
//
// Notation: rows = sequence rows (B, or 2B with CFG), H heads, D head dim, C = H*D, n new tokens
// per row in this step, start = tokens already cached, L = start + n keys after the append,
// cap = cache capacity per row, T = rows*n tokens (token t = r*n + j).
//
// attention_{direct,tc}_d{32,64,128}_bf16: o = softmax(q' K'^T / sqrt(D)) V per (row, head).
//   qkv     (T, 3C) bf16      [q | k | v] of the n new tokens from the wqkv GEMM; head h at
//                             [h*D, (h+1)*D) of each third
//   rope_re (N+2, D) f32      rope table rows (unit complex number per dim i: re, im)
//   rope_im (N+2, D) f32
//   cur     (n) i32           table row of each new token's own position (shared by all rows)
//   prev    (n) i32           table row of its paired previous-block position (read with mix)
//   mix     (H) f32 or null   sigmoid(mixing_coeffs[layer]): weight of the current position
//   k_cache (rows, H, cap, D) bf16  keys 0..start-1 are read; positions start..start+n get
//                                   k' = rope(k, R_key) of the new tokens; nothing at or
//                                   beyond L is touched
//   v_cache (rows, H, cap, D) bf16  the same positions; start..start+n get v
//   key_block (L) i32 or null          optional block-causal mask (multi-block prefill /
//   query_block (n) i32 or null        teacher forcing): key j is visible to query i iff
//                                       key_block[j] <= query_block[i]. Both or neither.
//   o         (T, C) bf16              o[(r*n + i)*C + h*D + d]: heads concatenated, ready for wo
//   q' = rope(q, R_cur); R_key = a*R_cur + (1-a)*R_prev with a = mix[h] (not re-normalized),
//   or R_cur if mix is null.
//   rope(u, R)[i] = u[i]*Re[i] - u[i+D/2]*Im[i]   (i <  D/2)
//   rope(u, R)[i] = u[i]*Re[i] + u[i-D/2]*Im[i]   (i >= D/2)
//   A query with no visible key gets o = 0. A cur/prev entry outside [0, table_rows) makes
//   that token's q', k' and v NaN (in the cache too): a caller bug shows instead of reading out
//   of bounds.
//
//   Race freedom (blocks of one launch are unordered): every block of a (row, head) needs all
//   n new keys, so each block rotates them itself from qkv (keys at positions >= start are
//   NEVER read from the cache), and only positions < start are read from the cache. The new
//   positions are written by a disjoint partition of the blocks: new token j's k' and v are
//   stored by the block that owns query j (direct: the warp of query j; tc: the thread that
//   stages chunk (j, d8) in the block whose 16W queries contain j). So no block reads a cache
//   entry any block of the same launch writes, and every new entry is written exactly once.
//
//   Numerics: RoPE in f32 from the bf16 inputs (the same expressions as before the fold and as
//   cpu::ops::rope_kv_append), q' and k' rounded once to bf16, exactly the values the separate
//   rope_kv_append stored and attention read back: the fused kernels compute what the
//   rope_kv_append -> attention composition did, bit for bit (the key rotation is recomputed
//   per block with the same expression, so every copy is the same bf16). Scores, softmax
//   statistics and the output accumulate in f32; the online (flash-style) softmax runs in the
//   log2 domain (exp2f of s*log2(e)/sqrt(D) - running max).
//
//   direct (attention_direct_*, the reference on the device, simple): one warp per query, block 4 warps, grid
//     (ceil(n/4), H, rows). Lane owns dims lane + 32e (e < D/32). The warp rotates its query,
//     appends its own token's k' and v, then for each visible key (a new key rotated from qkv
//     per lane and dim): the dot product by warp_sum, then the online-softmax update. No
//     shared memory, no tensor cores; slow (one key per step) but obviously right.
//   tc (attention_tc_*, tensor cores): block = W warps (W in 1..4, the launcher picks W = min(4, ceil(n/16))),
//     each warp owns 16 queries, so a block covers 16W queries; grid (ceil(n/16W), H, rows).
//     Keys stream through shared memory in tiles of 64: K tile (64, D+8) and V tile (64, D+8)
//     bf16 (row stride padded by 8 bf16 = 16 bytes: keeps 16-byte stores aligned and makes the
//     fragment reads bank-conflict free), plus the tile's 64 key block ids. Static smem:
//     2*64*(D+8)*2 + 256 bytes = 10.5 KB (D=32), 18.7 KB (D=64), 35 KB (D=128).
//     The loader stages each key as D/8 chunks of 8 dims (16 bytes): a cached key (< start)
//     straight from the cache, a new key from qkv (its 8 dims and their 8 partners at +-D/2,
//     rotated in f32 and rounded to bf16), storing the chunk to the cache too when the block
//     owns that token.
//     Per tile and warp: S (16, 64) = Q K^T with mma.sync.m16n8k16 bf16 -> f32 (Q stays in
//     registers as D/16 A fragments, rotated from qkv once), mask and scale in registers,
//     row max over the 4 lanes of a quad (shfl_xor 1, 2), P = exp2(S - m) rounded to bf16 and
//     reused in registers directly as the A fragments of O += P V (the m16n8 accumulator
//     layout of two adjacent key groups of 8 is the m16k16 A layout), O (16, D) f32 in
//     registers. The row sum l accumulates the bf16-rounded P so normalization matches the
//     weights actually used; it is kept per lane and summed over the quad at the end.
//     Keys beyond L are zero-filled in smem (never read from global) and get P = 0.
//     No cp.async / double buffering yet: correctness first; latency hiding comes from several
//     blocks per SM.
//
// mma.m16n8k16 fragment layouts: see common.cuh.
#include "common.cuh"

// =============================================================================================
// CUDA kernels
// =============================================================================================

// ----------------------------------------------------------------------------------------------
// Parameters and the RoPE of the new tokens (shared by direct and tc)

struct AttnParams {
    const __nv_bfloat16* qkv;                // (T, 3C) [q | k | v] of the new tokens
    const float *rope_re, *rope_im;          // (table_rows, D)
    const int *cur, *prev;                   // (n)
    const float* mix;                        // (H) or null
    __nv_bfloat16 *k_cache, *v_cache;        // (rows, H, cap, D): read < start, written start..L
    const int *key_block, *query_block;      // (L), (n); both null without a mask
    __nv_bfloat16* out;                      // (T, C)
    int rows, n, h, cap, start, table_rows;
};
static_assert(sizeof(AttnParams) == 112, "AttnParams: mirrored in src/cuda/attention.rs");

// log2(e), to run the softmax with exp2f.
#define ATTN_LOG2E 1.4426950408889634f
// -inf, NaN and the largest int, spelled without <math.h>/<climits> (NVRTC builds have neither).
#define ATTN_NEG_INF (-__int_as_float(0x7f800000))
#define ATTN_NAN (__int_as_float(0x7fc00000))
#define ATTN_INT_MAX 0x7fffffff

// Two adjacent bf16 (element k in the low half, k+1 in the high half); p must be 4-byte aligned.
__device__ __forceinline__ uint32_t ld_bf16x2(const __nv_bfloat16* p) {
    return *reinterpret_cast<const uint32_t*>(p);
}

// Two bf16 from unrelated addresses: lo in the low half, hi in the high half.
__device__ __forceinline__ uint32_t pack_bf16(__nv_bfloat16 lo, __nv_bfloat16 hi) {
    return (uint32_t)__bfloat16_as_ushort(lo) | ((uint32_t)__bfloat16_as_ushort(hi) << 16);
}

// Round two f32 to bf16 and pack them (lo in the low half).
__device__ __forceinline__ uint32_t pack_f32_bf16(float lo, float hi) {
    return pack_bf16(f2bf(lo), f2bf(hi));
}

// The two bf16 of a packed register, back in f32.
__device__ __forceinline__ float lo_f32(uint32_t v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float hi_f32(uint32_t v) { return __uint_as_float(v & 0xffff0000u); }

// New token j's table rows: its own (cr) and the one its key mixes with (pr: prev[j] with mix,
// else cr). False when either is outside the table (the token's q', k', v are then NaN).
__device__ __forceinline__ bool rope_rows(const AttnParams& p, int j, int& cr, int& pr) {
    cr = p.cur[j];
    pr = p.mix ? p.prev[j] : cr;
    return cr >= 0 && cr < p.table_rows && pr >= 0 && pr < p.table_rows;
}

// Dim x of rope(u, R): u = u[x], w = its partner u[x +- D/2], (re, im) = R[x]; lo: x < D/2.
// The expressions of the former rope_kv_append (and of cpu::ops::rope_kv_append).
__device__ __forceinline__ float rope_dim(float u, float w, float re, float im, bool lo) {
    return lo ? u * re - w * im : u * re + w * im;
}

// R_key[x] of a new token with table rows (cr, pr): a*R[cr] + (1-a)*R[pr] on mixing layers
// (a = mix[hh]), else R[cr].
template <int D>
__device__ __forceinline__ void key_coef(const AttnParams& p, int hh, int cr, int pr, int x,
                                         float& re, float& im) {
    re = p.rope_re[(size_t)cr * D + x];
    im = p.rope_im[(size_t)cr * D + x];
    if (p.mix) {
        const float a = p.mix[hh], b = 1.f - a;
        re = a * re + b * p.rope_re[(size_t)pr * D + x];
        im = a * im + b * p.rope_im[(size_t)pr * D + x];
    }
}

// Head hh of new token j of row r in qkv: q at [0, D), k at [C, C+D), v at [2C, 2C+D).
template <int D>
__device__ __forceinline__ const __nv_bfloat16* token_head(const AttnParams& p, int r, int hh, int j) {
    return p.qkv + ((size_t)r * p.n + j) * 3 * ((size_t)p.h * D) + (size_t)hh * D;
}

// q'[x] (bf16) of new token j, head hh, row r: rope(q, R_cur)[x].
template <int D>
__device__ __forceinline__ __nv_bfloat16 new_q_dim(const AttnParams& p, int r, int hh, int j, int x) {
    int cr, pr;
    if (!rope_rows(p, j, cr, pr)) return f2bf(ATTN_NAN);
    const __nv_bfloat16* q = token_head<D>(p, r, hh, j);
    const bool lo = x < D / 2;
    const int px = lo ? x + D / 2 : x - D / 2;
    return f2bf(rope_dim(bf2f(q[x]), bf2f(q[px]), p.rope_re[(size_t)cr * D + x],
                         p.rope_im[(size_t)cr * D + x], lo));
}

// k'[x] and v[x] (bf16) of new token j, head hh, row r: k' = rope(k, R_key).
template <int D>
__device__ __forceinline__ void new_kv_dim(const AttnParams& p, int r, int hh, int j, int x,
                                           __nv_bfloat16& k, __nv_bfloat16& v) {
    int cr, pr;
    if (!rope_rows(p, j, cr, pr)) {
        k = v = f2bf(ATTN_NAN);
        return;
    }
    const __nv_bfloat16* kp = token_head<D>(p, r, hh, j) + (size_t)p.h * D;  // k (D)
    const bool lo = x < D / 2;
    const int px = lo ? x + D / 2 : x - D / 2;
    float re, im;
    key_coef<D>(p, hh, cr, pr, x, re, im);
    k = f2bf(rope_dim(bf2f(kp[x]), bf2f(kp[px]), re, im, lo));
    v = kp[(size_t)p.h * D + x];
}

// ----------------------------------------------------------------------------------------------
// direct: one warp per query, no tensor cores (the on-device reference).

template <int D>
__device__ __forceinline__ void attention_direct_impl(const AttnParams& p) {
    constexpr int DPL = D / 32;  // dims per lane: lane owns dims lane + 32*e
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int i = blockIdx.x * (blockDim.x >> 5) + warp;  // query (= new token) within the n
    const int hh = blockIdx.y, r = blockIdx.z;
    if (i >= p.n) return;  // whole warp leaves together; direct has no block-level barrier
    const int L = p.start + p.n;
    const size_t head = (size_t)r * p.h + hh;
    __nv_bfloat16* K = p.k_cache + head * p.cap * D;  // (cap, D)
    __nv_bfloat16* V = p.v_cache + head * p.cap * D;  // (cap, D)
    const int* kblk = p.key_block;                    // (L) or null
    const int* qblk = p.query_block;                  // (n) or null
    const int my_block = kblk ? qblk[i] : 0;

    // q' rotated here (rounded to bf16 as it was stored), pre-scaled by log2(e)/sqrt(D): scores
    // come out in the log2 domain.
    const float qs = rsqrtf((float)D) * ATTN_LOG2E;
    float qv[DPL], acc[DPL];
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
        qv[e] = bf2f(new_q_dim<D>(p, r, hh, i, lane + 32 * e)) * qs;
        acc[e] = 0.f;
    }
    // Append this warp's own token: position start + i is written by this warp only, and no
    // warp of the launch reads the cache at or beyond start.
#pragma unroll
    for (int e = 0; e < DPL; ++e) {
        __nv_bfloat16 k, v;
        new_kv_dim<D>(p, r, hh, i, lane + 32 * e, k, v);
        K[(size_t)(p.start + i) * D + lane + 32 * e] = k;
        V[(size_t)(p.start + i) * D + lane + 32 * e] = v;
    }
    float m = ATTN_NEG_INF, l = 0.f;
    for (int j = 0; j < L; ++j) {
        if (kblk && kblk[j] > my_block) continue;  // uniform over the warp
        float kx[DPL], vx[DPL];
#pragma unroll
        for (int e = 0; e < DPL; ++e) {
            if (j < p.start) {  // cached
                kx[e] = bf2f(K[(size_t)j * D + lane + 32 * e]);
                vx[e] = bf2f(V[(size_t)j * D + lane + 32 * e]);
            } else {  // new: from qkv, rotated as it is appended
                __nv_bfloat16 k, v;
                new_kv_dim<D>(p, r, hh, j - p.start, lane + 32 * e, k, v);
                kx[e] = bf2f(k);
                vx[e] = bf2f(v);
            }
        }
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < DPL; ++e) s += qv[e] * kx[e];
        s = warp_sum(s);  // every lane holds the same score
        const float m_new = fmaxf(m, s);
        const float corr = exp2f(m - m_new);  // m = -inf on the first key: corr = 0
        const float pj = exp2f(s - m_new);
        l = l * corr + pj;
#pragma unroll
        for (int e = 0; e < DPL; ++e) acc[e] = acc[e] * corr + pj * vx[e];
        m = m_new;
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    __nv_bfloat16* o = p.out + ((size_t)r * p.n + i) * (size_t)(p.h * D) + hh * D;
#pragma unroll
    for (int e = 0; e < DPL; ++e) o[lane + 32 * e] = f2bf(acc[e] * inv);
}

// ----------------------------------------------------------------------------------------------
// tc: flash-style, bf16 tensor cores (mma.sync m16n8k16), f32 accumulation.

#define ATTN_BK 64         // keys per shared-memory tile
#define ATTN_MAX_WARPS 4   // warps per block (16 queries each); the launcher uses 1..4

// q' dims x, x+1 (x even: both on one side of D/2) of new token j, packed as an A-fragment
// register.
template <int D>
__device__ __forceinline__ uint32_t new_q_pair(const AttnParams& p, int r, int hh, int j, int x) {
    return pack_bf16(new_q_dim<D>(p, r, hh, j, x), new_q_dim<D>(p, r, hh, j, x + 1));
}

// Dims d8..d8+7 (d8 a multiple of 8: all on one side of D/2) of new token j's k' and v, packed
// as 8 bf16 each: 16-byte loads of the 8 dims, their 8 partners and the 8 values.
template <int D>
__device__ __forceinline__ void new_kv_chunk(const AttnParams& p, int r, int hh, int j, int d8,
                                             uint4& kq, uint4& vq) {
    int cr, pr;
    if (!rope_rows(p, j, cr, pr)) {
        const uint32_t nan2 = pack_f32_bf16(ATTN_NAN, ATTN_NAN);
        kq = vq = make_uint4(nan2, nan2, nan2, nan2);
        return;
    }
    const __nv_bfloat16* kp = token_head<D>(p, r, hh, j) + (size_t)p.h * D;  // k (D)
    const bool lo = d8 < D / 2;
    const int p8 = lo ? d8 + D / 2 : d8 - D / 2;
    const uint4 ku = *reinterpret_cast<const uint4*>(kp + d8);
    const uint4 kw = *reinterpret_cast<const uint4*>(kp + p8);
    vq = *reinterpret_cast<const uint4*>(kp + (size_t)p.h * D + d8);
    const uint32_t u[4] = {ku.x, ku.y, ku.z, ku.w}, w[4] = {kw.x, kw.y, kw.z, kw.w};
    uint32_t o[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
        float re0, im0, re1, im1;
        key_coef<D>(p, hh, cr, pr, d8 + 2 * e, re0, im0);
        key_coef<D>(p, hh, cr, pr, d8 + 2 * e + 1, re1, im1);
        o[e] = pack_f32_bf16(rope_dim(lo_f32(u[e]), lo_f32(w[e]), re0, im0, lo),
                             rope_dim(hi_f32(u[e]), hi_f32(w[e]), re1, im1, lo));
    }
    kq = make_uint4(o[0], o[1], o[2], o[3]);
}

template <int D>
__device__ __forceinline__ void attention_tc_impl(const AttnParams& p) {
    static_assert(D % 16 == 0 && D <= 128, "head dim");
    constexpr int LDS = D + 8;  // smem row stride in bf16
    constexpr int KS = D / 16;  // k-steps of the S = Q K^T mma (over dims)
    constexpr int NB = ATTN_BK / 8;  // 8-key column groups of S per tile
    constexpr int ND = D / 8;   // 8-dim column groups of O
    __shared__ __align__(16) __nv_bfloat16 Ks[ATTN_BK * LDS];  // (64, D+8) keys of this tile
    __shared__ __align__(16) __nv_bfloat16 Vs[ATTN_BK * LDS];  // (64, D+8) values of this tile
    __shared__ int kb_s[ATTN_BK];                              // (64) key block ids (mask only)

    const int nwarps = blockDim.x >> 5;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, t = lane & 3;
    const int hh = blockIdx.y, r = blockIdx.z;
    const int q0 = (blockIdx.x * nwarps + warp) * 16;  // this warp's first query
    const bool active = q0 < p.n;                       // warp has at least one real query
    const int L = p.start + p.n;
    const size_t head = (size_t)r * p.h + hh;
    __nv_bfloat16* Kg = p.k_cache + head * p.cap * D;  // (cap, D): read < start, append
    __nv_bfloat16* Vg = p.v_cache + head * p.cap * D;  // (cap, D)
    const int* kblk = p.key_block;                     // (L) or null
    const int* qblk = p.query_block;                   // (n) or null
    // The new tokens whose k', v this block appends: those of its 16W queries.
    const int own_lo = blockIdx.x * nwarps * 16, own_hi = min(p.n, own_lo + nwarps * 16);

    // This lane's two query rows: qa = q0 + g (C regs 0,1) and qb = q0 + g + 8 (C regs 2,3).
    const int qa = q0 + g, qb = q0 + g + 8;
    const bool va = qa < p.n, vb = qb < p.n;
    // Padding rows (>= n) see every key; their results are never stored.
    const int blk_a = (kblk && va) ? qblk[qa] : ATTN_INT_MAX;
    const int blk_b = (kblk && vb) ? qblk[qb] : ATTN_INT_MAX;

    // Q' (16, D) as KS A fragments, rotated from qkv here; padding rows are zero.
    uint32_t qf[KS][4];
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        const int c0 = ks * 16 + 2 * t;
        qf[ks][0] = va ? new_q_pair<D>(p, r, hh, qa, c0) : 0u;
        qf[ks][1] = vb ? new_q_pair<D>(p, r, hh, qb, c0) : 0u;
        qf[ks][2] = va ? new_q_pair<D>(p, r, hh, qa, c0 + 8) : 0u;
        qf[ks][3] = vb ? new_q_pair<D>(p, r, hh, qb, c0 + 8) : 0u;
    }

    const float sl2 = rsqrtf((float)D) * ATTN_LOG2E;  // score scale, log2 domain
    float m_a = ATTN_NEG_INF, m_b = ATTN_NEG_INF;  // running row max (log2 domain)
    float l_a = 0.f, l_b = 0.f;              // this lane's part of the running row sum
    float acc[ND][4];                        // O (16, D) f32, C layout per 8-dim group
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;

    for (int k0 = 0; k0 < L; k0 += ATTN_BK) {
        __syncthreads();  // every warp is done with the previous tile
        // Stage keys k0..k0+63 (zeros beyond L) as D/8 chunks of 16 bytes per key: cached
        // keys (< start) from the cache, new ones rotated from qkv (and appended to the cache
        // when this block owns the token: each new chunk has exactly one writer per launch).
        for (int c = threadIdx.x; c < ATTN_BK * (D / 8); c += blockDim.x) {
            const int key = c / (D / 8), d8 = (c % (D / 8)) * 8;
            const int kp = k0 + key;  // key position
            uint4 kv = make_uint4(0u, 0u, 0u, 0u), vv = kv;
            if (kp < p.start) {
                kv = *reinterpret_cast<const uint4*>(Kg + (size_t)kp * D + d8);
                vv = *reinterpret_cast<const uint4*>(Vg + (size_t)kp * D + d8);
            } else if (kp < L) {
                const int j = kp - p.start;  // new token
                new_kv_chunk<D>(p, r, hh, j, d8, kv, vv);
                if (j >= own_lo && j < own_hi) {
                    *reinterpret_cast<uint4*>(Kg + (size_t)kp * D + d8) = kv;
                    *reinterpret_cast<uint4*>(Vg + (size_t)kp * D + d8) = vv;
                }
            }
            *reinterpret_cast<uint4*>(Ks + key * LDS + d8) = kv;
            *reinterpret_cast<uint4*>(Vs + key * LDS + d8) = vv;
        }
        if (kblk)
            for (int c = threadIdx.x; c < ATTN_BK; c += blockDim.x)
                kb_s[c] = (k0 + c < L) ? kblk[k0 + c] : ATTN_INT_MAX;
        __syncthreads();
        if (!active) continue;

        // S (16, 64) = Q K^T: B[k][n] = K[key n][dim k], so reg0 = K[key][2t..2t+1] of dims
        // ks*16.., contiguous in the K tile.
        float s[NB][4];
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            s[nb][0] = s[nb][1] = s[nb][2] = s[nb][3] = 0.f;
            const __nv_bfloat16* krow = Ks + (nb * 8 + g) * LDS + 2 * t;
#pragma unroll
            for (int ks = 0; ks < KS; ++ks) {
                const uint32_t kf[2] = {ld_bf16x2(krow + ks * 16), ld_bf16x2(krow + ks * 16 + 8)};
                mma_16816<__nv_bfloat16>(s[nb], qf[ks], kf);
            }
        }

        // Scale, mask (invisible -> -inf), tile row max.
        float mx_a = ATTN_NEG_INF, mx_b = ATTN_NEG_INF;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int kt = nb * 8 + 2 * t + (e & 1);  // key within the tile
                bool vis = k0 + kt < L;
                if (kblk) vis = vis && kb_s[kt] <= (e < 2 ? blk_a : blk_b);
                const float v = vis ? s[nb][e] * sl2 : ATTN_NEG_INF;
                s[nb][e] = v;
                if (e < 2) mx_a = fmaxf(mx_a, v);
                else mx_b = fmaxf(mx_b, v);
            }
        }
        // The 4 lanes of a quad (same g) hold one row's 64 columns together.
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 1));
        mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, 2));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 1));
        mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, 2));
        const float mn_a = fmaxf(m_a, mx_a), mn_b = fmaxf(m_b, mx_b);
        // A row with nothing visible so far keeps m = -inf; subtract 0 instead (p = 0 then).
        const float mu_a = mn_a == ATTN_NEG_INF ? 0.f : mn_a;
        const float mu_b = mn_b == ATTN_NEG_INF ? 0.f : mn_b;
        const float corr_a = exp2f(m_a - mu_a), corr_b = exp2f(m_b - mu_b);
        m_a = mn_a;
        m_b = mn_b;

        // P = exp2(S - m) in bf16, laid out as the A fragments of O += P V: key group pair
        // (2kk, 2kk+1) is one 16-key k-step; group 2kk gives regs 0 (row g) and 1 (row g+8),
        // group 2kk+1 gives regs 2 and 3.
        uint32_t pf[ATTN_BK / 16][4];
        float rs_a = 0.f, rs_b = 0.f;
#pragma unroll
        for (int nb = 0; nb < NB; ++nb) {
            const uint32_t pa = pack_f32_bf16(exp2f(s[nb][0] - mu_a), exp2f(s[nb][1] - mu_a));
            const uint32_t pb = pack_f32_bf16(exp2f(s[nb][2] - mu_b), exp2f(s[nb][3] - mu_b));
            rs_a += lo_f32(pa) + hi_f32(pa);
            rs_b += lo_f32(pb) + hi_f32(pb);
            pf[nb >> 1][(nb & 1) * 2 + 0] = pa;
            pf[nb >> 1][(nb & 1) * 2 + 1] = pb;
        }
        l_a = l_a * corr_a + rs_a;
        l_b = l_b * corr_b + rs_b;
#pragma unroll
        for (int nd = 0; nd < ND; ++nd) {
            acc[nd][0] *= corr_a;
            acc[nd][1] *= corr_a;
            acc[nd][2] *= corr_b;
            acc[nd][3] *= corr_b;
        }

        // O (16, D) += P (16, 64) V (64, D): B[k][n] = V[key k][dim n], reg0 = V[2t..2t+1][g]
        // (two keys, so two 16-bit reads), reg1 = V[2t+8..2t+9][g].
#pragma unroll
        for (int kk = 0; kk < ATTN_BK / 16; ++kk) {
            const __nv_bfloat16* v0 = Vs + (kk * 16 + 2 * t) * LDS + g;
#pragma unroll
            for (int nd = 0; nd < ND; ++nd) {
                const __nv_bfloat16* vp = v0 + nd * 8;
                const uint32_t vf[2] = {pack_bf16(vp[0], vp[LDS]), pack_bf16(vp[8 * LDS], vp[9 * LDS])};
                mma_16816<__nv_bfloat16>(acc[nd], pf[kk], vf);
            }
        }
    }
    if (!active) return;

    // Full row sums over the quad, normalize, store bf16 pairs.
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 1);
    l_a += __shfl_xor_sync(0xffffffffu, l_a, 2);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 1);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, 2);
    const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f;
    const float inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
    const size_t c = (size_t)p.h * D;
    __nv_bfloat16* o = p.out + (size_t)hh * D + 2 * t;  // (T, C)
#pragma unroll
    for (int nd = 0; nd < ND; ++nd) {
        if (va)
            *reinterpret_cast<uint32_t*>(o + ((size_t)r * p.n + qa) * c + nd * 8) =
                pack_f32_bf16(acc[nd][0] * inv_a, acc[nd][1] * inv_a);
        if (vb)
            *reinterpret_cast<uint32_t*>(o + ((size_t)r * p.n + qb) * c + nd * 8) =
                pack_f32_bf16(acc[nd][2] * inv_b, acc[nd][3] * inv_b);
    }
}

// =============================================================================================
// Entry points: extern "C", named <op>_<variant>_<dtype>, one declaration per line (build.rs
// registers each as a k::* constant for src/cuda/), each with __launch_bounds__(the largest block
// its launcher uses): the registry records it, Gpu::launch refuses a larger block, and
// scripts/kernel-resources.sh checks registers and shared memory against it
// =============================================================================================

extern "C" __global__ void __launch_bounds__(128) attention_direct_d32_bf16(const AttnParams p) { attention_direct_impl<32>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_direct_d64_bf16(const AttnParams p) { attention_direct_impl<64>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_direct_d128_bf16(const AttnParams p) { attention_direct_impl<128>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc_d32_bf16(const AttnParams p) { attention_tc_impl<32>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc_d64_bf16(const AttnParams p) { attention_tc_impl<64>(p); }
extern "C" __global__ void __launch_bounds__(128) attention_tc_d128_bf16(const AttnParams p) { attention_tc_impl<128>(p); }
