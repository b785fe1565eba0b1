//! The serial step loop (SPEC.md sections 5-6), written once against the [`Backend`] trait:
//! the backend runs the loop ([`Backend::run_loop`]: class-token prefill, then the pipeline's
//! steps, unless it replays a recording of them), the pipeline's steps call, per scale, the
//! upscaled source latents ([`Stepper::begin_scale`]) and, per serial step, the input
//! gather, transformer step, guided token choice and scatter into the scale grid
//! ([`Stepper::step`]); then the final decode ([`Backend::decode`]). [`sample`] is the one
//! entry point; backends: `cpu::CpuBackend` (f32 reference) and `cuda::engine::GpuBackend`.

use crate::limits::{MAX_IMAGES, MAX_SAMPLE_BYTES};
use crate::model::config::ModelConfig;
use crate::order::{Schedule, Step, scale_sizes};
use crate::sampling::{StepKnobs, TokenPolicy};
use anyhow::{Result, bail};
use std::time::Instant;

/// The released sampling command's settings (the authors' README: `--cfg 1.5
/// --steps_per_scale 4`, cfg_start_step 5, temperature 1): the defaults everywhere.
pub const DEFAULT_CFG: f32 = 1.5;
pub const DEFAULT_CFG_START_STEP: usize = 5;
pub const DEFAULT_STEPS_PER_SCALE: usize = 4;
pub const DEFAULT_TEMPERATURE: f32 = 1.0;

/// Steps per scale: the same k everywhere, or one value per scale.
#[derive(Clone, Debug, PartialEq)]
pub enum Steps {
    Uniform(usize),
    PerScale(Vec<usize>),
}

/// Everything one sampling call needs besides the model.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    /// One class id per image.
    pub labels: Vec<usize>,
    /// Guidance strength (the reference's `cfg`: logits = cond + cfg * (cond - uncond));
    /// 0 disables guidance and the unconditional half.
    pub cfg: f32,
    /// First global step at which guidance applies.
    pub cfg_start_step: usize,
    /// First global step at which guidance no longer applies (guidance on for
    /// `cfg_start_step <= t < cfg_end_step`); None: to the end (the authors' behaviour).
    /// From this step on the unconditional rows are dropped from the batch: the remaining
    /// steps cost half.
    pub cfg_end_step: Option<usize>,
    pub steps: Steps,
    pub policy: TokenPolicy,
    pub seed: u64,
    /// Teacher forcing: per scale, (B, s, s) raster tokens to use instead of sampling.
    pub forced_tokens: Option<Vec<Vec<u32>>>,
    /// Keep every step's post-guidance logits of the conditional rows.
    pub record_logits: bool,
    /// Record, per image and cell, the chosen token's probability and the position's entropy
    /// ([`crate::sampling::token_stats`]); off by default (the default path costs nothing).
    pub record_stats: bool,
    /// Decode every scale's latent, not only the last (the decoder runs once per scale).
    pub decode_pyramid: bool,
    /// Run-wide index of `labels[0]` (the RNG names images by it): batch k of a run split
    /// by [`sample_batches`] has the index of its first image here, so the images drawn do
    /// not depend on the batch size.
    pub image_offset: usize,
    /// Let a backend record the token loop once per shape and replay it (CUDA graphs on the
    /// GPU) when nothing per step is asked for (no forcing, logits or statistics); `false`
    /// (`--no-graph`) keeps eager launches and per-step timings.
    pub graph: bool,
}

impl SampleOptions {
    /// The released sampling settings (the `DEFAULT_*` constants) for `labels`.
    pub fn new(labels: Vec<usize>) -> Self {
        SampleOptions {
            labels,
            cfg: DEFAULT_CFG,
            cfg_start_step: DEFAULT_CFG_START_STEP,
            cfg_end_step: None,
            steps: Steps::Uniform(DEFAULT_STEPS_PER_SCALE),
            policy: TokenPolicy {
                temperature: DEFAULT_TEMPERATURE,
                top_k: None,
                top_p: None,
            },
            seed: 0,
            forced_tokens: None,
            record_logits: false,
            record_stats: false,
            decode_pyramid: false,
            image_offset: 0,
            graph: true,
        }
    }
}

