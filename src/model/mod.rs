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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::file::{Dtype, write_model};

    /// A model file loaded through the map (tensors moved out of the decoded map, pages
    /// released) equals the model built by copying from the in-memory tensors, for f32 and
    /// bf16 storage, encoder included.
    #[test]
    fn mapped_load_equals_in_memory_build() {
        let cfg = config::preset("tiny").unwrap();
        let map = crate::model::init::random_tensors(&cfg, 3).unwrap();
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
