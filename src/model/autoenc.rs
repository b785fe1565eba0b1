//! What the VQ decoder and encoder share (LlamaGen VQ-16 layout; SPEC.md sections 7 and 9):
//! the codebook's name, GroupNorm's constants, the block types (Conv, GroupNorm, ResBlock,
//! AttnBlock) and their builders, each tensor name written once, and the check of the
//! autoencoder's configuration. [`super::decoder`] and [`super::encoder`] build on it and
//! import nothing from each other.

use super::config::DecoderConfig;
use super::source::Source;
use anyhow::{Result, bail};

/// State-dict name of the VQ codebook (V, e): the decoder's lookup table, and the transformer's
/// code embeddings (model::weights).
pub const CODEBOOK: &str = "autoenc.quantize.embedding.parametrizations.weight.original";

/// GroupNorm groups and epsilon of every norm in the decoder.
pub const GN_GROUPS: usize = 32;
pub const GN_EPS: f32 = 1e-6;

/// Conv2d with bias, kernel 1 (padding 0) or 3 (padding 1), stride 1 (the encoder's
/// Downsample runs its 3x3 convs at stride 2 through `cpu::ops::conv2d_down`).
pub struct Conv {
    pub cin: usize,
    pub cout: usize,
    pub k: usize,
    pub weight: Vec<f32>, // (Cout, Cin*k*k), PyTorch (Cout, Cin, k, k) flattened
    pub bias: Vec<f32>,   // (Cout,)
}

/// GroupNorm(32 groups, eps 1e-6, affine).
pub struct GroupNorm {
    pub gamma: Vec<f32>, // (C,)
    pub beta: Vec<f32>,  // (C,)
}

/// GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus the input (1x1 `nin_shortcut` when the
/// channel count changes).
pub struct ResBlock {
    pub norm1: GroupNorm,
    pub conv1: Conv,
    pub norm2: GroupNorm,
    pub conv2: Conv,
    pub nin_shortcut: Option<Conv>,
}

/// Single-head spatial self-attention over all H*W positions, plus the input.
pub struct AttnBlock {
    pub norm: GroupNorm,
    pub q: Conv,
    pub k: Conv,
    pub v: Conv,
    pub proj_out: Conv,
}

/// The autoencoder configuration's own rules (the decoder's and the encoder's), checked before
/// the first tensor is requested.
pub(super) fn check_config(cfg: &DecoderConfig) -> Result<()> {
    if cfg.ch_mult.is_empty() || cfg.ch == 0 || cfg.ch_mult.contains(&0) {
        bail!("decoder config: ch and every ch_mult entry must be positive");
    }
    if cfg.embed_dim == 0 || cfg.n_embed == 0 || cfg.z_channels == 0 {
        bail!("decoder config: embed_dim, n_embed and z_channels must be positive");
    }
    if cfg.num_res_blocks == 0 {
        // One ResBlock per level would still be well-defined (num_res_blocks + 1), but no
        // released model uses it; reject rather than guess.
        bail!("decoder config: num_res_blocks must be at least 1");
    }
    if cfg
        .ch_mult
        .iter()
        .any(|m| !(cfg.ch * m).is_multiple_of(GN_GROUPS))
    {
        bail!("decoder config: every level's channel count must be a multiple of {GN_GROUPS}");
    }
    Ok(())
}

pub(super) fn conv(
    src: &mut dyn Source,
    name: &str,
    cin: usize,
    cout: usize,
    k: usize,
) -> Result<Conv> {
    Ok(Conv {
        cin,
        cout,
        k,
        weight: src.take(&format!("{name}.weight"), &[cout, cin, k, k])?,
        bias: src.take(&format!("{name}.bias"), &[cout])?,
    })
}

pub(super) fn group_norm(src: &mut dyn Source, name: &str, c: usize) -> Result<GroupNorm> {
    Ok(GroupNorm {
        gamma: src.take(&format!("{name}.weight"), &[c])?,
        beta: src.take(&format!("{name}.bias"), &[c])?,
    })
}

pub(super) fn res_block(
    src: &mut dyn Source,
    name: &str,
    cin: usize,
    cout: usize,
) -> Result<ResBlock> {
    Ok(ResBlock {
        norm1: group_norm(src, &format!("{name}.norm1"), cin)?,
        conv1: conv(src, &format!("{name}.conv1"), cin, cout, 3)?,
        norm2: group_norm(src, &format!("{name}.norm2"), cout)?,
        conv2: conv(src, &format!("{name}.conv2"), cout, cout, 3)?,
        nin_shortcut: if cin != cout {
            Some(conv(src, &format!("{name}.nin_shortcut"), cin, cout, 1)?)
        } else {
            None
        },
    })
}

pub(super) fn attn_block(src: &mut dyn Source, name: &str, c: usize) -> Result<AttnBlock> {
    Ok(AttnBlock {
        norm: group_norm(src, &format!("{name}.norm"), c)?,
        q: conv(src, &format!("{name}.q"), c, c, 1)?,
        k: conv(src, &format!("{name}.k"), c, c, 1)?,
        v: conv(src, &format!("{name}.v"), c, c, 1)?,
        proj_out: conv(src, &format!("{name}.proj_out"), c, c, 1)?,
    })
}

/// The middle of the decoder and of the encoder (`{prefix}.mid.0..=2`): ResBlock,
/// AttnBlock, ResBlock at `c` channels.
pub(super) fn mid_block(
    src: &mut dyn Source,
    prefix: &str,
    c: usize,
) -> Result<(ResBlock, AttnBlock, ResBlock)> {
    Ok((
        res_block(src, &format!("{prefix}.mid.0"), c, c)?,
        attn_block(src, &format!("{prefix}.mid.1"), c)?,
        res_block(src, &format!("{prefix}.mid.2"), c, c)?,
    ))
}

/// The blocks of one resolution level `name` (`conv_blocks.i`), in state-dict order:
/// `blocks` ResBlocks from `*c` to `cout` channels (`*c` follows them), as many AttnBlocks
/// when `attn`, and the 3x3 conv `{name}.{resample}.conv` ("upsample" / "downsample") when
/// `resample` is given.
pub(super) fn level_blocks(
    src: &mut dyn Source,
    name: &str,
    blocks: usize,
    c: &mut usize,
    cout: usize,
    attn: bool,
    resample: Option<&str>,
) -> Result<(Vec<ResBlock>, Vec<AttnBlock>, Option<Conv>)> {
    let mut res = Vec::with_capacity(blocks);
    for j in 0..blocks {
        res.push(res_block(src, &format!("{name}.res.{j}"), *c, cout)?);
        *c = cout;
    }
    let mut attn_blocks = Vec::new();
    if attn {
        for j in 0..blocks {
            attn_blocks.push(attn_block(src, &format!("{name}.attn.{j}"), *c)?);
        }
    }
    let resample = match resample {
        Some(r) => Some(conv(src, &format!("{name}.{r}.conv"), *c, *c, 3)?),
        None => None,
    };
    Ok((res, attn_blocks, resample))
}
