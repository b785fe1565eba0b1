//! `checkergen bench`: the whole sampler (token loop + decode) over a list of batch sizes,
//! with warm-up and the median of repeats: images/s, time per serial step and per scale, the
//! transformer/decoder split, peak memory, achieved TFLOP/s and % of the device's floor.

use crate::args::{DeviceArg, PrecisionArgs, open_model};
use crate::progress::{Off, Progress};
use anyhow::{Context, Result, bail};
use checkergen::Model;
use checkergen::flops::{decoder_flops, roofline, transformer_flops, transformer_weight_bytes};
use checkergen::limits::check_repeats;
use checkergen::pipeline::{self, SampleOptions, Samples, Steps};
use clap::{Args, ValueEnum};
use std::path::PathBuf;

/// Benchmark the whole sampler (token loop + decode) over batch sizes: images/s, ms per
/// serial step and scale, transformer/decoder split, peak memory, TFLOP/s, % of floor.
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
    /// One JSON object per batch size, one per line (fields in docs/cli.md).
    #[arg(long)]
    json: bool,
    /// Walk the CUDA engine's exact launch sequence on the emulator without running any
    /// kernel (needs `--device emu`) and print the traffic ledger: launches per step, bytes
    /// and FLOPs per image, and a *modelled* (not measured) H100/H200 time.
    #[arg(long)]
    dry_run: bool,
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
    #[command(flatten)]
    pub device: DeviceArg,
    #[command(flatten)]
    pub precision: PrecisionArgs,
    /// Guidance scale (0 = off).
    #[arg(long, default_value_t = pipeline::DEFAULT_CFG)]
    pub cfg: f32,
    #[arg(long, default_value_t = pipeline::DEFAULT_CFG_START_STEP)]
    pub cfg_start_step: usize,
    /// First global step at which guidance no longer applies (default: to the end); the
    /// unconditional rows then leave the batch.
    #[arg(long)]
    pub cfg_end_step: Option<usize>,
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

/// A table's header from `spec`, its columns as "name width" separated by commas: each name
/// right-aligned in its width, one space apart.
fn print_header(spec: &str) {
    let cells: Vec<String> = spec
        .split(", ")
        .map(|col| {
            let (n, w) = col.rsplit_once(' ').expect("a column is `name width`");
            let w: usize = w.parse().expect("a column's width is a number");
            format!("{n:>w$}")
        })
        .collect();
    println!("{}", cells.join(" "));
}

/// The line `bench` and `steps` open their tables with (nothing with --json): the command,
/// the model, the device (its kernels included: NVRTC or cubins), guidance, `what` and the
/// repeats; and on the emulator, always, the note that its times mean nothing (stderr).
pub(crate) fn print_run_header(
    cmd: &str,
    source: &str,
    dev: &BenchDevice,
    run: &TimedRuns,
    what: &str,
    json: bool,
) {
    if dev.is_emu() {
        eprintln!(
            "note: on the host emulator these times mean nothing (it checks the CUDA path, it \
             does not model its speed)"
        );
    }
    if json {
        return;
    }
    let end = run
        .cfg_end_step
        .map_or(String::new(), |e| format!(" to step {e}"));
    dev.progress.suspend(|| {
        println!(
            "{cmd}: {source} on {}; cfg {} (from step {}{end}){what}; {} warm-up + median of \
             {} runs",
            dev.describe(),
            run.cfg,
            run.cfg_start_step,
            dev.warmups(!run.no_graph, run.warmup),
            run.iters
        )
    });
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
    let (model, source) = open_model(
        a.model.as_deref(),
        Some(a.preset.as_deref().unwrap_or("L-2x")),
        a.run.device,
        a.run.precision,
    )?;
    let progress = Progress::new("bench", "runs", Off::Silent, false);
    let dev = BenchDevice::new(&model, &progress);
    let device = dev.describe();
    let requests = batch_requests(&a, model.host_model(), model.memory()?, !a.run.no_graph)?;
    let per_batch = (dev.warmups(!a.run.no_graph, a.run.warmup) + a.run.iters) as u64;
    progress.update(0, per_batch * requests.len() as u64);
    let what = format!(", {} steps per scale", a.steps_per_scale);
    print_run_header("bench", &source, &dev, &a.run, &what, a.json);
    if !a.json {
        progress.suspend(|| {
            print_header(
                "batch 6, images/s 10, s/batch 10, transf s 9, decode s 9, ms/step 8, \
                 TFLOP/s 9, % floor 8, peak MiB 10",
            )
        });
    }
    for o in &requests {
        let b = o.labels.len();
        progress.message(format!("batch {b}"));
        let row = dev.run_batch(o, a.run.warmup, a.run.iters)?;
        let images_per_s = b as f64 / row.s_per_batch;
        let flops = row.flops_per_image * b as f64;
        let tflops = flops / row.s_per_batch / 1e12;
        // The floor: the larger of FLOPs / peak and the weights read per step / bandwidth.
        let floor_s = roofline(&device).map(|(peak, bw)| {
            let bytes =
                row.serial_steps as f64 * transformer_weight_bytes(&model.host_model().config, 2.0);
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
                "cfg_end_step": a.run.cfg_end_step,
                "steps_per_scale": a.steps_per_scale,
                "warmup": a.run.warmup,
                "iters": a.run.iters,
                "times_meaningful": !dev.is_emu(),
            });
            progress.suspend(|| println!("{j}"));
        } else {
            let ms_step = row.ms_per_step.iter().sum::<f64>() / row.serial_steps as f64;
            progress.suspend(|| {
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
                )
            });
        }
    }
    progress.finish();
    Ok(())
}

