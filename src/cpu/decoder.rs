//! f32 CPU VQ decoder (LlamaGen VQ-16 layout; SPEC.md section 7): code vectors -> pixels.
//!
//! ```text
//! z (B, e, s, s) -> L2-normalize over e -> post_quant_conv 1x1 (e -> z_ch)
//!   -> conv_in 3x3 (z_ch -> ch*ch_mult[-1]) -> mid: Res, Attn, Res
//!   -> conv_blocks.0 .. conv_blocks.{L-1} (levels L-1 .. 0): num_res_blocks+1 ResBlocks
//!      (each followed by an AttnBlock on the lowest-resolution level only), then, except
//!      for the last one, nearest x2 upsample + conv 3x3
//!   -> GroupNorm + SiLU -> conv_out 3x3 -> (B, 3, s*stride, s*stride)
//! ```
//!
//! Images are decoded one at a time (activations of one 256x256 image of the released decoder
//! are 32 MB per buffer). Every 3x3 conv is im2col + one GEMM per band of output rows, with
//! the band sized so the im2col buffer stays under [`COL_BUDGET`] floats; 1x1 convs and
//! attention are plain GEMMs. `matrixmultiply` threads the GEMMs; rayon parallelizes the
//! element-wise passes (im2col, GroupNorm, upsample, softmax).

use crate::cpu::ops;
use crate::model::config::DecoderConfig;
use crate::model::file::TensorMap;
use crate::model::weights::{CODEBOOK, normalize_rows};
use anyhow::{Result, bail};
use rayon::prelude::*;

/// GroupNorm groups and epsilon of every norm in the decoder.
const GN_GROUPS: usize = 32;
const GN_EPS: f32 = 1e-6;
/// Largest im2col buffer, in floats (16 MB), for one band of a 3x3 conv.
const COL_BUDGET: usize = 1 << 22;

/// One image's activations.
struct Act {
    c: usize,
    h: usize,
    w: usize,
    data: Vec<f32>, // (C, H, W)
}

impl Act {
    fn hw(&self) -> usize {
        self.h * self.w
    }
}

/// Conv2d with bias, kernel 1 (padding 0) or 3 (padding 1), stride 1.
pub(crate) struct Conv {
    pub(crate) cin: usize,
    pub(crate) cout: usize,
    pub(crate) k: usize,
    pub(crate) weight: Vec<f32>, // (Cout, Cin*k*k), PyTorch (Cout, Cin, k, k) flattened
    pub(crate) bias: Vec<f32>,   // (Cout,)
}

impl Conv {
    fn forward(&self, x: &Act) -> Act {
        self.forward_banded(x, COL_BUDGET)
    }

    /// `col_budget` caps the im2col buffer (floats); a parameter so tests can force many bands.
    fn forward_banded(&self, x: &Act, col_budget: usize) -> Act {
        assert_eq!(x.c, self.cin, "conv: input channels");
        let (h, w, n) = (x.h, x.w, x.hw());
        // Start from the bias; the GEMMs accumulate into it (beta = 1).
        let mut out = vec![0.0f32; self.cout * n]; // (Cout, H, W)
        for (plane, &b) in out.chunks_exact_mut(n).zip(&self.bias) {
            plane.fill(b);
        }
        if self.k == 1 {
            ops::matmul(&self.weight, &x.data, &mut out, self.cout, self.cin, n, 1.0);
        } else {
            let kk = self.cin * 9;
            let band_rows = (col_budget / (kk * w)).clamp(1, h);
            let mut col = vec![0.0f32; kk * band_rows * w]; // (Cin*9, band_rows*W)
            for y0 in (0..h).step_by(band_rows) {
                let y1 = (y0 + band_rows).min(h);
                let nb = (y1 - y0) * w;
                ops::im2col_3x3(&x.data, self.cin, h, w, y0, y1, &mut col);
                // out[:, y0*W .. y1*W] (Cout, nb), row stride H*W, += weight @ col
                ops::matmul_strided(
                    &self.weight,
                    [kk, 1],
                    &col,
                    [nb, 1],
                    &mut out[y0 * w..],
                    n,
                    self.cout,
                    kk,
                    nb,
                    1.0,
                );
            }
        }
        Act {
            c: self.cout,
            h,
            w,
            data: out,
        }
    }
}

