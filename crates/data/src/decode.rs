//! Image files to RGB: JPEG through zune-jpeg (the `image` crate's decoder; the fastest pure-Rust
//! decoder measured here, see BENCHMARKS.md), PNG through `png`, at a reduced scale when the
//! caller needs fewer pixels than the file has.
//!
//! Grayscale, grayscale + alpha, RGBA, 16-bit and CMYK images come out as 8-bit RGB (alpha is
//! dropped, as PIL's `convert("RGB")` in torchvision's loader does). A file that cannot be
//! decoded, or whose size is past [`MAX_PIXELS`], is an error naming it; so is a decoder
//! panic, so one bad file never takes a loader thread down.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use image::{ImageFormat, ImageReader, Limits};

use crate::error::panic_message;
use crate::{DataError, RgbImage};

/// The most pixels an image may decode to: PIL's `DecompressionBombError` threshold
/// (2 x `Image.MAX_IMAGE_PIXELS`). A larger JPEG is still read when a reduced scale brings it
/// under this.
pub const MAX_PIXELS: u64 = 178_956_970;

/// The reductions a JPEG can be decoded at (1/1, 1/2, 1/4, 1/8: a smaller inverse DCT).
const JPEG_REDUCTIONS: [usize; 4] = [1, 2, 4, 8];

/// An image file's bytes, not decoded yet.
#[derive(Clone, Debug)]
pub struct Encoded {
    pub path: PathBuf,
    pub bytes: Vec<u8>,
    /// Width and height, once the header has been read.
    size: OnceLock<(usize, usize)>,
}

/// An example as a dataset hands it out: pixels already in memory (CIFAR) or a file to decode.
#[derive(Clone, Debug)]
pub enum Sample {
    Pixels(RgbImage),
    File(Encoded),
}

impl Sample {
    /// Width and height of the full-size image (read from the header for a file).
    pub fn dimensions(&self) -> Result<(usize, usize), DataError> {
        match self {
            Self::Pixels(image) => Ok((image.width, image.height)),
            Self::File(file) => file.dimensions(),
        }
    }

    /// The image, decoded at `1 / reduce` of its size or larger (`reduce = 1`: full size).
    pub fn decode(&self, reduce: usize) -> Result<RgbImage, DataError> {
        match self {
            Self::Pixels(image) => Ok(image.clone()),
            Self::File(file) => file.decode(reduce),
        }
    }

    /// The largest reduction, at most `reduce`, this sample can be decoded at: a power of two
    /// up to 8 for a JPEG with RGB or gray pixels, else 1.
    pub fn supported_reduction(&self, reduce: usize) -> usize {
        match self {
            Self::Pixels(_) => 1,
            Self::File(file) => file.supported_reduction(reduce),
        }
    }
}

impl Encoded {
    /// A file's bytes, as read from `path`.
    pub fn new(path: impl Into<PathBuf>, bytes: Vec<u8>) -> Self {
        Self {
            path: path.into(),
            bytes,
            size: OnceLock::new(),
        }
    }

    /// Reads a whole file.
    pub fn read(path: &Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
        Ok(Self::new(path, bytes))
    }

    fn is_jpeg(&self) -> bool {
        self.bytes.starts_with(&[0xFF, 0xD8, 0xFF])
    }

    /// The largest reduction, at most `reduce`, this file can be decoded at.
    fn supported_reduction(&self, reduce: usize) -> usize {
        if !self.is_jpeg() {
            return 1;
        }
        JPEG_REDUCTIONS
            .into_iter()
            .rev()
            .find(|&r| r <= reduce)
            .unwrap_or(1)
    }

    fn error(&self, reason: impl Into<String>) -> DataError {
        DataError::Decode {
            path: self.path.clone(),
            reason: reason.into(),
        }
    }

    fn reader(&self) -> Result<ImageReader<Cursor<&[u8]>>, DataError> {
        let mut reader = ImageReader::new(Cursor::new(self.bytes.as_slice()))
            .with_guessed_format()
            .map_err(|e| self.error(e.to_string()))?;
        if reader.format().is_none() {
            reader.set_format(ImageFormat::from_path(&self.path).map_err(|_| {
                self.error("not a JPEG or PNG file (unrecognised header and extension)")
            })?);
        }
        Ok(reader)
    }

