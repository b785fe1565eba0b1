// attention_emu.cpp: kernels/attention.cu on the host emulator (kernels/emu.cuh) against an
// f64 CPU reference, with the launch shapes of src/cuda/attention.rs. Run with
// tools/emu/run.sh (`quick`: fewer cases); exits non-zero on failure.
#include "../../kernels/attention.cu"
#include "check.hpp"

#include <chrono>

// bf16 buffers are kept as raw uint16_t here; B() views them as the kernels' type.
static std::mt19937_64 rng(12345);
static float uni(float s) { return s * (2.f * std::uniform_real_distribution<float>(0.f, 1.f)(rng) - 1.f); }
static uint16_t bf(float f) { return __float2bfloat16(f).x; }
static float fb(uint16_t h) { return __bfloat162float(__nv_bfloat16_raw{h}); }
static const uint16_t BF_NAN = 0x7fc0;
static __nv_bfloat16* B(std::vector<uint16_t>& v) { return reinterpret_cast<__nv_bfloat16*>(v.data()); }

struct Shape { int rows, h, d, n, start, cap; };

static double worst[3] = {0, 0, 0};  // rope, attention direct, attention tc

// ---------------------------------------------------------------- rope_kv_append
static void test_rope(Shape s, bool mixing) {
    const int C = s.h * s.d, T = s.rows * s.n, table = 343, half = s.d / 2;
    std::vector<uint16_t> qkv(T * 3 * C);
    for (auto& x : qkv) x = bf(uni(2.f));
    std::vector<float> re(table * s.d), im(table * s.d);
    for (int i = 0; i < table * s.d; ++i) { float a = uni(3.14159f); re[i] = std::cos(a); im[i] = std::sin(a); }
    std::vector<int> cur(s.n), prev(s.n);
    for (int j = 0; j < s.n; ++j) { cur[j] = rng() % table; prev[j] = rng() % table; }
    std::vector<float> mix(s.h);
    for (auto& x : mix) x = 0.5f + 0.5f * uni(1.f);
    const size_t qlen = (size_t)s.rows * s.h * s.n * s.d, clen = (size_t)s.rows * s.h * s.cap * s.d;
    std::vector<uint16_t> q(qlen, BF_NAN), kc(clen, bf(7.f)), vc(clen, bf(7.f));
    RopeKvParams p{B(qkv), re.data(), im.data(), cur.data(), prev.data(), mixing ? mix.data() : nullptr,
                   B(q), B(kc), B(vc), s.rows, s.n, s.h, s.d, s.cap, s.start, table};
    const size_t pairs = (size_t)T * s.h * half;
    unsigned grid = (unsigned)std::min<size_t>(std::max<size_t>((pairs + 255) / 256, 1), 65535);
    emu_launch(rope_kv_append_bf16, {grid, 1, 1}, {256, 1, 1}, p);

    std::vector<float> gq, gk;
    std::vector<double> wq, wk;
    int bad_other = 0, bad_v = 0;
    for (int r = 0; r < s.rows; ++r)
        for (int hh = 0; hh < s.h; ++hh)
            for (int j = 0; j < s.n; ++j) {
                const uint16_t* src = &qkv[((size_t)r * s.n + j) * 3 * C + hh * s.d];
                const float *rc = &re[cur[j] * s.d], *ic = &im[cur[j] * s.d];
                const float *rp = &re[prev[j] * s.d], *ip = &im[prev[j] * s.d];
                for (int i = 0; i < s.d; ++i) {
                    const int o = i < half ? i + half : i - half;
                    const double sg = i < half ? -1 : 1;
                    double kre = rc[i], kim = ic[i];
                    if (mixing) { kre = mix[hh] * rc[i] + (1 - mix[hh]) * rp[i]; kim = mix[hh] * ic[i] + (1 - mix[hh]) * ip[i]; }
                    wq.push_back(fb(src[i]) * (double)rc[i] + sg * fb(src[o]) * ic[i]);
                    gq.push_back(fb(q[(((size_t)r * s.h + hh) * s.n + j) * s.d + i]));
                    wk.push_back(fb(src[C + i]) * kre + sg * fb(src[C + o]) * kim);
                    const size_t ko = (((size_t)r * s.h + hh) * s.cap + s.start + j) * s.d + i;
                    gk.push_back(fb(kc[ko]));
                    if (vc[ko] != src[2 * C + i]) ++bad_v;
                }
            }
    for (int rh = 0; rh < s.rows * s.h; ++rh)
        for (int pos = 0; pos < s.cap; ++pos)
            if (pos < s.start || pos >= s.start + s.n)
                for (int i = 0; i < s.d; ++i) {
                    const size_t k = ((size_t)rh * s.cap + pos) * s.d + i;
                    if (kc[k] != bf(7.f) || vc[k] != bf(7.f)) ++bad_other;
                }
    char label[160];
    std::snprintf(label, sizeof label, "rope D %d H %d n %d start %d rows %d mix %d", s.d, s.h, s.n, s.start, s.rows, mixing);
    worst[0] = std::max(worst[0], check(std::string(label) + " q'", gq, wq, 1e-2));
    worst[0] = std::max(worst[0], check(std::string(label) + " k' v", gk, wk, 1e-2, bad_v + bad_other));
}

