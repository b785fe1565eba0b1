//! The model-level subcommands: sample, init, inspect. Parsing lives in main.rs; these
//! functions call the library and print.

use anyhow::{Context, Result, bail};
use checkergen::cpu::CpuBackend;
use checkergen::io::image::{grid_rgb, planar_to_rgb, write_rgb_png};
use checkergen::io::maps::{MapsInput, write_maps};
use checkergen::io::tokens::write_tokens;
use checkergen::model::Model;
use checkergen::model::config::{self, ModelConfig};
use checkergen::model::file::{Dtype, write_model};
use checkergen::model::init::random_tensors;
use checkergen::model::weights::Precision;
use checkergen::order::Schedule;
use checkergen::paths::OutputDir;
use checkergen::pipeline::{self, Backend, SampleOptions, Steps};
use checkergen::sampling::TokenPolicy;
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
    /// The host-emulated CUDA device (the CUDA engine's exact kernels and orchestration on
    /// the CPU, with memory checking): a development/checking device, slow, not for users.
    Emu,
}

/// The sampling settings `sample` and `generate` share (the released defaults).
#[derive(Args)]
pub struct SamplingArgs {
    /// Guidance: logits = cond + cfg * (cond - uncond); 0 disables it.
    #[arg(long, default_value_t = pipeline::DEFAULT_CFG, allow_negative_numbers = true)]
    pub cfg: f32,
    /// First global step (0 = the 1x1 scale) at which guidance applies.
    #[arg(long, default_value_t = pipeline::DEFAULT_CFG_START_STEP)]
    pub cfg_start_step: usize,
    /// Serial steps per scale.
    #[arg(long, default_value_t = pipeline::DEFAULT_STEPS_PER_SCALE, conflicts_with = "steps")]
    pub steps_per_scale: usize,
    /// Explicit steps for each scale, comma separated (one value per scale).
    #[arg(long, value_delimiter = ',')]
    pub steps: Option<Vec<usize>>,
    /// Sampling temperature; 0 = greedy (argmax).
    #[arg(long, default_value_t = pipeline::DEFAULT_TEMPERATURE, allow_negative_numbers = true)]
    pub temperature: f32,
    #[arg(long)]
    pub top_k: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Eager kernel launches: no CUDA graphs (on a GPU, a batch shape's token loop and its
    /// decode are otherwise recorded once as a graph and replayed; both are timed step by
    /// step by timestamps on the stream).
    #[arg(long)]
    pub no_graph: bool,
}

/// Said when bf16 runs on a CPU without AVX512-BF16 (PERF.md: the widening fallback saves
/// memory, not time).
fn bf16_fallback_note(p: Precision) {
    use checkergen::math::gemm_bf16::{Kernel, kernel};
    if p == Precision::Bf16 && kernel() != Kernel::Avx512Bf16 {
        eprintln!(
            "note: --precision bf16 runs the {} kernel (no AVX512-BF16 here, or \
             CHECKERGEN_GEMM_BF16): about as fast as f32 at small batches, slower at large ones",
            kernel().name()
        );
    }
}

/// `--precision`, shared by sample, generate, bench and steps.
#[derive(Args, Clone, Copy)]
pub struct PrecisionArgs {
    /// CPU weight storage of the transformer's linears: f32 (the default, the reference) or
    /// bf16 (f32 accumulation, AVX512-BF16 where the CPU has it; about half the bytes per
    /// step). The GPU path always stores bf16: with a GPU device bf16 changes nothing and
    /// f32 is an error.
    #[arg(long, value_enum)]
    pub precision: Option<Precision>,
}

impl PrecisionArgs {
    /// Apply the flag once the device is chosen (`on_gpu`: the GPU or the emulator runs the
    /// model): on the CPU the host model's linears are stored in it; on a GPU bf16 is what
    /// runs anyway (said once), f32 is refused.
    pub(crate) fn apply(self, on_gpu: bool, model: &mut Model) -> Result<()> {
        match self.precision {
            Some(p) if on_gpu => self.on_gpu(p)?,
            Some(p) => {
                bf16_fallback_note(p);
                model.set_precision(p)
            }
            None => {}
        }
        Ok(())
    }

