// decoder_emu.cpp: kernels/decoder.cu on the host emulator (kernels/emu.cuh) against
// double-precision references, on small ragged shapes. Run with tools/emu/run.sh; exits
// non-zero on failure.
#include "../../kernels/decoder.cu"
#include "check.hpp"

#include <chrono>

static std::mt19937_64 rng(1234);

static std::vector<float> rand_f32(size_t n, float lo, float hi) {
    std::uniform_real_distribution<float> d(lo, hi);
    std::vector<float> v(n);
    for (auto& x : v) x = d(rng);
    return v;
}

template <typename T>
static std::vector<T> to_h(const std::vector<float>& v) {
    std::vector<T> o(v.size());
    for (size_t i = 0; i < v.size(); ++i) o[i] = f2h<T>(v[i]);
    return o;
}

// ---- conv3x3 -------------------------------------------------------------------------------
enum Res { NONE, SEPARATE, IN_PLACE };

template <typename T>
static void test_conv(int batch, int height, int width, int cin, int cout, bool up, Res res) {
    const int hin = up ? height / 2 : height, win = up ? width / 2 : width;
    const size_t m = (size_t)batch * height * width;
    // Inputs and weights exactly representable in bf16, so only accumulation order differs.
    auto xf = rand_f32((size_t)batch * hin * win * cin, -1, 1);
    for (auto& v : xf) v = h_round<T>(v);
    auto wf = rand_f32((size_t)cout * 9 * cin, -0.2f, 0.2f);
    for (auto& v : wf) v = h_round<T>(v);
    auto bias = rand_f32(cout, -1, 1);
    auto resv = rand_f32(m * cout, -2, 2);
    auto xb = to_h<T>(xf), wb = to_h<T>(wf);

    std::vector<double> want(m * cout);
    for (int b = 0; b < batch; ++b)
        for (int oy = 0; oy < height; ++oy)
            for (int ox = 0; ox < width; ++ox)
                for (int co = 0; co < cout; ++co) {
                    double acc = bias[co];
                    for (int ky = 0; ky < 3; ++ky)
                        for (int kx = 0; kx < 3; ++kx) {
                            const int yy = oy + ky - 1, xx = ox + kx - 1;
                            if (yy < 0 || yy >= height || xx < 0 || xx >= width) continue;
                            const int iy = up ? yy / 2 : yy, ix = up ? xx / 2 : xx;
                            for (int ci = 0; ci < cin; ++ci)
                                acc += (double)xf[(((size_t)b * hin + iy) * win + ix) * cin + ci] *
                                       wf[((size_t)co * 9 + ky * 3 + kx) * cin + ci];
                        }
                    const size_t o = (((size_t)b * height + oy) * width + ox) * cout + co;
                    if (res != NONE) acc += resv[o];
                    want[o] = acc;
                }

    for (int version = 1; version <= 2; ++version) {
        if (version == 2 && cin % 32 != 0) continue;
        std::vector<float> y(m * cout, NAN);
        std::vector<float> r = resv;
        if (res == IN_PLACE) y = resv;
        Conv3x3Params p{};
        p.x = xb.data();
        p.w = wb.data();
        p.bias = bias.data();
        p.residual = res == NONE ? nullptr : res == SEPARATE ? r.data() : y.data();
        p.y = y.data();
        p.batch = batch;
        p.height = height;
        p.width = width;
        p.cin = cin;
        p.cout = cout;
        p.upsample = up;
        if (version == 1)
            emu_launch((std::is_same_v<T, __half> ? conv3x3_direct_f16 : conv3x3_direct_bf16), {3, 1, 1}, {64, 1, 1}, p);
        else
            emu_launch((std::is_same_v<T, __half> ? conv3x3_tc_f16 : conv3x3_tc_bf16),
                       {(unsigned)((m + TC_BM - 1) / TC_BM), (unsigned)((cout + TC_BN - 1) / TC_BN), 1},
                       {256, 1, 1}, p);
        char name[160];
        std::snprintf(name, sizeof name, "conv3x3_%s %s B%d %dx%d %d->%d%s%s", version == 1 ? "direct" : "tc", tname<T>(), batch, height,
                      width, cin, cout, up ? " upsample" : "",
                      res == NONE ? "" : res == SEPARATE ? " +res" : " +res in place");
        check(name, y, want, 1e-5);
    }
}

