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

use crate::io::pth::{PthCheckpoint, PthDtype, PthTensor, StateDict, TensorInfo};
use crate::io::yaml::{self, Yaml};
use crate::model::config::{DecoderConfig, ModelConfig};
use crate::model::file::{Dtype, RawTensor, write_model_tensors};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

pub use crate::model::config::FORMAT;

/// State-dict name of the codebook (with the `UnitNorm` parametrization, `normalize: true`).
pub const CODEBOOK_KEY: &str = crate::model::weights::CODEBOOK;
/// Codebook name when the autoencoder has `normalize: false` (no parametrization).
pub const CODEBOOK_KEY_PLAIN: &str = "autoenc.quantize.embedding.weight";
/// State-dict name of the learned RoPE table.
pub const ROPE_KEY: &str = crate::model::weights::ROPE_TABLE;
/// State-dict name of the per-layer, per-head RoPE mixing coefficients.
pub const MIXING_KEY: &str = "llama.rotary_emb.mixing_coeffs";

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
    pub dtype: Dtype,
    /// The safetensors file to write.
    pub output: PathBuf,
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
            "  scales {:?} ({} tokens, ratio {}), steps_per_scale {}",
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
// YAML configs
// ------------------------------------------------------------------------------------------

/// The reference's FFN width for `hidden` and the YAML's `intermediate_size`: gpt.py's
/// `FeedForward` with `multiple_of = 256` and `ffn_dim_multiplier = intermediate_size /
/// int(8*hidden/3)` (ar.py), so 3072 stays 3072 for hidden 1024 but 384 becomes 512 for 128.
pub fn reference_ffn_dim(hidden: usize, intermediate_size: Option<usize>) -> Result<usize> {
    let base = ((8 * hidden) as f64 / 3.0) as usize; // int(2 * (4*dim) / 3)
    let mut h = base;
    if let Some(i) = intermediate_size {
        if base == 0 {
            bail!("hidden_size {hidden} is too small for an FFN");
        }
        let multiplier = i as f64 / base as f64;
        h = (multiplier * base as f64) as usize;
    }
    Ok(h.div_ceil(256) * 256)
}

/// Hyperparameters from the two YAML files with the reference's defaults applied.
#[derive(Clone, Debug)]
struct YamlModel {
    config: ModelConfig,
    /// `num_key_value_heads`, if set (grouped-query attention is not supported).
    num_kv_heads: Option<usize>,
    model_file: String,
    ae_file: String,
    /// Autoencoder parameters set by the model config's `model.autoenc.params`.
    ae_overridden: BTreeSet<String>,
}

impl YamlModel {
    /// File and full key of an autoencoder parameter (`"ddconfig.ch"`): the model config's
    /// `model.autoenc.params.*` when it overrides that parameter, else the autoencoder config.
    fn ae_location(&self, param_path: &str) -> (&str, String) {
        let param = param_path.split(['.', ' ']).next().unwrap_or(param_path);
        if self.ae_overridden.contains(param) {
            (
                &self.model_file,
                format!("model.autoenc.params.{param_path}"),
            )
        } else {
            (&self.ae_file, format!("model.params.{param_path}"))
        }
    }
}

/// One YAML value with its file and dotted key, for typed reads with clear errors.
struct Field<'a> {
    file: &'a str,
    key: String,
    value: Option<&'a Yaml>,
}

impl<'a> Field<'a> {
    fn new(file: &'a str, parent: Option<&'a Yaml>, parent_key: &str, key: &str) -> Self {
        // A null value counts as absent: the reference's `.get(key, default)` idiom.
        let value = parent.and_then(|p| p.get(key)).filter(|v| !v.is_null());
        let key = if parent_key.is_empty() {
            key.to_string()
        } else {
            format!("{parent_key}.{key}")
        };
        Field { file, key, value }
    }

    fn err(&self, want: &str) -> anyhow::Error {
        let found = self
            .value
            .map(Yaml::describe)
            .unwrap_or_else(|| "nothing".into());
        anyhow!("{}: {} must be {want}, found {found}", self.file, self.key)
    }

