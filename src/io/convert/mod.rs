//! Converting a released checkpoint of the reference (a `.pth` file plus its YAML configs)
//! into checkergen's model file: one safetensors file holding the tensors sampling needs,
//! under the reference's state-dict names, with the [`ModelConfig`] as JSON metadata.
//!
//! Inputs, as the reference lays them out (`pretrained_models/download.sh`):
//! * `checkerboard-L-2x/checkpoint-last.pth`: `torch.save` of `{'model', 'model_ema',
//!   'optimizer', 'epoch', 'scaler', 'args'}` (util/misc.py `save_model`). `model` is
//!   `AR.state_dict()`, which includes the frozen autoencoder under `autoenc.*`;
//!   `model_ema` has the same keys with EMA parameters, or is `None` when training ran
//!   without `--ema`.
//! * `checkerboard-L-2x/config.yaml`: the training config (`model:` = the `AR(...)` keyword
//!   arguments, `args:` = training options).
//! * `autoenc/autoencoder_config.yaml` (`model.params` = `VQModel(...)` arguments) and
//!   `autoenc/checkpoint.pth` (the VQ model alone). The AR checkpoint already holds these
//!   weights; the VQ checkpoint is needed only for a state dict that lacks them.
//!
//! Hyperparameters come from the YAML files with the reference's defaults; the shapes of the
//! tensors decide, and any disagreement between the two is an error naming the YAML key.
//!
//! Modules: `yaml` (the configs parsed by yaml-rust2 into a small value tree), `schema` (that
//! tree read into a [`ModelConfig`] with the reference's defaults), `check` (the config
//! cross-checked against the state dict's shapes); this one selects, casts and writes the
//! tensors through the one model-file writer, [`write_model_tensors`].

mod check;
mod schema;
mod yaml;

use crate::io::pth::{PthCheckpoint, PthDtype, PthTensor, StateDict};
use crate::model::config::ModelConfig;
use crate::model::file::{Dtype, RawTensor, check_weights, write_model_tensors};
use anyhow::{Result, bail};
use check::{Checker, Selected, Sources};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

pub use crate::model::config::FORMAT;
pub use schema::{model_config_from_yaml, reference_ffn_dim};

pub use check::{CODEBOOK_KEY, CODEBOOK_KEY_PLAIN, MIXING_KEY, ROPE_KEY};

/// What to convert and where to write it.
#[derive(Clone, Debug)]
pub struct ConvertOptions {
    /// The AR checkpoint (`checkpoint-last.pth`).
    pub checkpoint: PathBuf,
    /// The model config (`config.yaml` next to the checkpoint).
    pub config_yaml: PathBuf,
    /// The autoencoder config (`autoencoder_config.yaml`).
    pub autoenc_yaml: PathBuf,
    /// The VQ autoencoder checkpoint; when given, its weights replace the AR checkpoint's
    /// `autoenc.*` tensors. Needed only when the AR state dict lacks them.
    pub autoenc_checkpoint: Option<PathBuf>,
    /// Take the EMA weights (`model_ema`) instead of `model`.
    pub ema: bool,
    /// Leave out the VQ encoder (`autoenc.encoder.*`, `autoenc.quant_conv.*`): the file then
    /// samples and decodes but cannot `encode` or `score`.
    pub no_encoder: bool,
    pub dtype: Dtype,
    /// The safetensors file to write.
    pub output: PathBuf,
}

impl ConvertOptions {
    /// Convert `checkpoint` (configs `config_yaml`, `autoenc_yaml`) into `output`: the
    /// `model` weights (not EMA) in f32 with the encoder, the autoencoder taken from the
    /// checkpoint itself. Set the fields to change that.
    pub fn new(
        checkpoint: PathBuf,
        config_yaml: PathBuf,
        autoenc_yaml: PathBuf,
        output: PathBuf,
    ) -> ConvertOptions {
        ConvertOptions {
            checkpoint,
            config_yaml,
            autoenc_yaml,
            autoenc_checkpoint: None,
            ema: false,
            no_encoder: false,
            dtype: Dtype::F32,
            output,
        }
    }
}

/// What a conversion produced.
#[derive(Clone, Debug)]
pub struct ConvertSummary {
    pub config: ModelConfig,
    pub scale_sizes: Vec<usize>,
    /// Total tokens N = sum of squared scale sizes.
    pub num_tokens: usize,
    pub tensors_written: usize,
    /// Elements of all written tensors.
    pub parameters: usize,
    pub output_bytes: u64,
    pub output: PathBuf,
    pub dtype: Dtype,
    /// File name of the checkpoint and the state dict taken from it (`model`/`model_ema`).
    pub source: String,
    pub source_key: String,
    /// File name the `autoenc.*` tensors came from.
    pub autoenc_source: String,
    /// Tensors of the state dict left out (encoder, quant_conv, training buffers).
    pub tensors_skipped: usize,
    /// Written tensors that the configuration does not predict (kept as they are).
    pub unexpected_tensors: Vec<String>,
}

