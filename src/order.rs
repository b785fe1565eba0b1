//! Progressive checkerboard order, scale pyramid and step schedule (SPEC.md sections 1-3).
//! Pure functions over integers: no tensors, no I/O.

use anyhow::{Result, bail};

/// Scale sizes of the pyramid, ascending (SPEC.md section 1).
///
/// Start with `[latent]`, divide by `ratio` (real division) while the last element exceeds
/// `min_size`, append `min_size`, round half to even, deduplicate, sort. A size that rounds
/// to 0 is rejected (the reference would silently build a 0x0 scale).
pub fn scale_sizes(latent: usize, ratio: f64, min_size: usize) -> Result<Vec<usize>> {
    if latent == 0 {
        bail!("latent size must be at least 1");
    }
    if !ratio.is_finite() || ratio <= 1.0 {
        bail!("scale_ratio must be a finite number greater than 1, got {ratio}");
    }
    if min_size == 0 {
        bail!("scale_min_size must be at least 1 (a scale of size 0 has no tokens)");
    }
    if min_size > latent {
        bail!("scale_min_size {min_size} exceeds the latent size {latent}");
    }
    let mut sizes = vec![latent as f64];
    while *sizes.last().unwrap() > min_size as f64 {
        let next = sizes.last().unwrap() / ratio;
        sizes.push(next);
    }
    if *sizes.last().unwrap() == 0.0 {
        sizes.pop();
    }
    sizes.push(min_size as f64);
    let mut out = Vec::with_capacity(sizes.len());
    for v in sizes {
        let r = v.round_ties_even();
        if r < 1.0 {
            bail!(
                "scale_ratio {ratio} with latent size {latent} gives a scale of size {v:.4}, \
                 which rounds to 0; use a smaller ratio or a larger scale_min_size"
            );
        }
        out.push(r as usize);
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}
