//! The blocks the GPU decoder and encoder share: ResBlocks, resolution levels and the
//! [`Trunk`] of layers both have, built from the host weights (norm_out + conv_out run from
//! the trunk), and [`Acts`], the activation buffers with the layer sequences run on them
//! (ResBlock, AttnBlock, a level's blocks, mid, and the convs that write the stream: conv_in
//! and the resampling convs).

use super::launch::*;
use super::weights::{AttnWeights, ConvKernel, ConvWeights, GnWeights, Storage};
use crate::cuda::{DevBuf, Gpu};
use crate::model::autoenc::{self as host};
use anyhow::{Context, Result, ensure};

pub(super) struct GpuResBlock<T: Storage> {
    pub(super) norm1: GnWeights,
    pub(super) conv1: ConvWeights<T>,
    pub(super) norm2: GnWeights,
    pub(super) conv2: ConvWeights<T>,
    pub(super) nin_shortcut: Option<ConvWeights<T>>,
}

impl<T: Storage> GpuResBlock<T> {
    /// With a nin_shortcut, conv2's device bias is conv2.bias + nin_shortcut.bias: the block
    /// computes `x' = conv2(t) + b2 + (W_nin x + b_nin)` as conv2 with the summed bias onto
    /// `W_nin x` (the shortcut's GEMM writes 16-bit values without a bias pass).
    pub(super) fn from_host(gpu: &Gpu, r: &host::ResBlock) -> Result<GpuResBlock<T>> {
        let c2 = &r.conv2;
        let bias2: Vec<f32> = match &r.nin_shortcut {
            Some(nin) => {
                ensure!(
                    nin.bias.len() == c2.bias.len(),
                    "nin_shortcut bias {} vs conv2 bias {}",
                    nin.bias.len(),
                    c2.bias.len()
                );
                c2.bias.iter().zip(&nin.bias).map(|(a, b)| a + b).collect()
            }
            None => c2.bias.clone(),
        };
        Ok(GpuResBlock {
            norm1: GnWeights::from_host(gpu, &r.norm1)?,
            conv1: ConvWeights::from_host(gpu, &r.conv1)?,
            norm2: GnWeights::from_host(gpu, &r.norm2)?,
            conv2: ConvWeights::new(gpu, c2.cin, c2.cout, c2.k, &c2.weight, &bias2)?,
            nin_shortcut: r
                .nin_shortcut
                .as_ref()
                .map(|c| ConvWeights::from_host(gpu, c))
                .transpose()?,
        })
    }
}

/// One resolution level of the decoder or the encoder: ResBlocks, their AttnBlocks (none, or
/// one per ResBlock), and the level's resampling conv (the decoder's upsample, the encoder's
/// downsample).
pub(super) struct GpuLevel<T: Storage> {
    pub(super) res: Vec<GpuResBlock<T>>,
    pub(super) attn: Vec<AttnWeights<T>>,
    pub(super) resample: Option<ConvWeights<T>>,
}

impl<T: Storage> GpuLevel<T> {
    pub(super) fn from_host(
        gpu: &Gpu,
        res: &[host::ResBlock],
        attn: &[host::AttnBlock],
        resample: Option<&host::Conv>,
    ) -> Result<GpuLevel<T>> {
        Ok(GpuLevel {
            res: res
                .iter()
                .map(|r| GpuResBlock::from_host(gpu, r))
                .collect::<Result<_>>()?,
            attn: attn
                .iter()
                .map(|a| AttnWeights::from_host(gpu, a))
                .collect::<Result<_>>()?,
            resample: resample
                .map(|c| ConvWeights::from_host(gpu, c))
                .transpose()?,
        })
    }
}

/// The layers the decoder and the encoder both have (their order of use differs).
pub(super) struct Trunk<T: Storage> {
    pub(super) levels: Vec<GpuLevel<T>>,
    pub(super) conv_in: ConvWeights<T>,
    pub(super) mid: (GpuResBlock<T>, AttnWeights<T>, GpuResBlock<T>),
    pub(super) norm_out: GnWeights,
    pub(super) conv_out: ConvWeights<T>,
}

