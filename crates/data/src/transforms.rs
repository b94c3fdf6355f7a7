//! Host-side image transforms, ending in a normalised `[3][size][size]` f32 image.

use fast_image_resize::{self as fir, FilterType, PixelType, ResizeAlg, ResizeOptions, Resizer};
use fir::images::ImageRef;
use rand::{Rng, RngExt};

use crate::color::ColorAugment;
use crate::{DataError, RgbImage, Sample};

/// The CIFAR normalisation of the CutMix reference: (125.3, 123.0, 113.9) / 255.
pub const CIFAR_MEAN: [f32; 3] = [125.3 / 255.0, 123.0 / 255.0, 113.9 / 255.0];
/// The CIFAR standard deviations of the CutMix reference: (63.0, 62.1, 66.7) / 255.
pub const CIFAR_STD: [f32; 3] = [63.0 / 255.0, 62.1 / 255.0, 66.7 / 255.0];
/// torchvision's ImageNet mean.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// torchvision's ImageNet standard deviation.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// What fills the border a CIFAR crop pads the image with.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pad {
    /// Black pixels (torchvision's `RandomCrop(padding=4)` default, the reference's).
    #[default]
    Zeros,
    /// The normalisation's mean (rounded to 8-bit pixels): 0 after normalisation.
    Mean,
    /// The image mirrored at its edge, the edge not repeated (`padding_mode="reflect"`).
    Reflect,
    /// The edge pixel repeated (`padding_mode="edge"`).
    Edge,
}

/// A transform from a decoded image to a normalised square image of `size`.
#[derive(Clone, Debug, PartialEq)]
pub enum Transform {
    /// Pad by `padding` (black unless `pad` says otherwise), random `size` crop, random
    /// horizontal flip (CIFAR training).
    CifarTrain {
        size: usize,
        padding: usize,
        pad: Pad,
    },
    /// The image as it is, resized to `size` if it is not already (CIFAR evaluation).
    CifarEval { size: usize },
    /// torchvision's `RandomResizedCrop(size)` (scale 0.08-1, ratio 3/4-4/3), a random
    /// horizontal flip, then the reference's colour jitter and PCA lighting (`color`).
    ImageNetTrain { size: usize, color: ColorAugment },
    /// Resize the shorter side to `size * 256 / 224`, then a centre crop of `size`.
    ImageNetEval { size: usize },
    /// The weakly-supervised localization recipe (the paper's CUB and ImageNet localization
    /// fine-tuning, as ADL and wsolevaluation do it): resize to a `size * 256 / 224` square
    /// (the aspect ratio is not kept), a random `size` crop, a random horizontal flip.
    WsolTrain { size: usize },
    /// Resize to a `size * 256 / 224` square, then a centre crop of `size`.
    WsolEval { size: usize },
}

impl Transform {
    /// Side of the output image.
    pub fn size(&self) -> usize {
        match *self {
            Self::CifarTrain { size, .. }
            | Self::CifarEval { size }
            | Self::ImageNetTrain { size, .. }
            | Self::ImageNetEval { size }
            | Self::WsolTrain { size }
            | Self::WsolEval { size } => size,
        }
    }

    /// Transforms `sample` and writes it, normalised with `mean` / `std`, into `out`
    /// (`3 * size * size` values, channel-major). A file is decoded here, at a reduced scale
    /// when the window it is cropped to has pixels to spare (a JPEG's scaled inverse DCT).
    pub fn apply(
        &self,
        sample: &Sample,
        rng: &mut impl Rng,
        mean: [f32; 3],
        std: [f32; 3],
        out: &mut [f32],
    ) -> Result<(), DataError> {
        self.apply_reducing(sample, MAX_REDUCTION, rng, mean, std, out)
    }

