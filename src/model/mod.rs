//! The model definition, at the bottom of the crate: configuration and presets, state-dict
//! names (each written once, in the weight builders), the model-file reader/writer, and the
//! host weights with their load-time folding. Depends on nothing above it (only `math` and
//! the scale pyramid of `order`); the CPU and CUDA backends both read a loaded [`Model`].

pub mod config;
pub mod decoder;
pub mod encoder;
pub mod file;
pub mod init;
mod source;
pub mod weights;

use crate::model::config::{CONFIG_METADATA_KEY, ModelConfig};
use crate::model::decoder::DecoderWeights;
use crate::model::encoder::EncoderWeights;
use crate::model::file::{TensorMap, load_model_file, parse_model_tensors};
use crate::model::weights::TransformerWeights;
use crate::order::scale_sizes;
use anyhow::{Context, Result, anyhow};
use std::collections::BTreeMap;
use std::path::Path;

pub struct Model {
    pub config: ModelConfig,
    /// Scale sides, ascending.
    pub scale_sizes: Vec<usize>,
    pub weights: TransformerWeights,
    pub decoder: DecoderWeights,
    /// The VQ encoder, when the file holds `autoenc.encoder.*` (scoring and `encode` need it;
    /// sampling does not).
    pub encoder: Option<EncoderWeights>,
}

impl Model {
    /// Load a model file written by `checkergen convert` or `checkergen init`.
    pub fn load(path: &Path) -> Result<Model> {
        let (map, meta) = load_model_file(path)?;
        Model::from_metadata(&map, &meta).with_context(|| format!("{}", path.display()))
    }

    /// A model file's bytes as a model (what [`Model::load`] does after reading the file;
    /// the `cargo fuzz` target's entry point).
    pub fn from_bytes(bytes: &[u8]) -> Result<Model> {
        let (map, meta) = parse_model_tensors(bytes)?;
        Model::from_metadata(&map, &meta)
    }

    fn from_metadata(map: &TensorMap, meta: &BTreeMap<String, String>) -> Result<Model> {
        let json = meta.get(CONFIG_METADATA_KEY).ok_or_else(|| {
            anyhow!(
                "no `{CONFIG_METADATA_KEY}` in the safetensors metadata; \
                 make model files with `checkergen convert` or `checkergen init`"
            )
        })?;
        let config: ModelConfig =
            serde_json::from_str(json).context("malformed configuration metadata")?;
        Model::from_tensors(config, map)
    }

    /// Validate the configuration and every tensor, then fold the weights.
    pub fn from_tensors(config: ModelConfig, map: &TensorMap) -> Result<Model> {
        config.validate()?;
        check_layer_count(&config, map)?;
        let scale_sizes = scale_sizes(
            config.latent_size(),
            config.scale_ratio,
            config.scale_min_size,
        )?;
        let n_tokens = scale_sizes.iter().map(|s| s * s).sum();
        let weights = TransformerWeights::from_tensors(&config, map, n_tokens)?;
        let decoder = DecoderWeights::from_tensors(&config.decoder, map)?;
        let encoder = EncoderWeights::present(map)
            .then(|| EncoderWeights::from_tensors(&config.decoder, map))
            .transpose()?;
        Ok(Model {
            config,
            scale_sizes,
            weights,
            decoder,
            encoder,
        })
    }

    /// The encoder, or the one-line error of a command that needs it.
    pub fn encoder(&self) -> Result<&EncoderWeights> {
        self.encoder.as_ref().ok_or_else(|| {
            anyhow!(
                "this model file has no VQ encoder (autoenc.encoder.*): convert the checkpoint \
                 again without --no-encoder (encode and score need it; sampling does not)"
            )
        })
    }

    /// Parameter counts: (transformer side, decoder side incl. codebook).
    pub fn parameter_counts(&self) -> (usize, usize) {
        let n_tokens = self.weights.n_tokens;
        let t = crate::model::weights::expected_transformer_tensors(&self.config, n_tokens)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let d = DecoderWeights::expected_tensors(&self.config.decoder)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        (t, d)
    }
}

/// The configuration's layer count must equal the layers whose tensors the file holds
/// (`llama.layers.<i>.`): a count that disagrees is named before any layer is read.
fn check_layer_count(config: &ModelConfig, map: &TensorMap) -> Result<()> {
    let present = map
        .keys()
        .filter_map(|k| {
            k.strip_prefix("llama.layers.")?
                .split('.')
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .map_or(0, |l| l + 1);
    if present != config.num_layers {
        anyhow::bail!(
            "the configuration says num_layers {} but the file holds tensors for {present} layers",
            config.num_layers
        );
    }
    Ok(())
}
