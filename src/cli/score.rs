//! The real-image subcommands (SPEC.md section 9): encode, decode, score. Parsing lives in
//! main.rs; these functions call the library and print.

use crate::args::{DeviceArg, PrecisionArgs, check_batch, open_model};
use anyhow::{Context, Result, bail};
use checkergen::cpu::score::ScoreStats;
use checkergen::io::image::{planar_to_rgb, write_rgb_png};
use checkergen::io::photo::{center_crop_arr, check_image_input, read_image, read_npz};
use checkergen::io::tokens::{read_token_grids, write_token_grids};
use checkergen::model::Model;
use clap::Args;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Encode real images (PNG, JPEG, or .npz arrays) into their code pyramids (a tokens file).
#[derive(Args)]
pub struct EncodeArgs {
    /// Model file with the VQ encoder (from `checkergen convert` or `init`).
    #[arg(long)]
    model: PathBuf,
    /// PNG or JPEG images (non-256 through center_crop_arr), or .npz files whose arr_0 is
    /// uint8 [N, 256, 256, 3].
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Output tokens file: scale_0, scale_1, ... int32 [B, s, s].
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output file.
    #[arg(long)]
    overwrite: bool,
    /// Images per encoder pass (only one batch's pixels are held).
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArg,
}

/// Decode the last scale of a tokens file to PNGs (reconstructions).
#[derive(Args)]
pub struct DecodeArgs {
    /// Model file whose VQ decoder turns the tokens back into pixels (from `checkergen
    /// convert` or `init`; the one the tokens came from).
    #[arg(long)]
    model: PathBuf,
    /// A tokens file (`encode --out` or `sample --save-tokens`).
    #[arg(long)]
    tokens: PathBuf,
    /// Output directory for recon_NNNN.png (the last scale, decoded; created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Remove the recon_NNNN.png of an earlier run in --out first (else such a directory is
    /// refused: a run never leaves a mixture of two runs' images).
    #[arg(long)]
    overwrite: bool,
}

/// Teacher-forced likelihood of real images (loss per scale, bits per token, top-1) at one
/// or more step counts, with the block-causal mask (SPEC.md section 9).
#[derive(Args)]
pub struct ScoreArgs {
    /// Model file with the VQ encoder.
    #[arg(long)]
    model: PathBuf,
    /// PNG or JPEG images (non-256 through center_crop_arr), or .npz files whose arr_0 is
    /// uint8 [N, 256, 256, 3].
    #[arg(required = true)]
    images: Vec<PathBuf>,
    /// Class ids, comma separated, one per image.
    #[arg(long, value_delimiter = ',', conflicts_with = "labels_file")]
    labels: Option<Vec<usize>>,
    /// A file of class ids, one per image (whitespace or comma separated).
    #[arg(long)]
    labels_file: Option<PathBuf>,
    /// Steps per scale to score at, comma separated: one result per value.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8")]
    steps_per_scale: Vec<usize>,
    /// Images per forward pass.
    #[arg(long, default_value_t = 8)]
    batch_size: usize,
    #[command(flatten)]
    device: DeviceArg,
    /// One JSON object per steps-per-scale value, one per line.
    #[arg(long)]
    json: bool,
}

/// One input image: a file read when its batch comes, or an image of an `.npz` (read whole).
enum Input {
    File(PathBuf),
    Array(std::sync::Arc<Vec<Vec<u8>>>, usize),
}

/// The images of `paths`: each `.npz` expands to its `arr_0` images (exactly side x side),
/// every other file is one image.
fn expand_inputs(paths: &[PathBuf], side: usize) -> Result<Vec<Input>> {
    for p in paths {
        check_image_input(p)?;
    }
    let mut out = Vec::new();
    for p in paths {
        let npz = p.extension().is_some_and(|e| e.eq_ignore_ascii_case("npz"));
        if npz {
            let imgs = std::sync::Arc::new(read_npz(p, side)?);
            out.extend((0..imgs.len()).map(|i| Input::Array(imgs.clone(), i)));
        } else {
            out.push(Input::File(p.clone()));
        }
    }
    Ok(out)
}