    /// [`Transform::apply`] with decoding reduced by at most `max_reduction` (1: always decode
    /// at full size); the loader benchmark compares the two.
    pub fn apply_reducing(
        &self,
        sample: &Sample,
        max_reduction: usize,
        rng: &mut impl Rng,
        mean: [f32; 3],
        std: [f32; 3],
        out: &mut [f32],
    ) -> Result<(), DataError> {
        let mut color = ColorAugment::default();
        let (square, flip) = match *self {
            Self::CifarTrain { size, padding, pad } => {
                let image = fit(sample.decode(1)?, size);
                let top = rng.random_range(0..=2 * padding);
                let left = rng.random_range(0..=2 * padding);
                let flip = rng.random_bool(0.5);
                let border = Border {
                    pad,
                    mean: mean.map(|m| (m * 255.0).round().clamp(0.0, 255.0) as u8),
                };
                let window = Crop {
                    padding,
                    top,
                    left,
                    size,
                };
                (padded_crop(&image, window, border), flip)
            }
            Self::CifarEval { size } => (fit(sample.decode(1)?, size), false),
            Self::ImageNetTrain {
                size,
                color: augment,
            } => {
                let (width, height) = sample.dimensions()?;
                let (top, left, h, w) = random_resized_crop_box(width, height, rng);
                let flip = rng.random_bool(0.5);
                color = augment;
                let window = Window {
                    left: left as f64,
                    top: top as f64,
                    width: w as f64,
                    height: h as f64,
                };
                (
                    decode_window(sample, (width, height), window, size, max_reduction)?,
                    flip,
                )
            }
            Self::ImageNetEval { size } => {
                let (width, height) = sample.dimensions()?;
                let window = imagenet_eval_window(size, width, height);
                (
                    decode_window(sample, (width, height), window, size, max_reduction)?,
                    false,
                )
            }
            Self::WsolTrain { size } => {
                let (width, height) = sample.dimensions()?;
                let spare = wsol_resize(size) - size;
                let top = rng.random_range(0..=spare);
                let left = rng.random_range(0..=spare);
                let flip = rng.random_bool(0.5);
                let window = wsol_window(size, width, height, top, left);
                (
                    decode_window(sample, (width, height), window, size, max_reduction)?,
                    flip,
                )
            }
            Self::WsolEval { size } => {
                let (width, height) = sample.dimensions()?;
                let centre = (wsol_resize(size) - size) / 2;
                let window = wsol_window(size, width, height, centre, centre);
                (
                    decode_window(sample, (width, height), window, size, max_reduction)?,
                    false,
                )
            }
        };
        if color.is_off() {
            write_normalised(&square, flip, mean, std, out);
        } else {
            // As the reference: ToTensor ([0, 1]), colour, then normalise.
            write_normalised(&square, flip, [0.0; 3], [1.0; 3], out);
            color.apply(out, rng);
            let plane = out.len() / 3;
            for (c, channel) in out.chunks_mut(plane).enumerate() {
                channel
                    .iter_mut()
                    .for_each(|v| *v = (*v - mean[c]) / std[c]);
            }
        }
        Ok(())
    }
}

/// torchvision's `Resize(size * 256 / 224)` then `CenterCrop(size)`, as one window of the full
/// `width` x `height` image (resized once).
fn imagenet_eval_window(size: usize, width: usize, height: usize) -> Window {
    let short = size * 256 / 224;
    let (rw, rh) = if width <= height {
        (short, (short * height / width).max(short))
    } else {
        ((short * width / height).max(short), short)
    };
    let (sx, sy) = (width as f64 / rw as f64, height as f64 / rh as f64);
    Window {
        left: ((rw - size) / 2) as f64 * sx,
        top: ((rh - size) / 2) as f64 * sy,
        width: size as f64 * sx,
        height: size as f64 * sy,
    }
}

/// The side of the square a localization transform resizes to before cropping `size`.
fn wsol_resize(size: usize) -> usize {
    size * 256 / 224
}

/// The `size` crop at `(top, left)` of the `width` x `height` image resized to a
/// [`wsol_resize`] square, as a window of the full image (resized once).
fn wsol_window(size: usize, width: usize, height: usize, top: usize, left: usize) -> Window {
    let resize = wsol_resize(size) as f64;
    let (sx, sy) = (width as f64 / resize, height as f64 / resize);
    Window {
        left: left as f64 * sx,
        top: top as f64 * sy,
        width: size as f64 * sx,
        height: size as f64 * sy,
    }
}