// ---- GroupNorm --------------------------------------------------------------------------------
template <typename T>
static void test_gn(int batch, int hw, int c, bool silu, float offset) {
    auto x = rand_f32((size_t)batch * hw * c, -1, 1);
    for (size_t i = 0; i < x.size(); ++i) x[i] = x[i] * (1.f + (float)(i % c) / c) + offset;
    auto gamma = rand_f32(c, 0.5f, 1.5f), beta = rand_f32(c, -0.5f, 0.5f);
    const int chunk = 64, nchunk = (hw + chunk - 1) / chunk;
    std::vector<float> part((size_t)batch * nchunk * c * 2, NAN), ss((size_t)batch * c * 2, NAN);
    std::vector<T> y((size_t)batch * hw * c, f2h<T>(NAN));
    GnPartialParams pp{x.data(), part.data(), batch, hw, c, chunk, nchunk};
    emu_launch(gn_partial_f32, {(unsigned)nchunk, (unsigned)batch, 1}, {256, 1, 1}, pp);
    GnFinalizeParams fp{part.data(), gamma.data(), beta.data(), ss.data(), batch, hw, c, chunk, nchunk, 1e-6f};
    emu_launch(gn_finalize_f32, {32, (unsigned)batch, 1}, {256, 1, 1}, fp);
    GnApplyParams ap{x.data(), ss.data(), y.data(), batch, hw, c, silu};
    emu_launch((std::is_same_v<T, __half> ? gn_apply_f16 : gn_apply_bf16), {2, 1, 1}, {128, 1, 1}, ap);

    const int cpg = c / 32;
    std::vector<double> want(x.size());
    for (int b = 0; b < batch; ++b)
        for (int g = 0; g < 32; ++g) {
            double s = 0, s2 = 0;
            for (int q = 0; q < hw; ++q)
                for (int cc = 0; cc < cpg; ++cc) s += x[((size_t)b * hw + q) * c + g * cpg + cc];
            const double n = (double)hw * cpg, mean = s / n;
            for (int q = 0; q < hw; ++q)
                for (int cc = 0; cc < cpg; ++cc) {
                    const double d = x[((size_t)b * hw + q) * c + g * cpg + cc] - mean;
                    s2 += d * d;
                }
            const double rstd = 1.0 / std::sqrt(s2 / n + 1e-6);
            for (int q = 0; q < hw; ++q)
                for (int cc = 0; cc < cpg; ++cc) {
                    const int ch = g * cpg + cc;
                    const size_t i = ((size_t)b * hw + q) * c + ch;
                    double v = (x[i] - mean) * rstd * gamma[ch] + beta[ch];
                    if (silu) v = v / (1 + std::exp(-v));
                    want[i] = v;
                }
        }
    std::vector<float> got(y.size());
    for (size_t i = 0; i < y.size(); ++i) got[i] = h2f(y[i]);
    char name[160];
    std::snprintf(name, sizeof name, "group norm %s B%d hw %d C %d silu %d offset %g", tname<T>(), batch, hw, c,
                  (int)silu, offset);
    check(name, got, want, 4e-3);  // bf16 output rounding
}

// ---- softmax, gather, pixels, cast -------------------------------------------------------------
template <typename T>
static void test_softmax(int rows, int n) {
    auto s = rand_f32((size_t)rows * n, -30, 30);
    const float scale = 0.125f;
    std::vector<T> pr((size_t)rows * n, f2h<T>(NAN));
    SoftmaxParams p{s.data(), pr.data(), rows, n, scale};
    emu_launch((std::is_same_v<T, __half> ? attn_softmax_f16 : attn_softmax_bf16), {(unsigned)rows, 1, 1}, {256, 1, 1}, p);
    std::vector<double> want(s.size());
    std::vector<float> got(s.size());
    for (int r = 0; r < rows; ++r) {
        double mx = -1e300, sum = 0;
        for (int j = 0; j < n; ++j) mx = std::max(mx, (double)s[(size_t)r * n + j] * scale);
        for (int j = 0; j < n; ++j) sum += std::exp(s[(size_t)r * n + j] * scale - mx);
        for (int j = 0; j < n; ++j) {
            want[(size_t)r * n + j] = std::exp(s[(size_t)r * n + j] * scale - mx) / sum;
            got[(size_t)r * n + j] = h2f(pr[(size_t)r * n + j]);
        }
    }
    check(std::string("softmax ") + tname<T>() + " rows " + std::to_string(rows) + " n " + std::to_string(n), got, want, 4e-3);
}