    fn usize_opt(&self) -> Result<Option<usize>> {
        match self.value {
            None => Ok(None),
            Some(Yaml::Int(v)) if *v >= 0 => Ok(Some(*v as usize)),
            Some(Yaml::Float(v)) if *v >= 0.0 && v.fract() == 0.0 && *v < 1e15 => {
                Ok(Some(*v as usize))
            }
            Some(_) => Err(self.err("a non-negative integer")),
        }
    }

    fn usize_or(&self, default: usize) -> Result<usize> {
        Ok(self.usize_opt()?.unwrap_or(default))
    }

    fn usize_req(&self) -> Result<usize> {
        self.usize_opt()?
            .ok_or_else(|| anyhow!("{}: {} is required", self.file, self.key))
    }

    fn f64_or(&self, default: f64) -> Result<f64> {
        match self.value {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.err("a number")),
        }
    }

    fn bool_or(&self, default: bool) -> Result<bool> {
        match self.value {
            None => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| self.err("true or false")),
        }
    }

    fn usize_list_or(&self, default: &[usize]) -> Result<Vec<usize>> {
        match self.value {
            None => Ok(default.to_vec()),
            Some(Yaml::Seq(items)) => items
                .iter()
                .map(|x| match x {
                    Yaml::Int(v) if *v > 0 => Ok(*v as usize),
                    _ => Err(self.err("a list of positive integers")),
                })
                .collect(),
            Some(_) => Err(self.err("a list of positive integers")),
        }
    }
}

fn read_yaml(path: &Path) -> Result<Yaml> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    yaml::parse(&text).with_context(|| path.display().to_string())
}

/// Build the [`ModelConfig`] that the reference's YAML configs describe (the FFN width by the
/// reference's rounding rule). [`convert`] checks it against the checkpoint's tensors.
pub fn model_config_from_yaml(config_yaml: &Path, autoenc_yaml: &Path) -> Result<ModelConfig> {
    Ok(read_yaml_model(config_yaml, autoenc_yaml)?.config)
}