/// GroupNorm(32 groups, eps 1e-6, affine).
pub(crate) struct GroupNorm {
    pub(crate) gamma: Vec<f32>, // (C,)
    pub(crate) beta: Vec<f32>,  // (C,)
}

impl GroupNorm {
    /// GroupNorm, then SiLU when `silu` (the two are always fused in this network except in
    /// the attention block). Statistics in f64, biased variance as in PyTorch.
    fn forward(&self, x: &Act, silu: bool) -> Act {
        let c = x.c;
        assert_eq!(c, self.gamma.len(), "group norm: channels");
        let hw = x.hw();
        let group_len = (c / GN_GROUPS) * hw; // channels of a group are contiguous in (C, H, W)
        let mut out = vec![0.0f32; x.data.len()]; // (C, H, W)
        out.par_chunks_mut(group_len)
            .zip(x.data.par_chunks(group_len))
            .enumerate()
            .for_each(|(g, (dst, src))| {
                let (mean, var) = mean_var(src);
                let rstd = 1.0 / (var + GN_EPS as f64).sqrt();
                let ch0 = g * (c / GN_GROUPS);
                for (i, (d, s)) in dst
                    .chunks_exact_mut(hw)
                    .zip(src.chunks_exact(hw))
                    .enumerate()
                {
                    // Fold normalization and affine into one scale/shift per channel.
                    let scale = (rstd * self.gamma[ch0 + i] as f64) as f32;
                    let shift = self.beta[ch0 + i] - (mean * scale as f64) as f32;
                    for (d, &s) in d.iter_mut().zip(s) {
                        *d = s * scale + shift;
                    }
                    if silu {
                        ops::silu_inplace(d);
                    }
                }
            });
        Act {
            c,
            h: x.h,
            w: x.w,
            data: out,
        }
    }
}

/// Mean and biased variance, two passes, accumulated in f64 over 8 independent lanes (a single
/// serial f64 sum is latency-bound and was a visible share of GroupNorm time).
fn mean_var(xs: &[f32]) -> (f64, f64) {
    fn lane_sum(xs: &[f32], f: impl Fn(f32) -> f64) -> f64 {
        let mut acc = [0.0f64; 8];
        let chunks = xs.chunks_exact(8);
        let tail: f64 = chunks.remainder().iter().map(|&v| f(v)).sum();
        for c in chunks {
            for (a, &v) in acc.iter_mut().zip(c) {
                *a += f(v);
            }
        }
        acc.iter().sum::<f64>() + tail
    }
    let n = xs.len() as f64;
    let mean = lane_sum(xs, |v| v as f64) / n;
    let var = lane_sum(xs, |v| (v as f64 - mean).powi(2)) / n;
    (mean, var)
}

/// GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus the input (1x1 `nin_shortcut` when the
/// channel count changes).
pub(crate) struct ResBlock {
    pub(crate) norm1: GroupNorm,
    pub(crate) conv1: Conv,
    pub(crate) norm2: GroupNorm,
    pub(crate) conv2: Conv,
    pub(crate) nin_shortcut: Option<Conv>,
}

impl ResBlock {
    fn forward(&self, x: Act) -> Act {
        let h = self.conv1.forward(&self.norm1.forward(&x, true));
        let mut h = self.conv2.forward(&self.norm2.forward(&h, true)); // (Cout, H, W)
        let skip = match &self.nin_shortcut {
            Some(conv) => conv.forward(&x),
            None => x,
        };
        for (o, s) in h.data.iter_mut().zip(&skip.data) {
            *o += s;
        }
        h
    }
}

