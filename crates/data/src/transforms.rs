//! Host-side image transforms, ending in a normalised `[3][size][size]` f32 image.

use image::imageops::{self, FilterType};
use rand::{Rng, RngExt};

use crate::RgbImage;
use crate::color::ColorAugment;

/// The CIFAR normalisation of the CutMix reference: (125.3, 123.0, 113.9) / 255.
pub const CIFAR_MEAN: [f32; 3] = [125.3 / 255.0, 123.0 / 255.0, 113.9 / 255.0];
/// The CIFAR standard deviations of the CutMix reference: (63.0, 62.1, 66.7) / 255.
pub const CIFAR_STD: [f32; 3] = [63.0 / 255.0, 62.1 / 255.0, 66.7 / 255.0];
/// torchvision's ImageNet mean.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// torchvision's ImageNet standard deviation.
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// A transform from a decoded image to a normalised square image of `size`.
#[derive(Clone, Debug, PartialEq)]
pub enum Transform {
    /// Zero-pad by `padding`, random `size` crop, random horizontal flip (CIFAR training).
    CifarTrain { size: usize, padding: usize },
    /// The image as it is, resized to `size` if it is not already (CIFAR evaluation).
    CifarEval { size: usize },
    /// torchvision's `RandomResizedCrop(size)` (scale 0.08-1, ratio 3/4-4/3), a random
    /// horizontal flip, then the reference's colour jitter and PCA lighting (`color`).
    ImageNetTrain { size: usize, color: ColorAugment },
    /// Resize the shorter side to `size * 256 / 224`, then a centre crop of `size`.
    ImageNetEval { size: usize },
}

impl Transform {
    /// Side of the output image.
    pub fn size(&self) -> usize {
        match *self {
            Self::CifarTrain { size, .. }
            | Self::CifarEval { size }
            | Self::ImageNetTrain { size, .. }
            | Self::ImageNetEval { size } => size,
        }
    }

