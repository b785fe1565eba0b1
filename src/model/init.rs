//! Random-weight model files for presets (`checkergen init`): the same tensor names, shapes
//! and file format as a converted checkpoint, so benchmarks and the quick start need no
//! download. Values follow the scales of the golden test models (unit-variance embeddings,
//! 1/sqrt(fan_in) linears, norms near 1, logits of std about 4), drawn from Philox keyed by
//! (seed, tensor name), so a file is reproducible from its seed.

use crate::model::config::{DecoderConfig, ModelConfig};
use crate::model::decoder::DecoderWeights;
use crate::model::expected_tensors;
use crate::model::file::{Tensor, TensorMap};
use crate::rng::philox4x32_10;
use anyhow::Result;
use rayon::prelude::*;

fn name_key(seed: u64, name: &str) -> [u32; 2] {
    // FNV-1a of the name, mixed with the seed.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
    }
    let k = h ^ seed.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    [k as u32, (k >> 32) as u32]
}

/// Standard normal draws i = 0..n for a tensor (Box-Muller on Philox outputs).
fn normals(key: [u32; 2], n: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n];
    out.par_chunks_mut(4).enumerate().for_each(|(i, chunk)| {
        let x = philox4x32_10([i as u32, (i >> 32) as u32, 0, 0], key);
        let u = |a: u32| (a as f64 + 0.5) * (1.0 / 4_294_967_296.0);
        let (r1, t1) = (
            (-2.0 * u(x[0]).ln()).sqrt(),
            std::f64::consts::TAU * u(x[1]),
        );
        let (r2, t2) = (
            (-2.0 * u(x[2]).ln()).sqrt(),
            std::f64::consts::TAU * u(x[3]),
        );
        let z = [r1 * t1.cos(), r1 * t1.sin(), r2 * t2.cos(), r2 * t2.sin()];
        for (o, v) in chunk.iter_mut().zip(z) {
            *o = v as f32;
        }
    });
    out
}

/// Random values for one tensor, by the rules in the module comment.
fn init_tensor(cfg: &ModelConfig, seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let z = normals(name_key(seed, name), n);
    let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
    let scaled = |s: f32| z.iter().map(|v| v * s).collect::<Vec<f32>>();
    if name == crate::model::weights::MIXING_COEFFS {
        // U(-2, 2): sigmoid weights between 0.12 and 0.88.
        let key = name_key(seed, name);
        return (0..n)
            .map(|i| {
                let x = philox4x32_10([i as u32, 0, 1, 0], key)[0];
                -2.0 + 4.0 * (x as f64 / 4_294_967_296.0) as f32
            })
            .collect();
    }
    if name.ends_with("parametrizations.weight.original")
        || name == "class_embeddings.weight"
        || name == "embed_positions.weight"
        || name.starts_with("empty_token_")
        || name == "embed_codevecs_mlp.net.0.weight"
    {
        return z;
    }
    if name.contains("adaLN_modulation") {
        if shape.len() == 2 {
            return scaled(0.5 / (fan_in as f32).sqrt());
        }
        let c = n / 2; // shift half ~ N(0, 0.1), scale half ~ 1 + N(0, 0.1)
        return z
            .iter()
            .enumerate()
            .map(|(i, v)| if i < c { 0.1 * v } else { 1.0 + 0.1 * v })
            .collect();
    }
    if shape.len() == 1 && name.ends_with(".weight") {
        return z.iter().map(|v| 1.0 + 0.1 * v).collect(); // RMSNorm / GroupNorm gains
    }
    if shape.len() == 1 {
        return scaled(0.05); // biases
    }
    if name == "lm_head.weight" {
        return scaled(4.0 / (cfg.hidden_size as f32).sqrt());
    }
    if name.starts_with("embed_codevecs_mlp") {
        return scaled(1.5 / (fan_in as f32).sqrt());
    }
    scaled(1.0 / (fan_in as f32).sqrt())
}

