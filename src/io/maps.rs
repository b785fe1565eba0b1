//! `sample --maps`: the per-sample picture of the authors' main_sample.py
//! (`sample_NNNN_maps.png`), drawn with plotters on an RGB buffer.
//!
//! Panels (every map is a pyramid: the scales side by side, each at its own resolution, one
//! latent cell = `stride` pixels, top-aligned, so it lines up with the decoded pyramid):
//!
//! ```text
//! +----------------------------+----------------------------+
//! | sampled (the image, or the | selection order (step t,   |
//! | decoded pyramid)           | normalized per scale)      |
//! +----------------------------+----------------------------+
//! | log10 p of the selected    | position entropy (log10),  |
//! | value, colour bar [-4, 0]  | colour bar [0, log10 V]    |
//! +----------------------------+----------------------------+
//! | entropy (log10) against sampling order t: one line per scale (mean), with the   |
//! | 25-75 percentile band                                                           |
//! +---------------------------------------------------------------------------------+
//! ```
//!
//! Size: see [`maps_size`]. Colours: the viridis-like [`ramp`] (the authors use jet).

use super::image::{ramp, write_rgb_png};
use anyhow::{Result, anyhow};
use plotters::prelude::*;
use std::path::Path;

const MARGIN: usize = 12;
const TITLE_H: usize = 24;
/// Colour bar column: the bar and its tick labels.
const BAR_W: usize = 64;
const CHART_H: usize = 320;
/// log10 p colour range, as the authors' `plt.clim([log10(1e-4), 0])`.
const LOG_P_MIN: f64 = -4.0;

/// One image's data for the maps.
pub struct MapsInput<'a> {
    /// Scale sides, ascending.
    pub scales: &'a [usize],
    /// Pixels per latent cell (the decoder's stride).
    pub stride: usize,
    /// Codebook size V (the entropy colour range is [0, log10 V]).
    pub vocab: usize,
    /// The sample panel: RGB (height, width, 3) rows, at most the panel's size (the final
    /// image, or the decoded pyramid side by side).
    pub sample: (&'a [u8], usize, usize),
    /// Per scale, (s, s) raster: global step, chosen-token probability, entropy (nats).
    pub step: Vec<&'a [u32]>,
    pub prob: Vec<&'a [f32]>,
    pub entropy: Vec<&'a [f32]>,
}

/// Size (width, height) of a pyramid panel: all scales side by side at `stride` px per cell.
pub fn panel_size(scales: &[usize], stride: usize) -> (usize, usize) {
    let w = scales.iter().sum::<usize>() * stride;
    let h = scales.iter().copied().max().unwrap_or(0) * stride;
    (w, h)
}

/// Size (width, height) of a maps PNG whose panels are (pw, ph):
/// width `2 (pw + BAR_W) + 3 MARGIN`, height `2 (TITLE_H + ph) + CHART_H + 4 MARGIN`.
pub fn maps_size(pw: usize, ph: usize) -> (usize, usize) {
    (
        2 * (pw + BAR_W) + 3 * MARGIN,
        2 * (TITLE_H + ph) + CHART_H + 4 * MARGIN,
    )
}

