//! Sample a few images through the public API and write them as PNGs.
//!
//!     cargo run --release --example sample -- [--model FILE] [--device auto|cpu|cuda|emu]
//!         [--out DIR] [--seed N] [LABEL...]
//!
//! Without --model it samples the tiny preset with random weights (noise-like images).

mod common;

use checkergen::{Progress, Request};
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = common::Args::parse(&["--out", "--seed"])?;
    let out: PathBuf = args.value("--out", "target/example-sample".into())?;
    let seed: u64 = args.value("--seed", 0)?;
    let labels: Vec<usize> = args.rest_or(vec![207, 360, 387, 974])?;
    let model = args.model()?;
    // The tiny preset has 10 classes: fold the default labels into range.
    let labels: Vec<usize> = labels.iter().map(|l| l % model.num_classes()).collect();
    println!("model on {}; sampling classes {labels:?}", model.device());
    let request = Request::new(labels).seed(seed);
    let images = model.sample_with_progress(&request, |p| {
        if let Progress::Step { step, steps, .. } = p {
            eprint!("\rstep {step}/{steps}");
        }
    })?;
    eprintln!();
    std::fs::create_dir_all(&out)?;
    for i in 0..images.len() {
        let path = out.join(format!("sample_{i:04}.png"));
        let mut enc = png::Encoder::new(
            std::io::BufWriter::new(std::fs::File::create(&path)?),
            images.size() as u32,
            images.size() as u32,
        );
        enc.set_color(png::ColorType::Rgb);
        enc.write_header()?.write_image_data(images.image(i))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}