/// Result of the token loop.
#[derive(Clone, Debug)]
pub struct TokenOutput {
    pub schedule: Schedule,
    /// Per scale, ascending size: (B, s, s) token ids in raster order.
    pub tokens: Vec<Vec<u32>>,
    /// If recorded: per step, (B, n_t, V) logits used for the choice (after guidance).
    pub step_logits: Vec<Vec<f32>>,
    /// If recorded: per scale, the chosen tokens' probabilities and the positions'
    /// entropies (nats), each (B, s, s) raster order, and the global step of every cell.
    pub stats: Option<TokenStats>,
    /// Milliseconds of each serial step: device time between timestamps on the stream when
    /// the backend takes them ([`LoopOutcome::device_times`]: the GPU, eager or replayed), else
    /// host wall time (the CPU); empty when a replayed loop was not timed.
    pub step_ms: Vec<f64>,
    /// Milliseconds of the class-token prefill (device time as `step_ms`).
    pub prefill_ms: f64,
    /// Wall time of the whole token loop (prefill, steps and reading the grids back), less
    /// `decode_in_loop_ms`.
    pub loop_ms: f64,
    /// Device milliseconds of the decode the backend ran inside the loop ([`LoopPlan::decode`];
    /// the GPU, where it is part of the loop's graph), else None.
    pub decode_in_loop_ms: Option<f64>,
    /// The loop ran as a replayed graph ([`SampleOptions::graph`]).
    pub replayed: bool,
}

/// Per-cell statistics of a sampling run (the authors' `sample_NNNN_maps.png` data).
#[derive(Clone, Debug)]
pub struct TokenStats {
    /// Per scale (B, s, s): p of the chosen token under softmax(logits / T).
    pub prob: Vec<Vec<f32>>,
    /// Per scale (B, s, s): -sum p ln(p + 1e-8), nats.
    pub entropy: Vec<Vec<f32>>,
    /// Per scale (s, s): the global step t at which each cell was drawn (the same for every
    /// image).
    pub step: Vec<Vec<u32>>,
}

/// What a backend hands back after the last step: per scale (B, s, s) raster grids.
pub struct Grids {
    pub tokens: Vec<Vec<u32>>,
    /// Probability and entropy grids when the steps were asked for stats, else empty.
    pub prob: Vec<Vec<f32>>,
    pub entropy: Vec<Vec<f32>>,
}

/// Check a request against a model configuration; every error is one line.
pub fn validate_options(
    cfg: &ModelConfig,
    scale_count: usize,
    o: &SampleOptions,
    mem: Memory,
) -> Result<()> {
    if o.labels.is_empty() {
        bail!("no labels: give at least one class id");
    }
    check_batch_size(cfg, o.labels.len(), o.cfg > 0.0, mem)?;
    if let Some(&bad) = o.labels.iter().find(|&&l| l >= cfg.num_classes) {
        bail!(
            "class id {bad} is out of range: this model has {} classes (0..{})",
            cfg.num_classes,
            cfg.num_classes - 1
        );
    }
    match &o.steps {
        Steps::Uniform(0) => bail!("steps per scale must be at least 1"),
        Steps::PerScale(v) if v.len() != scale_count => bail!(
            "{} per-scale step counts given, but the model has {scale_count} scales",
            v.len()
        ),
        Steps::PerScale(v) if v.contains(&0) => bail!("steps per scale must be at least 1"),
        _ => {}
    }
    if !o.cfg.is_finite() || o.cfg < 0.0 {
        bail!("cfg must be a finite number >= 0, got {}", o.cfg);
    }
    let t = o.policy.temperature;
    if !t.is_finite() || t < 0.0 {
        bail!("temperature must be a finite number >= 0, got {t}");
    }
    if o.policy.top_k == Some(0) {
        bail!("top-k must be at least 1");
    }
    if let Some(p) = o.policy.top_p
        && !(p > 0.0 && p <= 1.0)
    {
        bail!("top-p must be in (0, 1], got {p}");
    }
    Ok(())
}

