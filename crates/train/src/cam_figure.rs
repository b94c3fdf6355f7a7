//! `localize --figure`: a grid of the first validation images, one row each: the image with its
//! ground-truth boxes (green) and the box found in its ground-truth class's CAM (red), that CAM
//! as a heat map over the image, and the predicted class's CAM the same way; with several
//! weight files, each one's ground-truth-class CAM and box side by side (the paper's Figure 1).
//! Each cell is captioned with its class: the ground truth's, or the prediction's.

use std::path::Path;

use anyhow::{Context, Result};
use cutmix_analysis::boxes::PixelBox;
use image::{Rgb, RgbImage};

use crate::checkpoint::write_atomically;

/// One row of the figure.
pub struct CamRow {
    /// `[size, size, 3]` RGB, 0-255.
    pub image: Vec<u8>,
    /// The ground-truth class's normalised CAM, `[size, size]`.
    pub truth_map: Vec<f32>,
    /// The predicted class's normalised CAM, `[size, size]`.
    pub predicted_map: Vec<f32>,
    pub truth: Vec<PixelBox>,
    /// The box of the ground-truth class's CAM at the threshold, if any.
    pub found: Option<PixelBox>,
    /// The names (or numbers) of the ground-truth and predicted classes.
    pub truth_class: String,
    pub predicted_class: String,
}

const GAP: u32 = 4;
const GREEN: Rgb<u8> = Rgb([0, 200, 0]);
const RED: Rgb<u8> = Rgb([230, 0, 0]);

/// A normalised `[size, size, 3]` CHW image back to RGB bytes.
pub fn to_rgb(chw: &[f32], size: usize, mean: [f32; 3], std: [f32; 3]) -> Vec<u8> {
    let plane = size * size;
    (0..plane)
        .flat_map(|p| {
            (0..3).map(move |c| {
                ((chw[c * plane + p] * std[c] + mean[c]) * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            })
        })
        .collect()
}

/// The jet colour map, `v` in [0, 1].
fn jet(v: f32) -> [f32; 3] {
    let channel = |centre: f32| (1.5 - (4.0 * v - centre).abs()).clamp(0.0, 1.0);
    [channel(3.0), channel(2.0), channel(1.0)]
}

/// One cell of the grid: an image, optionally with a CAM over it, boxes to outline and a
/// caption.
struct Cell<'a> {
    map: Option<&'a [f32]>,
    boxes: Vec<(PixelBox, Rgb<u8>)>,
    caption: String,
}

