//! VQ decoder weights (LlamaGen VQ-16 layout; SPEC.md section 7): every tensor name written
//! once in the builder below, which both loads (validating through a
//! `MapSource`) and lists ([`DecoderWeights::expected_tensors`]).
//! The blocks it shares with the encoder are in [`super::autoenc`]. The maths lives in
//! `cpu::decoder` and `cuda::decoder`, which read these structs.

use super::autoenc::{
    AttnBlock, CODEBOOK, Conv, GroupNorm, ResBlock, check_config, conv, group_norm, level_blocks,
    mid_block,
};
use super::config::DecoderConfig;
use super::source::{Source, autoenc_loaders};
use crate::math::normalize_rows;
use anyhow::Result;

/// One resolution level of the upsampling path (`conv_blocks.{i}`).
pub struct Level {
    pub res: Vec<ResBlock>,
    pub attn: Vec<AttnBlock>, // empty, or one per ResBlock
    pub upsample: Option<Conv>,
}

/// The VQ codebook plus decoder: code vectors or token maps to images in [-1, 1]-ish.
pub struct DecoderWeights {
    pub cfg: DecoderConfig,
    pub codebook: Vec<f32>, // (V, e), rows L2-normalized when cfg.normalize
    pub post_quant_conv: Conv,
    pub conv_in: Conv,
    pub mid: (ResBlock, AttnBlock, ResBlock),
    pub levels: Vec<Level>,
    pub norm_out: GroupNorm,
    pub conv_out: Conv,
}

autoenc_loaders!(
    DecoderWeights,
    "decoder weights: ",
    "the decoder, codebook and post_quant_conv"
);

impl DecoderWeights {
    /// Build the decoder, reading every tensor through `src` (in state-dict order; with a
    /// header-only source this is `inspect`'s check of every name and shape).
    pub(crate) fn build(cfg: &DecoderConfig, src: &mut dyn Source) -> Result<DecoderWeights> {
        check_config(cfg)?;
        let d = "autoenc.decoder";
        let nl = cfg.ch_mult.len();
        let mut c = cfg.ch * cfg.ch_mult[nl - 1];
        let conv_in = conv(src, &format!("{d}.conv_in"), cfg.z_channels, c, 3)?;
        let mid = mid_block(src, d, c)?;
        let mut levels = Vec::with_capacity(nl);
        for i in 0..nl {
            // conv_blocks.i is resolution level nl-1-i; level 0 (full resolution) is last.
            // Each has num_res_blocks + 1 ResBlocks, attention on the lowest resolution.
            let (res, attn, upsample) = level_blocks(
                src,
                &format!("{d}.conv_blocks.{i}"),
                cfg.num_res_blocks + 1,
                &mut c,
                cfg.ch * cfg.ch_mult[nl - 1 - i],
                i == 0,
                (i + 1 < nl).then_some("upsample"),
            )?;
            levels.push(Level {
                res,
                attn,
                upsample,
            });
        }
        let norm_out = group_norm(src, &format!("{d}.norm_out"), c)?;
        let conv_out = conv(src, &format!("{d}.conv_out"), c, 3, 3)?;

        let mut codebook = src.take(CODEBOOK, &[cfg.n_embed, cfg.embed_dim])?;
        if cfg.normalize {
            normalize_rows(&mut codebook, cfg.embed_dim);
        }
        let post_quant_conv = conv(
            src,
            "autoenc.post_quant_conv",
            cfg.embed_dim,
            cfg.z_channels,
            1,
        )?;
        Ok(DecoderWeights {
            cfg: cfg.clone(),
            codebook,
            post_quant_conv,
            conv_in,
            mid,
            levels,
            norm_out,
            conv_out,
        })
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The codebook (V, e), rows L2-normalized when `normalize` is set.
    pub fn codebook(&self) -> &[f32] {
        &self.codebook
    }
}