fn read_yaml_model(config_yaml: &Path, autoenc_yaml: &Path) -> Result<YamlModel> {
    let model_file = config_yaml.display().to_string();
    let ae_file = autoenc_yaml.display().to_string();
    let ar_doc = read_yaml(config_yaml)?;
    let ae_doc = read_yaml(autoenc_yaml)?;

    // ---- model config: `model:` holds the keyword arguments of cbgen.ar.AR ----
    let mf = model_file.as_str();
    let model = match ar_doc.get("model") {
        Some(m @ Yaml::Map(_)) => m,
        _ => bail!(
            "{mf}: no 'model:' mapping (expected the reference's model config, e.g. config_256_L.yaml)"
        ),
    };
    let f = |key: &str| Field::new(mf, Some(model), "model", key);
    let img_size = f("img_size").usize_req()?;
    let scale_ratio = f("scale_ratio").f64_or(2.0)?;
    let scale_min_size = f("scale_min_size").usize_or(1)?;
    let class_cond = f("class_cond").bool_or(false)?;
    let num_classes = f("num_classes").usize_or(0)?;
    let use_head_mlp = f("use_head_mlp").bool_or(true)?;
    let steps_per_scale = f("num_blocks_per_scale").usize_or(8)?;
    if f("single_scale").bool_or(false)? {
        bail!(
            "{mf}: model.single_scale = true is not supported (checkergen samples scale pyramids)"
        );
    }

    // llama_config: `llama_config or _default_llama_config`, then `.get(key, default)`.
    let llama = model
        .get("llama_config")
        .filter(|v| !matches!(v, Yaml::Null) && *v != &Yaml::Map(vec![]));
    if let Some(l) = llama
        && !matches!(l, Yaml::Map(_))
    {
        bail!(
            "{mf}: model.llama_config must be a mapping, found {}",
            l.describe()
        );
    }
    let lf = |key: &str| Field::new(mf, llama, "model.llama_config", key);
    let hidden_size = lf("hidden_size").usize_or(256)?;
    let num_layers = lf("num_hidden_layers").usize_or(8)?;
    let num_heads = lf("num_attention_heads").usize_or(8)?;
    let rms_norm_eps = lf("rms_norm_eps").f64_or(1e-6)?;
    let intermediate = if llama.is_some() {
        lf("intermediate_size").usize_opt()?
    } else {
        Some(1024)
    };
    let num_kv_heads = lf("num_key_value_heads").usize_opt()?;
    if let Some(dim) = lf("class_embedding_dim").usize_opt()?
        && dim != hidden_size
    {
        bail!(
            "{mf}: model.llama_config.class_embedding_dim = {dim} differs from hidden_size {hidden_size}; not supported"
        );
    }
    let ffn_dim = reference_ffn_dim(hidden_size, intermediate).with_context(|| mf.to_string())?;

    // num_mixing_layers: an integer, or null / 'all' for every layer.
    let num_mixing_layers = match model.get("num_mixing_layers") {
        None => 2,
        Some(Yaml::Null) => num_layers,
        Some(Yaml::Str(s)) if s == "all" => num_layers,
        Some(_) => f("num_mixing_layers").usize_req()?,
    };

    // ---- autoencoder config: `model.params` = VQModel arguments, overridden key by key by
    // the model config's `model.autoenc.params` (cbgen/autoencoder.py load_model) ----
    let autoenc = model.get("autoenc");
    if let Some(c) = autoenc
        .and_then(|a| a.get("cull_threshold"))
        .filter(|v| !v.is_null())
    {
        bail!(
            "{mf}: model.autoenc.cull_threshold = {} (codebook culling) is not supported",
            c.describe()
        );
    }
    let af = ae_file.as_str();
    let ae_model = ae_doc.get("model");
    if let Some(target) = ae_model
        .and_then(|m| m.get("target"))
        .and_then(Yaml::as_str)
        && !target.ends_with("VQModel")
    {
        bail!(
            "{af}: model.target is {target:?}; only the reference's cbgen.autoencoder.VQModel is supported"
        );
    }
    let mut params: Vec<(String, Yaml)> = match ae_model.and_then(|m| m.get("params")) {
        Some(Yaml::Map(entries)) => entries.clone(),
        _ => bail!(
            "{af}: no 'model.params:' mapping (expected the reference's autoencoder_config.yaml)"
        ),
    };
    let mut overridden: BTreeSet<String> = BTreeSet::new();
    if let Some(Yaml::Map(over)) = autoenc.and_then(|a| a.get("params")) {
        for (k, v) in over {
            params.retain(|(pk, _)| pk != k);
            params.push((k.clone(), v.clone()));
            overridden.insert(k.clone());
        }
    }
    let params = Yaml::Map(params);
    // Name the file a parameter came from in errors.
    let pfile = |key: &str| if overridden.contains(key) { mf } else { af };
    let pkey = |key: &str| {
        if overridden.contains(key) {
            "model.autoenc.params".to_string()
        } else {
            "model.params".to_string()
        }
    };
    let pf = |key: &str| Field::new(pfile(key), Some(&params), &pkey(key), key);
    let embed_dim = pf("embed_dim").usize_req()?;
    let n_embed = pf("n_embed").usize_req()?;
    let normalize = pf("normalize").bool_or(false)?;
    let ddconfig = params.get("ddconfig").filter(|v| !v.is_null());
    if let Some(d) = ddconfig
        && !matches!(d, Yaml::Map(_))
    {
        bail!(
            "{}: {}.ddconfig must be a mapping, found {}",
            pfile("ddconfig"),
            pkey("ddconfig"),
            d.describe()
        );
    }
    let dkey = format!("{}.ddconfig", pkey("ddconfig"));
    let df = |key: &str| Field::new(pfile("ddconfig"), ddconfig, &dkey, key);
    if let Some(t) = ddconfig
        .and_then(|d| d.get("norm_type"))
        .and_then(Yaml::as_str)
        && t != "group"
    {
        bail!(
            "{}: {dkey}.norm_type = {t:?} is not supported (only GroupNorm, 'group')",
            pfile("ddconfig")
        );
    }
    if !df("resamp_with_conv").bool_or(true)? {
        bail!(
            "{}: {dkey}.resamp_with_conv = false is not supported",
            pfile("ddconfig")
        );
    }
    let decoder = DecoderConfig {
        ch: df("ch").usize_or(128)?,
        ch_mult: df("ch_mult").usize_list_or(&[1, 1, 2, 2, 4])?,
        num_res_blocks: df("num_res_blocks").usize_or(2)?,
        z_channels: df("z_channels").usize_or(256)?,
        embed_dim,
        n_embed,
        normalize,
    };
    let config = ModelConfig {
        img_size,
        scale_ratio,
        scale_min_size,
        class_cond,
        num_classes,
        use_head_mlp,
        num_mixing_layers,
        hidden_size,
        num_heads,
        num_layers,
        ffn_dim,
        rms_norm_eps,
        steps_per_scale,
        decoder,
    };
    Ok(YamlModel {
        config,
        num_kv_heads,
        model_file,
        ae_file,
        ae_overridden: overridden,
    })
}

