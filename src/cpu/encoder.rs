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
use crate::score::{EncodedPyramid, quantize, to_planar};

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
