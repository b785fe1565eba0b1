//! Shared helpers for integration tests.
#![allow(dead_code)]

use std::path::PathBuf;

/// The golden folder `../shared/golden` beside the checkout.
///
/// Missing-golden rule: when it is absent, a test that needs it fails under CI (`CI=true`)
/// and otherwise skips with a loud message (the caller returns on `None`).
pub fn golden_dir() -> Option<PathBuf> {
    // CHECKERGEN_GOLDEN overrides the location (GPU test bundles carry their own copy).
    let dir = match std::env::var_os("CHECKERGEN_GOLDEN") {
        Some(d) => PathBuf::from(d),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/golden"),
    };
    if dir.join("README.md").is_file() {
        return Some(dir);
    }
    if std::env::var("CI").map(|v| v == "true").unwrap_or(false) {
        panic!(
            "CI=true but the golden folder {} is missing; CI must have ../shared beside the clone",
            dir.display()
        );
    }
    eprintln!(
        "\n!!!!!!!! SKIPPED: {} not found; golden parity NOT checked !!!!!!!!\n",
        dir.display()
    );
    None
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

use checkergen::model::config::{DecoderConfig, ModelConfig};
use checkergen::model::file::{TensorMap, load_safetensors};
use std::path::Path;

/// The golden configurations: directory name and scale ratio.
pub const GOLDEN_CONFIGS: [(&str, f64); 3] =
    [("A_ratio2", 2.0), ("B_ratio4", 4.0), ("C_ratio3", 3.0)];

/// ModelConfig of a golden configuration, from its config.json (constructor arguments) and
/// the small autoencoder of golden/autoencoder_small.yaml.
pub fn golden_model_config(cfg_dir: &Path) -> ModelConfig {
    let j: serde_json::Value =
        serde_json::from_slice(&std::fs::read(cfg_dir.join("config.json")).unwrap()).unwrap();
    let a = &j["ar_constructor_args"];
    let l = &a["llama_config"];
    ModelConfig {
        img_size: a["img_size"].as_u64().unwrap() as usize,
        scale_ratio: a["scale_ratio"].as_f64().unwrap(),
        scale_min_size: a["scale_min_size"].as_u64().unwrap() as usize,
        class_cond: a["class_cond"].as_bool().unwrap(),
        num_classes: a["num_classes"].as_u64().unwrap() as usize,
        use_head_mlp: a["use_head_mlp"].as_bool().unwrap(),
        num_mixing_layers: a["num_mixing_layers"].as_u64().unwrap() as usize,
        hidden_size: l["hidden_size"].as_u64().unwrap() as usize,
        num_heads: l["num_attention_heads"].as_u64().unwrap() as usize,
        num_layers: l["num_hidden_layers"].as_u64().unwrap() as usize,
        ffn_dim: j["ffn_hidden_dim_actual"].as_u64().unwrap() as usize,
        rms_norm_eps: l["rms_norm_eps"].as_f64().unwrap(),
        steps_per_scale: a["num_blocks_per_scale"].as_u64().unwrap() as usize,
        decoder: golden_decoder_config(),
    }
}

/// The decoder of golden/autoencoder_small.yaml (ch 32, ch_mult [1,1,2,2,4], 2 res blocks,
/// z_channels 64, embed_dim 8, n_embed 256, normalize).
pub fn golden_decoder_config() -> DecoderConfig {
    DecoderConfig {
        ch: 32,
        ch_mult: vec![1, 1, 2, 2, 4],
        num_res_blocks: 2,
        z_channels: 64,
        embed_dim: 8,
        n_embed: 256,
        normalize: true,
    }
}

/// The full golden state dict of one configuration (shared + config-specific tensors).
pub fn golden_tensors(golden: &Path, cfg_name: &str) -> TensorMap {
    let (mut map, _) = load_safetensors(&golden.join("public/weights_shared.safetensors")).unwrap();
    let (extra, _) = load_safetensors(
        &golden
            .join("public")
            .join(cfg_name)
            .join("weights_config.safetensors"),
    )
    .unwrap();
    map.extend(extra);
    map
}

/// Relative error ||a - b|| / ||b|| and max absolute error.
pub fn rel_err(a: &[f32], b: &[f32]) -> (f64, f64) {
    assert_eq!(a.len(), b.len());
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    let mut max = 0.0f64;
    for (&x, &y) in a.iter().zip(b) {
        let d = (x - y) as f64;
        num += d * d;
        den += (y as f64) * (y as f64);
        max = max.max(d.abs());
    }
    ((num / den.max(1e-30)).sqrt(), max)
}

/// The GPU, or `None` with a loud message when this machine has none (GPU tests then skip,
/// also under CI, which has no GPU).
#[cfg(feature = "cuda")]
pub fn gpu_or_skip(test: &str) -> Option<checkergen::cuda::Gpu> {
    match checkergen::cuda::Gpu::try_new() {
        Ok(Some(g)) => {
            println!(
                "{test}: running on {} (cc {}.{}, kernels: {})",
                g.name, g.cc.0, g.cc.1, g.image_kind
            );
            Some(g)
        }
        Ok(None) => {
            eprintln!(
                "\n!!!!!!!! SKIPPED {test}: no CUDA GPU on this machine; GPU path NOT checked !!!!!!!!\n"
            );
            None
        }
        Err(e) => panic!("{test}: a GPU is present but unusable: {e:#}"),
    }
}

/// Per scale, the (B, s, s) token ids stored as `{prefix}{s}` (e.g. `tokens_s16`).
pub fn token_pyramid(
    st: &safetensors::SafeTensors,
    sizes: &[usize],
    prefix: &str,
) -> Vec<Vec<u32>> {
    sizes
        .iter()
        .map(|s| {
            checkergen::model::file::load_i64(st, &format!("{prefix}{s}"))
                .unwrap()
                .1
                .iter()
                .map(|&t| t as u32)
                .collect()
        })
        .collect()
}
