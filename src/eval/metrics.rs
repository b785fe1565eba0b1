//! The ADM evaluator's metrics (openai/guided-diffusion `evaluations/evaluator.py`) from
//! Inception activations: FID statistics and the Frechet distance (FID from `pool_3`, sFID
//! from `spatial`), the Inception Score, and precision and recall by the k = 3 manifold
//! estimator. Each function follows the evaluator's arithmetic; where it does not do so to
//! the last bit, the item's documentation says how and by how much.
//!
//! - [`Statistics`]: the mean and `np.cov`'s unbiased covariance (divisor N - 1), accumulated
//!   in f64 over batches ([`StatsAccumulator`]: Chan's pairwise merge of per-chunk centred
//!   sums, so a stream of 50,000 rows never sits in memory as f64 and nothing cancels).
//!   `np.cov` also works in f64; the evaluator's mean is numpy's float32 `np.mean`, ours is
//!   f64 (more exact; the FID moves by far less than the golden tolerance).
//! - [`frechet_distance`]: `|mu1 - mu2|^2 + tr S1 + tr S2 - 2 tr sqrtm(S1 S2)`. The evaluator
//!   takes scipy's `sqrtm` of the (non-symmetric) product and keeps the real part; we use
//!   `tr sqrtm(S1 S2) = sum sqrt(eig(B^T S2 B))` with `S1 = B B^T`, `B = Q sqrt(L)` from the
//!   symmetric eigendecomposition `S1 = Q L Q^T` (faer), which is the same number in exact
//!   arithmetic. Eigenvalues that rounding leaves slightly negative are what make scipy's
//!   result complex; their square roots are imaginary, so the real part the evaluator keeps
//!   gets nothing from them, and we clamp them to 0. Its two failure paths are kept: a
//!   non-finite square root retries with 1e-6 on both diagonals (its "singular product"
//!   warning, reported in [`Frechet::eps_retry`]), and an imaginary part too large to be
//!   rounding is an error (see [`frechet_distance`]).
//! - [`inception_score`]: softmax(pool @ W) in f32 as TensorFlow computes it, then the
//!   evaluator's KL formula per split of 5,000 rows (in f64 here, float32 there: ~1e-7).
//! - [`precision_recall`]: the evaluator's `ManifoldEstimator` with k = 3: radii are the
//!   4th smallest squared distance of each row to its own set (itself included, at
//!   distance 0), a sample is "in" the reference manifold when its squared distance to some
//!   reference row is <= that row's radius (precision), and the other way round (recall).
//!   Squared distances are `max(|u|^2 - 2 u.v + |v|^2, 0)` computed in float16, as its
//!   `DistanceBlock` casts both batches to float16, with its float32 fallback for every
//!   10,000 x 10,000 block in which a float16 distance is not finite (see
//!   [`precision_recall`] for the float16 model and what it cannot reproduce).

use anyhow::{Result, bail};
use faer::{Accum, Mat, MatRef, Par, Side};
use rayon::prelude::*;

/// A set of activation rows (`rows` x `dim` f32, row-major) with a name for messages: the
/// file they came from. Built only through [`Features::new`], which refuses a ragged length
/// and NaN or infinite values, so every metric can assume finite input.
#[derive(Clone, Copy, Debug)]
pub struct Features<'a> {
    name: &'a str,
    data: &'a [f32],
    dim: usize,
}

impl<'a> Features<'a> {
    /// Check and wrap `data` as rows of width `dim`; `name` starts every error message.
    pub fn new(name: &'a str, data: &'a [f32], dim: usize) -> Result<Self> {
        if dim == 0 {
            bail!("{name}: activations of width 0");
        }
        if !data.len().is_multiple_of(dim) {
            bail!(
                "{name}: {} values are not whole rows of width {dim}",
                data.len()
            );
        }
        check_finite(name, data, dim)?;
        Ok(Features { name, data, dim })
    }

    /// The name messages use.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// Number of rows (images).
    pub fn rows(&self) -> usize {
        self.data.len() / self.dim
    }

    /// Width of a row.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// The rows, row-major.
    pub fn data(&self) -> &'a [f32] {
        self.data
    }
}

