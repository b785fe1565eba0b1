// check.hpp: what the emulation drivers share: the seeded RNG, host-side 16-bit conversions,
// and one check line per case (relative L2 error against an f64 reference, non-finite
// outputs, extra mismatch counts). Include after the kernel file (which brings in
// kernels/emu.cuh through common.cuh).
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

static int failures = 0;

// Host conversions for the two storage types.
static float h2f(__nv_bfloat16 v) { return __bfloat162float(v); }
static float h2f(__half v) { return __half2float(v); }
template <typename T>
static T f2h(float v) {
    if constexpr (std::is_same_v<T, __half>)
        return __float2half(v);
    else
        return __float2bfloat16(v);
}
template <typename T>
static const char* tname() {
    return std::is_same_v<T, __half> ? "f16" : "bf16";
}
template <typename T>
static float h_round(float x) {
    return h2f(f2h<T>(x));
}

// sqrt(sum (got - want)^2 / sum want^2) over the finite outputs; *nonfinite counts the rest.
static double rel_err(const std::vector<float>& got, const std::vector<double>& want, long* nonfinite,
                      double* max_abs = nullptr, size_t* max_at = nullptr) {
    double num = 0, den = 0, worst = 0;
    size_t worst_i = 0;
    *nonfinite = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (!std::isfinite(got[i])) {
            ++*nonfinite;
            continue;
        }
        const double d = got[i] - want[i];
        num += d * d;
        den += want[i] * want[i];
        if (std::fabs(d) > worst) {
            worst = std::fabs(d);
            worst_i = i;
        }
    }
    if (max_abs) *max_abs = worst;
    if (max_at) *max_at = worst_i;
    return std::sqrt(num / std::max(den, 1e-300));
}

// One case: ok when every output is finite, `extra_bad` is 0 and rel <= rel_tol. Returns rel.
static double check(const std::string& name, const std::vector<float>& got, const std::vector<double>& want,
                    double rel_tol, long extra_bad = 0) {
    long nonfinite;
    double worst;
    size_t worst_i;
    const double rel = rel_err(got, want, &nonfinite, &worst, &worst_i);
    const bool ok = nonfinite == 0 && extra_bad == 0 && rel <= rel_tol;
    std::printf("%-4s %-66s rel %.2e  max abs %.2e at %zu  non-finite %ld  bad %ld\n", ok ? "ok" : "FAIL",
                name.c_str(), rel, worst, worst_i, nonfinite, extra_bad);
    if (!ok) failures++;
    return rel;
}

// An exact check (mismatch count).
static void check_exact(const std::string& name, long bad) {
    std::printf("%-4s %-66s %ld mismatches\n", bad ? "FAIL" : "ok", name.c_str(), bad);
    if (bad) failures++;
}

// Ends a driver: the emulator's own report (errors, ldmatrix bank conflicts), then the verdict.
static int finish() {
    failures += emu_report();
    std::printf(failures ? "FAILED (%d)\n" : "all ok\n", failures);
    return failures ? 1 : 0;
}
