//! `checkergen bench`: the whole sampler (token loop + decode) over a list of batch sizes,
//! with warm-up and the median of repeats: images/s, time per serial step and per scale, the
//! transformer/decoder split, peak memory, achieved TFLOP/s and % of the device's floor.

use crate::commands::{
    Device, DeviceModel, PrecisionArgs, device_name, is_emu, on_backend, pick_gpu_model,
};
use anyhow::{Context, Result, bail};
use checkergen::flops::{decoder_flops, transformer_flops, transformer_weight_bytes};
use checkergen::model::Model;
use checkergen::model::config::preset;
use checkergen::model::init::random_tensors;
use checkergen::pipeline::{self, SampleOptions, Samples, Steps};
use clap::Args;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// Model file to time; without it, random weights of --preset (speed does not depend on
    /// the weights' values).
    #[arg(long, conflicts_with = "preset")]
    model: Option<PathBuf>,
    /// tiny, S-2x, L-2x or L-4x (random weights) when no --model is given.
    #[arg(long)]
    preset: Option<String>,
    /// Batch sizes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    batch: Vec<usize>,
    #[command(flatten)]
    run: TimedRuns,
    #[arg(long, default_value_t = pipeline::DEFAULT_STEPS_PER_SCALE)]
    steps_per_scale: usize,
    /// One JSON object per batch size, one per line (fields in README).
    #[arg(long)]
    json: bool,
    /// Walk the CUDA engine's exact launch sequence on the emulator without running any
    /// kernel (needs `--device emu`) and print the traffic ledger: launches per step, bytes
    /// and FLOPs per image, and a *modelled* (not measured) H100/H200 time.
    #[arg(long)]
    dry_run: bool,
}

/// `--warmup` and `--iters` within 0..=[`MAX_REPEATS`] and 1..=[`MAX_REPEATS`].
///
/// [`MAX_REPEATS`]: checkergen::limits::MAX_REPEATS
pub(crate) fn check_repeats(warmup: usize, iters: usize) -> Result<()> {
    let max = checkergen::limits::MAX_REPEATS;
    if iters == 0 || iters > max {
        bail!("--iters {iters}: must be 1 to {max}");
    }
    if warmup > max {
        bail!("--warmup {warmup}: at most {max}");
    }
    Ok(())
}

/// How `bench` and `steps` time a configuration: warm-up, repeats, device, guidance.
#[derive(Args)]
pub struct TimedRuns {
    /// Untimed runs before each measurement (on a GPU with graphs at least 2: the eager run
    /// and the capture).
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs per measurement (medians reported).
    #[arg(long, default_value_t = 3)]
    pub iters: usize,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    pub device: Device,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Guidance scale (0 = off).
    #[arg(long, default_value_t = pipeline::DEFAULT_CFG)]
    pub cfg: f32,
    #[arg(long, default_value_t = pipeline::DEFAULT_CFG_START_STEP)]
    pub cfg_start_step: usize,
    /// Eager kernel launches only (no CUDA graphs). With graphs, the timed runs replay each
    /// batch shape's recorded token loop and decode; the per-step figures come from the
    /// timestamps recorded in the graph (from one extra eager run if the GPU refused them).
    #[arg(long)]
    pub no_graph: bool,
}

/// The medians of one batch size's timed runs.
pub(crate) struct Row {
    pub(crate) s_per_batch: f64,
    ms_per_step: Vec<f64>,
    ms_by_scale: Vec<f64>,
    transformer_s: f64,
    decode_s: f64,
    peak_mem_bytes: u64,
    pub(crate) flops_per_image: f64,
    serial_steps: usize,
}

