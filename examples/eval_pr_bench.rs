//! Time the ADM precision / recall (src/eval/metrics.rs) on random pool_3-like activations:
//! `cargo run --release --example eval_pr_bench -- [REF_ROWS] [SAMPLE_ROWS] [DIM]`
//! (defaults 10000 50000 2048, the evaluator's reference and sample batch sizes). Prints the
//! time and the pairwise distances per second; run it under `/usr/bin/time -v`
//! for the peak memory.

use checkergen::eval::metrics::{Features, precision_recall};
use checkergen::rng::XorShift32;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let arg = |i: usize, d: usize| -> anyhow::Result<usize> {
        Ok(match std::env::args().nth(i) {
            Some(s) => s.parse()?,
            None => d,
        })
    };
    let (nr, ns, d) = (arg(1, 10_000)?, arg(2, 50_000)?, arg(3, 2048)?);
    // Non-negative like pool_3 (ReLU then average), squared norms ~ 0.16 d: float16 holds them.
    let rows = |n: usize, seed: u32| {
        let mut r = XorShift32(seed);
        (0..n * d)
            .map(|_| (r.next_u32() as f32 / u32::MAX as f32) * 0.7)
            .collect::<Vec<f32>>()
    };
    let (a, b) = (rows(nr, 1), rows(ns, 2));
    let (fa, fb) = (
        Features::new("ref", &a, d)?,
        Features::new("sample", &b, d)?,
    );
    let t = Instant::now();
    let pr = precision_recall(&fa, &fb)?;
    let t_all = t.elapsed().as_secs_f64();
    let pairs = (nr * nr + ns * ns + nr * ns) as f64;
    println!(
        "ref {nr} x sample {ns} at D = {d}, {} threads: precision_recall (the radii of both \
         sets + the cross pass) {t_all:.1} s = {:.2e} \
         distances/s ({:.0} GFLOP/s in the GEMM's 2 D flops per distance); precision {:.4} \
         recall {:.4}, f32 blocks {}",
        rayon::current_num_threads(),
        pairs / t_all,
        pairs * 2.0 * d as f64 / t_all / 1e9,
        pr.precision,
        pr.recall,
        pr.f32_blocks
    );
    Ok(())
}