    /// The rule on a GPU: bf16 is said once, f32 refused.
    fn on_gpu(self, p: Precision) -> Result<()> {
        if p == Precision::F32 {
            bail!(
                "--precision f32 is the CPU path's: the GPU path always stores weights in \
                 bf16 (use --device cpu for the f32 reference)"
            );
        }
        eprintln!("note: --precision bf16: the GPU path always stores weights in bf16");
        Ok(())
    }
}

impl SamplingArgs {
    /// SampleOptions for `labels` with these settings.
    pub fn options(&self, labels: Vec<usize>) -> SampleOptions {
        let mut o = SampleOptions::new(labels);
        o.cfg = self.cfg;
        o.cfg_start_step = self.cfg_start_step;
        o.steps = match &self.steps {
            Some(v) => Steps::PerScale(v.clone()),
            None => Steps::Uniform(self.steps_per_scale),
        };
        o.policy = TokenPolicy {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
        };
        o.seed = self.seed;
        o.graph = !self.no_graph;
        o
    }
}

#[derive(Args)]
pub struct SampleArgs {
    /// Model file (from `checkergen convert` or `init`). Without it: the tiny preset with
    /// random weights.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Class ids, comma separated, one image each.
    #[arg(long, value_delimiter = ',', conflicts_with = "num_samples")]
    labels: Option<Vec<usize>>,
    /// Number of images, classes 0, 1, 2, ... round-robin.
    #[arg(long)]
    num_samples: Option<usize>,
    #[command(flatten)]
    pub(crate) s: SamplingArgs,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Also write tokens.safetensors: scale_0, scale_1, ... int32 [B, s, s], and the
    /// per-cell statistics prob_k, entropy_k (f32) and step_k (int32).
    #[arg(long)]
    save_tokens: bool,
    /// Also write sample_NNNN_maps.png per image: the sample, the selection order, log10 of
    /// the chosen tokens' probabilities, the position entropy, and entropy against sampling
    /// order per scale (the authors' main_sample.py maps).
    #[arg(long)]
    maps: bool,
    /// Decode every scale's latent, not only the last, and show them side by side
    /// (sample_NNNN_pyramid.png; in the maps with --maps). Costs one decoder run per scale:
    /// about 1/3 more decode time at ratio 2 (the smaller scales are cheap).
    #[arg(long)]
    pyramid: bool,
    /// Print milliseconds per serial step and per scale.
    #[arg(long)]
    timings: bool,
    /// Remove the files of an earlier run in --out first (else such a directory is refused).
    #[arg(long)]
    overwrite: bool,
    /// Images per batch; any number of images is sampled batch after batch (memory holds
    /// one batch). Default: from the device's free memory on a GPU (at most 256), 8 on the
    /// CPU, 4 on the emulator; printed. The images do not depend on it.
    #[arg(long)]
    batch_size: Option<usize>,
}

/// Identity of a model file: its size and CRC-32 (streamed); None without a file.
pub(crate) fn model_file_identity(path: Option<&Path>) -> Result<Option<String>> {
    let Some(p) = path else {
        return Ok(None);
    };
    let mut f = std::fs::File::open(p).with_context(|| format!("{}: cannot open", p.display()))?;
    let mut h = crc32fast::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = std::io::Read::read(&mut f, &mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        size += n as u64;
    }
    Ok(Some(format!("{size} bytes, crc32 {:08x}", h.finalize())))
}

/// Whether `name` is a file `sample` writes.
pub(crate) fn is_sample_output(name: &str) -> bool {
    matches!(name, "grid.png" | "run.json" | "tokens.safetensors")
        || (name.starts_with("sample_") && name.ends_with(".png"))
}

pub(crate) fn load_or_tiny(path: Option<&Path>) -> Result<(Model, String)> {
    match path {
        Some(p) => Ok((Model::load(p)?, p.display().to_string())),
        None => {
            eprintln!(
                "no --model given: sampling the `tiny` preset with random weights (seed 0); \
                 images are noise-like by design"
            );
            let cfg = config::preset("tiny")?;
            let map = random_tensors(&cfg, 0)?;
            Ok((
                Model::from_tensors(cfg, &map)?,
                "preset tiny (random weights)".into(),
            ))
        }
    }
}

/// The GPU to use for `--device`, or None for the CPU.
#[cfg(feature = "cuda")]
pub(crate) fn pick_gpu(device: Device) -> Result<Option<checkergen::cuda::Gpu>> {
    use checkergen::cuda::Gpu;
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda => match Gpu::try_new().context("--device cuda")? {
            Some(g) => Ok(Some(g)),
            None => bail!("--device cuda: no CUDA driver or GPU found on this machine"),
        },
        Device::Emu => {
            eprintln!(
                "--device emu: the host-emulated CUDA device (development/checking only; slow)"
            );
            Gpu::emu().map(Some)
        }
        Device::Auto => {
            let (gpu, warning) = checkergen::cuda::device::auto_fallback(Gpu::try_new());
            if let Some(w) = warning {
                eprintln!("warning: {w}");
            }
            Ok(gpu)
        }
    }
}

