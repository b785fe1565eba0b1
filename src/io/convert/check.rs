//! Cross-checking the reference-config hyperparameters against the state dict's tensor
//! shapes: the shapes decide, and any disagreement is an error naming the YAML file and key
//! and the tensor that says otherwise.

use super::schema::YamlModel;
use crate::io::pth::{PthCheckpoint, TensorInfo};
use crate::model::config::ModelConfig;
use crate::model::{expected_tensors, is_encoder_tensor};
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// State-dict name of the codebook (with the `UnitNorm` parametrization, `normalize: true`).
pub const CODEBOOK_KEY: &str = crate::model::autoenc::CODEBOOK;
/// Codebook name when the autoencoder has `normalize: false` (no parametrization).
pub const CODEBOOK_KEY_PLAIN: &str = "autoenc.quantize.embedding.weight";
/// State-dict name of the learned RoPE table.
pub const ROPE_KEY: &str = crate::model::weights::ROPE_TABLE;
/// State-dict name of the per-layer, per-head RoPE mixing coefficients.
pub const MIXING_KEY: &str = crate::model::weights::MIXING_COEFFS;

/// A selected tensor and the checkpoint it comes from.
pub(super) struct Selected {
    pub(super) info: TensorInfo,
    /// Index into the source list (0 = AR checkpoint, 1 = autoencoder checkpoint).
    pub(super) source: usize,
}

pub(super) struct Sources<'a> {
    pub(super) files: Vec<&'a PthCheckpoint>,
    pub(super) keys: Vec<String>,
}

impl Sources<'_> {
    pub(super) fn describe(&self, i: usize) -> String {
        format!("{} ['{}']", self.files[i].path().display(), self.keys[i])
    }
}

pub(super) struct Checker<'a> {
    pub(super) tensors: &'a BTreeMap<String, Selected>,
    pub(super) sources: &'a Sources<'a>,
    pub(super) yaml: &'a YamlModel,
}