/// The first NaN or infinite value of `data` (rows of width `dim`) as a one-line error.
pub fn check_finite(name: &str, data: &[f32], dim: usize) -> Result<()> {
    if let Some(i) = data.par_iter().position_first(|v| !v.is_finite()) {
        bail!(
            "{name}: activation {} of row {} is {} (NaN or infinite activations)",
            i % dim.max(1),
            i / dim.max(1),
            data[i]
        );
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Statistics

/// FID statistics of a set of activations: `mu` (d) and the unbiased covariance `sigma`
/// (d x d, row-major, symmetric), both f64 as `np.cov` gives them.
#[derive(Clone, Debug, PartialEq)]
pub struct Statistics {
    /// The mean of each column.
    pub mu: Vec<f64>,
    /// The covariance, row-major d x d.
    pub sigma: Vec<f64>,
}

impl Statistics {
    /// Statistics given by a file (a reference batch's `mu` / `sigma`): shapes must agree,
    /// values be finite, and `sigma` be symmetric (to 1e-6 of its largest entry; it is then
    /// symmetrized exactly, as the eigensolver reads one triangle). `name` starts every
    /// error message.
    pub fn new(name: &str, mu: Vec<f64>, sigma: Vec<f64>) -> Result<Statistics> {
        let d = mu.len();
        if d == 0 {
            bail!("{name}: statistics of dimension 0");
        }
        if d.checked_mul(d) != Some(sigma.len()) {
            bail!(
                "{name}: sigma has {} values, not {d} x {d} for a mean of length {d}",
                sigma.len()
            );
        }
        if let Some(i) = mu.iter().position(|v| !v.is_finite()) {
            bail!("{name}: mu[{i}] is {}", mu[i]);
        }
        if let Some(i) = sigma.iter().position(|v| !v.is_finite()) {
            bail!("{name}: sigma[{}, {}] is {}", i / d, i % d, sigma[i]);
        }
        let scale = sigma.iter().fold(0f64, |m, v| m.max(v.abs()));
        let mut s = sigma;
        for i in 0..d {
            for j in 0..i {
                let (a, b) = (s[i * d + j], s[j * d + i]);
                if (a - b).abs() > 1e-6 * scale {
                    bail!(
                        "{name}: sigma is not symmetric (sigma[{i}, {j}] = {a}, sigma[{j}, {i}] = {b}): not a covariance"
                    );
                }
                let m = 0.5 * (a + b);
                s[i * d + j] = m;
                s[j * d + i] = m;
            }
        }
        Ok(Statistics { mu, sigma: s })
    }

    /// The dimension d.
    pub fn dim(&self) -> usize {
        self.mu.len()
    }
}

/// Rows gathered before one f64 GEMM of the covariance (a GEMM with k = 64 would run far
/// below the machine's rate).
const STATS_CHUNK: usize = 1024;

/// Streaming mean and covariance: feed batches of rows with [`add`](Self::add), get
/// [`Statistics`] from [`finish`](Self::finish). Per chunk of up to 1,024 rows the chunk's
/// own mean and centred cross-product `Xc^T Xc` (one f64 GEMM through faer) are merged into
/// the running ones by Chan et al.'s update (`M2 += M2_chunk + delta delta^T n_a n_b / n`),
/// which is `np.cov` up to f64 rounding without ever holding all rows.
pub struct StatsAccumulator {
    name: String,
    dim: usize,
    n: usize,
    mean: Vec<f64>,
    m2: Mat<f64>,
    pending: Vec<f32>,
}

impl StatsAccumulator {
    /// An empty accumulator for rows of width `dim`; `name` starts its error messages.
    pub fn new(name: &str, dim: usize) -> StatsAccumulator {
        StatsAccumulator {
            name: name.to_string(),
            dim,
            n: 0,
            mean: vec![0.0; dim],
            m2: Mat::zeros(dim, dim),
            pending: Vec::new(),
        }
    }

    /// Rows added so far.
    pub fn count(&self) -> usize {
        self.n + self.pending.len() / self.dim.max(1)
    }

    /// Add rows (row-major, width `dim`); NaN or infinite values are an error.
    pub fn add(&mut self, rows: &[f32]) -> Result<()> {
        let name = &self.name;
        let dim = self.dim;
        if dim == 0 || !rows.len().is_multiple_of(dim) {
            bail!(
                "{name}: {} values are not whole rows of width {dim}",
                rows.len()
            );
        }
        check_finite(name, rows, dim)?;
        let mut rest = rows;
        while !rest.is_empty() {
            let room = STATS_CHUNK * dim - self.pending.len();
            let take = room.min(rest.len());
            self.pending.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if self.pending.len() == STATS_CHUNK * dim {
                self.flush();
            }
        }
        Ok(())
    }

    fn flush(&mut self) {
        let d = self.dim;
        let b = self.pending.len() / d;
        if b == 0 {
            return;
        }
        let mut cmean = vec![0f64; d];
        for row in self.pending.chunks_exact(d) {
            for (m, &v) in cmean.iter_mut().zip(row) {
                *m += v as f64;
            }
        }
        cmean.iter_mut().for_each(|m| *m /= b as f64);
        let xc: Vec<f64> = self
            .pending
            .chunks_exact(d)
            .flat_map(|row| row.iter().zip(&cmean).map(|(&v, &m)| v as f64 - m))
            .collect();
        let x = MatRef::from_row_major_slice(&xc, b, d);
        faer::linalg::matmul::matmul(
            self.m2.as_mut(),
            Accum::Add,
            x.transpose(),
            x,
            1.0,
            Par::rayon(0),
        );
        let (na, nb) = (self.n as f64, b as f64);
        let n = na + nb;
        if self.n > 0 {
            let delta: Vec<f64> = cmean.iter().zip(&self.mean).map(|(c, m)| c - m).collect();
            let f = na * nb / n;
            for i in 0..d {
                let di = delta[i] * f;
                for (j, &dj) in delta.iter().enumerate() {
                    self.m2[(i, j)] += di * dj;
                }
            }
            for (m, dl) in self.mean.iter_mut().zip(&delta) {
                *m += dl * nb / n;
            }
        } else {
            self.mean = cmean;
        }
        self.n += b;
        self.pending.clear();
    }

    /// The statistics of every row added; fewer than 2 rows is an error (a covariance
    /// needs 2).
    pub fn finish(mut self) -> Result<Statistics> {
        self.flush();
        let (n, d) = (self.n, self.dim);
        if n < 2 {
            bail!(
                "{}: {n} image{}: the covariance of FID statistics needs at least 2",
                self.name,
                if n == 1 { "" } else { "s" }
            );
        }
        let mut sigma = vec![0f64; d * d];
        let div = (n - 1) as f64;
        for i in 0..d {
            for j in 0..=i {
                let v = 0.5 * (self.m2[(i, j)] + self.m2[(j, i)]) / div;
                sigma[i * d + j] = v;
                sigma[j * d + i] = v;
            }
        }
        Ok(Statistics {
            mu: self.mean,
            sigma,
        })
    }
}

/// The statistics of a whole set of rows (the evaluator's `compute_statistics`).
pub fn statistics(f: &Features) -> Result<Statistics> {
    let mut acc = StatsAccumulator::new(f.name, f.dim);
    acc.add(f.data)?;
    acc.finish()
}

// ---------------------------------------------------------------------------------------
// Frechet distance

/// The evaluator's diagonal offset when the square root of the product is not finite.
pub const FRECHET_EPS: f64 = 1e-6;

/// A Frechet distance and how it was reached.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Frechet {
    /// The distance (FID, or sFID from spatial statistics).
    pub distance: f64,
    /// The square root of the product was not finite, and was taken again with
    /// [`FRECHET_EPS`] added to both diagonals (the evaluator's warning "fid calculation
    /// produces singular product").
    pub eps_retry: bool,
}

/// `tr sqrtm(S1 S2)` and the sum of the imaginary square roots of the negative eigenvalues,
/// or None when something is not finite (or the eigensolver did not converge).
fn trace_sqrt_product(s1: MatRef<f64>, s2: MatRef<f64>) -> Option<(f64, f64)> {
    let d = s1.nrows();
    let e = s1.self_adjoint_eigen(Side::Lower).ok()?;
    let (l, q) = (e.S().column_vector(), e.U());
    // B = Q sqrt(L) (negative eigenvalues of a PSD matrix are rounding: 0), S1 = B B^T;
    // the eigenvalues of S1 S2 are those of B^T S2 B (symmetric PSD).
    let b = Mat::from_fn(d, d, |i, j| q[(i, j)] * l[j].max(0.0).sqrt());
    let mut t = Mat::<f64>::zeros(d, d);
    faer::linalg::matmul::matmul(
        t.as_mut(),
        Accum::Replace,
        b.transpose(),
        s2,
        1.0,
        Par::rayon(0),
    );
    let mut m = Mat::<f64>::zeros(d, d);
    faer::linalg::matmul::matmul(
        m.as_mut(),
        Accum::Replace,
        t.as_ref(),
        b.as_ref(),
        1.0,
        Par::rayon(0),
    );
    for i in 0..d {
        for j in 0..i {
            let v = 0.5 * (m[(i, j)] + m[(j, i)]);
            m[(i, j)] = v;
            m[(j, i)] = v;
        }
    }
    let mu = m.self_adjoint_eigenvalues(Side::Lower).ok()?;
    if mu.iter().any(|v| !v.is_finite()) {
        return None;
    }
    let re = mu.iter().map(|&v| v.max(0.0).sqrt()).sum();
    let im = mu.iter().map(|&v| (-v).max(0.0).sqrt()).sum();
    Some((re, im))
}

/// The Frechet distance between two sets of statistics, as the evaluator's
/// `FIDStatistics.frechet_distance` (`sample.frechet_distance(reference)`; the distance is
/// symmetric). Dimensions must agree.
///
/// The evaluator raises "Imaginary component" when an imaginary part on the diagonal of
/// scipy's square root exceeds 1e-3. Here the imaginary parts are the square roots of the
/// negative eigenvalues of `B^T S2 B`; their sum is the imaginary part of the trace, and when
/// it exceeds 1e-3 x d some diagonal entry must exceed 1e-3: that is an error here. Below
/// it the evaluator may still raise (its Schur route rounds differently); covariances of
/// N > d activations leave eigenvalues that are positive or at rounding level, far below.
pub fn frechet_distance(a: &Statistics, b: &Statistics) -> Result<Frechet> {
    let d = a.dim();
    if b.dim() != d || a.sigma.len() != d * d || b.sigma.len() != d * d {
        bail!(
            "Frechet distance: statistics of dimension {d} against {} (sample and reference \
             activations of different widths)",
            b.dim()
        );
    }
    let s1 = MatRef::from_row_major_slice(&a.sigma, d, d);
    let s2 = MatRef::from_row_major_slice(&b.sigma, d, d);
    let mut eps_retry = false;
    let (tr_covmean, im) = match trace_sqrt_product(s1, s2) {
        Some(t) => t,
        None => {
            eps_retry = true;
            let off = |s: MatRef<f64>| {
                Mat::from_fn(d, d, |i, j| {
                    s[(i, j)] + if i == j { FRECHET_EPS } else { 0.0 }
                })
            };
            let (o1, o2) = (off(s1), off(s2));
            match trace_sqrt_product(o1.as_ref(), o2.as_ref()) {
                Some(t) => t,
                None => bail!(
                    "Frechet distance: the square root of the covariance product is not finite, \
                     even with {FRECHET_EPS} added to the diagonals"
                ),
            }
        }
    };
    if im > 1e-3 * d as f64 {
        bail!(
            "Frechet distance: imaginary component {im:.3e} in the trace of the square root \
             of the covariance product (the evaluator's \"Imaginary component\" error)"
        );
    }
    let diff: f64 = a.mu.iter().zip(&b.mu).map(|(x, y)| (x - y) * (x - y)).sum();
    let tr = |s: &[f64]| (0..d).map(|i| s[i * d + i]).sum::<f64>();
    Ok(Frechet {
        distance: diff + tr(&a.sigma) + tr(&b.sigma) - 2.0 * tr_covmean,
        eps_retry,
    })
}

// ---------------------------------------------------------------------------------------
// Inception Score

/// Rows per split of the Inception Score (the evaluator's `split_size`).
pub const IS_SPLIT: usize = 5000;

/// The Inception Score of `pool` (the sample's pool_3 activations) with the softmax layer's
/// weight `fc_weight`, `classes` x dim in the PyTorch Linear layout (`fc.weight`, the
/// transpose of the evaluator's `softmax/logits/MatMul` input; no bias, as there).
///
/// As the evaluator: per split of [`IS_SPLIT`] rows (the last may be shorter),
/// `p = softmax(pool @ W)` (f32, as TensorFlow), `KL_i = sum_c p_ic (ln p_ic - ln mean_i
/// p_ic)`, score `exp(mean_i KL_i)`; the result is the mean of the splits' scores. A
/// probability that underflows to 0 makes the evaluator's score NaN (0 x -inf), and ours too;
/// it takes a logit gap above ~87 (TensorFlow flushes denormals: it reaches 0 a little
/// before our f32 `exp` does).
pub fn inception_score(pool: &Features, fc_weight: &[f32], classes: usize) -> Result<f64> {
    let (n, d) = (pool.rows(), pool.dim());
    if classes == 0 || d.checked_mul(classes) != Some(fc_weight.len()) {
        bail!(
            "Inception Score: the softmax weight has {} values, not {classes} classes x {d} (the activations' width)",
            fc_weight.len()
        );
    }
    if let Some(i) = fc_weight.iter().position(|v| !v.is_finite()) {
        bail!(
            "Inception Score: softmax weight [{}, {}] is {}",
            i / d,
            i % d,
            fc_weight[i]
        );
    }
    if n == 0 {
        bail!("{}: no images for the Inception Score", pool.name());
    }
    let mut scores = Vec::new();
    let mut p = Vec::new();
    for s in (0..n).step_by(IS_SPLIT) {
        let e = (s + IS_SPLIT).min(n);
        let rows = e - s;
        p.resize(rows * classes, 0f32);
        crate::math::matmul_bt(
            &pool.data()[s * d..e * d],
            fc_weight,
            &mut p,
            rows,
            d,
            classes,
            0.0,
        );
        p.par_chunks_mut(classes).for_each(|r| {
            let m = r.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0f32;
            for v in r.iter_mut() {
                *v = (*v - m).exp();
                sum += *v;
            }
            r.iter_mut().for_each(|v| *v /= sum);
        });
        let mut mean = vec![0f64; classes];
        for r in p.chunks_exact(classes) {
            for (m, &v) in mean.iter_mut().zip(r) {
                *m += v as f64;
            }
        }
        let log_mean: Vec<f64> = mean.iter().map(|m| (m / rows as f64).ln()).collect();
        let kl: f64 = p
            .par_chunks(classes)
            .map(|r| {
                r.iter()
                    .zip(&log_mean)
                    .map(|(&v, &lm)| {
                        let v = v as f64;
                        v * (v.ln() - lm)
                    })
                    .sum::<f64>()
            })
            .sum();
        scores.push((kl / rows as f64).exp());
    }
    Ok(scores.iter().sum::<f64>() / scores.len() as f64)
}

// ---------------------------------------------------------------------------------------
// Precision and recall

/// The neighbourhood size k of the manifold estimator (the evaluator's `nhood_sizes=(3,)`).
pub const NHOOD_K: usize = 3;

/// The evaluator's row and column batch size: float16 or float32 is decided per block of
/// this many rows by this many columns.
pub const EVAL_BLOCK: usize = 10_000;

/// Rows of a block whose distances are computed at once (bounded memory: a tile of
/// `TILE_ROWS` x 10,000 f32 distances).
const TILE_ROWS: usize = 256;

/// Round an f32 to the nearest float16 value (ties to even), returned as f32; beyond the
/// float16 range: infinity; NaN stays NaN. Bit arithmetic and selects rather than a
/// conversion per element through `half`, so the loops over distance tiles vectorize.
#[inline]
pub fn round_f16(x: f32) -> f32 {
    // Normal range: round the f32 mantissa to float16's 10 bits, ties to even (a carry into
    // the exponent is the right answer); past 65504 it is infinity.
    let b = x.to_bits();
    let n = f32::from_bits(b.wrapping_add(0x0FFF + ((b >> 13) & 1)) & !0x1FFF);
    let n = if n.abs() > 65504.0 {
        f32::INFINITY.copysign(x)
    } else {
        n
    };
    // Below 2^-14 float16 is subnormal, a fixed step of 2^-24: adding 0.5 (whose f32 step is
    // 2^-24) rounds to it, ties to even.
    let half = 0.5f32.copysign(x);
    let s = ((x + half) - half).copysign(x);
    let r = if x.abs() < 6.103_515_6e-5 { s } else { n };
    if x.is_nan() { x } else { r }
}

/// `max(x, 0)` as TensorFlow's `tf.maximum`: NaN propagates.
#[inline]
fn relu_nan(x: f32) -> f32 {
    if x.is_nan() { x } else { x.max(0.0) }
}

/// Which precision a block's distances are computed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Prec {
    F16,
    F32,
}