// ------------------------------------------------------------------------------------------
// Expected tensors
// ------------------------------------------------------------------------------------------

/// Every tensor sampling needs, with its shape (the loader's list; see `weights.rs`).
pub use crate::model::weights::expected_tensors;

/// Tensors of the reference's state dict that sampling never uses.
pub fn is_training_only(name: &str) -> bool {
    name.starts_with("autoenc.encoder.")
        || name.starts_with("autoenc.quant_conv.")
        || name == "autoenc.cluster_usage_train"
        || name == "autoenc.quantize.initialized"
}

// ------------------------------------------------------------------------------------------
// Cross-checking YAML against tensors
// ------------------------------------------------------------------------------------------

/// A selected tensor and the checkpoint it comes from.
struct Selected {
    info: TensorInfo,
    /// Index into the source list (0 = AR checkpoint, 1 = autoencoder checkpoint).
    source: usize,
}

struct Sources<'a> {
    files: Vec<&'a PthCheckpoint>,
    keys: Vec<String>,
}

impl Sources<'_> {
    fn describe(&self, i: usize) -> String {
        format!("{} ['{}']", self.files[i].path().display(), self.keys[i])
    }
}

struct Checker<'a> {
    tensors: &'a BTreeMap<String, Selected>,
    sources: &'a Sources<'a>,
    yaml: &'a YamlModel,
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
            bail!(
                "{file}: {key} is {yaml_value:?} but the checkpoint says {tensor_value:?}: {}",
                evidence()
            );
        }
        Ok(())
    }

    /// Check the YAML hyperparameters against the tensors and return the configuration.
    fn check(&self) -> Result<ModelConfig> {
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

        // Every tensor sampling needs, by name and shape.
        for (name, shape) in expected_tensors(&config)? {
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
    let yaml = read_yaml_model(&opts.config_yaml, &opts.autoenc_yaml)?;

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
        if is_training_only(&name) || (ae.is_some() && name.starts_with("autoenc.")) {
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
            ]
            .iter()
            .any(|p| name.starts_with(p));
            if wanted && !is_training_only(&name) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ffn_rounding_matches_the_reference() {
        // L: 1024 -> 3072 stays; golden small model: 128 with 384 -> 512; S: 512 with 1536.
        assert_eq!(reference_ffn_dim(1024, Some(3072)).unwrap(), 3072);
        assert_eq!(reference_ffn_dim(128, Some(384)).unwrap(), 512);
        assert_eq!(reference_ffn_dim(512, Some(1536)).unwrap(), 1536);
        assert_eq!(reference_ffn_dim(32, Some(64)).unwrap(), 256);
        // No intermediate_size: int(8*dim/3) rounded up to 256.
        assert_eq!(reference_ffn_dim(256, None).unwrap(), 768);
    }
}
