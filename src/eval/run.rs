//! One evaluation as the ADM evaluator runs it (`evaluations/evaluator.py`'s `main`): the
//! activations of a reference and of a sample set (computed from images through the FID
//! Inception, batch by batch, or read from an activation file), their statistics (the file's
//! `mu`, `sigma`, `mu_s`, `sigma_s` when it has them, as the evaluator's `read_statistics`),
//! then the five numbers: Inception Score of the sample, FID, sFID, precision and recall.

use super::activations::{Activations, FidStats, read_activations, read_statistics};
use super::inception::Inception;
use super::input::{ImageFormat, ImageSource, InputKind, input_kind};
use super::metrics::{frechet_distance, inception_score, precision_recall};
use anyhow::{Context, Result};
use std::path::Path;

/// Classes of the Inception's softmax (the 2015 graph's 1008).
pub const IS_CLASSES: usize = 1008;

/// One side of an evaluation: its activations and the statistics the evaluator uses.
pub struct EvalSet {
    /// How messages name it (the input's path).
    pub name: String,
    /// `pool_3` and `spatial` of every image.
    pub acts: Activations,
    /// FID and sFID statistics: the input's own when it stores them, else computed.
    pub stats: FidStats,
    /// Whether `acts` were computed here from images (false: read from an activation file).
    pub computed: bool,
}

impl EvalSet {
    /// Images in the set.
    pub fn images(&self) -> usize {
        self.acts.rows()
    }
}

/// The set at `path`: an activation file as it is, or images (an ADM or `generate` .npz,
/// or a folder of PNGs) streamed through `net` `batch` images at a time, `progress(done,
/// total)` after each batch. Only one batch of pixels is held.
pub fn load_set(
    path: &Path,
    net: &Inception,
    batch: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalSet> {
    let name = path.display().to_string();
    match input_kind(path)? {
        InputKind::Activations => {
            let f = read_activations(path)?;
            let stats = f.fid_stats(&name)?;
            Ok(EvalSet {
                name,
                acts: f.acts,
                stats,
                computed: false,
            })
        }
        InputKind::Images => {
            let mut src = ImageSource::open(path)?;
            // An ADM reference batch may store its statistics beside arr_0.
            let stored = match src.format() {
                ImageFormat::PngFolder => None,
                _ => read_statistics(path)?,
            };
            let total = src.len();
            let mut acts = Activations::default();
            acts.pool
                .reserve_exact(total * super::activations::POOL_DIM);
            acts.spatial
                .reserve_exact(total * super::activations::SPATIAL_DIM);
            let mut done = 0;
            while let Some(b) = src.next_batch(batch.max(1))? {
                let f = net.features(&b.pixels, b.count, b.side).with_context(|| {
                    format!("{name}: images {}..{}", b.first, b.first + b.count)
                })?;
                acts.pool.extend_from_slice(&f.pool);
                acts.spatial.extend_from_slice(&f.spatial);
                done += b.count;
                progress(done, total);
            }
            let stats = match stored {
                Some(s) => s,
                None => acts.statistics(&name)?,
            };
            Ok(EvalSet {
                name,
                acts,
                stats,
                computed: true,
            })
        }
    }
}

/// Images in the set at `path` (an activation file's rows, or the images of an .npz or a
/// PNG folder), read from headers where it can: for checks before any work.
pub fn set_size(path: &Path) -> Result<usize> {
    Ok(match input_kind(path)? {
        InputKind::Activations => read_activations(path)?.acts.rows(),
        InputKind::Images => ImageSource::open(path)?.len(),
    })
}

/// The fewest images a set of a full evaluation may have: precision and recall need more
/// than k = 3 (and the covariance of FID at least 2).
pub const MIN_EVAL_IMAGES: usize = super::metrics::NHOOD_K + 1;

/// The five numbers of the ADM evaluator, and the set sizes.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Report {
    /// Inception Score of the sample (splits of 5000).
    pub inception_score: f64,
    /// FID: Frechet distance of the `pool_3` statistics.
    pub fid: f64,
    /// sFID: Frechet distance of the `spatial` statistics.
    pub sfid: f64,
    /// Fraction of sample images inside the reference manifold (k = 3).
    pub precision: f64,
    /// Fraction of reference images inside the sample manifold (k = 3).
    pub recall: f64,
    /// Images of the reference.
    pub ref_images: usize,
    /// Images of the sample.
    pub sample_images: usize,
}

impl Report {
    /// One JSON object with the evaluator's names.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "inception_score": self.inception_score,
            "fid": self.fid,
            "sfid": self.sfid,
            "precision": self.precision,
            "recall": self.recall,
            "ref_images": self.ref_images,
            "sample_images": self.sample_images,
        })
    }
}

/// The evaluator's arithmetic on two sets; `fc_weight` is the Inception's softmax weight
/// ([`Inception::fc_weight`], 1008 x 2048).
pub fn evaluate(reference: &EvalSet, sample: &EvalSet, fc_weight: &[f32]) -> Result<Report> {
    let fid = frechet_distance(&reference.stats.pool, &sample.stats.pool)
        .with_context(|| format!("FID of {} against {}", sample.name, reference.name))?;
    let sfid = frechet_distance(&reference.stats.spatial, &sample.stats.spatial)
        .with_context(|| format!("sFID of {} against {}", sample.name, reference.name))?;
    let sample_pool = sample.acts.pool_features(&sample.name)?;
    let is = inception_score(&sample_pool, fc_weight, IS_CLASSES)
        .with_context(|| format!("Inception Score of {}", sample.name))?;
    let pr = precision_recall(
        &reference.acts.pool_features(&reference.name)?,
        &sample_pool,
    )?;
    Ok(Report {
        inception_score: is,
        fid: fid.distance,
        sfid: sfid.distance,
        precision: pr.precision,
        recall: pr.recall,
        ref_images: reference.images(),
        sample_images: sample.images(),
    })
}
