//! Model weights: the tensors a model file must hold (names and shapes derived from the
//! configuration), validation, and load-time folding (unit-norm RoPE rows, normalized codebook,
//! sigmoid of the key-mixing coefficients, head_mlp folded into the head weight).

use crate::cpu::ops;
use crate::model::config::ModelConfig;
use crate::model::file::{Tensor, TensorMap};
use anyhow::{Result, bail};

/// Name of the codebook tensor (un-normalized; each row is L2-normalized at load time).
pub const CODEBOOK: &str = "autoenc.quantize.embedding.parametrizations.weight.original";
/// Name of the learned RoPE table (N+2 rows of D interleaved complex numbers).
pub const ROPE_TABLE: &str =
    "llama.rotary_emb.position_embeddings.parametrizations.weight.original";

/// Every transformer-side tensor (everything but the VQ decoder and codebook) a model of
/// `cfg` with `n_tokens` positions must hold, with its shape.
pub fn expected_transformer_tensors(
    cfg: &ModelConfig,
    n_tokens: usize,
) -> Vec<(String, Vec<usize>)> {
    let c = cfg.hidden_size;
    let e = cfg.code_dim();
    let v = cfg.codebook_size();
    let f = cfg.ffn_dim;
    let mut t: Vec<(String, Vec<usize>)> = vec![
        (
            "class_embeddings.weight".into(),
            vec![cfg.num_classes + 1, c],
        ),
        ("embed_positions.weight".into(), vec![n_tokens, c]),
        ("embed_codevecs_mlp.net.0.weight".into(), vec![64, e]),
        ("embed_codevecs_mlp.net.0.bias".into(), vec![64]),
        ("embed_codevecs_mlp.net.2.weight".into(), vec![64, 64]),
        ("embed_codevecs_mlp.net.2.bias".into(), vec![64]),
        ("embed_codevecs_mlp.net.4.weight".into(), vec![c, 64]),
        ("embed_codevecs_mlp.net.4.bias".into(), vec![c]),
        ("src_latents_proj.weight".into(), vec![c, c]),
        ("src_latents_proj.bias".into(), vec![c]),
        ("combine_inputs.weight".into(), vec![c, 4 * c]),
        ("combine_inputs.bias".into(), vec![c]),
        ("empty_token_emb".into(), vec![c]),
        ("empty_token_pos".into(), vec![c]),
        ("lm_head.weight".into(), vec![v, c]),
        ("lm_head.bias".into(), vec![v]),
        (ROPE_TABLE.into(), vec![n_tokens + 2, 2 * cfg.head_dim()]),
        (
            "llama.rotary_emb.mixing_coeffs".into(),
            vec![cfg.num_mixing_layers, cfg.num_heads],
        ),
        ("llama.norm.weight".into(), vec![c]),
    ];
    if cfg.use_head_mlp {
        let h = 64.max(e);
        t.push(("head_mlp.net.0.weight".into(), vec![h, e]));
        t.push(("head_mlp.net.0.bias".into(), vec![h]));
        t.push(("head_mlp.net.2.weight".into(), vec![h, h]));
        t.push(("head_mlp.net.2.bias".into(), vec![h]));
        t.push(("head_mlp.net.4.weight".into(), vec![c, h]));
    }
    for l in 0..cfg.num_layers {
        let p = format!("llama.layers.{l}.");
        t.push((format!("{p}attention.wqkv.weight"), vec![3 * c, c]));
        t.push((format!("{p}attention.wo.weight"), vec![c, c]));
        t.push((format!("{p}feed_forward.w1.weight"), vec![f, c]));
        t.push((format!("{p}feed_forward.w3.weight"), vec![f, c]));
        t.push((format!("{p}feed_forward.w2.weight"), vec![c, f]));
        t.push((format!("{p}attention_norm.weight"), vec![c]));
        t.push((format!("{p}ffn_norm.weight"), vec![c]));
        for m in ["input_modulation", "post_attention_modulation"] {
            t.push((format!("{p}{m}.adaLN_modulation.1.weight"), vec![2 * c, c]));
            t.push((format!("{p}{m}.adaLN_modulation.1.bias"), vec![2 * c]));
        }
    }
    t
}