/// One input's 8-bit RGB (side, side, 3): image files go through center_crop_arr when not
/// side x side.
fn load_rgb(item: &Input, side: usize) -> Result<Vec<u8>> {
    Ok(match item {
        Input::File(p) => center_crop_arr(read_image(p)?, side),
        Input::Array(a, i) => a[*i].clone(),
    })
}

/// Encode `items` to per-scale code grids (B, s, s) with the model's encoder on its device,
/// `batch` images at a time (only one batch's pixels are held).
fn encode_images(
    model: &checkergen::Model,
    items: &[Input],
    batch: usize,
) -> Result<Vec<Vec<u32>>> {
    let side = model.image_size();
    let mut tokens = vec![Vec::new(); model.scale_sizes().len()];
    for chunk in items.chunks(batch) {
        let mut rgb = Vec::with_capacity(chunk.len() * side * side * 3);
        for item in chunk {
            rgb.extend(load_rgb(item, side)?);
        }
        for (t, c) in tokens.iter_mut().zip(model.encode(&rgb)?) {
            t.extend(c);
        }
    }
    Ok(tokens)
}

pub fn encode(a: EncodeArgs) -> Result<()> {
    let mut inputs: Vec<&Path> = a.images.iter().map(PathBuf::as_path).collect();
    inputs.push(&a.model);
    // Every input is checked (a type we read, a regular file) before the output and the
    // work.
    for p in &a.images {
        check_image_input(p)?;
    }
    checkergen::paths::check_input(&a.model)?;
    checkergen::paths::claim_output_file(&a.out, a.overwrite, &inputs)?;
    check_batch("--batch-size", Some(a.batch_size))?;
    let no_precision = PrecisionArgs { precision: None };
    let (model, _) = open_model(Some(&a.model), None, a.device, no_precision)?;
    model.host_model().encoder()?;
    let t = Instant::now();
    let items = expand_inputs(&a.images, model.image_size())?;
    let tokens = encode_images(&model, &items, a.batch_size)?;
    write_token_grids(&a.out, model.scale_sizes(), &tokens, items.len())?;
    eprintln!(
        "encoded {} images at scales {:?} in {:.2} s -> {}",
        items.len(),
        model.scale_sizes(),
        t.elapsed().as_secs_f64(),
        a.out.display()
    );
    Ok(())
}

/// Whether `name` is a file `decode` writes.
fn is_recon(name: &str) -> bool {
    name.strip_prefix("recon_")
        .and_then(|r| r.strip_suffix(".png"))
        .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
}

/// Images `decode` holds at once: the decoder's activations and pixels of one batch.
pub const DECODE_BATCH: usize = 8;

pub fn decode(a: DecodeArgs) -> Result<()> {
    let model = Model::load(&a.model)?;
    let (b, grids) = read_token_grids(&a.tokens, &model.scale_sizes, model.config.codebook_size())?;
    let s = *model.scale_sizes.last().context("model has no scales")?;
    let side = model.config.img_size;
    let inputs = [a.model.as_path(), a.tokens.as_path()];
    let dir = checkergen::paths::OutputDir::plan(&a.out, is_recon, a.overwrite, &inputs)?.open()?;
    // Batch after batch: memory holds one batch's activations and pixels, whatever the
    // number of images; a line every 10 s says how far it got.
    let last = grids.last().context("model has no scales")?;
    let t = Instant::now();
    let mut report = Instant::now();
    for first in (0..b).step_by(DECODE_BATCH) {
        let n = DECODE_BATCH.min(b - first);
        let images = model
            .decoder
            .decode_tokens(&last[first * s * s..(first + n) * s * s], n, s);
        let pixels = checkergen::cpu::decoder::to_pixels_u8(&images);
        for i in 0..n {
            let path = dir.join(&format!("recon_{:04}.png", first + i));
            write_rgb_png(&path, side, side, &planar_to_rgb(&pixels, i, side))?;
        }
        if report.elapsed().as_secs_f64() >= 10.0 && first + n < b {
            eprintln!(
                "decoded {}/{b} images, {:.0} s elapsed",
                first + n,
                t.elapsed().as_secs_f64()
            );
            report = Instant::now();
        }
    }
    dir.finish();
    eprintln!("decoded {b} images -> {}", a.out.display());
    Ok(())
}

