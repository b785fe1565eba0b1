//! PNG output: sample images, sample grids, and visual maps (the checkerboard rank map).

use anyhow::{Context, Result};
use std::path::Path;

/// Write an 8-bit RGB image (row-major, `width * height * 3` bytes) as PNG, atomically
/// (`NAME.partial`, synced, renamed: [`crate::paths::AtomicFile`]).
pub fn write_rgb_png(path: &Path, width: usize, height: usize, rgb: &[u8]) -> Result<()> {
    assert_eq!(rgb.len(), width * height * 3);
    let mut file = crate::paths::AtomicFile::create(path)?;
    {
        let mut enc = png::Encoder::new(&mut file, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut w = enc
            .write_header()
            .with_context(|| format!("cannot write {}", path.display()))?;
        w.write_image_data(rgb)
            .with_context(|| format!("cannot write {}", path.display()))?;
        w.finish()
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    file.commit()
}

/// A perceptually ordered colour ramp (dark blue -> teal -> green -> yellow), `t` in [0, 1].
pub fn ramp(t: f64) -> [u8; 3] {
    const STOPS: [[f64; 3]; 5] = [
        [68.0, 1.0, 84.0],
        [59.0, 82.0, 139.0],
        [33.0, 145.0, 140.0],
        [94.0, 201.0, 98.0],
        [253.0, 231.0, 37.0],
    ];
    let t = t.clamp(0.0, 1.0) * (STOPS.len() - 1) as f64;
    let i = (t.floor() as usize).min(STOPS.len() - 2);
    let f = t - i as f64;
    let mut out = [0u8; 3];
    for c in 0..3 {
        out[c] = (STOPS[i][c] * (1.0 - f) + STOPS[i + 1][c] * f).round() as u8;
    }
    out
}

/// Render a rank map as RGB: each cell coloured by rank / (n^2 - 1), cells upscaled so the
/// image is at least 256 px wide, and grid lines on quadtree boundaries (darker for coarser
/// levels). Returns (side in pixels, RGB bytes).
pub fn render_rank_map(rank: &[Vec<usize>]) -> (usize, Vec<u8>) {
    let n = rank.len();
    let cell = 256usize.div_ceil(n).max(4);
    let side = n * cell;
    let max_rank = (n * n).saturating_sub(1).max(1) as f64;
    let mut rgb = vec![0u8; side * side * 3];
    // Quadtree level of a boundary at cell index i (0 = the outer frame, deeper = finer).
    let p = n.next_power_of_two();
    let levels = p.trailing_zeros() as usize;
    let boundary_level = |i: usize| -> Option<usize> {
        if i == 0 || i == n {
            return Some(0);
        }
        (1..=levels).find(|&l| i.is_multiple_of(p >> l))
    };
    for py in 0..side {
        for px in 0..side {
            let (cy, cx) = (py / cell, px / cell);
            let mut c = ramp(rank[cy][cx] as f64 / max_rank);
            let on_line = |pix: usize, cellidx: usize| -> Option<usize> {
                if pix.is_multiple_of(cell) {
                    boundary_level(cellidx)
                } else if pix == side - 1 {
                    Some(0)
                } else {
                    None
                }
            };
            let lvl = [on_line(py, cy), on_line(px, cx)]
                .into_iter()
                .flatten()
                .min();
            if let Some(l) = lvl {
                // Coarse boundaries are black; finer ones fade towards the cell colour.
                let keep = (l as f64 / (levels.max(1) as f64 + 1.0)).min(0.8);
                for v in c.iter_mut() {
                    *v = (*v as f64 * keep) as u8;
                }
            }
            let o = (py * side + px) * 3;
            rgb[o..o + 3].copy_from_slice(&c);
        }
    }
    (side, rgb)
}

/// Image `i` of planar 8-bit pixels `(B, 3, side, side)` as interleaved RGB `(side, side, 3)`.
pub fn planar_to_rgb(pixels: &[u8], i: usize, side: usize) -> Vec<u8> {
    let plane = side * side;
    let img = &pixels[i * 3 * plane..(i + 1) * 3 * plane];
    (0..plane)
        .flat_map(|p| [img[p], img[plane + p], img[2 * plane + p]])
        .collect()
}

/// Padding between and around the images of [`grid_rgb`] (torchvision make_grid's default,
/// as the authors' samples_mont.png).
pub const GRID_PAD: usize = 2;

/// A near-square grid of `(side, side, 3)` RGB images as torchvision's `make_grid(nrow =
/// floor(sqrt(B)), padding = 2)` lays it out: `floor(sqrt(B))` images per row, black padding
/// of [`GRID_PAD`] pixels around every image. Returns (width, height, rgb).
pub fn grid_rgb(images: &[Vec<u8>], side: usize) -> (usize, usize, Vec<u8>) {
    let b = images.len().max(1);
    let cols = (b as f64).sqrt().floor().max(1.0) as usize;
    let rows = b.div_ceil(cols);
    let cell = side + GRID_PAD;
    let (w, h) = (cols * cell + GRID_PAD, rows * cell + GRID_PAD);
    let mut grid = vec![0u8; w * h * 3];
    for (i, rgb) in images.iter().enumerate() {
        let (x0, y0) = ((i % cols) * cell + GRID_PAD, (i / cols) * cell + GRID_PAD);
        for y in 0..side {
            let dst = ((y0 + y) * w + x0) * 3;
            grid[dst..dst + side * 3].copy_from_slice(&rgb[y * side * 3..(y + 1) * side * 3]);
        }
    }
    (w, h, grid)
}
