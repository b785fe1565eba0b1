// attention_emu.cpp: kernels/attention.cu (RoPE + KV append + attention, one launch) on the host
// emulator (kernels/emu.cuh) against an f64 CPU reference, with the launch shapes of
// src/cuda/attention.rs. Run with tools/emu/run.sh (`quick`: fewer cases); exits non-zero on
// failure.
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

static double worst[3] = {0, 0, 0};  // appended k', attention direct, attention tc

enum MaskKind { NONE, CAUSAL, CAUSAL_EMPTY };

// The inputs of one attention step: qkv (q at scale qscale, k and v at 1), a RoPE table of 343
// rows, the tokens' rows, per-head mixing weights, and caches with random keys before start
// and NaN from start on (the new positions must be written, never read; those beyond L never
// touched).
struct Step {
    Shape s;
    int table = 343;
    std::vector<uint16_t> qkv, kc, vc;
    std::vector<float> re, im, mix;
    std::vector<int> cur, prev;
    Step(Shape s_, float qscale) : s(s_) {
        const int C = s.h * s.d, T = s.rows * s.n;
        qkv.resize((size_t)T * 3 * C);
        for (int t = 0; t < T; ++t)
            for (int i = 0; i < 3 * C; ++i) qkv[(size_t)t * 3 * C + i] = bf(uni(i < C ? qscale : 1.f));
        re.resize(table * s.d);
        im.resize(table * s.d);
        for (int i = 0; i < table * s.d; ++i) { float a = uni(3.14159f); re[i] = std::cos(a); im[i] = std::sin(a); }
        cur.resize(s.n);
        prev.resize(s.n);
        for (int j = 0; j < s.n; ++j) { cur[j] = rng() % table; prev[j] = rng() % table; }
        mix.resize(s.h);
        for (auto& x : mix) x = 0.5f + 0.5f * uni(1.f);
        const size_t clen = (size_t)s.rows * s.h * s.cap * s.d;
        kc.assign(clen, BF_NAN);
        vc.assign(clen, BF_NAN);
        for (int rh = 0; rh < s.rows * s.h; ++rh)
            for (int pos = 0; pos < s.start; ++pos)
                for (int i = 0; i < s.d; ++i) {
                    kc[((size_t)rh * s.cap + pos) * s.d + i] = bf(uni(1.f));
                    vc[((size_t)rh * s.cap + pos) * s.d + i] = bf(uni(1.f));
                }
    }
    AttnParams params(std::vector<uint16_t>& k, std::vector<uint16_t>& v, bool mixing, const int* kb, const int* qb,
                      std::vector<uint16_t>& out) {
        return AttnParams{B(qkv), re.data(), im.data(), cur.data(), prev.data(), mixing ? mix.data() : nullptr,
                          B(k), B(v), kb, qb, B(out), s.rows, s.n, s.h, s.cap, s.start, table};
    }
};

// The kernel and launch shape exactly as src/cuda/attention.rs picks them (v 1 direct, 2 tc).
static void launch(int v, const Shape& s, AttnParams p) {
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
}