impl TimedRuns {
    /// The repeat counts within their limits.
    pub fn check(&self) -> Result<()> {
        check_repeats(self.warmup, self.iters)
    }
}

/// The device a bench runs on, with its model; each sampler run advances `progress`.
pub(crate) struct BenchDevice<'m> {
    model: &'m Model,
    progress: &'m Progress,
}

/// The timed runs of one configuration, gathered one at a time (`steps` interleaves the
/// runs of its configurations).
pub(crate) struct Runs {
    total: Vec<f64>,
    transf: Vec<f64>,
    dec: Vec<f64>,
    steps: Vec<Vec<f64>>,
    schedule: Option<checkergen::order::Schedule>,
    peak: u64,
}

impl<'m> BenchDevice<'m> {
    pub(crate) fn new(model: &'m Model, progress: &'m Progress) -> Self {
        BenchDevice { model, progress }
    }

    pub fn is_emu(&self) -> bool {
        self.model.is_emulated()
    }

    pub fn describe(&self) -> String {
        self.model.device().to_string()
    }

    /// Memory in use now: device memory in use, or resident host memory since the reset.
    fn memory(&self, reset: bool) -> u64 {
        self.model
            .device_memory_in_use()
            .unwrap_or_else(|| host_peak(reset).unwrap_or(0))
    }

    /// One sampler run; its time in seconds (CUDA events on a GPU).
    fn run_once(&self, o: &SampleOptions) -> Result<(f64, Samples)> {
        let r = self.model.timed_with_backend(|be| pipeline::sample(be, o));
        self.progress.inc(1);
        r
    }

    /// The untimed runs before a configuration's timed ones, `asked` or more: on a GPU with
    /// graphs, the first run of a shape is eager and the second records the graph, so both
    /// are warm-up and the timed runs are replays.
    pub(crate) fn warmups(&self, graph: bool, asked: usize) -> usize {
        if graph && !self.model.is_cpu() {
            asked.max(2)
        } else {
            asked
        }
    }

    /// The untimed runs of `o` ([`Self::warmups`] of `asked`); how many ran.
    pub(crate) fn warm_up(&self, o: &SampleOptions, asked: usize) -> Result<usize> {
        let n = self.warmups(o.graph, asked);
        for _ in 0..n {
            self.run_once(o)?;
        }
        Ok(n)
    }

    /// Before the first timed run of a configuration: its record (host peak memory reset).
    pub(crate) fn runs(&self) -> Runs {
        Runs {
            total: Vec::new(),
            transf: Vec::new(),
            dec: Vec::new(),
            steps: Vec::new(),
            schedule: None,
            peak: self.memory(true),
        }
    }

    /// One timed run of `o`, added to `runs`.
    pub(crate) fn timed(&self, o: &SampleOptions, runs: &mut Runs) -> Result<()> {
        let (s, out) = self.run_once(o)?;
        runs.peak = runs.peak.max(self.memory(false));
        runs.total.push(s);
        let t = out.tokens;
        runs.transf.push(t.loop_ms / 1e3);
        runs.dec.push(out.decode_ms / 1e3);
        runs.steps.push(t.step_ms);
        runs.schedule = Some(t.schedule);
        Ok(())
    }