/// Rows as the distance graph sees them: float16-rounded values (or the f32 rows) and their
/// squared norms `reduce_sum(square(x))` in that precision.
struct Operand<'a> {
    vals: std::borrow::Cow<'a, [f32]>,
    norms: Vec<f32>,
}

fn prepare(x: &[f32], dim: usize, prec: Prec) -> Operand<'_> {
    match prec {
        Prec::F32 => Operand {
            vals: std::borrow::Cow::Borrowed(x),
            norms: x
                .par_chunks(dim)
                .map(|r| r.iter().map(|v| v * v).sum())
                .collect(),
        },
        Prec::F16 => {
            let vals: Vec<f32> = x.par_iter().map(|&v| round_f16(v)).collect();
            // tf.square in float16 rounds each square; the sum is rounded once (the model:
            // see precision_recall).
            let norms = vals
                .par_chunks(dim)
                .map(|r| round_f16(r.iter().map(|v| round_f16(v * v)).sum()))
                .collect();
            Operand {
                vals: std::borrow::Cow::Owned(vals),
                norms,
            }
        }
    }
}

/// The squared distances of one evaluator block (rows `a` against rows `b`, both of width
/// `dim`) in `prec`, tile by tile: `on_tile(first_row, tile)` gets `tile` (rows x b-rows,
/// row-major) for rows `first_row..`. Returns false, at the first tile holding a
/// non-finite float16 distance, when the block must be redone in f32.
fn block_distances(
    a: &[f32],
    b: &[f32],
    dim: usize,
    prec: Prec,
    tile: &mut Vec<f32>,
    mut on_tile: impl FnMut(usize, &[f32]),
) -> bool {
    let nb = b.len() / dim;
    let bo = prepare(b, dim, prec);
    for (t, rows) in a.chunks(TILE_ROWS * dim).enumerate() {
        let m = rows.len() / dim;
        let ao = prepare(rows, dim, prec);
        tile.resize(m * nb, 0.0);
        crate::math::matmul_bt(&ao.vals, &bo.vals, tile, m, dim, nb, 0.0);
        let finite = tile
            .par_chunks_mut(nb)
            .zip(ao.norms.par_iter())
            .map(|(row, &nu)| {
                let mut ok = true;
                match prec {
                    // norm_u - 2 * matmul(U, V^T) + norm_v, each op rounded to float16.
                    Prec::F16 => {
                        for (d, &nv) in row.iter_mut().zip(&bo.norms) {
                            let two_dot = round_f16(2.0 * round_f16(*d));
                            let v = relu_nan(round_f16(round_f16(nu - two_dot) + nv));
                            ok &= v.is_finite();
                            *d = v;
                        }
                    }
                    Prec::F32 => {
                        for (d, &nv) in row.iter_mut().zip(&bo.norms) {
                            *d = relu_nan(nu - 2.0 * *d + nv);
                        }
                    }
                }
                ok
            })
            .reduce(|| true, |x, y| x && y);
        if !finite {
            return false;
        }
        on_tile(t * TILE_ROWS, tile);
    }
    true
}

