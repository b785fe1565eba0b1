//! Transformer weights: the tensors a model file must hold (every state-dict name written once,
//! in `read_transformer`), validation, and the load-time folding both backends run from.
//!
//! Folding (SPEC.md section 5, exact algebra, f32):
//! - RoPE rows normalized to unit complex numbers; `sigmoid(mixing_coeffs)`; the codebook
//!   L2-normalized; `head_mlp(codebook)` added into the head weight.
//! - `combine_inputs = [Wa | Wb | Wc | Wd]` applied to `[pos(P), src(P), pos(Q), E(code(Q))]`
//!   becomes table lookups: `pa = pos Wa^T`, `pc = pos Wc^T`, `dc = E(codebook) Wd^T`,
//!   `empty = Wc empty_pos + Wd empty_emb`, and the source path
//!   `Wb (Wsrc (W4 h + b4) + bsrc) = src_fold h + src_fold_b` on the code MLP's 64-wide hidden
//!   state `h`. The per-step input is then a gather and a sum (`cpu::ops::gather_inputs`,
//!   kernels/embed.cu).
//! - w1 and w3 stacked into one (2F, C) weight; the two AdaLN linears stacked into (4C, C).

use super::autoenc::CODEBOOK;
use super::config::ModelConfig;
use super::file::TensorMap;
use super::source::{MapSource, Recorder, Source};
use crate::math;
use anyhow::Result;

/// Name of the learned RoPE table (N+2 rows of D interleaved complex numbers).
pub const ROPE_TABLE: &str =
    "llama.rotary_emb.position_embeddings.parametrizations.weight.original";
/// Name of the per-layer, per-head key-mixing logits.
pub const MIXING_COEFFS: &str = "llama.rotary_emb.mixing_coeffs";
/// Width of the code-vector MLP's hidden layers.
pub const CODE_HIDDEN: usize = 64;

pub use crate::math::normalize_rows;

/// A linear layer, weight `[out, in]` row-major.
#[derive(Clone, Debug)]
pub struct Linear {
    /// The f32 weight; empty once [`Linear::to_bf16`] has moved it to `w16`.
    pub w: Vec<f32>,
    pub b: Option<Vec<f32>>,
    pub din: usize,
    pub dout: usize,
    /// The weight as bf16 bits (`--precision bf16` on the CPU), `[out, in]`; when present,
    /// [`Linear::forward`] runs `math::gemm_bf16` on it.
    pub w16: Option<Vec<u16>>,
}

/// How the CPU path stores the transformer's large linears (qkv, wo, w13, w2, the AdaLN
/// modulation, the head): f32 (the default and the reference every golden test checks), or
/// bf16 with f32 accumulation (`math::gemm_bf16`; about half the bytes per step). Everything
/// else (norms, tables, the code MLP, the decoder) stays f32. The GPU path always stores
/// these weights in bf16.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Precision {
    /// f32 weights and arithmetic: the reference.
    #[default]
    F32,
    /// bf16 weights (and activations rounded to bf16 per GEMM), f32 accumulation.
    Bf16,
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::F32 => "f32",
            Precision::Bf16 => "bf16",
        })
    }
}

impl Linear {
    fn read(
        src: &mut dyn Source,
        prefix: &str,
        din: usize,
        dout: usize,
        bias: bool,
    ) -> Result<Self> {
        let w = src.take(&format!("{prefix}.weight"), &[dout, din])?;
        let b = if bias {
            Some(src.take(&format!("{prefix}.bias"), &[dout])?)
        } else {
            None
        };
        Ok(Linear::new(w, b, din, dout))
    }

    /// An f32 linear layer: `w` is `[dout, din]`.
    pub fn new(w: Vec<f32>, b: Option<Vec<f32>>, din: usize, dout: usize) -> Linear {
        Linear {
            w,
            b,
            din,
            dout,
            w16: None,
        }
    }

