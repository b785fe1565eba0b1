//! `checkergen generate`: evaluation sample files (the ADM evaluator's `.npz`, or a PNG folder)
//! of any size, batch after batch, class-balanced, deterministic by global image index so
//! shards on many machines reassemble (`checkergen merge`) into exactly one run's file.

use crate::args::{SamplingArgs, check_batch, model_file_identity, open_model, run_config};
use anyhow::{Context, Result, bail};
use checkergen::io::image::{planar_to_rgb, write_rgb_png};
use checkergen::io::npz::{NpzWriter, Progress, npy_header};
use checkergen::io::pth::ZipReader;
use checkergen::paths::OutputDir;
use checkergen::pipeline;
use clap::{Args, ValueEnum};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// One `.npz`: `arr_0` uint8 [N, H, W, 3], `arr_1` int64 labels, `checkergen.json`.
    Npz,
    /// `OUT/<H>/sample_%05d.png` by global index (the authors' evaluator's folder layout).
    PngDir,
}

/// Evaluation sample files of any size (the ADM evaluator's .npz, or a PNG folder),
/// class-balanced, deterministic by image index; --shard k/N for many machines.
#[derive(Args)]
pub struct GenerateArgs {
    /// Model file; without it the tiny preset with random weights (for trying the command).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Images in the whole run (all shards together); image i has class i mod num_classes.
    #[arg(long)]
    num_samples: usize,
    /// Images per batch (default as for `sample`, printed).
    #[arg(long)]
    batch_size: Option<usize>,
    /// Output file (npz) or folder (png-dir).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, value_enum, default_value_t = Format::Npz)]
    format: Format,
    /// `k/N`: this process makes shard k of N, the contiguous image range
    /// [k * num_samples / N, (k + 1) * num_samples / N); `auto`: k and N from
    /// SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT, else RANK / WORLD_SIZE.
    #[arg(long)]
    shard: Option<String>,
    /// Class of every image from a text file: num_samples class ids separated by whitespace
    /// or commas, image i taking the i-th (default: image i has class i mod num_classes).
    #[arg(long, conflicts_with = "random_labels")]
    labels_file: Option<PathBuf>,
    /// Classes drawn uniformly, image i's from (seed, i) alone.
    #[arg(long)]
    random_labels: bool,
    /// Replace an existing output.
    #[arg(long)]
    overwrite: bool,
    /// No progress lines.
    #[arg(long)]
    quiet: bool,
    /// Evaluate the finished file against this reference set (an ADM reference batch, a
    /// `generate` .npz, a PNG folder or an activation file) and print the ADM evaluator's
    /// five numbers, as `checkergen eval` does. Needs --inception; not with a shard of many.
    #[arg(long, value_name = "REF", requires = "inception")]
    eval: Option<PathBuf>,
    /// The FID Inception weights for --eval.
    #[arg(long, value_name = "W.pth", requires = "eval")]
    inception: Option<PathBuf>,
    #[command(flatten)]
    s: SamplingArgs,
}

/// `k/N` or `auto` (Slurm array, then torchrun-style RANK / WORLD_SIZE) -> (k, N).
pub fn parse_shard(spec: &str, env: impl Fn(&str) -> Option<String>) -> Result<(usize, usize)> {
    let (k, n) = if spec == "auto" {
        let pair = |a: &str, b: &str| Some((env(a)?, env(b)?));
        pair("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT")
            .or_else(|| pair("RANK", "WORLD_SIZE"))
            .context(
                "--shard auto: neither SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT nor \
                 RANK/WORLD_SIZE is set",
            )?
    } else {
        let (k, n) = spec
            .split_once('/')
            .with_context(|| format!("--shard {spec:?}: expected k/N (e.g. 0/4) or auto"))?;
        (k.to_string(), n.to_string())
    };
    let num = |s: &str| {
        s.trim()
            .parse::<usize>()
            .with_context(|| format!("--shard {spec:?}: {s:?} is not a whole number"))
    };
    let (k, n) = (num(&k)?, num(&n)?);
    if n == 0 || k >= n {
        bail!("--shard {spec:?}: need 0 <= k < N (got k = {k}, N = {n})");
    }
    Ok((k, n))
}

