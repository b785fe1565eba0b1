//! `checkergen sample`: images (PNGs, a grid, optionally tokens, maps and pyramids) and
//! run.json, batch after batch.

use crate::args::{SamplingArgs, check_batch, model_file_identity, open_model, run_config};
use anyhow::{Context, Result, bail};
use checkergen::io::image::{grid_rgb, planar_to_rgb, write_rgb_png};
use checkergen::io::maps::{MapsInput, write_maps};
use checkergen::io::tokens::write_tokens;
use checkergen::model::Model;
use checkergen::order::Schedule;
use checkergen::paths::OutputDir;
use checkergen::pipeline;
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Sample images (tokens, PNGs, run.json) from a model file or, without --model, from
/// the tiny preset with random weights.
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

/// Whether `name` is a file `sample` writes.
pub(crate) fn is_sample_output(name: &str) -> bool {
    matches!(name, "grid.png" | "run.json" | "tokens.safetensors")
        || (name.starts_with("sample_") && name.ends_with(".png"))
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

pub fn sample(a: SampleArgs) -> Result<()> {
    check_batch("--batch-size", a.batch_size)?;
    let (api_model, source) = open_model(a.model.as_deref(), None, a.s.device, a.s.precision)?;
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
    if a.batch_size.is_none() && batch < labels.len() {
        // Said only when the run is split: one batch needs no word.
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
        "config": run_config(&model.config)?,
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
        "cfg_end_step": a.s.cfg_end_step,
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
        "wrote {b} image{} ({side}x{side}) to {} in {total_s:.2} s ({} serial steps, {}, {device})",
        if b == 1 { "" } else { "s" },
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
