//! `analyze`: the paper's robustness and uncertainty analyses (Section 4.4, Tables 11 and 12,
//! Figure 5) of one or more weights files on a config's validation split, one subcommand
//! each: `fgsm`, `occlusion`, `between`, `ood`, `calibration`. Each prints one JSON line per
//! weights file (percentages with two decimals) and, with `--figure`, writes a PNG with every
//! file on it. A binary of its own rather than `eval` subcommands: `eval`'s one-line output
//! is a contract scripts rely on, and each analysis has flags of its own.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Result, bail};
use burn::tensor::Device;
use clap::{Parser, Subcommand};
use serde_json::{Value, json};

use cutmix_analysis::calibration::{calibration, fit_temperature};
use cutmix_analysis::ood::Detection;
use cutmix_models::Model;
use cutmix_train::analyze::attack::{Attacker, fgsm_sweep};
use cutmix_train::analyze::between::{Mix, between_sweep, pair_loaders};
use cutmix_train::analyze::figures::{Lines, panel, write_panels, write_reliability};
use cutmix_train::analyze::occlusion::{Fill, Occlusion, occlusion_sweep};
use cutmix_train::analyze::ood::{OodSet, OodSource, Scorer, Scoring};
use cutmix_train::analyze::{Subject, logits_of, percent};
use cutmix_train::config::{BackendChoice, Config};
use cutmix_train::{backend, datasets, weights};

/// Robustness and uncertainty analyses of weights files.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    #[command(subcommand)]
    analysis: Analysis,
}

/// What every analysis takes.
#[derive(clap::Args, Debug)]
struct Common {
    /// The recipe whose model and validation split to use.
    #[arg(long)]
    config: PathBuf,
    /// Weights: safetensors or PyTorch (PyTorch names), or a run's model.bpk. Repeat it to
    /// compare several (a JSON line each, all on one figure).
    #[arg(long, required = true)]
    weights: Vec<PathBuf>,
    /// A name per `--weights`, in order, for the figure's legends and the JSON's `label`
    /// (default: the file's path).
    #[arg(long)]
    label: Vec<String>,
    /// Writes the analysis's figure (PNG).
    #[arg(long, value_name = "FILE.png")]
    figure: Option<PathBuf>,
    /// Overrides any config key by its dotted path (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// Overrides the config's `backend`.
    #[arg(long, value_enum)]
    backend: Option<BackendChoice>,
}

#[derive(Subcommand, Debug)]
enum Analysis {
    /// FGSM (white box, true labels): top-1 accuracy after `x + eps * sign(grad_x CE)`, in
    /// pixel units before normalisation, clipped to [0, 1] (the paper's Table 11: eps 8/255).
    Fgsm {
        #[command(flatten)]
        common: Common,
        /// Attack strengths in [0, 1] pixel units: numbers or fractions, comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "8/255", value_parser = unit_interval)]
        eps: Vec<f32>,
    },
    /// Centre occlusion (a centred s x s hole filled) and boundary occlusion (everything
    /// outside it filled): top-1 error against s (the paper's Figure 5a).
    Occlusion {
        #[command(flatten)]
        common: Common,
        /// Hole sides in pixels, comma-separated (default: 0 to the image side in 8 steps).
        #[arg(long, value_delimiter = ',')]
        sizes: Vec<usize>,
        /// Which occlusions.
        #[arg(
            long,
            value_enum,
            value_delimiter = ',',
            default_value = "centre,boundary"
        )]
        kinds: Vec<Occlusion>,
        /// What fills: raw black pixels (0 before normalisation) or the normalisation's mean
        /// (0 after it).
        #[arg(long, value_enum, default_value = "black")]
        fill: Fill,
    },
    /// In-between-class samples: random validation pairs of different classes mixed by Mixup
    /// and by CutMix's centred box at each lambda; the rate of predicting neither class (the
    /// paper's Figure 5b).
    Between {
        #[command(flatten)]
        common: Common,
        /// Pairs of images of two classes (0: as many as validation images).
        #[arg(long, default_value_t = 0)]
        pairs: usize,
        /// Lambdas: this many points evenly over [0, 1].
        #[arg(long, default_value_t = 11)]
        steps: usize,
    },
    /// Out-of-distribution detection by the maximum softmax probability, the validation
    /// split as in-distribution: TNR at TPR 95%, AUROC, detection accuracy, AUPR-in and
    /// AUPR-out per set and their mean (the paper's Table 12).
    Ood {
        #[command(flatten)]
        common: Common,
        /// Out-of-distribution sets (repeatable): an image folder, a CIFAR .bin file, or
        /// `uniform` / `gaussian` (ODIN's synthetic sets).
        #[arg(long = "ood", required = true, value_name = "SET")]
        ood_sets: Vec<String>,
        /// Softmax temperature (1: the max-softmax baseline; ODIN uses 1000).
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// ODIN's input perturbation in pixel units (0: off; ODIN uses about 0.0014).
        #[arg(long, default_value = "0", value_parser = unit_interval)]
        odin_eps: f32,
        /// Images of each synthetic set (0: as many as the validation split).
        #[arg(long, default_value_t = 0)]
        synthetic_images: usize,
    },
    /// Calibration: ECE (equal-width bins, a sample in (lower, upper]), NLL, Brier score, top-1
    /// error, and a reliability diagram; optionally temperature scaling.
    Calibration {
        #[command(flatten)]
        common: Common,
        /// ECE bins (Guo et al.: 15).
        #[arg(long, default_value_t = 15)]
        bins: usize,
        /// Fit a temperature on the even-numbered validation images and report the
        /// odd-numbered ones before and after it.
        #[arg(long)]
        fit_temperature: bool,
    },
}

