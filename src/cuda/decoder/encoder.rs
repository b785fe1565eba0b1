//! The VQ encoder on the GPU (SPEC.md section 9), the mirror of [`GpuDecoder`](super::GpuDecoder)
//! and of the f32 reference `cpu::encoder`, on the decoder's kernels and launchers:
//!
//! ```text
//! image (B, H, W, 3) T (host: 8-bit -> [-1, 1], bilinear resize per scale)
//!   -> conv_in 3x3 (direct: Cin 3)                                        x (B, H, W, ch) T
//!   -> conv_blocks.0 .. L-1: ResBlocks (+ AttnBlock each, last level only), then, except
//!      on the last level, conv3x3_down (zero-pad right/bottom, stride 2)
//!   -> mid: Res, Attn, Res -> conv_out 3x3 (GroupNorm + SiLU in its loader) -> quant_conv 1x1
//!   -> z (B, h*w, e) f32, read back; host: L2-normalize over e, nearest codebook row
//! ```
//! Storage: every activation in `T` (the decoder's dataflow: GroupNorm statistics from the
//! producing conv, applied in the consuming conv's loader), weights in `T`, accumulation f32.
//! The quantization runs on the host (`score::quantize`, f64 distances, lowest
//! index on a tie) from the device's f32 z, so a code can differ from the CPU's only where the
//! two nearest codebook rows are closer than the error of z:
//! * `T = f32` (the default, "exact"): every kernel in f32 (direct convs, no tensor cores;
//!   cuBLAS in FP32), z within ~1e-6 of the CPU's: codes equal unless the nearest two rows
//!   are within ~1e-6 (the golden photos' closest cell has a gap of 4.9e-5).
//! * `T = f16` / `bf16`: the decoder's tensor-core kernels, z within ~2e-3 / ~2e-2 of the
//!   CPU's; a golden cell with a 4.9e-5 gap already flips under fp16 (tests/gpu_encoder.rs
//!   prints the counts and the smallest gaps). For throughput where exact codes do not matter.

use super::blocks::{Acts, ActsPlan, StreamConv, Trunk, upload_trunk};
use super::launch::*;
use super::weights::{ConvKernel, ConvWeights, Storage};
use crate::cpu::ops;
use crate::cuda::{DevBuf, Gpu};
use crate::model::config::DecoderConfig;
use crate::model::encoder::EncoderWeights;
use crate::score::{EncodedPyramid, quantize, to_planar};
use anyhow::{Context, Result, ensure};
use std::sync::Mutex;

/// Device buffers for up to `batch` images of up to `side` x `side` (every buffer is sized by
/// the largest activation, so smaller sides reuse it: a pyramid allocates once).
struct Workspace<T: Storage> {
    batch: usize,
    side: usize,
    a: Acts<T>,     // (the image goes into a.t)
    z: DevBuf<f32>, // (B, h*w, e) quant_conv output
}

/// Largest per-image activation (elements), largest channel count and the last level's
/// (side, channels) of the encoder on a `side` x `side` image.
fn plan(cfg: &DecoderConfig, side: usize) -> (usize, usize, usize, usize) {
    let mut r = side;
    let mut c = cfg.ch;
    let mut max_act = side * side * 3.max(c);
    let mut max_c = c.max(cfg.z_channels);
    for (i, &m) in cfg.ch_mult.iter().enumerate() {
        c = cfg.ch * m;
        max_c = max_c.max(c);
        max_act = max_act.max(r * r * c);
        if i + 1 < cfg.ch_mult.len() {
            r /= 2;
        }
    }
    max_act = max_act.max(r * r * cfg.z_channels);
    (max_act, max_c, r, c)
}

impl<T: Storage> Workspace<T> {
    fn new(gpu: &Gpu, cfg: &DecoderConfig, batch: usize, side: usize) -> Result<Workspace<T>> {
        let (max_act, max_c, r, c_last) = plan(cfg, side);
        Ok(Workspace {
            batch,
            side,
            a: Acts::new(
                gpu,
                batch,
                &ActsPlan {
                    max_act,
                    t: 3 * side * side,
                    f: 0,
                    max_hw: side * side,
                    max_c,
                    attn_n: r * r,
                    attn_c: c_last,
                },
            )?,
            z: gpu.alloc(batch * r * r * cfg.embed_dim)?,
        })
    }
}

/// The VQ encoder (+ quant_conv) on the GPU with storage `T` (f32 by default: see the module
/// comment): weights uploaded once, buffers allocated on the first encode of each (batch,
/// side) and reused.
pub struct GpuEncoder<T: Storage = f32> {
    cfg: DecoderConfig,
    conv_kernel: ConvKernel,
    trunk: Trunk<T>,
    quant_conv: ConvWeights<T>,
    ws: Mutex<Option<Workspace<T>>>,
}

impl<T: Storage> GpuEncoder<T> {
    /// Upload the weights of a loaded CPU encoder.
    pub fn new(gpu: &Gpu, enc: &EncoderWeights) -> Result<GpuEncoder<T>> {
        Ok(GpuEncoder {
            cfg: enc.cfg.clone(),
            conv_kernel: ConvKernel::TensorCore,
            trunk: upload_trunk!(gpu, enc, downsample).context("uploading the encoder")?,
            quant_conv: ConvWeights::from_host(gpu, &enc.quant_conv)?,
            ws: Mutex::new(None),
        })
    }

