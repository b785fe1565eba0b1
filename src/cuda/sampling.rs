//! Launcher for kernels/sampling.cu: classifier-free guidance combine and token choice
//! (argmax, temperature, top-k, top-p, inverse-CDF draw) for one serial step, on the device.
//! Same rules as the CPU reference in src/sampling.rs; see the kernel's header for the tie
//! rules and numerics.

use super::{DevBuf, Gpu, Traffic, k};
use crate::sampling::StepKnobs;
use anyhow::{Result, ensure};

/// Threads per block: SAMPLE_THREADS of kernels/sampling.cu, the kernel's
/// `__launch_bounds__`, read from the registry (the kernel's reductions assume exactly it).
const SAMPLE_THREADS: u32 = k::GUIDED_SAMPLE_F32.max_threads;

kernel_params! {
    /// The parameters of kernels/sampling.cu's `GuidedSampleParams`.
    struct GuidedSampleParams {
        logits: u64,
        forced: u64,
        grid: u64,
        tokens_out: u64,
        local_pos: u64,
        global_pos: u64,
        prob: u64,
        entropy: u64,
        bias: u64,
        run: u64,
        seed: u64,
        batch: i32,
        n: i32,
        v: i32,
        cells: i32,
        guided: i32,
        cfg: f32,
        temperature: f32,
        top_k: i32,
        top_p: f32,
        step: i32,
        image0: u32,
    }
}