/// The schedule `o` runs on a pyramid of `scale_sizes`.
pub fn schedule_of(scale_sizes: &[usize], o: &SampleOptions) -> Result<Schedule> {
    match &o.steps {
        Steps::Uniform(k) => Schedule::uniform(scale_sizes, *k),
        Steps::PerScale(v) => Schedule::with_steps(scale_sizes, v),
    }
}

/// How many of the schedule's `total_steps` serial steps guidance applies to (steps
/// `cfg_start_step..cfg_end_step`; none when cfg is 0).
pub fn guided_steps(o: &SampleOptions, total_steps: usize) -> usize {
    if o.cfg > 0.0 {
        let end = o.cfg_end_step.unwrap_or(total_steps).min(total_steps);
        end.saturating_sub(o.cfg_start_step)
    } else {
        0
    }
}

/// Whether guidance applies at global step `t`.
pub fn guided_at(o: &SampleOptions, t: usize) -> bool {
    o.cfg > 0.0 && t >= o.cfg_start_step && o.cfg_end_step.is_none_or(|e| t < e)
}

/// The warning for a request that asks for guidance (cfg > 0) but starts it at or past the
/// schedule's last step, so that it never applies (the default start step 5 on a 5-step
/// schedule does this): None when guidance applies to some step, or is off.
pub fn guidance_warning(o: &SampleOptions, total_steps: usize) -> Option<String> {
    (o.cfg > 0.0 && guided_steps(o, total_steps) == 0).then(|| {
        if let Some(e) = o.cfg_end_step.filter(|&e| e <= o.cfg_start_step) {
            return format!(
                "--cfg {} never applies: --cfg-end-step {e} is not after --cfg-start-step {} \
                 (sampling runs unguided)",
                o.cfg, o.cfg_start_step
            );
        }
        format!(
            "--cfg {} never applies: --cfg-start-step {} is past the last step ({}) of this \
             {total_steps}-step schedule (sampling runs unguided; --cfg 0 says so, a smaller \
             --cfg-start-step or more steps guides)",
            o.cfg,
            o.cfg_start_step,
            total_steps.saturating_sub(1)
        )
    })
}

/// The memory a batch is planned against: the input of the one batch-size rule
/// ([`batch_rule`]) that every front end (CLI, API, C ABI, Python) uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Memory {
    /// The CPU backend: f32 KV caches in host memory, within [`MAX_SAMPLE_BYTES`].
    Host,
    /// The host-emulated GPU: the GPU's buffers (bf16 KV caches) in host memory, within
    /// [`MAX_SAMPLE_BYTES`]; slow, so its default batch is small.
    Emulated,
    /// A GPU with `total` bytes of memory, `free` of them free now.
    Gpu { total: u64, free: u64 },
}

/// What [`batch_rule`] decides for a model, guidance and memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRule {
    /// Bytes one image plans for on that memory (an upper bound).
    pub per_image: u64,
    /// The most images one batch may hold (at most [`MAX_IMAGES`], at least 1).
    pub cap: usize,
    /// The batch size when a request gives none (never above `cap`).
    pub default: usize,
}

/// Most images a GPU batch takes by default (larger batches gain little throughput).
const GPU_DEFAULT_MAX: u64 = 256;
/// Share of a GPU's total memory one batch may plan for (the rest: weights, the cuBLAS
/// workspace, the context, fragmentation).
const GPU_CAP_SHARE: f64 = 0.85;
/// Share of a GPU's free memory the default batch plans for.
const GPU_DEFAULT_SHARE: f64 = 0.6;