/// Image range [start, end) of shard k of n over `total` images.
pub fn shard_range(total: usize, k: usize, n: usize) -> (usize, usize) {
    let at = |i: usize| (i as u128 * total as u128 / n as u128) as usize;
    (at(k), at(k + 1))
}

pub fn generate(a: GenerateArgs) -> Result<()> {
    if a.num_samples == 0 {
        bail!("--num-samples must be at least 1");
    }
    if a.num_samples > checkergen::limits::MAX_RUN_IMAGES {
        bail!(
            "--num-samples {}: at most {} images per run",
            a.num_samples,
            checkergen::limits::MAX_RUN_IMAGES
        );
    }
    check_batch("--batch-size", a.batch_size)?;
    let (k, n) = match &a.shard {
        Some(s) => parse_shard(s, |v| std::env::var(v).ok())?,
        None => (0, 1),
    };
    let (start, end) = shard_range(a.num_samples, k, n);
    // --eval: its inputs checked and the network loaded before any image is made.
    let evaluator = match (&a.eval, &a.inception) {
        (Some(_), Some(_)) if n > 1 => {
            bail!("--eval evaluates a whole run: merge the shards, then `checkergen eval`")
        }
        (Some(_), Some(_)) if a.num_samples < checkergen::eval::run::MIN_EVAL_IMAGES => bail!(
            "--eval needs at least {} images (precision and recall need more than k = 3)",
            checkergen::eval::run::MIN_EVAL_IMAGES
        ),
        (Some(r), Some(w)) => Some(crate::eval::EvalPlan::new(w, r)?),
        _ => None,
    };
    // The inputs the user named; the model and the labels file are also remembered when
    // read (paths::guard_inputs), so no output, inside --out or not, can be one of them.
    let inputs: Vec<&Path> = a
        .model
        .iter()
        .chain(a.labels_file.iter())
        .map(PathBuf::as_path)
        .collect();
    if a.format == Format::Npz {
        checkergen::paths::claim_output_file(&a.out, a.overwrite, &inputs)?;
    }
    let (api_model, source) = open_model(a.model.as_deref(), None, a.s.device, a.s.precision)?;
    let model = api_model.host_model();
    let cfg = &model.config.clone();
    let side = cfg.img_size;
    let mut o = a.s.options(Vec::new());
    let classes = cfg.num_classes;
    let (labels_rule, from_file) = match &a.labels_file {
        Some(f) => {
            let l = read_labels_file(f, a.num_samples, classes)?;
            let rule = format!(
                "from {} ({})",
                f.display(),
                model_file_identity(Some(f))?.unwrap_or_default()
            );
            (rule, Some(l))
        }
        None if a.random_labels => (
            format!("uniform over {classes} classes from (seed, i)"),
            None,
        ),
        None => (format!("image i has class i mod {classes}"), None),
    };
    let seed = a.s.seed;
    let label_of = |i: usize| -> usize {
        match &from_file {
            Some(l) => l[i],
            None if a.random_labels => random_label(seed, i, classes),
            None => i % classes,
        }
    };
    let meta = serde_json::json!({
        "format": "checkergen generate 1",
        "version": env!("CARGO_PKG_VERSION"),
        "model": model_file_identity(a.model.as_deref())?.unwrap_or(source.clone()),
        "config": run_config(cfg)?,
        "seed": a.s.seed,
        "cfg": a.s.cfg,
        "cfg_start_step": a.s.cfg_start_step,
        "cfg_end_step": a.s.cfg_end_step,
        "temperature": a.s.temperature,
        "top_k": a.s.top_k,
        "top_p": a.s.top_p,
        "labels": labels_rule,
        "num_samples": a.num_samples,
    });
    // A shard may be empty (more shards than images): it still writes its (empty) file.
    let count = end - start;
    let mem = api_model.memory()?;
    let batch = match a.batch_size {
        Some(b) => b,
        None => api_model
            .default_batch_size(a.s.cfg > 0.0)?
            .min(count.max(1)),
    };
    let mut probe = o.clone();
    probe.labels = (0..batch).map(|i| i % cfg.num_classes).collect();
    pipeline::validate_options(cfg, model.scale_sizes.len(), &probe, mem)?;
    let schedule = pipeline::schedule_of(&model.scale_sizes, &o)?;
    let total_steps = schedule.total_steps();
    let mut meta = meta;
    meta["range"] = serde_json::json!([start, end]);
    // The schedule that runs (the config's steps_per_scale is the training-time value).
    meta["steps_per_scale"] = schedule
        .scales
        .iter()
        .map(|s| s.steps)
        .collect::<Vec<_>>()
        .into();
    meta["total_steps"] = total_steps.into();
    // The serial steps guidance applies to (0: cfg asked for, but never applied).
    meta["guided_steps"] = pipeline::guided_steps(&o, total_steps).into();
    // A killed run leaves FILE.partial and its checkpoint FILE.partial.json (written when
    // the file is begun and after every batch): the same command resumes after the last
    // complete batch, once the partial file is verified against the checkpoint.
    let ckpt = checkpoint_path(&a.out);
    let img_bytes = side * side * 3;
    let arr0_header = npy_header("|u1", &[count, side, side, 3]).len() as u64;
    let resumed = match a.format {
        Format::Npz if !a.overwrite => {
            read_checkpoint(&a.out, &meta, count, arr0_header, img_bytes)?
        }
        _ => None,
    };
    // Every check is done: only now is anything created, removed or announced.
    let png_dir = match a.format {
        Format::PngDir => Some(
            // A shard's files are its own range: shards of one run may share the folder,
            // and --overwrite never removes another shard's images.
            OutputDir::plan(
                &a.out.join(side.to_string()),
                move |name| png_index(name).is_some_and(|i| (start..end).contains(&i)),
                a.overwrite,
                &inputs,
            )?
            .open()?,
        ),
        Format::Npz => None,
    };
    if !a.quiet {
        eprintln!(
            "generate: images {start}..{end} of {} (shard {k}/{n}) in batches of {batch} -> {}",
            a.num_samples,
            a.out.display()
        );
    }
    if let Some(w) = pipeline::guidance_warning(&o, total_steps) {
        eprintln!("warning: {w}");
    }
    let mut skip = 0usize;
    let mut sink = match png_dir {
        None => {
            let arr0 = arr0_header + (count * img_bytes) as u64;
            let w = match resumed {
                Some((done, at)) => {
                    if !a.quiet {
                        eprintln!(
                            "generate: resuming {} at image {}",
                            a.out.display(),
                            start + done
                        );
                    }
                    skip = done;
                    let mut w = NpzWriter::resume(&a.out, "arr_0.npy", arr0, at)?;
                    w.keep_partial();
                    w
                }
                None => {
                    let mut w = NpzWriter::create(&a.out)?;
                    begin_images(&mut w, count, side)?;
                    // The checkpoint of the empty file: from here on, whatever fails (a
                    // full disk included), FILE.partial and its checkpoint agree and the
                    // same command resumes. Until it is written, a failure removes both.
                    write_checkpoint(&ckpt, &meta, 0, w.checkpoint()?)?;
                    w.keep_partial();
                    w
                }
            };
            Sink::Npz(w)
        }
        Some(dir) => Sink::Png(dir),
    };
    o.labels = (start + skip..end).map(label_of).collect();
    o.image_offset = start + skip;
    let t0 = Instant::now();
    let mut last_report = Instant::now();
    let mut done = skip;
    // On a terminal a progress bar (indicatif); otherwise (logs, Slurm) a line every 10 s.
    let bar = (std::io::stderr().is_terminal() && !a.quiet).then(|| {
        let pb = indicatif::ProgressBar::new(count as u64).with_position(skip as u64);
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} images, {per_sec}, {elapsed} elapsed, ETA {eta}",
        ) {
            pb.set_style(style);
        }
        pb
    });
    let mut each = |first: usize, s: pipeline::Samples| -> Result<()> {
        let b = s.pixels.len() / (3 * side * side);
        for i in 0..b {
            let rgb = planar_to_rgb(&s.pixels, i, side);
            match &mut sink {
                Sink::Npz(w) => w.write(&rgb)?,
                Sink::Png(dir) => write_rgb_png(
                    &dir.join(&format!("sample_{:05}.png", first + i)),
                    side,
                    side,
                    &rgb,
                )?,
            }
        }
        done += b;
        if let Sink::Npz(w) = &mut sink {
            write_checkpoint(&ckpt, &meta, done, w.checkpoint()?)?;
        }
        if let Some(pb) = &bar {
            pb.set_position(done as u64);
        } else if !a.quiet && (last_report.elapsed().as_secs_f64() >= 10.0 || done == count) {
            let el = t0.elapsed().as_secs_f64();
            let rate = (done - skip) as f64 / el.max(1e-9);
            let eta = (count - done) as f64 / rate.max(1e-9);
            eprintln!(
                "{done}/{count} images, {rate:.2} images/s, {el:.0} s elapsed, ETA {eta:.0} s"
            );
            last_report = Instant::now();
        }
        Ok(())
    };
    // The batches index images from where this run starts: first + start + skip is the
    // global index.
    if count > skip {
        api_model.with_backend(|be| {
            pipeline::sample_batches(be, &o, batch, |first, s| each(start + skip + first, s))
        })?;
    }
    if let Some(pb) = bar {
        pb.finish();
    }
    let labels: Vec<u8> = (start..end)
        .flat_map(|i| (label_of(i) as i64).to_le_bytes())
        .collect();
    match sink {
        Sink::Npz(mut w) => {
            w.end_entry()?;
            let mut arr1 = npy_header("<i8", &[count]);
            arr1.extend_from_slice(&labels);
            w.entry("arr_1.npy", &arr1)?;
            w.entry(
                "checkergen.json",
                serde_json::to_string_pretty(&meta)?.as_bytes(),
            )?;
            w.finish()?;
            std::fs::remove_file(&ckpt).ok();
        }
        Sink::Png(dir) => dir.finish(),
    }
    println!(
        "wrote images {start}..{end} ({count}) to {} in {:.1} s",
        a.out.display(),
        t0.elapsed().as_secs_f64()
    );
    if let Some(plan) = evaluator {
        let sample = match a.format {
            Format::Npz => a.out.clone(),
            Format::PngDir => a.out.join(side.to_string()),
        };
        plan.report(&sample, a.quiet)?;
    }
    Ok(())
}

