//! Model configuration: the hyperparameters of the reference's YAML configs (model config and
//! autoencoder config), validation, and presets. Stored as JSON in a converted model file's
//! safetensors metadata under the key `checkergen_config`.

use crate::limits::{MAX_DIM, MAX_EPS, MAX_LAYERS, MAX_LEVELS};
use anyhow::{Result, bail};
use serde::{Deserialize, Serialize};

/// Metadata key under which a model file stores its [`ModelConfig`] as JSON.
pub const CONFIG_METADATA_KEY: &str = "checkergen_config";
/// Value of the `format` metadata entry of a model file.
pub const FORMAT: &str = "checkergen-v1";

/// VQ decoder hyperparameters (LlamaGen VQ-16 layout; SPEC.md section 7).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Base channel count `ch`.
    pub ch: usize,
    /// Channel multipliers per resolution level; stride = 2^(len-1).
    pub ch_mult: Vec<usize>,
    pub num_res_blocks: usize,
    pub z_channels: usize,
    /// Code dimension `e` (autoencoder `embed_dim`).
    pub embed_dim: usize,
    /// Codebook size `V` (autoencoder `n_embed`).
    pub n_embed: usize,
    /// Whether codes are L2-normalized (autoencoder `normalize`).
    pub normalize: bool,
}

impl DecoderConfig {
    /// Spatial stride of the decoder: 2^(len(ch_mult)-1).
    pub fn stride(&self) -> usize {
        // Saturating: an absurd level count from a file must not overflow the shift
        // (`validate` refuses more than MAX_LEVELS levels).
        1usize
            .checked_shl(self.ch_mult.len().saturating_sub(1) as u32)
            .unwrap_or(usize::MAX)
    }

    /// Largest per-image activation (elements), largest H*W and largest channel count of
    /// the decoder on an s x s latent: what its activation buffers are sized for.
    pub fn activation_plan(&self, s: usize) -> (usize, usize, usize) {
        let nl = self.ch_mult.len();
        let mut c = self.ch * self.ch_mult[nl - 1];
        let mut h = s;
        let mut max_act = (s * s * self.z_channels).max(s * s * c);
        let mut max_c = c.max(self.z_channels);
        for i in 0..nl {
            c = self.ch * self.ch_mult[nl - 1 - i];
            max_c = max_c.max(c);
            max_act = max_act.max(h * h * c);
            if i + 1 < nl {
                h *= 2;
                max_act = max_act.max(h * h * c);
            }
        }
        max_act = max_act.max(h * h * 3);
        (max_act, h * h, max_c)
    }

    /// Device bytes one image takes in a GPU decode of an s x s latent (an upper bound of
    /// the workspace, cuda::decoder: three 16-bit activation buffers, conv_out's f32 output,
    /// f32 + u8 pixels, tokens, codes and post_quant_conv's output, the mid attention's
    /// scratch).
    pub fn workspace_bytes_per_image(&self, s: usize) -> u64 {
        let (max_act, _, _) = self.activation_plan(s);
        let side = (s * self.stride()) as u64;
        let n = (s * s) as u64;
        let c_last = (self.ch * self.ch_mult[self.ch_mult.len() - 1]) as u64;
        max_act as u64 * 3 * 2
            + 3 * side * side * (4 + 5)
            + n * (4 + 2 * self.embed_dim as u64 + 6 * self.z_channels as u64)
            + n * n * 6
            + n * c_last * 22
    }
}

/// Transformer + sampler hyperparameters (SPEC.md section 4).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub img_size: usize,
    pub scale_ratio: f64,
    pub scale_min_size: usize,
    pub class_cond: bool,
    pub num_classes: usize,
    pub use_head_mlp: bool,
    pub num_mixing_layers: usize,
    /// Transformer width C.
    pub hidden_size: usize,
    /// Attention heads H.
    pub num_heads: usize,
    pub num_layers: usize,
    /// FFN width F (the shape of `w1`, after the reference's rounding).
    pub ffn_dim: usize,
    pub rms_norm_eps: f64,
    /// The reference's `num_blocks_per_scale` (its code default is 8).
    pub steps_per_scale: usize,
    pub decoder: DecoderConfig,
}

