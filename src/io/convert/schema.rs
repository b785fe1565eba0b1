//! The reference-config schema: the model config (`config.yaml`, `model:` = the keyword
//! arguments of `cbgen.ar.AR`) and the autoencoder config (`autoencoder_config.yaml`,
//! `model.params` = `VQModel(...)` arguments, overridden key by key by the model config's
//! `model.autoenc.params`), read into a [`ModelConfig`] with the reference's defaults.
//! Errors name the file and the dotted YAML key.

use super::yaml::{self, Yaml};
use crate::model::config::{DecoderConfig, ModelConfig};
use anyhow::{Context, Result, anyhow, bail};
use std::collections::BTreeSet;
use std::path::Path;

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
pub(super) struct YamlModel {
    pub(super) config: ModelConfig,
    /// `num_key_value_heads`, if set (grouped-query attention is not supported).
    pub(super) num_kv_heads: Option<usize>,
    pub(super) model_file: String,
    pub(super) ae_file: String,
    /// Autoencoder parameters set by the model config's `model.autoenc.params`.
    pub(super) ae_overridden: BTreeSet<String>,
    /// `model.llama_config` is absent, so its values are the reference's defaults.
    pub(super) llama_defaulted: bool,
}

impl YamlModel {
    /// File and full key of an autoencoder parameter (`"ddconfig.ch"`): the model config's
    /// `model.autoenc.params.*` when it overrides that parameter, else the autoencoder config.
    pub(super) fn ae_location(&self, param_path: &str) -> (&str, String) {
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
    crate::paths::check_input(path)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    yaml::parse(&text).with_context(|| path.display().to_string())
}

/// Build the [`ModelConfig`] that the reference's YAML configs describe (the FFN width by the
/// reference's rounding rule). [`convert`](super::convert) checks it against the checkpoint's tensors.
pub fn model_config_from_yaml(config_yaml: &Path, autoenc_yaml: &Path) -> Result<ModelConfig> {
    Ok(read_yaml_model(config_yaml, autoenc_yaml)?.config)
}

pub(super) fn read_yaml_model(config_yaml: &Path, autoenc_yaml: &Path) -> Result<YamlModel> {
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
        llama_defaulted: llama.is_none(),
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