    /// Width and height from the file's header.
    pub fn dimensions(&self) -> Result<(usize, usize), DataError> {
        if let Some(&size) = self.size.get() {
            return Ok(size);
        }
        let size = self.guard(|| {
            let (w, h) = self
                .reader()?
                .into_dimensions()
                .map_err(|e| self.error(e.to_string()))?;
            if w == 0 || h == 0 {
                return Err(self.error(format!("image is {w} x {h} pixels")));
            }
            Ok((w as usize, h as usize))
        })?;
        Ok(*self.size.get_or_init(|| size))
    }

    /// Decodes to 8-bit RGB at `1 / reduce` of the full size or larger; `reduce` is rounded
    /// down to what the file supports ([`Sample::supported_reduction`]).
    pub fn decode(&self, reduce: usize) -> Result<RgbImage, DataError> {
        self.guard(|| {
            let (w, h) = self.dimensions()?;
            let reduce = self.supported_reduction(reduce);
            let pixels = (w.div_ceil(reduce) * h.div_ceil(reduce)) as u64;
            if pixels > MAX_PIXELS {
                return Err(self.error(format!(
                    "image is {w} x {h} pixels, more than the {MAX_PIXELS} allowed (a decompression bomb?)"
                )));
            }
            if self.is_jpeg() && !jpeg_has_end(&self.bytes) {
                return Err(self.error(
                    "truncated JPEG: no end-of-image marker after the image data",
                ));
            }
            if reduce > 1
                && let Some(image) = self.decode_jpeg_reduced(w, h, reduce)?
            {
                return Ok(image);
            }
            // At full size (no reduction, or a CMYK / 16-bit JPEG the scaled decoder declines).
            if (w * h) as u64 > MAX_PIXELS {
                return Err(self.error(format!(
                    "image is {w} x {h} pixels, more than the {MAX_PIXELS} allowed at full size (a decompression bomb?)"
                )));
            }
            let mut reader = self.reader()?;
            let mut limits = Limits::default();
            limits.max_alloc = Some(MAX_PIXELS * 8);
            reader.limits(limits);
            let decoded = reader
                .decode()
                .map_err(|e| self.error(e.to_string()))?
                .into_rgb8();
            let (width, height) = decoded.dimensions();
            Ok(RgbImage {
                width: width as usize,
                height: height as usize,
                pixels: decoded.into_raw(),
            })
        })
    }

    /// A JPEG decoded with jpeg-decoder's scaled inverse DCT; `None` for pixel formats it
    /// cannot give as RGB (CMYK, 16-bit), which then take the full-size path.
    fn decode_jpeg_reduced(
        &self,
        width: usize,
        height: usize,
        reduce: usize,
    ) -> Result<Option<RgbImage>, DataError> {
        let mut decoder = jpeg_decoder::Decoder::new(self.bytes.as_slice());
        let wanted = |side: usize| u16::try_from(side.div_ceil(reduce)).unwrap_or(u16::MAX);
        let (w, h) = decoder
            .scale(wanted(width), wanted(height))
            .map_err(|e| self.error(e.to_string()))?;
        let format = decoder.info().map(|i| i.pixel_format);
        let gray = match format {
            Some(jpeg_decoder::PixelFormat::RGB24) => false,
            Some(jpeg_decoder::PixelFormat::L8) => true,
            _ => return Ok(None),
        };
        let raw = decoder.decode().map_err(|e| self.error(e.to_string()))?;
        let pixels = if gray {
            raw.iter().flat_map(|&v| [v, v, v]).collect()
        } else {
            raw
        };
        let (w, h) = (usize::from(w), usize::from(h));
        if pixels.len() != w * h * 3 {
            return Err(self.error("decoder returned a short image"));
        }
        Ok(Some(RgbImage {
            width: w,
            height: h,
            pixels,
        }))
    }

    /// Runs `work`, turning a decoder panic into an error naming this file.
    fn guard<T>(&self, work: impl FnOnce() -> Result<T, DataError>) -> Result<T, DataError> {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)).unwrap_or_else(|panic| {
            let message = panic_message(&*panic).unwrap_or_else(|| "unknown".into());
            Err(self.error(format!("the decoder panicked: {message}")))
        })
    }
}

