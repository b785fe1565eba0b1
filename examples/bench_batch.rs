//! Images per second over batch sizes, through the public API.
//!
//!     cargo run --release --example bench_batch -- [--model FILE] [--device auto|cpu|cuda|emu]
//!         [--images N] [BATCH...]
//!
//! Without --model: the tiny preset with random weights. Each batch size samples the same N
//! images (default 8) once after a warm-up batch; the images are equal for every batch size
//! (checked), only the time changes. `checkergen bench` is the full benchmark (per-scale
//! times, memory, % of floor); this is the embedding view of it.

mod common;

use checkergen::Request;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = common::Args::parse(&["--images"])?;
    let n: usize = args.value("--images", 8)?;
    let batches: Vec<usize> = args.rest_or(vec![1, 2, 4, 8])?;
    let model = args.model()?;
    let labels: Vec<usize> = (0..n).map(|i| i % model.num_classes()).collect();
    println!("{} images on {}", n, model.device());
    println!("{:>6} {:>10} {:>10}", "batch", "seconds", "images/s");
    let mut first: Option<Vec<u8>> = None;
    for &b in &batches {
        let req = Request::new(labels.clone()).batch_size(b);
        model.sample(&Request::new(labels[..b.min(n)].to_vec()).batch_size(b))?; // warm-up
        let t = Instant::now();
        let images = model.sample(&req)?;
        let s = t.elapsed().as_secs_f64();
        println!("{b:>6} {s:>10.3} {:>10.2}", n as f64 / s);
        match &first {
            None => first = Some(images.into_pixels()),
            Some(p) if p != images.pixels() => {
                return Err(
                    format!("batch {b} gave other images than batch {}", batches[0]).into(),
                );
            }
            Some(_) => {}
        }
    }
    Ok(())
}
