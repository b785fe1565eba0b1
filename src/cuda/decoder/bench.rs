//! `bench_decode`: repeated timed decodes of one batch (FLOP counts live in crate::flops).

use super::decode::GpuDecoder;
use super::weights::{ConvKernel, StorageDtype};
use crate::cuda::Gpu;
use anyhow::{Result, ensure};

// ---------------------------------------------------------------------------------------------
// Benchmark (FLOP counts: crate::flops)

pub use crate::flops::{StageFlops, decoder_flops};

/// Timing of repeated full decodes of one batch (CUDA events, after warm-up).
#[derive(Clone, Debug)]
pub struct DecodeBench {
    pub device: String,
    pub dtype: StorageDtype,
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
        dec.decode_device(gpu, &tokens, batch, s, false)?;
    }
    gpu.sync()?;
    let mut ms = Vec::with_capacity(iters);
    for _ in 0..iters {
        ms.push(gpu.time_ms(|| dec.decode_device(gpu, &tokens, batch, s, false).map(drop))?);
    }
    ms.sort_by(|a, b| a.total_cmp(b));
    let med = ms[ms.len() / 2];
    let flops: f64 = decoder_flops(dec.config(), s)
        .iter()
        .map(|st| st.total())
        .sum();
    Ok(DecodeBench {
        device: gpu.name.clone(),
        dtype: dec.dtype(),
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
    #[test]
    fn plan_covers_the_released_shapes() {
        let cfg = crate::model::config::released_decoder_16k();
        // The 256x256x128 activations are the largest; 512 channels the widest.
        assert_eq!(cfg.activation_plan(16), (256 * 256 * 128, 256 * 256, 512));
    }
}