/// Bytes one image of a sampling call plans for on `mem`.
///
/// On the CPU: its f32 KV cache (K and V of every layer and position, twice with guidance)
/// and its f32 pixels. On a GPU (and the emulator): its bf16 KV cache, the step buffers of
/// its rows (sized here for the largest scale in one step, an upper bound for any schedule),
/// its AdaLN modulations, and its share of the decoder's workspace at the last scale.
pub fn bytes_per_image(cfg: &ModelConfig, guided: bool, mem: Memory) -> Result<u64> {
    let sizes = scale_sizes(cfg.latent_size(), cfg.scale_ratio, cfg.scale_min_size)?;
    let n: u64 = sizes.iter().map(|&s| (s * s) as u64).sum();
    let rows = if guided { 2 } else { 1 };
    let (c, f, v) = (
        cfg.hidden_size as u64,
        cfg.ffn_dim as u64,
        cfg.codebook_size() as u64,
    );
    let layers = cfg.num_layers as u64;
    let side = cfg.img_size as u64;
    Ok(match mem {
        Memory::Host => rows * layers * n * c * 2 * 4 + 3 * side * side * 4,
        Memory::Emulated | Memory::Gpu { .. } => {
            let last = *sizes.last().unwrap_or(&1) as u64;
            let cap = 1 + n;
            let kv = layers * cap * c * 2 * 2;
            // x and logits f32; a, q, o, qkv, h bf16 (cuda::engine::Batch).
            let step = last * last * (4 * c + 2 * 6 * c + 2 * f + 4 * v);
            let modulation = layers * 4 * c * 4;
            let decoder = cfg.decoder.workspace_bytes_per_image(last as usize);
            rows * (kv + step + modulation) + decoder + 3 * side * side
        }
    })
}

/// The batch-size rule: the cap and the default for `cfg` (with guidance or not) on `mem`.
///
/// - CPU: cap [`MAX_SAMPLE_BYTES`] / per image; default at most 8, within a quarter of it.
/// - emulator: cap as on the CPU (its memory is the host's); default 4 (it is slow).
/// - GPU: cap 85 % of the device's total memory / per image; default what fits in 60 % of
///   its free memory, at most 256 and never above the cap.
pub fn batch_rule(cfg: &ModelConfig, guided: bool, mem: Memory) -> Result<BatchRule> {
    let per = bytes_per_image(cfg, guided, mem)?.max(1);
    let max = MAX_IMAGES as u64;
    let (cap, default) = match mem {
        Memory::Host => {
            let cap = (MAX_SAMPLE_BYTES / per).clamp(1, max);
            (cap, (MAX_SAMPLE_BYTES / 4 / per).clamp(1, 8))
        }
        Memory::Emulated => ((MAX_SAMPLE_BYTES / per).clamp(1, max), 4),
        Memory::Gpu { total, free } => {
            let cap = ((total as f64 * GPU_CAP_SHARE) as u64 / per).clamp(1, max);
            let default =
                ((free as f64 * GPU_DEFAULT_SHARE) as u64 / per).clamp(1, GPU_DEFAULT_MAX);
            (cap, default)
        }
    };
    Ok(BatchRule {
        per_image: per,
        cap: cap as usize,
        default: default.min(cap) as usize,
    })
}

/// Refuse, before anything is allocated, a batch larger than [`MAX_IMAGES`] or than the cap
/// of [`batch_rule`] on `mem`.
pub fn check_batch_size(cfg: &ModelConfig, images: usize, guided: bool, mem: Memory) -> Result<()> {
    if images > MAX_IMAGES {
        bail!("{images} images in one batch; at most {MAX_IMAGES} per batch (--batch-size)");
    }
    let rule = batch_rule(cfg, guided, mem)?;
    if images > rule.cap {
        let (limit, place) = match mem {
            Memory::Gpu { total, .. } => (
                (total as f64 * GPU_CAP_SHARE) as u64,
                "85 % of the GPU's memory",
            ),
            _ => (MAX_SAMPLE_BYTES, "the host limit"),
        };
        bail!(
            "{images} images need about {:.1} GiB for their KV caches, buffers and pixels; at \
             most {} images of this model per batch ({place}, {:.1} GiB): use a smaller \
             --batch-size",
            (images as u64 * rule.per_image) as f64 / (1u64 << 30) as f64,
            rule.cap,
            limit as f64 / (1u64 << 30) as f64,
        );
    }
    Ok(())
}

/// How one step chooses its tokens.
pub struct StepChoice<'a> {
    /// Guidance strength when guidance applies at this step (cfg > 0 and cfg_start_step <=
    /// t < cfg_end_step).
    pub guidance: Option<f32>,
    /// Guidance is over for good (t >= cfg_end_step): a backend drops the batch's
    /// unconditional rows (their KV cache, modulations and compute) from this step on.
    pub drop_uncond: bool,
    pub policy: &'a TokenPolicy,
    pub seed: u64,
    /// Teacher forcing: this scale's (B, s, s) tokens.
    pub forced: Option<&'a [u32]>,
    /// Return the step's post-guidance logits of the conditional rows, (B, n, V).
    pub record: bool,
    /// Record the chosen tokens' probabilities and entropies into the scale's stat grids.
    pub stats: bool,
    /// Run-wide index of the batch's first image (the RNG's image counter).
    pub image0: u32,
}