impl fmt::Display for ConvertSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        let d = &c.decoder;
        writeln!(
            f,
            "converted {} ['{}'] -> {}",
            self.source,
            self.source_key,
            self.output.display()
        )?;
        writeln!(
            f,
            "  transformer: hidden {}, {} layers, {} heads, ffn {}, {} classes, head_mlp {}",
            c.hidden_size, c.num_layers, c.num_heads, c.ffn_dim, c.num_classes, c.use_head_mlp
        )?;
        writeln!(
            f,
            "  scales {:?} ({} tokens, ratio {}); trained with {} steps per scale (not a \
             sampling setting)",
            self.scale_sizes, self.num_tokens, c.scale_ratio, c.steps_per_scale
        )?;
        writeln!(
            f,
            "  autoencoder (from {}): codebook {} x {}, decoder ch {} x {:?}, {} res blocks, z {}",
            self.autoenc_source,
            d.n_embed,
            d.embed_dim,
            d.ch,
            d.ch_mult,
            d.num_res_blocks,
            d.z_channels
        )?;
        if !self.unexpected_tensors.is_empty() {
            writeln!(
                f,
                "  kept {} tensors the configuration does not predict: {}",
                self.unexpected_tensors.len(),
                self.unexpected_tensors
                    .iter()
                    .take(8)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if self.unexpected_tensors.len() > 8 {
                        ", ..."
                    } else {
                        ""
                    }
            )?;
        }
        write!(
            f,
            "  wrote {} tensors ({} skipped), {} parameters ({:.1} M), {}, {} bytes ({:.1} MiB)",
            self.tensors_written,
            self.tensors_skipped,
            self.parameters,
            self.parameters as f64 / 1e6,
            self.dtype,
            self.output_bytes,
            self.output_bytes as f64 / (1024.0 * 1024.0)
        )
    }
}

// ------------------------------------------------------------------------------------------
// Expected tensors
// ------------------------------------------------------------------------------------------

/// Every tensor sampling needs, with its shape (the loader's list; see `weights.rs`).
pub use crate::model::{expected_tensors, is_encoder_tensor};

/// Tensors of the reference's state dict that no command uses (the encoder is kept: `encode`
/// and `score` need it; `--no-encoder` drops it).
pub fn is_training_only(name: &str) -> bool {
    name == "autoenc.cluster_usage_train" || name == "autoenc.quantize.initialized"
}

/// Whether conversion leaves `name` out: training-only, or the encoder under `--no-encoder`.
fn dropped(name: &str, no_encoder: bool) -> bool {
    is_training_only(name) || (no_encoder && is_encoder_tensor(name))
}

// ------------------------------------------------------------------------------------------
// Conversion
// ------------------------------------------------------------------------------------------

/// Cast floating-point tensors to the output precision; integers and bools stay as they are.
fn cast(t: PthTensor, dtype: Dtype) -> RawTensor {
    let keep = !t.dtype.is_float()
        || matches!(
            (dtype, t.dtype),
            (Dtype::F32, PthDtype::F32) | (Dtype::Bf16, PthDtype::BF16)
        );
    if keep {
        return RawTensor {
            dtype: t.dtype.safetensors(),
            shape: t.shape,
            data: t.data,
        };
    }
    RawTensor {
        dtype: dtype.safetensors(),
        data: dtype.encode(&t.to_f32()),
        shape: t.shape,
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| p.display().to_string())
}

/// The state dict of a VQ autoencoder checkpoint, found the way the reference's
/// `VQModel.init_from_ckpt` finds it: `state_dict` (a Lightning checkpoint), else `model`
/// unless the top level already holds `encoder.*` keys, else the top level itself.
fn autoencoder_state_dict(ckpt: &PthCheckpoint) -> Result<(String, StateDict)> {
    if ckpt.has_entry("state_dict") {
        return Ok(("state_dict".into(), ckpt.state_dict("state_dict")?));
    }
    let top_has_encoder = ckpt
        .top_level_keys()
        .iter()
        .any(|k| k.starts_with("encoder."));
    if ckpt.has_entry("model") && !top_has_encoder {
        return Ok(("model".into(), ckpt.state_dict("model")?));
    }
    Ok(("(top level)".into(), ckpt.root_state_dict()?))
}