// ---------------------------------------------------------------- attention
enum MaskKind { NONE, CAUSAL, CAUSAL_EMPTY };

static void test_attention(Shape s, MaskKind mk, float qscale) {
    const int C = s.h * s.d, T = s.rows * s.n, L = s.start + s.n;
    const size_t qlen = (size_t)s.rows * s.h * s.n * s.d, clen = (size_t)s.rows * s.h * s.cap * s.d;
    std::vector<uint16_t> q(qlen), kc(clen, BF_NAN), vc(clen, BF_NAN);  // NaN beyond L: never read
    for (auto& x : q) x = bf(uni(qscale));
    for (int rh = 0; rh < s.rows * s.h; ++rh)
        for (int pos = 0; pos < L; ++pos)
            for (int i = 0; i < s.d; ++i) {
                kc[((size_t)rh * s.cap + pos) * s.d + i] = bf(uni(1.f));
                vc[((size_t)rh * s.cap + pos) * s.d + i] = bf(uni(1.f));
            }
    // Block ids: class token block 0, then blocks of sizes 1, 4, 7, 16, 1, 4, ...
    std::vector<int> kb;
    const int sizes[4] = {1, 4, 7, 16};
    kb.push_back(0);
    for (int b = 1; (int)kb.size() < L; ++b)
        for (int k = 0; k < sizes[(b - 1) % 4] && (int)kb.size() < L; ++k) kb.push_back(b);
    std::vector<int> qb(kb.begin() + s.start, kb.end());
    if (mk == CAUSAL_EMPTY) qb[0] = -1;

    std::vector<double> want((size_t)T * C, 0.0);
    const double scale = 1.0 / std::sqrt((double)s.d);
    for (int r = 0; r < s.rows; ++r)
        for (int hh = 0; hh < s.h; ++hh)
            for (int i = 0; i < s.n; ++i) {
                const size_t rh = (size_t)r * s.h + hh;
                std::vector<double> sc(L, -INFINITY);
                double mx = -INFINITY;
                for (int j = 0; j < L; ++j) {
                    if (mk != NONE && kb[j] > qb[i]) continue;
                    double dot = 0;
                    for (int e = 0; e < s.d; ++e)
                        dot += (double)fb(q[(rh * s.n + i) * s.d + e]) * fb(kc[(rh * s.cap + j) * s.d + e]);
                    sc[j] = dot * scale;
                    mx = std::max(mx, sc[j]);
                }
                if (mx == -INFINITY) continue;
                double sum = 0;
                double* o = &want[((size_t)r * s.n + i) * C + hh * s.d];
                for (int j = 0; j < L; ++j) {
                    if (sc[j] == -INFINITY) continue;
                    const double pj = std::exp(sc[j] - mx);
                    sum += pj;
                    for (int e = 0; e < s.d; ++e) o[e] += pj * fb(vc[(rh * s.cap + j) * s.d + e]);
                }
                for (int e = 0; e < s.d; ++e) o[e] /= sum;
            }

    for (int v = 1; v <= 2; ++v) {
        std::vector<uint16_t> out((size_t)T * C, BF_NAN);
        AttnParams p{B(q), B(kc), B(vc), mk != NONE ? kb.data() : nullptr, mk != NONE ? qb.data() : nullptr,
                     B(out), s.rows, s.n, s.h, s.cap, s.start};
        // Launch shapes exactly as src/cuda/attention.rs picks them.
        void (*k)(const AttnParams) = nullptr;
        unsigned gx, threads;
        if (v == 1) {
            k = s.d == 32 ? attention_direct_d32_bf16 : s.d == 64 ? attention_direct_d64_bf16 : attention_direct_d128_bf16;
            gx = (s.n + 3) / 4;
            threads = 128;
        } else {
            k = s.d == 32 ? attention_tc_d32_bf16 : s.d == 64 ? attention_tc_d64_bf16 : attention_tc_d128_bf16;
            const unsigned warps = std::min((s.n + 15) / 16, 4);
            gx = (s.n + 16 * warps - 1) / (16 * warps);
            threads = 32 * warps;
        }
        emu_launch(k, {gx, (unsigned)s.h, (unsigned)s.rows}, {threads, 1, 1}, p);
        std::vector<float> got(out.size());
        for (size_t i = 0; i < out.size(); ++i) got[i] = fb(out[i]);
        long empty_bad = 0;
        if (mk == CAUSAL_EMPTY)
            for (int r = 0; r < s.rows; ++r)
                for (int c = 0; c < C; ++c)
                    if (got[(size_t)r * s.n * C + c] != 0.f) ++empty_bad;
        char label[200];
        std::snprintf(label, sizeof label, "attention_%s D %d H %d n %d start %d rows %d mask %d qscale %g", v == 1 ? "direct" : "tc", s.d,
                      s.h, s.n, s.start, s.rows, (int)mk, qscale);
        worst[v] = std::max(worst[v], check(label, got, want, 1e-2, empty_bad));
    }
}