    /// y (rows x dout) = x (rows x din) W^T + b.
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), rows * self.din);
        let b = self.b.as_deref();
        let (din, dout) = (self.din, self.dout);
        match &self.w16 {
            // x rounded to bf16 per call, f32 accumulation, this CPU's best bf16 kernel.
            Some(w16) => math::linear_with(b, rows, dout, |y, beta| {
                let kern = math::gemm_bf16::kernel();
                math::gemm_bf16::gemm_nt_bf16(
                    kern, rows, dout, din, x, din, w16, din, y, dout, beta,
                )
            }),
            None => math::linear(x, &self.w, b, rows, din, dout),
        }
    }

    /// Store the weight as bf16 (round to nearest even) and free the f32 copy.
    pub fn to_bf16(&mut self) {
        if self.w16.is_none() {
            self.w16 = Some(math::gemm_bf16::to_bf16(&self.w));
            self.w = Vec::new();
        }
    }

    /// Rows stacked: `[self; other]` (same input width), biases concatenated.
    fn stack(mut self, other: Linear) -> Linear {
        assert_eq!(self.din, other.din);
        assert!(
            self.w16.is_none() && other.w16.is_none(),
            "stack before to_bf16"
        );
        self.w.extend_from_slice(&other.w);
        self.b = match (self.b, other.b) {
            (Some(mut a), Some(b)) => {
                a.extend_from_slice(&b);
                Some(a)
            }
            (None, None) => None,
            _ => panic!("stacking a linear with a bias onto one without"),
        };
        self.dout += other.dout;
        self
    }
}

/// The code MLP's two hidden layers: `silu(l2(silu(l0(x))))`, e -> 64 -> 64.
#[derive(Clone, Debug)]
pub struct CodeHidden {
    pub l0: Linear,
    pub l2: Linear,
}

impl CodeHidden {
    /// (rows, din) -> (rows, hidden).
    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let mut h = self.l0.forward(x, rows);
        math::silu_inplace(&mut h);
        let mut h = self.l2.forward(&h, rows);
        math::silu_inplace(&mut h);
        h
    }
}

/// A 3-layer code-vector MLP: Linear(e,h) SiLU Linear(h,h) SiLU Linear(h,C) (`E(v)` with
/// h = 64, and the optional head MLP).
#[derive(Clone, Debug)]
pub struct CodeMlp {
    pub hidden: CodeHidden,
    pub l4: Linear,
}

impl CodeMlp {
    fn read(
        src: &mut dyn Source,
        prefix: &str,
        din: usize,
        h: usize,
        dout: usize,
        bias4: bool,
    ) -> Result<Self> {
        Ok(CodeMlp {
            hidden: CodeHidden {
                l0: Linear::read(src, &format!("{prefix}.net.0"), din, h, true)?,
                l2: Linear::read(src, &format!("{prefix}.net.2"), h, h, true)?,
            },
            l4: Linear::read(src, &format!("{prefix}.net.4"), h, dout, bias4)?,
        })
    }

    pub fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        self.l4.forward(&self.hidden.forward(x, rows), rows)
    }
}

/// One transformer layer, folded.
#[derive(Clone, Debug)]
pub struct Layer {
    /// [3C, C]: q, k, v stacked.
    pub wqkv: Linear,
    pub wo: Linear,
    /// [2F, C]: w1 rows then w3 rows (SwiGLU input: silu(g[:, :F]) * g[:, F:]).
    pub w13: Linear,
    pub w2: Linear,
    pub attention_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    /// [4C, C] + bias: input_modulation (shift1, scale1) then post_attention_modulation
    /// (shift2, scale2), applied to silu(class embedding).
    pub modulation: Linear,
}

/// The per-step input tables of the folded `combine_inputs` (module docs), each an f32
/// buffer `B`: host vectors here; a backend that keeps the tables in device memory can name
/// them `InputTables<its buffer type>`.
#[derive(Clone, Debug)]
pub struct InputTables<B = Vec<f32>> {
    /// (N, C): embed_positions Wa^T.
    pub pa: B,
    /// (N, C): embed_positions Wc^T.
    pub pc: B,
    /// (V, C): E(codebook) Wd^T.
    pub dc: B,
    /// (C): Wc empty_token_pos + Wd empty_token_emb.
    pub empty: B,
    /// (C): combine_inputs bias.
    pub bias: B,
}

