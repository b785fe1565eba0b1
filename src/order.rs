//! Progressive checkerboard order, scale pyramid and step schedule (SPEC.md sections 1-3).
//! Pure functions over integers: no tensors, no I/O.

use crate::limits::{MAX_GRID_SIZE, MAX_SCALES};
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
    if latent > MAX_GRID_SIZE {
        bail!("latent size {latent} is too large (at most {MAX_GRID_SIZE})");
    }
    let mut sizes = vec![latent as f64];
    while *sizes.last().unwrap() > min_size as f64 {
        // Many divisions round to the same size; past 100x the scale limit the ratio is
        // refused before the loop runs away (1 + 1 ulp would take ~10^16 divisions).
        if sizes.len() > 100 * MAX_SCALES {
            return Err(too_many_scales(ratio, latent, min_size));
        }
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
    if out.len() > MAX_SCALES {
        return Err(too_many_scales(ratio, latent, min_size));
    }
    Ok(out)
}

fn too_many_scales(ratio: f64, latent: usize, min_size: usize) -> anyhow::Error {
    anyhow::anyhow!(
        "scale_ratio {ratio} is too close to 1: the pyramid from {latent} down to {min_size} \
         would have more than {MAX_SCALES} scales"
    )
}

/// Progressive checkerboard rank map of an n x n grid, `rank[y][x]` (SPEC.md section 2).
///
/// Powers of two: recursive quadrant split in the order top-left, bottom-right, top-right,
/// bottom-left, with the four child sequences interleaved round-robin. Other sizes: the map of
/// the next power of two, cropped to n x n and re-ranked 0..n^2-1 in the same relative order.
pub fn rank_map(n: usize) -> Result<Vec<Vec<usize>>> {
    let seq = sequence(n)?;
    let mut rank = vec![vec![0usize; n]; n];
    for (r, &i) in seq.iter().enumerate() {
        rank[i / n][i % n] = r;
    }
    Ok(rank)
}

/// Cell (x, y) of rank `r` in the 2^levels square. The round-robin interleave makes the
/// top-level quadrant the lowest base-4 digit of the rank, the next level the next digit, ...
fn cell_of_rank(mut r: usize, levels: u32) -> (usize, usize) {
    let (mut x, mut y) = (0, 0);
    for level in (0..levels).rev() {
        // Quadrant order: top-left, bottom-right, top-right, bottom-left.
        let (qx, qy) = [(0, 0), (1, 1), (1, 0), (0, 1)][r & 3];
        x |= qx << level;
        y |= qy << level;
        r >>= 2;
    }
    (x, y)
}

/// The sampling order of an n x n scale: raster indices (y*n + x) sorted by rank. Built
/// directly from the ranks of the next power of two (no per-level copies), at most
/// [`MAX_GRID_SIZE`] on a side.
pub fn sequence(n: usize) -> Result<Vec<usize>> {
    if n == 0 {
        bail!("grid size must be at least 1");
    }
    if n > MAX_GRID_SIZE {
        bail!("grid size {n} is too large (at most {MAX_GRID_SIZE})");
    }
    let p = n.next_power_of_two();
    let levels = p.trailing_zeros();
    let mut seq = Vec::with_capacity(n * n);
    for r in 0..p * p {
        let (x, y) = cell_of_rank(r, levels);
        if x < n && y < n {
            seq.push(y * n + x);
        }
    }
    Ok(seq)
}

/// One scale of a schedule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ScaleInfo {
    /// Side s of the square token grid.
    pub size: usize,
    /// Global id of the scale's first cell: sum of s_j^2 over earlier scales.
    pub offset: usize,
    /// s^2.
    pub tokens: usize,
    /// Block size max(1, tokens / steps_per_scale) (the last step may be a smaller remainder).
    pub block: usize,
    /// Serial steps this scale takes (remainder block included).
    pub steps: usize,
    /// Global step counter of the scale's first step.
    pub first_step: usize,
    /// Raster indices of the scale in sampling order.
    pub sequence: Vec<usize>,
}

/// One serial step: which cells it samples and which cells of the previous block feed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    /// Global step counter t (what `cfg_start_step` compares against).
    pub t: usize,
    /// Index into the schedule's scales.
    pub scale: usize,
    /// Local raster positions sampled at this step, in the order they are fed.
    pub positions: Vec<usize>,
    /// For each slot j, the local position of slot j of the previous block in this scale;
    /// `None` on the first step of a scale (the "empty" token).
    pub prev: Option<Vec<usize>>,
}

/// The full serial step schedule of a scale pyramid (SPEC.md section 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Schedule {
    pub scales: Vec<ScaleInfo>,
    pub steps: Vec<Step>,
}

/// Tokens per block of a scale of `tokens` cells asked for `k` serial steps (the reference's
/// `num_blocks_per_scale`): blocks of tokens / k, the last one shorter, so the scale takes
/// [`realized_steps`] steps, which is not always k.
pub fn block_size(tokens: usize, k: usize) -> usize {
    (tokens / k.max(1)).max(1)
}

/// Serial steps a scale of `tokens` cells takes when asked for `k`.
pub fn realized_steps(tokens: usize, k: usize) -> usize {
    tokens.div_ceil(block_size(tokens, k))
}