/// Images shown in grid.png: the first ones of the run (a montage of thousands would be a
/// picture nobody opens, and would hold every image in memory).
pub const GRID_MAX_IMAGES: usize = 64;

/// run.json lists the labels of runs up to this many images (beyond, the round-robin rule
/// of --num-samples, as a string: a 10-million-image run would write 60 MB of labels).
pub const RUN_JSON_MAX_LABELS: usize = 100_000;

/// What the batches of one `sample` run accumulate.
#[derive(Default)]
struct SampleRun {
    /// RGB of the first [`GRID_MAX_IMAGES`] images.
    grid: Vec<Vec<u8>>,
    /// With --save-tokens: every image's tokens and statistics, batch after batch.
    tokens: Option<pipeline::TokenOutput>,
    schedule: Option<Schedule>,
    /// Per serial step, summed over the batches with step times (all but graphs captured
    /// without timestamps).
    step_ms: Vec<f64>,
    prefill_ms: f64,
    decode_ms: f64,
    batches: usize,
    /// Batches whose token loop ran as a replayed graph.
    graph_batches: usize,
    /// Batches without per-step times (graphs captured without timestamps), their loops' ms.
    untimed_batches: usize,
    untimed_ms: f64,
}

/// The model on the device `--device` picks (None: the CPU), with the kind of device for the
/// defaults.
#[cfg(feature = "cuda")]
pub(crate) type DeviceModel = Option<checkergen::cuda::engine::GpuModel>;
#[cfg(not(feature = "cuda"))]
pub(crate) type DeviceModel = Option<std::convert::Infallible>;

/// `precision` is applied once the device is chosen ([`PrecisionArgs::apply`]).
pub(crate) fn pick_gpu_model(
    device: Device,
    precision: PrecisionArgs,
    model: &mut Model,
) -> Result<(DeviceModel, pipeline::Memory)> {
    #[cfg(feature = "cuda")]
    {
        let gm = match pick_gpu(device)? {
            Some(g) => Some(checkergen::cuda::engine::GpuModel::new(g, model)?),
            None => None,
        };
        precision.apply(gm.is_some(), model)?;
        let mem = match &gm {
            Some(gm) => gm.gpu.memory()?,
            None => pipeline::Memory::Host,
        };
        Ok((gm, mem))
    }
    #[cfg(not(feature = "cuda"))]
    {
        if matches!(device, Device::Cuda | Device::Emu) {
            bail!("--device cuda/emu: this binary was built without the `cuda` feature");
        }
        precision.apply(false, model)?;
        Ok((None, pipeline::Memory::Host))
    }
}

/// Whether `gm` is the host-emulated device (its times mean nothing).
pub(crate) fn is_emu(gm: &DeviceModel) -> bool {
    match gm {
        #[cfg(feature = "cuda")]
        Some(gm) => gm.gpu.is_emu(),
        _ => false,
    }
}

/// How run.json, `bench` and `steps` name the device `gm` runs on.
pub(crate) fn device_name(gm: &DeviceModel, model: &Model) -> String {
    let bf16 = model.weights.precision() == Precision::Bf16;
    match gm {
        #[cfg(feature = "cuda")]
        Some(gm) if gm.gpu.is_emu() => "emu (host-emulated CUDA device)".into(),
        #[cfg(feature = "cuda")]
        Some(gm) => format!("cuda ({}, kernels: {})", gm.gpu.name, gm.gpu.image_kind),
        _ => format!(
            "cpu ({} threads{})",
            std::thread::available_parallelism().map_or(1, |n| n.get()),
            if bf16 { ", bf16 weights" } else { "" }
        ),
    }
}

/// Run `f` on the backend of `gm`: the GPU engine, or the CPU backend of `model` when None.
pub(crate) fn on_backend<R>(
    gm: &DeviceModel,
    model: &Model,
    f: impl FnOnce(&mut dyn Backend) -> Result<R>,
) -> Result<R> {
    match gm {
        #[cfg(feature = "cuda")]
        Some(gm) => f(&mut checkergen::cuda::engine::GpuBackend::new(gm)),
        _ => f(&mut CpuBackend::new(model)),
    }
}

