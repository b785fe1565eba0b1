//! The activation file: what `eval --activations` writes and what every evaluation input may
//! be instead of images, so that a reference's Inception pass runs once.
//!
//! An `.npz` (`np.savez` layout, stored entries) with
//! - `pool_3` [N, 2048] float32: the pool_3 features (FID, Inception Score, precision,
//!   recall),
//! - `spatial` [N, 2023] float32: the first 7 channels of `mixed_6/conv`, 17 x 17 x 7 (sFID),
//! - `mu` `[2048]`, `sigma` `[2048, 2048]`, `mu_s` `[2023]`, `sigma_s` `[2023, 2023]` float64: the
//!   FID statistics of both.
//!
//! On read the statistics are optional (computed from the activations when absent) and,
//! when present, taken from the file as the ADM evaluator takes a reference batch's: all
//! four or none. The same four statistics are read from an ADM reference batch
//! (`arr_0` uint8 [N, H, W, 3] images plus `mu`, `sigma`, `mu_s`, `sigma_s`, as
//! `VIRTUAL_imagenet256_labeled.npz`) by [`read_statistics`]. float64 arrays are also taken
//! where float32 is written (rounded), and float32 where float64 is (widened). Every
//! refusal is one line naming the file.

use super::metrics::{Features, Statistics, StatsAccumulator, check_finite};
use crate::io::npz::{NpyDtype, NpzReader, NpzWriter, npy_header};
use anyhow::{Result, bail};
use std::path::Path;

/// Width of `pool_3`.
pub const POOL_DIM: usize = 2048;
/// Width of `spatial` (17 x 17 x 7).
pub const SPATIAL_DIM: usize = 2023;

/// The activations of N images: `pool` [N, 2048] and `spatial` [N, 2023], row-major.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Activations {
    /// pool_3, N x [`POOL_DIM`].
    pub pool: Vec<f32>,
    /// spatial, N x [`SPATIAL_DIM`].
    pub spatial: Vec<f32>,
}

impl Activations {
    /// Number of images.
    pub fn rows(&self) -> usize {
        self.pool.len() / POOL_DIM
    }

    /// The pool_3 rows as checked [`Features`] named `name`.
    pub fn pool_features<'a>(&'a self, name: &'a str) -> Result<Features<'a>> {
        Features::new(name, &self.pool, POOL_DIM)
    }

    /// The spatial rows as checked [`Features`] named `name`.
    pub fn spatial_features<'a>(&'a self, name: &'a str) -> Result<Features<'a>> {
        Features::new(name, &self.spatial, SPATIAL_DIM)
    }

    /// Both statistics computed from the activations (at least 2 images).
    pub fn statistics(&self, name: &str) -> Result<FidStats> {
        let mut p = StatsAccumulator::new(name, POOL_DIM);
        p.add(&self.pool)?;
        let mut s = StatsAccumulator::new(name, SPATIAL_DIM);
        s.add(&self.spatial)?;
        Ok(FidStats {
            pool: p.finish()?,
            spatial: s.finish()?,
        })
    }
}

/// The FID statistics of a set: of `pool_3` (FID) and of `spatial` (sFID).
#[derive(Clone, Debug, PartialEq)]
pub struct FidStats {
    /// `mu`, `sigma`.
    pub pool: Statistics,
    /// `mu_s`, `sigma_s`.
    pub spatial: Statistics,
}

/// An activation file as read: the activations, and the statistics when the file has them.
#[derive(Clone, Debug)]
pub struct ActivationFile {
    /// `pool_3` and `spatial`.
    pub acts: Activations,
    /// `mu`, `sigma`, `mu_s`, `sigma_s`, when present.
    pub stats: Option<FidStats>,
}

impl ActivationFile {
    /// The statistics the evaluator uses: the file's when present, else computed.
    pub fn fid_stats(&self, name: &str) -> Result<FidStats> {
        match &self.stats {
            Some(s) => Ok(s.clone()),
            None => self.acts.statistics(name),
        }
    }
}

/// Whether `r` holds an activation file's arrays (`pool_3` and `spatial`). One of the two
/// without the other is an error.
pub fn is_activation_file(r: &NpzReader) -> Result<bool> {
    match (r.contains("pool_3"), r.contains("spatial")) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (p, _) => bail!(
            "{}: has {} but not {}: an activation file needs both",
            r.path().display(),
            if p { "pool_3" } else { "spatial" },
            if p { "spatial" } else { "pool_3" }
        ),
    }
}

/// Read an activation file: `pool_3` [N, 2048] and `spatial` [N, 2023] (float32 or float64,
/// C order, the same N, finite) and the statistics if present ([`read_statistics`]).
pub fn read_activations(path: &Path) -> Result<ActivationFile> {
    let r = NpzReader::open(path)?;
    let shown = path.display();
    if !is_activation_file(&r)? {
        bail!("{shown}: not an activation file (no pool_3 and spatial arrays)");
    }
    let mut rows = None;
    let mut read = |name: &str, width: usize| -> Result<Vec<f32>> {
        let a = r.array(name)?;
        let n = match a.shape() {
            [n, w] if *w == width => *n,
            s => bail!("{shown}: {name} has shape {s:?}; expected [N, {width}]"),
        };
        if a.header.fortran_order {
            bail!("{shown}: {name} is in Fortran order; C order expected");
        }
        if !matches!(a.dtype, Some(NpyDtype::F32 | NpyDtype::F64)) {
            bail!(
                "{shown}: {name} has dtype {:?}; float32 expected",
                a.header.descr
            );
        }
        if let Some(m) = rows
            && m != n
        {
            bail!("{shown}: pool_3 has {m} rows but spatial {n}");
        }
        rows = Some(n);
        let v = r.read_f32(&a, 0, a.elements)?;
        check_finite(&format!("{shown}: {name}"), &v, width)?;
        Ok(v)
    };
    let pool = read("pool_3", POOL_DIM)?;
    let spatial = read("spatial", SPATIAL_DIM)?;
    let stats = statistics_from(&r)?;
    Ok(ActivationFile {
        acts: Activations { pool, spatial },
        stats,
    })
}

