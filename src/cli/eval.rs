//! `checkergen eval`: the ADM evaluator's five numbers (Inception Score, FID, sFID,
//! precision, recall) without TensorFlow, or an activation file of one input. The library
//! (`checkergen::eval`) does the work; this file parses, checks the paths, reports progress
//! and prints.

use crate::args::DeviceArg;
use crate::progress::{Off, Progress};
use anyhow::{Result, bail};
use checkergen::eval::activations::write_activations;
use checkergen::eval::inception::Inception;
use checkergen::eval::run::{EvalSet, MIN_EVAL_IMAGES, Report, evaluate, load_set, set_size};
use clap::Args;
use std::path::{Path, PathBuf};

/// The ADM evaluator's five numbers (Inception Score, FID, sFID, precision, recall)
/// without TensorFlow, from images or activation files; or one input's activation file.
#[derive(Args)]
pub struct EvalArgs {
    /// The FID Inception weights (pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, which
    /// torch-fidelity downloads as `weights-inception-2015-12-05-6726825d.pth`; either
    /// torch.save format, any float dtype).
    #[arg(long, value_name = "W.pth")]
    pub inception: PathBuf,
    /// The reference set: an ADM reference batch (.npz with arr_0, statistics used when it
    /// has them), a `generate` .npz, a folder of PNGs, or an activation file.
    #[arg(
        long = "ref",
        value_name = "REF",
        requires = "sample",
        conflicts_with = "activations"
    )]
    pub reference: Option<PathBuf>,
    /// The sample set, in any of the forms --ref takes.
    #[arg(long, value_name = "SAMPLE", requires = "reference")]
    pub sample: Option<PathBuf>,
    /// Print one JSON object (inception_score, fid, sfid, precision, recall, ref_images,
    /// sample_images) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Images per Inception pass (only one batch of pixels is held).
    #[arg(long, default_value_t = 16)]
    pub batch_size: usize,
    #[command(flatten)]
    pub device: DeviceArg,
    /// Also write the reference's activations (an activation file, reusable as --ref).
    #[arg(long, value_name = "F.npz", requires = "reference")]
    pub save_ref_activations: Option<PathBuf>,
    /// Also write the sample's activations.
    #[arg(long, value_name = "F.npz", requires = "sample")]
    pub save_sample_activations: Option<PathBuf>,
    /// Write the activation file of this one input instead of evaluating (with --out).
    #[arg(long, value_name = "INPUT", requires = "out")]
    pub activations: Option<PathBuf>,
    /// The activation file --activations writes: pool_3 [N, 2048] f32, spatial [N, 2023]
    /// f32, mu, sigma, mu_s, sigma_s f64.
    #[arg(long, value_name = "F.npz", requires = "activations")]
    pub out: Option<PathBuf>,
    /// Replace existing output files.
    #[arg(long)]
    pub overwrite: bool,
    /// No progress on stderr.
    #[arg(long)]
    pub quiet: bool,
}

/// An input: a regular file is checked (and remembered as an input) before anything runs;
/// a folder (of PNGs) must exist.
fn check_input(p: &Path) -> Result<()> {
    match std::fs::metadata(p) {
        Ok(m) if m.is_dir() => Ok(()),
        _ => checkergen::paths::check_input(p).map(|_| ()),
    }
}

/// Refuse a set of fewer than `min` images before any work.
fn need_images(p: &Path, min: usize, why: &str) -> Result<()> {
    let n = set_size(p)?;
    if n < min {
        bail!("{}: {n} image(s): at least {min} ({why})", p.display());
    }
    Ok(())
}

fn load(path: &Path, net: &Inception, a: &EvalArgs, what: &str) -> Result<EvalSet> {
    load_shown(path, net, a.batch_size, what, a.quiet)
}

/// An input's set, its progress on stderr as `what PATH` (a line every 10 s in logs).
fn load_shown(
    path: &Path,
    net: &Inception,
    batch: usize,
    what: &str,
    quiet: bool,
) -> Result<EvalSet> {
    let p = Progress::new(
        format!("{what} {}", path.display()),
        "images",
        Off::Lines,
        quiet,
    );
    load_set(path, net, batch, &mut |d, t| p.update(d as u64, t as u64))
}

/// Print the five numbers as a table.
fn print_table(r: &Report, reference: &Path, sample: &Path) {
    println!(
        "reference {} ({} images), sample {} ({} images)",
        reference.display(),
        r.ref_images,
        sample.display(),
        r.sample_images
    );
    println!("{:<16} {:>12.4}", "Inception Score", r.inception_score);
    println!("{:<16} {:>12.4}", "FID", r.fid);
    println!("{:<16} {:>12.4}", "sFID", r.sfid);
    println!("{:<16} {:>12.4}", "Precision", r.precision);
    println!("{:<16} {:>12.4}", "Recall", r.recall);
}