/// The percentile `q` in [0, 100] of sorted values, linearly interpolated (numpy's default).
fn percentile(sorted: &[f64], q: f64) -> f64 {
    let pos = (sorted.len() - 1) as f64 * q / 100.0;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

/// Per scale: (t, mean, p25, p75) of the entropy (log10) of the cells drawn at each step t.
pub fn entropy_by_step(
    scales: &[usize],
    step: &[&[u32]],
    entropy: &[&[f32]],
) -> Vec<Vec<[f64; 4]>> {
    (0..scales.len())
        .map(|k| {
            let mut ts: Vec<u32> = step[k].to_vec();
            ts.sort_unstable();
            ts.dedup();
            ts.iter()
                .map(|&t| {
                    let mut v: Vec<f64> = step[k]
                        .iter()
                        .zip(entropy[k])
                        .filter(|(s, _)| **s == t)
                        .map(|(_, &e)| e as f64 / std::f64::consts::LN_10)
                        .collect();
                    v.sort_by(f64::total_cmp);
                    let mean = v.iter().sum::<f64>() / v.len() as f64;
                    [t as f64, mean, percentile(&v, 25.0), percentile(&v, 75.0)]
                })
                .collect()
        })
        .collect()
}

/// Register the embedded DejaVu Sans as plotters' "sans-serif" (once per process).
pub(crate) fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The embedded DejaVu Sans always parses; a failure would only lose the text.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

/// An RGB canvas the panels are blitted into before plotters draws text and the chart.
struct Canvas {
    w: usize,
    h: usize,
    rgb: Vec<u8>,
}

impl Canvas {
    fn put(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.w && y < self.h {
            let i = (y * self.w + x) * 3;
            self.rgb[i..i + 3].copy_from_slice(&c);
        }
    }

    /// A pyramid map at (x0, y0): per scale, each cell a stride x stride block of `colour(v)`.
    fn pyramid<T: Copy>(
        &mut self,
        x0: usize,
        y0: usize,
        scales: &[usize],
        stride: usize,
        maps: &[&[T]],
        colour: impl Fn(usize, T) -> [u8; 3],
    ) {
        let mut xs = x0;
        for (k, (&s, map)) in scales.iter().zip(maps).enumerate() {
            for cy in 0..s {
                for cx in 0..s {
                    let c = colour(k, map[cy * s + cx]);
                    for dy in 0..stride {
                        for dx in 0..stride {
                            self.put(xs + cx * stride + dx, y0 + cy * stride + dy, c);
                        }
                    }
                }
            }
            xs += s * stride;
        }
    }

    /// A vertical colour bar of height h at (x0, y0), top = 1.
    fn bar(&mut self, x0: usize, y0: usize, h: usize) {
        for y in 0..h {
            let c = ramp(1.0 - y as f64 / (h - 1).max(1) as f64);
            for x in 0..12 {
                self.put(x0 + x, y0 + y, c);
            }
        }
    }
}

pub(crate) fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

/// The series legend of a chart, as the maps and the steps chart draw it.
pub(crate) fn draw_legend<'a, DB: DrawingBackend + 'a>(
    chart: &mut ChartContext<
        'a,
        DB,
        Cartesian2d<plotters::coord::types::RangedCoordf64, plotters::coord::types::RangedCoordf64>,
    >,
) -> Result<()> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 12))
        .draw()
        .map_err(plot_err)
}