/// The API's device for `--device` (`cuda` is the first GPU).
pub(crate) fn api_device(d: Device) -> checkergen::Device {
    match d {
        Device::Auto => checkergen::Device::Auto,
        Device::Cpu => checkergen::Device::Cpu,
        Device::Cuda => checkergen::Device::Cuda(0),
        Device::Emu => checkergen::Device::Emulated,
    }
}

/// `--model` (or, without it, the tiny preset with random weights) on `--device`, through
/// the API; prints what the CLI says about the choice. Returns the model and how run.json
/// names its source.
pub(crate) fn load_api_model(
    path: Option<&Path>,
    device: Device,
    precision: PrecisionArgs,
) -> Result<(checkergen::Model, String)> {
    if device == Device::Emu {
        eprintln!("--device emu: the host-emulated CUDA device (development/checking only; slow)");
    }
    let flag = match device {
        Device::Auto => "auto",
        Device::Cpu => "cpu",
        Device::Cuda => "cuda",
        Device::Emu => "emu",
    };
    let on_device = |e: checkergen::Error| match e {
        e @ checkergen::Error::Device { .. } => {
            anyhow::Error::from(e).context(format!("--device {flag}"))
        }
        e => anyhow::Error::from(e),
    };
    let (model, source) = match path {
        Some(p) => (
            checkergen::Model::load(p, api_device(device)).map_err(on_device)?,
            p.display().to_string(),
        ),
        None => {
            eprintln!(
                "no --model given: sampling the `tiny` preset with random weights (seed 0); \
                 images are noise-like by design"
            );
            (
                checkergen::Model::tiny(api_device(device)).map_err(on_device)?,
                "preset tiny (random weights)".to_string(),
            )
        }
    };
    if let Some(note) = model.device_note() {
        eprintln!("warning: {note}");
    }
    let model = match precision.precision {
        None => model,
        Some(p) => {
            if model.is_cpu() {
                bf16_fallback_note(p);
            } else {
                precision.on_gpu(p)?;
            }
            model.with_precision(p)?
        }
    };
    Ok((model, source))
}