/// Single-head spatial self-attention over all H*W positions, plus the input.
pub(crate) struct AttnBlock {
    pub(crate) norm: GroupNorm,
    pub(crate) q: Conv,
    pub(crate) k: Conv,
    pub(crate) v: Conv,
    pub(crate) proj_out: Conv,
}

impl AttnBlock {
    fn forward(&self, x: Act) -> Act {
        let (c, n) = (x.c, x.hw());
        let hn = self.norm.forward(&x, false);
        let (q, k, v) = (
            self.q.forward(&hn),
            self.k.forward(&hn),
            self.v.forward(&hn),
        ); // (C, N) each
        // scores[i, j] = sum_c q[c, i] k[c, j]: q read transposed (strides [1, N]).
        let mut p = vec![0.0f32; n * n]; // (N query, N key)
        ops::matmul_strided(&q.data, [1, n], &k.data, [n, 1], &mut p, n, n, c, n, 0.0);
        let scale = 1.0 / (c as f32).sqrt();
        p.par_chunks_mut(n).for_each(|row| {
            row.iter_mut().for_each(|s| *s *= scale);
            ops::softmax_inplace(row);
        });
        // att[c, i] = sum_j v[c, j] p[i, j]
        let mut att = vec![0.0f32; c * n]; // (C, N)
        ops::matmul_bt(&v.data, &p, &mut att, c, n, n, 0.0);
        let att = Act {
            c,
            h: x.h,
            w: x.w,
            data: att,
        };
        let mut out = self.proj_out.forward(&att);
        for (o, s) in out.data.iter_mut().zip(&x.data) {
            *o += s;
        }
        out
    }
}

/// One resolution level of the upsampling path (`conv_blocks.{i}`).
pub(crate) struct Level {
    pub(crate) res: Vec<ResBlock>,
    pub(crate) attn: Vec<AttnBlock>, // empty, or one per ResBlock
    pub(crate) upsample: Option<Conv>,
}

/// The VQ codebook plus decoder: code vectors or token maps to images in [-1, 1]-ish.
pub struct VqDecoder {
    pub(crate) cfg: DecoderConfig,
    pub(crate) codebook: Vec<f32>, // (V, e), rows L2-normalized when cfg.normalize
    pub(crate) post_quant_conv: Conv,
    pub(crate) conv_in: Conv,
    pub(crate) mid: (ResBlock, AttnBlock, ResBlock),
    pub(crate) levels: Vec<Level>,
    pub(crate) norm_out: GroupNorm,
    pub(crate) conv_out: Conv,
}

/// Where the builder gets each named tensor: a weight map, or a recorder that only lists
/// names and shapes (so [`VqDecoder::expected_tensors`] and loading cannot drift apart).
trait Source {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>>;
}

struct MapSource<'a>(&'a TensorMap);

impl Source for MapSource<'_> {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let Some(t) = self.0.get(name) else {
            bail!("decoder weights: missing tensor `{name}` (expected shape {shape:?})");
        };
        if t.shape != shape {
            bail!(
                "decoder weights: tensor `{name}` has shape {:?}, expected {shape:?}",
                t.shape
            );
        }
        Ok(t.data.clone())
    }
}

struct Recorder(Vec<(String, Vec<usize>)>);

impl Source for Recorder {
    fn take(&mut self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.0.push((name.to_string(), shape.to_vec()));
        Ok(Vec::new())
    }
}

fn conv(src: &mut dyn Source, name: &str, cin: usize, cout: usize, k: usize) -> Result<Conv> {
    Ok(Conv {
        cin,
        cout,
        k,
        weight: src.take(&format!("{name}.weight"), &[cout, cin, k, k])?,
        bias: src.take(&format!("{name}.bias"), &[cout])?,
    })
}

fn group_norm(src: &mut dyn Source, name: &str, c: usize) -> Result<GroupNorm> {
    Ok(GroupNorm {
        gamma: src.take(&format!("{name}.weight"), &[c])?,
        beta: src.take(&format!("{name}.bias"), &[c])?,
    })
}