/// The Inception on the CPU: the only device the evaluator runs on today.
fn load_inception(a: &EvalArgs) -> Result<Inception> {
    use checkergen::Device;
    match a.device.device {
        Device::Cpu | Device::Auto => {}
        _ => bail!(
            "--device {}: eval runs on the CPU (the Inception has no GPU path yet)",
            a.device.flag()
        ),
    }
    if a.batch_size == 0 || a.batch_size > checkergen::limits::MAX_IMAGES {
        bail!(
            "--batch-size {}: must be 1 to {}",
            a.batch_size,
            checkergen::limits::MAX_IMAGES
        );
    }
    check_input(&a.inception)?;
    Inception::load(&a.inception)
}

pub fn eval(a: EvalArgs) -> Result<()> {
    if let Some(input) = &a.activations {
        let out = a.out.as_deref().expect("clap: --out with --activations");
        check_input(input)?;
        need_images(input, 2, "the statistics' covariance needs 2")?;
        let inputs = [a.inception.as_path(), input.as_path()];
        checkergen::paths::claim_output_file(out, a.overwrite, &inputs)?;
        let net = load_inception(&a)?;
        let set = load(input, &net, &a, "activations of")?;
        write_activations(out, &set.acts, &set.stats, &inputs)?;
        eprintln!(
            "wrote {} ({} images: pool_3, spatial, mu, sigma, mu_s, sigma_s)",
            out.display(),
            set.images()
        );
        return Ok(());
    }
    let (Some(reference), Some(sample)) = (&a.reference, &a.sample) else {
        bail!("give --ref and --sample (the five numbers), or --activations and --out");
    };
    for p in [reference, sample] {
        check_input(p)?;
    }
    for p in [reference, sample] {
        need_images(
            p,
            MIN_EVAL_IMAGES,
            "precision and recall need more than k = 3",
        )?;
    }
    let inputs = [a.inception.as_path(), reference.as_path(), sample.as_path()];
    let outs: Vec<&Path> = [&a.save_ref_activations, &a.save_sample_activations]
        .into_iter()
        .flatten()
        .map(PathBuf::as_path)
        .collect();
    if outs.len() == 2 && outs[0] == outs[1] {
        bail!("--save-ref-activations and --save-sample-activations name the same file");
    }
    for o in &outs {
        checkergen::paths::claim_output_file(o, a.overwrite, &inputs)?;
    }
    let net = load_inception(&a)?;
    let report = eval_sets(&net, reference, sample, &a)?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print_table(&report, reference, sample);
    }
    Ok(())
}

/// Load both sets (writing their activation files when asked) and evaluate.
fn eval_sets(net: &Inception, reference: &Path, sample: &Path, a: &EvalArgs) -> Result<Report> {
    let inputs = [a.inception.as_path(), reference, sample];
    let r = load(reference, net, a, "reference")?;
    if let Some(f) = &a.save_ref_activations {
        write_activations(f, &r.acts, &r.stats, &inputs)?;
    }
    let s = load(sample, net, a, "sample")?;
    if let Some(f) = &a.save_sample_activations {
        write_activations(f, &s.acts, &s.stats, &inputs)?;
    }
    evaluate(&r, &s, net.fc_weight())
}

/// `generate --eval REF --inception W` and `steps --eval`: the network and the reference,
/// checked before any image is made; the reference's activations computed when first needed
/// and kept.
pub struct EvalPlan {
    net: Inception,
    reference: PathBuf,
    loaded: Option<EvalSet>,
}

impl EvalPlan {
    pub fn new(inception: &Path, reference: &Path) -> Result<EvalPlan> {
        check_input(inception)?;
        check_input(reference)?;
        need_images(
            reference,
            MIN_EVAL_IMAGES,
            "precision and recall need more than k = 3",
        )?;
        Ok(EvalPlan {
            net: Inception::load(inception)?,
            reference: reference.to_path_buf(),
            loaded: None,
        })
    }

    /// The network (features of generated images).
    pub fn net(&self) -> &Inception {
        &self.net
    }

    /// The reference set, computed on the first call.
    pub fn reference(&mut self, quiet: bool) -> Result<&EvalSet> {
        if self.loaded.is_none() {
            let set = load_shown(&self.reference, &self.net, 16, "reference", quiet)?;
            self.loaded = Some(set);
        }
        Ok(self.loaded.as_ref().expect("just loaded"))
    }

    /// Evaluate the images at `sample` against the reference and print the table.
    pub fn report(mut self, sample: &Path, quiet: bool) -> Result<()> {
        let s = load_shown(sample, &self.net, 16, "sample", quiet)?;
        let report = self.evaluate(&s, quiet)?;
        print_table(&report, &self.reference, sample);
        Ok(())
    }

    /// The five numbers of `sample` against the reference.
    pub fn evaluate(&mut self, sample: &EvalSet, quiet: bool) -> Result<Report> {
        self.reference(quiet)?;
        let r = self.loaded.as_ref().expect("loaded above");
        evaluate(r, sample, self.net.fc_weight())
    }
}