pub fn sample(a: SampleArgs) -> Result<()> {
    let max = checkergen::limits::MAX_IMAGES;
    match a.batch_size {
        Some(0) => bail!("--batch-size must be at least 1"),
        Some(b) if b > max => bail!("--batch-size {b}: at most {max} per batch"),
        _ => {}
    }
    let (api_model, source) = load_api_model(a.model.as_deref(), a.s.device, a.s.precision)?;
    let model = api_model.host_model();
    let max_run = checkergen::limits::MAX_RUN_IMAGES;
    let labels = match (&a.labels, a.num_samples) {
        (Some(l), _) if l.len() > max_run => {
            bail!("{} labels: at most {max_run} images per run", l.len())
        }
        (Some(l), _) => l.clone(),
        (None, Some(0)) => bail!("--num-samples must be at least 1"),
        (None, Some(n)) if n > max_run => {
            bail!("--num-samples {n}: at most {max_run} images per run")
        }
        (None, Some(n)) => (0..n).map(|i| i % model.config.num_classes).collect(),
        (None, None) => bail!("give --labels or --num-samples"),
    };
    let mut opts = a.s.options(labels.clone());
    opts.record_stats = a.maps || a.save_tokens;
    opts.decode_pyramid = a.pyramid;
    // The whole request is checked once, at the batch size, before any batch runs.
    let guided = a.s.cfg > 0.0;
    let batch = match a.batch_size {
        Some(n) => n,
        None => api_model.default_batch_size(guided)?.min(labels.len()),
    };
    let mut probe = opts.clone();
    probe.labels.truncate(batch);
    pipeline::validate_options(
        &model.config,
        model.scale_sizes.len(),
        &probe,
        api_model.memory()?,
    )?;
    let total_steps = pipeline::schedule_of(&model.scale_sizes, &opts)?.total_steps();
    let guided_steps = pipeline::guided_steps(&opts, total_steps);
    // Every output is checked before the work: a device, FIFO or directory in the way, an
    // input among the files of --out, or an earlier run's files without --overwrite. Only a
    // request that can start creates --out, replaces an earlier run (a bad option loses
    // nothing) and announces its batch size (one line for one bad input).
    let inputs: Vec<&Path> = a.model.as_deref().into_iter().collect();
    let dir = OutputDir::plan(&a.out, is_sample_output, a.overwrite, &inputs)?.open()?;
    if a.batch_size.is_none() {
        eprintln!("batch size {batch} (the default on this device; --batch-size N to change)");
    }
    if let Some(w) = pipeline::guidance_warning(&opts, total_steps) {
        eprintln!("warning: {w}");
    }

    let t = Instant::now();
    let mut run = SampleRun::default();
    let mut each =
        |first: usize, out: pipeline::Samples| write_batch(&a, model, first, out, &mut run);
    api_model.with_backend(|be| pipeline::sample_batches(be, &opts, batch, &mut each))?;
    let device = api_model.device().to_string();
    let total_s = t.elapsed().as_secs_f64();
    let side = model.config.img_size;
    let b = labels.len();
    let (gw, gh, grid) = grid_rgb(&run.grid, side);
    write_rgb_png(&a.out.join("grid.png"), gw, gh, &grid)?;
    let sched = run.schedule.as_ref().context("no batch ran")?;
    if let Some(tokens) = &run.tokens {
        write_tokens(&dir.join("tokens.safetensors"), tokens, b)?;
    }
    let per_scale_ms: Vec<f64> = (0..sched.scales.len())
        .map(|k| {
            sched
                .steps
                .iter()
                .zip(&run.step_ms)
                .filter(|(s, _)| s.scale == k)
                .map(|(_, ms)| ms)
                .sum()
        })
        .collect();
    let run_json = serde_json::json!({
        "model": source,
        "version": env!("CARGO_PKG_VERSION"),
        "command_line": std::env::args().collect::<Vec<_>>(),
        "model_file": model_file_identity(a.model.as_deref())?,
        "unix_time": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        "config": model.config,
        "device": device,
        // Every label up to RUN_JSON_MAX_LABELS images; beyond, --num-samples's rule.
        "labels": if labels.len() <= RUN_JSON_MAX_LABELS {
            serde_json::json!(labels)
        } else {
            serde_json::json!(format!("image i has class i mod {}", model.config.num_classes))
        },
        "num_images": labels.len(),
        "batch_size": batch,
        "batches": run.batches,
        "cfg": a.s.cfg,
        "cfg_start_step": a.s.cfg_start_step,
        // The serial steps guidance applied to (0: cfg asked for, but never applied).
        "guided_steps": guided_steps,
        "temperature": a.s.temperature,
        "top_k": a.s.top_k,
        "top_p": a.s.top_p,
        "seed": a.s.seed,
        "schedule": {
            "scale_sizes": model.scale_sizes,
            "steps_per_scale": sched.scales.iter().map(|s| s.steps).collect::<Vec<_>>(),
            "block": sched.scales.iter().map(|s| s.block).collect::<Vec<_>>(),
            "total_steps": sched.total_steps(),
        },
        "timings_ms": {
            "prefill": run.prefill_ms,
            "steps": run.step_ms,
            "per_scale": per_scale_ms,
            "decode": run.decode_ms,
            "total": total_s * 1e3,
        },
    });
    checkergen::paths::write_file(
        &dir.join("run.json"),
        serde_json::to_string_pretty(&run_json)?.as_bytes(),
    )?;
    dir.finish();
    if a.timings {
        println!(
            "{:>5} {:>5} {:>6} {:>10} {:>12}",
            "scale", "size", "steps", "ms", "ms/step"
        );
        for (k, sc) in sched.scales.iter().enumerate() {
            println!(
                "{:>5} {:>5} {:>6} {:>10.2} {:>12.2}",
                k,
                sc.size,
                sc.steps,
                per_scale_ms[k],
                per_scale_ms[k] / sc.steps as f64
            );
        }
        let steps_ms: f64 = run.step_ms.iter().sum();
        if run.graph_batches > 0 {
            println!(
                "{} of the {} batches ran their token loop (and decode) as a replayed CUDA \
                 graph (--no-graph: eager launches)",
                run.graph_batches, run.batches
            );
        }
        if run.untimed_batches > 0 {
            println!(
                "{} batches ran as graphs without step timestamps ({:.1} ms in all; not in \
                 the per-step figures above; --no-graph times every batch)",
                run.untimed_batches, run.untimed_ms
            );
        }
        println!(
            "serial steps: {} in {:.1} ms ({:.2} ms/step); prefill {:.2} ms; decode {:.1} ms \
             (sums over {} batches)",
            sched.total_steps(),
            steps_ms,
            steps_ms / sched.total_steps() as f64,
            run.prefill_ms,
            run.decode_ms,
            run.batches
        );
    }
    println!(
        "wrote {b} images ({side}x{side}) to {} in {total_s:.2} s ({} serial steps, {}, {device})",
        a.out.display(),
        sched.total_steps(),
        if run.batches == 1 {
            "1 batch".to_string()
        } else {
            format!("{} batches of at most {batch}", run.batches)
        }
    );
    Ok(())
}