// `attention_emu bench`: launch times at the tiny preset's shapes (hidden 64 = 2 heads of 32;
// 256 queries at the last scale over 341 keys, 2 rows with guidance) and S-2x's (8 x 64).
static void bench() {
    for (Shape s : {Shape{2, 2, 32, 256, 85, 341}, Shape{2, 2, 32, 16, 5, 21}, Shape{2, 8, 64, 256, 85, 341}}) {
        const size_t qlen = (size_t)s.rows * s.h * s.n * s.d, clen = (size_t)s.rows * s.h * s.cap * s.d;
        std::vector<uint16_t> q(qlen), kc(clen), vc(clen), out((size_t)s.rows * s.n * s.h * s.d);
        for (auto& x : q) x = bf(uni(1.f));
        for (auto& x : kc) x = bf(uni(1.f));
        for (auto& x : vc) x = bf(uni(1.f));
        AttnParams p{B(q), B(kc), B(vc), nullptr, nullptr, B(out), s.rows, s.n, s.h, s.cap, s.start};
        auto k_direct = s.d == 32 ? attention_direct_d32_bf16 : attention_direct_d64_bf16;
        auto k_tc = s.d == 32 ? attention_tc_d32_bf16 : attention_tc_d64_bf16;
        const unsigned warps = std::min((s.n + 15) / 16, 4);
        auto t0 = std::chrono::steady_clock::now();
        emu_launch(k_direct, {(unsigned)(s.n + 3) / 4, (unsigned)s.h, (unsigned)s.rows}, {128, 1, 1}, p);
        auto t1 = std::chrono::steady_clock::now();
        emu_launch(k_tc, {(unsigned)((s.n + 16 * warps - 1) / (16 * warps)), (unsigned)s.h, (unsigned)s.rows},
                   {32 * warps, 1, 1}, p);
        auto t2 = std::chrono::steady_clock::now();
        auto ms = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
        std::printf("time attention rows %d H %d D %d n %d keys %d: direct %7.1f ms  tc %7.1f ms\n", s.rows, s.h, s.d,
                    s.n, s.start + s.n, ms(t0, t1), ms(t1, t2));
    }
}

int main(int argc, char** argv) {
    if (argc > 1 && std::string(argv[1]) == "bench") {
        bench();
        return finish();
    }
    const bool quick = argc > 1 && std::string(argv[1]) == "quick";
    // Parameter-struct sizes (static_assert in kernels/attention.cu, const assertions in
    // src/cuda/attention.rs).
    std::printf("sizeof RopeKv %zu Attn %zu\n", sizeof(RopeKvParams), sizeof(AttnParams));
    // rows, h, d, n, start, cap
    test_rope({1, 4, 32, 1, 0, 3}, false);
    test_rope({3, 2, 64, 4, 1, 8}, true);
    test_rope({2, 3, 64, 63, 86, 152}, true);
    test_rope({1, 2, 128, 5, 10, 16}, true);
    struct Case { Shape s; MaskKind m; float qs; };
    std::vector<Case> cases = {
        {{1, 1, 32, 1, 0, 1}, NONE, 1.f},     {{2, 2, 64, 1, 1, 4}, NONE, 4.f},
        {{1, 2, 64, 4, 86, 95}, NONE, 2.f},   {{1, 1, 32, 63, 278, 345}, NONE, 4.f},
        {{2, 1, 64, 64, 17, 90}, NONE, 8.f},  {{1, 1, 64, 65, 0, 65}, CAUSAL, 2.f},
        {{1, 1, 32, 128, 0, 130}, CAUSAL, 2.f}, {{2, 1, 64, 17, 5, 30}, CAUSAL_EMPTY, 2.f},
        {{1, 2, 128, 17, 30, 50}, NONE, 2.f}, {{1, 1, 128, 40, 100, 141}, CAUSAL, 3.f},
        {{1, 1, 64, 33, 64, 100}, NONE, 30.f},
    };
    if (!quick) {
        cases.push_back({{1, 1, 64, 128, 278, 410}, NONE, 4.f});
        cases.push_back({{1, 1, 32, 200, 0, 200}, CAUSAL, 2.f});
    }
    for (auto& c : cases) test_attention(c.s, c.m, c.qs);
    std::printf("worst rel err: rope %.2e, attention direct %.2e, tc %.2e\n", worst[0], worst[1], worst[2]);
    return finish();
}