/// Run `per_block` over the evaluator's 10,000 x 10,000 blocks of `a` (rows) against `b`
/// (columns): first in float16, and again in f32 when a float16 distance of the block is not
/// finite. `per_block(r0, c0, prec, finish)` is called for each try; `finish` tells whether
/// that try stands (true: merge its results). Returns the number of blocks redone in f32.
fn for_each_block(
    a: &[f32],
    b: &[f32],
    dim: usize,
    mut per_block: impl FnMut(usize, usize, &[f32], &[f32], Prec, &mut Vec<f32>) -> bool,
) -> usize {
    let (na, nb) = (a.len() / dim, b.len() / dim);
    let mut tile = Vec::new();
    let mut redone = 0;
    for r0 in (0..na).step_by(EVAL_BLOCK) {
        let ra = &a[r0 * dim..(r0 + EVAL_BLOCK).min(na) * dim];
        for c0 in (0..nb).step_by(EVAL_BLOCK) {
            let cb = &b[c0 * dim..(c0 + EVAL_BLOCK).min(nb) * dim];
            if !per_block(r0, c0, ra, cb, Prec::F16, &mut tile) {
                redone += 1;
                let ok = per_block(r0, c0, ra, cb, Prec::F32, &mut tile);
                debug_assert!(ok, "f32 distances of finite activations are finite");
            }
        }
    }
    redone
}