/// The [`Trunk`] of a host `DecoderWeights` or `EncoderWeights` (`$host`: the fields of these
/// names have the same types in both), whose levels resample with their conv `$resample`
/// (`upsample` or `downsample`); the levels are uploaded first. Evaluates to a `Result`.
macro_rules! upload_trunk {
    ($gpu:expr, $host:expr, $resample:ident) => {{
        use super::blocks::{GpuLevel, GpuResBlock, Trunk};
        use super::weights::{AttnWeights, ConvWeights, GnWeights};
        let (gpu, host) = ($gpu, $host);
        let levels = host
            .levels
            .iter()
            .map(|l| GpuLevel::from_host(gpu, &l.res, &l.attn, l.$resample.as_ref()))
            .collect::<anyhow::Result<Vec<_>>>();
        anyhow::Context::context(levels, "uploading the levels").and_then(|levels| {
            Ok(Trunk {
                levels,
                conv_in: ConvWeights::from_host(gpu, &host.conv_in)?,
                mid: (
                    GpuResBlock::from_host(gpu, &host.mid.0)?,
                    AttnWeights::from_host(gpu, &host.mid.1)?,
                    GpuResBlock::from_host(gpu, &host.mid.2)?,
                ),
                norm_out: GnWeights::from_host(gpu, &host.norm_out)?,
                conv_out: ConvWeights::from_host(gpu, &host.conv_out)?,
            })
        })
    }};
}
pub(super) use upload_trunk;

/// The activation buffers the layers of the decoder and the encoder run on, all in the
/// storage type T but the f32 scratch `f`.
pub(super) struct Acts<T: Storage> {
    pub(super) x: [DevBuf<T>; 2], // residual stream ping-pong, (B, H, W, C) up to max_act per image
    /// Which of `x` holds the residual stream (see [`Acts::stream_conv`]).
    pub(super) cur: usize,
    pub(super) h: DevBuf<T>, // conv1 outputs (and the encoder's conv_out output)
    pub(super) t: DevBuf<T>, // conv_in's input: the decoder's post_quant output, the encoder's image
    pub(super) f: DevBuf<f32>, // the post_quant GEMM output, the decoder's conv_out output (f32)
    /// GroupNorm statistics and scale/shift: between layers it holds the statistics of the
    /// residual stream x[cur] (every producer of x leaves them; see `res_block`).
    pub(super) gn: GnScratch,
    pub(super) attn: AttnScratch<T>, // the attention blocks (at the lowest resolution)
}

/// Per-image element counts of the buffers of [`Acts`].
pub(super) struct ActsPlan {
    pub(super) max_act: usize,
    pub(super) t: usize,
    pub(super) f: usize,
    pub(super) max_hw: usize,
    pub(super) max_c: usize,
    pub(super) attn_n: usize,
    pub(super) attn_c: usize,
}

impl<T: Storage> Acts<T> {
    pub(super) fn new(gpu: &Gpu, batch: usize, p: &ActsPlan) -> Result<Acts<T>> {
        let act = batch * p.max_act;
        Ok(Acts {
            x: [gpu.alloc(act)?, gpu.alloc(act)?],
            cur: 0,
            h: gpu.alloc(act)?,
            t: gpu.alloc(batch * p.t.max(1))?,
            f: gpu.alloc(batch * p.f.max(1))?,
            gn: GnScratch::new(gpu, batch, p.max_hw, p.max_c)?,
            attn: AttnScratch::new(gpu, batch, p.attn_n, p.attn_c)?,
        })
    }

    /// A ResBlock on the residual stream `x[cur]` of `b` images of hgt x hgt, whose
    /// GroupNorm statistics are in `gn` (left by x's producer): `h = conv1(SiLU(GN1(x)))`,
    /// `x = conv2(SiLU(GN2(h))) + b + x`, each GroupNorm applied in the conv's loader from
    /// the statistics the previous conv's epilogue left; the residual is added in conv2's
    /// epilogue in place, or onto `W_nin x` (computed first into the other buffer, which
    /// becomes the stream; conv2's bias includes the shortcut's). Leaves the new x's
    /// statistics in `gn`.
    fn res_block(
        &mut self,
        gpu: &Gpu,
        k: ConvKernel,
        r: &GpuResBlock<T>,
        b: usize,
        hgt: usize,
    ) -> Result<()> {
        let hw = hgt * hgt;
        let [x0, x1] = &mut self.x;
        let (x, other) = if self.cur == 0 { (x0, x1) } else { (x1, x0) };
        let (h, gn) = (&mut self.h, &mut self.gn);
        if let Some(nin) = &r.nin_shortcut {
            conv1x1(gpu, nin, x, b * hw, Conv1x1Out::NoBias(other))?;
        }
        let fused = ConvGn {
            apply: Some(true),
            stats: true,
        };
        let same = Resample::Same;
        gn_finalize(gpu, &r.norm1, gn, b, hw)?;
        conv3x3(
            gpu,
            k,
            &r.conv1,
            x,
            h,
            Residual::None,
            b,
            hgt,
            hgt,
            same,
            Some((gn, fused)),
        )?;
        gn_finalize(gpu, &r.norm2, gn, b, hw)?;
        let out = if r.nin_shortcut.is_some() {
            self.cur = 1 - self.cur;
            other
        } else {
            x
        };
        let res = Residual::InPlace;
        conv3x3(
            gpu,
            k,
            &r.conv2,
            h,
            out,
            res,
            b,
            hgt,
            hgt,
            same,
            Some((gn, fused)),
        )
    }

