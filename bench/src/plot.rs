//! Latency-by-percentile plot (SVG), in the style of HdrHistogram's plotter: the x axis is
//! log-scaled in 1/(1 − percentile), so 90 %, 99 %, 99.9 % … are evenly spaced and the tail is
//! visible.

use std::path::Path;

use hdrhistogram::Histogram;
use plotters::prelude::*;

/// Line colours (matplotlib's tab10 blue, orange, green, red): distinct and readable on white.
const COLORS: [RGBColor; 4] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
];

/// x position of quantile `q` (0 ≤ q < 1): log10(1 / (1 − q)).
pub fn x_of(q: f64) -> f64 {
    (1.0 / (1.0 - q)).log10()
}

/// Axis label for an x position: the percentile it stands for (0 %, 90 %, 99 %, 99.9 % …).
pub fn percentile_label(x: f64) -> String {
    let p = 100.0 * (1.0 - 10f64.powf(-x));
    let digits = (x.round() as usize).saturating_sub(2);
    format!("{p:.digits$}%")
}

/// Draws one curve per histogram (µs values, shown in ms) into an SVG file.
pub fn latency_by_percentile(
    path: &Path,
    title: &str,
    curves: &[(&str, &Histogram<u64>)],
) -> Result<(), String> {
    let curves: Vec<_> = curves.iter().filter(|(_, h)| !h.is_empty()).collect();
    let max_count = curves.iter().map(|(_, h)| h.len()).max().unwrap_or(1);
    // Show as many nines as the data can support (at least 99 %, at most 99.999 %).
    let max_x = (max_count as f64).log10().ceil().clamp(2.0, 5.0);
    let max_ms = curves
        .iter()
        .map(|(_, h)| h.max() as f64 / 1000.0)
        .fold(1.0, f64::max)
        * 1.08;
    let err = |e: DrawingAreaErrorKind<_>| format!("{}: {e}", path.display());
    let root = SVGBackend::new(path, (960, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(64)
        .build_cartesian_2d(0f64..max_x, 0f64..max_ms)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("percentile")
        .y_desc("latency (ms)")
        .label_style(("sans-serif", 14))
        .axis_desc_style(("sans-serif", 15))
        .x_labels(max_x as usize + 1)
        // Only whole decades (0 %, 90 %, 99 % …) are labelled.
        .x_label_formatter(&|x| {
            if (x - x.round()).abs() < 1e-6 {
                percentile_label(*x)
            } else {
                String::new()
            }
        })
        .draw()
        .map_err(err)?;
    for (i, (name, h)) in curves.iter().enumerate() {
        let color = COLORS[i % COLORS.len()].to_rgba();
        let points: Vec<(f64, f64)> = h
            .iter_quantiles(5)
            .map(|v| {
                let q = v.quantile_iterated_to();
                let x = if q < 1.0 { x_of(q).min(max_x) } else { max_x };
                (x, v.value_iterated_to() as f64 / 1000.0)
            })
            .collect();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(format!("{name} (n={})", h.len()))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 24, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::new_histogram;

    #[test]
    fn percentile_axis_is_log_of_inverse_tail() {
        assert!((x_of(0.9) - 1.0).abs() < 1e-12);
        assert!((x_of(0.999) - 3.0).abs() < 1e-9);
        assert_eq!(percentile_label(0.0), "0%");
        assert_eq!(percentile_label(1.0), "90%");
        assert_eq!(percentile_label(2.0), "99%");
        assert_eq!(percentile_label(3.0), "99.9%");
        assert_eq!(percentile_label(4.0), "99.99%");
    }

    #[test]
    fn svg_is_written_with_one_curve_per_metric() {
        let mut a = new_histogram();
        let mut b = new_histogram();
        for i in 0..500u64 {
            a.record(300_000 + i * 100).unwrap();
            b.record(600_000 + i * 300).unwrap();
        }
        let path = std::env::temp_dir().join(format!("bench-plot-{}.svg", std::process::id()));
        latency_by_percentile(&path, "test", &[("stt", &a), ("first_audio", &b)]).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(svg.starts_with("<svg"));
        assert!(svg.contains("stt (n=500)") && svg.contains("first_audio (n=500)"));
        assert!(svg.contains("99.9%") || svg.contains("99%"));
        let _ = std::fs::remove_file(path);
    }
}