/// The four smallest values seen, ascending.
#[derive(Clone, Copy)]
struct Smallest([f32; NHOOD_K + 1]);

impl Smallest {
    const EMPTY: Smallest = Smallest([f32::INFINITY; NHOOD_K + 1]);

    #[inline]
    fn push(&mut self, v: f32) {
        let s = &mut self.0;
        if v < s[NHOOD_K] {
            let mut i = NHOOD_K;
            while i > 0 && s[i - 1] > v {
                s[i] = s[i - 1];
                i -= 1;
            }
            s[i] = v;
        }
    }
}

/// Manifold radii of a set: for each row the (k+1)-th smallest squared distance to the rows
/// of the set itself (itself included: the evaluator's `np.partition(..., [0..k])[:, k]`),
/// with the number of evaluator blocks that fell back to f32.
pub fn manifold_radii(f: &Features) -> Result<(Vec<f32>, usize)> {
    let (n, dim) = (f.rows(), f.dim());
    if n <= NHOOD_K {
        bail!(
            "{}: {n} images; precision and recall need more than k = {NHOOD_K}",
            f.name()
        );
    }
    let mut best = vec![Smallest::EMPTY; n];
    let mut local = Vec::new();
    let redone = for_each_block(f.data(), f.data(), dim, |r0, _c0, ra, cb, prec, tile| {
        let rows = ra.len() / dim;
        local.clear();
        local.resize(rows, Smallest::EMPTY);
        let ok = block_distances(ra, cb, dim, prec, tile, |i0, t| {
            let nb = cb.len() / dim;
            local[i0..i0 + t.len() / nb]
                .par_iter_mut()
                .zip(t.par_chunks(nb))
                .for_each(|(s, row)| row.iter().for_each(|&v| s.push(v)));
        });
        if ok {
            for (g, l) in best[r0..r0 + rows].iter_mut().zip(&local) {
                l.0.iter().for_each(|&v| g.push(v));
            }
        }
        ok
    });
    Ok((best.iter().map(|s| s.0[NHOOD_K]).collect(), redone))
}