fn read_labels(a: &ScoreArgs) -> Result<Vec<usize>> {
    match (&a.labels, &a.labels_file) {
        (Some(l), None) => Ok(l.clone()),
        (None, Some(f)) => {
            checkergen::paths::check_input(f)?;
            let text = std::fs::read_to_string(f)
                .with_context(|| format!("{}: cannot read", f.display()))?;
            text.split(|c: char| c.is_whitespace() || c == ',')
                .filter(|t| !t.is_empty())
                .map(|t| {
                    t.parse::<usize>()
                        .map_err(|_| anyhow::anyhow!("{}: '{t}' is not a class id", f.display()))
                })
                .collect()
        }
        _ => bail!("give the class of every image with --labels 1,5,7 or --labels-file FILE"),
    }
}

pub fn score(a: ScoreArgs) -> Result<()> {
    let labels = read_labels(&a)?;
    if a.batch_size == 0 || a.batch_size > checkergen::limits::MAX_IMAGES {
        bail!(
            "--batch-size must be 1..={}, got {}",
            checkergen::limits::MAX_IMAGES,
            a.batch_size
        );
    }
    let model = Model::load(&a.model)?;
    model.encoder()?;
    let items = expand_inputs(&a.images, model.config.img_size)?;
    if labels.len() != items.len() {
        bail!(
            "{} labels for {} images: give one class id per image",
            labels.len(),
            items.len()
        );
    }
    let nc = model.config.num_classes;
    if let Some(&bad) = labels.iter().find(|&&l| l >= nc) {
        bail!(
            "class id {bad} is out of range: this model has {nc} classes (0..{})",
            nc - 1
        );
    }
    // The library's scoring (the same as `checkergen::Model::score`), batch by batch as the
    // files are read.
    let on = checkergen::Model::on_device(model, a.device.device)?;
    if let Some(note) = on.device_note() {
        eprintln!("warning: {note}");
    }
    let mut scores = on.new_scores(&a.steps_per_scale)?;
    let side = on.image_size();
    let t = Instant::now();
    let mut t_enc = 0.0;
    for (batch, lab) in items.chunks(a.batch_size).zip(labels.chunks(a.batch_size)) {
        let mut rgb = Vec::with_capacity(batch.len() * side * side * 3);
        for item in batch {
            rgb.extend(load_rgb(item, side)?);
        }
        t_enc += on.score_batch(&rgb, lab, &mut scores)?;
    }
    let stats: Vec<ScoreStats> = scores.iter().map(|s| s.stats().clone()).collect();
    let secs = t.elapsed().as_secs_f64();
    if a.json {
        for st in &stats {
            println!("{}", st.to_json());
        }
    } else {
        print_table(&stats);
    }
    eprintln!(
        "{} images in {secs:.2} s ({:.2} images/s; encoder {t_enc:.2} s, transformer {:.2} s \
         for {} step counts)",
        items.len(),
        items.len() as f64 / secs,
        secs - t_enc,
        stats.len()
    );
    Ok(())
}

fn print_table(stats: &[ScoreStats]) {
    let ln2 = std::f64::consts::LN_2;
    let Some(first) = stats.first() else {
        return;
    };
    println!("images: {}", first.images);
    for st in stats {
        println!(
            "\nsteps/scale {}  serial steps {}  loss {:.4} nats  {:.4} bits/token",
            st.steps_per_scale,
            st.serial_steps,
            st.loss_total(),
            st.loss_total() / ln2
        );
        println!(
            "  {:>6} {:>12} {:>12} {:>8}",
            "scale", "loss (nats)", "bits/token", "top-1"
        );
        for ((s, l), t) in st
            .scale_sizes
            .iter()
            .zip(st.loss_by_scale())
            .zip(st.top1_by_scale())
        {
            println!(
                "  {:>6} {:>12.4} {:>12.4} {:>8.4}",
                format!("{s}x{s}"),
                l,
                l / ln2,
                t
            );
        }
    }
}

// The subcommands on real images: `encode`, `decode`, `score`.
#[derive(clap::Subcommand)]
pub enum Cmd {
    Encode(EncodeArgs),
    Decode(DecodeArgs),
    Score(ScoreArgs),
}

impl Cmd {
    pub fn run(self) -> Result<()> {
        match self {
            Cmd::Encode(a) => encode(a),
            Cmd::Decode(a) => decode(a),
            Cmd::Score(a) => score(a),
        }
    }
}