// ---------------------------------------------------------------- attention (RoPE + append)
static void test_attention(Shape s, MaskKind mk, bool mixing, float qscale) {
    Step x(s, qscale);
    const int C = s.h * s.d, T = s.rows * s.n, L = s.start + s.n, half = s.d / 2;
    // Block ids: class token block 0, then blocks of sizes 1, 4, 7, 16, 1, 4, ...
    std::vector<int> kb;
    const int sizes[4] = {1, 4, 7, 16};
    kb.push_back(0);
    for (int b = 1; (int)kb.size() < L; ++b)
        for (int k = 0; k < sizes[(b - 1) % 4] && (int)kb.size() < L; ++k) kb.push_back(b);
    std::vector<int> qb(kb.begin() + s.start, kb.end());
    if (mk == CAUSAL_EMPTY) qb[0] = -1;

    // f64 reference: q' and k' rotated in f64 (not rounded), the cached keys as stored.
    const size_t rhn = (size_t)s.rows * s.h;
    std::vector<double> q(rhn * s.n * s.d), K(rhn * L * s.d), V(rhn * L * s.d);
    for (size_t rh = 0; rh < rhn; ++rh)
        for (int pos = 0; pos < s.start; ++pos)
            for (int i = 0; i < s.d; ++i) {
                K[(rh * L + pos) * s.d + i] = fb(x.kc[(rh * s.cap + pos) * s.d + i]);
                V[(rh * L + pos) * s.d + i] = fb(x.vc[(rh * s.cap + pos) * s.d + i]);
            }
    for (int r = 0; r < s.rows; ++r)
        for (int hh = 0; hh < s.h; ++hh)
            for (int j = 0; j < s.n; ++j) {
                const size_t rh = (size_t)r * s.h + hh;
                const uint16_t* src = &x.qkv[((size_t)r * s.n + j) * 3 * C + hh * s.d];
                const float *rc = &x.re[x.cur[j] * s.d], *ic = &x.im[x.cur[j] * s.d];
                const float *rp = &x.re[x.prev[j] * s.d], *ip = &x.im[x.prev[j] * s.d];
                for (int i = 0; i < s.d; ++i) {
                    const int o = i < half ? i + half : i - half;
                    const double sg = i < half ? -1 : 1;
                    double kre = rc[i], kim = ic[i];
                    if (mixing) {
                        kre = x.mix[hh] * rc[i] + (1 - x.mix[hh]) * rp[i];
                        kim = x.mix[hh] * ic[i] + (1 - x.mix[hh]) * ip[i];
                    }
                    q[(rh * s.n + j) * s.d + i] = fb(src[i]) * (double)rc[i] + sg * fb(src[o]) * ic[i];
                    K[(rh * L + s.start + j) * s.d + i] = fb(src[C + i]) * kre + sg * fb(src[C + o]) * kim;
                    V[(rh * L + s.start + j) * s.d + i] = fb(src[2 * C + i]);
                }
            }
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
                    for (int e = 0; e < s.d; ++e) dot += q[(rh * s.n + i) * s.d + e] * K[(rh * L + j) * s.d + e];
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
                    for (int e = 0; e < s.d; ++e) o[e] += pj * V[(rh * L + j) * s.d + e];
                }
                for (int e = 0; e < s.d; ++e) o[e] /= sum;
            }

    for (int v = 1; v <= 2; ++v) {
        std::vector<uint16_t> out((size_t)T * C, BF_NAN), kc = x.kc, vc = x.vc;
        launch(v, s, x.params(kc, vc, mixing, mk != NONE ? kb.data() : nullptr, mk != NONE ? qb.data() : nullptr, out));
        std::vector<float> got(out.size());
        for (size_t i = 0; i < out.size(); ++i) got[i] = fb(out[i]);
        long empty_bad = 0;
        if (mk == CAUSAL_EMPTY)
            for (int r = 0; r < s.rows; ++r)
                for (int c = 0; c < C; ++c)
                    if (got[(size_t)r * s.n * C + c] != 0.f) ++empty_bad;
        // The cache: k' at the new positions against the reference, v copied exactly, every
        // other position unchanged.
        std::vector<float> gk;
        std::vector<double> wk;
        long bad_cache = 0;
        for (size_t rh = 0; rh < rhn; ++rh)
            for (int pos = 0; pos < s.cap; ++pos)
                for (int i = 0; i < s.d; ++i) {
                    const size_t at = (rh * s.cap + pos) * s.d + i;
                    if (pos >= s.start && pos < L) {
                        gk.push_back(fb(kc[at]));
                        wk.push_back(K[(rh * L + pos) * s.d + i]);
                        if (fb(vc[at]) != V[(rh * L + pos) * s.d + i]) ++bad_cache;
                    } else if (kc[at] != x.kc[at] || vc[at] != x.vc[at]) {
                        ++bad_cache;
                    }
                }
        char label[200];
        std::snprintf(label, sizeof label, "attention_%s D %d H %d n %d start %d rows %d mask %d mix %d qscale %g",
                      v == 1 ? "direct" : "tc", s.d, s.h, s.n, s.start, s.rows, (int)mk, mixing, qscale);
        worst[v] = std::max(worst[v], check(label, got, want, 1e-2, empty_bad));
        worst[0] = std::max(worst[0], check(std::string(label) + " cache k' v", gk, wk, 1e-2, bad_cache));
    }
}

// `attention_emu bench`: launch times at the tiny preset's shapes (hidden 64 = 2 heads of 32;
// 256 new tokens at the last scale after 85 cached, 2 rows with guidance) and S-2x's (8 x 64).
static void bench() {
    for (Shape s : {Shape{2, 2, 32, 256, 85, 341}, Shape{2, 2, 32, 16, 5, 21}, Shape{2, 8, 64, 256, 85, 341}}) {
        Step x(s, 1.f);
        std::vector<uint16_t> out((size_t)s.rows * s.n * s.h * s.d);
        auto t0 = std::chrono::steady_clock::now();
        {
            std::vector<uint16_t> kc = x.kc, vc = x.vc;
            launch(1, s, x.params(kc, vc, true, nullptr, nullptr, out));
        }
        auto t1 = std::chrono::steady_clock::now();
        {
            std::vector<uint16_t> kc = x.kc, vc = x.vc;
            launch(2, s, x.params(kc, vc, true, nullptr, nullptr, out));
        }
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
    // Parameter-struct size (static_assert in kernels/attention.cu, const assertion in
    // src/cuda/attention.rs).
    std::printf("sizeof Attn %zu\n", sizeof(AttnParams));
    struct Case { Shape s; MaskKind m; bool mix; float qs; };
    // rows, h, d, n, start, cap
    std::vector<Case> cases = {
        {{1, 1, 32, 1, 0, 1}, NONE, false, 1.f},      {{2, 2, 64, 1, 1, 4}, NONE, true, 4.f},
        {{1, 2, 64, 4, 86, 95}, NONE, true, 2.f},     {{1, 1, 32, 63, 278, 345}, NONE, false, 4.f},
        {{2, 1, 64, 64, 17, 90}, NONE, true, 8.f},    {{1, 1, 64, 65, 0, 65}, CAUSAL, true, 2.f},
        {{1, 1, 32, 128, 0, 130}, CAUSAL, false, 2.f}, {{2, 1, 64, 17, 5, 30}, CAUSAL_EMPTY, true, 2.f},
        {{1, 2, 128, 17, 30, 50}, NONE, true, 2.f},   {{1, 1, 128, 40, 100, 141}, CAUSAL, false, 3.f},
        {{1, 1, 64, 33, 64, 100}, NONE, true, 30.f},  {{2, 3, 64, 5, 10, 16}, NONE, true, 2.f},
    };
    if (!quick) {
        cases.push_back({{1, 1, 64, 128, 278, 410}, NONE, true, 4.f});
        cases.push_back({{1, 1, 32, 200, 0, 200}, CAUSAL, true, 2.f});
    }
    for (auto& c : cases) test_attention(c.s, c.m, c.mix, c.qs);
    std::printf("worst rel err: appended k' %.2e, attention direct %.2e, tc %.2e\n", worst[0], worst[1], worst[2]);
    return finish();
}
