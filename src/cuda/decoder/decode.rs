//! [`GpuDecoder`]: the VQ decoder on the device (the layer order of `cpu::decoder`), its
//! workspaces and decode buffers, and how a batch is split into passes.

use super::blocks::{Acts, ActsPlan, StreamConv, Trunk, upload_trunk};
use super::launch::*;
use super::weights::{ConvKernel, ConvWeights, Storage, StorageDtype};
use crate::cuda::embed::Codebook;
use crate::cuda::{DevBuf, DevElem, Gpu};
use crate::model::config::DecoderConfig;
use crate::model::decoder::DecoderWeights;
use anyhow::{Context, Result, ensure};
use half::{bf16, f16};
use std::sync::Mutex;

/// Device buffers for one (batch, s); see the module comment for what flows through them.
/// The batch is decoded in equal passes of at most `chunk` images (one pass when it fits the
/// kernels' int32 indexing and the memory, `GpuDecoder::max_batch`): tokens and pixels are
/// the whole batch's, codes and activations one pass's, so every batch decodes in one launch
/// sequence (inside the sampler's graph) on one workspace.
struct Workspace<T: Storage> {
    batch: usize,
    chunk: usize,
    s: usize,
    side: usize,
    tokens: DevBuf<i32>, // (B, s, s)
    z: DevBuf<T>,        // (chunk*s*s, e)
    a: Acts<T>,          // chunk images'
    img: DevBuf<f32>,    // (B, 3, side, side)
    px: DevBuf<u8>,      // (B, 3, side, side)
}

/// [`GpuDecoder::max_batch`] for a decoder configuration.
pub fn max_pass(cfg: &DecoderConfig, s: usize, free_bytes: Option<usize>) -> usize {
    let (max_act, _, _) = cfg.activation_plan(s);
    let by_index = i32::MAX as usize / max_act.max(1);
    let per_image = cfg.workspace_bytes_per_image(s) as usize;
    let by_memory = free_bytes.map_or(usize::MAX, |f| f / 2 / per_image.max(1));
    by_index.min(by_memory).max(1)
}

/// Images per pass when `batch` images are decoded in passes of at most `max`: the fewest
/// passes, all of equal size but the last (which may be smaller by less than one per pass).
pub fn equal_passes(batch: usize, max: usize) -> usize {
    let passes = batch.div_ceil(max.max(1)).max(1);
    batch.div_ceil(passes).max(1)
}

impl<T: Storage> Workspace<T> {
    fn new(
        gpu: &Gpu,
        cfg: &DecoderConfig,
        batch: usize,
        s: usize,
        chunk: usize,
    ) -> Result<Workspace<T>> {
        let (max_act, max_hw, max_c) = cfg.activation_plan(s);
        let n = s * s;
        let side = s * cfg.stride();
        let c_last = cfg.ch * cfg.ch_mult[cfg.ch_mult.len() - 1];
        let chunk = chunk.clamp(1, batch.max(1));
        let plan = ActsPlan {
            max_act,
            t: n * cfg.z_channels,
            f: (n * cfg.z_channels).max(3 * side * side),
            max_hw,
            max_c,
            attn_n: n,
            attn_c: c_last,
        };
        Ok(Workspace {
            batch,
            chunk,
            s,
            side,
            tokens: gpu.alloc(batch * n)?,
            z: gpu.alloc(chunk * n * cfg.embed_dim)?,
            a: Acts::new(gpu, chunk, &plan)?,
            img: gpu.alloc(batch * 3 * side * side)?,
            px: gpu.alloc(batch * 3 * side * side)?,
        })
    }
}

/// The VQ decoder on the GPU: weights uploaded once (16-bit convs, f32 biases, norms and
/// codebook), buffers allocated on the first decode of each (batch, s) and reused.
pub struct GpuDecoder {
    inner: Inner,
}

enum Inner {
    F16(Decoder<f16>),
    Bf16(Decoder<bf16>),
}

/// `dispatch!(self, d => expr)`: run `expr` with `d` the typed decoder.
macro_rules! dispatch {
    ($self:expr, $d:ident => $e:expr) => {
        match $self {
            Inner::F16($d) => $e,
            Inner::Bf16($d) => $e,
        }
    };
}

impl GpuDecoder {
    /// Upload the weights of a loaded CPU decoder, fp16 storage.
    pub fn new(gpu: &Gpu, dec: &DecoderWeights) -> Result<GpuDecoder> {
        GpuDecoder::with_dtype(gpu, dec, StorageDtype::F16)
    }