/// Write one finished batch (images `first..`): PNGs, pyramids, maps; keep what the run's
/// grid, tokens file and timings need.
fn write_batch(
    a: &SampleArgs,
    model: &Model,
    first: usize,
    out: pipeline::Samples,
    run: &mut SampleRun,
) -> Result<()> {
    let side = out.image_size;
    let b = out.tokens.tokens[0].len() / out.tokens.schedule.scales[0].tokens;
    let images: Vec<Vec<u8>> = (0..b)
        .map(|i| planar_to_rgb(&out.pixels, i, side))
        .collect();
    for (i, rgb) in images.iter().enumerate() {
        write_rgb_png(
            &a.out.join(format!("sample_{:04}.png", first + i)),
            side,
            side,
            rgb,
        )?;
    }
    let sched = &out.tokens.schedule;
    let stride = model.config.decoder.stride();
    // The decoded pyramid of image i, scales side by side, top-aligned: (rgb, height, width).
    let pyramid_of = |i: usize| -> (Vec<u8>, usize, usize) {
        let sides: Vec<usize> = sched.scales.iter().map(|sc| sc.size * stride).collect();
        let (w, h) = (sides.iter().sum::<usize>(), side);
        let mut rgb = vec![0u8; w * h * 3];
        let mut x0 = 0;
        for (d, &sd) in out.pyramid.iter().zip(&sides) {
            let img = planar_to_rgb(&d.pixels, i, sd);
            for y in 0..sd {
                let dst = (y * w + x0) * 3;
                rgb[dst..dst + sd * 3].copy_from_slice(&img[y * sd * 3..(y + 1) * sd * 3]);
            }
            x0 += sd;
        }
        (rgb, h, w)
    };
    for (i, img) in images.iter().enumerate() {
        let n = first + i;
        let pyr = a.pyramid.then(|| pyramid_of(i));
        if let Some((rgb, h, w)) = &pyr {
            write_rgb_png(
                &a.out.join(format!("sample_{n:04}_pyramid.png")),
                *w,
                *h,
                rgb,
            )?;
        }
        if a.maps {
            let st = out
                .tokens
                .stats
                .as_ref()
                .context("no token statistics recorded")?;
            let cell = |k: usize| sched.scales[k].size * sched.scales[k].size;
            let sample = match &pyr {
                Some((rgb, h, w)) => (rgb.as_slice(), *h, *w),
                None => (img.as_slice(), side, side),
            };
            let scales: Vec<usize> = sched.scales.iter().map(|sc| sc.size).collect();
            let m = MapsInput {
                scales: &scales,
                stride,
                vocab: model.config.codebook_size(),
                sample,
                step: st.step.iter().map(|s| s.as_slice()).collect(),
                prob: (0..scales.len())
                    .map(|k| &st.prob[k][i * cell(k)..(i + 1) * cell(k)])
                    .collect(),
                entropy: (0..scales.len())
                    .map(|k| &st.entropy[k][i * cell(k)..(i + 1) * cell(k)])
                    .collect(),
            };
            write_maps(&a.out.join(format!("sample_{n:04}_maps.png")), &m)?;
        }
    }
    let room = GRID_MAX_IMAGES.saturating_sub(run.grid.len());
    run.grid.extend(images.into_iter().take(room));
    if run.step_ms.is_empty() {
        run.step_ms = vec![0.0; out.tokens.step_ms.len()];
    }
    if out.tokens.replayed {
        run.graph_batches += 1;
    }
    if out.tokens.step_ms.len() == run.step_ms.len() {
        for (acc, ms) in run.step_ms.iter_mut().zip(&out.tokens.step_ms) {
            *acc += ms;
        }
        run.prefill_ms += out.tokens.prefill_ms;
    } else {
        // A replayed loop without timestamps (a GPU that refused them in a graph).
        run.untimed_batches += 1;
        run.untimed_ms += out.tokens.loop_ms;
    }
    run.decode_ms += out.decode_ms;
    run.batches += 1;
    if run.schedule.is_none() {
        run.schedule = Some(out.tokens.schedule.clone());
    }
    if a.save_tokens {
        match &mut run.tokens {
            None => run.tokens = Some(out.tokens),
            Some(acc) => {
                for (k, t) in out.tokens.tokens.iter().enumerate() {
                    acc.tokens[k].extend_from_slice(t);
                }
                if let (Some(sa), Some(sb)) = (&mut acc.stats, &out.tokens.stats) {
                    for k in 0..sb.prob.len() {
                        sa.prob[k].extend_from_slice(&sb.prob[k]);
                        sa.entropy[k].extend_from_slice(&sb.entropy[k]);
                    }
                }
            }
        }
    }
    Ok(())
}

