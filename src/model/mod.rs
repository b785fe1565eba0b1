//! The model definition, at the bottom of the crate: configuration and presets, state-dict
//! names (each written once, in the weight builders), the model-file reader/writer, and the
//! host weights with their load-time folding. Depends on nothing above it (only `math` and
//! the scale pyramid of `order`); the CPU and CUDA backends both read a loaded [`Model`].

pub mod autoenc;
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
use crate::model::file::{
    HeaderEntry, Tensor, TensorMap, load_model_file, parse_model_tensors, read_model_header,
};
use crate::model::source::{HeaderSource, MapSource};
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
        Model::from_metadata(map, &meta).with_context(|| format!("{}", path.display()))
    }

    /// A model file's bytes as a model (what [`Model::load`] does after reading the file;
    /// the `cargo fuzz` target's entry point).
    pub fn from_bytes(bytes: &[u8]) -> Result<Model> {
        let (map, meta) = parse_model_tensors(bytes)?;
        Model::from_metadata(map, &meta)
    }

    fn from_metadata(map: TensorMap, meta: &BTreeMap<String, String>) -> Result<Model> {
        Model::from_owned_tensors(config_from_metadata(meta)?, map)
    }

    /// Validate the configuration and every tensor, then fold the weights (`map` is copied
    /// from; [`Model::from_owned_tensors`] moves the weights out instead).
    pub fn from_tensors(config: ModelConfig, map: &TensorMap) -> Result<Model> {
        let has_encoder = EncoderWeights::present(map);
        Model::build(config, map, has_encoder, &mut MapSource::new(map, ""))
    }

    /// [`Model::from_tensors`] consuming the map: its weight buffers become the model's, so
    /// the peak is one copy of the weights (what loading a file uses).
    pub fn from_owned_tensors(config: ModelConfig, mut map: TensorMap) -> Result<Model> {
        // What the file holds is looked at before the source starts taking tensors away.
        let has_encoder = EncoderWeights::present(&map);
        let layer_names: TensorMap = map
            .keys()
            .filter(|k| k.starts_with("llama.layers."))
            .map(|k| (k.clone(), Tensor::new(vec![0], Vec::new())))
            .collect();
        Model::build(
            config,
            &layer_names,
            has_encoder,
            &mut MapSource::owned(&mut map, ""),
        )
    }

    /// `names`: at least the file's `llama.layers.*` names (for the layer count).
    fn build(
        config: ModelConfig,
        names: &TensorMap,
        has_encoder: bool,
        src: &mut MapSource,
    ) -> Result<Model> {
        let scale_sizes = checked_pyramid(&config, names.keys().map(String::as_str))?;
        let n_tokens = scale_sizes.iter().map(|s| s * s).sum();
        let weights = TransformerWeights::from_source(&config, src, n_tokens)?;
        let decoder = DecoderWeights::from_source(&config.decoder, src)?;
        let encoder = has_encoder
            .then(|| EncoderWeights::from_source(&config.decoder, src))
            .transpose()?;
        Ok(Model {
            config,
            scale_sizes,
            weights,
            decoder,
            encoder,
        })
    }

    /// The CPU path's storage of the large transformer linears
    /// ([`weights::TransformerWeights::set_precision`]; after the device is chosen).
    pub fn set_precision(&mut self, p: weights::Precision) {
        self.weights.set_precision(p);
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
        parameter_counts(&self.config, self.weights.n_tokens)
    }
}

/// (transformer side, decoder side incl. codebook) parameters of `cfg` with `n_tokens`.
fn parameter_counts(cfg: &ModelConfig, n_tokens: usize) -> (usize, usize) {
    let count = |t: Vec<(String, Vec<usize>)>| -> usize {
        t.iter().map(|(_, s)| s.iter().product::<usize>()).sum()
    };
    (
        count(crate::model::weights::expected_transformer_tensors(
            cfg, n_tokens,
        )),
        count(DecoderWeights::expected_tensors(&cfg.decoder)),
    )
}

/// Whether `name` belongs to the VQ encoder (`autoenc.encoder.*`, `autoenc.quant_conv.*`),
/// the optional part of a model file: sampling never reads it; `encode` and `score` need it.
pub fn is_encoder_tensor(name: &str) -> bool {
    use encoder::{ENCODER_PREFIX, QUANT_CONV_PREFIX};
    name.starts_with(ENCODER_PREFIX) || name.starts_with(QUANT_CONV_PREFIX)
}