/// Convert a reference checkpoint to a checkergen safetensors model file.
pub fn convert(opts: &ConvertOptions) -> Result<ConvertSummary> {
    // The output may be new or a regular file, never one of the inputs (checked before any
    // work, and again by the writer right before its rename).
    let mut inputs = vec![
        opts.checkpoint.as_path(),
        opts.config_yaml.as_path(),
        opts.autoenc_yaml.as_path(),
    ];
    inputs.extend(opts.autoenc_checkpoint.as_deref());
    crate::paths::check_output(&opts.output, &inputs)?;
    let yaml = schema::read_yaml_model(&opts.config_yaml, &opts.autoenc_yaml)?;

    let ar = PthCheckpoint::open(&opts.checkpoint)?;
    let key = if opts.ema { "model_ema" } else { "model" };
    let state = ar.state_dict(key)?;
    let ae = opts
        .autoenc_checkpoint
        .as_ref()
        .map(PthCheckpoint::open)
        .transpose()?;

    // Select: the AR state dict minus training-only tensors; autoenc.* from the VQ
    // checkpoint when one is given.
    let mut selected: BTreeMap<String, Selected> = BTreeMap::new();
    let mut skipped = 0usize;
    for (name, info) in state {
        if dropped(&name, opts.no_encoder) || (ae.is_some() && name.starts_with("autoenc.")) {
            skipped += 1;
            continue;
        }
        selected.insert(name, Selected { info, source: 0 });
    }
    let mut sources = Sources {
        files: vec![&ar],
        keys: vec![key.to_string()],
    };
    let autoenc_source = if let Some(ae) = &ae {
        let (ae_key, ae_state) = autoencoder_state_dict(ae)?;
        for (name, info) in ae_state {
            let name = if name.starts_with("autoenc.") {
                name
            } else {
                format!("autoenc.{name}")
            };
            let wanted = [
                "autoenc.decoder.",
                "autoenc.post_quant_conv.",
                "autoenc.quantize.",
                "autoenc.encoder.",
                "autoenc.quant_conv.",
            ]
            .iter()
            .any(|p| name.starts_with(p));
            if wanted && !dropped(&name, opts.no_encoder) {
                selected.insert(name, Selected { info, source: 1 });
            }
        }
        sources.files.push(ae);
        sources.keys.push(ae_key);
        file_name(ae.path())
    } else {
        if !selected.keys().any(|k| k.starts_with("autoenc.")) {
            bail!(
                "{}: '{key}' has no autoencoder weights (autoenc.*); pass the VQ autoencoder checkpoint \
                 with --autoenc-checkpoint",
                ar.path().display()
            );
        }
        file_name(ar.path())
    };

    let config = Checker {
        tensors: &selected,
        sources: &sources,
        yaml: &yaml,
    }
    .check()?;
    let expected: HashMap<String, Vec<usize>> = expected_tensors(&config)?.into_iter().collect();
    let unexpected_tensors: Vec<String> = selected
        .keys()
        .filter(|k| !expected.contains_key(*k) && *k != CODEBOOK_KEY_PLAIN)
        .cloned()
        .collect();

    // Read and cast.
    let mut out: Vec<(String, RawTensor)> = Vec::with_capacity(selected.len());
    let mut parameters = 0usize;
    for (name, sel) in &selected {
        let t = sources.files[sel.source].read_tensor(name, &sel.info)?;
        // The model file holds weights only: float dtypes, finite values (the loader's
        // checks, made here so a bad checkpoint fails at conversion, naming its file).
        let shown = sources.files[sel.source].path().display();
        if !t.dtype.is_float() {
            bail!(
                "{shown}: tensor '{name}' is {}, not a floating-point weight",
                t.dtype
            );
        }
        check_weights(name, &t.to_f32()).map_err(|e| anyhow::anyhow!("{shown}: {e}"))?;
        parameters += t.numel();
        // The engine reads the codebook under one name; `normalize` in the config says
        // whether it is normalized at load time.
        let name = if name == CODEBOOK_KEY_PLAIN {
            CODEBOOK_KEY
        } else {
            name.as_str()
        };
        out.push((name.to_string(), cast(t, opts.dtype)));
    }

    // One atomic writer: a failed run leaves no partial model file.
    let sizes = crate::order::scale_sizes(
        config.latent_size(),
        config.scale_ratio,
        config.scale_min_size,
    )?;
    let output_bytes = write_model_tensors(
        &opts.output,
        &config,
        &out,
        &[
            ("source", file_name(&opts.checkpoint)),
            ("source_state_dict", key.to_string()),
            ("autoenc_source", autoenc_source.clone()),
        ],
    )?;

    Ok(ConvertSummary {
        num_tokens: sizes.iter().map(|s| s * s).sum(),
        scale_sizes: sizes,
        tensors_written: out.len(),
        parameters,
        output_bytes,
        output: opts.output.clone(),
        dtype: opts.dtype,
        source: file_name(&opts.checkpoint),
        source_key: key.to_string(),
        autoenc_source,
        tensors_skipped: skipped,
        unexpected_tensors,
        config,
    })
}