pub fn init(preset: &str, seed: u64, dtype: Dtype, output: &Path, overwrite: bool) -> Result<()> {
    let cfg = config::preset(preset)?;
    checkergen::paths::claim_output_file(output, overwrite, &[])?;
    let map = random_tensors(&cfg, seed)?;
    write_model(
        output,
        &cfg,
        &map,
        dtype,
        &[(
            "source",
            format!("checkergen init --preset {preset} --seed {seed}"),
        )],
    )?;
    let params: usize = map.values().map(|t| t.numel()).sum();
    println!(
        "wrote {} (preset {preset}, seed {seed}, {} tensors, {:.1} M parameters)",
        output.display(),
        map.len(),
        params as f64 / 1e6
    );
    Ok(())
}

fn describe(cfg: &ModelConfig) -> String {
    let d = &cfg.decoder;
    format!(
        "transformer: C={} layers={} heads={} (head_dim {}) ffn={} rms_eps={:e} mixing_layers={} \
         head_mlp={}\nclasses: {}  codebook: {} x {}  img_size: {}  scale_ratio: {}  \
         scale_min_size: {}\ndecoder: ch={} ch_mult={:?} res_blocks={} z_channels={} (stride {})",
        cfg.hidden_size,
        cfg.num_layers,
        cfg.num_heads,
        cfg.head_dim(),
        cfg.ffn_dim,
        cfg.rms_norm_eps,
        cfg.num_mixing_layers,
        cfg.use_head_mlp,
        cfg.num_classes,
        d.n_embed,
        d.embed_dim,
        cfg.img_size,
        cfg.scale_ratio,
        cfg.scale_min_size,
        d.ch,
        d.ch_mult,
        d.num_res_blocks,
        d.z_channels,
        d.stride()
    )
}

/// `inspect`: by default the header alone (the file is mapped, only its header's pages are
/// read: names, dtypes, shapes and offsets checked against the configuration); `verify`
/// loads the model as `sample` does, every value checked.
pub fn inspect(path: &Path, verify: bool) -> Result<()> {
    let header = checkergen::model::ModelHeader::read(path)?;
    if verify {
        Model::load(path)?;
    }
    let cfg = &header.config;
    println!("{}", path.display());
    println!("{}", describe(cfg));
    let (t, d) = header.parameter_counts();
    println!(
        "parameters: transformer {:.2} M, decoder+codebook {:.2} M, total {:.2} M",
        t as f64 / 1e6,
        d as f64 / 1e6,
        (t + d) as f64 / 1e6
    );
    if header.has_encoder {
        let e: usize = checkergen::model::encoder::EncoderWeights::expected_tensors(&cfg.decoder)
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum();
        println!(
            "encoder: {:.2} M parameters (encode and score available)",
            e as f64 / 1e6
        );
    } else {
        println!("encoder: none (sampling only; encode and score need it)");
    }
    // Storage: tensors per dtype, as the header says.
    let mut dtypes: std::collections::BTreeMap<String, usize> = Default::default();
    for t in &header.tensors {
        *dtypes.entry(format!("{:?}", t.dtype)).or_default() += 1;
    }
    let dtypes: Vec<String> = dtypes.iter().map(|(d, n)| format!("{n} {d}")).collect();
    println!(
        "file: {:.1} MB, {} tensors ({}); {}",
        header.file_bytes as f64 / 1e6,
        header.tensors.len(),
        dtypes.join(", "),
        if verify {
            "every value loaded and checked (--verify)"
        } else {
            "header checked, values not read (--verify loads and checks them)"
        }
    );
    // The schedule `sample` runs by default (the config's steps_per_scale is the reference's
    // training-time num_blocks_per_scale, not a sampling setting).
    let k = pipeline::DEFAULT_STEPS_PER_SCALE;
    let sched = Schedule::uniform(&header.scale_sizes, k)?;
    println!(
        "scales {:?} ({} tokens); `sample` defaults to {k} steps per scale: {} serial steps \
         (cfg {}, from step {})",
        header.scale_sizes,
        sched.total_tokens(),
        sched.total_steps(),
        pipeline::DEFAULT_CFG,
        pipeline::DEFAULT_CFG_START_STEP
    );
    Ok(())
}

