//! `checkergen steps`: the speed side of "similar results at equal total serial steps": sweep
//! scale ratios x steps per scale (or explicit per-scale lists, or total-step targets) for one
//! model configuration and measure latency at batch 1 and throughput at `--batch`.

use crate::args::open_host;
use crate::bench::{BenchDevice, Runs, TimedRuns, print_run_header};
use crate::progress::{Off, Progress};
use anyhow::{Context, Result, bail};
use checkergen::io::steps_chart::{StepsPoint, write_steps_chart};
use checkergen::model::Model;
use checkergen::model::config::{ModelConfig, preset};
use checkergen::model::init::random_tensors;
use checkergen::order::{Schedule, realized_steps, scale_sizes};
use checkergen::pipeline::{self, SampleOptions, Steps};
use clap::Args;
use std::path::PathBuf;

/// Sweep scale ratios x steps per scale (or total-step targets): serial steps, tokens,
/// FLOPs, latency at batch 1 and images/s at --batch; table, JSON, PNG chart.
#[derive(Args)]
pub struct StepsArgs {
    /// Model file: its scale ratio is fixed (its position tables are per pyramid), so only
    /// the steps vary. Without it, random weights of --preset for every --ratios value.
    #[arg(long, conflicts_with_all = ["preset", "ratios"])]
    model: Option<PathBuf>,
    /// tiny, S-2x, L-2x or L-4x (random weights) when no --model is given.
    #[arg(long)]
    preset: Option<String>,
    /// Scale ratios (with --preset; default the preset's).
    #[arg(long, value_delimiter = ',')]
    ratios: Option<Vec<f64>>,
    /// Uniform steps per scale to try.
    #[arg(long, value_delimiter = ',')]
    steps_per_scale: Option<Vec<usize>>,
    /// Explicit per-scale step lists, separated by ';' (e.g. "1,2,2,4,4;1,4,4,4,4"); only
    /// lists with one value per scale of a ratio's pyramid are used for it.
    #[arg(long)]
    steps: Option<String>,
    /// Targets of total serial steps: per ratio, the per-scale steps that give T steps
    /// (1 on the 1x1 scale, the rest spread evenly, the remainder to the larger scales).
    #[arg(long, value_delimiter = ',')]
    total_steps: Option<Vec<usize>>,
    /// Batch size of the throughput measurement.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    #[command(flatten)]
    run: TimedRuns,
    /// One JSON object per configuration per line (fields in docs/cli.md).
    #[arg(long)]
    json: bool,
    /// Also draw latency and images/s against serial steps, one series per ratio.
    #[arg(long)]
    png: Option<PathBuf>,
    /// Replace an existing --png file.
    #[arg(long)]
    overwrite: bool,
    /// Quality against serial steps: per configuration, sample --num-samples images (image
    /// i of class i mod classes, seed 0) and add the ADM evaluator's five numbers against
    /// this reference set (as `checkergen eval --ref`). Needs --inception and --num-samples.
    #[arg(long, value_name = "REF", requires_all = ["inception", "num_samples"])]
    eval: Option<PathBuf>,
    /// The FID Inception weights for --eval.
    #[arg(long, value_name = "W.pth", requires = "eval")]
    inception: Option<PathBuf>,
    /// Images per configuration for --eval (at least 4: precision and recall need more
    /// than k = 3).
    #[arg(long, requires = "eval")]
    num_samples: Option<usize>,
}

/// The preset without --model or --preset.
const DEFAULT_PRESET: &str = "L-2x";

/// One configuration of the sweep: a per-scale step list on one of the opened models, its
/// batch-1 (latency) and --batch (throughput) requests.
struct Config {
    /// Index of its model among the opened ones.
    model: usize,
    list: Vec<usize>,
    sched: Schedule,
    sizes: Vec<usize>,
    one: SampleOptions,
    many: SampleOptions,
    /// Its sampler runs' positions in the sweep (0 = the sweep's first run): warm-up, then
    /// timed; batch 1 and --batch alternate.
    order: Vec<usize>,
}