/// Every tensor a model file of `cfg` must hold (transformer, codebook, VQ decoder), with
/// its shape. The one list behind loading, `checkergen init` and `checkergen convert`.
pub fn expected_tensors(cfg: &ModelConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let sizes = crate::order::scale_sizes(cfg.latent_size(), cfg.scale_ratio, cfg.scale_min_size)?;
    let n: usize = sizes.iter().map(|s| s * s).sum();
    let mut t = expected_transformer_tensors(cfg, n);
    t.extend(crate::cpu::decoder::VqDecoder::expected_tensors(
        &cfg.decoder,
    ));
    Ok(t)
}

/// Take a tensor out of the map, checking its shape.
pub fn take(map: &TensorMap, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    take_shape(map, name, shape)?;
    Ok(map[name].data.clone())
}

/// A linear layer, weight `[out, in]` row-major.
#[derive(Clone, Debug)]
pub struct Linear {
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
    pub din: usize,
    pub dout: usize,
}

impl Linear {
    fn load(map: &TensorMap, prefix: &str, din: usize, dout: usize, bias: bool) -> Result<Self> {
        let w = take(map, &format!("{prefix}.weight"), &[dout, din])?;
        let b = if bias {
            Some(take(map, &format!("{prefix}.bias"), &[dout])?)
        } else {
            None
        };
        Ok(Linear { w, b, din, dout })
    }

    /// y (rows x dout) = x (rows x din) W^T + b.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), rows * self.din);
        ops::linear(x, &self.w, self.b.as_deref(), rows, self.din, self.dout)
    }
}

/// The 3-layer code-vector MLP `E(v)`: Linear(e,64) SiLU Linear(64,64) SiLU Linear(64,C).
#[derive(Clone, Debug)]
pub struct CodeMlp {
    pub l0: Linear,
    pub l2: Linear,
    pub l4: Linear,
}

impl CodeMlp {
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut h = self.l0.forward(x, rows);
        h.iter_mut().for_each(|v| *v = ops::silu(*v));
        let mut h = self.l2.forward(&h, rows);
        h.iter_mut().for_each(|v| *v = ops::silu(*v));
        self.l4.forward(&h, rows)
    }
}

/// One transformer layer.
#[derive(Clone, Debug)]
pub struct Layer {
    /// [3C, C]: q, k, v stacked.
    pub wqkv: Linear,
    pub wo: Linear,
    pub w1: Linear,
    pub w3: Linear,
    pub w2: Linear,
    pub attention_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// AdaLN before attention: [2C, C] -> (shift, scale).
    pub input_mod: Linear,
    /// AdaLN before the FFN.
    pub post_attention_mod: Linear,
}

/// All transformer-side weights in f32, folded for sampling.
#[derive(Clone, Debug)]
pub struct TransformerWeights {
    pub class_embeddings: Vec<f32>, // (num_classes+1, C)
    pub embed_positions: Vec<f32>,  // (N, C)
    pub codevec_mlp: CodeMlp,
    pub src_latents_proj: Linear,
    pub combine_inputs: Linear, // [C, 4C]
    pub empty_token_emb: Vec<f32>,
    pub empty_token_pos: Vec<f32>,
    /// Effective head: lm_head (+ head_mlp(codebook) when configured), [V, C] + bias.
    pub head: Linear,
    /// Unit-norm RoPE table: re and im parts, each (N+2, D).
    pub rope_re: Vec<f32>,
    pub rope_im: Vec<f32>,
    /// sigmoid(mixing_coeffs): (num_mixing_layers, H), the weight of the current position.
    pub mix: Vec<f32>,
    pub layers: Vec<Layer>,
    pub final_norm: Vec<f32>,
    /// Normalized codebook (V, e).
    pub codebook: Vec<f32>,
    /// Total token count N (rows of embed_positions).
    pub n_tokens: usize,
}

/// L2-normalize each row of a (rows, dim) matrix like `F.normalize(eps=1e-12)`.
pub fn normalize_rows(x: &mut [f32], dim: usize) {
    for row in x.chunks_exact_mut(dim) {
        let n = row.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        row.iter_mut().for_each(|v| *v /= n);
    }
}

