//! A loaded model: configuration, scale pyramid, transformer weights and VQ decoder, and the
//! whole sampling call (token loop + decode).

pub mod config;
pub mod file;
pub mod init;
pub mod weights;

use crate::cpu::decoder::VqDecoder;
use crate::model::config::{CONFIG_METADATA_KEY, ModelConfig};
use crate::model::file::{TensorMap, load_safetensors};
use crate::model::weights::TransformerWeights;
use crate::order::scale_sizes;
use crate::sampler::{SampleOptions, TokenOutput, sample_tokens};
use anyhow::{Context, Result, anyhow};
use std::path::Path;
use std::time::Instant;

pub struct Model {
    pub config: ModelConfig,
    /// Scale sides, ascending.
    pub scale_sizes: Vec<usize>,
    pub weights: TransformerWeights,
    pub decoder: VqDecoder,
}

/// Tokens and decoded images of one sampling call.
pub struct Samples {
    pub tokens: TokenOutput,
    /// (B, 3, H, W) 8-bit pixels.
    pub pixels: Vec<u8>,
    /// (B, 3, H, W) raw decoder output in about [-1, 1] (CPU path only; the GPU path copies
    /// back only 8-bit pixels).
    pub images: Option<Vec<f32>>,
    /// Image side H = W.
    pub image_size: usize,
    pub decode_ms: f64,
}

impl Model {
    /// Load a model file written by `checkergen convert` or `checkergen init`.
    pub fn load(path: &Path) -> Result<Model> {
        let (map, meta) = load_safetensors(path)?;
        let json = meta.get(CONFIG_METADATA_KEY).ok_or_else(|| {
            anyhow!(
                "{}: no `{CONFIG_METADATA_KEY}` in the safetensors metadata; \
                 make model files with `checkergen convert` or `checkergen init`",
                path.display()
            )
        })?;
        let config: ModelConfig = serde_json::from_str(json)
            .with_context(|| format!("{}: malformed configuration metadata", path.display()))?;
        Model::from_tensors(config, &map).with_context(|| format!("{}", path.display()))
    }

    /// Validate the configuration and every tensor, then fold the weights.
    pub fn from_tensors(config: ModelConfig, map: &TensorMap) -> Result<Model> {
        config.validate()?;
        let scale_sizes = scale_sizes(
            config.latent_size(),
            config.scale_ratio,
            config.scale_min_size,
        )?;
        let n_tokens = scale_sizes.iter().map(|s| s * s).sum();
        let weights = TransformerWeights::from_tensors(&config, map, n_tokens)?;
        let decoder = VqDecoder::from_tensors(&config.decoder, map)?;
        Ok(Model {
            config,
            scale_sizes,
            weights,
            decoder,
        })
    }

    /// Sample token pyramids and decode the last scale to images.
    pub fn sample(&self, opts: &SampleOptions) -> Result<Samples> {
        let tokens = sample_tokens(&self.config, &self.weights, &self.scale_sizes, opts)?;
        self.decode_samples(tokens, opts.labels.len())
    }

    /// Sample on the GPU (the token loop; decoding runs on the CPU until the GPU decoder lands).
    #[cfg(feature = "cuda")]
    pub fn sample_gpu(
        &self,
        gm: &crate::cuda::engine::GpuModel,
        opts: &SampleOptions,
    ) -> Result<Samples> {
        let mut backend = crate::cuda::engine::GpuBackend::new(gm);
        let tokens = crate::sampler::run_steps(
            &mut backend,
            &self.config,
            &self.scale_sizes,
            self.weights.n_tokens,
            opts,
        )?;
        // Decode on the device from the grid still there: only the conditional rows exist in
        // the grid (both guidance halves share tokens), and only 8-bit pixels come back.
        let t = Instant::now();
        let s = *self.scale_sizes.last().unwrap();
        let pixels = backend.decode_pixels()?;
        Ok(Samples {
            tokens,
            pixels,
            images: None,
            image_size: s * self.config.decoder.stride(),
            decode_ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Upload this model's transformer to a GPU.
    #[cfg(feature = "cuda")]
    pub fn to_gpu(&self, gpu: crate::cuda::Gpu) -> Result<crate::cuda::engine::GpuModel> {
        crate::cuda::engine::GpuModel::new(gpu, &self.config, &self.weights, &self.decoder)
    }

    fn decode_samples(&self, tokens: TokenOutput, batch: usize) -> Result<Samples> {
        let t = Instant::now();
        let s = *self.scale_sizes.last().unwrap();
        let last = tokens.tokens.last().unwrap();
        let images = self.decoder.decode_tokens(last, batch, s);
        Ok(Samples {
            tokens,
            pixels: crate::cpu::decoder::to_pixels_u8(&images),
            images: Some(images),
            image_size: s * self.config.decoder.stride(),
            decode_ms: t.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Parameter counts: (transformer side, decoder side incl. codebook).
    pub fn parameter_counts(&self) -> (usize, usize) {
        let n_tokens = self.weights.n_tokens;
        let t = crate::model::weights::expected_transformer_tensors(&self.config, n_tokens)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        let d = VqDecoder::expected_tensors(&self.config.decoder)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        (t, d)
    }
}
