// bench_sampling.cpp: launch times of guided_sample_f32 on the emulator at the tiny preset's last
// scale (256 rows of V = 256, with guidance): greedy, temperature, top-k + top-p. Not a check
// (no reference); build as in README.md ("Launch timings") and run.
#include "../../kernels/sampling.cu"
#include "check.hpp"
#include <chrono>
int main() {
    const int batch = 1, n = 256, V = 256, cells = 256;
    std::vector<float> logits(2 * batch * n * V);
    std::mt19937 g(1);
    for (auto& x : logits) x = (float)(g() % 1000) / 100.f;
    std::vector<int> grid(batch * cells), out(batch * n), lp(n), gp(n);
    for (int j = 0; j < n; ++j) lp[j] = gp[j] = j;
    for (int mode = 0; mode < 3; ++mode) {
        auto l = logits;
        GuidedSampleParams p{l.data(), nullptr, grid.data(), out.data(), lp.data(), gp.data(), 7, batch, n, V, cells, 1, 3.f,
                             mode == 0 ? 0.f : 1.f, mode == 2 ? 50 : V, mode == 2 ? 0.9f : 1.f, 0};
        auto t0 = std::chrono::steady_clock::now();
        emu_launch(guided_sample_f32, {(unsigned)(batch * n), 1, 1}, {SAMPLE_THREADS, 1, 1}, p);
        auto t1 = std::chrono::steady_clock::now();
        std::printf("time guided_sample_f32 rows %d V %d %s: %.1f ms\n", batch * n, V,
                    mode == 0 ? "greedy" : mode == 1 ? "temperature 1" : "top-k 50 top-p 0.9",
                    std::chrono::duration<double, std::milli>(t1 - t0).count());
    }
    return finish();
}