/// Image i's class under --random-labels: uniform over `classes` from Philox keyed by the
/// seed, counter (i, "LABL"): independent of batches, shards and devices.
pub fn random_label(seed: u64, i: usize, classes: usize) -> usize {
    let key = [seed as u32, (seed >> 32) as u32];
    let x = checkergen::rng::philox4x32_10([i as u32, (i >> 32) as u32, 0, 0x4C42_414C], key)[0];
    ((x as u64 * classes as u64) >> 32) as usize
}

/// Exactly `n` class ids below `classes` from a text file (whitespace or comma separated).
fn read_labels_file(path: &Path, n: usize, classes: usize) -> Result<Vec<usize>> {
    checkergen::paths::check_input(path)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read as text", path.display()))?;
    // A UTF-8 byte-order mark (Windows editors write one) is not part of the first entry.
    let text = text.strip_prefix('\u{feff}').unwrap_or(&text);
    let mut v = Vec::with_capacity(n);
    for (k, w) in text
        .split(|c: char| c.is_whitespace() || c == ',')
        .filter(|w| !w.is_empty())
        .enumerate()
    {
        let l: usize = w
            .parse()
            .with_context(|| format!("{}: entry {k} ({w:?}) is not a class id", path.display()))?;
        if l >= classes {
            bail!(
                "{}: entry {k} is class {l}; this model has {classes} classes",
                path.display()
            );
        }
        v.push(l);
    }
    if v.len() != n {
        bail!(
            "{}: {} class ids for --num-samples {n}",
            path.display(),
            v.len()
        );
    }
    Ok(v)
}

