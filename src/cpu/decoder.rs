//! f32 CPU VQ decoder (LlamaGen VQ-16 layout; SPEC.md section 7): code vectors -> pixels,
//! composed from the per-kernel references in [`crate::cpu::ops`].
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
//! are 32 MB per buffer). Activation buffers come from a small per-thread pool and go back to
//! it when a layer is done with them: a fresh allocation that large is a fresh mapping from
//! the kernel, one page fault per 4 KB page on first touch, and that was a third of the
//! decoder's CPU time.

use crate::cpu::ops;
use crate::model::autoenc::{AttnBlock, Conv, GroupNorm, ResBlock};
use crate::model::decoder::DecoderWeights;
use std::cell::RefCell;

/// Buffers kept per thread between layers (a ResBlock holds at most three at once).
const POOL_MAX: usize = 4;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// A buffer of `len` floats from this thread's pool (contents unspecified: every user
/// overwrites all of it), or a new one.
pub(crate) fn take_buf(len: usize) -> Vec<f32> {
    let mut v = POOL.with(|p| {
        let mut p = p.borrow_mut();
        // The smallest buffer that fits, else the largest (grown below).
        let fit = (0..p.len())
            .filter(|&i| p[i].capacity() >= len)
            .min_by_key(|&i| p[i].capacity());
        let pick = fit.or_else(|| (0..p.len()).max_by_key(|&i| p[i].capacity()));
        pick.map(|i| p.swap_remove(i)).unwrap_or_default()
    });
    if v.len() < len {
        v.resize(len, 0.0);
    } else {
        v.truncate(len);
    }
    v
}

/// Give a buffer back to this thread's pool (the smallest is dropped when it is full).
pub(crate) fn recycle(v: Vec<f32>) {
    if v.capacity() == 0 {
        return;
    }
    POOL.with(|p| {
        let mut p = p.borrow_mut();
        p.push(v);
        if p.len() > POOL_MAX {
            let smallest = (0..p.len()).min_by_key(|&i| p[i].capacity()).unwrap();
            p.swap_remove(smallest);
        }
    });
}

/// One image's activations.
pub(crate) struct Act {
    pub(crate) c: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
    pub(crate) data: Vec<f32>, // (C, H, W)
}

impl Act {
    pub(crate) fn hw(&self) -> usize {
        self.h * self.w
    }

    pub(crate) fn with(&self, c: usize, data: Vec<f32>) -> Act {
        Act {
            c,
            h: self.h,
            w: self.w,
            data,
        }
    }
}

impl Conv {
    pub(crate) fn forward(&self, x: &Act) -> Act {
        assert_eq!(x.c, self.cin, "conv: input channels");
        let mut out = take_buf(self.cout * x.hw()); // (Cout, H, W)
        ops::conv2d_into(self, &x.data, x.h, x.w, &mut out);
        x.with(self.cout, out)
    }
}

impl GroupNorm {
    pub(crate) fn forward(&self, x: &Act, silu: bool) -> Act {
        let mut out = take_buf(x.data.len()); // (C, H, W)
        ops::group_norm_into(self, &x.data, x.hw(), silu, &mut out);
        x.with(x.c, out)
    }
}

impl ResBlock {
    /// GN -> SiLU -> conv3x3 -> GN -> SiLU -> conv3x3, plus the input (1x1 `nin_shortcut`
    /// when the channel count changes).
    pub(crate) fn forward(&self, x: Act) -> Act {
        let n1 = self.norm1.forward(&x, true);
        let h1 = self.conv1.forward(&n1);
        recycle(n1.data);
        let n2 = self.norm2.forward(&h1, true);
        recycle(h1.data);
        let mut h = self.conv2.forward(&n2); // (Cout, H, W)
        recycle(n2.data);
        let skip = match &self.nin_shortcut {
            Some(conv) => {
                let s = conv.forward(&x);
                recycle(x.data);
                s
            }
            None => x,
        };
        for (o, s) in h.data.iter_mut().zip(&skip.data) {
            *o += s;
        }
        recycle(skip.data);
        h
    }
}

impl AttnBlock {
    /// Single-head spatial self-attention over all H*W positions, plus the input.
    pub(crate) fn forward(&self, x: Act) -> Act {
        let (c, n) = (x.c, x.hw());
        let hn = self.norm.forward(&x, false);
        let (q, k, v) = (
            self.q.forward(&hn),
            self.k.forward(&hn),
            self.v.forward(&hn),
        ); // (C, N) each
        recycle(hn.data);
        let att = x.with(c, ops::spatial_attention(&q.data, &k.data, &v.data, c, n));
        for t in [q, k, v] {
            recycle(t.data);
        }
        let mut out = self.proj_out.forward(&att);
        for (o, s) in out.data.iter_mut().zip(&x.data) {
            *o += s;
        }
        recycle(x.data);
        out
    }
}