/// A number or a fraction (`8/255`) in [0, 1].
fn unit_interval(text: &str) -> Result<f32, String> {
    let value = match text.split_once('/') {
        Some((a, b)) => match (a.trim().parse::<f64>(), b.trim().parse::<f64>()) {
            (Ok(a), Ok(b)) if b != 0.0 => Some(a / b),
            _ => None,
        },
        None => text.trim().parse::<f64>().ok(),
    };
    match value {
        Some(v) if (0.0..=1.0).contains(&v) => Ok(v as f32),
        Some(v) => Err(format!(
            "{v} is not in [0, 1] (pixel units: 8/255 is 0.0314)"
        )),
        None => Err(format!("`{text}` is not a number or a fraction like 8/255")),
    }
}

/// The config, device and loaded files of a run of `analyze`.
struct Session {
    config: Config,
    device: Device,
    common: Common,
}

impl Session {
    fn open(common: Common) -> Result<Self> {
        if !common.label.is_empty() && common.label.len() != common.weights.len() {
            bail!(
                "--label: {} labels for {} --weights files (one each, in order)",
                common.label.len(),
                common.weights.len()
            );
        }
        let mut config = Config::load(&common.config, &common.sets)?;
        if let Some(backend) = common.backend {
            config.backend = backend;
        }
        let backend = backend::select(config.backend)?;
        eprintln!("backend: {}", backend.description);
        Ok(Self {
            config,
            device: backend.device,
            common,
        })
    }

    /// Each weights file's label (`--label`, or its path), path and model, on an autodiff
    /// device (the attacks need input gradients).
    fn models(&self) -> impl Iterator<Item = (String, String, Result<Model>)> + '_ {
        let device = self.device.clone().autodiff();
        self.common
            .weights
            .iter()
            .enumerate()
            .map(move |(i, path)| {
                let shown = path.display().to_string();
                let label = self
                    .common
                    .label
                    .get(i)
                    .cloned()
                    .unwrap_or_else(|| shown.clone());
                (label, shown, weights::load_for(&self.config, &device, path))
            })
    }

    fn subject(&self, model: &Model) -> Subject {
        Subject::new(model, &self.config, &self.device)
    }

    /// The image side of the validation transform.
    fn size(&self) -> usize {
        datasets::eval_transform(&self.config).0.size()
    }
}

fn percents(values: &[f64]) -> Vec<f64> {
    values.iter().copied().map(percent).collect()
}

