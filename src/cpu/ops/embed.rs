//! CPU reference of kernels/embed.cu: the step-input path with combine_inputs folded into
//! tables at load time (model::weights::InputTables).

use crate::math::normalize_rows;
use crate::model::weights::{CodeHidden, InputTables};

/// Bilinear resize (align_corners = false, no antialias) of (B, e, si, si) to (B, e, so, so),
/// computed in f32 as PyTorch's CPU kernel does.
pub fn upsample_bilinear(src: &[f32], batch: usize, e: usize, si: usize, so: usize) -> Vec<f32> {
    if si == so {
        return src.to_vec();
    }
    let scale = si as f32 / so as f32;
    // Source index and weight per output coordinate (the same for rows and columns).
    let taps: Vec<(usize, usize, f32)> = (0..so)
        .map(|o| {
            let s = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (s as usize).min(si - 1);
            let i1 = (i0 + 1).min(si - 1);
            (i0, i1, s - i0 as f32)
        })
        .collect();
    let mut out = vec![0.0f32; batch * e * so * so];
    for plane in 0..batch * e {
        let s = &src[plane * si * si..(plane + 1) * si * si];
        let o = &mut out[plane * so * so..(plane + 1) * so * so];
        for (y, &(y0, y1, ly)) in taps.iter().enumerate() {
            for (x, &(x0, x1, lx)) in taps.iter().enumerate() {
                let top = (1.0 - lx) * s[y0 * si + x0] + lx * s[y0 * si + x1];
                let bot = (1.0 - lx) * s[y1 * si + x0] + lx * s[y1 * si + x1];
                o[y * so + x] = (1.0 - ly) * top + ly * bot;
            }
        }
    }
    out
}

/// z0 of the next scale, `(B, so*so, e)`: the code vectors of `grid_prev (B, si*si)` resized
/// bilinearly to so x so and L2-normalized per cell (eps 1e-12).
pub fn upsample_codes(
    codebook: &[f32],
    e: usize,
    grid_prev: &[u32],
    batch: usize,
    si: usize,
    so: usize,
) -> Vec<f32> {
    assert_eq!(grid_prev.len(), batch * si * si);
    // (B, si*si) tokens -> (B, e, si, si)
    let mut nchw = vec![0.0f32; batch * e * si * si];
    for b in 0..batch {
        for p in 0..si * si {
            let t = grid_prev[b * si * si + p] as usize;
            for c in 0..e {
                nchw[(b * e + c) * si * si + p] = codebook[t * e + c];
            }
        }
    }
    let up = upsample_bilinear(&nchw, batch, e, si, so);
    let mut z = vec![0.0f32; batch * so * so * e];
    for b in 0..batch {
        for p in 0..so * so {
            for c in 0..e {
                z[(b * so * so + p) * e + c] = up[(b * e + c) * so * so + p];
            }
        }
    }
    normalize_rows(&mut z, e);
    z
}

/// `h2 (rows, 64) = silu(W2 silu(W0 z + b0) + b2)` for `z (rows, e)`: the code MLP's hidden
/// layers (its output layer is folded into `src_fold` and the `dc` table).
pub fn codevec_hidden(mlp: &CodeHidden, z: &[f32], rows: usize) -> Vec<f32> {
    mlp.forward(z, rows)
}

/// The inputs `x (rows * n, C)` of one step. Row r uses image `b = r % batch` (the
/// unconditional rows repeat the conditional inputs); token j of a row is
/// `pa[cur_global[j]] + src[b, local[j]] + bias + (empty | pc[prev_global[j]] +
/// dc[grid[b, prev_local[j]]])`, summed in that order. `src (batch, cells, C)`,
/// `grid (batch, cells)` holds the tokens sampled so far in this scale; `prev` is `None` on a
/// scale's first step.
#[allow(clippy::too_many_arguments)]
pub fn gather_inputs(
    tables: &InputTables,
    src: &[f32],
    grid: &[u32],
    cur_global: &[usize],
    local: &[usize],
    prev: Option<(&[usize], &[usize])>,
    rows: usize,
    batch: usize,
    cells: usize,
) -> Vec<f32> {
    let c = tables.bias.len();
    let n = cur_global.len();
    assert_eq!(local.len(), n);
    assert_eq!(src.len(), batch * cells * c);
    let mut x = vec![0.0f32; rows * n * c];
    for (t, xr) in x.chunks_exact_mut(c).enumerate() {
        let (r, j) = (t / n, t % n);
        let b = r % batch;
        let pa = &tables.pa[cur_global[j] * c..][..c];
        let s = &src[(b * cells + local[j]) * c..][..c];
        match prev {
            None => {
                for i in 0..c {
                    xr[i] = pa[i] + s[i] + tables.bias[i] + tables.empty[i];
                }
            }
            Some((pg, pl)) => {
                let pc = &tables.pc[pg[j] * c..][..c];
                let tok = grid[b * cells + pl[j]] as usize;
                let dc = &tables.dc[tok * c..][..c];
                for i in 0..c {
                    xr[i] = pa[i] + s[i] + tables.bias[i] + pc[i] + dc[i];
                }
            }
        }
    }
    x
}