/// --eval: the five numbers of `n` images of one configuration, their features computed
/// batch by batch as they are sampled (no image is kept).
fn eval_config(
    plan: &mut crate::eval::EvalPlan,
    on: &checkergen::Model,
    o: &SampleOptions,
    n: usize,
    batch: usize,
) -> Result<checkergen::eval::run::Report> {
    use checkergen::eval::activations::Activations;
    let classes = on.num_classes();
    let mut o = o.clone();
    o.labels = (0..n).map(|i| i % classes).collect();
    o.seed = 0;
    let side = on.image_size();
    let mut acts = Activations::default();
    on.with_backend(|be| {
        pipeline::sample_batches(be, &o, batch, |_, s| {
            let b = s.pixels.len() / (3 * side * side);
            let mut rgb = Vec::with_capacity(b * side * side * 3);
            for i in 0..b {
                rgb.extend(checkergen::io::image::planar_to_rgb(&s.pixels, i, side));
            }
            let f = plan.net().features(&rgb, b, side)?;
            acts.pool.extend_from_slice(&f.pool);
            acts.spatial.extend_from_slice(&f.spatial);
            Ok(())
        })
    })?;
    let name = format!("{} samples of steps {:?}", n, o.steps);
    let stats = acts.statistics(&name)?;
    let set = checkergen::eval::run::EvalSet {
        name,
        acts,
        stats,
        computed: true,
    };
    plan.evaluate(&set, true)
}

/// Per-scale steps (the values given to the schedule) that realize exactly `total` serial
/// steps on `sizes` (ascending), as evenly spread as the scales allow: scale by scale in
/// ascending order, the realizable count nearest its even share of what is left (the lower
/// one on a tie), among those that leave a total the larger scales can still realize; the
/// remainders so go to the larger scales. None when no lists realize `total`.
pub fn steps_for_total(sizes: &[usize], total: usize) -> Option<Vec<usize>> {
    // Per scale, the realizable counts and a k giving each.
    let options: Vec<Vec<(usize, usize)>> = sizes
        .iter()
        .map(|&s| {
            let n = s * s;
            let mut o: Vec<(usize, usize)> = Vec::new();
            // Descending k: each count keeps the largest k giving it (k itself when exact).
            for k in (1..=n).rev() {
                let r = realized_steps(n, k);
                if !o.iter().any(|&(x, _)| x == r) {
                    o.push((r, k));
                }
            }
            o
        })
        .collect();
    // reach[i][t]: the scales i.. can realize t steps in all.
    let max: usize = sizes.iter().map(|s| s * s).sum();
    if total > max {
        return None;
    }
    let mut reach = vec![vec![false; max + 1]; sizes.len() + 1];
    reach[sizes.len()][0] = true;
    for i in (0..sizes.len()).rev() {
        for t in 0..=max {
            if reach[i + 1][t] {
                for &(r, _) in &options[i] {
                    if t + r <= max {
                        reach[i][t + r] = true;
                    }
                }
            }
        }
    }
    if !reach[0][total] {
        return None;
    }
    let mut left = total;
    let mut v = Vec::new();
    for i in 0..sizes.len() {
        let share = left as f64 / (sizes.len() - i) as f64;
        let &(r, k) = options[i]
            .iter()
            .filter(|&&(r, _)| r <= left && reach[i + 1][left - r])
            .min_by(|a, b| {
                let d = |x: usize| ((x as f64 - share).abs(), x);
                d(a.0).partial_cmp(&d(b.0)).unwrap()
            })?;
        v.push(k);
        left -= r;
    }
    Some(v)
}