    /// Upload the weights of a loaded CPU decoder with the given 16-bit storage.
    pub fn with_dtype(gpu: &Gpu, dec: &DecoderWeights, dtype: StorageDtype) -> Result<GpuDecoder> {
        let inner = match dtype {
            StorageDtype::F16 => Inner::F16(Decoder::new(gpu, dec)?),
            StorageDtype::Bf16 => Inner::Bf16(Decoder::new(gpu, dec)?),
        };
        Ok(GpuDecoder { inner })
    }

    pub fn dtype(&self) -> StorageDtype {
        match self.inner {
            Inner::F16(_) => StorageDtype::F16,
            Inner::Bf16(_) => StorageDtype::Bf16,
        }
    }

    pub fn config(&self) -> &DecoderConfig {
        dispatch!(&self.inner, d => &d.cfg)
    }

    /// The most images one pass of a decode of an s x s latent takes: the kernels index a
    /// pass's activations (B x H x W x C at the widest level) with int32, and the workspace
    /// should take at most half of `free_bytes` (device memory free now, when known). Larger
    /// batches are decoded in equal passes ([`GpuDecoder::chunk`]) on one workspace.
    pub fn max_batch(&self, s: usize, free_bytes: Option<usize>) -> usize {
        max_pass(self.config(), s, free_bytes)
    }

    /// Images per pass when `batch` images of an s x s latent are decoded: the fewest equal
    /// passes within [`GpuDecoder::max_batch`] (free memory now) and `limit` (tests).
    pub fn chunk(&self, gpu: &Gpu, batch: usize, s: usize, limit: Option<usize>) -> usize {
        let free = gpu.mem_get_info().ok().map(|(free, _)| free);
        let max = self.max_batch(s, free).min(limit.unwrap_or(usize::MAX));
        equal_passes(batch, max)
    }

    pub fn conv_kernel(&self) -> ConvKernel {
        dispatch!(&self.inner, d => d.conv_kernel)
    }

    /// Choose the 3x3 conv kernel (tests run both; the default is `TensorCore`).
    pub fn set_conv_kernel(&mut self, k: ConvKernel) {
        dispatch!(&mut self.inner, d => d.conv_kernel = k)
    }

    /// Image side for an s x s latent.
    pub fn side(&self, s: usize) -> usize {
        s * self.config().stride()
    }

    /// Decode host tokens (B, s, s) (raster order per image) and read back `P`: with `u8` the
    /// 8-bit pixels (B, 3, H, W), with `f32` the raw images (B, 3, H, W) (the CPU decoder's
    /// output).
    pub fn decode_tokens<P: Readback>(
        &self,
        gpu: &Gpu,
        tokens: &[u32],
        batch: usize,
        s: usize,
    ) -> Result<Vec<P>> {
        ensure!(
            tokens.len() == batch * s * s,
            "decode: {} tokens for (B {batch}, {s}, {s})",
            tokens.len()
        );
        let n_embed = self.config().n_embed;
        if let Some(t) = tokens.iter().find(|&&t| t as usize >= n_embed) {
            anyhow::bail!("decode: token {t} out of range (codebook size {n_embed})");
        }
        let host: Vec<i32> = tokens.iter().map(|&t| t as i32).collect();
        let chunk = || self.chunk(gpu, batch, s, None);
        dispatch!(&self.inner, d => {
            let mut guard = d.ws.lock().unwrap();
            let ws = d.workspace(gpu, &mut guard, batch, s, chunk)?;
            gpu.upload_into(&host, &mut ws.tokens, 0)
                .context("uploading tokens")?;
            d.run(gpu, ws, None)?;
            gpu.download(P::of(&ws.px, &ws.img))
        })
    }

    /// Decode device tokens (B, s, s) i32; with `read`, download the 8-bit pixels (B, 3, H, W),
    /// otherwise only enqueue the work (benchmarks). Tokens are not range checked on the host:
    /// an out-of-range token decodes to NaN, hence 0-valued pixels.
    pub fn decode_device(
        &self,
        gpu: &Gpu,
        tokens: &DevBuf<i32>,
        batch: usize,
        s: usize,
        read: bool,
    ) -> Result<Option<Vec<u8>>> {
        let chunk = || self.chunk(gpu, batch, s, None);
        dispatch!(&self.inner, d => {
            let mut guard = d.ws.lock().unwrap();
            let ws = d.workspace(gpu, &mut guard, batch, s, chunk)?;
            d.run(gpu, ws, Some(tokens))?;
            read.then(|| gpu.download(&ws.px)).transpose()
        })
    }
}