/// Every tensor a complete model file of `cfg` holds (transformer, codebook, VQ decoder, then
/// the VQ encoder and quant_conv), with its shape. The one list behind `checkergen init` and
/// `checkergen convert`; a file without the encoder ([`is_encoder_tensor`]) still samples.
pub fn expected_tensors(cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let sizes = crate::order::scale_sizes(cfg.latent_size(), cfg.scale_ratio, cfg.scale_min_size)?;
    let n: usize = sizes.iter().map(|s| s * s).sum();
    let mut t = weights::expected_transformer_tensors(cfg, n);
    t.extend(DecoderWeights::expected_tensors(&cfg.decoder));
    t.extend(EncoderWeights::expected_tensors(&cfg.decoder));
    Ok(t)
}

/// A model file as its header describes it, checked against its configuration without
/// reading a tensor's data (`checkergen inspect`; `inspect --verify` loads it instead).
pub struct ModelHeader {
    pub config: ModelConfig,
    /// Scale sides, ascending.
    pub scale_sizes: Vec<usize>,
    /// Whether the file holds the VQ encoder.
    pub has_encoder: bool,
    /// Every tensor of the file, in the header's order.
    pub tensors: Vec<HeaderEntry>,
    /// The file's size.
    pub file_bytes: u64,
}

impl ModelHeader {
    /// Read and check `path`'s header: what [`Model::load`] checks short of the values
    /// (float dtypes; offsets and sizes against the file; the configuration; the layer count;
    /// every tensor the model needs present with its shape, the encoder's too when the file
    /// has one), with the same errors.
    pub fn read(path: &Path) -> Result<ModelHeader> {
        let (tensors, meta, file_bytes) = read_model_header(path)?;
        let check = || -> Result<ModelHeader> {
            let config = config_from_metadata(&meta)?;
            let shapes: BTreeMap<String, Vec<usize>> = tensors
                .iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect();
            let scale_sizes = checked_pyramid(&config, shapes.keys().map(String::as_str))?;
            let n_tokens = scale_sizes.iter().map(|s| s * s).sum();
            let mut src = HeaderSource {
                shapes: &shapes,
                context: "",
            };
            TransformerWeights::check_source(&config, &mut src, n_tokens)?;
            src.context = "decoder weights: ";
            DecoderWeights::build(&config.decoder, &mut src)?;
            let has_encoder = shapes
                .keys()
                .any(|k| k.starts_with(crate::model::encoder::ENCODER_PREFIX));
            if has_encoder {
                src.context = "encoder weights: ";
                EncoderWeights::build(&config.decoder, &mut src)?;
            }
            Ok(ModelHeader {
                config,
                scale_sizes,
                has_encoder,
                tensors: tensors.clone(),
                file_bytes,
            })
        };
        check().with_context(|| format!("{}", path.display()))
    }

    /// Parameter counts: (transformer side, decoder side incl. codebook).
    pub fn parameter_counts(&self) -> (usize, usize) {
        parameter_counts(&self.config, self.scale_sizes.iter().map(|s| s * s).sum())
    }
}

/// The configuration a model file's metadata holds.
fn config_from_metadata(meta: &BTreeMap<String, String>) -> Result<ModelConfig> {
    let json = meta.get(CONFIG_METADATA_KEY).ok_or_else(|| {
        anyhow!(
            "no `{CONFIG_METADATA_KEY}` in the safetensors metadata; \
             make model files with `checkergen convert` or `checkergen init`"
        )
    })?;
    serde_json::from_str(json).context("malformed configuration metadata")
}

/// Validate `config` against the file's tensor `names` (the layer count) and build its
/// scale pyramid.
fn checked_pyramid<'a>(
    config: &ModelConfig,
    names: impl Iterator<Item = &'a str>,
) -> Result<Vec<usize>> {
    config.validate()?;
    check_layer_count(config, names)?;
    scale_sizes(
        config.latent_size(),
        config.scale_ratio,
        config.scale_min_size,
    )
}

/// The configuration's layer count must equal the layers whose tensors the file holds
/// (`llama.layers.<i>.`): a count that disagrees is named before any layer is read.
fn check_layer_count<'a>(config: &ModelConfig, names: impl Iterator<Item = &'a str>) -> Result<()> {
    let present = names
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