/// The statistics stored in `path` (an activation file or an ADM reference batch), or None
/// when it has none of `mu`, `sigma`, `mu_s`, `sigma_s`. Some but not all is an error, as
/// are shapes other than `[2048]`, `[2048, 2048]`, `[2023]`, `[2023, 2023]`, and non-finite
/// values.
pub fn read_statistics(path: &Path) -> Result<Option<FidStats>> {
    statistics_from(&NpzReader::open(path)?)
}

fn statistics_from(r: &NpzReader) -> Result<Option<FidStats>> {
    let shown = r.path().display();
    const NAMES: [&str; 4] = ["mu", "sigma", "mu_s", "sigma_s"];
    let have: Vec<bool> = NAMES.iter().map(|n| r.contains(n)).collect();
    if have.iter().all(|h| !h) {
        return Ok(None);
    }
    if let Some(i) = have.iter().position(|h| !h) {
        bail!(
            "{shown}: has FID statistics but no {} (mu, sigma, mu_s, sigma_s go together)",
            NAMES[i]
        );
    }
    let read = |name: &str, shape: &[usize]| -> Result<Vec<f64>> {
        let a = r.array(name)?;
        if a.shape() != shape {
            bail!(
                "{shown}: {name} has shape {:?}; expected {shape:?}",
                a.shape()
            );
        }
        if a.header.fortran_order && shape.len() > 1 {
            bail!("{shown}: {name} is in Fortran order; C order expected");
        }
        r.read_f64(&a)
    };
    let stats = |mu: &str, sigma: &str, d: usize| -> Result<Statistics> {
        Statistics::new(
            &format!("{shown}: {mu}/{sigma}"),
            read(mu, &[d])?,
            read(sigma, &[d, d])?,
        )
    };
    Ok(Some(FidStats {
        pool: stats("mu", "sigma", POOL_DIM)?,
        spatial: stats("mu_s", "sigma_s", SPATIAL_DIM)?,
    }))
}

/// Write an activation file: `pool_3`, `spatial` (float32) and `mu`, `sigma`, `mu_s`,
/// `sigma_s` (float64), through [`NpzWriter`] (a temporary name, renamed when complete).
/// `path` must not be one of `inputs` (nor an input the CLI remembered). Widths and shapes
/// are checked first: nothing is written for activations that are not [N, 2048] and
/// [N, 2023] with statistics of the matching dimensions.
pub fn write_activations(
    path: &Path,
    acts: &Activations,
    stats: &FidStats,
    inputs: &[&Path],
) -> Result<()> {
    let shown = path.display();
    let n = acts.rows();
    if acts.pool.len() != n * POOL_DIM || acts.spatial.len() != n * SPATIAL_DIM {
        bail!(
            "{shown}: activations of {} and {} values are not [N, {POOL_DIM}] and [N, {SPATIAL_DIM}] of one N",
            acts.pool.len(),
            acts.spatial.len()
        );
    }
    for (s, d, what) in [
        (&stats.pool, POOL_DIM, "pool_3"),
        (&stats.spatial, SPATIAL_DIM, "spatial"),
    ] {
        if s.mu.len() != d || s.sigma.len() != d * d {
            bail!("{shown}: the {what} statistics are not of dimension {d}");
        }
    }
    crate::paths::check_output(path, inputs)?;
    let mut w = NpzWriter::create(path)?;
    let mut f32_entry = |name: &str, v: &[f32], width: usize| -> Result<()> {
        let h = npy_header("<f4", &[v.len() / width, width]);
        w.begin_entry(name, (h.len() + v.len() * 4) as u64)?;
        w.write(&h)?;
        for c in v.chunks(1 << 20) {
            w.write(bytemuck::cast_slice(c))?;
        }
        w.end_entry()
    };
    f32_entry("pool_3.npy", &acts.pool, POOL_DIM)?;
    f32_entry("spatial.npy", &acts.spatial, SPATIAL_DIM)?;
    for (name, v, shape) in [
        ("mu.npy", &stats.pool.mu, vec![POOL_DIM]),
        ("sigma.npy", &stats.pool.sigma, vec![POOL_DIM, POOL_DIM]),
        ("mu_s.npy", &stats.spatial.mu, vec![SPATIAL_DIM]),
        (
            "sigma_s.npy",
            &stats.spatial.sigma,
            vec![SPATIAL_DIM, SPATIAL_DIM],
        ),
    ] {
        let h = npy_header("<f8", &shape);
        w.begin_entry(name, (h.len() + v.len() * 8) as u64)?;
        w.write(&h)?;
        for c in v.chunks(1 << 17) {
            w.write(bytemuck::cast_slice(c))?;
        }
        w.end_entry()?;
    }
    w.finish()
}