/// Precision and recall, and how their distances were computed.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PrecisionRecall {
    /// Fraction of sample rows inside the reference manifold.
    pub precision: f64,
    /// Fraction of reference rows inside the sample manifold.
    pub recall: f64,
    /// Evaluator blocks (of the three passes: both radii and the cross pass) whose float16
    /// distances were not finite and were computed again in f32.
    pub f32_blocks: usize,
}

/// Precision and recall of `sample` against `reference` as the evaluator's
/// `compute_prec_recall`: radii of both sets ([`manifold_radii`]), then one pass over the
/// reference x sample distances marking each sample row within some reference row's
/// radius (precision: their fraction) and each reference row within some sample row's
/// radius (recall). Each set needs more than k = 3 rows, and both the same width.
///
/// The float16 model: both batches rounded to float16; `|x|^2` as `reduce_sum(square(x))`
/// with each square rounded to float16 and the sum accumulated in f32, rounded once;
/// `u.v` from the f32 GEMM (products of float16 values are exact in f32) rounded once; then
/// `norm_u - 2 dot + norm_v` with each operation rounded to float16 and `max(., 0)`. A
/// block holding a non-finite result (a norm or distance past 65,504) is computed again in
/// f32, as the evaluator's `tf.cond`. What cannot be reproduced is the accumulation order
/// (and width) of TensorFlow's float16 reduction and matmul on the machine that ran it: a
/// distance one float16 step away flips a comparison that ties, hence the golden's 0.003
/// tolerance (case a: 0.0017 measured against TF 2.21's numbers).
pub fn precision_recall(reference: &Features, sample: &Features) -> Result<PrecisionRecall> {
    let dim = reference.dim();
    if sample.dim() != dim {
        bail!(
            "precision/recall: {} has activations of width {dim}, {} of width {}",
            reference.name(),
            sample.name(),
            sample.dim()
        );
    }
    let (r_ref, f1) = manifold_radii(reference)?;
    let (r_smp, f2) = manifold_radii(sample)?;
    let (nr, ns) = (reference.rows(), sample.rows());
    let mut ref_in = vec![false; nr];
    let mut smp_in = vec![false; ns];
    let (mut loc_ref, mut loc_smp) = (Vec::new(), Vec::new());
    let f3 = for_each_block(
        reference.data(),
        sample.data(),
        dim,
        |r0, c0, ra, cb, prec, tile| {
            let (rows, cols) = (ra.len() / dim, cb.len() / dim);
            loc_ref.clear();
            loc_ref.resize(rows, false);
            loc_smp.clear();
            loc_smp.resize(cols, false);
            let radii_s = &r_smp[c0..c0 + cols];
            let ok = block_distances(ra, cb, dim, prec, tile, |i0, t| {
                let m = t.len() / cols;
                let radii_r = &r_ref[r0 + i0..r0 + i0 + m];
                // Reference rows inside some sample row's ball (recall).
                loc_ref[i0..i0 + m]
                    .par_iter_mut()
                    .zip(t.par_chunks(cols))
                    .for_each(|(f, row)| {
                        *f |= row.iter().zip(radii_s).any(|(d, r)| d <= r);
                    });
                // Sample rows inside some reference row's ball (precision).
                let hit = t
                    .par_chunks(cols * 16)
                    .zip(radii_r.par_chunks(16))
                    .fold(
                        || vec![false; cols],
                        |mut acc, (rows16, rr)| {
                            for (row, &r) in rows16.chunks(cols).zip(rr) {
                                for (a, &d) in acc.iter_mut().zip(row) {
                                    *a |= d <= r;
                                }
                            }
                            acc
                        },
                    )
                    .reduce(
                        || vec![false; cols],
                        |mut x, y| {
                            x.iter_mut().zip(&y).for_each(|(a, b)| *a |= b);
                            x
                        },
                    );
                loc_smp.iter_mut().zip(&hit).for_each(|(a, b)| *a |= b);
            });
            if ok {
                ref_in[r0..r0 + rows]
                    .iter_mut()
                    .zip(&loc_ref)
                    .for_each(|(g, l)| *g |= l);
                smp_in[c0..c0 + cols]
                    .iter_mut()
                    .zip(&loc_smp)
                    .for_each(|(g, l)| *g |= l);
            }
            ok
        },
    );
    let frac = |v: &[bool]| v.iter().filter(|&&b| b).count() as f64 / v.len() as f64;
    Ok(PrecisionRecall {
        precision: frac(&smp_in),
        recall: frac(&ref_in),
        f32_blocks: f1 + f2 + f3,
    })
}
