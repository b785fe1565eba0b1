//! VQ encoder weights (LlamaGen VQ-16 layout; SPEC.md section 9), the mirror of
//! [`super::decoder`] on the blocks of [`super::autoenc`]: every tensor name written once in the builder below, which both loads
//! (through a `MapSource`) and lists
//! ([`EncoderWeights::expected_tensors`]). The maths lives in `cpu::encoder`. Only scoring and
//! `encode` need it: sampling never reads it, and a model file without `autoenc.encoder.*`
//! still samples.

use super::autoenc::{
    AttnBlock, Conv, GroupNorm, ResBlock, check_config, conv, group_norm, level_blocks, mid_block,
};
use super::config::DecoderConfig;
use super::file::TensorMap;
use super::source::{Source, autoenc_loaders};
use anyhow::Result;

/// State-dict prefix of the encoder's tensors (and of quant_conv, read with them).
pub const ENCODER_PREFIX: &str = "autoenc.encoder.";
pub const QUANT_CONV_PREFIX: &str = "autoenc.quant_conv.";

/// One resolution level of the downsampling path (`encoder.conv_blocks.{i}`).
pub struct EncoderLevel {
    pub res: Vec<ResBlock>,
    pub attn: Vec<AttnBlock>, // empty, or one per ResBlock (last level only)
    /// Zero-pad right and bottom by 1, then this 3x3 conv at stride 2 without padding.
    pub downsample: Option<Conv>,
}

/// The VQ encoder plus quant_conv: images in [-1, 1] to (unnormalized) code vectors.
pub struct EncoderWeights {
    pub cfg: DecoderConfig,
    pub conv_in: Conv,
    pub levels: Vec<EncoderLevel>,
    pub mid: (ResBlock, AttnBlock, ResBlock),
    pub norm_out: GroupNorm,
    pub conv_out: Conv,
    pub quant_conv: Conv,
}

impl EncoderWeights {
    /// Build the encoder, reading every tensor through `src` (in state-dict order; with a
    /// header-only source this is `inspect`'s check of every name and shape).
    pub(crate) fn build(cfg: &DecoderConfig, src: &mut dyn Source) -> Result<EncoderWeights> {
        check_config(cfg)?;
        let e = "autoenc.encoder";
        let nl = cfg.ch_mult.len();
        let mut c = cfg.ch;
        let conv_in = conv(src, &format!("{e}.conv_in"), 3, c, 3)?;
        let mut levels = Vec::with_capacity(nl);
        for i in 0..nl {
            // num_res_blocks ResBlocks per level, attention on the lowest resolution (last).
            let (res, attn, downsample) = level_blocks(
                src,
                &format!("{e}.conv_blocks.{i}"),
                cfg.num_res_blocks,
                &mut c,
                cfg.ch * cfg.ch_mult[i],
                i + 1 == nl,
                (i + 1 < nl).then_some("downsample"),
            )?;
            levels.push(EncoderLevel {
                res,
                attn,
                downsample,
            });
        }
        let mid = mid_block(src, e, c)?;
        let norm_out = group_norm(src, &format!("{e}.norm_out"), c)?;
        let conv_out = conv(src, &format!("{e}.conv_out"), c, cfg.z_channels, 3)?;
        let quant_conv = conv(src, "autoenc.quant_conv", cfg.z_channels, cfg.embed_dim, 1)?;
        Ok(EncoderWeights {
            cfg: cfg.clone(),
            conv_in,
            levels,
            mid,
            norm_out,
            conv_out,
            quant_conv,
        })
    }

    /// Whether `map` holds any encoder tensor (then it must hold all of them).
    pub fn present(map: &TensorMap) -> bool {
        map.keys().any(|k| k.starts_with(ENCODER_PREFIX))
    }
}

autoenc_loaders!(
    EncoderWeights,
    "encoder weights: ",
    "the encoder and quant_conv"
);
