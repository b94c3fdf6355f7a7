//! PNG figures: `curves.png` in every run folder (loss, error and learning rate by epoch,
//! redrawn after each epoch) and several runs on one figure (`compare_runs`, e.g. baseline
//! against CutMix). Drawn with plotters into memory, text in the embedded DejaVu Sans (so no
//! system font is needed), encoded as PNG and written atomically.

use std::path::Path;
use std::sync::Once;

use anyhow::{Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;

use crate::checkpoint::write_atomically;
use crate::metrics::EpochMetrics;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSans.ttf");
pub(crate) const FAMILY: &str = "sans-serif";

/// Line colours, one per series (a colour-blind-safe palette, Okabe and Ito's).
const PALETTE: [RGBColor; 8] = [
    RGBColor(0, 114, 178),
    RGBColor(213, 94, 0),
    RGBColor(0, 158, 115),
    RGBColor(204, 121, 167),
    RGBColor(230, 159, 0),
    RGBColor(86, 180, 233),
    RGBColor(0, 0, 0),
    RGBColor(240, 228, 66),
];

/// One line of a panel.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: RGBColor,
    pub dashed: bool,
}

impl Series {
    /// Series `index` of a figure: its palette colour, dashed once the palette is used up.
    pub fn nth(index: usize, label: String, points: Vec<(f64, f64)>) -> Self {
        Self {
            label,
            points,
            color: PALETTE[index % PALETTE.len()],
            dashed: index >= PALETTE.len(),
        }
    }
}

/// Filled bars `[x0, x1] x [0, y]` drawn under a panel's lines (a reliability diagram's bins).
pub struct Bars {
    pub label: String,
    pub bars: Vec<(f64, f64, f64)>,
}

/// One panel: a title, its axes and its lines.
pub struct Panel {
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub series: Vec<Series>,
    pub bars: Option<Bars>,
    /// Where the legend goes (the corner the lines leave free).
    pub legend: SeriesLabelPosition,
    /// A fixed y range (`None`: from 0, or the lowest value when negative, to the highest).
    pub y_range: Option<(f64, f64)>,
}

impl Panel {
    /// A panel of lines over `x_label`, y from 0, the legend in the lower left.
    pub fn lines(title: &str, x_label: &str, y_label: &str, series: Vec<Series>) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series,
            bars: None,
            legend: SeriesLabelPosition::LowerLeft,
            y_range: None,
        }
    }
}

pub(crate) fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is compiled in; it cannot fail to parse.
        let _ = plotters::style::register_font(FAMILY, FontStyle::Normal, FONT);
    });
}

fn points(metrics: &[EpochMetrics], value: impl Fn(&EpochMetrics) -> f64) -> Vec<(f64, f64)> {
    metrics
        .iter()
        .map(|m| (m.epoch as f64, value(m)))
        .filter(|(_, y)| y.is_finite())
        .collect()
}

/// `curves.png` of one run: training and validation loss; training, validation top-1 and top-5
/// error; learning rate.
pub fn write_run_curves(name: &str, metrics: &[EpochMetrics], path: &Path) -> Result<()> {
    let series =
        |label: &str, color: usize, dashed: bool, value: fn(&EpochMetrics) -> f64| Series {
            label: label.into(),
            points: points(metrics, value),
            color: PALETTE[color],
            dashed,
        };
    let panels = [
        Panel::lines(
            "loss",
            "epoch",
            "cross-entropy",
            vec![
                series("train (mixed batches)", 0, true, |m| m.train_loss),
                series("validation", 1, false, |m| m.val_loss),
            ],
        ),
        Panel::lines(
            "error",
            "epoch",
            "error (%)",
            vec![
                series("train top-1 (mixed)", 0, true, |m| m.train_top1_err),
                series("val top-1", 1, false, |m| m.val_top1_err),
                series("val top-5", 2, false, |m| m.val_top5_err),
                series("val top-1, weights' average", 3, false, |m| {
                    m.ema_val_top1_err.unwrap_or(f64::NAN)
                }),
            ],
        ),
        Panel::lines(
            "learning rate",
            "epoch",
            "lr (end of epoch)",
            vec![series("lr", 0, false, |m| m.lr)],
        ),
    ];
    let best = metrics
        .iter()
        .min_by(|a, b| a.val_top1_err.total_cmp(&b.val_top1_err))
        .map(|m| {
            format!(
                " (best val top-1 {:.2}% at epoch {})",
                m.val_top1_err, m.epoch
            )
        })
        .unwrap_or_default();
    write_figure(&format!("{name}{best}"), &panels, (1500, 460), path)
}

/// Several runs on one figure: validation top-1 error, training loss and validation loss,
/// one colour per run.
pub fn write_comparison(runs: &[(String, Vec<EpochMetrics>)], path: &Path) -> Result<()> {
    let by_run = |value: fn(&EpochMetrics) -> f64| -> Vec<Series> {
        runs.iter()
            .enumerate()
            .map(|(i, (name, metrics))| Series::nth(i, name.clone(), points(metrics, value)))
            .collect()
    };
    let panels = [
        Panel::lines(
            "validation top-1 error",
            "epoch",
            "error (%)",
            by_run(|m| m.val_top1_err),
        ),
        Panel::lines(
            "training loss (mixed batches)",
            "epoch",
            "cross-entropy",
            by_run(|m| m.train_loss),
        ),
        Panel::lines(
            "validation loss",
            "epoch",
            "cross-entropy",
            by_run(|m| m.val_loss),
        ),
    ];
    let names: Vec<&str> = runs.iter().map(|(n, _)| n.as_str()).collect();
    write_figure(&names.join(" vs "), &panels, (1500, 460), path)
}

