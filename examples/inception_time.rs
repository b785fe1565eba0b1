//! Images per second of the FID Inception features on the CPU (PERF.md, "Evaluator features").
//!
//!     cargo run --release --example inception_time -- WEIGHTS.pth [BATCH [SIZE [REPEATS]]]
//!
//! Random uint8 images of SIZE x SIZE (default 16 images of 256 px), one warm-up batch, then
//! the median of REPEATS (default 3) timed batches. Threads: RAYON_NUM_THREADS.

use checkergen::eval::inception::Inception;
use checkergen::rng::XorShift32;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(weights) = args.first() else {
        anyhow::bail!("usage: inception_time WEIGHTS.pth [BATCH [SIZE [REPEATS]]]");
    };
    let num = |i: usize, default: usize| -> anyhow::Result<usize> {
        Ok(match args.get(i) {
            Some(v) => v.parse()?,
            None => default,
        })
    };
    let (batch, size, reps) = (num(1, 16)?, num(2, 256)?, num(3, 3)?.max(1));
    let net = Inception::load(weights)?;
    let mut rng = XorShift32(1);
    let images: Vec<u8> = (0..batch * size * size * 3)
        .map(|_| (rng.next_u32() >> 24) as u8)
        .collect();
    net.features(&images, batch, size)?;
    let mut secs: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            net.features(&images, batch, size)
                .map(|_| t.elapsed().as_secs_f64())
        })
        .collect::<anyhow::Result<_>>()?;
    secs.sort_by(f64::total_cmp);
    let med = secs[secs.len() / 2];
    println!(
        "{} threads, batch {batch}, {size} px: median {med:.3} s = {:.2} images/s",
        rayon::current_num_threads(),
        batch as f64 / med
    );
    Ok(())
}