/// Render one image's maps to RGB (width, height, rgb).
pub fn render_maps(m: &MapsInput) -> Result<(usize, usize, Vec<u8>)> {
    register_font();
    let (pw, ph) = panel_size(m.scales, m.stride);
    let (w, h) = maps_size(pw, ph);
    let mut cv = Canvas {
        w,
        h,
        rgb: vec![255u8; w * h * 3],
    };
    let col = [MARGIN, 2 * MARGIN + pw + BAR_W];
    let row = [MARGIN + TITLE_H, 2 * MARGIN + 2 * TITLE_H + ph];
    // Sample panel.
    let (srgb, sh, sw) = m.sample;
    for y in 0..sh.min(ph) {
        for x in 0..sw.min(pw) {
            let i = (y * sw + x) * 3;
            cv.put(col[0] + x, row[0] + y, [srgb[i], srgb[i + 1], srgb[i + 2]]);
        }
    }
    // Selection order: each scale's steps normalized to [0, 1] (as the authors' vis_pyramid
    // with normalize_range_per_scale).
    let ranges: Vec<(u32, u32)> = m
        .step
        .iter()
        .map(|s| {
            let lo = s.iter().copied().min().unwrap_or(0);
            let hi = s.iter().copied().max().unwrap_or(0);
            (lo, hi)
        })
        .collect();
    cv.pyramid(col[1], row[0], m.scales, m.stride, &m.step, |k, t| {
        let (lo, hi) = ranges[k];
        ramp((t - lo) as f64 / ((hi - lo) as f64 + 1e-5))
    });
    let log_v = (m.vocab as f64).log10();
    cv.pyramid(col[0], row[1], m.scales, m.stride, &m.prob, |_, p| {
        ramp((((p as f64).log10() - LOG_P_MIN) / -LOG_P_MIN).clamp(0.0, 1.0))
    });
    cv.bar(col[0] + pw + 8, row[1], ph);
    cv.pyramid(col[1], row[1], m.scales, m.stride, &m.entropy, |_, e| {
        ramp((e as f64 / std::f64::consts::LN_10 / log_v).clamp(0.0, 1.0))
    });
    cv.bar(col[1] + pw + 8, row[1], ph);

    {
        let root =
            BitMapBackend::with_buffer(&mut cv.rgb, (w as u32, h as u32)).into_drawing_area();
        let title = ("sans-serif", 16).into_font().color(&BLACK);
        let small = ("sans-serif", 12).into_font().color(&BLACK);
        let at = |x: usize, y: usize| (x as i32, y as i32);
        let titles = [
            (col[0], row[0], "sampled"),
            (col[1], row[0], "selection order (step, per scale)"),
            (col[0], row[1], "log10 prob of selected values"),
            (col[1], row[1], "position entropy (log10)"),
        ];
        for (x, y, t) in titles {
            root.draw_text(t, &title, at(x, y - TITLE_H + 4))
                .map_err(plot_err)?;
        }
        for (x, top, bottom) in [
            (col[0] + pw + 24, "0".to_string(), format!("{LOG_P_MIN}")),
            (col[1] + pw + 24, format!("{log_v:.2}"), "0".to_string()),
        ] {
            root.draw_text(&top, &small, at(x, row[1]))
                .map_err(plot_err)?;
            root.draw_text(&bottom, &small, at(x, row[1] + ph - 12))
                .map_err(plot_err)?;
        }
        let chart_top = row[1] + ph + MARGIN;
        let area = root.clone().shrink(
            (MARGIN as u32, chart_top as u32),
            ((w - 2 * MARGIN) as u32, CHART_H as u32),
        );
        let series = entropy_by_step(m.scales, &m.step, &m.entropy);
        let t_max = series
            .iter()
            .flatten()
            .map(|p| p[0])
            .fold(0.0f64, f64::max)
            .max(1.0);
        let mut chart = ChartBuilder::on(&area)
            .caption("sample order vs entropy", ("sans-serif", 16))
            .margin(6)
            .x_label_area_size(30)
            .y_label_area_size(44)
            .build_cartesian_2d(-0.5f64..t_max + 0.5, 0.0f64..log_v.max(1e-3))
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("sampling order (step t)")
            .x_label_formatter(&|x| format!("{}", x.round() as i64))
            .y_desc("entropy (log10)")
            .label_style(("sans-serif", 12))
            .draw()
            .map_err(plot_err)?;
        let n = m.scales.len();
        for (k, pts) in series.iter().enumerate() {
            let [r, g, b] = ramp(if n > 1 {
                k as f64 / (n - 1) as f64
            } else {
                0.5
            });
            let colour = RGBColor(r, g, b);
            let mut band: Vec<(f64, f64)> = pts.iter().map(|p| (p[0], p[3])).collect();
            band.extend(pts.iter().rev().map(|p| (p[0], p[2])));
            chart
                .draw_series(std::iter::once(Polygon::new(
                    band,
                    colour.mix(0.2).filled(),
                )))
                .map_err(plot_err)?;
            chart
                .draw_series(LineSeries::new(
                    pts.iter().map(|p| (p[0], p[1])),
                    colour.stroke_width(2),
                ))
                .map_err(plot_err)?
                .label(format!("scale {}", m.scales[k]))
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                });
            chart
                .draw_series(
                    pts.iter()
                        .map(|p| Circle::new((p[0], p[1]), 3, colour.filled())),
                )
                .map_err(plot_err)?;
        }
        draw_legend(&mut chart)?;
        root.present().map_err(plot_err)?;
    }
    Ok((w, h, cv.rgb))
}

/// Render and write one image's maps as PNG.
pub fn write_maps(path: &Path, m: &MapsInput) -> Result<()> {
    let (w, h, rgb) = render_maps(m)?;
    write_rgb_png(path, w, h, &rgb)
}
