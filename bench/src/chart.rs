//! The latency chart: one cumulative distribution per measured path, log-scale time axis, so
//! microsecond socket round trips and millisecond process spawns fit on one picture.

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use std::path::Path;

/// Where a TrueType font may be found (the chart is skipped, with a note, when none is).
const FONT_PATHS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

fn register_font() -> Result<()> {
    for p in FONT_PATHS {
        if let Ok(bytes) = std::fs::read(p) {
            // plotters keeps the font for the process lifetime.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                return Ok(());
            }
        }
    }
    bail!(
        "no TrueType font found (looked in {}); install fonts-dejavu-core",
        FONT_PATHS.join(", ")
    )
}

/// Draw every `(label, latencies in µs)` series as a CDF into `out` (PNG).
pub(crate) fn latency_cdf(out: &Path, title: &str, series: &[(String, Vec<f64>)]) -> Result<()> {
    register_font()?;
    let series: Vec<(&String, Vec<f64>)> = series
        .iter()
        .filter(|(_, v)| !v.is_empty())
        .map(|(l, v)| {
            let mut v: Vec<f64> = v.iter().copied().filter(|x| *x > 0.0).collect();
            v.sort_by(f64::total_cmp);
            (l, v)
        })
        .collect();
    if series.is_empty() {
        bail!("no latency samples to draw");
    }
    let lo = series
        .iter()
        .map(|(_, v)| v[0])
        .fold(f64::INFINITY, f64::min)
        .max(1.0);
    let hi = series
        .iter()
        .map(|(_, v)| v[v.len() - 1])
        .fold(0.0, f64::max)
        * 1.2;
    let root = BitMapBackend::new(out, (1200, 700)).into_drawing_area();
    let e = |e: DrawingAreaErrorKind<_>| anyhow!("drawing {}: {e}", out.display());
    root.fill(&WHITE).map_err(e)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(55)
        .build_cartesian_2d((lo * 0.8..hi).log_scale(), 0.0..100.0)
        .map_err(e)?;
    chart
        .configure_mesh()
        .x_desc("latency (µs, log scale)")
        .y_desc("% of requests at or below")
        .x_label_formatter(&|x| {
            if *x >= 1000.0 {
                format!("{:.0} ms", x / 1000.0)
            } else {
                format!("{x:.0} µs")
            }
        })
        .draw()
        .map_err(e)?;
    for (i, (label, v)) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        // At most ~400 points per curve keeps the PNG small and the drawing fast.
        let step = (v.len() / 400).max(1);
        let n = v.len() as f64;
        let points: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .filter(|(j, _)| j % step == 0 || *j == v.len() - 1)
            .map(|(j, x)| (*x, (j + 1) as f64 * 100.0 / n))
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(e)?
            .label(label.as_str())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(e)?;
    root.present().map_err(e)?;
    Ok(())
}
