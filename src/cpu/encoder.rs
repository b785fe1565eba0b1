//! f32 CPU VQ encoder (LlamaGen VQ-16 layout; SPEC.md section 9) and the pyramid encoding of
//! real images, composed from the per-kernel references in [`crate::cpu::ops`]:
//!
//! ```text
//! image (3, H, W) in [-1, 1] -> conv_in 3x3 (3 -> ch)
//!   -> conv_blocks.0 .. conv_blocks.{L-1}: num_res_blocks ResBlocks (each followed by an
//!      AttnBlock on the last level only), then, except on the last level, zero-pad right and
//!      bottom by 1 + conv 3x3 stride 2
//!   -> mid: Res, Attn, Res -> GroupNorm + SiLU -> conv_out 3x3 (-> z_ch)
//!   -> quant_conv 1x1 (z_ch -> e) -> L2-normalize over e (config normalize)
//! ```
//!
//! Pyramid codes: per scale s, the image resized to 16*s px (bilinear, align_corners = false,
//! no antialias: [`ops::upsample_bilinear`], PyTorch's CPU kernel), encoded, and each cell
//! quantized to the nearest normalized codebook row (lowest index on a tie).

use super::decoder::{Act, normalize_positions, recycle, res_attn_blocks};
use crate::cpu::ops;
use crate::model::encoder::EncoderWeights;
use rayon::prelude::*;

/// One image's encoding at every scale of a pyramid (`cuda::decoder::GpuEncoder` fills it
/// for a batch: the images' layouts one after another).
pub struct EncodedPyramid {
    /// Per scale: (e, s, s) normalized code vectors (before quantization).
    pub z: Vec<Vec<f32>>,
    /// Per scale: (s, s) raster code ids.
    pub codes: Vec<Vec<u32>>,
}

impl EncoderWeights {
    /// Encode one image `x (3, H, W)` (values in [-1, 1], H and W multiples of the stride) to
    /// `(e, H/stride, W/stride)` code vectors, L2-normalized over e when the config says so.
    pub fn encode_one(&self, x: &[f32], h: usize, w: usize) -> Vec<f32> {
        let input = Act {
            c: 3,
            h,
            w,
            data: x.to_vec(),
        };
        let mut x = self.conv_in.forward(&input);
        for level in &self.levels {
            x = res_attn_blocks(&level.res, &level.attn, x);
            if let Some(down) = &level.downsample {
                let y = Act {
                    c: down.cout,
                    h: x.h / 2,
                    w: x.w / 2,
                    data: ops::conv2d_down(down, &x.data, x.h, x.w),
                };
                recycle(std::mem::replace(&mut x, y).data);
            }
        }
        x = self.mid.0.forward(x);
        x = self.mid.1.forward(x);
        x = self.mid.2.forward(x);
        let n = self.norm_out.forward(&x, true);
        recycle(x.data);
        let x = self.conv_out.forward(&n);
        recycle(n.data);
        let z = self.quant_conv.forward(&x); // (e, h, w)
        recycle(x.data);
        if self.cfg.normalize {
            normalize_positions(&z.data, z.c, z.hw())
        } else {
            z.data
        }
    }

    /// Encode one 8-bit RGB image `(H, W, 3)` (H = W = `side`) at every scale of `scales`:
    /// to float by (x / 255 - 0.5) / 0.5, resized to stride*s px per scale, encoded and
    /// quantized against `codebook (V, e)` (normalized rows).
    pub fn encode_pyramid(
        &self,
        rgb: &[u8],
        side: usize,
        scales: &[usize],
        codebook: &[f32],
    ) -> EncodedPyramid {
        assert_eq!(
            rgb.len(),
            side * side * 3,
            "encode: image must be (H, W, 3)"
        );
        let img = to_planar(rgb, side);
        let stride = self.cfg.stride();
        let e = self.cfg.embed_dim;
        let (mut zs, mut codes) = (Vec::new(), Vec::new());
        for &s in scales {
            let px = stride * s;
            let x = ops::upsample_bilinear(&img, 1, 3, side, px);
            let z = self.encode_one(&x, px, px);
            codes.push(quantize(&z, e, s * s, codebook));
            zs.push(z);
        }
        EncodedPyramid { z: zs, codes }
    }
}

/// One 8-bit RGB image `(H, W, 3)` (H = W = `side`) to float `(3, H, W)` by (x / 255 - 0.5) / 0.5.
pub fn to_planar(rgb: &[u8], side: usize) -> Vec<f32> {
    let n = side * side;
    assert_eq!(rgb.len(), 3 * n, "encode: image must be (H, W, 3)");
    let mut img = vec![0.0f32; 3 * n]; // (3, H, W)
    for (p, px) in rgb.chunks_exact(3).enumerate() {
        for c in 0..3 {
            img[c * n + p] = (px[c] as f32 / 255.0 - 0.5) / 0.5;
        }
    }
    img
}

/// Nearest codebook row (Euclidean distance, f64, lowest index on a tie) of each of the `n`
/// cells of `z (e, n)`.
pub fn quantize(z: &[f32], e: usize, n: usize, codebook: &[f32]) -> Vec<u32> {
    assert_eq!(z.len(), e * n);
    (0..n)
        .into_par_iter()
        .map(|p| {
            let mut best = (f64::INFINITY, 0u32);
            for (i, row) in codebook.chunks_exact(e).enumerate() {
                let d: f64 = row
                    .iter()
                    .enumerate()
                    .map(|(c, &v)| (z[c * n + p] as f64 - v as f64).powi(2))
                    .sum();
                if d < best.0 {
                    best = (d, i as u32);
                }
            }
            best.1
        })
        .collect()
}