/// Dense 16-bit tensor peak (FLOP/s) and memory bandwidth (bytes/s) of known devices.
pub fn roofline(device_name: &str) -> Option<(f64, f64)> {
    if device_name.contains("H200") {
        Some((989.4e12, 4.8e12))
    } else if device_name.contains("H100") {
        Some((989.4e12, 3.35e12))
    } else if device_name.contains("A100") {
        Some((312.0e12, 2.0e12))
    } else {
        None
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Peak resident memory of this process since the last reset (Linux: VmHWM, reset by
/// writing 5 to /proc/self/clear_refs); None where unavailable.
fn host_peak(reset: bool) -> Option<u64> {
    if reset {
        std::fs::write("/proc/self/clear_refs", "5").ok()?;
    }
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    Some(l.split_whitespace().nth(1)?.parse::<u64>().ok()? * 1024)
}

pub fn bench(a: BenchArgs) -> Result<()> {
    if a.batch.is_empty() || a.batch.contains(&0) {
        bail!("--batch needs batch sizes of at least 1");
    }
    a.run.check()?;
    if a.steps_per_scale == 0 {
        bail!("--steps-per-scale must be at least 1");
    }
    if a.dry_run {
        return dry_run(&a);
    }
    let (mut model, source) = match (&a.model, &a.preset) {
        (Some(p), _) => (Model::load(p)?, p.display().to_string()),
        (None, p) => {
            let name = p.as_deref().unwrap_or("L-2x");
            let cfg = preset(name)?;
            let map = random_tensors(&cfg, 0)?;
            (
                Model::from_tensors(cfg, &map)?,
                format!("preset {name} (random weights)"),
            )
        }
    };
    let gpu = pick_device(&a.run, &mut model)?;
    let dev = BenchDevice::new(&model, gpu);
    let device = dev.describe();
    let requests = batch_requests(&a, &model, dev.batch_memory()?, !a.run.no_graph)?;
    if dev.is_emu() {
        eprintln!(
            "note: on the host emulator these times mean nothing (it checks the CUDA path, it \
             does not model its speed)"
        );
    }
    if !a.json {
        println!(
            "bench: {source} on {device}; cfg {} (from step {}), {} steps per scale; \
                  {} warm-up + median of {} runs",
            a.run.cfg, a.run.cfg_start_step, a.steps_per_scale, a.run.warmup, a.run.iters
        );
        println!(
            "{:>6} {:>10} {:>10} {:>9} {:>9} {:>8} {:>9} {:>8} {:>10}",
            "batch",
            "images/s",
            "s/batch",
            "transf s",
            "decode s",
            "ms/step",
            "TFLOP/s",
            "% floor",
            "peak MiB"
        );
    }
    for o in &requests {
        let b = o.labels.len();
        let row = dev.run_batch(o, a.run.warmup, a.run.iters)?;
        let images_per_s = b as f64 / row.s_per_batch;
        let flops = row.flops_per_image * b as f64;
        let tflops = flops / row.s_per_batch / 1e12;
        // The floor: the larger of FLOPs / peak and the weights read per step / bandwidth.
        let floor_s = roofline(&device).map(|(peak, bw)| {
            let bytes = row.serial_steps as f64 * transformer_weight_bytes(&model.config, 2.0);
            (flops / peak).max(bytes / bw)
        });
        let pct = floor_s.map(|f| 100.0 * f / row.s_per_batch);
        if a.json {
            let j = serde_json::json!({
                "batch": b,
                "images_per_s": images_per_s,
                "s_per_batch": row.s_per_batch,
                "ms_per_step": row.ms_per_step,
                "ms_by_scale": row.ms_by_scale,
                "transformer_s": row.transformer_s,
                "decode_s": row.decode_s,
                "peak_mem_bytes": row.peak_mem_bytes,
                "device": device,
                "model": source,
                "serial_steps": row.serial_steps,
                "flops_per_image": row.flops_per_image,
                "tflops": tflops,
                "percent_of_floor": pct,
                "cfg": a.run.cfg,
                "cfg_start_step": a.run.cfg_start_step,
                "steps_per_scale": a.steps_per_scale,
                "warmup": a.run.warmup,
                "iters": a.run.iters,
                "times_meaningful": !dev.is_emu(),
            });
            println!("{j}");
        } else {
            let ms_step = row.ms_per_step.iter().sum::<f64>() / row.serial_steps as f64;
            println!(
                "{:>6} {:>10.2} {:>10.4} {:>9.4} {:>9.4} {:>8.2} {:>9.3} {:>8} {:>10.1}",
                b,
                images_per_s,
                row.s_per_batch,
                row.transformer_s,
                row.decode_s,
                ms_step,
                tflops,
                pct.map_or("-".to_string(), |p| format!("{p:.1}")),
                row.peak_mem_bytes as f64 / (1u64 << 20) as f64
            );
        }
    }
    Ok(())
}

/// `--device` for a bench: the GPU (or emulator) with the model uploaded, or the CPU.
/// `--precision` applies to the CPU's model.
pub(crate) fn pick_device(run: &TimedRuns, model: &mut Model) -> Result<DeviceModel> {
    Ok(pick_gpu_model(run.device, run.precision, model)?.0)
}

impl TimedRuns {
    /// The repeat counts within their limits.
    pub fn check(&self) -> Result<()> {
        check_repeats(self.warmup, self.iters)
    }
}

/// The device a bench runs on, with its model.
pub(crate) struct BenchDevice<'m> {
    model: &'m Model,
    gpu: DeviceModel,
}

impl<'m> BenchDevice<'m> {
    pub(crate) fn new(model: &'m Model, gpu: DeviceModel) -> Self {
        BenchDevice { model, gpu }
    }

    pub fn is_emu(&self) -> bool {
        is_emu(&self.gpu)
    }

    pub fn describe(&self) -> String {
        device_name(&self.gpu, self.model)
    }

    /// The memory batches on this device are planned against (`pipeline::batch_rule`).
    pub fn batch_memory(&self) -> Result<pipeline::Memory> {
        match &self.gpu {
            #[cfg(feature = "cuda")]
            Some(gm) => gm.gpu.memory(),
            _ => Ok(pipeline::Memory::Host),
        }
    }

    /// Memory in use now: resident host memory since the reset, or device memory in use.
    fn memory(&self, reset: bool) -> u64 {
        match &self.gpu {
            #[cfg(feature = "cuda")]
            Some(gm) => gm
                .gpu
                .mem_get_info()
                .map_or(0, |(free, total)| (total - free) as u64),
            _ => host_peak(reset).unwrap_or(0),
        }
    }

    /// One sampler run; its wall time in seconds (CUDA events on a GPU).
    fn run_once(&self, o: &SampleOptions) -> Result<(f64, Samples)> {
        let mut out = None;
        let mut run = || -> Result<()> {
            out = Some(on_backend(&self.gpu, self.model, |be| {
                pipeline::sample(be, o)
            })?);
            Ok(())
        };
        let s = match &self.gpu {
            #[cfg(feature = "cuda")]
            Some(gm) => gm.gpu.time_ms(run)? / 1e3,
            _ => {
                let t = Instant::now();
                run()?;
                t.elapsed().as_secs_f64()
            }
        };
        Ok((s, out.context("no samples")?))
    }

    pub(crate) fn run_batch(&self, o: &SampleOptions, warmup: usize, iters: usize) -> Result<Row> {
        // On a GPU with graphs, the first run of a shape is eager and the second records the
        // graph: both are warm-up, so the timed runs are replays.
        let warmup = if o.graph && self.gpu.is_some() {
            warmup.max(2)
        } else {
            warmup
        };
        for _ in 0..warmup {
            self.run_once(o)?;
        }
        let mut peak = self.memory(true);
        let (mut total, mut transf, mut dec) = (Vec::new(), Vec::new(), Vec::new());
        let mut steps: Vec<Vec<f64>> = Vec::new();
        let mut last = None;
        for _ in 0..iters {
            let (s, out) = self.run_once(o)?;
            peak = peak.max(self.memory(false));
            total.push(s);
            let t = &out.tokens;
            transf.push(t.loop_ms / 1e3);
            dec.push(out.decode_ms / 1e3);
            steps.push(t.step_ms.clone());
            last = Some(out);
        }
        let out = last.context("no timed run")?;
        if steps.iter().any(Vec::is_empty) {
            // Graphs captured without timestamps have no step times: one eager run gives them.
            let mut eager = o.clone();
            eager.graph = false;
            steps = vec![self.run_once(&eager)?.1.tokens.step_ms];
        }
        let sched = &out.tokens.schedule;
        let ms_per_step: Vec<f64> = (0..sched.total_steps())
            .map(|k| median(steps.iter().map(|v| v[k]).collect()))
            .collect();
        let ms_by_scale = (0..sched.scales.len())
            .map(|k| {
                sched
                    .steps
                    .iter()
                    .zip(&ms_per_step)
                    .filter(|(st, _)| st.scale == k)
                    .map(|(_, ms)| ms)
                    .sum()
            })
            .collect();
        let model = self.model;
        let s_last = *model.scale_sizes.last().context("no scales")?;
        let dec_flops: f64 = decoder_flops(&model.config.decoder, s_last)
            .iter()
            .map(|st| st.total())
            .sum();
        Ok(Row {
            s_per_batch: median(total),
            ms_per_step,
            ms_by_scale,
            transformer_s: median(transf),
            decode_s: median(dec),
            peak_mem_bytes: peak,
            flops_per_image: transformer_flops(&model.config, sched, o.cfg > 0.0) + dec_flops,
            serial_steps: sched.total_steps(),
        })
    }
}

/// `bench --dry-run`: the engine's launch sequence on the emulator's dry run (nothing
/// executes, no memory is backed), summed from the traffic ledger.
/// Every batch's request, each checked against the model and `mem` before anything runs or
/// is printed (a bad batch size is one line, not a table cut short).
fn batch_requests(
    a: &BenchArgs,
    model: &Model,
    mem: pipeline::Memory,
    graph: bool,
) -> Result<Vec<SampleOptions>> {
    a.batch
        .iter()
        .map(|&b| {
            // The size alone first: a huge count is refused before its labels are built.
            pipeline::check_batch_size(&model.config, b, a.run.cfg > 0.0, mem)
                .with_context(|| format!("batch {b}"))?;
            let mut o = SampleOptions::new((0..b).map(|i| i % model.config.num_classes).collect());
            o.cfg = a.run.cfg;
            o.cfg_start_step = a.run.cfg_start_step;
            o.graph = graph;
            o.steps = Steps::Uniform(a.steps_per_scale);
            pipeline::validate_options(&model.config, model.scale_sizes.len(), &o, mem)
                .with_context(|| format!("batch {b}"))?;
            Ok(o)
        })
        .collect()
}

#[cfg(feature = "cuda")]
fn dry_run(a: &BenchArgs) -> Result<()> {
    use checkergen::cuda::engine::{GpuBackend, GpuModel};
    use checkergen::cuda::ledger::{self, DECODER, H100, H200, LAUNCH_US, TRANSFORMER};
    if a.run.device != Device::Emu {
        bail!("--dry-run walks the CUDA engine on the emulator: pass --device emu");
    }
    let t0 = Instant::now();
    let (model, source) = match (&a.model, &a.preset) {
        (Some(p), _) => (Model::load(p)?, p.display().to_string()),
        (None, p) => {
            // Zero weights: a dry run reads no value, and zeros cost no CPU time.
            let name = p.as_deref().unwrap_or("L-2x");
            let cfg = preset(name)?;
            let mut map = checkergen::model::file::TensorMap::new();
            for (n, shape) in checkergen::model::expected_tensors(&cfg)? {
                let len = shape.iter().product();
                map.insert(
                    n,
                    checkergen::model::file::Tensor::new(shape, vec![0.0f32; len]),
                );
            }
            (
                Model::from_tensors(cfg, &map)?,
                format!("preset {name} (zero weights)"),
            )
        }
    };
    let gm = GpuModel::new(checkergen::cuda::Gpu::emu_dry()?, &model)?;
    let g = &gm.gpu;
    let requests = batch_requests(a, &model, g.memory()?, false)?;
    if !a.json {
        println!(
            "bench --dry-run: {source}; cfg {} (from step {}), {} steps per scale; the CUDA \
             engine's launches with eager launches, nothing executed",
            a.run.cfg, a.run.cfg_start_step, a.steps_per_scale
        );
        println!(
            "modelled_ms is a MODEL, not a measurement: sum over launches of max(bytes / \
             bandwidth, FLOPs / peak) + {LAUNCH_US} us per launch; h100 {:.2} TB/s, h200 {:.2} \
             TB/s, {:.0} dense bf16 TFLOP/s both",
            H100.bandwidth / 1e12,
            H200.bandwidth / 1e12,
            H100.flops / 1e12
        );
        println!(
            "{:>6} {:>8} {:>10} {:>14} {:>14} {:>14} {:>12} {:>12}",
            "batch",
            "steps",
            "launch/step",
            "transf B/img",
            "decoder B/img",
            "FLOP/img",
            "model ms h100",
            "model ms h200"
        );
    }
    for o in &requests {
        let b = o.labels.len();
        g.ledger().clear();
        let out = pipeline::sample(&mut GpuBackend::new(&gm), o)
            .with_context(|| format!("dry run of batch {b}"))?;
        let led = g.ledger().clone();
        let steps = out.tokens.schedule.total_steps();
        let per_img = |t: u64| t as f64 / b as f64;
        let transformer = led.total(Some(TRANSFORMER));
        let decoder = led.total(Some(DECODER));
        let flops = led.total(None).flops;
        let launches_per_step = led.launches(Some(TRANSFORMER)) as f64 / steps as f64;
        let ms100 = ledger::model_ms(&led.records, H100, LAUNCH_US);
        let ms200 = ledger::model_ms(&led.records, H200, LAUNCH_US);
        if a.json {
            let by_kernel: Vec<_> = led
                .by_name()
                .into_iter()
                .map(|(part, name, n, t)| {
                    let recs: Vec<_> = led
                        .records
                        .iter()
                        .filter(|r| r.part == part && r.name == name)
                        .collect();
                    serde_json::json!({
                        "part": part,
                        "name": name,
                        "launches": n,
                        "bytes_read": t.read,
                        "bytes_written": t.write,
                        "flops": t.flops,
                        "modelled_ms_h100": ledger::model_ms(recs.iter().copied(), H100, LAUNCH_US),
                        "modelled_ms_h200": ledger::model_ms(recs.iter().copied(), H200, LAUNCH_US),
                    })
                })
                .collect();
            let j = serde_json::json!({
                "batch": b,
                "model": source,
                "dry_run": true,
                "serial_steps": steps,
                "launches": led.launches(None),
                "launches_per_step": launches_per_step,
                "decoder_launches": led.launches(Some(DECODER)),
                "transformer_bytes_per_image": per_img(transformer.bytes()),
                "decoder_bytes_per_image": per_img(decoder.bytes()),
                "flops_per_image": per_img(flops),
                "modelled_ms_h100": ms100,
                "modelled_ms_h200": ms200,
                "modelled": "model, not a measurement: sum over launches of max(bytes/bandwidth, flops/peak) + launch_us per launch",
                "launch_us": LAUNCH_US,
                "h100_bytes_per_s": H100.bandwidth,
                "h200_bytes_per_s": H200.bandwidth,
                "peak_flops": H100.flops,
                "cfg": a.run.cfg,
                "cfg_start_step": a.run.cfg_start_step,
                "steps_per_scale": a.steps_per_scale,
                "by_kernel": by_kernel,
            });
            println!("{j}");
        } else {
            println!(
                "{:>6} {:>8} {:>10.1} {:>14.4e} {:>14.4e} {:>14.4e} {:>12.2} {:>12.2}",
                b,
                steps,
                launches_per_step,
                per_img(transformer.bytes()),
                per_img(decoder.bytes()),
                per_img(flops),
                ms100,
                ms200
            );
        }
    }
    if !a.json {
        println!("({:.1} s)", t0.elapsed().as_secs_f64());
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn dry_run(_: &BenchArgs) -> Result<()> {
    bail!("--dry-run needs the `cuda` feature (the emulator)")
}