    /// The storage type's name: `f32`, `f16` or `bf16`.
    pub fn storage(&self) -> &'static str {
        T::TAG
    }

    pub fn config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// Choose the 3x3 conv kernels (tests run both; the default is `TensorCore`, which with
    /// f32 storage means the direct kernels).
    pub fn set_conv_kernel(&mut self, k: ConvKernel) {
        self.conv_kernel = k;
    }

    /// Encode `batch` images `x (B, 3, side, side)` (values in [-1, 1], side a multiple of the
    /// stride) to `(B, e, side/stride, side/stride)` code vectors, L2-normalized over e when
    /// the config says so: per image the layout of `EncoderWeights::encode_one`.
    pub fn encode(&self, gpu: &Gpu, x: &[f32], batch: usize, side: usize) -> Result<Vec<f32>> {
        let stride = self.cfg.stride();
        ensure!(
            batch > 0 && side > 0 && side.is_multiple_of(stride),
            "encode: image side {side} must be a positive multiple of the stride {stride}"
        );
        ensure!(
            x.len() == batch * 3 * side * side,
            "encode: {} values for (B {batch}, 3, {side}, {side})",
            x.len()
        );
        let hw = side * side;
        let mut nhwc = vec![T::default(); x.len()]; // (B, H, W, 3)
        for (b, img) in x.chunks_exact(3 * hw).enumerate() {
            for (c, plane) in img.chunks_exact(hw).enumerate() {
                for (p, &v) in plane.iter().enumerate() {
                    nhwc[(b * hw + p) * 3 + c] = T::from_f32(v);
                }
            }
        }
        let mut guard = self.ws.lock().unwrap();
        if !guard
            .as_ref()
            .is_some_and(|w| w.batch >= batch && w.side >= side)
        {
            *guard = None; // free the old buffers first
            *guard = Some(
                Workspace::new(gpu, &self.cfg, batch, side).with_context(|| {
                    format!("allocating encoder buffers for batch {batch}, side {side}")
                })?,
            );
        }
        let ws = guard.as_mut().unwrap();
        gpu.upload_into(&nhwc, &mut ws.a.t, 0)
            .context("uploading images")?;
        self.run(gpu, ws, batch, side)?;
        let s = side / stride;
        let (n, e) = (s * s, self.cfg.embed_dim);
        let mut z = gpu.download_range(&ws.z, 0..batch * n * e)?; // (B, n, e)
        if self.cfg.normalize {
            crate::math::normalize_rows(&mut z, e);
        }
        let mut out = vec![0.0f32; z.len()]; // (B, e, n)
        for (b, img) in z.chunks_exact(n * e).enumerate() {
            for (p, row) in img.chunks_exact(e).enumerate() {
                for (c, &v) in row.iter().enumerate() {
                    out[(b * e + c) * n + p] = v;
                }
            }
        }
        Ok(out)
    }

    /// [`EncoderWeights::encode_pyramid`] for `batch` 8-bit RGB images `(B, side, side, 3)`:
    /// per scale s, `z (B, e, s, s)` and `codes (B, s, s)` (the CPU's per-image layout with the
    /// images one after another). The resize and the quantization run on the host.
    pub fn encode_pyramid(
        &self,
        gpu: &Gpu,
        rgb: &[u8],
        batch: usize,
        side: usize,
        scales: &[usize],
        codebook: &[f32],
    ) -> Result<EncodedPyramid> {
        ensure!(
            rgb.len() == batch * side * side * 3,
            "encode: {} bytes for {batch} images of (H {side}, W {side}, 3)",
            rgb.len()
        );
        let (stride, e) = (self.cfg.stride(), self.cfg.embed_dim);
        ensure!(
            codebook.len() == self.cfg.n_embed * e,
            "encode: codebook of {} values, not ({}, {e})",
            codebook.len(),
            self.cfg.n_embed
        );
        let imgs: Vec<f32> = rgb
            .chunks_exact(side * side * 3)
            .flat_map(|img| to_planar(img, side))
            .collect(); // (B, 3, side, side)
        let (mut zs, mut codes) = (Vec::new(), Vec::new());
        // The largest scale first: its workspace then serves every smaller one.
        for &s in scales.iter().rev() {
            let px = stride * s;
            let x = ops::upsample_bilinear(&imgs, batch, 3, side, px);
            let z = self.encode(gpu, &x, batch, px)?;
            let n = s * s;
            codes.push(
                z.chunks_exact(e * n)
                    .flat_map(|zi| quantize(zi, e, n, codebook))
                    .collect(),
            );
            zs.push(z);
        }
        zs.reverse();
        codes.reverse();
        Ok(EncodedPyramid { z: zs, codes })
    }

    /// The encoder on the `b` images of `side` x `side` uploaded into the workspace (`ws.a.t`).
    fn run(&self, gpu: &Gpu, ws: &mut Workspace<T>, b: usize, side: usize) -> Result<()> {
        let k = self.conv_kernel;
        let mut hgt = side;
        let a = &mut ws.a;
        a.stream_conv(gpu, k, &self.trunk.conv_in, StreamConv::In, b, hgt)
            .context("conv_in")?;
        for (i, level) in self.trunk.levels.iter().enumerate() {
            let name = format!("conv_blocks.{i}");
            a.level_blocks(gpu, k, level, b, hgt, &name)?;
            if let Some(down) = &level.resample {
                hgt /= 2;
                a.stream_conv(gpu, k, down, StreamConv::Resample(Resample::Down), b, hgt)
                    .with_context(|| format!("{name}.downsample"))?;
            }
        }
        a.mid(gpu, k, &self.trunk.mid, b, hgt)?;
        let hw = hgt * hgt;
        // conv_out into h (T), read by quant_conv.
        let (x, gn, h) = (&a.x[a.cur], &mut a.gn, &mut a.h);
        self.trunk.norm_out_conv_out(gpu, k, x, gn, h, b, hgt)?;
        let z = Conv1x1Out::F32 {
            y: &mut ws.z,
            accumulate: false,
        };
        conv1x1(gpu, &self.quant_conv, &a.h, b * hw, z).context("quant_conv")
    }
}