template <typename T>
static void test_gather(int rows, int e, int v, bool normalize) {
    auto cb = rand_f32((size_t)v * e, -2, 2);
    std::vector<int> tok(rows);
    for (int r = 0; r < rows; ++r) tok[r] = (int)(rng() % v);
    tok[rows - 1] = v;  // out of range -> NaN row
    std::vector<T> z((size_t)rows * e, f2h<T>(0.f));
    GatherCodesParams p{tok.data(), cb.data(), z.data(), rows, e, v, normalize};
    emu_launch((std::is_same_v<T, __half> ? gather_codes_f16 : gather_codes_bf16), {1, 1, 1}, {128, 1, 1}, p);
    std::vector<float> got;
    std::vector<double> want;
    for (int r = 0; r + 1 < rows; ++r) {
        double n = 0;
        for (int d = 0; d < e; ++d) n += (double)cb[(size_t)tok[r] * e + d] * cb[(size_t)tok[r] * e + d];
        n = normalize ? std::max(std::sqrt(n), 1e-12) : 1.0;
        for (int d = 0; d < e; ++d) {
            got.push_back(h2f(z[(size_t)r * e + d]));
            want.push_back(cb[(size_t)tok[r] * e + d] / n);
        }
    }
    check(std::string("gather_codes ") + tname<T>() + " rows " + std::to_string(rows) + " e " + std::to_string(e), got, want, 4e-3);
    long not_nan = 0;
    for (int d = 0; d < e; ++d) not_nan += !std::isnan(h2f(z[(size_t)(rows - 1) * e + d]));
    check_exact(std::string("gather_codes ") + tname<T>() + " out-of-range token -> NaN row", not_nan);
}

static void test_pixels(int batch, int hw) {
    auto y = rand_f32((size_t)batch * hw * 3, -1.3f, 1.3f);
    y[0] = NAN;
    y[1] = 1.f;
    y[2] = -1.f;
    std::vector<float> of(y.size(), -7);
    std::vector<unsigned char> ou(y.size(), 77);
    PixelsParams p{y.data(), of.data(), ou.data(), batch, hw, 3};
    emu_launch(dec_pixels_f32, {2, 1, 1}, {64, 1, 1}, p);
    long bad = 0;
    for (int b = 0; b < batch; ++b)
        for (int c = 0; c < 3; ++c)
            for (int q = 0; q < hw; ++q) {
                const size_t i = ((size_t)b * 3 + c) * hw + q;
                const float v = y[((size_t)b * hw + q) * 3 + c];
                const float t = std::clamp((v + 1.f) / 2.f, 0.f, 1.f);
                const unsigned char u = std::isnan(v) ? 0 : (unsigned char)(t * 255.f);
                if (!(of[i] == v || (std::isnan(v) && std::isnan(of[i]))) || ou[i] != u) bad++;
            }
    check_exact("dec_pixels_f32 B" + std::to_string(batch), bad);
}

template <typename T>
static void run_all() {
    // conv3x3: ragged M (72, 75, 289 rows) and Cout (136, 3, 40) tiles, upsample, residuals,
    // Cin 32/64 (v2) and 8 (v1 only).
    test_conv<T>(2, 6, 6, 32, 136, false, NONE);
    test_conv<T>(1, 12, 12, 64, 3, true, SEPARATE);
    test_conv<T>(3, 5, 5, 32, 32, false, IN_PLACE);
    test_conv<T>(1, 17, 17, 32, 40, false, SEPARATE);
    test_conv<T>(1, 8, 16, 64, 130, true, IN_PLACE);
    test_conv<T>(2, 4, 4, 8, 5, false, NONE);
    // GroupNorm: channels per group 1, 4, 16; hw below, at and above the 64-pixel chunk;
    // a large mean offset.
    test_gn<T>(2, 25, 32, true, 0.f);
    test_gn<T>(1, 64 * 3 + 5, 128, true, 50.f);
    test_gn<T>(3, 1, 64, false, 3.f);
    test_gn<T>(1, 7, 512, false, -2.f);
    test_gn<T>(1, 300, 256, true, 1000.f);
    test_softmax<T>(3, 256);
    test_softmax<T>(2, 25);
    test_softmax<T>(1, 1);
    test_softmax<T>(1, 1000);
    test_gather<T>(37, 8, 100, true);
    test_gather<T>(5, 3, 10, false);
}