    /// Transforms `image` and writes it, normalised with `mean` / `std`, into `out`
    /// (`3 * size * size` values, channel-major).
    pub fn apply(
        &self,
        image: &RgbImage,
        rng: &mut impl Rng,
        mean: [f32; 3],
        std: [f32; 3],
        out: &mut [f32],
    ) {
        let mut color = ColorAugment::default();
        let (square, flip) = match *self {
            Self::CifarTrain { size, padding } => {
                let image = resize_exact(image, size, size);
                let top = rng.random_range(0..=2 * padding);
                let left = rng.random_range(0..=2 * padding);
                let flip = rng.random_bool(0.5);
                (padded_crop(&image, padding, top, left, size), flip)
            }
            Self::CifarEval { size } => (resize_exact(image, size, size), false),
            Self::ImageNetTrain {
                size,
                color: augment,
            } => {
                let (top, left, h, w) = random_resized_crop_box(image.width, image.height, rng);
                let flip = rng.random_bool(0.5);
                color = augment;
                (crop_resize(image, top, left, h, w, size, size), flip)
            }
            Self::ImageNetEval { size } => {
                let short = size * 256 / 224;
                let (w, h) = if image.width <= image.height {
                    (
                        short,
                        (image.height * short).div_ceil(image.width).max(short),
                    )
                } else {
                    (
                        (image.width * short).div_ceil(image.height).max(short),
                        short,
                    )
                };
                let resized = resize_exact(image, w, h);
                let top = (h - size) / 2;
                let left = (w - size) / 2;
                (
                    crop_resize(&resized, top, left, size, size, size, size),
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
    }
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

fn to_buffer(image: &RgbImage) -> image::RgbImage {
    image::RgbImage::from_raw(
        image.width as u32,
        image.height as u32,
        image.pixels.clone(),
    )
    .expect("pixel buffer matches the image size")
}

fn from_buffer(buffer: image::RgbImage) -> RgbImage {
    RgbImage {
        width: buffer.width() as usize,
        height: buffer.height() as usize,
        pixels: buffer.into_raw(),
    }
}

/// Bilinear resize to exactly `width x height` (a copy when the size already matches).
fn resize_exact(image: &RgbImage, width: usize, height: usize) -> RgbImage {
    if image.width == width && image.height == height {
        return image.clone();
    }
    from_buffer(imageops::resize(
        &to_buffer(image),
        width as u32,
        height as u32,
        FilterType::Triangle,
    ))
}

/// The `h x w` window at `(top, left)`, resized bilinearly to `out_w x out_h`.
fn crop_resize(
    image: &RgbImage,
    top: usize,
    left: usize,
    h: usize,
    w: usize,
    out_w: usize,
    out_h: usize,
) -> RgbImage {
    let buffer = to_buffer(image);
    let window = imageops::crop_imm(&buffer, left as u32, top as u32, w as u32, h as u32);
    if w == out_w && h == out_h {
        return from_buffer(window.to_image());
    }
    from_buffer(imageops::resize(
        &*window,
        out_w as u32,
        out_h as u32,
        FilterType::Triangle,
    ))
}

/// The `size x size` window at `(top, left)` of the image zero-padded by `padding` on each side.
fn padded_crop(image: &RgbImage, padding: usize, top: usize, left: usize, size: usize) -> RgbImage {
    let mut pixels = vec![0u8; size * size * 3];
    for y in 0..size {
        let src_y = (y + top) as isize - padding as isize;
        if src_y < 0 || src_y >= image.height as isize {
            continue;
        }
        for x in 0..size {
            let src_x = (x + left) as isize - padding as isize;
            if src_x < 0 || src_x >= image.width as isize {
                continue;
            }
            let src = (src_y as usize * image.width + src_x as usize) * 3;
            let dst = (y * size + x) * 3;
            pixels[dst..dst + 3].copy_from_slice(&image.pixels[src..src + 3]);
        }
    }
    RgbImage {
        width: size,
        height: size,
        pixels,
    }
}

/// Writes `(pixel / 255 - mean) / std` channel-major into `out`, mirrored when `flip`.
fn write_normalised(image: &RgbImage, flip: bool, mean: [f32; 3], std: [f32; 3], out: &mut [f32]) {
    let (w, h) = (image.width, image.height);
    assert_eq!(out.len(), 3 * w * h, "output buffer size");
    for c in 0..3 {
        let scale = 1.0 / (255.0 * std[c]);
        let shift = mean[c] / std[c];
        for y in 0..h {
            for x in 0..w {
                let src_x = if flip { w - 1 - x } else { x };
                let value = image.pixels[(y * w + src_x) * 3 + c];
                out[(c * h + y) * w + x] = f32::from(value) * scale - shift;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

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

    #[test]
    fn colour_runs_after_crop_and_flip_on_the_unnormalised_image() {
        let image = gradient(40, 30);
        let (mean, std) = (IMAGENET_MEAN, IMAGENET_STD);
        let color = ColorAugment {
            jitter: 0.4,
            lighting: 0.1,
        };
        let mut ours = vec![0.0; 3 * 16 * 16];
        Transform::ImageNetTrain { size: 16, color }.apply(
            &image,
            &mut StdRng::seed_from_u64(9),
            mean,
            std,
            &mut ours,
        );
        // Replayed by hand: the same crop and flip draws, ToTensor, colour, normalise.
        let mut rng = StdRng::seed_from_u64(9);
        let (top, left, h, w) = random_resized_crop_box(40, 30, &mut rng);
        let flip = rng.random_bool(0.5);
        let square = crop_resize(&image, top, left, h, w, 16, 16);
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
        .apply(&image, &mut StdRng::seed_from_u64(9), mean, std, &mut plain);
        assert_ne!(plain, ours);
    }

    #[test]
    fn cifar_crop_offsets_cover_every_position_and_padding_is_zero() {
        let image = gradient(32, 32);
        let transform = Transform::CifarTrain {
            size: 32,
            padding: 4,
        };
        let mut zero_rows_seen = std::collections::BTreeSet::new();
        let mut out = vec![0.0; 3 * 32 * 32];
        for seed in 0..400 {
            let mut rng = StdRng::seed_from_u64(seed);
            transform.apply(&image, &mut rng, [0.0; 3], [1.0 / 255.0; 3], &mut out);
            // Blue is 7 everywhere inside the image and 0 in the padding.
            let top_zero_rows = (0..32)
                .take_while(|&y| out[2 * 1024 + y * 32 + 16] == 0.0)
                .count();
            zero_rows_seen.insert(top_zero_rows);
        }
        // top offset 0..=8 gives 4..=0 padded rows at the top (and more at the bottom).
        assert_eq!(zero_rows_seen, (0..=4).collect());
    }

    #[test]
    fn normalisation_uses_mean_and_std() {
        let image = RgbImage {
            width: 1,
            height: 1,
            pixels: vec![255, 0, 51],
        };
        let mut out = vec![0.0; 3];
        Transform::CifarEval { size: 1 }.apply(
            &image,
            &mut StdRng::seed_from_u64(0),
            [0.5, 0.5, 0.0],
            [0.5, 0.25, 0.2],
            &mut out,
        );
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
        let image = gradient(300, 200);
        let mut out = vec![0.0; 3 * 224 * 224];
        Transform::ImageNetEval { size: 224 }.apply(&image, &mut rng, [0.0; 3], [1.0; 3], &mut out);
    }
}