impl ModelConfig {
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_heads
    }

    pub fn codebook_size(&self) -> usize {
        self.decoder.n_embed
    }

    pub fn code_dim(&self) -> usize {
        self.decoder.embed_dim
    }

    /// Latent side S = img_size / stride.
    pub fn latent_size(&self) -> usize {
        self.img_size / self.decoder.stride()
    }

    /// Check internal consistency; every error is one clear line.
    pub fn validate(&self) -> Result<()> {
        let d = &self.decoder;
        if self.hidden_size == 0 || self.num_heads == 0 || self.num_layers == 0 {
            bail!("config: hidden_size, num_heads and num_layers must be positive");
        }
        // Upper bounds first: every count below sizes an allocation (the expected-tensor
        // list, the layer stack), so none may be taken on trust from a file.
        if self.num_layers > MAX_LAYERS {
            bail!(
                "config: num_layers {} is too large (at most {MAX_LAYERS})",
                self.num_layers
            );
        }
        // (prefix of the error's name, field name, value) of every bounded dimension.
        macro_rules! fields {
            ($prefix:literal, $s:expr; $($f:ident),*) => {
                [$(($prefix, stringify!($f), $s.$f)),*]
            };
        }
        let top = fields!("", self; hidden_size, num_heads, ffn_dim, num_classes,
            num_mixing_layers, img_size, scale_min_size, steps_per_scale);
        let dec = fields!("decoder ", d; ch, z_channels, embed_dim, n_embed);
        if let Some((pre, name, v)) = top.iter().chain(&dec).find(|f| f.2 > MAX_DIM) {
            bail!("config: {pre}{name} {v} is too large (at most {MAX_DIM})");
        }
        if d.ch_mult.len() > MAX_LEVELS || d.num_res_blocks > MAX_LEVELS {
            bail!(
                "config: decoder ch_mult ({} levels) and num_res_blocks ({}) must be at most \
                 {MAX_LEVELS}",
                d.ch_mult.len(),
                d.num_res_blocks
            );
        }
        if let Some(m) = d.ch_mult.iter().find(|&&m| m > MAX_DIM / d.ch.max(1)) {
            bail!("config: decoder ch_mult entry {m} is too large");
        }
        if !(self.rms_norm_eps > 0.0 && self.rms_norm_eps <= MAX_EPS) {
            bail!(
                "config: rms_norm_eps {} must be > 0 and at most {MAX_EPS}",
                self.rms_norm_eps
            );
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            bail!(
                "config: hidden_size {} is not divisible by num_heads {}",
                self.hidden_size,
                self.num_heads
            );
        }
        if !self.head_dim().is_multiple_of(2) {
            bail!("config: head_dim {} must be even", self.head_dim());
        }
        if self.num_mixing_layers > self.num_layers {
            bail!(
                "config: num_mixing_layers {} exceeds num_layers {}",
                self.num_mixing_layers,
                self.num_layers
            );
        }
        if !self.class_cond {
            bail!("config: class_cond = false (unconditional models) is not supported");
        }
        if self.num_classes == 0 {
            bail!("config: num_classes must be positive");
        }
        if d.ch_mult.is_empty() || d.ch == 0 || d.embed_dim == 0 || d.n_embed == 0 {
            bail!("config: decoder ch, ch_mult, embed_dim and n_embed must be non-empty/positive");
        }
        if !d.ch.is_multiple_of(32) || d.ch_mult.contains(&0) {
            bail!("config: decoder channels must be multiples of 32 (GroupNorm with 32 groups)");
        }
        if self.img_size == 0 || !self.img_size.is_multiple_of(d.stride()) {
            bail!(
                "config: img_size {} is not a positive multiple of the decoder stride {}",
                self.img_size,
                d.stride()
            );
        }
        if self.steps_per_scale == 0 {
            bail!("config: steps_per_scale must be at least 1");
        }
        crate::order::scale_sizes(self.latent_size(), self.scale_ratio, self.scale_min_size)?;
        Ok(())
    }
}

/// Names accepted by [`preset`].
pub const PRESETS: [&str; 4] = ["tiny", "S-2x", "L-2x", "L-4x"];

/// The released LlamaGen-VQ-16-layout autoencoder (embed_dim 8, 4096 codes, default ddconfig).
pub fn released_decoder() -> DecoderConfig {
    DecoderConfig {
        ch: 128,
        ch_mult: vec![1, 1, 2, 2, 4],
        num_res_blocks: 2,
        z_channels: 256,
        embed_dim: 8,
        n_embed: 4096,
        normalize: true,
    }
}

/// [`released_decoder`] with a 16384-entry codebook (LlamaGen's VQ-16 size): what the
/// decoder's FLOP count and buffer plan are checked at.
#[cfg(test)]
pub(crate) fn released_decoder_16k() -> DecoderConfig {
    DecoderConfig {
        n_embed: 16384,
        ..released_decoder()
    }
}

/// Configuration of a named preset: `L-2x` and `L-4x` have the released checkpoints' shapes,
/// `S-2x` the reference's config_256_S.yaml, `tiny` is small enough to sample on two CPU
/// cores in seconds (256 px output, ratio 2).
pub fn preset(name: &str) -> Result<ModelConfig> {
    let l = |ratio: f64| ModelConfig {
        img_size: 256,
        scale_ratio: ratio,
        scale_min_size: 1,
        class_cond: true,
        num_classes: 1000,
        use_head_mlp: false,
        num_mixing_layers: 2,
        hidden_size: 1024,
        num_heads: 16,
        num_layers: 20,
        ffn_dim: 3072,
        rms_norm_eps: 1e-6,
        steps_per_scale: 8,
        decoder: released_decoder(),
    };
    let cfg = match name {
        "L-2x" => l(2.0),
        "L-4x" => l(4.0),
        "S-2x" => ModelConfig {
            hidden_size: 512,
            num_layers: 12,
            ffn_dim: 1536,
            ..l(2.0)
        },
        "tiny" => ModelConfig {
            num_classes: 10,
            hidden_size: 64,
            num_heads: 2,
            num_layers: 2,
            ffn_dim: 256,
            steps_per_scale: 4,
            decoder: DecoderConfig {
                ch: 32,
                ch_mult: vec![1, 1, 2, 2, 4],
                num_res_blocks: 1,
                z_channels: 32,
                embed_dim: 8,
                n_embed: 256,
                normalize: true,
            },
            ..l(2.0)
        },
        other => bail!("unknown preset `{other}` (known: {})", PRESETS.join(", ")),
    };
    cfg.validate()?;
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oversized_dimensions_are_named() {
        let big = MAX_DIM + 1;
        let mut c = preset("tiny").unwrap();
        c.num_heads = big;
        let e = c.validate().unwrap_err().to_string();
        println!("{e}");
        assert_eq!(
            e,
            format!("config: num_heads {big} is too large (at most {MAX_DIM})")
        );
        let mut c = preset("tiny").unwrap();
        c.decoder.n_embed = big;
        let e = c.validate().unwrap_err().to_string();
        println!("{e}");
        assert_eq!(
            e,
            format!("config: decoder n_embed {big} is too large (at most {MAX_DIM})")
        );
    }
}
