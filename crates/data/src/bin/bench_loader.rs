//! The Rust side of the loader benchmark (`scripts/bench_loader.sh` runs it beside
//! torchvision's `ImageFolder` on the same files).
//!
//! ```text
//! cargo run --release --bin bench_loader -- --folder DIR [--cifar DIR] [--limit N] [--batch B]
//! cargo run --release --bin bench_loader -- --folder DIR --epoch [--workers W] [--batches N]
//! ```
//!
//! Without `--epoch`: decode-only rates for each JPEG decoder, then each pipeline on one thread
//! (file read, decode, transform, batch assembly), one JSON line each:
//! `{"pipeline", "images", "seconds", "img_per_s"}`. With `--epoch`: one epoch of the
//! training loader with `W` worker threads (or its first `N` batches), and the process's peak
//! resident memory.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use cutmix_data::{
    CIFAR_MEAN, CIFAR_STD, Cifar, CifarKind, ColorAugment, Dataset, IMAGENET_MEAN, IMAGENET_STD,
    ImageFolder, Loader, LoaderConfig, MAX_REDUCTION, Sample, Split, Stream, Transform, keyed_rng,
    peak_rss_mib,
};

struct Args {
    folder: PathBuf,
    cifar: Option<PathBuf>,
    limit: usize,
    batch: usize,
    epoch: bool,
    workers: usize,
    /// With `--epoch`: stop after this many batches (0: the whole epoch), so folders of
    /// different sizes can be compared on the same work.
    batches: usize,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        folder: PathBuf::new(),
        cifar: None,
        limit: 0,
        batch: 64,
        epoch: false,
        workers: 2,
        batches: 0,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        let number = |v: String| v.parse::<usize>().map_err(|e| format!("{flag} {v}: {e}"));
        match flag.as_str() {
            "--folder" => args.folder = value()?.into(),
            "--cifar" => args.cifar = Some(value()?.into()),
            "--limit" => args.limit = number(value()?)?,
            "--batch" => args.batch = number(value()?)?,
            "--workers" => args.workers = number(value()?)?,
            "--batches" => args.batches = number(value()?)?,
            "--epoch" => args.epoch = true,
            other => return Err(format!("unknown argument {other} (see the file's header)")),
        }
    }
    if args.folder.as_os_str().is_empty() {
        return Err("--folder DIR is required (an image folder: <class>/<image>)".into());
    }
    Ok(args)
}

fn report(pipeline: &str, images: usize, seconds: f64) {
    println!(
        "{{\"pipeline\": \"{pipeline}\", \"images\": {images}, \"seconds\": {seconds:.3}, \"img_per_s\": {:.1}}}",
        images as f64 / seconds
    );
}

/// Prepares `n` examples in batches on this thread, as a loader worker does, and returns the
/// seconds taken.
fn run_batches(
    dataset: &dyn Dataset,
    n: usize,
    batch: usize,
    prepare: &dyn Fn(&Sample, u64, &mut [f32]),
    per_image: usize,
) -> f64 {
    let start = Instant::now();
    for first in (0..n).step_by(batch) {
        let count = batch.min(n - first);
        let mut images = vec![0.0f32; count * per_image];
        for slot in 0..count {
            let (sample, _) = dataset.get(first + slot).expect("readable benchmark image");
            prepare(
                &sample,
                (first + slot) as u64,
                &mut images[slot * per_image..(slot + 1) * per_image],
            );
        }
        std::hint::black_box(&images);
    }
    start.elapsed().as_secs_f64()
}

fn decoders(folder: &ImageFolder, n: usize) {
    let files: Vec<Vec<u8>> = (0..n)
        .map(|i| std::fs::read(folder.path(i)).expect("readable benchmark image"))
        .collect();
    let time = |name: &str, decode: &dyn Fn(&[u8]) -> usize| {
        let start = Instant::now();
        let pixels: usize = files.iter().map(|b| decode(b)).sum();
        std::hint::black_box(pixels);
        report(name, files.len(), start.elapsed().as_secs_f64());
    };
    time("decode zune-jpeg (image crate)", &|b| {
        image::load_from_memory(b)
            .expect("decodes")
            .into_rgb8()
            .len()
    });
    time("decode jpeg-decoder", &|b| {
        jpeg_decoder::Decoder::new(b)
            .decode()
            .expect("decodes")
            .len()
    });
    for reduce in [2u16, 4, 8] {
        time(&format!("decode jpeg-decoder 1/{reduce}"), &|b| {
            let mut decoder = jpeg_decoder::Decoder::new(b);
            decoder.read_info().expect("a header");
            let info = decoder.info().expect("a header");
            decoder
                .scale(info.width / reduce, info.height / reduce)
                .expect("scales");
            decoder.decode().expect("decodes").len()
        });
    }
}