impl Transform {
    /// A box `[x0, y0, x1, y1]` of a `width` x `height` image in the pixels of this
    /// transform's output (`size` x `size`), through exactly the window the evaluation
    /// transforms cut and resize (not clipped: a box may reach outside the crop). `None` for
    /// the training transforms, whose crops are random.
    pub fn map_box(&self, b: [f32; 4], width: usize, height: usize) -> Option<[f32; 4]> {
        let window = match *self {
            Self::CifarEval { .. } => Window {
                left: 0.0,
                top: 0.0,
                width: width as f64,
                height: height as f64,
            },
            Self::ImageNetEval { size } => imagenet_eval_window(size, width, height),
            Self::WsolEval { size } => {
                let centre = (wsol_resize(size) - size) / 2;
                wsol_window(size, width, height, centre, centre)
            }
            Self::CifarTrain { .. } | Self::ImageNetTrain { .. } | Self::WsolTrain { .. } => {
                return None;
            }
        };
        let size = self.size() as f64;
        let (sx, sy) = (size / window.width, size / window.height);
        let x = |v: f32| ((v as f64 - window.left) * sx) as f32;
        let y = |v: f32| ((v as f64 - window.top) * sy) as f32;
        Some([x(b[0]), y(b[1]), x(b[2]), y(b[3])])
    }
}

/// The most a file is reduced while decoding: JPEGs decode at 1/4 or 1/8 of their size when
/// the window still has at least the output's pixels at that scale.
pub const MAX_REDUCTION: usize = 8;

/// The least reduction worth a second decoder: jpeg-decoder's scaled inverse DCT at 1/2 is
/// slower than zune-jpeg at full size, at 1/4 as fast, at 1/8 faster (BENCHMARKS.md); below
/// this a file is decoded at full size. Above it a huge photo costs 1/16 or 1/64 of the memory.
const MIN_REDUCTION: usize = 4;

/// A window of an image in its full-size pixel coordinates (fractional after scaling).
#[derive(Clone, Copy, Debug, PartialEq)]
struct Window {
    left: f64,
    top: f64,
    width: f64,
    height: f64,
}

/// Decodes `sample` (full size `full`) at the largest reduction that leaves `window` at least
/// `size` pixels on each side, and resizes the window to `size x size`.
fn decode_window(
    sample: &Sample,
    full: (usize, usize),
    window: Window,
    size: usize,
    max_reduction: usize,
) -> Result<RgbImage, DataError> {
    let mut reduce = 1;
    while reduce * 2 <= max_reduction
        && window.width / (reduce * 2) as f64 >= size as f64
        && window.height / (reduce * 2) as f64 >= size as f64
    {
        reduce *= 2;
    }
    if reduce < MIN_REDUCTION {
        reduce = 1;
    }
    let image = sample.decode(reduce)?;
    let (sx, sy) = (
        image.width as f64 / full.0 as f64,
        image.height as f64 / full.1 as f64,
    );
    let scaled = Window {
        left: window.left * sx,
        top: window.top * sy,
        width: window.width * sx,
        height: window.height * sy,
    };
    Ok(resize_window(&image, scaled, size, size))
}

/// torchvision's `RandomResizedCrop.get_params` with scale (0.08, 1) and ratio (3/4, 4/3):
/// ten tries at a random area and log-uniform aspect ratio, then a centre crop fallback.
/// Returns `(top, left, height, width)`.
fn random_resized_crop_box(
    width: usize,
    height: usize,
    rng: &mut impl Rng,
) -> (usize, usize, usize, usize) {
    let area = (width * height) as f64;
    let (ratio_min, ratio_max) = (3.0_f64 / 4.0, 4.0_f64 / 3.0);
    for _ in 0..10 {
        let target_area = area * rng.random_range(0.08..1.0);
        let aspect = rng.random_range(ratio_min.ln()..ratio_max.ln()).exp();
        let w = (target_area * aspect).sqrt().round() as usize;
        let h = (target_area / aspect).sqrt().round() as usize;
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return (top, left, h, w);
        }
    }
    let in_ratio = width as f64 / height as f64;
    let (w, h) = if in_ratio < ratio_min {
        (width, (width as f64 / ratio_min).round() as usize)
    } else if in_ratio > ratio_max {
        ((height as f64 * ratio_max).round() as usize, height)
    } else {
        (width, height)
    };
    ((height - h) / 2, (width - w) / 2, h, w)
}

/// The `window` of `image` resized to `out_w x out_h` with an antialiased bilinear filter (as
/// PIL's, which torchvision's transforms use), by fast_image_resize's SIMD kernels.
fn resize_window(image: &RgbImage, window: Window, out_w: usize, out_h: usize) -> RgbImage {
    let source = ImageRef::new(
        image.width as u32,
        image.height as u32,
        &image.pixels,
        PixelType::U8x3,
    )
    .expect("pixel buffer matches the image size");
    let mut target = fir::images::Image::new(out_w as u32, out_h as u32, PixelType::U8x3);
    let options = ResizeOptions::new()
        .resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
        .crop(window.left, window.top, window.width, window.height);
    Resizer::new()
        .resize(&source, &mut target, &options)
        .expect("same pixel type on both sides");
    RgbImage {
        width: out_w,
        height: out_h,
        pixels: target.into_vec(),
    }
}