impl Schedule {
    /// Schedule with the same steps per scale k on every scale.
    pub fn uniform(scale_sizes: &[usize], steps_per_scale: usize) -> Result<Schedule> {
        Self::with_steps(scale_sizes, &vec![steps_per_scale; scale_sizes.len()])
    }

    /// Schedule with an explicit steps-per-scale value for each scale.
    pub fn with_steps(scale_sizes: &[usize], steps_per_scale: &[usize]) -> Result<Schedule> {
        if scale_sizes.is_empty() {
            bail!("a schedule needs at least one scale");
        }
        if steps_per_scale.len() != scale_sizes.len() {
            bail!(
                "{} step counts given for {} scales",
                steps_per_scale.len(),
                scale_sizes.len()
            );
        }
        let mut scales = Vec::new();
        let mut steps = Vec::new();
        let mut offset = 0;
        for (si, (&size, &k)) in scale_sizes.iter().zip(steps_per_scale).enumerate() {
            if k == 0 {
                bail!("steps per scale must be at least 1 (scale {si} of size {size} has 0)");
            }
            let tokens = size * size;
            let block = block_size(tokens, k);
            let sequence = sequence(size)?;
            let first_step = steps.len();
            let mut prev: Option<&[usize]> = None;
            for chunk in sequence.chunks(block) {
                steps.push(Step {
                    t: steps.len(),
                    scale: si,
                    positions: chunk.to_vec(),
                    prev: prev.map(|p| p[..chunk.len()].to_vec()),
                });
                prev = Some(chunk);
            }
            scales.push(ScaleInfo {
                size,
                offset,
                tokens,
                block,
                steps: steps.len() - first_step,
                first_step,
                sequence,
            });
            offset += tokens;
        }
        Ok(Schedule { scales, steps })
    }

    pub fn total_steps(&self) -> usize {
        self.steps.len()
    }

    /// Total token count N over all scales.
    pub fn total_tokens(&self) -> usize {
        self.scales.iter().map(|s| s.tokens).sum()
    }

    pub fn scale_sizes(&self) -> Vec<usize> {
        self.scales.iter().map(|s| s.size).collect()
    }

    /// The global step t at which each cell of scale `si` is drawn, (s, s) raster order.
    pub fn step_map(&self, si: usize) -> Vec<u32> {
        let s = self.scales[si].size;
        let mut map = vec![0u32; s * s];
        for st in self.steps.iter().filter(|st| st.scale == si) {
            for &p in &st.positions {
                map[p] = st.t as u32;
            }
        }
        map
    }

    /// Global position ids of a step's cells.
    pub fn global_positions(&self, step: &Step) -> Vec<usize> {
        let off = self.scales[step.scale].offset;
        step.positions.iter().map(|p| off + p).collect()
    }

    /// Global position ids of a step's paired previous-block cells, or `None` for "empty".
    pub fn global_prev(&self, step: &Step) -> Option<Vec<usize>> {
        let off = self.scales[step.scale].offset;
        step.prev
            .as_ref()
            .map(|q| q.iter().map(|p| off + p).collect())
    }

    /// Largest number of tokens any single step feeds.
    pub fn max_block(&self) -> usize {
        self.steps
            .iter()
            .map(|s| s.positions.len())
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn realized_steps_are_what_schedules_take() {
        let sizes = [1, 2, 4, 8, 16];
        for k in 1..=20 {
            let sched = Schedule::uniform(&sizes, k).unwrap();
            for (sc, &s) in sched.scales.iter().zip(&sizes) {
                assert_eq!(sc.steps, realized_steps(s * s, k), "s {s} k {k}");
            }
        }
        assert_eq!(realized_steps(256, 3), 4); // blocks of 85: 3 full, one of 1
    }

    #[test]
    fn eight_by_eight_starts_as_spec_says() {
        let seq = sequence(8).unwrap();
        let rc: Vec<(usize, usize)> = seq[..8].iter().map(|&i| (i / 8, i % 8)).collect();
        assert_eq!(
            rc,
            vec![
                (0, 0),
                (4, 4),
                (0, 4),
                (4, 0),
                (2, 2),
                (6, 6),
                (2, 6),
                (6, 2)
            ]
        );
    }

    #[test]
    fn remainder_block_uses_prefix_of_previous_block() {
        // 5x5 with 4 steps: blocks 6,6,6,6,1.
        let s = Schedule::uniform(&[5], 4).unwrap();
        let sizes: Vec<usize> = s.steps.iter().map(|st| st.positions.len()).collect();
        assert_eq!(sizes, vec![6, 6, 6, 6, 1]);
        assert_eq!(
            s.steps[4].prev.as_ref().unwrap()[..],
            s.steps[3].positions[..1]
        );
        assert!(s.steps[0].prev.is_none());
    }

    #[test]
    fn bad_inputs_are_errors() {
        assert!(rank_map(0).is_err());
        assert!(scale_sizes(16, 1.0, 1).is_err());
        assert!(scale_sizes(16, f64::NAN, 1).is_err());
        assert!(scale_sizes(16, 2.0, 0).is_err());
        let e = scale_sizes(16, 40.0, 1).unwrap_err().to_string();
        assert!(e.contains("rounds to 0"), "{e}");
        assert!(Schedule::uniform(&[1, 2], 0).is_err());
    }
}