/// Writes `panels` side by side under `title` as a PNG of `width` x `height` pixels.
pub fn write_figure(
    title: &str,
    panels: &[Panel],
    (width, height): (u32, u32),
    path: &Path,
) -> Result<()> {
    register_font();
    let mut pixels = vec![255u8; (width * height * 3) as usize];
    draw(title, panels, &mut pixels, (width, height))
        .map_err(|e| anyhow!("cannot draw {}: {e}", path.display()))?;
    let image = image::RgbImage::from_raw(width, height, pixels).expect("buffer fits the figure");
    let mut png = Vec::new();
    image
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .map_err(|e| anyhow!("cannot encode {}: {e}", path.display()))?;
    write_atomically(path, &png)
}

type DrawResult = std::result::Result<(), Box<dyn std::error::Error>>;

fn draw(title: &str, panels: &[Panel], pixels: &mut [u8], size: (u32, u32)) -> DrawResult {
    let root = BitMapBackend::with_buffer(pixels, size).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, (FAMILY, 22))?;
    for (area, panel) in root.split_evenly((1, panels.len())).iter().zip(panels) {
        draw_panel(area, panel)?;
    }
    root.present()?;
    Ok(())
}

fn draw_panel(area: &DrawingArea<BitMapBackend<'_>, Shift>, panel: &Panel) -> DrawResult {
    let bar_points = panel.bars.iter().flat_map(|b| {
        b.bars
            .iter()
            .flat_map(|&(x0, x1, y)| [(x0, y), (x1, y), (x0, 0.0)])
    });
    let all: Vec<(f64, f64)> = panel
        .series
        .iter()
        .flat_map(|s| s.points.iter().copied())
        .chain(bar_points)
        .collect();
    let (mut x_min, mut x_max, mut y_min, mut y_max) =
        (0.0f64, 1.0f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in &all {
        x_min = x_min.min(x);
        x_max = x_max.max(x);
        y_min = y_min.min(y);
        y_max = y_max.max(y);
    }
    if !y_min.is_finite() {
        (y_min, y_max) = (0.0, 1.0);
    }
    // Errors and losses from 0; a flat line still gets some height.
    let y_low = if y_min >= 0.0 { 0.0 } else { y_min };
    let y_high = if y_max > y_low {
        y_max * 1.05
    } else {
        y_low + 1.0
    };
    let (y_low, y_high) = panel.y_range.unwrap_or((y_low, y_high));
    let integral = all.iter().all(|(x, _)| x.fract() == 0.0);
    let mut chart = ChartBuilder::on(area)
        .caption(&panel.title, (FAMILY, 18))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max.max(x_min + 1e-9), y_low..y_high)?;
    let x_labels = if integral {
        ((x_max - x_min) as usize + 1).min(11)
    } else {
        11
    };
    let x_format = move |x: &f64| {
        if integral {
            format!("{x:.0}")
        } else {
            format!("{x:.2}")
        }
    };
    chart
        .configure_mesh()
        .x_desc(&panel.x_label)
        .y_desc(&panel.y_label)
        .x_labels(x_labels)
        .x_label_formatter(&x_format)
        .label_style((FAMILY, 13))
        .axis_desc_style((FAMILY, 14))
        .bold_line_style(RGBColor(225, 225, 225))
        .light_line_style(WHITE)
        .draw()?;
    if let Some(bars) = &panel.bars {
        let fill = RGBColor(0, 114, 178).mix(0.45).filled();
        chart
            .draw_series(
                bars.bars
                    .iter()
                    .map(|&(x0, x1, y)| Rectangle::new([(x0, 0.0), (x1, y)], fill)),
            )?
            .label(bars.label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 22, y + 5)], fill));
    }
    for series in panel.series.iter().filter(|s| !s.points.is_empty()) {
        let style = ShapeStyle::from(&series.color).stroke_width(2);
        let points = series.points.clone();
        let drawn = if series.dashed {
            chart.draw_series(DashedLineSeries::new(points.clone(), 6, 4, style))?
        } else {
            chart.draw_series(LineSeries::new(points.clone(), style))?
        };
        drawn
            .label(series.label.clone())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 22, y)], style));
        if points.len() <= 40 {
            chart.draw_series(
                points
                    .iter()
                    .map(|&p| Circle::new(p, 3, ShapeStyle::from(&series.color).filled())),
            )?;
        }
    }
    chart
        .configure_series_labels()
        .label_font((FAMILY, 13))
        .background_style(WHITE.mix(0.85))
        .border_style(RGBColor(200, 200, 200))
        .position(panel.legend.clone())
        .draw()?;
    Ok(())
}