    /// Warm-up, then `iters` timed runs of `o`, and their medians.
    pub(crate) fn run_batch(&self, o: &SampleOptions, warmup: usize, iters: usize) -> Result<Row> {
        self.warm_up(o, warmup)?;
        let mut runs = self.runs();
        for _ in 0..iters {
            self.timed(o, &mut runs)?;
        }
        self.row(o, runs)
    }

    /// The medians of the timed runs of `o`.
    pub(crate) fn row(&self, o: &SampleOptions, runs: Runs) -> Result<Row> {
        let Runs {
            total,
            transf,
            dec,
            mut steps,
            schedule,
            peak,
        } = runs;
        let sched = schedule.context("no timed run")?;
        if steps.iter().any(Vec::is_empty) {
            // Graphs captured without timestamps have no step times: one eager run gives them.
            let mut eager = o.clone();
            eager.graph = false;
            let (_, out) = self
                .model
                .timed_with_backend(|be| pipeline::sample(be, &eager))?;
            steps = vec![out.tokens.step_ms];
        }
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
        let model = self.model.host_model();
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
            flops_per_image: transformer_flops(&model.config, &sched, o.cfg > 0.0) + dec_flops,
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
    model: &checkergen::model::Model,
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
            o.cfg_end_step = a.run.cfg_end_step;
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
    use checkergen::cuda::ledger::{self, DECODER, H100, H200, LAUNCH_US, TRANSFORMER};
    use checkergen::model::Model as HostModel;
    if a.run.device.device != checkergen::Device::Emulated {
        bail!("--dry-run walks the CUDA engine on the emulator: pass --device emu");
    }
    let t0 = std::time::Instant::now();
    let (model, source) = match (&a.model, &a.preset) {
        (Some(p), _) => (HostModel::load(p)?, p.display().to_string()),
        (None, p) => {
            // Zero weights: a dry run reads no value, and zeros cost no CPU time.
            let name = p.as_deref().unwrap_or("L-2x");
            let cfg = checkergen::model::config::preset(name)?;
            let mut map = checkergen::model::file::TensorMap::new();
            for (n, shape) in checkergen::model::expected_tensors(&cfg)? {
                let len = shape.iter().product();
                map.insert(
                    n,
                    checkergen::model::file::Tensor::new(shape, vec![0.0f32; len]),
                );
            }
            (
                HostModel::from_tensors(cfg, &map)?,
                format!("preset {name} (zero weights)"),
            )
        }
    };
    let dry = Model::dry_run(model)?;
    let requests = batch_requests(a, dry.host_model(), dry.memory()?, false)?;
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
        print_header(
            "batch 6, steps 8, launch/step 10, transf B/img 14, decoder B/img 14, FLOP/img 14, \
             model ms h100 12, model ms h200 12",
        );
    }
    for o in &requests {
        let b = o.labels.len();
        let (out, led) = dry
            .with_ledger(|be| pipeline::sample(be, o))
            .with_context(|| format!("dry run of batch {b}"))?;
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
                "cfg_end_step": a.run.cfg_end_step,
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

/// Benchmark the GPU VQ decoder: images/s, ms per batch, TFLOP/s, % of peak, memory.
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
    crate::args::check_batch("--batch", Some(a.batch))?;
    check_repeats(a.warmup, a.iters)?;
    if a.model.is_none() {
        // An unknown preset is named before the GPU is looked for.
        checkergen::model::config::preset(&a.preset)?;
    }
    let Some(gpu) = checkergen::cuda::Gpu::try_new()? else {
        bail!("bench-decode: no CUDA driver or GPU found on this machine");
    };
    let (cfg, dec) = match &a.model {
        Some(p) => {
            let m = checkergen::model::Model::load(p)?;
            (m.config.clone(), m.decoder)
        }
        None => {
            let cfg = checkergen::model::config::preset(&a.preset)?;
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
    let peak = roofline(&gpu.name).map(|(flops, _)| flops / 1e12);
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

// The timing subcommands besides `steps`.
#[derive(clap::Subcommand)]
pub enum Cmd {
    Bench(BenchArgs),
    BenchDecode(BenchDecodeArgs),
}

impl Cmd {
    pub fn run(self) -> Result<()> {
        match self {
            Cmd::Bench(a) => bench(a),
            Cmd::BenchDecode(a) => bench_decode(a),
        }
    }
}