impl Checker<'_> {
    /// Shape of a tensor sampling needs; missing is an error naming the checkpoint.
    fn shape(&self, name: &str, source_hint: usize) -> Result<&[usize]> {
        match self.tensors.get(name) {
            Some(t) => Ok(&t.info.shape),
            None => bail!(
                "{}: missing tensor '{name}'",
                self.sources
                    .describe(source_hint.min(self.sources.files.len() - 1))
            ),
        }
    }

    fn shape_rank(&self, name: &str, rank: usize, source_hint: usize) -> Result<&[usize]> {
        let s = self.shape(name, source_hint)?;
        if s.len() != rank {
            bail!(
                "{}: tensor '{name}' has shape {s:?}; expected {rank} dimensions",
                self.source_of(name)
            );
        }
        Ok(s)
    }

    fn source_of(&self, name: &str) -> String {
        self.tensors
            .get(name)
            .map(|t| self.sources.describe(t.source))
            .unwrap_or_default()
    }

    /// A YAML value that disagrees with the tensors: name the file, the key and the evidence.
    /// `key` is the full key of a model-config value, or for `ae` the path of an autoencoder
    /// parameter under `params` (`"ddconfig.ch"`).
    fn agree<T: PartialEq + fmt::Debug>(
        &self,
        ae: bool,
        key: &str,
        yaml_value: T,
        tensor_value: T,
        evidence: impl FnOnce() -> String,
    ) -> Result<()> {
        if yaml_value != tensor_value {
            let (file, key) = if ae {
                self.yaml.ae_location(key)
            } else {
                (self.yaml.model_file.as_str(), key.to_string())
            };
            if !ae && self.yaml.llama_defaulted && key.starts_with("model.llama_config.") {
                bail!(
                    "{file}: model.llama_config is missing, so {key} takes the reference's \
                     default {yaml_value:?}, but the checkpoint says {tensor_value:?}: {}; \
                     is this the model's own config.yaml?",
                    evidence()
                );
            }
            bail!(
                "{file}: {key} is {yaml_value:?} but the checkpoint says {tensor_value:?}: {}",
                evidence()
            );
        }
        Ok(())
    }

    /// Check the YAML hyperparameters against the tensors and return the configuration.
    pub(super) fn check(&self) -> Result<ModelConfig> {
        let y = &self.yaml.config;
        let yd = &y.decoder;

        // Width and classes.
        let ce = self.shape_rank("class_embeddings.weight", 2, 0)?;
        let (c, rows) = (ce[1], ce[0]);
        self.agree(
            false,
            "model.llama_config.hidden_size",
            y.hidden_size,
            c,
            || format!("class_embeddings.weight has shape {ce:?}"),
        )?;
        self.agree(
            false,
            "model.num_classes",
            y.num_classes,
            rows.saturating_sub(1),
            || format!("class_embeddings.weight has {rows} rows (classes plus the null class)"),
        )?;

        // Codebook and head.
        let (cb_name, other) = if yd.normalize {
            (CODEBOOK_KEY, CODEBOOK_KEY_PLAIN)
        } else {
            (CODEBOOK_KEY_PLAIN, CODEBOOK_KEY)
        };
        if !self.tensors.contains_key(cb_name) && self.tensors.contains_key(other) {
            self.agree(true, "normalize", yd.normalize, !yd.normalize, || {
                format!("the codebook is stored as '{other}'")
            })?;
        }
        let cb = self.shape_rank(cb_name, 2, 1)?;
        self.agree(true, "n_embed", yd.n_embed, cb[0], || {
            format!("{cb_name} has shape {cb:?}")
        })?;
        self.agree(true, "embed_dim", yd.embed_dim, cb[1], || {
            format!("{cb_name} has shape {cb:?}")
        })?;
        let lm = self.shape_rank("lm_head.weight", 2, 0)?;
        if lm != [cb[0], c] {
            bail!(
                "{}: lm_head.weight has shape {lm:?} but the codebook has {} entries and the width is {c}",
                self.source_of("lm_head.weight"),
                cb[0]
            );
        }

        // Decoder structure (before the scales: the stride comes from ch_mult).
        let pq = self.shape_rank("autoenc.post_quant_conv.weight", 4, 1)?;
        self.agree(true, "ddconfig.z_channels", yd.z_channels, pq[0], || {
            format!("autoenc.post_quant_conv.weight has shape {pq:?}")
        })?;
        let levels = count_indices(self.tensors, "autoenc.decoder.conv_blocks.");
        self.agree(
            true,
            "ddconfig.ch_mult (its length)",
            yd.ch_mult.len(),
            levels,
            || format!("the decoder has {levels} conv_blocks"),
        )?;
        if levels == 0 {
            bail!(
                "{}: missing tensor 'autoenc.decoder.conv_blocks.0.res.0.conv2.weight'",
                self.sources.describe(self.sources.files.len() - 1)
            );
        }
        let mut widths = Vec::new();
        for i in 0..levels {
            let name = format!("autoenc.decoder.conv_blocks.{i}.res.0.conv2.weight");
            widths.push(self.shape_rank(&name, 4, 1)?[0]);
        }
        let yaml_widths: Vec<usize> = yd.ch_mult.iter().rev().map(|m| yd.ch * m).collect();
        self.agree(
            true,
            "ddconfig.ch * ch_mult",
            yaml_widths,
            widths.clone(),
            || {
                format!(
                    "the decoder's conv_blocks (lowest resolution first) have widths {widths:?}"
                )
            },
        )?;
        let res_blocks = count_indices(self.tensors, "autoenc.decoder.conv_blocks.0.res.");
        self.agree(
            true,
            "ddconfig.num_res_blocks",
            yd.num_res_blocks,
            res_blocks.saturating_sub(1),
            || format!("decoder conv_blocks.0 has {res_blocks} res blocks (num_res_blocks + 1)"),
        )?;

        // Scales and positions.
        let sizes = crate::order::scale_sizes(y.latent_size(), y.scale_ratio, y.scale_min_size)
            .with_context(|| self.yaml.model_file.clone())?;
        let n: usize = sizes.iter().map(|s| s * s).sum();
        let ep = self.shape_rank("embed_positions.weight", 2, 0)?;
        self.agree(false, "model.img_size / scale_ratio / scale_min_size", n, ep[0], || {
            format!(
                "img_size {}, scale_ratio {}, scale_min_size {} and the autoencoder stride {} give scales \
                 {sizes:?} = {n} tokens, but embed_positions.weight has shape {ep:?}",
                y.img_size,
                y.scale_ratio,
                y.scale_min_size,
                yd.stride()
            )
        })?;

        // Heads from the RoPE table ([N+2, 2*head_dim]) and the mixing coefficients.
        let rope = self.shape_rank(ROPE_KEY, 2, 0)?;
        if rope[0] != n + 2 || rope[1] == 0 || rope[1] % 2 != 0 || c % (rope[1] / 2) != 0 {
            bail!(
                "{}: {ROPE_KEY} has shape {rope:?}; expected [{}, 2*head_dim] for {n} tokens and width {c}",
                self.source_of(ROPE_KEY),
                n + 2
            );
        }
        let heads = c / (rope[1] / 2);
        self.agree(false, "model.llama_config.num_attention_heads", y.num_heads, heads, || {
            format!("{ROPE_KEY} has shape {rope:?}, i.e. head_dim {} and {heads} heads of width {c}", rope[1] / 2)
        })?;
        let mix = self.shape_rank(MIXING_KEY, 2, 0)?;
        self.agree(
            false,
            "model.num_mixing_layers",
            y.num_mixing_layers,
            mix[0],
            || format!("{MIXING_KEY} has shape {mix:?}"),
        )?;

        // Layers, attention, FFN, head MLP.
        let layers = count_indices(self.tensors, "llama.layers.");
        self.agree(
            false,
            "model.llama_config.num_hidden_layers",
            y.num_layers,
            layers,
            || {
                format!(
                    "the checkpoint has llama.layers.0 .. llama.layers.{}",
                    layers.saturating_sub(1)
                )
            },
        )?;
        let wqkv = self.shape_rank("llama.layers.0.attention.wqkv.weight", 2, 0)?;
        if wqkv != [3 * c, c] {
            if let Some(kv) = self.yaml.num_kv_heads.filter(|&kv| kv != y.num_heads) {
                bail!(
                    "{}: model.llama_config.num_key_value_heads = {kv}: grouped-query attention is not supported",
                    self.yaml.model_file
                );
            }
            bail!(
                "{}: tensor 'llama.layers.0.attention.wqkv.weight' has shape {wqkv:?}; expected [{}, {c}]",
                self.source_of("llama.layers.0.attention.wqkv.weight"),
                3 * c
            );
        }
        let w1 = self.shape_rank("llama.layers.0.feed_forward.w1.weight", 2, 0)?;
        self.agree(false, "model.llama_config.intermediate_size (after the reference's rounding to a multiple of 256)", y.ffn_dim, w1[0], || {
            format!("llama.layers.0.feed_forward.w1.weight has shape {w1:?}")
        })?;
        let has_head_mlp = self.tensors.keys().any(|k| k.starts_with("head_mlp."));
        self.agree(
            false,
            "model.use_head_mlp (default true)",
            y.use_head_mlp,
            has_head_mlp,
            || {
                format!(
                    "the checkpoint {} head_mlp.* tensors",
                    if has_head_mlp { "has" } else { "has no" }
                )
            },
        )?;

        let config = y.clone();
        config
            .validate()
            .with_context(|| self.yaml.model_file.clone())?;

        // Every tensor sampling needs, by name and shape; the encoder's when any is selected.
        let has_encoder = self.tensors.keys().any(|k| is_encoder_tensor(k));
        for (name, shape) in expected_tensors(&config)? {
            if !has_encoder && is_encoder_tensor(&name) {
                continue;
            }
            let source = if name.starts_with("autoenc.") { 1 } else { 0 };
            let got = self.shape(&name, source)?;
            if got != shape.as_slice() {
                bail!(
                    "{}: tensor '{name}' has shape {got:?}; the configuration expects {shape:?}",
                    self.source_of(&name)
                );
            }
        }
        Ok(config)
    }
}

/// Number of consecutive indices i = 0, 1, ... with some tensor named `<prefix><i>.`.
fn count_indices(tensors: &BTreeMap<String, Selected>, prefix: &str) -> usize {
    let present: BTreeSet<usize> = tensors
        .keys()
        .filter_map(|k| k.strip_prefix(prefix))
        .filter_map(|rest| rest.split('.').next())
        .filter_map(|i| i.parse().ok())
        .collect();
    (0..).take_while(|i| present.contains(i)).count()
}