/// Decoder buffers for one (batch, s) that the caller owns: a CUDA graph that decodes into
/// them ([`GpuDecoder::decode_into`]) stays valid exactly as long as they live, whatever
/// other shapes the decoder's own workspace is reallocated for.
pub struct DecodeBuffers {
    inner: BufInner,
}

enum BufInner {
    F16(Workspace<f16>),
    Bf16(Workspace<bf16>),
}

impl DecodeBuffers {
    /// Whether these buffers are for `batch` images of an s x s latent.
    pub fn fits(&self, batch: usize, s: usize) -> bool {
        let (b, ws) = match &self.inner {
            BufInner::F16(w) => (w.batch, w.s),
            BufInner::Bf16(w) => (w.batch, w.s),
        };
        (b, ws) == (batch, s)
    }

    /// Images per pass of a decode into these buffers.
    pub fn chunk(&self) -> usize {
        match &self.inner {
            BufInner::F16(w) => w.chunk,
            BufInner::Bf16(w) => w.chunk,
        }
    }

    /// The 8-bit pixels (B, 3, H, W) of the last decode into these buffers.
    pub fn pixels(&self) -> &DevBuf<u8> {
        match &self.inner {
            BufInner::F16(w) => &w.px,
            BufInner::Bf16(w) => &w.px,
        }
    }
}

impl GpuDecoder {
    /// Buffers for decodes of `batch` images of an s x s latent (see [`DecodeBuffers`]), in
    /// passes of [`GpuDecoder::chunk`] images (`limit`: at most that many, for tests).
    pub fn buffers(
        &self,
        gpu: &Gpu,
        batch: usize,
        s: usize,
        limit: Option<usize>,
    ) -> Result<DecodeBuffers> {
        ensure!(batch > 0 && s > 0, "decode: empty batch or latent");
        let ctx = || format!("allocating decoder buffers for batch {batch}, s {s}");
        let chunk = self.chunk(gpu, batch, s, limit);
        let inner = match &self.inner {
            Inner::F16(d) => {
                BufInner::F16(Workspace::new(gpu, &d.cfg, batch, s, chunk).with_context(ctx)?)
            }
            Inner::Bf16(d) => {
                BufInner::Bf16(Workspace::new(gpu, &d.cfg, batch, s, chunk).with_context(ctx)?)
            }
        };
        Ok(DecodeBuffers { inner })
    }

    /// Enqueue the decode of device tokens (B, s, s) i32 into `bufs` (for B and s the buffers
    /// were made for); nothing is read back, nothing is allocated (graph-capturable). The
    /// pixels are then in [`DecodeBuffers::pixels`].
    pub fn decode_into(
        &self,
        gpu: &Gpu,
        bufs: &mut DecodeBuffers,
        tokens: &DevBuf<i32>,
    ) -> Result<()> {
        match (&self.inner, &mut bufs.inner) {
            (Inner::F16(d), BufInner::F16(ws)) => d.run(gpu, ws, Some(tokens)),
            (Inner::Bf16(d), BufInner::Bf16(ws)) => d.run(gpu, ws, Some(tokens)),
            _ => anyhow::bail!("decoder buffers of the other 16-bit storage"),
        }
    }
}

/// What a host-token decode reads back: 8-bit pixels (`u8`) or raw f32 images (`f32`).
pub trait Readback: DevElem {
    /// The workspace buffer that holds this output.
    fn of<'a>(px: &'a DevBuf<u8>, img: &'a DevBuf<f32>) -> &'a DevBuf<Self>;
}

impl Readback for u8 {
    fn of<'a>(px: &'a DevBuf<u8>, _: &'a DevBuf<f32>) -> &'a DevBuf<u8> {
        px
    }
}

impl Readback for f32 {
    fn of<'a>(_: &'a DevBuf<u8>, img: &'a DevBuf<f32>) -> &'a DevBuf<f32> {
        img
    }
}

/// The decoder for one storage type.
struct Decoder<T: Storage> {
    cfg: DecoderConfig,
    conv_kernel: ConvKernel,
    codebook: DevBuf<f32>, // (V, e), as in the CPU decoder (rows normalized when `normalize`)
    post_quant_conv: ConvWeights<T>,
    trunk: Trunk<T>,
    ws: Mutex<Option<Workspace<T>>>,
}