/// Writes the grid to `path` (PNG), each cell `size * scale` pixels wide. With one model
/// (`models.len() == 1`) a row is the image with its boxes, the ground-truth class's CAM and
/// the predicted class's CAM; with several (the paper's Figure 1), the image with its
/// ground-truth boxes, then each model's ground-truth-class CAM with the box found in it. Every
/// model's rows are of the same images.
pub fn write(path: &Path, models: &[Vec<CamRow>], size: usize) -> Result<()> {
    let rows = models.first().map_or(0, Vec::len);
    let columns = if models.len() == 1 {
        3
    } else {
        1 + models.len()
    };
    let scale = (128 / size.max(1)).max(1) as u32;
    let cell = size as u32 * scale;
    let width = columns as u32 * (cell + GAP) + GAP;
    let height = rows as u32 * (cell + GAP) + GAP;
    let mut canvas = RgbImage::from_pixel(width, height, Rgb([255, 255, 255]));
    let mut captions = Vec::new();
    for r in 0..rows {
        let row = &models[0][r];
        let truth: Vec<_> = row.truth.iter().map(|&b| (b, GREEN)).collect();
        let found = |m: &CamRow| m.found.map(|b| (b, RED));
        let cells: Vec<Cell> = if models.len() == 1 {
            vec![
                Cell {
                    map: None,
                    boxes: truth.iter().copied().chain(found(row)).collect(),
                    caption: row.truth_class.clone(),
                },
                Cell {
                    map: Some(&row.truth_map),
                    boxes: Vec::new(),
                    caption: format!("CAM {}", row.truth_class),
                },
                Cell {
                    map: Some(&row.predicted_map),
                    boxes: Vec::new(),
                    caption: format!("pred: {}", row.predicted_class),
                },
            ]
        } else {
            std::iter::once(Cell {
                map: None,
                boxes: truth.clone(),
                caption: row.truth_class.clone(),
            })
            .chain(models.iter().map(|m| Cell {
                map: Some(&m[r].truth_map),
                boxes: truth.iter().copied().chain(found(&m[r])).collect(),
                caption: format!("pred: {}", m[r].predicted_class),
            }))
            .collect()
        };
        let top = GAP + r as u32 * (cell + GAP);
        for (column, c) in cells.iter().enumerate() {
            let left = GAP + column as u32 * (cell + GAP);
            for y in 0..cell {
                for x in 0..cell {
                    let i = (y / scale) as usize * size + (x / scale) as usize;
                    let rgb = [0, 1, 2].map(|k| row.image[i * 3 + k] as f32 / 255.0);
                    let mixed = match c.map {
                        Some(map) => {
                            let heat = jet(map[i]);
                            [0, 1, 2].map(|k| 0.5 * rgb[k] + 0.5 * heat[k])
                        }
                        None => rgb,
                    };
                    canvas.put_pixel(
                        left + x,
                        top + y,
                        Rgb(mixed.map(|v| (v * 255.0).round() as u8)),
                    );
                }
            }
            for &(b, colour) in &c.boxes {
                outline(&mut canvas, b, (left, top), scale, colour);
            }
            captions.push((left, top, c.caption.clone()));
        }
    }
    write_captions(&mut canvas, &captions)?;
    let mut png = Vec::new();
    canvas
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .context("encoding the CAM figure")?;
    write_atomically(path, &png)
}

/// Each caption in white on a dark strip at the top left of its cell.
fn write_captions(canvas: &mut RgbImage, captions: &[(u32, u32, String)]) -> Result<()> {
    use plotters::prelude::*;
    crate::plots::register_font();
    let (width, height) = canvas.dimensions();
    let root = BitMapBackend::with_buffer(canvas.as_mut(), (width, height)).into_drawing_area();
    let font = (crate::plots::FAMILY, 12).into_font().color(&WHITE);
    let draw = || -> std::result::Result<(), Box<dyn std::error::Error>> {
        for (left, top, text) in captions {
            let (w, h) = root.estimate_text_size(text, &font)?;
            let (x, y) = (*left as i32, *top as i32);
            root.draw(&Rectangle::new(
                [(x, y), (x + w as i32 + 4, y + h as i32 + 2)],
                BLACK.mix(0.6).filled(),
            ))?;
            root.draw(&Text::new(text.as_str(), (x + 2, y + 1), font.clone()))?;
        }
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| anyhow::anyhow!("drawing the CAM figure's captions: {e}"))
}

/// A 2-pixel outline of `b` (crop pixels) on the cell at `origin`.
fn outline(
    canvas: &mut RgbImage,
    b: PixelBox,
    (left, top): (u32, u32),
    scale: u32,
    colour: Rgb<u8>,
) {
    let to = |v: f32| (v.max(0.0) as u32) * scale;
    let (x0, y0) = (left + to(b.x0), top + to(b.y0));
    let (x1, y1) = (left + to(b.x1) + scale - 1, top + to(b.y1) + scale - 1);
    for t in 0..2u32 {
        for x in x0..=x1 {
            for y in [y0 + t, y1.saturating_sub(t)] {
                if x < canvas.width() && y < canvas.height() {
                    canvas.put_pixel(x, y, colour);
                }
            }
        }
        for y in y0..=y1 {
            for x in [x0 + t, x1.saturating_sub(t)] {
                if x < canvas.width() && y < canvas.height() {
                    canvas.put_pixel(x, y, colour);
                }
            }
        }
    }
}