fn pipelines(args: &Args) -> Result<(), String> {
    let folder = ImageFolder::open(&args.folder, None).map_err(|e| e.to_string())?;
    let n = if args.limit == 0 {
        folder.len()
    } else {
        args.limit.min(folder.len())
    };
    decoders(&folder, n);
    let reference = ColorAugment {
        jitter: 0.4,
        lighting: 0.1,
    };
    let cases = [
        (
            "imagenet-train",
            Transform::ImageNetTrain {
                size: 224,
                color: reference,
            },
            MAX_REDUCTION,
        ),
        (
            "imagenet-train full-size decode",
            Transform::ImageNetTrain {
                size: 224,
                color: reference,
            },
            1,
        ),
        (
            "imagenet-train-plain",
            Transform::ImageNetTrain {
                size: 224,
                color: ColorAugment::default(),
            },
            MAX_REDUCTION,
        ),
        (
            "imagenet-val",
            Transform::ImageNetEval { size: 224 },
            MAX_REDUCTION,
        ),
        (
            "imagenet-val full-size decode",
            Transform::ImageNetEval { size: 224 },
            1,
        ),
    ];
    for (name, transform, reduce) in cases {
        let prepare = |sample: &Sample, index: u64, out: &mut [f32]| {
            let mut rng = keyed_rng(0, Stream::Transform, 0, index);
            transform
                .apply_reducing(sample, reduce, &mut rng, IMAGENET_MEAN, IMAGENET_STD, out)
                .expect("benchmark images decode");
        };
        let per_image = 3 * 224 * 224;
        run_batches(&folder, n.min(32), args.batch, &prepare, per_image);
        let seconds = run_batches(&folder, n, args.batch, &prepare, per_image);
        report(name, n, seconds);
    }
    if let Some(root) = &args.cifar {
        let cifar =
            Cifar::load(CifarKind::Cifar10, root, Split::Train).map_err(|e| e.to_string())?;
        let transform = Transform::CifarTrain {
            size: 32,
            padding: 4,
            pad: cutmix_data::Pad::Zeros,
        };
        let prepare = |sample: &Sample, index: u64, out: &mut [f32]| {
            let mut rng = keyed_rng(0, Stream::Transform, 0, index);
            transform
                .apply(sample, &mut rng, CIFAR_MEAN, CIFAR_STD, out)
                .expect("CIFAR records decode");
        };
        let seconds = run_batches(&cifar, cifar.len(), args.batch, &prepare, 3 * 32 * 32);
        report("cifar-train", cifar.len(), seconds);
    }
    Ok(())
}

fn epoch(args: &Args) -> Result<(), String> {
    let folder = ImageFolder::open(&args.folder, None).map_err(|e| e.to_string())?;
    let images = folder.len();
    let loader = Loader::new(
        Arc::new(folder),
        None,
        Transform::ImageNetTrain {
            size: 224,
            color: ColorAugment {
                jitter: 0.4,
                lighting: 0.1,
            },
        },
        IMAGENET_MEAN,
        IMAGENET_STD,
        LoaderConfig {
            batch_size: args.batch,
            shuffle: true,
            drop_last: false,
            workers: args.workers,
            prefetch: 4,
            seed: 0,
            strict: false,
        },
    );
    let start = Instant::now();
    let mut seen = 0;
    let batches = if args.batches == 0 {
        usize::MAX
    } else {
        args.batches
    };
    for batch in loader.epoch(0).take(batches) {
        seen += batch.map_err(|e| e.to_string())?.len();
    }
    let seconds = start.elapsed().as_secs_f64();
    println!(
        "{{\"pipeline\": \"epoch\", \"workers\": {}, \"images\": {seen}, \"folder_images\": {images}, \"seconds\": {seconds:.3}, \"img_per_s\": {:.1}, \"peak_rss_mib\": {:.1}}}",
        args.workers,
        seen as f64 / seconds,
        peak_rss_mib().unwrap_or(0.0)
    );
    Ok(())
}

fn main() {
    let result = parse_args().and_then(|args| {
        if args.epoch {
            epoch(&args)
        } else {
            pipelines(&args)
        }
    });
    if let Err(message) = result {
        eprintln!("error: {message}");
        std::process::exit(2);
    }
}