impl<T: Storage> Decoder<T> {
    fn new(gpu: &Gpu, dec: &DecoderWeights) -> Result<Decoder<T>> {
        let trunk = upload_trunk!(gpu, dec, upsample).context("uploading the decoder")?;
        Ok(Decoder {
            cfg: dec.cfg.clone(),
            conv_kernel: ConvKernel::TensorCore,
            codebook: gpu.upload(&dec.codebook)?,
            post_quant_conv: ConvWeights::from_host(gpu, &dec.post_quant_conv)?,
            trunk,
            ws: Mutex::new(None),
        })
    }

    fn workspace<'a>(
        &self,
        gpu: &Gpu,
        slot: &'a mut Option<Workspace<T>>,
        batch: usize,
        s: usize,
        chunk: impl FnOnce() -> usize,
    ) -> Result<&'a mut Workspace<T>> {
        ensure!(batch > 0 && s > 0, "decode: empty batch or latent");
        if slot.as_ref().is_some_and(|w| w.batch == batch && w.s == s) {
            return Ok(slot.as_mut().unwrap());
        }
        *slot = None; // free the old buffers first (the free memory then decides the passes)
        let ws = Workspace::new(gpu, &self.cfg, batch, s, chunk())
            .with_context(|| format!("allocating decoder buffers for batch {batch}, s {s}"))?;
        Ok(slot.insert(ws))
    }

    /// The whole decoder on `tokens` (or the workspace's uploaded tokens), in equal passes
    /// of `ws.chunk` images (one launch sequence either way).
    fn run(&self, gpu: &Gpu, ws: &mut Workspace<T>, tokens: Option<&DevBuf<i32>>) -> Result<()> {
        let (batch, chunk, s) = (ws.batch, ws.chunk, ws.s);
        let n = s * s;
        let tok = tokens.unwrap_or(&ws.tokens);
        ensure!(
            tok.len() >= batch * n,
            "decode: token buffer shorter than B*s*s"
        );
        let mut first = 0;
        while first < batch {
            let b = chunk.min(batch - first);
            self.pass(gpu, ws, tokens, first, b)?;
            first += b;
        }
        Ok(())
    }

    /// One pass: images `first .. first + b` of the batch.
    fn pass(
        &self,
        gpu: &Gpu,
        ws: &mut Workspace<T>,
        tokens: Option<&DevBuf<i32>>,
        first: usize,
        b: usize,
    ) -> Result<()> {
        let cfg = &self.cfg;
        let (s, k) = (ws.s, self.conv_kernel);
        let n = s * s;
        let tok = tokens.unwrap_or(&ws.tokens);
        let codebook = Codebook {
            vectors: &self.codebook,
            e: cfg.embed_dim,
        };
        let z = &mut ws.z;
        gather_codes(
            gpu,
            tok,
            first * n,
            codebook,
            cfg.n_embed,
            cfg.normalize,
            z,
            b * n,
        )?;
        let a = &mut ws.a;
        let post_quant = Conv1x1Out::Cast {
            tmp: &mut a.f,
            y: &mut a.t,
            residual: false,
        };
        conv1x1(gpu, &self.post_quant_conv, &ws.z, b * n, post_quant).context("post_quant_conv")?;
        a.stream_conv(gpu, k, &self.trunk.conv_in, StreamConv::In, b, s)
            .context("conv_in")?;
        let mut hgt = s;
        a.mid(gpu, k, &self.trunk.mid, b, hgt)?;
        for (i, level) in self.trunk.levels.iter().enumerate() {
            let name = format!("conv_blocks.{i}");
            a.level_blocks(gpu, k, level, b, hgt, &name)?;
            if let Some(up) = &level.resample {
                hgt *= 2;
                a.stream_conv(gpu, k, up, StreamConv::Resample(Resample::Up), b, hgt)
                    .with_context(|| format!("{name}.upsample"))?;
            }
        }
        debug_assert_eq!(hgt, ws.side);
        let hw = hgt * hgt;
        // conv_out writes f32 for the pixels.
        let (x, gn, f) = (&a.x[a.cur], &mut a.gn, &mut a.f);
        self.trunk.norm_out_conv_out(gpu, k, x, gn, f, b, hgt)?;
        let off = first * 3 * hw;
        pixels(
            gpu,
            &ws.a.f,
            Some(&mut ws.img),
            Some(&mut ws.px),
            off,
            b,
            hw,
            3,
        )
    }
}