impl StepChoice<'_> {
    /// The knobs of global step `t` for `batch` images over a `cells`-cell grid; guidance
    /// only when the backend runs the unconditional rows (`guided`).
    pub fn knobs(
        &self,
        batch: usize,
        vocab: usize,
        cells: usize,
        guided: bool,
        t: usize,
    ) -> StepKnobs<'_> {
        StepKnobs {
            batch,
            vocab,
            cells,
            guidance: if guided { self.guidance } else { None },
            policy: self.policy,
            seed: self.seed,
            step: t as u32,
            image0: self.image0,
        }
    }
}

/// Images decoded from one scale of a finished batch.
pub struct Decoded {
    /// (B, 3, H, W) 8-bit pixels.
    pub pixels: Vec<u8>,
    /// (B, 3, H, W) raw decoder output in about [-1, 1], when the backend keeps it (the CPU
    /// does; the GPU copies back only 8-bit pixels).
    pub images: Option<Vec<f32>>,
}

/// Everything besides the batch's shape, labels, seed and image offset that a recorded loop's
/// launches depend on: guidance, its start step, the token policy (floats by their bits, so
/// it hashes and compares exactly).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LoopSignature {
    cfg_bits: u32,
    cfg_start_step: usize,
    cfg_end_step: Option<usize>,
    temperature_bits: u32,
    top_k: Option<usize>,
    top_p_bits: Option<u32>,
}

impl LoopSignature {
    /// The signature of a sampling call's loop.
    pub fn of(o: &SampleOptions) -> LoopSignature {
        LoopSignature {
            cfg_bits: o.cfg.to_bits(),
            cfg_start_step: o.cfg_start_step,
            cfg_end_step: o.cfg_end_step,
            temperature_bits: o.policy.temperature.to_bits(),
            top_k: o.policy.top_k,
            top_p_bits: o.policy.top_p.map(f32::to_bits),
        }
    }
}

/// The token loop to run, handed to [`Backend::run_loop`].
#[derive(Clone, Debug)]
pub struct LoopPlan<'a> {
    pub schedule: &'a Schedule,
    /// One class per image; with `guided`, the batch runs a null-class row per image too.
    pub labels: &'a [usize],
    pub guided: bool,
    /// The loop may be recorded and replayed: nothing is read back per step.
    pub graph: bool,
    /// What the recorded launches depend on besides the batch's inputs.
    pub signature: LoopSignature,
    /// The batch's seed and run-wide first image index, which a replay reads from device
    /// memory.
    pub seed: u64,
    pub image0: u32,
    /// The scale [`sample`] decodes right after the loop (the last; None when only tokens
    /// are wanted): a backend may enqueue that decode at the end of the loop, inside its
    /// recording, and hand the pixels to [`Backend::decode`].
    pub decode: Option<usize>,
}

/// Device-side times of one loop, in milliseconds ([`LoopOutcome::device_times`]).
#[derive(Clone, Debug, Default)]
pub struct DeviceTimes {
    pub prefill_ms: f64,
    /// Per serial step, the scale's start charged to its first step (as the host timing).
    pub step_ms: Vec<f64>,
    /// The decode run inside the loop ([`LoopPlan::decode`]), if it was.
    pub decode_ms: Option<f64>,
}

/// What [`Backend::run_loop`] hands back.
pub struct LoopOutcome {
    /// The sampled grids, per scale (B, s, s), raster order.
    pub grids: Grids,
    /// The loop ran as a recording (replayed from an earlier batch, or captured in this one
    /// and then replayed): host-side step times are enqueue times, not step times.
    pub replayed: bool,
    /// Host milliseconds of the batch's start (the class-token prefill; a replayed
    /// recording's whole loop).
    pub prefill_ms: f64,
    /// The loop's times as the device measured them (timestamps on the stream, no
    /// synchronization between steps), when the backend takes them; None: the pipeline's
    /// host timing stands.
    pub device_times: Option<DeviceTimes>,
}

