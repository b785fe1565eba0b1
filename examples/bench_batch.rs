//! Images per second over batch sizes, through the public API.
//!
//!     cargo run --release --example bench_batch -- [--model FILE] [--device auto|cpu|cuda|emu]
//!         [--images N] [BATCH...]
//!
//! Without --model: the tiny preset with random weights. Each batch size samples the same N
//! images (default 8) once after a warm-up batch; the images are equal for every batch size
//! (checked), only the time changes. `checkergen bench` is the full benchmark (per-scale
//! times, memory, % of floor); this is the embedding view of it.

use checkergen::{Device, Model, Request};
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut model_path = None;
    let mut device = Device::Auto;
    let mut n = 8usize;
    let mut batches = Vec::new();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--model" => model_path = args.next(),
            "--images" => n = args.next().ok_or("--images needs a number")?.parse()?,
            "--device" => device = args.next().ok_or("--device needs a name")?.parse()?,
            b => batches.push(b.parse()?),
        }
    }
    if batches.is_empty() {
        batches = vec![1, 2, 4, 8];
    }
    let model = match &model_path {
        Some(p) => Model::load(p, device)?,
        None => Model::tiny(device)?,
    };
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