/// The checkpoint beside a partial output: `<out>.partial.json`.
fn checkpoint_path(out: &Path) -> PathBuf {
    let mut p = NpzWriter::partial_path(out).into_os_string();
    p.push(".json");
    PathBuf::from(p)
}

/// Record, atomically, that `done` images of the run `meta` are in the partial file.
fn write_checkpoint(
    path: &Path,
    meta: &serde_json::Value,
    done: usize,
    at: Progress,
) -> Result<()> {
    let j = serde_json::json!({"meta": meta, "done": done, "written": at.written, "crc": at.crc});
    checkergen::paths::write_file(path, &serde_json::to_vec(&j)?)
}

/// The checkpoint of an interrupted run of the same `meta` into `out`, if there is one with
/// its partial file; a partial file of another run, or a checkpoint whose counts disagree
/// (`done` of the shard's `count` images of `img_bytes` each after an `arr_0` header of
/// `header` bytes), is refused (--overwrite starts over). The partial file's bytes are
/// checked against it when it is reopened ([`NpzWriter::resume`]).
fn read_checkpoint(
    out: &Path,
    meta: &serde_json::Value,
    count: usize,
    header: u64,
    img_bytes: usize,
) -> Result<Option<(usize, Progress)>> {
    let (partial, ckpt) = (NpzWriter::partial_path(out), checkpoint_path(out));
    if std::fs::symlink_metadata(&partial).is_err() {
        return Ok(None);
    }
    let refuse = |why: &str| {
        anyhow::anyhow!(
            "{} is the partial output of another or an unreadable run ({why}): --overwrite \
             starts over",
            partial.display()
        )
    };
    let bytes = std::fs::read(&ckpt).map_err(|_| refuse("no readable checkpoint beside it"))?;
    let j: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|_| refuse("its checkpoint is not JSON"))?;
    if &j["meta"] != meta {
        return Err(refuse("its checkpoint records other settings"));
    }
    let bad = || refuse("its checkpoint's counts disagree");
    let done = j["done"].as_u64().ok_or_else(bad)?;
    let written = j["written"].as_u64().ok_or_else(bad)?;
    let crc = j["crc"]
        .as_u64()
        .filter(|&c| c <= u32::MAX as u64)
        .ok_or_else(bad)? as u32;
    let expect = (done as u128 * img_bytes as u128).checked_add(header as u128);
    if done > count as u64 || expect != Some(written as u128) {
        return Err(bad());
    }
    Ok(Some((done as usize, Progress { written, crc })))
}