// `decoder_emu bench`: launch times at the tiny preset's / golden decoder's shapes (ch 32 at
// 256x256, 128 at 64x64), with the launch shapes of src/cuda/decoder/launch.rs.
static void bench() {
    struct Shape {
        int hw, cin, cout;
    };
    for (Shape s : {Shape{256, 32, 32}, Shape{64, 128, 128}, Shape{16, 128, 128}}) {
        const size_t m = (size_t)s.hw * s.hw;
        auto x = to_h<__nv_bfloat16>(rand_f32(m * s.cin, -1, 1));
        auto w = to_h<__nv_bfloat16>(rand_f32((size_t)s.cout * 9 * s.cin, -0.1f, 0.1f));
        auto bias = rand_f32(s.cout, -1, 1);
        std::vector<float> y(m * s.cout);
        Conv3x3Params p{x.data(), w.data(), bias.data(), nullptr, y.data(), 1, s.hw, s.hw, s.cin, s.cout, 0};
        auto t0 = std::chrono::steady_clock::now();
        emu_launch(conv3x3_tc_bf16, {(unsigned)((m + TC_BM - 1) / TC_BM), (unsigned)((s.cout + TC_BN - 1) / TC_BN), 1},
                   {256, 1, 1}, p);
        auto t1 = std::chrono::steady_clock::now();
        const unsigned gd = (unsigned)std::min<size_t>((m * s.cout + 255) / 256, 65535);
        emu_launch(conv3x3_direct_bf16, {gd, 1, 1}, {256, 1, 1}, p);
        auto t2 = std::chrono::steady_clock::now();
        // GroupNorm over the conv input's shape (chunks of 64 pixels).
        std::vector<float> xf = rand_f32(m * s.cin, -1, 1), part((m / 64 + 1) * s.cin * 2), ss(s.cin * 2);
        std::vector<float> gamma(s.cin, 1.f), beta(s.cin, 0.f);
        std::vector<__nv_bfloat16> gy(m * s.cin);
        const int nchunk = (int)((m + 63) / 64);
        GnPartialParams pp{xf.data(), part.data(), 1, (int)m, s.cin, 64, nchunk};
        GnFinalizeParams fp{part.data(), gamma.data(), beta.data(), ss.data(), 1, (int)m, s.cin, 64, nchunk, 1e-6f};
        GnApplyParams ap{xf.data(), ss.data(), gy.data(), 1, (int)m, s.cin, 1};
        emu_launch(gn_partial_f32, {(unsigned)nchunk, 1, 1}, {256, 1, 1}, pp);
        emu_launch(gn_finalize_f32, {32, 1, 1}, {256, 1, 1}, fp);
        emu_launch(gn_apply_bf16, {(unsigned)std::min<size_t>((m * s.cin / 4 + 255) / 256, 65535), 1, 1}, {256, 1, 1}, ap);
        auto t3 = std::chrono::steady_clock::now();
        auto ms = [](auto a, auto b) { return std::chrono::duration<double, std::milli>(b - a).count(); };
        std::printf("time %dx%d %d->%d: conv3x3_tc_bf16 %8.1f ms  conv3x3_direct_bf16 %8.1f ms  group norm (3 launches) %7.1f ms\n",
                    s.hw, s.hw, s.cin, s.cout, ms(t0, t1), ms(t1, t2), ms(t2, t3));
    }
}

int main(int argc, char** argv) {
    if (argc > 1 && std::string(argv[1]) == "bench") {
        bench();
        return finish();
    }
    // Parameter-struct sizes (static_assert in kernels/decoder.cu; the Rust unit test
    // `param_structs_match_c` asserts the same numbers).
    std::printf("sizeof Conv3x3 %zu GnPartial %zu GnFinalize %zu GnApply %zu Cast %zu Gather %zu "
                "Softmax %zu Pixels %zu\n",
                sizeof(Conv3x3Params), sizeof(GnPartialParams), sizeof(GnFinalizeParams),
                sizeof(GnApplyParams), sizeof(CastParams), sizeof(GatherCodesParams),
                sizeof(SoftmaxParams), sizeof(PixelsParams));
    run_all<__nv_bfloat16>();
    run_all<__half>();
    test_pixels(2, 50);
    return finish();
}
