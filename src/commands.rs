//! The model-level subcommands: sample, init, inspect. Parsing lives in main.rs; these
//! functions call the library and print.

use crate::DtypeArg;
use anyhow::{Context, Result, bail};
use checkergen::config::{self, ModelConfig};
use checkergen::cpu::decoder::to_pixels_u8;
use checkergen::image::write_rgb_png;
use checkergen::init::{FloatDtype, random_tensors, write_model};
use checkergen::model::Model;
use checkergen::order::Schedule;
use checkergen::sampler::{SampleOptions, Steps};
use checkergen::sampling::TokenPolicy;
use clap::{Args, ValueEnum};
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Device {
    Auto,
    Cpu,
    Cuda,
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
    /// Guidance: logits = cond + cfg * (cond - uncond); 0 disables it.
    #[arg(long, default_value_t = 1.5, allow_negative_numbers = true)]
    cfg: f32,
    /// First global step (0 = the 1x1 scale) at which guidance applies.
    #[arg(long, default_value_t = 5)]
    cfg_start_step: usize,
    /// Serial steps per scale.
    #[arg(long, default_value_t = 4, conflicts_with = "steps")]
    steps_per_scale: usize,
    /// Explicit steps for each scale, comma separated (one value per scale).
    #[arg(long, value_delimiter = ',')]
    steps: Option<Vec<usize>>,
    /// Sampling temperature; 0 = greedy (argmax).
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    temperature: f32,
    #[arg(long)]
    top_k: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    top_p: Option<f32>,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[arg(long, value_enum, default_value_t = Device::Auto)]
    device: Device,
    /// Output directory (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Also write tokens.safetensors (scale_0, scale_1, ...: int32 [B, s, s]).
    #[arg(long)]
    save_tokens: bool,
    /// Print milliseconds per serial step and per scale.
    #[arg(long)]
    timings: bool,
}

fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("cannot create output directory {}", dir.display()))?;
    let probe = dir.join(".checkergen-write-test");
    std::fs::write(&probe, b"")
        .with_context(|| format!("output directory {} is not writable", dir.display()))?;
    std::fs::remove_file(&probe).ok();
    Ok(())
}

