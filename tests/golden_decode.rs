//! VQ decoder vs the official PyTorch decoder (golden `public/decode_only.safetensors`).

mod common;

use checkergen::cpu::ops::pixels as to_pixels_u8;
use checkergen::model::autoenc::CODEBOOK;
use checkergen::model::config::DecoderConfig;
use checkergen::model::decoder::DecoderWeights;
use checkergen::model::file::{Tensor, TensorMap, load_safetensors};
use std::time::Instant;

/// Max absolute error allowed on raw decoded pixels (images have |max| about 4).
const IMAGE_TOL: f64 = 2e-3;
/// Max absolute error allowed on gathered, normalized codebook rows.
const LATENT_TOL: f64 = 1e-6;

fn small_config() -> DecoderConfig {
    common::golden_decoder_config()
}

fn get<'a>(map: &'a TensorMap, name: &str) -> &'a Tensor {
    map.get(name)
        .unwrap_or_else(|| panic!("golden tensor {name} missing"))
}

#[test]
fn expected_tensors_match_reference_state_dict() {
    let Some(golden) = common::golden_dir() else {
        return;
    };
    let text = std::fs::read_to_string(golden.join("public/A_ratio2/config.json")).unwrap();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    let reference: Vec<(String, Vec<usize>)> = json["state_dict"]
        .as_array()
        .expect("state_dict list")
        .iter()
        .map(|e| {
            let name = e["name"].as_str().unwrap().to_string();
            let shape = e["shape"].as_array().unwrap();
            (
                name,
                shape.iter().map(|d| d.as_u64().unwrap() as usize).collect(),
            )
        })
        .filter(|(n, _)| {
            n.starts_with("autoenc.decoder.")
                || n.starts_with("autoenc.post_quant_conv.")
                || n == CODEBOOK
        })
        .collect();
    assert_eq!(DecoderWeights::expected_tensors(&small_config()), reference);
}

#[test]
fn decode_matches_golden() {
    let Some(golden) = common::golden_dir() else {
        return;
    };
    let (weights, _) = load_safetensors(&golden.join("public/weights_shared.safetensors")).unwrap();
    let (cases, _) = load_safetensors(&golden.join("public/decode_only.safetensors")).unwrap();
    let cfg = small_config();
    let dec = DecoderWeights::from_tensors(&cfg, &weights).unwrap();
    let e = cfg.embed_dim;

    let mut sizes: Vec<usize> = cases
        .keys()
        .filter_map(|k| k.strip_prefix("indices_s")?.parse().ok())
        .collect();
    sizes.sort();
    assert_eq!(sizes, [1, 2, 4, 5, 8, 16]);

    for s in sizes {
        let indices = get(&cases, &format!("indices_s{s}"));
        let latents = get(&cases, &format!("latents_s{s}"));
        let image = get(&cases, &format!("image_s{s}"));
        assert_eq!(latents.shape, [1, e, s, s]);
        let side = s * cfg.stride();
        assert_eq!(image.shape, [1, 3, side, side]);
        let tokens: Vec<u32> = indices.data.iter().map(|&v| v as u32).collect();

        // (a) normalized codebook gathered at the indices, (e, s, s) layout.
        let mut gathered = vec![0.0f32; e * s * s];
        for (p, &t) in tokens.iter().enumerate() {
            for d in 0..e {
                gathered[d * s * s + p] = dec.codebook()[t as usize * e + d];
            }
        }
        let (_, latent_err) = common::rel_err(&gathered, &latents.data);
        assert!(
            latent_err <= LATENT_TOL,
            "s={s}: codebook rows differ by {latent_err}"
        );

        // (b) decode(latents) vs the reference image.
        let t0 = Instant::now();
        let got = dec.decode(&latents.data, 1, s);
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        let (rel, abs) = common::rel_err(&got, &image.data);
        println!(
            "s={s:2} ({side}x{side}): max abs err {abs:.3e}, rel l2 err {rel:.3e}, decode {ms:.1} ms"
        );
        assert!(abs <= IMAGE_TOL, "s={s}: max abs error {abs} > {IMAGE_TOL}");

        // decode_tokens gathers the same rows, so it must agree with decode(latents).
        let from_tokens = dec.decode_tokens(&tokens, 1, s);
        let (_, tok_err) = common::rel_err(&from_tokens, &got);
        assert!(
            tok_err <= 1e-5,
            "s={s}: decode_tokens differs from decode by {tok_err}"
        );

        // 8-bit conversion: at most a handful of off-by-one values near rounding boundaries.
        let (p_got, p_ref) = (to_pixels_u8(&got), to_pixels_u8(&image.data));
        let off: Vec<i32> = p_got
            .iter()
            .zip(&p_ref)
            .map(|(a, b)| *a as i32 - *b as i32)
            .collect();
        assert!(
            off.iter().all(|d| d.abs() <= 1),
            "s={s}: 8-bit pixels differ by more than 1"
        );
        println!(
            "      8-bit pixels differing by one: {} of {}",
            off.iter().filter(|d| **d != 0).count(),
            off.len()
        );
    }
}
