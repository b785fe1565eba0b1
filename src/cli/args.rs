//! What several subcommands share: the sampling settings, `--device`, `--precision`, and the
//! one way the command line opens a model (`open_model`, over the library's `Model`).

use anyhow::{Context, Result, bail};
use checkergen::model::weights::Precision;
use checkergen::pipeline::{self, SampleOptions, Steps};
use checkergen::sampling::TokenPolicy;
use checkergen::{Device, Model};
use clap::Args;
use std::path::Path;

/// `--device`, taken the same way by every subcommand that computes.
#[derive(Args, Clone, Copy)]
pub struct DeviceArg {
    /// Where to run: auto (the first GPU when one is usable, else the CPU), cpu, cuda (=
    /// cuda:0), cuda:N, or emu (the host-emulated CUDA device: the CUDA engine's exact
    /// kernels on the CPU with memory checking; for development and checking, slow).
    #[arg(long = "device", default_value = "auto", value_parser = parse_device)]
    pub device: Device,
}

fn parse_device(s: &str) -> std::result::Result<Device, String> {
    s.parse()
}

impl DeviceArg {
    /// How the user spelled it, for messages.
    pub fn flag(&self) -> String {
        match self.device {
            Device::Auto => "auto".into(),
            Device::Cpu => "cpu".into(),
            Device::Cuda(n) => format!("cuda:{n}"),
            Device::Emulated => "emu".into(),
        }
    }
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
    /// First global step at which guidance no longer applies (guidance on for start <= t <
    /// end; default: to the end). The unconditional rows then leave the batch: the
    /// remaining steps cost half.
    #[arg(long)]
    pub cfg_end_step: Option<usize>,
    /// Serial steps per scale.
    #[arg(long, default_value_t = pipeline::DEFAULT_STEPS_PER_SCALE, conflicts_with = "steps")]
    pub steps_per_scale: usize,
    /// Explicit steps for each scale, comma separated (one value per scale).
    #[arg(long, value_delimiter = ',')]
    pub steps: Option<Vec<usize>>,
    /// Sampling temperature; 0 = greedy (argmax).
    #[arg(long, default_value_t = pipeline::DEFAULT_TEMPERATURE, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep only the k most likely tokens before sampling (k >= 1; default: all).
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches p (0 < p
    /// <= 1; default: all).
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Seed of the sampling noise (keyed by the seed and the image's index, so an image
    /// does not depend on the batch size or the shard it ran in).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    #[command(flatten)]
    pub device: DeviceArg,
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
        o.cfg_end_step = self.cfg_end_step;
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

/// `--model FILE` on `device`, or without a file random weights of `preset` (None: the tiny
/// preset, said on stderr: its images are noise-like by design). `--precision` applied, and
/// what the device choice wants said printed once. Returns the model and how run records
/// name its source. The one way every subcommand opens a model.
pub fn open_model(
    path: Option<&Path>,
    preset: Option<&str>,
    device: DeviceArg,
    precision: PrecisionArgs,
) -> Result<(Model, String)> {
    match path {
        Some(p) => {
            announce(device);
            let m = Model::load(p, device.device).map_err(|e| on_device(e, device))?;
            Ok((finish(m, precision)?, p.display().to_string()))
        }
        None => {
            let name = match preset {
                Some(name) => name,
                None => {
                    eprintln!(
                        "no --model given: sampling the `tiny` preset with random weights (seed \
                         0); images are noise-like by design"
                    );
                    "tiny"
                }
            };
            let cfg = checkergen::model::config::preset(name)?;
            let map = checkergen::model::init::random_tensors(&cfg, 0)?;
            let host = checkergen::model::Model::from_tensors(cfg, &map)?;
            let source = if preset.is_some() {
                format!("preset {name} (random weights)")
            } else {
                "preset tiny (random weights)".to_string()
            };
            Ok((open_host(host, device, precision)?, source))
        }
    }
}

/// A host model built here (random weights of a modified preset: `steps` per ratio) on
/// `device`, as [`open_model`] does it.
pub fn open_host(
    host: checkergen::model::Model,
    device: DeviceArg,
    precision: PrecisionArgs,
) -> Result<Model> {
    announce(device);
    let m = Model::on_device(host, device.device).map_err(|e| on_device(e, device))?;
    finish(m, precision)
}

fn announce(device: DeviceArg) {
    if device.device == Device::Emulated {
        eprintln!("--device emu: the host-emulated CUDA device (development/checking only; slow)");
    }
}

fn on_device(e: checkergen::Error, device: DeviceArg) -> anyhow::Error {
    match e {
        e @ checkergen::Error::Device { .. } => {
            anyhow::Error::from(e).context(format!("--device {}", device.flag()))
        }
        e => anyhow::Error::from(e),
    }
}

fn finish(model: Model, precision: PrecisionArgs) -> Result<Model> {
    if let Some(note) = model.device_note() {
        eprintln!("warning: {note}");
    }
    Ok(match precision.precision {
        None => model,
        Some(p) => {
            if model.is_cpu() {
                bf16_fallback_note(p);
            } else {
                precision.on_gpu(p)?;
            }
            model.with_precision(p)?
        }
    })
}

/// A batch-size option (`--batch-size`, `--batch`): None (the device's default) or
/// 1..=[`checkergen::limits::MAX_IMAGES`].
pub fn check_batch(flag: &str, b: Option<usize>) -> Result<()> {
    let max = checkergen::limits::MAX_IMAGES;
    match b {
        Some(0) => bail!("{flag} must be at least 1"),
        Some(b) if b > max => bail!("{flag} {b}: at most {max} per batch"),
        _ => Ok(()),
    }
}

/// Identity of a model file: its size and CRC-32 (streamed); None without a file.
pub fn model_file_identity(path: Option<&Path>) -> Result<Option<String>> {
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

/// The model's configuration as run records (run.json, `generate`'s checkergen.json) hold it:
/// its `steps_per_scale` is the reference's training-time `num_blocks_per_scale` (8 for the
/// released models), not what sampling ran, so it is recorded as `trained_steps_per_scale`;
/// the record's own `steps_per_scale` is the schedule that ran.
pub fn run_config(cfg: &checkergen::model::config::ModelConfig) -> Result<serde_json::Value> {
    let mut j = serde_json::to_value(cfg)?;
    let obj = j
        .as_object_mut()
        .context("a model configuration is a JSON object")?;
    if let Some(k) = obj.remove("steps_per_scale") {
        obj.insert("trained_steps_per_scale".into(), k);
    }
    Ok(j)
}