fn load_or_tiny(path: Option<&Path>) -> Result<(Model, String)> {
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
fn pick_gpu(device: Device) -> Result<Option<checkergen::cuda::Gpu>> {
    use checkergen::cuda::Gpu;
    match device {
        Device::Cpu => Ok(None),
        Device::Cuda => match Gpu::try_new()? {
            Some(g) => Ok(Some(g)),
            None => bail!("--device cuda: no CUDA driver or GPU found on this machine"),
        },
        Device::Auto => match Gpu::try_new() {
            Ok(g) => Ok(g),
            Err(e) => {
                eprintln!("GPU present but unusable ({e:#}); sampling on the CPU");
                Ok(None)
            }
        },
    }
}

pub fn sample(a: SampleArgs) -> Result<()> {
    #[cfg(not(feature = "cuda"))]
    if a.device == Device::Cuda {
        bail!("--device cuda: this binary was built without the `cuda` feature");
    }
    ensure_dir(&a.out)?;
    let (model, source) = load_or_tiny(a.model.as_deref())?;
    let labels = match (&a.labels, a.num_samples) {
        (Some(l), _) => l.clone(),
        (None, Some(0)) => bail!("--num-samples must be at least 1"),
        (None, Some(n)) => (0..n).map(|i| i % model.config.num_classes).collect(),
        (None, None) => bail!("give --labels or --num-samples"),
    };
    let mut opts = SampleOptions::new(labels.clone());
    opts.cfg = a.cfg;
    opts.cfg_start_step = a.cfg_start_step;
    opts.steps = match &a.steps {
        Some(v) => Steps::PerScale(v.clone()),
        None => Steps::Uniform(a.steps_per_scale),
    };
    opts.policy = TokenPolicy {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
    };
    opts.seed = a.seed;
    #[cfg(feature = "cuda")]
    let gpu_model = match pick_gpu(a.device)? {
        Some(g) => Some(model.to_gpu(g)?),
        None => None,
    };
    let t = Instant::now();
    #[cfg(feature = "cuda")]
    let (out, device) = match &gpu_model {
        Some(gm) => (
            model.sample_gpu(gm, &opts)?,
            format!("cuda ({})", gm.gpu.name),
        ),
        None => (model.sample(&opts)?, "cpu".to_string()),
    };
    #[cfg(not(feature = "cuda"))]
    let (out, device) = (model.sample(&opts)?, "cpu".to_string());
    let total_s = t.elapsed().as_secs_f64();

    // Images: one PNG each and a grid.
    let side = out.image_size;
    let px = to_pixels_u8(&out.images);
    let b = labels.len();
    let plane = side * side;
    let rgb_of = |i: usize| -> Vec<u8> {
        let img = &px[i * 3 * plane..(i + 1) * 3 * plane];
        (0..plane)
            .flat_map(|p| [img[p], img[plane + p], img[2 * plane + p]])
            .collect()
    };
    let cols = (b as f64).sqrt().ceil() as usize;
    let rows = b.div_ceil(cols);
    let mut grid = vec![0u8; rows * side * cols * side * 3];
    for i in 0..b {
        let rgb = rgb_of(i);
        write_rgb_png(&a.out.join(format!("sample_{i:04}.png")), side, side, &rgb)?;
        let (gy, gx) = (i / cols, i % cols);
        for y in 0..side {
            let dst = ((gy * side + y) * cols * side + gx * side) * 3;
            grid[dst..dst + side * 3].copy_from_slice(&rgb[y * side * 3..(y + 1) * side * 3]);
        }
    }
    write_rgb_png(&a.out.join("grid.png"), cols * side, rows * side, &grid)?;

    let sched = &out.tokens.schedule;
    if a.save_tokens {
        let entries: Vec<_> = sched
            .scales
            .iter()
            .zip(&out.tokens.tokens)
            .enumerate()
            .map(|(k, (sc, toks))| {
                let bytes: Vec<u8> = toks
                    .iter()
                    .flat_map(|&t| (t as i32).to_le_bytes())
                    .collect();
                (
                    format!("scale_{k}"),
                    safetensors::Dtype::I32,
                    vec![b, sc.size, sc.size],
                    bytes,
                )
            })
            .collect();
        checkergen::tensor::write_safetensors(
            &a.out.join("tokens.safetensors"),
            &entries,
            Default::default(),
        )?;
    }
    let per_scale_ms: Vec<f64> = (0..sched.scales.len())
        .map(|k| {
            sched
                .steps
                .iter()
                .zip(&out.tokens.step_ms)
                .filter(|(s, _)| s.scale == k)
                .map(|(_, ms)| ms)
                .sum()
        })
        .collect();
    let run = serde_json::json!({
        "model": source,
        "config": model.config,
        "device": device,
        "labels": labels,
        "cfg": a.cfg,
        "cfg_start_step": a.cfg_start_step,
        "temperature": a.temperature,
        "top_k": a.top_k,
        "top_p": a.top_p,
        "seed": a.seed,
        "schedule": {
            "scale_sizes": model.scale_sizes,
            "steps_per_scale": sched.scales.iter().map(|s| s.steps).collect::<Vec<_>>(),
            "block": sched.scales.iter().map(|s| s.block).collect::<Vec<_>>(),
            "total_steps": sched.total_steps(),
        },
        "timings_ms": {
            "prefill": out.tokens.prefill_ms,
            "steps": out.tokens.step_ms,
            "per_scale": per_scale_ms,
            "decode": out.decode_ms,
            "total": total_s * 1e3,
        },
    });
    std::fs::write(a.out.join("run.json"), serde_json::to_string_pretty(&run)?)
        .with_context(|| format!("cannot write {}", a.out.join("run.json").display()))?;
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
        let steps_ms: f64 = out.tokens.step_ms.iter().sum();
        println!(
            "serial steps: {} in {:.1} ms ({:.2} ms/step); prefill {:.2} ms; decode {:.1} ms",
            sched.total_steps(),
            steps_ms,
            steps_ms / sched.total_steps() as f64,
            out.tokens.prefill_ms,
            out.decode_ms
        );
    }
    println!(
        "wrote {b} images ({side}x{side}) to {} in {total_s:.2} s ({} serial steps, {device})",
        a.out.display(),
        sched.total_steps()
    );
    Ok(())
}

pub fn init(preset: &str, seed: u64, dtype: DtypeArg, output: &Path) -> Result<()> {
    let cfg = config::preset(preset)?;
    let map = random_tensors(&cfg, seed)?;
    let dt = match dtype {
        DtypeArg::F32 => FloatDtype::F32,
        DtypeArg::Bf16 => FloatDtype::Bf16,
    };
    write_model(
        output,
        &cfg,
        &map,
        dt,
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

pub fn inspect(path: &Path) -> Result<()> {
    let model = Model::load(path)?;
    let cfg = &model.config;
    println!("{}", path.display());
    println!("{}", describe(cfg));
    let (t, d) = model.parameter_counts();
    println!(
        "parameters: transformer {:.2} M, decoder+codebook {:.2} M, total {:.2} M",
        t as f64 / 1e6,
        d as f64 / 1e6,
        (t + d) as f64 / 1e6
    );
    let sched = Schedule::uniform(&model.scale_sizes, cfg.steps_per_scale)?;
    println!(
        "scales {:?} ({} tokens); at the configured {} steps per scale: {} serial steps",
        model.scale_sizes,
        sched.total_tokens(),
        cfg.steps_per_scale,
        sched.total_steps()
    );
    Ok(())
}
