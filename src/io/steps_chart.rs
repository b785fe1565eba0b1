//! `checkergen steps --png`: latency (batch 1) and throughput (images/s at the sweep's batch)
//! against serial steps, one series per scale ratio, side by side (plotters, embedded font);
//! with `steps --eval`, a third panel: FID against serial steps (quality against speed).

use super::image::{ramp, write_rgb_png};
use super::maps::{draw_legend, plot_err, register_font};
use anyhow::Result;
use plotters::prelude::*;
use std::path::Path;

/// One measured configuration of a sweep.
#[derive(Clone, Debug)]
pub struct StepsPoint {
    pub ratio: f64,
    pub serial_steps: usize,
    pub latency_s: f64,
    pub images_per_s: f64,
    /// FID against the `--eval` reference, when the sweep evaluated quality.
    pub fid: Option<f64>,
}

/// Which value of a point a panel plots.
type Value = fn(&StepsPoint) -> f64;

/// Size in pixels of one panel (the chart: two or three side by side).
pub const PANEL_SIZE: (usize, usize) = (600, 480);

/// Render the panels to RGB (width, height, rgb); `batch` labels the throughput axis. A
/// point without FID is left out of the FID panel, which is drawn when any point has one.
pub fn render_steps_chart(points: &[StepsPoint], batch: usize) -> Result<(usize, usize, Vec<u8>)> {
    register_font();
    let with_fid = points.iter().any(|p| p.fid.is_some());
    let n_panels = if with_fid { 3 } else { 2 };
    let (w, h) = (PANEL_SIZE.0 * n_panels, PANEL_SIZE.1);
    let mut rgb = vec![255u8; w * h * 3];
    let mut ratios: Vec<f64> = points.iter().map(|p| p.ratio).collect();
    ratios.sort_by(f64::total_cmp);
    ratios.dedup();
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w as u32, h as u32)).into_drawing_area();
        let panels = root.split_evenly((1, n_panels));
        let x_max = points.iter().map(|p| p.serial_steps).max().unwrap_or(1) as f64 + 1.0;
        let ylabel = format!("images/s at batch {batch}");
        let mut specs: Vec<(&str, &str, Value)> = vec![
            ("latency at batch 1", "s per image", |p| p.latency_s),
            ("throughput", ylabel.as_str(), |p| p.images_per_s),
        ];
        if with_fid {
            specs.push(("quality (--eval)", "FID", |p| p.fid.unwrap_or(f64::NAN)));
        }
        for (area, (title, ydesc, y)) in panels.iter().zip(specs) {
            let y_max = points
                .iter()
                .map(y)
                .filter(|v| v.is_finite())
                .fold(0.0f64, f64::max)
                .max(1e-9)
                * 1.1;
            let mut chart = ChartBuilder::on(area)
                .caption(title, ("sans-serif", 16))
                .margin(10)
                .x_label_area_size(36)
                .y_label_area_size(60)
                .build_cartesian_2d(0.0f64..x_max, 0.0f64..y_max)
                .map_err(plot_err)?;
            chart
                .configure_mesh()
                .x_desc("serial steps")
                .x_label_formatter(&|x| format!("{}", x.round() as i64))
                .y_desc(ydesc)
                .label_style(("sans-serif", 12))
                .draw()
                .map_err(plot_err)?;
            for (k, &r) in ratios.iter().enumerate() {
                let t = if ratios.len() > 1 {
                    k as f64 / (ratios.len() - 1) as f64
                } else {
                    0.5
                };
                let [cr, cg, cb] = ramp(0.15 + 0.7 * t);
                let colour = RGBColor(cr, cg, cb);
                let mut pts: Vec<(f64, f64)> = points
                    .iter()
                    .filter(|p| p.ratio == r)
                    .map(|p| (p.serial_steps as f64, y(p)))
                    .filter(|(_, v)| v.is_finite())
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                chart
                    .draw_series(LineSeries::new(pts.clone(), colour.stroke_width(2)))
                    .map_err(plot_err)?
                    .label(format!("ratio {r}"))
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], colour.stroke_width(2))
                    });
                chart
                    .draw_series(pts.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                    .map_err(plot_err)?;
            }
            draw_legend(&mut chart)?;
        }
        root.present().map_err(plot_err)?;
    }
    Ok((w, h, rgb))
}

/// Render and write the chart as PNG.
pub fn write_steps_chart(path: &Path, points: &[StepsPoint], batch: usize) -> Result<()> {
    let (w, h, rgb) = render_steps_chart(points, batch)?;
    write_rgb_png(path, w, h, &rgb)
}