impl DecoderWeights {
    /// Decode code vectors `z` (B, e, s, s) to images (B, 3, s*stride, s*stride), raw range.
    /// Each position is L2-normalized over e first when the config says so.
    pub fn decode(&self, z: &[f32], batch: usize, s: usize) -> Vec<f32> {
        let (e, n) = (self.cfg.embed_dim, s * s);
        assert_eq!(z.len(), batch * e * n, "decode: z must be (B, e, s, s)");
        let side = s * self.cfg.stride();
        let mut out = Vec::with_capacity(batch * 3 * side * side); // (B, 3, side, side)
        for zb in z.chunks_exact(e * n) {
            let zb = if self.cfg.normalize {
                normalize_positions(zb, e, n)
            } else {
                zb.to_vec()
            };
            let img = self.decode_one(zb, s);
            out.extend_from_slice(&img.data);
            recycle(img.data);
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
        let z = ops::gather_codes(&self.codebook, e, tokens, n, self.cfg.normalize);
        let side = s * self.cfg.stride();
        let mut out = Vec::with_capacity(batch * 3 * side * side);
        for zb in z.chunks_exact(e * n) {
            let mut z1 = take_buf(e * n);
            z1.copy_from_slice(zb);
            let img = self.decode_one(z1, s);
            out.extend_from_slice(&img.data);
            recycle(img.data);
        }
        out
    }

    /// Decode one image's normalized codes (e, s, s) to (3, s*stride, s*stride).
    fn decode_one(&self, z: Vec<f32>, s: usize) -> Act {
        let x = Act {
            c: self.cfg.embed_dim,
            h: s,
            w: s,
            data: z,
        };
        let z = self.post_quant_conv.forward(&x); // (z_ch, s, s)
        recycle(x.data);
        let mut x = self.conv_in.forward(&z); // (ch*ch_mult[-1], s, s)
        recycle(z.data);
        x = self.mid.0.forward(x);
        x = self.mid.1.forward(x);
        x = self.mid.2.forward(x);
        for level in &self.levels {
            x = res_attn_blocks(&level.res, &level.attn, x);
            if let Some(up) = &level.upsample {
                let u = upsample_nearest2(&x);
                recycle(std::mem::take(&mut x.data));
                x = up.forward(&u);
                recycle(u.data);
            }
        }
        let n = self.norm_out.forward(&x, true);
        recycle(x.data);
        let out = self.conv_out.forward(&n); // (3, s*stride, s*stride)
        recycle(n.data);
        out
    }
}

/// L2-normalize over e at each position of one image's (e, n) codes (F.normalize, eps 1e-12):
/// transpose to (n, e) rows and back.
/// A level's ResBlocks, each followed by the level's AttnBlock of the same index if it has
/// one (the decoder's and the encoder's level layout).
pub(crate) fn res_attn_blocks(res: &[ResBlock], attn: &[AttnBlock], mut x: Act) -> Act {
    for (j, r) in res.iter().enumerate() {
        x = r.forward(x);
        if let Some(a) = attn.get(j) {
            x = a.forward(x);
        }
    }
    x
}

pub(crate) fn normalize_positions(z: &[f32], e: usize, n: usize) -> Vec<f32> {
    let mut t: Vec<f32> = (0..n * e).map(|i| z[(i % e) * n + i / e]).collect(); // (n, e)
    crate::math::normalize_rows(&mut t, e);
    (0..e * n).map(|i| t[(i % n) * e + i / n]).collect()
}

fn upsample_nearest2(x: &Act) -> Act {
    let mut data = take_buf(4 * x.data.len()); // (C, 2H, 2W)
    ops::upsample_nearest2_into(&x.data, x.c, x.h, x.w, &mut data);
    Act {
        c: x.c,
        h: 2 * x.h,
        w: 2 * x.w,
        data,
    }
}

/// Raw decoder output to 8-bit (see [`ops::pixels`]).
pub fn to_pixels_u8(img: &[f32]) -> Vec<u8> {
    ops::pixels(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::autoenc::CODEBOOK;
    use crate::model::config::DecoderConfig;
    use crate::model::file::{Tensor, TensorMap};

    /// The largest |a - b| (NaNs are passed over, as f32::max does).
    fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f32::max)
    }

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
        crate::model::init::random_decoder_tensors(cfg, 1)
    }

    #[test]
    fn expected_tensors_cover_the_tiny_layout() {
        let names: Vec<String> = DecoderWeights::expected_tensors(&tiny_config())
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
        let err = DecoderWeights::from_tensors(&cfg, &map)
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
        let err = DecoderWeights::from_tensors(&cfg, &map)
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
        let err = DecoderWeights::from_tensors(&cfg, &TensorMap::new())
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
            let got = ops::decoder::conv2d_banded(&conv, &x.data, x.h, x.w, budget);
            let err = max_abs_diff(&got, &want);
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
        let dec = DecoderWeights::from_tensors(&cfg, &random_weights(&cfg)).unwrap();
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
        let err = max_abs_diff(&img, &img2);
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