    /// An AttnBlock on x[cur] (its own GroupNorm statistics pass), then the new x's
    /// statistics into `gn`.
    fn attn(&mut self, gpu: &Gpu, w: &AttnWeights<T>, b: usize, n: usize) -> Result<()> {
        let x = &mut self.x[self.cur];
        attn_block(gpu, w, x, &mut self.attn, b, n)?;
        gn_stats(gpu, x, &mut self.gn, b, n, w.c)
    }

    /// A level's ResBlocks, each followed by its AttnBlock when the level has them (`name`
    /// for the error context, e.g. `conv_blocks.2`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn level_blocks(
        &mut self,
        gpu: &Gpu,
        k: ConvKernel,
        level: &GpuLevel<T>,
        b: usize,
        hgt: usize,
        name: &str,
    ) -> Result<()> {
        for (j, res) in level.res.iter().enumerate() {
            self.res_block(gpu, k, res, b, hgt)
                .with_context(|| format!("{name}.res.{j}"))?;
            if let Some(attn) = level.attn.get(j) {
                self.attn(gpu, attn, b, hgt * hgt)
                    .with_context(|| format!("{name}.attn.{j}"))?;
            }
        }
        Ok(())
    }

    /// The mid blocks: ResBlock, AttnBlock, ResBlock.
    pub(super) fn mid(
        &mut self,
        gpu: &Gpu,
        k: ConvKernel,
        mid: &(GpuResBlock<T>, AttnWeights<T>, GpuResBlock<T>),
        b: usize,
        hgt: usize,
    ) -> Result<()> {
        self.res_block(gpu, k, &mid.0, b, hgt).context("mid.0")?;
        self.attn(gpu, &mid.1, b, hgt * hgt).context("mid.1")?;
        self.res_block(gpu, k, &mid.2, b, hgt).context("mid.2")
    }

    /// A 3x3 conv with no GroupNorm on its input writing the residual stream (`b` images of
    /// hgt x hgt) and leaving its statistics in `gn`: conv_in (from `t` into `x[0]`) and the
    /// resampling convs (from the stream into the other buffer of `x`, the stream after).
    pub(super) fn stream_conv(
        &mut self,
        gpu: &Gpu,
        k: ConvKernel,
        conv: &ConvWeights<T>,
        from: StreamConv,
        b: usize,
        hgt: usize,
    ) -> Result<()> {
        // conv_in starts the stream in x[0]; a resampling conv moves it to the other buffer.
        let to = match from {
            StreamConv::In => 0,
            StreamConv::Resample(_) => 1 - self.cur,
        };
        let [x0, x1] = &mut self.x;
        let (x, dst) = if to == 1 { (x0, x1) } else { (x1, x0) };
        let (src, mode) = match from {
            StreamConv::In => (&self.t, Resample::Same),
            StreamConv::Resample(mode) => (&*x, mode),
        };
        let stats = ConvGn {
            apply: None,
            stats: true,
        };
        let gn = Some((&mut self.gn, stats));
        conv3x3(
            gpu,
            k,
            conv,
            src,
            dst,
            Residual::None,
            b,
            hgt,
            hgt,
            mode,
            gn,
        )?;
        self.cur = to;
        Ok(())
    }
}

/// What [`Acts::stream_conv`] reads.
#[derive(Clone, Copy, Debug)]
pub(super) enum StreamConv {
    /// conv_in: `t`, the decoder's post_quant output or the encoder's image (same size).
    In,
    /// A resampling conv: the stream itself, related to the output as the mode says.
    Resample(Resample),
}

impl<T: Storage> Trunk<T> {
    /// norm_out + conv_out, the last layers of the decoder and the encoder: norm_out's scale
    /// and shift from the statistics `gn` holds for the stream `x` (`b` images of hgt x hgt),
    /// applied with SiLU in conv_out's loader; conv_out writes `y` (the decoder's f32 pixels
    /// before `pixels`, the encoder's T input of quant_conv) and leaves no statistics.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn norm_out_conv_out<O: Storage>(
        &self,
        gpu: &Gpu,
        k: ConvKernel,
        x: &DevBuf<T>,
        gn: &mut GnScratch,
        y: &mut DevBuf<O>,
        b: usize,
        hgt: usize,
    ) -> Result<()> {
        gn_finalize(gpu, &self.norm_out, gn, b, hgt * hgt).context("norm_out")?;
        let apply = ConvGn {
            apply: Some(true),
            stats: false,
        };
        let gn = Some((gn, apply));
        let same = Resample::Same;
        conv3x3(
            gpu,
            k,
            &self.conv_out,
            x,
            y,
            Residual::None,
            b,
            hgt,
            hgt,
            same,
            gn,
        )
        .context("conv_out")
    }
}