impl TransformerWeights {
    /// Validate and fold the transformer-side tensors of `map` for configuration `cfg`.
    pub fn from_tensors(cfg: &ModelConfig, map: &TensorMap, n_tokens: usize) -> Result<Self> {
        for (name, shape) in expected_transformer_tensors(cfg, n_tokens) {
            take_shape(map, &name, &shape)?;
        }
        let c = cfg.hidden_size;
        let d = cfg.head_dim();
        let e = cfg.code_dim();
        let v = cfg.codebook_size();
        let f = cfg.ffn_dim;
        let mut codebook = take(map, CODEBOOK, &[v, e])?;
        if cfg.decoder.normalize {
            normalize_rows(&mut codebook, e);
        }
        let lin = |p: &str, din, dout, bias| Linear::load(map, p, din, dout, bias);
        let mut head = lin("lm_head", c, v, true)?;
        if cfg.use_head_mlp {
            let h = 64.max(e);
            let mlp = CodeMlp {
                l0: lin("head_mlp.net.0", e, h, true)?,
                l2: lin("head_mlp.net.2", h, h, true)?,
                l4: lin("head_mlp.net.4", h, c, false)?,
            };
            let extra = mlp.forward(&codebook, v);
            head.w.iter_mut().zip(extra).for_each(|(w, x)| *w += x);
        }
        // RoPE: each (re, im) pair normalized to unit length (UnitNormComplex).
        let table = take(map, ROPE_TABLE, &[n_tokens + 2, 2 * d])?;
        let mut rope_re = vec![0.0; (n_tokens + 2) * d];
        let mut rope_im = vec![0.0; (n_tokens + 2) * d];
        for (i, pair) in table.chunks_exact(2).enumerate() {
            let n = (pair[0] * pair[0] + pair[1] * pair[1]).sqrt().max(1e-12);
            rope_re[i] = pair[0] / n;
            rope_im[i] = pair[1] / n;
        }
        let mix = take(
            map,
            "llama.rotary_emb.mixing_coeffs",
            &[cfg.num_mixing_layers, cfg.num_heads],
        )?
        .into_iter()
        .map(ops::sigmoid)
        .collect();
        let mut layers = Vec::with_capacity(cfg.num_layers);
        for l in 0..cfg.num_layers {
            let p = format!("llama.layers.{l}.");
            layers.push(Layer {
                wqkv: lin(&format!("{p}attention.wqkv"), c, 3 * c, false)?,
                wo: lin(&format!("{p}attention.wo"), c, c, false)?,
                w1: lin(&format!("{p}feed_forward.w1"), c, f, false)?,
                w3: lin(&format!("{p}feed_forward.w3"), c, f, false)?,
                w2: lin(&format!("{p}feed_forward.w2"), f, c, false)?,
                attention_norm: take(map, &format!("{p}attention_norm.weight"), &[c])?,
                ffn_norm: take(map, &format!("{p}ffn_norm.weight"), &[c])?,
                input_mod: lin(
                    &format!("{p}input_modulation.adaLN_modulation.1"),
                    c,
                    2 * c,
                    true,
                )?,
                post_attention_mod: lin(
                    &format!("{p}post_attention_modulation.adaLN_modulation.1"),
                    c,
                    2 * c,
                    true,
                )?,
            });
        }
        Ok(TransformerWeights {
            class_embeddings: take(map, "class_embeddings.weight", &[cfg.num_classes + 1, c])?,
            embed_positions: take(map, "embed_positions.weight", &[n_tokens, c])?,
            codevec_mlp: CodeMlp {
                l0: lin("embed_codevecs_mlp.net.0", e, 64, true)?,
                l2: lin("embed_codevecs_mlp.net.2", 64, 64, true)?,
                l4: lin("embed_codevecs_mlp.net.4", 64, c, true)?,
            },
            src_latents_proj: lin("src_latents_proj", c, c, true)?,
            combine_inputs: lin("combine_inputs", 4 * c, c, true)?,
            empty_token_emb: take(map, "empty_token_emb", &[c])?,
            empty_token_pos: take(map, "empty_token_pos", &[c])?,
            head,
            rope_re,
            rope_im,
            mix,
            layers,
            final_norm: take(map, "llama.norm.weight", &[c])?,
            codebook,
            n_tokens,
        })
    }
}

fn take_shape(map: &TensorMap, name: &str, shape: &[usize]) -> Result<()> {
    match map.get(name) {
        None => bail!("missing tensor `{name}` (expected shape {shape:?})"),
        Some(Tensor { shape: s, .. }) if s != shape => {
            bail!("tensor `{name}` has shape {s:?}, expected {shape:?} for this configuration")
        }
        Some(_) => Ok(()),
    }
}