/// Begin `arr_0.npy`, `count` RGB images of side `side` (uint8 [count, side, side, 3]), with
/// its header written; the pixels follow.
fn begin_images(w: &mut NpzWriter, count: usize, side: usize) -> Result<()> {
    let hdr = npy_header("|u1", &[count, side, side, 3]);
    w.begin_entry(
        "arr_0.npy",
        hdr.len() as u64 + (count * side * side * 3) as u64,
    )?;
    w.write(&hdr)
}

enum Sink {
    Npz(NpzWriter),
    Png(OutputDir),
}

/// The image index of a file `generate --format png-dir` writes into `OUT/<H>`
/// (`sample_%05d.png`), or None for any other name.
fn png_index(name: &str) -> Option<usize> {
    let d = name.strip_prefix("sample_")?.strip_suffix(".png")?;
    if d.len() < 5 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    d.parse().ok()
}

/// Reassemble the shard files of one `generate` run into one file, in index order.
#[derive(Args)]
pub struct MergeArgs {
    /// Shard files of one run (any order).
    #[arg(required = true)]
    shards: Vec<PathBuf>,
    /// The merged file.
    #[arg(short = 'o', long = "out", visible_alias = "output")]
    output: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
}

/// One shard's metadata and sizes.
struct Shard {
    path: PathBuf,
    zip: ZipReader,
    meta: serde_json::Value,
    start: usize,
    end: usize,
    /// Offset of the pixels inside arr_0.npy (its header length).
    data_at: u64,
}