/// Random weights of `cfg` as a tensor map.
pub fn random_tensors(cfg: &ModelConfig, seed: u64) -> Result<TensorMap> {
    random_tensors_where(cfg, seed, |_| true)
}

/// Random weights of the tensors of `cfg` whose name passes `keep` (e.g. the decoder only).
pub fn random_tensors_where(
    cfg: &ModelConfig,
    seed: u64,
    keep: impl Fn(&str) -> bool,
) -> Result<TensorMap> {
    let mut map = TensorMap::new();
    for (name, shape) in expected_tensors(cfg)?.into_iter().filter(|(n, _)| keep(n)) {
        let data = init_tensor(cfg, seed, &name, &shape);
        map.insert(name, Tensor::new(shape, data));
    }
    Ok(map)
}

/// Random weights for every tensor of a VQ decoder alone (the decoder's unit tests and the GPU
/// decoder tests): uniform in [-1, 1) / sqrt(fan_in), from Philox keyed by (seed, name).
pub fn random_decoder_tensors(cfg: &DecoderConfig, seed: u64) -> TensorMap {
    DecoderWeights::expected_tensors(cfg)
        .into_iter()
        .map(|(name, shape)| {
            let n: usize = shape.iter().product();
            let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
            let scale = 1.0 / (fan_in as f32).sqrt();
            let key = name_key(seed, &name);
            let data = (0..n)
                .map(|i| {
                    let x = philox4x32_10([i as u32, (i >> 32) as u32, 2, 0], key)[0];
                    (x as f64 / 2_147_483_648.0 - 1.0) as f32 * scale
                })
                .collect();
            (name, Tensor::new(shape, data))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::random_tensors;
    use crate::model::file::{self, Dtype, write_model};
    use crate::model::{Model, config};

    /// A model file of random tensors loaded through the map (tensors moved out of the
    /// decoded map, pages released) equals the model built by copying from the in-memory
    /// tensors, for f32 and bf16 storage, encoder included.
    #[test]
    fn mapped_load_equals_in_memory_build() {
        let cfg = config::preset("tiny").unwrap();
        let map = random_tensors(&cfg, 3).unwrap();
        let dir = std::env::temp_dir().join(format!("checkergen-load-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for dtype in [Dtype::F32, Dtype::Bf16] {
            let path = dir.join(format!("m-{dtype}.safetensors"));
            write_model(&path, &cfg, &map, dtype, &[]).unwrap();
            let loaded = Model::load(&path).unwrap();
            // What the file holds, decoded (bf16: the rounded values) and built by copying.
            let (stored, _) = file::load_safetensors(&path).unwrap();
            let built = Model::from_tensors(cfg.clone(), &stored).unwrap();
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            let (a, b) = (&loaded.weights, &built.weights);
            assert_eq!(a.layers.len(), b.layers.len());
            for (la, lb) in a.layers.iter().zip(&b.layers) {
                assert_eq!(bits(&la.w13.w), bits(&lb.w13.w), "{dtype}");
                assert_eq!(bits(&la.wqkv.w), bits(&lb.wqkv.w), "{dtype}");
                assert_eq!(bits(&la.modulation.w), bits(&lb.modulation.w), "{dtype}");
            }
            assert_eq!(bits(&a.head.w), bits(&b.head.w), "{dtype}");
            assert_eq!(bits(&a.tables.dc), bits(&b.tables.dc), "{dtype}");
            assert_eq!(bits(&a.codebook), bits(&b.codebook), "{dtype}");
            assert_eq!(
                bits(&loaded.decoder.codebook),
                bits(&built.decoder.codebook)
            );
            assert_eq!(
                bits(&loaded.decoder.conv_in.weight),
                bits(&built.decoder.conv_in.weight)
            );
            assert!(loaded.encoder.is_some() && built.encoder.is_some());
            assert_eq!(loaded.parameter_counts(), built.parameter_counts());
            std::fs::remove_file(&path).unwrap();
        }
    }
}
