//! FLOP counts per decoder stage (PERF.md derives the same numbers) and `bench_decode`.

use super::*;

// ---------------------------------------------------------------------------------------------
// FLOPs and benchmark

/// Multiply-add FLOPs (2 per MAC) of one decoder stage for one image; GroupNorm, softmax and
/// other elementwise work are not counted (they are memory-bound and small in FLOPs).
#[derive(Clone, Debug)]
pub struct StageFlops {
    pub name: String,
    /// Output spatial side and channels of the stage.
    pub side: usize,
    pub channels: usize,
    pub conv3x3: f64,
    pub conv1x1: f64,
    pub attention: f64,
}

impl StageFlops {
    pub fn total(&self) -> f64 {
        self.conv3x3 + self.conv1x1 + self.attention
    }
}

/// FLOPs per decoder stage for one image from an s x s latent.
pub fn decoder_flops(cfg: &DecoderConfig, s: usize) -> Vec<StageFlops> {
    let f = |v: usize| v as f64;
    let c3 = |h: usize, ci: usize, co: usize| 2.0 * f(h * h) * 9.0 * f(ci) * f(co);
    let c1 = |h: usize, ci: usize, co: usize| 2.0 * f(h * h) * f(ci) * f(co);
    // (3x3, 1x1) of a ResBlock
    let res = |h: usize, ci: usize, co: usize| {
        let nin = if ci != co { c1(h, ci, co) } else { 0.0 };
        (c3(h, ci, co) + c3(h, co, co), nin)
    };
    // (1x1, attention matmuls) of an AttnBlock: q, k, v, proj_out; q k^T and P V.
    let attn = |h: usize, c: usize| (4.0 * c1(h, c, c), 2.0 * 2.0 * f(h * h) * f(h * h) * f(c));
    let nl = cfg.ch_mult.len();
    let mut c = cfg.ch * cfg.ch_mult[nl - 1];
    let mut h = s;
    let mut out = vec![StageFlops {
        name: "post_quant_conv + conv_in".into(),
        side: h,
        channels: c,
        conv3x3: c3(h, cfg.z_channels, c),
        conv1x1: c1(h, cfg.embed_dim, cfg.z_channels),
        attention: 0.0,
    }];
    let (r3, r1) = res(h, c, c);
    let (a1, aa) = attn(h, c);
    out.push(StageFlops {
        name: "mid (Res, Attn, Res)".into(),
        side: h,
        channels: c,
        conv3x3: 2.0 * r3,
        conv1x1: 2.0 * r1 + a1,
        attention: aa,
    });
    for i in 0..nl {
        let co = cfg.ch * cfg.ch_mult[nl - 1 - i];
        let mut st = StageFlops {
            name: format!("conv_blocks.{i}"),
            side: h,
            channels: co,
            conv3x3: 0.0,
            conv1x1: 0.0,
            attention: 0.0,
        };
        for _ in 0..=cfg.num_res_blocks {
            let (r3, r1) = res(h, c, co);
            st.conv3x3 += r3;
            st.conv1x1 += r1;
            c = co;
            if i == 0 {
                let (a1, aa) = attn(h, c);
                st.conv1x1 += a1;
                st.attention += aa;
            }
        }
        if i + 1 < nl {
            h *= 2;
            st.conv3x3 += c3(h, c, c);
            st.name = format!("conv_blocks.{i} + upsample");
            st.side = h;
        }
        out.push(st);
    }
    out.push(StageFlops {
        name: "norm_out + conv_out".into(),
        side: h,
        channels: 3,
        conv3x3: c3(h, c, 3),
        conv1x1: 0.0,
        attention: 0.0,
    });
    out
}

/// Timing of repeated full decodes of one batch (CUDA events, after warm-up).
#[derive(Clone, Debug)]
pub struct DecodeBench {
    pub device: String,
    pub precision: Precision,
    pub conv_kernel: ConvKernel,
    pub batch: usize,
    pub s: usize,
    pub side: usize,
    pub iters: usize,
    pub ms_median: f64,
    pub ms_min: f64,
    pub images_per_s: f64,
    /// Counted FLOPs (see [`decoder_flops`]) per second at the median time.
    pub tflops: f64,
}

/// Decode `iters` times a fixed pseudo-random token batch (B, s, s) after `warmup` decodes;
/// each decode is timed alone between two CUDA events.
pub fn bench_decode(
    gpu: &Gpu,
    dec: &GpuDecoder,
    batch: usize,
    s: usize,
    warmup: usize,
    iters: usize,
) -> Result<DecodeBench> {
    ensure!(iters > 0, "bench_decode: iters must be positive");
    let v = dec.config().n_embed as u64;
    let host: Vec<i32> = (0..(batch * s * s) as u64)
        .map(|i| (i.wrapping_mul(2654435761) % v) as i32)
        .collect();
    let tokens = gpu.upload(&host)?;
    for _ in 0..warmup {
        dec.decode_device(gpu, &tokens, batch, s)?;
    }
    gpu.sync()?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        ms.push(gpu.time_ms(|| dec.decode_device(gpu, &tokens, batch, s))?);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let med = ms[ms.len() / 2];
    let flops: f64 = decoder_flops(dec.config(), s)
        .iter()
        .map(|st| st.total())
        .sum();
    Ok(DecodeBench {
        device: gpu.name.clone(),
        precision: dec.precision(),
        conv_kernel: dec.conv_kernel(),
        batch,
        s,
        side: dec.side(s),
        iters,
        ms_median: med,
        ms_min: ms[0],
        images_per_s: batch as f64 / (med / 1e3),
        tflops: flops * batch as f64 / (med / 1e3) / 1e12,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn released_decoder_flops() {
        let cfg = DecoderConfig {
            n_embed: 16384,
            ..crate::model::config::released_decoder()
        };
        let st = decoder_flops(&cfg, 16);
        let total: f64 = st.iter().map(|s| s.total()).sum();
        for s in &st {
            println!(
                "{:28} {:4}x{:<4} C {:4}: {:8.3} GFLOP (3x3 {:.3}, 1x1 {:.3}, attn {:.3})",
                s.name,
                s.side,
                s.side,
                s.channels,
                s.total() / 1e9,
                s.conv3x3 / 1e9,
                s.conv1x1 / 1e9,
                s.attention / 1e9
            );
        }
        println!("total {:.4} TFLOP per 256x256 image", total / 1e12);
        // Independently summed in PERF.md: 252.716253184 GFLOP.
        assert!((total - 252_716_253_184.0).abs() < 1.0, "{total}");
        assert_eq!(st.last().unwrap().side, 256);
        // Shapes the plan must cover: the 256x256x128 activations are the largest.
        assert_eq!(plan(&cfg, 16), (256 * 256 * 128, 256 * 256, 512));
    }
}