#[derive(Args)]
pub struct BenchDecodeArgs {
    /// Model file whose decoder to time; without it, random weights of --preset.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Preset for random decoder weights when no --model is given.
    #[arg(long, default_value = "L-2x")]
    preset: String,
    #[arg(long, default_value_t = 64)]
    batch: usize,
    /// Timed decodes (median reported).
    #[arg(long, default_value_t = 10)]
    iters: usize,
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// 16-bit storage of the decoder's activations and weights.
    #[arg(long, value_enum, default_value_t = PrecisionArg::Fp16)]
    precision: PrecisionArg,
    /// 3x3 convolution kernel: tensor-core implicit GEMM (v2) or direct (v1 reference).
    #[arg(long, value_enum, default_value_t = ConvArg::Tc)]
    conv: ConvArg,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    Fp16,
    Bf16,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum ConvArg {
    Tc,
    Direct,
}

#[cfg(not(feature = "cuda"))]
pub fn bench_decode(_a: BenchDecodeArgs) -> Result<()> {
    bail!("bench-decode needs the `cuda` feature")
}

#[cfg(feature = "cuda")]
pub fn bench_decode(a: BenchDecodeArgs) -> Result<()> {
    use checkergen::cuda::decoder::{ConvKernel, GpuDecoder, StorageDtype, bench_decode};
    use checkergen::model::decoder::DecoderWeights;
    let max = checkergen::limits::MAX_IMAGES;
    if a.batch == 0 {
        bail!("--batch must be at least 1");
    }
    if a.batch > max {
        bail!("--batch {}: at most {max} per batch", a.batch);
    }
    crate::bench_cmd::check_repeats(a.warmup, a.iters)?;
    if a.model.is_none() {
        // An unknown preset is named before the GPU is looked for.
        config::preset(&a.preset)?;
    }
    let Some(gpu) = checkergen::cuda::Gpu::try_new()? else {
        bail!("bench-decode: no CUDA driver or GPU found on this machine");
    };
    let (cfg, dec) = match &a.model {
        Some(p) => {
            let m = Model::load(p)?;
            (m.config.clone(), m.decoder)
        }
        None => {
            let cfg = config::preset(&a.preset)?;
            let map = checkergen::model::init::random_tensors_where(&cfg, 0, |n| {
                n.starts_with("autoenc.")
            })?;
            let dec = DecoderWeights::from_tensors(&cfg.decoder, &map)?;
            (cfg, dec)
        }
    };
    let precision = match a.precision {
        PrecisionArg::Fp16 => StorageDtype::F16,
        PrecisionArg::Bf16 => StorageDtype::Bf16,
    };
    let (free0, _) = gpu.mem_get_info()?;
    let mut gdec = GpuDecoder::with_dtype(&gpu, &dec, precision)?;
    gdec.set_conv_kernel(match a.conv {
        ConvArg::Tc => ConvKernel::TensorCore,
        ConvArg::Direct => ConvKernel::Direct,
    });
    let s = cfg.latent_size();
    let r = bench_decode(&gpu, &gdec, a.batch, s, a.warmup, a.iters)?;
    let (free1, _) = gpu.mem_get_info()?;
    let used_gb = free0.saturating_sub(free1) as f64 / 1e9;
    let peak = crate::bench_cmd::roofline(&gpu.name).map(|(flops, _)| flops / 1e12);
    if a.json {
        println!(
            "{}",
            serde_json::json!({
                "device": gpu.name, "precision": format!("{:?}", r.dtype),
                "conv": format!("{:?}", r.conv_kernel), "batch": r.batch, "side": r.side,
                "ms_median": r.ms_median, "ms_min": r.ms_min, "images_per_s": r.images_per_s,
                "tflops": r.tflops, "percent_of_peak": peak.map(|p| 100.0 * r.tflops / p),
                "device_memory_gb": used_gb,
            })
        );
    } else {
        println!(
            "{} | {:?} {:?} | batch {} at {} px | {:.2} ms/batch (min {:.2}) | {:.0} images/s | \
             {:.1} TFLOP/s{} | {:.2} GB device memory (weights + workspace)",
            gpu.name,
            r.dtype,
            r.conv_kernel,
            r.batch,
            r.side,
            r.ms_median,
            r.ms_min,
            r.images_per_s,
            r.tflops,
            peak.map(|p| format!(" ({:.1} % of {p} peak)", 100.0 * r.tflops / p))
                .unwrap_or_default(),
            used_gb
        );
    }
    Ok(())
}