/// Choose the tokens of one step on the device.
///
/// * `logits` (rows * n, V) f32, rows = B or 2B (conditional rows first); with guidance the
///   guided logits overwrite the first B * n rows.
/// * `local_pos` (n) i32 cell of each token in the scale grid; `global_pos` (n) i32 its global
///   position id (the RNG counter).
/// * `forced` (B, cells) i32: when given, `forced[b, local_pos[j]]` is taken instead of a
///   choice (teacher forcing).
/// * outputs: `grid` (B, cells) i32 gets the token at `local_pos[j]` (other cells untouched),
///   `tokens_out` (B, n) i32 the tokens in step order.
/// * `stats`: when given, `(prob, entropy)` (B, cells) f32 get the chosen token's probability
///   under softmax(l / T) and the entropy in nats at `local_pos[j]` (the CPU's
///   `token_stats`; used by the maps).
/// * `bias` (V) f32: when given, added to every logits row as it is read (the head's bias,
///   folded in; bit for bit the separate add).
/// * `run` (2) u64: when given, `{seed, image0}` are read from it on the device instead of
///   taken from `s` (a replayed CUDA graph samples a new batch with new values).
///
/// Enqueued on the GPU's stream; nothing is synchronized.
#[allow(clippy::too_many_arguments)]
pub fn guided_sample(
    gpu: &Gpu,
    s: &StepKnobs,
    n: usize,
    logits: &mut DevBuf<f32>,
    local_pos: &DevBuf<i32>,
    global_pos: &DevBuf<i32>,
    forced: Option<&DevBuf<i32>>,
    grid: &mut DevBuf<i32>,
    tokens_out: &mut DevBuf<i32>,
    stats: Option<(&mut DevBuf<f32>, &mut DevBuf<f32>)>,
    bias: Option<&DevBuf<f32>>,
    run: Option<&DevBuf<u64>>,
) -> Result<()> {
    let (b, v, cells) = (s.batch, s.vocab, s.cells);
    if b == 0 || n == 0 {
        return Ok(());
    }
    ensure!(
        (1..=i32::MAX as usize).contains(&v),
        "guided_sample: vocabulary {v} out of range"
    );
    ensure!(
        b.checked_mul(n).is_some_and(|bn| bn <= i32::MAX as usize),
        "guided_sample: {b} x {n} blocks do not fit a 1-D grid"
    );
    ensure!(
        cells >= 1 && b * cells <= i32::MAX as usize,
        "guided_sample: bad cell count {cells}"
    );
    let rows = if s.guidance.is_some() { 2 * b } else { b };
    ensure!(
        logits.len() >= rows * n * v,
        "guided_sample: logits hold {} floats, need ({rows} x {n}, {v}) = {}",
        logits.len(),
        rows * n * v
    );
    ensure!(
        local_pos.len() >= n && global_pos.len() >= n,
        "guided_sample: need {n} local and global positions, got {} and {}",
        local_pos.len(),
        global_pos.len()
    );
    ensure!(
        grid.len() >= b * cells,
        "guided_sample: grid holds {}, need ({b}, {cells})",
        grid.len()
    );
    ensure!(
        tokens_out.len() >= b * n,
        "guided_sample: tokens_out holds {}, need ({b}, {n})",
        tokens_out.len()
    );
    if let Some(f) = forced {
        ensure!(
            f.len() >= b * cells,
            "guided_sample: forced grid holds {}, need ({b}, {cells})",
            f.len()
        );
    }
    if let Some((pr, en)) = &stats {
        ensure!(
            pr.len() >= b * cells && en.len() >= b * cells,
            "guided_sample: stat grids hold {} and {}, need ({b}, {cells})",
            pr.len(),
            en.len()
        );
    }
    if let Some(r) = run {
        ensure!(
            r.len() >= 2,
            "guided_sample: run arguments hold {}, need 2",
            r.len()
        );
    }
    if let Some(bs) = bias {
        ensure!(
            bs.len() >= v,
            "guided_sample: bias holds {}, need {v}",
            bs.len()
        );
    }
    let pol = s.policy;
    ensure!(
        pol.temperature.is_finite(),
        "guided_sample: temperature {} is not finite",
        pol.temperature
    );
    if let Some(c) = s.guidance {
        ensure!(c.is_finite(), "guided_sample: cfg {c} is not finite");
    }
    // The CPU's conventions: top_k clamped to [1, V] (V = off); top_p active only when < 1
    // (NaN or >= 1 = off, passed as 1).
    let top_k = pol.top_k.unwrap_or(v).clamp(1, v);
    let top_p = match pol.top_p {
        Some(tp) if tp < 1.0 => tp,
        _ => 1.0,
    };
    let p = GuidedSampleParams {
        logits: gpu.ptr(logits),
        forced: forced.map_or(0, |f| gpu.ptr(f)),
        grid: gpu.ptr(grid),
        tokens_out: gpu.ptr(tokens_out),
        local_pos: gpu.ptr(local_pos),
        global_pos: gpu.ptr(global_pos),
        prob: stats.as_ref().map_or(0, |(pr, _)| gpu.ptr(*pr)),
        entropy: stats.as_ref().map_or(0, |(_, en)| gpu.ptr(*en)),
        bias: bias.map_or(0, |bs| gpu.ptr(bs)),
        run: run.map_or(0, |r| gpu.ptr(r)),
        seed: s.seed,
        batch: b as i32,
        n: n as i32,
        v: v as i32,
        cells: cells as i32,
        guided: s.guidance.is_some() as i32,
        cfg: s.guidance.unwrap_or(0.0),
        temperature: pol.temperature,
        top_k: top_k as i32,
        top_p,
        step: s.step as i32,
        image0: s.image0,
    };
    // Both halves' logits (and the bias) read once, the guided conditional rows written
    // back (in place, when guided or biased), one token per cell into the grid and tokens_out
    // (and stats); the later passes over a row re-read it from cache.
    let written_back = if s.guidance.is_some() || bias.is_some() {
        b * n * v * 4
    } else {
        0
    };
    let traffic = Traffic::new(
        rows * n * v * 4
            + bias.map_or(0, |_| v * 4)
            + 2 * n * 4
            + run.map_or(0, |_| 16)
            + forced.map_or(0, |_| b * n * 4),
        written_back + 2 * b * n * 4 + stats.as_ref().map_or(0, |_| 2 * b * n * 4),
        5 * rows * n * v,
    );
    gpu.launch(
        k::GUIDED_SAMPLE_F32,
        ((b * n) as u32, 1, 1),
        (SAMPLE_THREADS, 1, 1),
        0,
        &p,
        traffic,
    )
}