/// The image resized to `size x size` (moved through when it already is).
fn fit(image: RgbImage, size: usize) -> RgbImage {
    if image.width == size && image.height == size {
        return image;
    }
    let whole = Window {
        left: 0.0,
        top: 0.0,
        width: image.width as f64,
        height: image.height as f64,
    };
    resize_window(&image, whole, size, size)
}

/// A `size x size` window at `(top, left)` of an image padded by `padding` on each side.
#[derive(Clone, Copy, Debug)]
struct Crop {
    padding: usize,
    top: usize,
    left: usize,
    size: usize,
}

/// How the padding is filled, and the mean pixel for [`Pad::Mean`].
#[derive(Clone, Copy, Debug)]
struct Border {
    pad: Pad,
    mean: [u8; 3],
}

/// Where padded coordinate `i` (`0 <= i + padding < n + 2 * padding`, shifted so the image is
/// at `0..n`) reads from, or `None` for a constant fill.
fn source_index(i: isize, n: usize, pad: Pad) -> Option<usize> {
    let n = n as isize;
    if (0..n).contains(&i) {
        return Some(i as usize);
    }
    match pad {
        Pad::Zeros | Pad::Mean => None,
        Pad::Edge => Some(i.clamp(0, n - 1) as usize),
        // Mirror without repeating the edge; a pad wider than the image folds back again.
        Pad::Reflect => {
            let period = 2 * (n - 1).max(1);
            let m = i.rem_euclid(period);
            Some((if m < n { m } else { period - m }) as usize)
        }
    }
}

/// The `crop` window of `image` padded as `border` says.
fn padded_crop(image: &RgbImage, crop: Crop, border: Border) -> RgbImage {
    let Crop {
        padding,
        top,
        left,
        size,
    } = crop;
    let fill = match border.pad {
        Pad::Mean => border.mean,
        _ => [0; 3],
    };
    let mut pixels = Vec::with_capacity(size * size * 3);
    for y in 0..size {
        let src_y = source_index(
            (y + top) as isize - padding as isize,
            image.height,
            border.pad,
        );
        for x in 0..size {
            let src_x = source_index(
                (x + left) as isize - padding as isize,
                image.width,
                border.pad,
            );
            match (src_y, src_x) {
                (Some(sy), Some(sx)) => {
                    let src = (sy * image.width + sx) * 3;
                    pixels.extend_from_slice(&image.pixels[src..src + 3]);
                }
                _ => pixels.extend_from_slice(&fill),
            }
        }
    }
    RgbImage {
        width: size,
        height: size,
        pixels,
    }
}