/// A step's post-guidance logits of the conditional rows, (B, n, V), when the step was
/// asked for them ([`StepChoice::record`]).
pub type StepLogits = Option<Vec<f32>>;

/// The per-scale work of a running loop: what the pipeline's steps ([`LoopSteps`]) call on
/// the backend that [`Backend::run_loop`] hands them.
pub trait Stepper {
    /// Start scale `si`: z0 from the previous scale's grid, and its source embeddings.
    fn begin_scale(&mut self, schedule: &Schedule, si: usize) -> Result<()>;
    /// One serial step: inputs, transformer, guidance, token choice, scatter into the grid.
    fn step(&mut self, schedule: &Schedule, step: &Step, ch: &StepChoice) -> Result<StepLogits>;
    /// Sequence rows the running batch computes (B, or 2B while the unconditional half is
    /// kept), where the backend says; None between batches. Default: None.
    fn rows(&self) -> Option<usize> {
        None
    }
}

/// The pipeline's per-scale loop over a running batch: every scale's `begin_scale` and
/// steps, on the [`Stepper`] it is handed. [`Backend::run_loop`] calls it (again when it
/// reruns a loop; never when it replays one); an error from it (a cancellation, a failed
/// step) stops the loop.
pub type LoopSteps<'a> = dyn FnMut(&mut dyn Stepper) -> Result<()> + 'a;

/// What the serial step loop needs from a backend (CPU f32 reference, CUDA).
pub trait Backend: Stepper {
    /// The configuration of the model this backend runs.
    fn config(&self) -> &ModelConfig;
    /// The memory its batches are planned against ([`batch_rule`]). Default: the host's.
    fn memory(&self) -> Result<Memory> {
        Ok(Memory::Host)
    }
    /// Run one token loop of `plan` for a batch of its labels (doubled with null-class rows
    /// when guided): start the batch (KV cache, grids, AdaLN modulations, the class
    /// token), call `steps` with this backend, and hand back the grids. A backend that
    /// records loops (CUDA graphs) decides here whether to replay a recording instead of
    /// calling `steps`, to record the loop, or to launch eagerly, and reruns a loop whose
    /// recording failed; an error from `steps` is returned, and no recording is left open.
    fn run_loop(&mut self, plan: &LoopPlan, steps: &mut LoopSteps) -> Result<LoopOutcome>;
    /// Decode scale `si` of the finished batch (conditional rows only: both guidance halves
    /// share tokens). After `run_loop`.
    fn decode(&mut self, schedule: &Schedule, si: usize) -> Result<Decoded>;
}

/// Milliseconds since `t` on the host clock.
pub fn elapsed_ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// Tokens and decoded images of one sampling call.
pub struct Samples {
    pub tokens: TokenOutput,
    /// (B, 3, H, W) 8-bit pixels.
    pub pixels: Vec<u8>,
    /// (B, 3, H, W) raw decoder output (CPU backend only).
    pub images: Option<Vec<f32>>,
    /// Image side H = W.
    pub image_size: usize,
    /// With `decode_pyramid`: every scale decoded, ascending (the last equals `pixels`).
    pub pyramid: Vec<Decoded>,
    pub decode_ms: f64,
}

/// Sample token pyramids and decode the last scale to images: the one entry point.
pub fn sample<B: Backend + ?Sized>(backend: &mut B, o: &SampleOptions) -> Result<Samples> {
    sample_observed(backend, o, &mut |_, _| Ok(()))
}

/// What [`run_steps_observed`] calls after every serial step: `(steps done, total steps)`
/// of the batch; an error stops the batch (the API's cancellation) and is returned.
pub type OnStep<'a> = dyn FnMut(usize, usize) -> Result<()> + 'a;