fn open_shard(p: &Path) -> Result<Shard> {
    let zip = ZipReader::open(p)?;
    let shown = p.display();
    let meta_bytes = zip
        .read("checkergen.json", 0, zip.size("checkergen.json")?)
        .with_context(|| format!("{shown}: not a checkergen generate file"))?;
    let meta: serde_json::Value = serde_json::from_slice(&meta_bytes)
        .with_context(|| format!("{shown}: checkergen.json is not JSON"))?;
    let r = meta["range"]
        .as_array()
        .filter(|r| r.len() == 2)
        .with_context(|| format!("{shown}: no image range in checkergen.json"))?;
    let (start, end) = match (r[0].as_u64(), r[1].as_u64()) {
        (Some(a), Some(b)) if a <= b && b <= checkergen::limits::MAX_RUN_IMAGES as u64 => {
            (a as usize, b as usize)
        }
        _ => bail!(
            "{shown}: checkergen.json's image range {} is not a range of images",
            meta["range"]
        ),
    };
    let side = meta["config"]["img_size"]
        .as_u64()
        .filter(|&s| (1..=16384).contains(&s))
        .with_context(|| format!("{shown}: checkergen.json has no image size in 1..=16384"))?
        as usize;
    let hdr = npy_header("|u1", &[end - start, side, side, 3]);
    let want = hdr.len() as u64 + ((end - start) * side * side * 3) as u64;
    if zip.size("arr_0.npy")? != want || zip.read("arr_0.npy", 0, hdr.len() as u64)? != hdr {
        bail!("{shown}: arr_0.npy does not hold images {start}..{end} at {side}x{side}");
    }
    Ok(Shard {
        path: p.to_path_buf(),
        zip,
        meta,
        start,
        end,
        data_at: hdr.len() as u64,
    })
}