/// All transformer-side weights in f32, folded for sampling (module docs).
#[derive(Clone, Debug)]
pub struct TransformerWeights {
    pub class_embeddings: Vec<f32>, // (num_classes+1, C)
    /// The code MLP's two hidden layers (e -> 64 -> 64); its output layer is folded away.
    pub code_hidden: CodeHidden,
    /// (C, 64) + (C): the source-latent path Wb Wsrc W4 and its bias.
    pub src_fold: Linear,
    pub tables: InputTables,
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

/// The transformer's tensors as the state dict holds them (before folding).
struct RawLayer {
    wqkv: Linear,
    wo: Linear,
    w1: Linear,
    w3: Linear,
    w2: Linear,
    attention_norm: Vec<f32>,
    ffn_norm: Vec<f32>,
    input_mod: Linear,
    post_attention_mod: Linear,
}

struct RawTransformer {
    class_embeddings: Vec<f32>,
    embed_positions: Vec<f32>,
    codevec_mlp: CodeMlp,
    src_latents_proj: Linear,
    combine_inputs: Linear,
    empty_token_emb: Vec<f32>,
    empty_token_pos: Vec<f32>,
    lm_head: Linear,
    head_mlp: Option<CodeMlp>,
    rope: Vec<f32>,
    mixing: Vec<f32>,
    final_norm: Vec<f32>,
    layers: Vec<RawLayer>,
}

/// Read every transformer-side tensor through `src`: the one place their names and shapes are
/// written (loading validates through a [`MapSource`], listing records through a [`Recorder`]).
fn read_transformer(
    cfg: &ModelConfig,
    n_tokens: usize,
    src: &mut dyn Source,
) -> Result<RawTransformer> {
    let c = cfg.hidden_size;
    let e = cfg.code_dim();
    let v = cfg.codebook_size();
    let f = cfg.ffn_dim;
    let lin =
        |src: &mut dyn Source, p: &str, din, dout, bias| Linear::read(src, p, din, dout, bias);
    let class_embeddings = src.take("class_embeddings.weight", &[cfg.num_classes + 1, c])?;
    let embed_positions = src.take("embed_positions.weight", &[n_tokens, c])?;
    let codevec_mlp = CodeMlp::read(src, "embed_codevecs_mlp", e, CODE_HIDDEN, c, true)?;
    let src_latents_proj = lin(src, "src_latents_proj", c, c, true)?;
    let combine_inputs = lin(src, "combine_inputs", 4 * c, c, true)?;
    let empty_token_emb = src.take("empty_token_emb", &[c])?;
    let empty_token_pos = src.take("empty_token_pos", &[c])?;
    let lm_head = lin(src, "lm_head", c, v, true)?;
    let rope = src.take(ROPE_TABLE, &[n_tokens + 2, 2 * cfg.head_dim()])?;
    let mixing = src.take(MIXING_COEFFS, &[cfg.num_mixing_layers, cfg.num_heads])?;
    let final_norm = src.take("llama.norm.weight", &[c])?;
    let head_mlp = if cfg.use_head_mlp {
        Some(CodeMlp::read(
            src,
            "head_mlp",
            e,
            CODE_HIDDEN.max(e),
            c,
            false,
        )?)
    } else {
        None
    };
    let mut layers = Vec::with_capacity(cfg.num_layers);
    for l in 0..cfg.num_layers {
        let p = format!("llama.layers.{l}.");
        layers.push(RawLayer {
            wqkv: lin(src, &format!("{p}attention.wqkv"), c, 3 * c, false)?,
            wo: lin(src, &format!("{p}attention.wo"), c, c, false)?,
            w1: lin(src, &format!("{p}feed_forward.w1"), c, f, false)?,
            w3: lin(src, &format!("{p}feed_forward.w3"), c, f, false)?,
            w2: lin(src, &format!("{p}feed_forward.w2"), f, c, false)?,
            attention_norm: src.take(&format!("{p}attention_norm.weight"), &[c])?,
            ffn_norm: src.take(&format!("{p}ffn_norm.weight"), &[c])?,
            input_mod: lin(
                src,
                &format!("{p}input_modulation.adaLN_modulation.1"),
                c,
                2 * c,
                true,
            )?,
            post_attention_mod: lin(
                src,
                &format!("{p}post_attention_modulation.adaLN_modulation.1"),
                c,
                2 * c,
                true,
            )?,
        });
    }
    Ok(RawTransformer {
        class_embeddings,
        embed_positions,
        codevec_mlp,
        src_latents_proj,
        combine_inputs,
        empty_token_emb,
        empty_token_pos,
        lm_head,
        head_mlp,
        rope,
        mixing,
        final_norm,
        layers,
    })
}

/// Every transformer-side tensor (everything but the VQ decoder and codebook) a model of
/// `cfg` with `n_tokens` positions must hold, with its shape.
pub fn expected_transformer_tensors(
    cfg: &ModelConfig,
    n_tokens: usize,
) -> Vec<(String, Vec<usize>)> {
    let mut rec = Recorder::default();
    // A recorder never fails.
    let _ = read_transformer(cfg, n_tokens, &mut rec);
    rec.0
}

impl TransformerWeights {
    /// Store the large linears (per layer qkv, wo, w13, w2 and the AdaLN modulation; the
    /// head) in bf16 for the CPU's bf16 path ([`Precision::Bf16`]), freeing their f32 copies
    /// (about half of those bytes). Only for the CPU backend: the GPU engine uploads from
    /// the f32 weights, so a model is converted after its device is chosen.
    pub fn set_precision(&mut self, p: Precision) {
        if p == Precision::F32 {
            assert_eq!(
                self.precision(),
                Precision::F32,
                "bf16 weights cannot go back"
            );
            return;
        }
        for l in &mut self.layers {
            for lin in [
                &mut l.wqkv,
                &mut l.wo,
                &mut l.w13,
                &mut l.w2,
                &mut l.modulation,
            ] {
                lin.to_bf16();
            }
        }
        self.head.to_bf16();
    }