/// [`sample`], calling `on_step` after every serial step.
pub fn sample_observed<B: Backend + ?Sized>(
    backend: &mut B,
    o: &SampleOptions,
    on_step: &mut OnStep,
) -> Result<Samples> {
    let tokens = run_tokens(backend, o, on_step, true)?;
    let t = Instant::now();
    let last = tokens.schedule.scales.len() - 1;
    let mut pyramid = Vec::new();
    if o.decode_pyramid {
        for si in 0..last {
            pyramid.push(backend.decode(&tokens.schedule, si)?);
        }
    }
    let d = backend.decode(&tokens.schedule, last)?;
    if o.decode_pyramid {
        pyramid.push(Decoded {
            pixels: d.pixels.clone(),
            images: None,
        });
    }
    let cfg = backend.config();
    Ok(Samples {
        pixels: d.pixels,
        images: d.images,
        image_size: cfg.img_size,
        pyramid,
        decode_ms: elapsed_ms(t) + tokens.decode_in_loop_ms.unwrap_or(0.0),
        tokens,
    })
}

/// Sample `o.labels` in batches of at most `batch_size` images, in order, handing each
/// finished batch to `each(first_image_index, samples)`: memory holds one batch at a time.
/// Batch k is sampled with `image_offset = o.image_offset + first`, so the images equal
/// those of one call with every label (for any batch size). Forced tokens are split with
/// the labels.
pub fn sample_batches<B: Backend + ?Sized>(
    backend: &mut B,
    o: &SampleOptions,
    batch_size: usize,
    each: impl FnMut(usize, Samples) -> Result<()>,
) -> Result<()> {
    sample_batches_observed(backend, o, batch_size, &mut |_, _, _| Ok(()), each)
}

/// [`sample_batches`], calling `on_step(first image of the batch, steps done, total steps)`
/// after every serial step of every batch.
pub fn sample_batches_observed<B: Backend + ?Sized>(
    backend: &mut B,
    o: &SampleOptions,
    batch_size: usize,
    on_step: &mut dyn FnMut(usize, usize, usize) -> Result<()>,
    mut each: impl FnMut(usize, Samples) -> Result<()>,
) -> Result<()> {
    if batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    if o.labels.is_empty() {
        bail!("no labels: give at least one class id");
    }
    let total = o.labels.len();
    if let Some(f) = &o.forced_tokens
        && f.iter().any(|g| g.len() % total != 0)
    {
        bail!("forced tokens must hold (B, s, s) ids for every scale");
    }
    for first in (0..total).step_by(batch_size) {
        let end = (first + batch_size).min(total);
        let mut ob = o.clone();
        ob.labels = o.labels[first..end].to_vec();
        ob.image_offset = o
            .image_offset
            .checked_add(first)
            .filter(|&i| i + (end - first) <= u32::MAX as usize)
            .ok_or_else(|| anyhow::anyhow!("image index beyond 2^32 (the RNG's image counter)"))?;
        if let Some(f) = &o.forced_tokens {
            let per = |g: &Vec<u32>| g.len() / total;
            ob.forced_tokens = Some(
                f.iter()
                    .map(|g| g[first * per(g)..end * per(g)].to_vec())
                    .collect(),
            );
        }
        let mut batch_step = |done: usize, total: usize| on_step(first, done, total);
        each(first, sample_observed(backend, &ob, &mut batch_step)?)?;
    }
    Ok(())
}

/// Run the token loop of SPEC.md section 5 on any backend.
pub fn run_steps<B: Backend + ?Sized>(backend: &mut B, o: &SampleOptions) -> Result<TokenOutput> {
    run_steps_observed(backend, o, &mut |_, _| Ok(()))
}

/// [`run_steps`], calling `on_step(steps done, total steps)` after every serial step.
pub fn run_steps_observed<B: Backend + ?Sized>(
    backend: &mut B,
    o: &SampleOptions,
    on_step: &mut OnStep,
) -> Result<TokenOutput> {
    run_tokens(backend, o, on_step, false)
}

