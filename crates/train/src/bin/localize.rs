//! `localize`: weakly-supervised localization of a weights file on a config's validation
//! folder against ground-truth boxes, as the paper's Table 9 measures it: the class
//! activation map (CAM) of each image's ground-truth class, upsampled to the crop, min-max
//! normalised, thresholded at `--threshold` of its maximum (the paper: 0.15), the largest
//! 8-connected component's box, IoU >= 0.5 with a ground-truth box. Prints one JSON line per
//! weights file: `{"weights", "images", "threshold", "top1_cls", "top1_loc", "gt_known_loc",
//! "max_box_acc", "max_box_acc_threshold", "max_box_acc_v2"}` (percent).

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use burn::module::Module;
use clap::Parser;

use cutmix_data::BoxTable;
use cutmix_train::backend;
use cutmix_train::cam_figure;
use cutmix_train::config::{BackendChoice, Config, DatasetKind};
use cutmix_train::localize::{Options, localize};
use cutmix_train::weights;

/// Localize objects with class activation maps and score the boxes.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// The recipe whose model and validation images to use (`data.dataset = "imagefolder"`
    /// or `"cub"`).
    #[arg(long)]
    config: PathBuf,
    /// Weights: safetensors or PyTorch (PyTorch names), or a run's model.bpk. Repeat it to
    /// compare several (one JSON line each; their CAMs side by side in --figure).
    #[arg(long, required = true)]
    weights: Vec<PathBuf>,
    /// Ground-truth boxes, one `<image> x0 y0 x1 y1` per line (inclusive pixel corners of the
    /// original image; `<image>` its path under val/, its file name, or its name without the
    /// extension).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["cub", "imagenet_boxes"])]
    boxes: Option<PathBuf>,
    /// CUB-200-2011's folder (images.txt, bounding_boxes.txt); a `cub` config's `data.root`
    /// is the default.
    #[arg(long, value_name = "DIR", conflicts_with = "imagenet_boxes")]
    cub: Option<PathBuf>,
    /// ImageNet's LOC_val_solution.csv.
    #[arg(long, value_name = "FILE")]
    imagenet_boxes: Option<PathBuf>,
    /// CAM threshold, a fraction of each map's maximum (the paper's 0.15).
    #[arg(long, default_value_t = 0.15)]
    threshold: f32,
    /// Spacing of MaxBoxAcc's threshold sweep over [0, 1).
    #[arg(long, default_value_t = 0.01)]
    sweep_step: f32,
    /// Writes a PNG grid of the first validation images: the image with its ground-truth
    /// boxes (green) and the box of its class's CAM (red), that CAM as a heat map, and the
    /// predicted class's CAM.
    #[arg(long, value_name = "FILE.png")]
    figure: Option<PathBuf>,
    /// Images in the figure.
    #[arg(long, default_value_t = 8)]
    figure_images: usize,
    /// Overrides any config key by its dotted path (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Overrides the config's `backend`.
    #[arg(long, value_enum)]
    backend: Option<BackendChoice>,
}

/// The box file the flags name; a `cub` config's own `bounding_boxes.txt` when none does.
fn boxes(args: &Args, config: &Config) -> Result<BoxTable> {
    Ok(match (&args.boxes, &args.cub, &args.imagenet_boxes) {
        (Some(file), None, None) => BoxTable::read_plain(file)?,
        (None, Some(root), None) => BoxTable::read_cub(root)?,
        (None, None, Some(csv)) => BoxTable::read_imagenet(csv)?,
        (None, None, None) if config.data.dataset == DatasetKind::Cub => {
            BoxTable::read_cub(&config.data.root)?
        }
        _ => bail!(
            "give the ground-truth boxes with one of --boxes, --cub or --imagenet-boxes (a `cub` config reads its own)"
        ),
    })
}

fn run(args: Args) -> Result<()> {
    if !(0.0..=1.0).contains(&args.threshold) {
        bail!("--threshold {}: not in [0, 1]", args.threshold);
    }
    if !(args.sweep_step > 0.0 && args.sweep_step < 1.0) {
        bail!("--sweep-step {}: not in (0, 1)", args.sweep_step);
    }
    let mut config = Config::load(&args.config, &args.sets)?;
    let table = boxes(&args, &config)?;
    if let Some(backend) = args.backend {
        config.backend = backend;
    }
    let backend = backend::select(config.backend)?;
    if args.figure.is_some() && args.figure_images == 0 {
        bail!("--figure-images 0: a figure needs at least one image");
    }
    let options = Options {
        threshold: args.threshold,
        sweep_step: args.sweep_step,
        figure_images: if args.figure.is_some() {
            args.figure_images
        } else {
            0
        },
    };
    let mut figures = Vec::new();
    let mut size = 0;
    for (number, path) in args.weights.iter().enumerate() {
        let model = weights::load_for(&config, &backend.device, path)?;
        let found = localize(&model.valid(), &config, &table, options, &backend.device)?;
        if let Some(first) = found.clipped.first().filter(|_| number == 0) {
            eprintln!(
                "warning: {} ground-truth box(es) clipped to the image or crop, e.g. {first}",
                found.clipped.len()
            );
        }
        let s = found.summary;
        let line = serde_json::json!({
            "weights": path.display().to_string(),
            "images": s.images,
            "threshold": (s.threshold as f64 * 1e6).round() / 1e6,
            "top1_cls": round2(s.top1_cls),
            "top1_loc": round2(s.top1_loc),
            "gt_known_loc": round2(s.gt_known_loc),
            "max_box_acc": round2(s.max_box_acc),
            "max_box_acc_threshold": round2(s.max_box_acc_threshold as f64),
            "max_box_acc_v2": round2(s.max_box_acc_v2),
        });
        println!("{line}");
        figures.push(found.figure);
        size = found.size;
    }
    if let Some(path) = &args.figure {
        cam_figure::write(path, &figures, size)?;
        eprintln!(
            "wrote {} image(s) with the CAMs of {} weight file(s) to {}",
            figures[0].len(),
            figures.len(),
            path.display()
        );
    }
    Ok(())
}

/// Percent with two decimals, as the other tools print them.
fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

fn main() -> ExitCode {
    cutmix_train::backend::quiet_mesa();
    cutmix_train::backend::keep_freed_memory();
    match run(cutmix_train::cli::parse::<Args>()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