    /// How the large linears are stored now.
    pub fn precision(&self) -> Precision {
        if self.head.w16.is_some() {
            Precision::Bf16
        } else {
            Precision::F32
        }
    }
}

/// Columns [start, start + width) of a row-major (rows x stride) matrix.
fn sub_cols(w: &[f32], rows: usize, stride: usize, start: usize, width: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity(rows * width);
    for r in 0..rows {
        out.extend_from_slice(&w[r * stride + start..r * stride + start + width]);
    }
    out
}

impl TransformerWeights {
    /// Validate and fold the transformer-side tensors of `map` for configuration `cfg`.
    pub fn from_tensors(cfg: &ModelConfig, map: &TensorMap, n_tokens: usize) -> Result<Self> {
        Self::from_source(cfg, &mut MapSource::new(map, ""), n_tokens)
    }

    /// Check every transformer-side tensor's name and shape (and the codebook's) through
    /// `src`, in loading order, without folding (the header check of `inspect`).
    pub(crate) fn check_source(
        cfg: &ModelConfig,
        src: &mut dyn Source,
        n_tokens: usize,
    ) -> Result<()> {
        read_transformer(cfg, n_tokens, src)?;
        src.take(CODEBOOK, &[cfg.codebook_size(), cfg.code_dim()])?;
        Ok(())
    }

    /// [`Self::from_tensors`] through a map source (an owned map gives its tensors away).
    pub(crate) fn from_source(
        cfg: &ModelConfig,
        src: &mut MapSource,
        n_tokens: usize,
    ) -> Result<Self> {
        let raw = read_transformer(cfg, n_tokens, src)?;
        let mut codebook = src.take(CODEBOOK, &[cfg.codebook_size(), cfg.code_dim()])?;
        if cfg.decoder.normalize {
            normalize_rows(&mut codebook, cfg.code_dim());
        }
        Ok(Self::fold(cfg, raw, codebook, n_tokens))
    }