/// Whether a JPEG's image data ends with an end-of-image marker, as a whole file's does: zune-jpeg
/// (like libjpeg) fills a truncated file's missing rows with grey where PIL refuses the file, so
/// truncation is caught here. Walks the marker segments (an EXIF thumbnail inside APP1 has its
/// own markers, so they are skipped by length) to the first scan, then looks for `FF D9` after
/// it; entropy-coded data cannot hold that pair (byte stuffing), so only the real end matches.
fn jpeg_has_end(bytes: &[u8]) -> bool {
    let mut i = 2;
    while i + 4 <= bytes.len() {
        let (tag, marker) = (bytes[i], bytes[i + 1]);
        if tag != 0xFF || marker == 0xFF {
            // Stray bytes between segments, or fill bytes: libjpeg skips them too.
            i += 1;
            continue;
        }
        if (0xD0..=0xD8).contains(&marker) || marker == 0x01 {
            i += 2;
            continue;
        }
        let length = usize::from(u16::from_be_bytes([bytes[i + 2], bytes[i + 3]]));
        if marker == 0xDA {
            return bytes
                .get(i + 2 + length..)
                .is_some_and(|data| data.windows(2).rev().any(|w| w == [0xFF, 0xD9]));
        }
        i += 2 + length;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(image: image::DynamicImage, format: ImageFormat) -> Encoded {
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), format)
            .unwrap();
        Encoded::new(format!("test.{}", format.extensions_str()[0]), bytes)
    }

    fn photo(width: u32, height: u32) -> image::RgbImage {
        image::RgbImage::from_fn(width, height, |x, y| {
            image::Rgb([(x * 3) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
        })
    }

    #[test]
    fn every_pixel_layout_comes_out_as_rgb() {
        let gray = image::GrayImage::from_fn(6, 4, |x, _| image::Luma([x as u8 * 40]));
        let rgba = image::RgbaImage::from_fn(6, 4, |x, _| image::Rgba([x as u8 * 40, 1, 2, 0]));
        let deep = image::ImageBuffer::<image::Rgb<u16>, _>::from_fn(6, 4, |x, _| {
            image::Rgb([x as u16 * 40 * 257, 257, 2 * 257])
        });
        let gray_alpha =
            image::GrayAlphaImage::from_fn(6, 4, |x, _| image::LumaA([x as u8 * 40, 9]));
        for (name, image) in [
            ("gray", image::DynamicImage::ImageLuma8(gray)),
            ("rgba", image::DynamicImage::ImageRgba8(rgba)),
            ("16-bit", image::DynamicImage::ImageRgb16(deep)),
            ("gray+alpha", image::DynamicImage::ImageLumaA8(gray_alpha)),
        ] {
            let file = encode(image, ImageFormat::Png);
            let decoded = file.decode(1).unwrap();
            assert_eq!((decoded.width, decoded.height), (6, 4), "{name}");
            assert_eq!(decoded.pixels[3 * 3], 120, "{name}: red of pixel 3");
        }
        let gray_jpeg = encode(
            image::DynamicImage::ImageLuma8(image::GrayImage::from_pixel(
                16,
                16,
                image::Luma([90]),
            )),
            ImageFormat::Jpeg,
        );
        for reduce in [1, 2] {
            let decoded = gray_jpeg.decode(reduce).unwrap();
            assert!(
                decoded.pixels.iter().all(|&v| v.abs_diff(90) <= 1),
                "reduce {reduce}"
            );
        }
    }

    #[test]
    fn a_cmyk_jpeg_comes_out_as_the_rgb_pil_gives() {
        let file = Encoded::new(
            "cmyk.jpg",
            include_bytes!("../tests/fixtures/cmyk.jpg").to_vec(),
        );
        let expected = include_bytes!("../tests/fixtures/cmyk.rgb");
        for reduce in [1, 8] {
            let decoded = file.decode(reduce).unwrap();
            assert_eq!((decoded.width, decoded.height), (16, 16));
            let worst = decoded
                .pixels
                .iter()
                .zip(expected)
                .map(|(a, b)| a.abs_diff(*b))
                .max()
                .unwrap();
            assert!(
                worst <= 3,
                "reduce {reduce}: off by {worst} levels from PIL"
            );
        }
    }

    #[test]
    fn a_jpeg_decodes_at_a_reduced_scale_close_to_the_downscaled_full_image() {
        let file = encode(
            image::DynamicImage::ImageRgb8(photo(64, 48)),
            ImageFormat::Jpeg,
        );
        assert_eq!(file.dimensions().unwrap(), (64, 48));
        let full = file.decode(1).unwrap();
        for (reduce, (w, h)) in [(2, (32, 24)), (4, (16, 12)), (8, (8, 6)), (16, (8, 6))] {
            let small = file.decode(reduce).unwrap();
            assert_eq!((small.width, small.height), (w, h), "reduce {reduce}");
            // Each reduced pixel is about the mean of the block it stands for.
            let r = 64 / w;
            let mean = |x: usize, y: usize, c: usize| {
                let mut sum = 0.0;
                for dy in 0..r {
                    for dx in 0..r {
                        sum += f64::from(full.pixels[((y * r + dy) * 64 + x * r + dx) * 3 + c]);
                    }
                }
                sum / (r * r) as f64
            };
            let got = f64::from(small.pixels[(2 * w + 3) * 3 + 1]);
            assert!(
                (got - mean(3, 2, 1)).abs() < 12.0,
                "reduce {reduce}: {got} vs {}",
                mean(3, 2, 1)
            );
        }
        let png = encode(
            image::DynamicImage::ImageRgb8(photo(64, 48)),
            ImageFormat::Png,
        );
        assert_eq!(
            png.decode(4).unwrap().width,
            64,
            "PNG has no reduced decode"
        );
    }

    #[test]
    fn bad_files_are_errors_that_name_the_file() {
        let good = encode(
            image::DynamicImage::ImageRgb8(photo(32, 32)),
            ImageFormat::Jpeg,
        );
        let cases = [
            ("garbage", b"this is not an image at all".to_vec()),
            ("empty", Vec::new()),
            ("truncated", good.bytes[..good.bytes.len() / 3].to_vec()),
            ("cut short", good.bytes[..good.bytes.len() - 40].to_vec()),
            ("header only", good.bytes[..200].to_vec()),
        ];
        for (name, bytes) in cases {
            let file = Encoded::new(format!("class/{name}.jpg"), bytes);
            let error = file.decode(1).err().map(|e| e.to_string());
            let error = error.unwrap_or_else(|| panic!("{name} decoded"));
            assert!(error.contains(&format!("class/{name}.jpg")), "{error}");
        }
    }

    #[test]
    fn a_decompression_bomb_is_refused_from_its_header() {
        // A valid PNG header claiming 100000 x 100000 pixels, without the pixels.
        let mut bytes = b"\x89PNG\r\n\x1a\n\0\0\0\x0dIHDR".to_vec();
        bytes.extend(100_000u32.to_be_bytes());
        bytes.extend(100_000u32.to_be_bytes());
        bytes.extend([8, 2, 0, 0, 0]);
        let crc = crc32(&bytes[12..]);
        bytes.extend(crc.to_be_bytes());
        for (kind, data) in [
            (
                &b"IDAT"[..],
                &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01][..],
            ),
            (b"IEND", &[]),
        ] {
            bytes.extend((data.len() as u32).to_be_bytes());
            let start = bytes.len();
            bytes.extend(kind);
            bytes.extend(data);
            let crc = crc32(&bytes[start..]);
            bytes.extend(crc.to_be_bytes());
        }
        let file = Encoded::new("bomb.png", bytes);
        assert_eq!(file.dimensions().unwrap(), (100_000, 100_000));
        let error = file.decode(8).unwrap_err().to_string();
        assert!(
            error.contains("bomb.png") && error.contains("100000 x 100000"),
            "{error}"
        );
    }

    fn crc32(bytes: &[u8]) -> u32 {
        let mut crc = 0xFFFF_FFFFu32;
        for &b in bytes {
            crc ^= u32::from(b);
            for _ in 0..8 {
                crc = if crc & 1 == 1 {
                    (crc >> 1) ^ 0xEDB8_8320
                } else {
                    crc >> 1
                };
            }
        }
        !crc
    }
}
