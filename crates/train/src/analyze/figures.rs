//! The analyses' PNGs: curves of a measure against the swept setting (occlusion size, Mixup or
//! CutMix lambda, FGSM epsilon, ROC), one line per weights file, and reliability diagrams.

use std::path::Path;

use anyhow::Result;
use plotters::prelude::SeriesLabelPosition;

use cutmix_analysis::calibration::Calibration;

use crate::plots::{Bars, Panel, Series, write_figure};

/// One line per weights file: its name and its points.
pub type Lines = Vec<(String, Vec<(f64, f64)>)>;

/// A panel of one line per weights file.
pub fn panel(title: &str, x_label: &str, y_label: &str, lines: &Lines) -> Panel {
    let series = lines
        .iter()
        .enumerate()
        .map(|(i, (name, points))| Series::nth(i, name.clone(), points.clone()))
        .collect();
    Panel::lines(title, x_label, y_label, series)
}

/// `panels` side by side, 520 pixels each.
pub fn write_panels(title: &str, panels: &[Panel], path: &Path) -> Result<()> {
    write_figure(title, panels, (520 * panels.len() as u32, 460), path)
}

/// A reliability diagram per weights file: each bin's accuracy as a bar at its confidence
/// range, the bin's mean confidence as a line, and the diagonal of perfect calibration.
pub fn write_reliability(files: &[(String, Calibration)], path: &Path) -> Result<()> {
    let panels: Vec<Panel> = files
        .iter()
        .map(|(name, c)| {
            let filled = c.bins.iter().filter(|b| b.count > 0);
            let bars = filled
                .clone()
                .map(|b| (b.lower, b.upper, b.accuracy))
                .collect();
            let confidence = filled
                .map(|b| ((b.lower + b.upper) / 2.0, b.confidence))
                .collect();
            let mut diagonal = Series::nth(
                6,
                "perfect calibration".into(),
                vec![(0.0, 0.0), (1.0, 1.0)],
            );
            diagonal.dashed = true;
            Panel {
                title: format!("{name}: ECE {:.2}%", c.ece * 100.0),
                x_label: "confidence (max softmax)".into(),
                y_label: "accuracy".into(),
                series: vec![
                    diagonal,
                    Series::nth(1, "mean confidence of the bin".into(), confidence),
                ],
                bars: Some(Bars {
                    label: "accuracy of the bin".into(),
                    bars,
                }),
                legend: SeriesLabelPosition::UpperLeft,
                y_range: Some((0.0, 1.0)),
            }
        })
        .collect();
    write_panels("reliability", &panels, path)
}