    fn fold(cfg: &ModelConfig, raw: RawTransformer, codebook: Vec<f32>, n: usize) -> Self {
        let c = cfg.hidden_size;
        let d = cfg.head_dim();
        let v = cfg.codebook_size();
        let mut head = raw.lm_head;
        if let Some(mlp) = &raw.head_mlp {
            let extra = mlp.forward(&codebook, v);
            head.w.iter_mut().zip(extra).for_each(|(w, x)| *w += x);
        }
        // RoPE: each (re, im) pair normalized to unit length (UnitNormComplex).
        let mut rope_re = vec![0.0; (n + 2) * d];
        let mut rope_im = vec![0.0; (n + 2) * d];
        for (i, pair) in raw.rope.chunks_exact(2).enumerate() {
            let norm = (pair[0] * pair[0] + pair[1] * pair[1]).sqrt().max(1e-12);
            rope_re[i] = pair[0] / norm;
            rope_im[i] = pair[1] / norm;
        }
        let mix = raw.mixing.into_iter().map(math::sigmoid).collect();

        // combine_inputs = [Wa | Wb | Wc | Wd] (C x 4C) folded into tables.
        let wc = &raw.combine_inputs.w;
        let block = |k: usize| sub_cols(wc, c, 4 * c, k * c, c);
        let (wa, wb, wcp, wd) = (block(0), block(1), block(2), block(3));
        let mut pa = vec![0.0; n * c];
        math::matmul_bt(&raw.embed_positions, &wa, &mut pa, n, c, c, 0.0);
        let mut pc = vec![0.0; n * c];
        math::matmul_bt(&raw.embed_positions, &wcp, &mut pc, n, c, c, 0.0);
        let ecb = raw.codevec_mlp.forward(&codebook, v); // (V, C)
        let mut dc = vec![0.0; v * c];
        math::matmul_bt(&ecb, &wd, &mut dc, v, c, c, 0.0);
        let mut empty = vec![0.0; c];
        math::matmul_bt(&raw.empty_token_pos, &wcp, &mut empty, 1, c, c, 0.0);
        math::matmul_bt(&raw.empty_token_emb, &wd, &mut empty, 1, c, c, 1.0);
        // src_fold = Wb Wsrc W4 (C x 64); bias Wb (Wsrc b4 + bsrc).
        let (l4, sp) = (&raw.codevec_mlp.l4, &raw.src_latents_proj);
        let h = CODE_HIDDEN;
        let mut ws_w4 = vec![0.0; c * h];
        math::matmul(&sp.w, &l4.w, &mut ws_w4, c, c, h, 0.0);
        let mut fold_w = vec![0.0; c * h];
        math::matmul(&wb, &ws_w4, &mut fold_w, c, c, h, 0.0);
        let mut inner = sp.b.clone().expect("src_latents_proj has a bias");
        math::matmul_bt(
            l4.b.as_deref().expect("code MLP output has a bias"),
            &sp.w,
            &mut inner,
            1,
            c,
            c,
            1.0,
        );
        let mut fold_b = vec![0.0; c];
        math::matmul_bt(&inner, &wb, &mut fold_b, 1, c, c, 0.0);
        let tables = InputTables {
            pa,
            pc,
            dc,
            empty,
            bias: raw.combine_inputs.b.expect("combine_inputs has a bias"),
        };
        let layers = raw
            .layers
            .into_iter()
            .map(|l| Layer {
                wqkv: l.wqkv,
                wo: l.wo,
                w13: l.w1.stack(l.w3),
                w2: l.w2,
                attention_norm: l.attention_norm,
                ffn_norm: l.ffn_norm,
                modulation: l.input_mod.stack(l.post_attention_mod),
            })
            .collect();
        TransformerWeights {
            class_embeddings: raw.class_embeddings,
            code_hidden: raw.codevec_mlp.hidden,
            src_fold: Linear::new(fold_w, Some(fold_b), h, c),
            tables,
            head,
            rope_re,
            rope_im,
            mix,
            layers,
            final_norm: raw.final_norm,
            codebook,
            n_tokens: n,
        }
    }
}