/// [`run_steps_observed`]; `decode_last`: [`sample_observed`] decodes the last scale next.
fn run_tokens<B: Backend + ?Sized>(
    backend: &mut B,
    o: &SampleOptions,
    on_step: &mut OnStep,
    decode_last: bool,
) -> Result<TokenOutput> {
    let cfg = backend.config().clone();
    let cfg = &cfg;
    let scale_sizes = scale_sizes(cfg.latent_size(), cfg.scale_ratio, cfg.scale_min_size)?;
    let scale_sizes = scale_sizes.as_slice();
    validate_options(cfg, scale_sizes.len(), o, backend.memory()?)?;
    let schedule = schedule_of(scale_sizes, o)?;
    let b = o.labels.len();
    let v = cfg.codebook_size();
    if let Some(f) = &o.forced_tokens {
        if f.len() != scale_sizes.len()
            || f.iter()
                .zip(scale_sizes)
                .any(|(t, &s)| t.len() != b * s * s)
        {
            bail!("forced tokens must hold (B, s, s) ids for every scale");
        }
        if f.iter().flatten().any(|&t| t as usize >= v) {
            bail!("forced token id out of range (codebook has {v} entries)");
        }
    }
    let guided = o.cfg > 0.0;
    let plan = LoopPlan {
        schedule: &schedule,
        labels: &o.labels,
        guided,
        graph: o.graph && o.forced_tokens.is_none() && !o.record_logits && !o.record_stats,
        signature: LoopSignature::of(o),
        seed: o.seed,
        image0: o.image_offset as u32,
        decode: decode_last.then(|| scale_sizes.len() - 1),
    };
    let total = schedule.steps.len();
    // What one run of the loop records; a backend may run the loop twice (a failed capture
    // is rerun eagerly), so each run starts afresh.
    let mut step_logits = Vec::new();
    let mut step_ms = Vec::new();
    let mut stepped = false;
    let mut steps = |be: &mut dyn Stepper| -> Result<()> {
        step_logits.clear();
        step_ms.clear();
        stepped = true;
        for si in 0..schedule.scales.len() {
            let ts = Instant::now();
            be.begin_scale(&schedule, si)?;
            let mut carry = elapsed_ms(ts); // charged to the scale's first step
            for step in schedule.steps.iter().filter(|st| st.scale == si) {
                let ts = Instant::now();
                let choice = StepChoice {
                    guidance: (guided && guided_at(o, step.t)).then_some(o.cfg),
                    drop_uncond: guided && o.cfg_end_step.is_some_and(|e| step.t >= e),
                    policy: &o.policy,
                    seed: o.seed,
                    forced: o.forced_tokens.as_ref().map(|f| f[si].as_slice()),
                    record: o.record_logits,
                    stats: o.record_stats,
                    image0: o.image_offset as u32,
                };
                if let Some(l) = be.step(&schedule, step, &choice)? {
                    step_logits.push(l);
                }
                step_ms.push(elapsed_ms(ts) + carry);
                carry = 0.0;
                on_step(step.t + 1, total)?;
            }
        }
        Ok(())
    };
    let t0 = Instant::now();
    let out = backend.run_loop(&plan, &mut steps)?;
    if !stepped {
        // A replayed loop ran every step at once.
        on_step(total, total)?;
    }
    let mut loop_ms = elapsed_ms(t0);
    let (grids, replayed, mut prefill_ms) = (out.grids, out.replayed, out.prefill_ms);
    let mut decode_in_loop_ms = None;
    match out.device_times {
        Some(dt) if dt.step_ms.len() == total => {
            step_ms = dt.step_ms;
            prefill_ms = dt.prefill_ms;
            decode_in_loop_ms = dt.decode_ms;
            loop_ms = (loop_ms - dt.decode_ms.unwrap_or(0.0)).max(0.0);
        }
        // A recorded loop's host-side step times are enqueue times, not step times.
        _ if replayed => step_ms.clear(),
        _ => {}
    }
    let stats = o.record_stats.then(|| TokenStats {
        prob: grids.prob,
        entropy: grids.entropy,
        step: (0..schedule.scales.len())
            .map(|si| schedule.step_map(si))
            .collect(),
    });
    if let Some(st) = &stats
        && (st.prob.len() != schedule.scales.len() || st.entropy.len() != schedule.scales.len())
    {
        bail!("the backend returned no token statistics");
    }
    Ok(TokenOutput {
        schedule,
        tokens: grids.tokens,
        stats,
        step_logits,
        step_ms,
        prefill_ms,
        loop_ms,
        decode_in_loop_ms,
        replayed,
    })
}
