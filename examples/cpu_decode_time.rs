//! Times the f32 CPU VQ decoder alone on random weights of a preset's decoder shape:
//! `cargo run --release --example cpu_decode_time -- [PRESET] [IMAGES] [REPEATS]`
//! (defaults L-2x, 1, 3). Prints the wall time per image of each repeat and the median.
//! scripts/bench-vs-reference.sh uses it for the decoder-alone row.

use checkergen::model::config::preset;
use checkergen::model::decoder::DecoderWeights;
use checkergen::model::init::random_decoder_tensors;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().map(String::as_str).unwrap_or("L-2x");
    let images: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let repeats: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(3);
    let cfg = preset(name)?;
    let dcfg = &cfg.decoder;
    let dec = DecoderWeights::from_tensors(dcfg, &random_decoder_tensors(dcfg, 1))?;
    let s = 16; // the last scale's latent side: 256 px at stride 16
    let tokens: Vec<u32> = (0..images * s * s)
        .map(|i| (i * 2654435761usize % dcfg.n_embed) as u32)
        .collect();
    let _ = dec.decode_tokens(&tokens[..s * s], 1, s); // warm-up (page faults, caches)
    let mut per_image = Vec::new();
    for r in 0..repeats {
        let t = Instant::now();
        let img = dec.decode_tokens(&tokens, images, s);
        let dt = t.elapsed().as_secs_f64() / images as f64;
        assert!(img.iter().all(|v| v.is_finite()));
        println!("repeat {r}: {dt:.3} s per image ({images} images)");
        per_image.push(dt);
    }
    per_image.sort_by(f64::total_cmp);
    println!(
        "decoder {name} {} px, batch {images}: median {:.3} s per image",
        s * dcfg.stride(),
        per_image[per_image.len() / 2]
    );
    Ok(())
}