/// Which top-level fields of two shards' metadata differ, for the merge refusal: `"seed"
/// differs: 1 vs 2`, or the list of names when several do.
fn differing_fields(a: &serde_json::Value, b: &serde_json::Value) -> String {
    let empty = serde_json::Map::new();
    let (ma, mb) = (
        a.as_object().unwrap_or(&empty),
        b.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = ma.keys().chain(mb.keys()).collect();
    keys.sort();
    keys.dedup();
    let diff: Vec<&String> = keys
        .into_iter()
        .filter(|k| ma.get(*k) != mb.get(*k))
        .collect();
    let show = |v: Option<&serde_json::Value>| {
        let t = v.map_or("(absent)".to_string(), |v| v.to_string());
        if t.chars().count() > 60 {
            format!("{}...", t.chars().take(57).collect::<String>())
        } else {
            t
        }
    };
    match diff.as_slice() {
        [] => "their metadata differ".to_string(),
        [k] => format!(
            "{k:?} differs: {} vs {}",
            show(ma.get(*k)),
            show(mb.get(*k))
        ),
        ks => format!(
            "these fields differ: {}",
            ks.iter()
                .map(|k| format!("{k:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

pub fn merge(a: MergeArgs) -> Result<()> {
    let inputs: Vec<&Path> = a.shards.iter().map(PathBuf::as_path).collect();
    checkergen::paths::claim_output_file(&a.output, a.overwrite, &inputs)?;
    let mut shards: Vec<Shard> = a
        .shards
        .iter()
        .map(|p| open_shard(p))
        .collect::<Result<_>>()?;
    shards.sort_by_key(|s| s.start);
    // Same run: everything but the range equal.
    let strip = |m: &serde_json::Value| {
        let mut m = m.clone();
        m.as_object_mut().map(|o| o.remove("range"));
        m
    };
    let first = strip(&shards[0].meta);
    for s in &shards[1..] {
        let other = strip(&s.meta);
        if other != first {
            bail!(
                "{} and {} come from different runs ({})",
                shards[0].path.display(),
                s.path.display(),
                differing_fields(&first, &other)
            );
        }
    }
    let total = first["num_samples"].as_u64().context("no num_samples")? as usize;
    let mut at = 0;
    for s in &shards {
        if s.start != at {
            bail!(
                "{}: images {}..{} {} (expected the next shard to start at {at})",
                s.path.display(),
                s.start,
                s.end,
                if s.start > at {
                    "leave a gap"
                } else {
                    "overlap another shard"
                }
            );
        }
        at = s.end;
    }
    if at != total {
        bail!("the shards end at image {at} of {total}: shards are missing");
    }
    let side = first["config"]["img_size"]
        .as_u64()
        .context("no img_size")? as usize;
    // Every shard's labels are read and checked before anything is written: each a class of
    // the run's model (a shard whose labels were altered is refused, not merged).
    let classes = first["config"]["num_classes"]
        .as_u64()
        .context("no num_classes")?;
    let mut arr1 = npy_header("<i8", &[total]);
    for s in &shards {
        let l = s
            .zip
            .size("arr_1.npy")
            .with_context(|| format!("{}", s.path.display()))?;
        let h = npy_header("<i8", &[s.end - s.start]).len() as u64;
        if l != h + 8 * (s.end - s.start) as u64 {
            bail!(
                "{}: arr_1.npy does not hold {} labels",
                s.path.display(),
                s.end - s.start
            );
        }
        let bytes = s
            .zip
            .read("arr_1.npy", h, l - h)
            .with_context(|| format!("{}", s.path.display()))?;
        for (i, c) in bytes.chunks_exact(8).enumerate() {
            let label = i64::from_le_bytes(c.try_into().unwrap());
            if label < 0 || label as u64 >= classes {
                bail!(
                    "{}: label {label} of image {} is not a class of this run's model (0..{})",
                    s.path.display(),
                    s.start + i,
                    classes.saturating_sub(1)
                );
            }
        }
        arr1.extend_from_slice(&bytes);
    }
    let mut w = NpzWriter::create(&a.output)?;
    begin_images(&mut w, total, side)?;
    for s in &shards {
        let len = ((s.end - s.start) * side * side * 3) as u64;
        let mut off = 0;
        while off < len {
            let n = (len - off).min(64 << 20);
            let bytes = s
                .zip
                .read("arr_0.npy", s.data_at + off, n)
                .with_context(|| format!("{}", s.path.display()))?;
            w.write(&bytes)?;
            off += n;
        }
    }
    w.end_entry()?;
    w.entry("arr_1.npy", &arr1)?;
    let mut m = first;
    m["range"] = serde_json::json!([0, total]);
    w.entry(
        "checkergen.json",
        serde_json::to_string_pretty(&m)?.as_bytes(),
    )?;
    w.finish()?;
    println!(
        "merged {} shards ({total} images) into {}",
        shards.len(),
        a.output.display()
    );
    Ok(())
}

// Evaluation sample files: `generate` and `merge`.
// Parsed once per process: boxing GenerateArgs would save nothing worth a lint.
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand)]
pub enum Cmd {
    Generate(GenerateArgs),
    Merge(MergeArgs),
}

impl Cmd {
    pub fn run(self) -> Result<()> {
        match self {
            Cmd::Generate(a) => generate(a),
            Cmd::Merge(a) => merge(a),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_specs_and_ranges() {
        let none = |_: &str| None;
        assert_eq!(parse_shard("0/3", none).unwrap(), (0, 3));
        assert_eq!(parse_shard("2/3", none).unwrap(), (2, 3));
        for bad in ["3/3", "0/0", "a/b", "1", "-1/2", "auto"] {
            let e = parse_shard(bad, none).unwrap_err().to_string();
            assert!(e.contains("--shard"), "{bad}: {e}");
        }
        let slurm = |v: &str| match v {
            "SLURM_ARRAY_TASK_ID" => Some("1".into()),
            "SLURM_ARRAY_TASK_COUNT" => Some("4".into()),
            "RANK" => Some("3".into()),
            _ => None,
        };
        assert_eq!(parse_shard("auto", slurm).unwrap(), (1, 4));
        let torchrun = |v: &str| match v {
            "RANK" => Some("2".into()),
            "WORLD_SIZE" => Some("8".into()),
            _ => None,
        };
        assert_eq!(parse_shard("auto", torchrun).unwrap(), (2, 8));
        // Contiguous ranges covering everything once.
        for (total, n) in [(10usize, 3usize), (50_000, 7), (2, 5)] {
            let mut at = 0;
            for k in 0..n {
                let (s, e) = shard_range(total, k, n);
                assert_eq!(s, at);
                at = e;
            }
            assert_eq!(at, total);
        }
    }
}