fn run(args: Args) -> Result<()> {
    match args.analysis {
        Analysis::Fgsm { common, eps } => fgsm(Session::open(common)?, &eps),
        Analysis::Occlusion {
            common,
            sizes,
            kinds,
            fill,
        } => occlusion(Session::open(common)?, sizes, &kinds, fill),
        Analysis::Between {
            common,
            pairs,
            steps,
        } => between(Session::open(common)?, pairs, steps),
        Analysis::Ood {
            common,
            ood_sets,
            temperature,
            odin_eps,
            synthetic_images,
        } => {
            if !(temperature.is_finite() && temperature > 0.0) {
                bail!("--temperature {temperature}: must be a number > 0");
            }
            let options = OodOptions {
                temperature,
                odin_eps,
                synthetic_images,
            };
            ood(Session::open(common)?, &ood_sets, options)
        }
        Analysis::Calibration {
            common,
            bins,
            fit_temperature,
        } => {
            if bins == 0 {
                bail!("--bins 0: calibration needs at least one bin");
            }
            calibrate(Session::open(common)?, bins, fit_temperature)
        }
    }
}

fn fgsm(session: Session, eps: &[f32]) -> Result<()> {
    if eps.is_empty() {
        bail!("--eps: the sweep is empty");
    }
    let val = datasets::build_val(&session.config)?;
    let mut lines: Lines = Vec::new();
    for (name, path, model) in session.models() {
        let model = model?;
        let attacker = Attacker::new(&model, session.config.model.num_classes);
        let sweep = fgsm_sweep(&session.subject(&model), &attacker, &val, eps)?;
        let eps: Vec<f64> = eps
            .iter()
            .map(|&e| (e as f64 * 1e6).round() / 1e6)
            .collect();
        println!(
            "{}",
            json!({
                "analysis": "fgsm",
                "weights": path,
                "label": name,
                "images": sweep.images,
                "eps": eps,
                "top1_acc": percents(&sweep.acc),
                "top1_err": percents(&sweep.acc.iter().map(|a| 1.0 - a).collect::<Vec<_>>()),
                "clean_top1_acc": percent(sweep.clean_acc),
            })
        );
        let mut points = vec![(0.0, percent(sweep.clean_acc))];
        points.extend(
            eps.iter()
                .zip(&sweep.acc)
                .map(|(&e, &a)| (e * 255.0, percent(a))),
        );
        lines.push((name, points));
    }
    if let Some(path) = &session.common.figure {
        let panel = panel("FGSM", "eps (x 1/255)", "top-1 accuracy (%)", &lines);
        write_panels("top-1 accuracy under FGSM", &[panel], path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn occlusion(session: Session, sizes: Vec<usize>, kinds: &[Occlusion], fill: Fill) -> Result<()> {
    let size = session.size();
    let sizes = if sizes.is_empty() {
        (0..=8).map(|k| k * size / 8).collect()
    } else {
        sizes
    };
    if let Some(s) = sizes.iter().find(|&&s| s > size) {
        bail!("--sizes: {s} is larger than the {size}-pixel image");
    }
    if kinds.is_empty() {
        bail!("--kinds: the sweep is empty");
    }
    let val = datasets::build_val(&session.config)?;
    let mut curves: Vec<Lines> = vec![Vec::new(); kinds.len()];
    for (name, path, model) in session.models() {
        let sweep = occlusion_sweep(&session.subject(&model?), &val, kinds, &sizes, fill)?;
        let mut line = json!({
            "analysis": "occlusion",
            "weights": path,
                "label": name,
            "images": sweep.images,
            "fill": fill,
            "sizes": sizes,
        });
        for ((kind, errors), curve) in sweep.errors.iter().zip(&mut curves) {
            let key = format!("{}_top1_err", json!(kind).as_str().unwrap_or("occlusion"));
            line[key] = json!(percents(errors));
            let points = sizes
                .iter()
                .zip(errors)
                .map(|(&s, &e)| (s as f64, percent(e)));
            curve.push((name.clone(), points.collect()));
        }
        println!("{line}");
    }
    if let Some(path) = &session.common.figure {
        let panels: Vec<_> = kinds
            .iter()
            .zip(&curves)
            .map(|(kind, lines)| {
                let title = format!(
                    "{} occlusion ({} fill)",
                    json!(kind).as_str().unwrap_or(""),
                    json!(fill).as_str().unwrap_or("")
                );
                panel(&title, "hole side (pixels)", "top-1 error (%)", lines)
            })
            .collect();
        write_panels("occlusion", &panels, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn between(session: Session, pairs: usize, steps: usize) -> Result<()> {
    if steps < 2 {
        bail!("--steps {steps}: the lambda sweep needs at least 2 points");
    }
    let lambdas: Vec<f64> = (0..steps).map(|k| k as f64 / (steps - 1) as f64).collect();
    let (first, second) = pair_loaders(&session.config, pairs)?;
    let methods = [Mix::Mixup, Mix::Cutmix];
    let mut curves: Vec<Lines> = vec![Vec::new(); 2];
    for (name, path, model) in session.models() {
        let sweep = between_sweep(
            &session.subject(&model?),
            (&first, &second),
            &methods,
            &lambdas,
        )?;
        let mut line = json!({
            "analysis": "between",
            "weights": path,
                "label": name,
            "pairs": sweep.pairs,
            "lambdas": lambdas,
        });
        for ((method, rates), curve) in sweep.neither.iter().zip(&mut curves) {
            let key = format!("{}_neither", json!(method).as_str().unwrap_or("mix"));
            line[key] = json!(percents(rates));
            curve.push((
                name.clone(),
                lambdas
                    .iter()
                    .zip(rates)
                    .map(|(&l, &r)| (l, percent(r)))
                    .collect(),
            ));
        }
        println!("{line}");
    }
    if let Some(path) = &session.common.figure {
        let panels = [
            panel(
                "Mixup: lam x_A + (1 - lam) x_B",
                "lambda",
                "predicting neither class (%)",
                &curves[0],
            ),
            panel(
                "CutMix: x_A with a centred box of x_B",
                "lambda (area of x_A)",
                "predicting neither class (%)",
                &curves[1],
            ),
        ];
        write_panels("in-between-class samples", &panels, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

#[derive(Clone, Copy, Debug)]
struct OodOptions {
    temperature: f32,
    odin_eps: f32,
    synthetic_images: usize,
}

/// Detection metrics as a JSON object of percentages.
fn detection_json(d: &Detection) -> Value {
    json!({
        "tnr_at_tpr95": percent(d.tnr_at_tpr95),
        "auroc": percent(d.auroc),
        "detection_acc": percent(d.detection_acc),
        "aupr_in": percent(d.aupr_in),
        "aupr_out": percent(d.aupr_out),
    })
}

fn ood(session: Session, names: &[String], options: OodOptions) -> Result<()> {
    let config = &session.config;
    let sources: Vec<OodSource> = names
        .iter()
        .map(|s| OodSource::parse(s))
        .collect::<Result<_>>()?;
    let val = datasets::build_val(config)?;
    let synthetic = match options.synthetic_images {
        0 => val.total_len(),
        n => n,
    };
    let sets: Vec<(String, OodSet)> = sources
        .iter()
        .map(|s| Ok((s.name(), OodSet::open(config, s, synthetic)?)))
        .collect::<Result<_>>()?;
    let inside = OodSet::Images(val);
    let mut panels = Vec::new();
    for (name, path, model) in session.models() {
        let model = model?;
        let subject = session.subject(&model);
        let attacker = Attacker::new(&model, config.model.num_classes);
        let scoring = Scoring {
            scorer: Scorer {
                subject: &subject,
                attacker: Some(&attacker),
                temperature: options.temperature,
                odin_eps: options.odin_eps,
            },
            seed: config.seed,
            size: session.size(),
            batch: config.train.batch_size,
        };
        let (in_images, results) = scoring.detect(&inside, &sets)?;
        let mut per_set = serde_json::Map::new();
        for r in &results {
            let mut entry = detection_json(&r.detection);
            entry["images"] = json!(r.images);
            per_set.insert(r.name.clone(), entry);
        }
        let all: Vec<Detection> = results.iter().map(|r| r.detection).collect();
        println!(
            "{}",
            json!({
                "analysis": "ood",
                "weights": path,
                "label": name,
                "in_images": in_images,
                "temperature": options.temperature,
                "odin_eps": (options.odin_eps as f64 * 1e6).round() / 1e6,
                "sets": per_set,
                "mean": detection_json(&Detection::mean(&all)),
            })
        );
        let curves: Lines = results.into_iter().map(|r| (r.name, r.roc)).collect();
        let mut p = panel(
            &format!("ROC: {name}"),
            "false positive rate (OOD kept)",
            "true positive rate (in-distribution kept)",
            &curves,
        );
        p.legend = plotters::prelude::SeriesLabelPosition::LowerRight;
        p.y_range = Some((0.0, 1.0));
        panels.push(p);
    }
    if let Some(path) = &session.common.figure {
        write_panels("out-of-distribution detection (max softmax)", &panels, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn calibration_json(c: &cutmix_analysis::calibration::Calibration, images: usize) -> Value {
    json!({
        "images": images,
        "ece": percent(c.ece),
        "nll": (c.nll * 1e4).round() / 1e4,
        "brier": (c.brier * 1e4).round() / 1e4,
        "top1_err": percent(c.top1_err),
    })
}

/// The even-numbered (`parity` 0) or odd-numbered validation images' logits and labels.
fn every_other(
    logits: &[f32],
    labels: &[usize],
    classes: usize,
    parity: usize,
) -> (Vec<f32>, Vec<usize>) {
    let rows = logits.chunks_exact(classes).zip(labels).enumerate();
    let chosen: Vec<(&[f32], usize)> = rows
        .filter(|(i, _)| i % 2 == parity)
        .map(|(_, (row, &label))| (row, label))
        .collect();
    (
        chosen
            .iter()
            .flat_map(|(row, _)| row.iter().copied())
            .collect(),
        chosen.iter().map(|(_, label)| *label).collect(),
    )
}

/// Temperature scaling fitted on the even-numbered images, the odd-numbered ones before and
/// after it: `temperature`, `held_out_before`, `held_out_after` added to `line`.
fn temperature_scaling(
    line: &mut Value,
    logits: &[f32],
    labels: &[usize],
    classes: usize,
    bins: usize,
) -> Result<()> {
    let (fit_logits, fit_labels) = every_other(logits, labels, classes, 0);
    let (held_logits, held_labels) = every_other(logits, labels, classes, 1);
    if held_labels.is_empty() {
        bail!("--fit-temperature: needs at least 2 validation images");
    }
    let t = fit_temperature(&fit_logits, classes, &fit_labels);
    let held = |t: f64| {
        calibration_json(
            &calibration(&held_logits, classes, &held_labels, t, bins),
            held_labels.len(),
        )
    };
    line["temperature"] = json!((t * 1e4).round() / 1e4);
    line["held_out_before"] = held(1.0);
    line["held_out_after"] = held(t);
    Ok(())
}

fn calibrate(session: Session, bins: usize, fit: bool) -> Result<()> {
    let val = datasets::build_val(&session.config)?;
    let classes = session.config.model.num_classes;
    let mut figures = Vec::new();
    for (name, path, model) in session.models() {
        let (logits, labels) = logits_of(&session.subject(&model?), &val)?;
        let whole = calibration(&logits, classes, &labels, 1.0, bins);
        let mut line = calibration_json(&whole, labels.len());
        line["analysis"] = json!("calibration");
        line["weights"] = json!(path);
        line["label"] = json!(name);
        line["bins"] = json!(bins);
        if fit {
            temperature_scaling(&mut line, &logits, &labels, classes, bins)?;
        }
        println!("{line}");
        figures.push((name, whole));
    }
    if let Some(path) = &session.common.figure {
        write_reliability(&figures, path)?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}

fn main() -> ExitCode {
    backend::quiet_mesa();
    backend::keep_freed_memory();
    match run(cutmix_train::cli::parse::<Args>()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
