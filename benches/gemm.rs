//! The CPU GEMMs at the transformer's shapes (L models: C 1024, F 3072, V 4096) and the
//! decoder's: `cargo bench --bench gemm` (add `-- 1,2,8` to choose M). Prints the kernels this
//! CPU gets, the best of 5 wall-clock runs per shape, GFLOP/s and the weight stream in GB/s.
//! `CHECKERGEN_GEMM=avx2` (or `portable`) times the fallback kernels on the same machine;
//! `RAYON_NUM_THREADS=1` one core. The bf16 columns time `math::gemm_bf16` (bf16 weights,
//! `--precision bf16`) on the same shapes; `CHECKERGEN_GEMM_BF16=avx2|scalar` its fallbacks. Each timed call reads another copy of the weight (256 MiB of
//! copies in all), so small M streams from DRAM as a sampling step does, not from the L3.

use checkergen::math;
use checkergen::rng::XorShift32;
use std::time::Instant;

fn rnd(n: usize, seed: u32) -> Vec<f32> {
    XorShift32(seed.wrapping_mul(2_654_435_761).wrapping_add(1)).vec(n)
}

fn best_of(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::MAX, f64::min)
}

fn main() {
    let ms: Vec<usize> = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .map(|a| a.split(',').filter_map(|s| s.parse().ok()).collect())
        .unwrap_or_else(|| vec![1, 2, 8, 32, 128, 684]);
    println!(
        "kernels: {}; {} rayon threads",
        math::kernel_names(),
        rayon::current_num_threads()
    );
    println!("A B^T (Linear weights [out, in], the NT kernel):");
    println!(
        "{:>5} {:>5} {:>5} {:>9} {:>8} {:>8} | {:>9} {:>8} {:>8}",
        "m", "k", "n", "f32 ms", "GFLOP/s", "GB/s W", "bf16 ms", "GFLOP/s", "GB/s W"
    );
    let bf16 = math::gemm_bf16::kernel();
    for (k, n) in [
        (1024, 3072),
        (1024, 1024),
        (1024, 6144),
        (3072, 1024),
        (1024, 4096),
    ] {
        let copies = ((256usize << 20) / (n * k * 4)).max(2);
        let ws: Vec<Vec<f32>> = (0..copies).map(|i| rnd(n * k, 100 + i as u32)).collect();
        let ws16: Vec<Vec<u16>> = ws.iter().map(|w| math::gemm_bf16::to_bf16(w)).collect();
        for &m in &ms {
            let a = rnd(m * k, 3);
            let mut c = vec![0.0f32; m * n];
            let mut i = 0;
            let t = best_of(5, || {
                i += 1;
                math::matmul_bt(&a, &ws[i % copies], &mut c, m, k, n, 0.0);
            });
            let t16 = best_of(5, || {
                i += 1;
                let w = &ws16[i % copies];
                math::gemm_bf16::gemm_nt_bf16(bf16, m, n, k, &a, k, w, k, &mut c, n, 0.0);
            });
            let f = 2.0 * (m * n * k) as f64;
            println!(
                "{m:5} {k:5} {n:5} {:9.3} {:8.1} {:8.1} | {:9.3} {:8.1} {:8.1}",
                t * 1e3,
                f / t / 1e9,
                (n * k * 4) as f64 / t / 1e9,
                t16 * 1e3,
                f / t16 / 1e9,
                (n * k * 2) as f64 / t16 / 1e9
            );
        }
    }
    println!("A B (the decoder's convolutions as GEMMs: weight (Cout, Cin*9) @ im2col, gemm-f32):");
    for (m, k, n) in [
        (128, 1152, 3584),
        (128, 128, 65536),
        (256, 2304, 1024),
        (512, 4608, 256),
    ] {
        let (a, b) = (rnd(m * k, 1), rnd(k * n, 2));
        let mut c = vec![0.0f32; m * n];
        let t = best_of(5, || math::matmul(&a, &b, &mut c, m, k, n, 0.0));
        println!(
            "{m:5} {k:5} {n:5} {:9.3} {:8.1}",
            t * 1e3,
            2.0 * (m * n * k) as f64 / t / 1e9
        );
    }
}