pub fn steps(a: StepsArgs) -> Result<()> {
    crate::args::check_batch("--batch", Some(a.batch))?;
    a.run.check()?;
    if let Some(png) = &a.png {
        let inputs: Vec<&std::path::Path> = a.model.iter().map(PathBuf::as_path).collect();
        checkergen::paths::claim_output_file(png, a.overwrite, &inputs)?;
    }
    let mut plan = match (&a.eval, &a.inception, a.num_samples) {
        (Some(_), _, Some(n)) if !(4..=checkergen::limits::MAX_RUN_IMAGES).contains(&n) => bail!(
            "--num-samples {n}: 4 to {} images per configuration (precision and recall need \
             more than k = 3)",
            checkergen::limits::MAX_RUN_IMAGES
        ),
        (Some(r), Some(w), Some(_)) => Some(crate::eval::EvalPlan::new(w, r)?),
        _ => None,
    };
    let progress = Progress::new("steps", "runs", Off::Silent, false);
    // The model configurations: one per ratio.
    let models: Vec<(Model, String)> = match &a.model {
        Some(p) => vec![(Model::load(p)?, p.display().to_string())],
        None => {
            let name = a.preset.as_deref().unwrap_or(DEFAULT_PRESET);
            let base = preset(name)?;
            let ratios = a.ratios.clone().unwrap_or(vec![base.scale_ratio]);
            if ratios.is_empty() {
                bail!("--ratios: give at least one scale ratio");
            }
            ratios
                .iter()
                .map(|&r| {
                    progress.message(format!("random weights of {name} at ratio {r}"));
                    let cfg = ModelConfig {
                        scale_ratio: r,
                        ..base.clone()
                    };
                    let map = random_tensors(&cfg, 0)
                        .with_context(|| format!("preset {name} at scale ratio {r}"))?;
                    Ok((
                        Model::from_tensors(cfg, &map)?,
                        format!("preset {name} at ratio {r} (random weights; speed does not depend on them)"),
                    ))
                })
                .collect::<Result<_>>()?
        }
    };
    let explicit: Vec<Vec<usize>> = match &a.steps {
        Some(s) => s
            .split(';')
            .map(|l| {
                l.split(',')
                    .map(|x| {
                        x.trim()
                            .parse::<usize>()
                            .with_context(|| format!("--steps: bad list {l:?}"))
                    })
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    let uniform = match (&a.steps_per_scale, &a.steps, &a.total_steps) {
        (Some(v), _, _) => v.clone(),
        (None, None, None) => vec![2, 4, 8],
        _ => Vec::new(),
    };
    if uniform.contains(&0) {
        bail!("--steps-per-scale: every value must be at least 1");
    }
    // Configurations that no schedule realizes: warnings, or the error when nothing is left.
    let mut skipped: Vec<String> = Vec::new();
    // Every model on the device first, then every configuration, each checked before anything
    // runs.
    let mut opened = Vec::new();
    let mut configs: Vec<Config> = Vec::new();
    for (model, source) in models {
        let cfg = model.config.clone();
        let sizes = scale_sizes(cfg.latent_size(), cfg.scale_ratio, cfg.scale_min_size)?;
        // Every configuration of this ratio, as per-scale lists (duplicates dropped).
        let mut lists: Vec<Vec<usize>> = Vec::new();
        for &k in &uniform {
            lists.push(
                Schedule::uniform(&sizes, k)?
                    .scales
                    .iter()
                    .map(|s| s.steps)
                    .collect(),
            );
        }
        lists.extend(explicit.iter().filter(|l| l.len() == sizes.len()).cloned());
        let tokens: usize = sizes.iter().map(|s| s * s).sum();
        if a.total_steps.is_some() && tokens > 1 << 20 {
            bail!(
                "--total-steps: a pyramid of {tokens} tokens is too large to search (at most 2^20)"
            );
        }
        for &t in a.total_steps.iter().flatten() {
            match steps_for_total(&sizes, t) {
                Some(l) => lists.push(l),
                None => skipped.push(format!(
                    "ratio {}: no per-scale steps give {t} serial steps (scales {sizes:?})",
                    cfg.scale_ratio
                )),
            }
        }
        let mut seen = std::collections::HashSet::new();
        lists.retain(|l| seen.insert(l.clone()));
        if lists.is_empty() {
            skipped.push(format!(
                "ratio {}: no configuration fits its {} scales",
                cfg.scale_ratio,
                sizes.len()
            ));
            continue;
        }
        let on = open_host(model, a.run.device, a.run.precision)?;
        for list in lists {
            let sched = Schedule::with_steps(&sizes, &list)?;
            let mut one = SampleOptions::new(vec![0]);
            one.cfg = a.run.cfg;
            one.cfg_start_step = a.run.cfg_start_step;
            one.cfg_end_step = a.run.cfg_end_step;
            one.graph = !a.run.no_graph;
            one.steps = Steps::PerScale(list.clone());
            let mut many = one.clone();
            many.labels = (0..a.batch).map(|i| i % cfg.num_classes).collect();
            pipeline::validate_options(&cfg, sizes.len(), &many, on.memory()?)?;
            configs.push(Config {
                model: opened.len(),
                list,
                sched,
                sizes: sizes.clone(),
                one,
                many,
                order: Vec::new(),
            });
        }
        opened.push((on, source, cfg.scale_ratio));
    }
    if configs.is_empty() {
        bail!("nothing to measure: {}", skipped.join("; "));
    }
    let devs: Vec<BenchDevice> = opened
        .iter()
        .map(|(on, _, _)| BenchDevice::new(on, &progress))
        .collect();
    // Every configuration is warmed up (at least one untimed run) before any is timed.
    let warmup = a.run.warmup.max(1);
    let graph = !a.run.no_graph;
    let runs: usize = configs
        .iter()
        .map(|c| 2 * (devs[c.model].warmups(graph, warmup) + a.run.iters))
        .sum();
    progress.update(0, runs as u64);
    let source = match (&a.model, opened.as_slice()) {
        (Some(_), [(_, s, _)]) => s.clone(),
        _ => {
            let ratios: Vec<String> = opened.iter().map(|(_, _, r)| r.to_string()).collect();
            format!(
                "preset {} at ratio{} {} (random weights; speed does not depend on them)",
                a.preset.as_deref().unwrap_or(DEFAULT_PRESET),
                if ratios.len() == 1 { "" } else { "s" },
                ratios.join(", ")
            )
        }
    };
    let what = format!(
        ", {} configuration{}: latency at batch 1, images/s at batch {}; all warmed up \
         first, then timed round-robin",
        configs.len(),
        if configs.len() == 1 { "" } else { "s" },
        a.batch
    );
    let header = TimedRuns { warmup, ..a.run };
    print_run_header("steps", &source, &devs[0], &header, &what, a.json);
    // `seq` numbers the sampler runs of the sweep, in the order they run.
    let mut seq = 0;
    for c in &mut configs {
        progress.message(format!("warm-up {:?}", c.list));
        for o in [&c.one, &c.many] {
            let n = devs[c.model].warm_up(o, warmup)?;
            c.order.extend(seq..seq + n);
            seq += n;
        }
    }
    let mut timed: Vec<[Runs; 2]> = configs
        .iter()
        .map(|c| [devs[c.model].runs(), devs[c.model].runs()])
        .collect();
    for r in 0..a.run.iters {
        progress.message(format!("timed run {} of {}", r + 1, a.run.iters));
        for (c, runs) in configs.iter_mut().zip(&mut timed) {
            for (o, runs) in [&c.one, &c.many].into_iter().zip(runs.iter_mut()) {
                devs[c.model].timed(o, runs)?;
                c.order.push(seq);
                seq += 1;
            }
        }
    }
    progress.finish();
    if !a.json {
        println!(
            "{:>6} {:<18} {:>6} {:>7} {:>12} {:>11} {:>10}",
            "ratio",
            "steps per scale",
            "serial",
            "tokens",
            "GFLOP/image",
            "latency s",
            format!("img/s@{}", a.batch)
        );
    }
    let mut points = Vec::new();
    for (c, [one, many]) in configs.iter().zip(timed) {
        let (on, source, ratio) = &opened[c.model];
        let dev = &devs[c.model];
        let (list, sched) = (&c.list, &c.sched);
        let one = dev.row(&c.one, one)?;
        let many = dev.row(&c.many, many)?;
        let quality = match (&mut plan, a.num_samples) {
            (Some(plan), Some(n)) => {
                if !a.json {
                    eprintln!("evaluating {n} samples of {list:?} ...");
                }
                Some(eval_config(plan, on, &c.many, n, a.batch)?)
            }
            _ => None,
        };
        let p = StepsPoint {
            ratio: *ratio,
            serial_steps: sched.total_steps(),
            latency_s: one.s_per_batch,
            images_per_s: a.batch as f64 / many.s_per_batch,
            fid: quality.map(|q| q.fid),
        };
        if a.json {
            println!(
                "{}",
                serde_json::json!({
                    "ratio": p.ratio,
                    "steps_per_scale": list,
                    "steps_by_scale": sched.scales.iter().map(|s| s.steps).collect::<Vec<_>>(),
                    "scale_sizes": c.sizes,
                    "serial_steps": p.serial_steps,
                    "tokens": sched.total_tokens(),
                    "flops_per_image": one.flops_per_image,
                    "latency_s": p.latency_s,
                    "images_per_s": p.images_per_s,
                    "batch": a.batch,
                    "cfg": a.run.cfg,
                    "cfg_start_step": a.run.cfg_start_step,
                    "cfg_end_step": a.run.cfg_end_step,
                    "warmup": warmup,
                    "iters": a.run.iters,
                    "run_order": c.order,
                    "device": dev.describe(),
                    "model": source,
                    "times_meaningful": !dev.is_emu(),
                    "eval": quality.map(|q| q.to_json()),
                })
            );
        } else {
            println!(
                "{:>6} {:<18} {:>6} {:>7} {:>12.2} {:>11.4} {:>10.2}",
                p.ratio,
                format!("{list:?}"),
                p.serial_steps,
                sched.total_tokens(),
                one.flops_per_image / 1e9,
                p.latency_s,
                p.images_per_s
            );
            if let Some(q) = quality {
                println!(
                    "{:>6} {:<18} IS {:.3}  FID {:.3}  sFID {:.3}  precision {:.4}  recall {:.4}  ({} samples)",
                    "",
                    "",
                    q.inception_score,
                    q.fid,
                    q.sfid,
                    q.precision,
                    q.recall,
                    q.sample_images
                );
            }
        }
        points.push(p);
    }
    for note in &skipped {
        eprintln!("warning: {note}; skipped");
    }
    if let Some(png) = &a.png {
        write_steps_chart(png, &points, a.batch)?;
        if !a.json {
            println!("wrote {}", png.display());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::steps_for_total;
    use checkergen::order::realized_steps;

    #[test]
    fn total_steps_spread_over_the_scales() {
        let r2 = [1, 2, 4, 8, 16];
        let realized_total = |v: &[usize]| -> usize {
            r2.iter()
                .zip(v)
                .map(|(&s, &k)| realized_steps(s * s, k))
                .sum()
        };
        assert_eq!(steps_for_total(&r2, 17), Some(vec![1, 4, 4, 4, 4]));
        assert_eq!(steps_for_total(&r2, 9), Some(vec![1, 2, 2, 2, 2]));
        assert_eq!(steps_for_total(&r2, 5), Some(vec![1, 1, 1, 1, 1]));
        assert_eq!(steps_for_total(&r2, 4), None); // a scale would get no step
        // The 2x2 scale has 4 tokens: at most 4 steps; the rest go to the larger scales.
        assert_eq!(steps_for_total(&r2, 29), Some(vec![1, 4, 8, 8, 8]));
        let all = 1 + 4 + 16 + 64 + 256;
        assert_eq!(steps_for_total(&r2, all), Some(vec![1, 4, 16, 64, 256]));
        assert_eq!(steps_for_total(&r2, all + 1), None);
        // Every reachable total is met exactly (3 steps, say, no k realizes on 256 tokens:
        // k = 3 gives blocks of 85, so 4 steps; the spread works around it).
        for t in 5..=60 {
            let v = steps_for_total(&r2, t).unwrap_or_else(|| panic!("{t}"));
            assert_eq!(realized_total(&v), t, "{t}: {v:?}");
        }
        assert_eq!(steps_for_total(&[1], 1), Some(vec![1]));
        assert_eq!(realized_steps(256, 3), 4);
    }
}