/// Writes `(pixel / 255 - mean) / std` channel-major into `out`, mirrored when `flip`
/// (through a 256-entry table per channel: one load per value instead of a multiply-add).
fn write_normalised(image: &RgbImage, flip: bool, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let (w, h) = (image.width, image.height);
    assert_eq!(out.len(), 3 * w * h, "output buffer size");
    let tables: [[f32; 256]; 3] = std::array::from_fn(|c| {
        let scale = 1.0 / (255.0 * std[c]);
        let shift = mean[c] / std[c];
        std::array::from_fn(|v| v as f32 * scale - shift)
    });
    let (red, rest) = out.split_at_mut(w * h);
    let (green, blue) = rest.split_at_mut(w * h);
    for (y, row) in image.pixels.chunks_exact(3 * w).enumerate() {
        let span = y * w..(y + 1) * w;
        let (r, g, b) = (
            &mut red[span.clone()],
            &mut green[span.clone()],
            &mut blue[span],
        );
        for (x, pixel) in row.chunks_exact(3).enumerate() {
            let at = if flip { w - 1 - x } else { x };
            r[at] = tables[0][usize::from(pixel[0])];
            g[at] = tables[1][usize::from(pixel[1])];
            b[at] = tables[2][usize::from(pixel[2])];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    /// Boxes follow the evaluation crop: the crop window itself maps onto the whole output,
    /// a pixel scales by the resize factor, and training transforms have no fixed mapping.
    #[test]
    fn boxes_map_through_the_evaluation_window() {
        let eval = Transform::ImageNetEval { size: 224 };
        // 500x375: resized to 341x256 (torchvision's integer size), crop at (58, 16).
        let (sx, sy) = (341.0 / 500.0, 256.0 / 375.0);
        let (left, top) = (58.0 / sx, 16.0 / sy);
        let window = [left, top, left + 224.0 / sx, top + 224.0 / sy];
        let mapped = eval.map_box(window.map(|v| v as f32), 500, 375).unwrap();
        for (got, want) in mapped.iter().zip([0.0, 0.0, 224.0, 224.0]) {
            assert!((got - want).abs() < 1e-3, "{mapped:?}");
        }
        let b = eval.map_box([100.0, 50.0, 300.0, 200.0], 500, 375).unwrap();
        let want = [
            (100.0 - left) * sx,
            (50.0 - top) * sy,
            (300.0 - left) * sx,
            (200.0 - top) * sy,
        ];
        for (got, want) in b.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-3, "{b:?}");
        }
        let cifar = Transform::CifarEval { size: 32 };
        assert_eq!(
            cifar.map_box([0.0, 0.0, 63.0, 31.0], 64, 32),
            Some([0.0, 0.0, 31.5, 31.0])
        );
        let train = Transform::CifarTrain {
            size: 32,
            padding: 4,
            pad: Pad::Zeros,
        };
        assert_eq!(train.map_box([0.0, 0.0, 1.0, 1.0], 32, 32), None);
        // CUB's test transform: 500x375 resized to 256x256, the centre 224 at (16, 16).
        let wsol = Transform::WsolEval { size: 224 };
        let (sx, sy) = (256.0 / 500.0, 256.0 / 375.0);
        let b = wsol.map_box([100.0, 50.0, 300.0, 200.0], 500, 375).unwrap();
        let want = [
            100.0 * sx - 16.0,
            50.0 * sy - 16.0,
            300.0 * sx - 16.0,
            200.0 * sy - 16.0,
        ];
        for (got, want) in b.iter().zip(want) {
            assert!((*got as f64 - want).abs() < 1e-3, "{b:?}");
        }
    }

    /// The localization transforms resize the whole image to a square (not keeping its aspect
    /// ratio) and crop it: against a resize to the square followed by the crop, done by hand.
    #[test]
    fn localization_transforms_resize_to_a_square_then_crop() {
        // A smooth ramp: resampling a window and resampling the whole image agree on it.
        let image = RgbImage {
            width: 90,
            height: 45,
            pixels: (0..90 * 45)
                .flat_map(|i| [(i % 90) as u8, (i / 90 * 2) as u8, 7])
                .collect(),
        };
        let (mean, std) = ([0.0; 3], [1.0; 3]);
        let size = 28; // resized to 32x32
        let square = fit(image.clone(), 32);
        let crop = |top: usize, left: usize| {
            let mut pixels = Vec::new();
            for y in top..top + size {
                let row = (y * 32 + left) * 3;
                pixels.extend_from_slice(&square.pixels[row..row + size * 3]);
            }
            RgbImage {
                width: size,
                height: size,
                pixels,
            }
        };
        let run = |t: Transform, seed: u64| {
            let mut out = vec![0.0; 3 * size * size];
            t.apply(
                &pixels(image.clone()),
                &mut StdRng::seed_from_u64(seed),
                mean,
                std,
                &mut out,
            )
            .unwrap();
            out
        };
        let close = |got: &[f32], want: &RgbImage, flip: bool| {
            let mut expected = vec![0.0; got.len()];
            write_normalised(want, flip, mean, std, &mut expected);
            let worst = got
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0, f32::max);
            assert!(worst <= 2.5 / 255.0, "max difference {worst}");
        };
        close(&run(Transform::WsolEval { size }, 0), &crop(2, 2), false);
        let mut offsets = std::collections::BTreeSet::new();
        for seed in 0..64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let (top, left) = (rng.random_range(0..=4), rng.random_range(0..=4));
            let flip = rng.random_bool(0.5);
            offsets.insert((top, left));
            close(
                &run(Transform::WsolTrain { size }, seed),
                &crop(top, left),
                flip,
            );
        }
        assert!(offsets.len() > 15, "crops at {offsets:?}");
    }

    fn gradient(width: usize, height: usize) -> RgbImage {
        let pixels = (0..width * height)
            .flat_map(|i| [(i % 256) as u8, (i / 256) as u8, 7])
            .collect();
        RgbImage {
            width,
            height,
            pixels,
        }
    }

    fn pixels(image: RgbImage) -> Sample {
        Sample::Pixels(image)
    }

    #[test]
    fn colour_runs_after_crop_and_flip_on_the_unnormalised_image() {
        let image = gradient(40, 30);
        let (mean, std) = (IMAGENET_MEAN, IMAGENET_STD);
        let color = ColorAugment {
            jitter: 0.4,
            lighting: 0.1,
        };
        let mut ours = vec![0.0; 3 * 16 * 16];
        Transform::ImageNetTrain { size: 16, color }
            .apply(
                &pixels(image.clone()),
                &mut StdRng::seed_from_u64(9),
                mean,
                std,
                &mut ours,
            )
            .unwrap();
        // Replayed by hand: the same crop and flip draws, ToTensor, colour, normalise.
        let mut rng = StdRng::seed_from_u64(9);
        let (top, left, h, w) = random_resized_crop_box(40, 30, &mut rng);
        let flip = rng.random_bool(0.5);
        let window = Window {
            left: left as f64,
            top: top as f64,
            width: w as f64,
            height: h as f64,
        };
        let square = resize_window(&image, window, 16, 16);
        let mut expected = vec![0.0; 3 * 16 * 16];
        write_normalised(&square, flip, [0.0; 3], [1.0; 3], &mut expected);
        color.apply(&mut expected, &mut rng);
        for (i, v) in expected.iter_mut().enumerate() {
            let c = i / 256;
            *v = (*v - mean[c]) / std[c];
        }
        assert_eq!(ours, expected);

        let mut plain = vec![0.0; 3 * 16 * 16];
        Transform::ImageNetTrain {
            size: 16,
            color: ColorAugment::default(),
        }
        .apply(
            &pixels(image),
            &mut StdRng::seed_from_u64(9),
            mean,
            std,
            &mut plain,
        )
        .unwrap();
        assert_ne!(plain, ours);
    }

    #[test]
    fn cifar_crop_offsets_cover_every_position_and_padding_is_zero() {
        let image = gradient(32, 32);
        let transform = Transform::CifarTrain {
            size: 32,
            padding: 4,
            pad: Pad::Zeros,
        };
        let mut zero_rows_seen = std::collections::BTreeSet::new();
        let mut out = vec![0.0; 3 * 32 * 32];
        for seed in 0..400 {
            let mut rng = StdRng::seed_from_u64(seed);
            transform
                .apply(
                    &pixels(image.clone()),
                    &mut rng,
                    [0.0; 3],
                    [1.0 / 255.0; 3],
                    &mut out,
                )
                .unwrap();
            // Blue is 7 everywhere inside the image and 0 in the padding.
            let top_zero_rows = (0..32)
                .take_while(|&y| out[2 * 1024 + y * 32 + 16] == 0.0)
                .count();
            zero_rows_seen.insert(top_zero_rows);
        }
        // top offset 0..=8 gives 4..=0 padded rows at the top (and more at the bottom).
        assert_eq!(zero_rows_seen, (0..=4).collect());
    }

    /// Every pad mode against its definition on a 3x3 image padded by 4 (wider than the
    /// image, so reflection folds back): numpy's `pad` modes `constant`, `reflect`, `edge`.
    #[test]
    fn pad_modes_fill_the_border_as_numpy_pads() {
        let image = RgbImage {
            width: 3,
            height: 3,
            pixels: (0..9).flat_map(|v| [v as u8 * 10, 1, 2]).collect(),
        };
        // numpy.pad(np.arange(3), 4, mode) for the index each padded column reads.
        let reflect = [0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2];
        let edge = [0, 0, 0, 0, 0, 1, 2, 2, 2, 2, 2];
        let crop = Crop {
            padding: 4,
            top: 0,
            left: 0,
            size: 11,
        };
        for (pad, table) in [
            (Pad::Reflect, Some(reflect)),
            (Pad::Edge, Some(edge)),
            (Pad::Zeros, None),
            (Pad::Mean, None),
        ] {
            let out = padded_crop(
                &image,
                crop,
                Border {
                    pad,
                    mean: [7, 8, 9],
                },
            );
            for y in 0..11 {
                for x in 0..11 {
                    let got = &out.pixels[(y * 11 + x) * 3..(y * 11 + x) * 3 + 3];
                    let inside = (4..7).contains(&y) && (4..7).contains(&x);
                    let want: [u8; 3] = match (table, inside) {
                        (Some(t), _) => [(t[y] * 3 + t[x]) as u8 * 10, 1, 2],
                        (None, true) => [((y - 4) * 3 + x - 4) as u8 * 10, 1, 2],
                        (None, false) if pad == Pad::Mean => [7, 8, 9],
                        (None, false) => [0, 0, 0],
                    };
                    assert_eq!(got, want, "{pad:?} at ({y}, {x})");
                }
            }
        }
    }

    #[test]
    fn normalisation_uses_mean_and_std() {
        let image = RgbImage {
            width: 1,
            height: 1,
            pixels: vec![255, 0, 51],
        };
        let mut out = vec![0.0; 3];
        Transform::CifarEval { size: 1 }
            .apply(
                &pixels(image),
                &mut StdRng::seed_from_u64(0),
                [0.5, 0.5, 0.0],
                [0.5, 0.25, 0.2],
                &mut out,
            )
            .unwrap();
        let expected = [1.0, -2.0, 1.0];
        for (a, b) in out.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{out:?}");
        }
    }

    #[test]
    fn random_resized_crop_stays_inside_the_image() {
        let mut rng = StdRng::seed_from_u64(3);
        for (w, h) in [(500, 375), (64, 300), (300, 64), (224, 224)] {
            for _ in 0..200 {
                let (top, left, ch, cw) = random_resized_crop_box(w, h, &mut rng);
                assert!(ch > 0 && cw > 0 && top + ch <= h && left + cw <= w);
            }
        }
    }

    /// A JPEG of smooth content: a reduced decode is close to the full one.
    fn jpeg(width: u32, height: u32) -> Sample {
        let image = image::RgbImage::from_fn(width, height, |x, y| {
            let v = |a: f32| (127.0 + 120.0 * a.sin()) as u8;
            image::Rgb([
                v(x as f32 / 40.0),
                v(y as f32 / 30.0),
                v((x + y) as f32 / 70.0),
            ])
        });
        let mut bytes = Vec::new();
        image
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        Sample::File(crate::Encoded::new("smooth.jpg", bytes))
    }

    #[test]
    fn reduced_decoding_gives_nearly_the_full_size_result() {
        let sample = jpeg(1000, 760);
        for transform in [
            Transform::ImageNetEval { size: 112 },
            Transform::ImageNetTrain {
                size: 112,
                color: ColorAugment::default(),
            },
        ] {
            for seed in 0..5 {
                let run = |reduce: usize| {
                    let mut out = vec![0.0; 3 * 112 * 112];
                    transform
                        .apply_reducing(
                            &sample,
                            reduce,
                            &mut StdRng::seed_from_u64(seed),
                            [0.0; 3],
                            [1.0 / 255.0; 3],
                            &mut out,
                        )
                        .unwrap();
                    out
                };
                let (full, reduced) = (run(1), run(MAX_REDUCTION));
                let mean_diff = full
                    .iter()
                    .zip(&reduced)
                    .map(|(a, b)| (a - b).abs())
                    .sum::<f32>()
                    / full.len() as f32;
                assert!(
                    mean_diff < 3.0,
                    "{transform:?} seed {seed}: {mean_diff} levels"
                );
            }
        }
    }

    #[test]
    fn validation_window_is_torchvisions_resize_then_centre_crop() {
        // 300 x 200 -> Resize(256) gives 384 x 256; CenterCrop(224) starts at (80, 16).
        // Red rises linearly with x: 2/3 per pixel.
        let image = RgbImage {
            width: 300,
            height: 200,
            pixels: (0..300 * 200)
                .flat_map(|i| [((i % 300) * 2 / 3) as u8, 0, 0])
                .collect(),
        };
        let mut out = vec![0.0; 3 * 224 * 224];
        Transform::ImageNetEval { size: 224 }
            .apply(
                &pixels(image),
                &mut StdRng::seed_from_u64(0),
                [0.0; 3],
                [1.0 / 255.0; 3],
                &mut out,
            )
            .unwrap();
        // The crop's first column is centred on source x = 80.5 * 300 / 384 (pixel centres at
        // i + 0.5).
        let first = out[112 * 224];
        let expected = (80.5 * 300.0 / 384.0 - 0.5) * 2.0 / 3.0;
        assert!((first - expected).abs() < 1.5, "{first} vs {expected}");
    }
}