fn res_block(src: &mut dyn Source, name: &str, cin: usize, cout: usize) -> Result<ResBlock> {
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

fn attn_block(src: &mut dyn Source, name: &str, c: usize) -> Result<AttnBlock> {
    Ok(AttnBlock {
        norm: group_norm(src, &format!("{name}.norm"), c)?,
        q: conv(src, &format!("{name}.q"), c, c, 1)?,
        k: conv(src, &format!("{name}.k"), c, c, 1)?,
        v: conv(src, &format!("{name}.v"), c, c, 1)?,
        proj_out: conv(src, &format!("{name}.proj_out"), c, c, 1)?,
    })
}

impl VqDecoder {
    fn check_config(cfg: &DecoderConfig) -> Result<()> {
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

    /// Build the decoder, reading every tensor through `src` (in state-dict order).
    fn build(cfg: &DecoderConfig, src: &mut dyn Source) -> Result<VqDecoder> {
        Self::check_config(cfg)?;
        let d = "autoenc.decoder";
        let nl = cfg.ch_mult.len();
        let mut c = cfg.ch * cfg.ch_mult[nl - 1];
        let conv_in = conv(src, &format!("{d}.conv_in"), cfg.z_channels, c, 3)?;
        let mid = (
            res_block(src, &format!("{d}.mid.0"), c, c)?,
            attn_block(src, &format!("{d}.mid.1"), c)?,
            res_block(src, &format!("{d}.mid.2"), c, c)?,
        );
        let mut levels = Vec::with_capacity(nl);
        for i in 0..nl {
            // conv_blocks.i is resolution level nl-1-i; level 0 (full resolution) is last.
            let name = format!("{d}.conv_blocks.{i}");
            let cout = cfg.ch * cfg.ch_mult[nl - 1 - i];
            let (mut res, mut attn) = (Vec::new(), Vec::new());
            for j in 0..=cfg.num_res_blocks {
                res.push(res_block(src, &format!("{name}.res.{j}"), c, cout)?);
                c = cout;
            }
            if i == 0 {
                for j in 0..=cfg.num_res_blocks {
                    attn.push(attn_block(src, &format!("{name}.attn.{j}"), c)?);
                }
            }
            let upsample = if i + 1 < nl {
                Some(conv(src, &format!("{name}.upsample.conv"), c, c, 3)?)
            } else {
                None
            };
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
        Ok(VqDecoder {
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

    /// Load from a state dict (extra tensors are ignored). A missing or misshaped tensor is an
    /// error naming it, with the expected and found shapes.
    pub fn from_tensors(cfg: &DecoderConfig, map: &TensorMap) -> Result<VqDecoder> {
        Self::build(cfg, &mut MapSource(map))
    }

    /// Every tensor (name, shape) the decoder, codebook and post_quant_conv need, in the
    /// reference's state-dict order. Empty for a configuration that `from_tensors` rejects
    /// (the config is checked before the first tensor is requested).
    pub fn expected_tensors(cfg: &DecoderConfig) -> Vec<(String, Vec<usize>)> {
        let mut rec = Recorder(Vec::new());
        let _ = Self::build(cfg, &mut rec);
        rec.0
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// The codebook (V, e), rows L2-normalized when `normalize` is set.
    pub fn codebook(&self) -> &[f32] {
        &self.codebook
    }

    /// Decode code vectors `z` (B, e, s, s) to images (B, 3, s*stride, s*stride), raw range.
    pub fn decode(&self, z: &[f32], batch: usize, s: usize) -> Vec<f32> {
        let e = self.cfg.embed_dim;
        assert_eq!(z.len(), batch * e * s * s, "decode: z must be (B, e, s, s)");
        let side = s * self.cfg.stride();
        let mut out = Vec::with_capacity(batch * 3 * side * side); // (B, 3, side, side)
        for zb in z.chunks_exact(e * s * s) {
            out.extend_from_slice(&self.decode_one(zb, s).data);
        }
        out
    }

    /// Gather codebook rows for `tokens` (B, s, s) (raster order per image) and decode them.
    pub fn decode_tokens(&self, tokens: &[u32], batch: usize, s: usize) -> Vec<f32> {
        let (e, n) = (self.cfg.embed_dim, s * s);
        assert_eq!(
            tokens.len(),
            batch * n,
            "decode_tokens: tokens must be (B, s, s)"
        );
        let mut z = vec![0.0f32; batch * e * n]; // (B, e, s, s)
        for (zb, tb) in z.chunks_exact_mut(e * n).zip(tokens.chunks_exact(n)) {
            for (p, &t) in tb.iter().enumerate() {
                let t = t as usize;
                assert!(
                    t < self.cfg.n_embed,
                    "decode_tokens: token {t} out of range"
                );
                for d in 0..e {
                    zb[d * n + p] = self.codebook[t * e + d];
                }
            }
        }
        self.decode(&z, batch, s)
    }

    /// Decode one image's codes (e, s, s) to (3, s*stride, s*stride).
    fn decode_one(&self, z: &[f32], s: usize) -> Act {
        let (e, n) = (self.cfg.embed_dim, s * s);
        // L2-normalize over e at each position (F.normalize, eps 1e-12): transpose to (s*s, e)
        // rows and back.
        let mut z = z.to_vec(); // (e, s, s)
        if self.cfg.normalize {
            let mut t: Vec<f32> = (0..n * e).map(|i| z[(i % e) * n + i / e]).collect(); // (s*s, e)
            normalize_rows(&mut t, e);
            z = (0..e * n).map(|i| t[(i % n) * e + i / n]).collect();
        }
        let x = Act {
            c: e,
            h: s,
            w: s,
            data: z,
        };
        let x = self.post_quant_conv.forward(&x); // (z_ch, s, s)
        let mut x = self.conv_in.forward(&x); // (ch*ch_mult[-1], s, s)
        x = self.mid.0.forward(x);
        x = self.mid.1.forward(x);
        x = self.mid.2.forward(x);
        for level in &self.levels {
            for (j, res) in level.res.iter().enumerate() {
                x = res.forward(x);
                if let Some(attn) = level.attn.get(j) {
                    x = attn.forward(x);
                }
            }
            if let Some(up) = &level.upsample {
                x = up.forward(&upsample_nearest2(&x));
            }
        }
        let x = self.norm_out.forward(&x, true);
        self.conv_out.forward(&x) // (3, s*stride, s*stride)
    }
}

/// Nearest-neighbour x2 upsample: (C, H, W) -> (C, 2H, 2W).
fn upsample_nearest2(x: &Act) -> Act {
    let (h, w) = (x.h, x.w);
    let mut out = vec![0.0f32; x.c * 4 * h * w]; // (C, 2H, 2W)
    out.par_chunks_mut(4 * h * w)
        .zip(x.data.par_chunks(h * w))
        .for_each(|(dst, src)| {
            for (y, src_row) in src.chunks_exact(w).enumerate() {
                let row = &mut dst[2 * y * 2 * w..][..2 * w];
                for (pair, &v) in row.chunks_exact_mut(2).zip(src_row) {
                    pair.fill(v);
                }
                dst.copy_within(2 * y * 2 * w..(2 * y + 1) * 2 * w, (2 * y + 1) * 2 * w);
            }
        });
    Act {
        c: x.c,
        h: 2 * h,
        w: 2 * w,
        data: out,
    }
}

/// Raw decoder output to 8-bit: clamp((x + 1) / 2, 0, 1) * 255, truncated toward zero.
/// Same layout as the input.
pub fn to_pixels_u8(img: &[f32]) -> Vec<u8> {
    img.iter()
        .map(|&x| (((x + 1.0) / 2.0).clamp(0.0, 1.0) * 255.0) as u8)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::file::Tensor;

    fn tiny_config() -> DecoderConfig {
        DecoderConfig {
            ch: 32,
            ch_mult: vec![1, 2],
            num_res_blocks: 1,
            z_channels: 16,
            embed_dim: 4,
            n_embed: 10,
            normalize: true,
        }
    }

    /// Deterministic pseudo-random values in [-scale, scale).
    fn fill(n: usize, seed: u64, scale: f32) -> Vec<f32> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn random_weights(cfg: &DecoderConfig) -> TensorMap {
        VqDecoder::expected_tensors(cfg)
            .into_iter()
            .enumerate()
            .map(|(i, (name, shape))| {
                let n = shape.iter().product();
                let fan_in: usize = shape[1..].iter().product::<usize>().max(1);
                let data = fill(n, i as u64, 1.0 / (fan_in as f32).sqrt());
                (name, Tensor::new(shape, data))
            })
            .collect()
    }

    #[test]
    fn expected_tensors_cover_the_tiny_layout() {
        let names: Vec<String> = VqDecoder::expected_tensors(&tiny_config())
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        // Lowest level (conv_blocks.0, 64 channels) has attention; the last level has none
        // and no upsample; the first ResBlock of conv_blocks.1 changes 64 -> 32 channels.
        for want in [
            "autoenc.decoder.conv_blocks.0.attn.1.proj_out.weight",
            "autoenc.decoder.conv_blocks.0.upsample.conv.bias",
            "autoenc.decoder.conv_blocks.1.res.0.nin_shortcut.weight",
            "autoenc.post_quant_conv.weight",
            CODEBOOK,
        ] {
            assert!(names.iter().any(|n| n == want), "missing {want}");
        }
        for absent in [
            "autoenc.decoder.conv_blocks.1.attn.0.q.weight",
            "autoenc.decoder.conv_blocks.1.upsample.conv.weight",
            "autoenc.decoder.conv_blocks.0.res.0.nin_shortcut.weight",
        ] {
            assert!(!names.iter().any(|n| n == absent), "unexpected {absent}");
        }
    }

    #[test]
    fn missing_tensor_is_named() {
        let cfg = tiny_config();
        let mut map = random_weights(&cfg);
        let name = "autoenc.decoder.conv_blocks.1.res.0.nin_shortcut.weight";
        map.remove(name).unwrap();
        let err = VqDecoder::from_tensors(&cfg, &map)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains(name) && err.contains("missing"), "{err}");
        assert!(err.contains("[32, 64, 1, 1]"), "{err}");
    }

    #[test]
    fn misshaped_tensor_is_named() {
        let cfg = tiny_config();
        let mut map = random_weights(&cfg);
        let name = "autoenc.decoder.mid.1.q.weight";
        map.insert(name.to_string(), Tensor::zeros(vec![64, 64]));
        let err = VqDecoder::from_tensors(&cfg, &map)
            .err()
            .expect("must fail")
            .to_string();
        assert!(err.contains(name), "{err}");
        assert!(
            err.contains("[64, 64]") && err.contains("[64, 64, 1, 1]"),
            "{err}"
        );
    }

    #[test]
    fn bad_config_is_rejected() {
        let mut cfg = tiny_config();
        cfg.ch = 48;
        let err = VqDecoder::from_tensors(&cfg, &TensorMap::new())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("multiple of 32"), "{err}");
    }

    /// Direct 3x3 convolution with zero padding, for checking im2col + GEMM.
    fn naive_conv3x3(conv: &Conv, x: &Act) -> Vec<f32> {
        let (h, w) = (x.h as isize, x.w as isize);
        let mut out = vec![0.0f32; conv.cout * x.hw()];
        for o in 0..conv.cout {
            for y in 0..h {
                for xx in 0..w {
                    let mut acc = conv.bias[o] as f64;
                    for c in 0..conv.cin {
                        for ky in 0..3isize {
                            for kx in 0..3isize {
                                let (ys, xs) = (y + ky - 1, xx + kx - 1);
                                if ys < 0 || ys >= h || xs < 0 || xs >= w {
                                    continue;
                                }
                                let wv =
                                    conv.weight[(o * conv.cin + c) * 9 + (ky * 3 + kx) as usize];
                                let xv = x.data[(c * x.h + ys as usize) * x.w + xs as usize];
                                acc += wv as f64 * xv as f64;
                            }
                        }
                    }
                    out[(o * x.h + y as usize) * x.w + xx as usize] = acc as f32;
                }
            }
        }
        out
    }

    #[test]
    fn conv3x3_matches_naive_with_and_without_bands() {
        let (cin, cout, h, w) = (5, 7, 9, 6);
        let conv = Conv {
            cin,
            cout,
            k: 3,
            weight: fill(cout * cin * 9, 1, 0.5),
            bias: fill(cout, 2, 0.5),
        };
        let x = Act {
            c: cin,
            h,
            w,
            data: fill(cin * h * w, 3, 1.0),
        };
        let want = naive_conv3x3(&conv, &x);
        // One band, 2-row bands (ragged last band), 1-row bands.
        for budget in [usize::MAX / 2, cin * 9 * w * 2, 1] {
            let got = conv.forward_banded(&x, budget).data;
            let err = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(err < 1e-5, "budget {budget}: max err {err}");
        }
        // Width 1 exercises the edge columns of im2col.
        let x1 = Act {
            c: cin,
            h: 3,
            w: 1,
            data: fill(cin * 3, 4, 1.0),
        };
        let want1 = naive_conv3x3(&conv, &x1);
        let got1 = conv.forward(&x1).data;
        assert!(got1.iter().zip(&want1).all(|(a, b)| (a - b).abs() < 1e-5));
    }

    #[test]
    fn upsample_repeats_pixels() {
        let x = Act {
            c: 2,
            h: 2,
            w: 3,
            data: (0..12).map(|v| v as f32).collect(),
        };
        let y = upsample_nearest2(&x);
        assert_eq!((y.c, y.h, y.w), (2, 4, 6));
        for c in 0..2 {
            for yy in 0..4 {
                for xx in 0..6 {
                    assert_eq!(
                        y.data[(c * 4 + yy) * 6 + xx],
                        x.data[(c * 2 + yy / 2) * 3 + xx / 2]
                    );
                }
            }
        }
    }

    #[test]
    fn tiny_decoder_runs_and_tokens_match_codes() {
        let cfg = tiny_config();
        let dec = VqDecoder::from_tensors(&cfg, &random_weights(&cfg)).unwrap();
        let (b, s) = (2, 3);
        let tokens: Vec<u32> = (0..b * s * s).map(|i| (i * 7 % 10) as u32).collect();
        let img = dec.decode_tokens(&tokens, b, s);
        assert_eq!(img.len(), b * 3 * (2 * s) * (2 * s));
        assert!(img.iter().all(|v| v.is_finite()));
        // decode() re-normalizes its input, so scaled code vectors decode identically.
        let e = cfg.embed_dim;
        let mut z = vec![0.0f32; b * e * s * s];
        for (i, &t) in tokens.iter().enumerate() {
            let (bi, p) = (i / (s * s), i % (s * s));
            for d in 0..e {
                z[(bi * e + d) * s * s + p] = 3.0 * dec.codebook()[t as usize * e + d];
            }
        }
        let img2 = dec.decode(&z, b, s);
        let err = img
            .iter()
            .zip(&img2)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max);
        assert!(err < 1e-4, "{err}");
        // Batch entries decode independently.
        let one = dec.decode_tokens(&tokens[s * s..], 1, s);
        assert_eq!(&img[img.len() / 2..], &one[..]);
    }

    #[test]
    fn pixels_u8_clamp_and_truncate() {
        assert_eq!(
            to_pixels_u8(&[-2.0, -1.0, 0.0, 0.999, 1.0, 5.0, f32::NAN]),
            vec![0, 0, 127, 254, 255, 255, 0]
        );
    }
}
