//! Out-of-distribution sets and their scores. A set is an image folder (its images directly or
//! one folder down, as ODIN ships TinyImageNet, LSUN and iSUN), a CIFAR binary file, or one of
//! ODIN's synthetic sets: `uniform` (every pixel U(0, 1)) and `gaussian` (clamp(N(0.5, 1), 0,
//! 1)), made at the config's image size and normalised as its images are. An image's score is
//! its maximum softmax probability at `temperature` (Hendrycks & Gimpel 2017 at 1), after
//! ODIN's input perturbation when `odin_eps > 0`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Result, bail};
use rand::RngExt;
use rand_distr::{Distribution, Normal};

use cutmix_data::{Cifar, Dataset, ImageFolder, Loader, Stream, keyed_rng};

use cutmix_analysis::ood::{Detection, roc};

use super::attack::{Attacker, Images, Step, stepped};
use super::{Subject, predictions};
use crate::config::Config;
use crate::datasets::val_loader_over;

/// Where an out-of-distribution set comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum OodSource {
    Uniform,
    Gaussian,
    Folder(PathBuf),
    Cifar(PathBuf),
}

impl OodSource {
    /// `uniform`, `gaussian`, a folder or a CIFAR `.bin` file (`--ood`'s value).
    pub fn parse(text: &str) -> Result<Self> {
        Ok(match text {
            "uniform" => Self::Uniform,
            "gaussian" => Self::Gaussian,
            _ => {
                let path = PathBuf::from(text);
                if path.is_dir() {
                    Self::Folder(path)
                } else if path.is_file() {
                    Self::Cifar(path)
                } else {
                    bail!(
                        "--ood {text}: neither `uniform`, `gaussian`, a folder of images nor a CIFAR .bin file"
                    );
                }
            }
        })
    }

    /// The set's name in the output: `uniform`, `gaussian`, or the folder's or file's name.
    pub fn name(&self) -> String {
        let file = |p: &Path| {
            p.file_name().map_or_else(
                || p.display().to_string(),
                |n| n.to_string_lossy().into_owned(),
            )
        };
        match self {
            Self::Uniform => "uniform".into(),
            Self::Gaussian => "gaussian".into(),
            Self::Folder(p) | Self::Cifar(p) => file(p),
        }
    }
}

/// An opened set: a loader over its images, or the synthetic kind and how many to make.
pub enum OodSet {
    Images(Loader),
    Synthetic { source: OodSource, count: usize },
}

impl OodSet {
    /// Opens `source` with `config`'s evaluation transform; synthetic sets get `count` images.
    pub fn open(config: &Config, source: &OodSource, count: usize) -> Result<Self> {
        let dataset: Arc<dyn Dataset> = match source {
            OodSource::Uniform | OodSource::Gaussian => {
                return Ok(Self::Synthetic {
                    source: source.clone(),
                    count,
                });
            }
            OodSource::Folder(dir) => Arc::new(ImageFolder::open_unlabelled(dir)?),
            OodSource::Cifar(file) => Arc::new(Cifar::open_file(file)?),
        };
        Ok(Self::Images(val_loader_over(config, dataset, None)))
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Images(loader) => loader.total_len(),
            Self::Synthetic { count, .. } => *count,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `count` synthetic images from `first` on (`[count][3][size][size]`, normalised): image `i`
/// is drawn from its own generator, so the set is the same whatever the batch size.
pub fn synthetic(
    source: &OodSource,
    seed: u64,
    (first, count): (usize, usize),
    size: usize,
    (mean, std): ([f32; 3], [f32; 3]),
) -> Vec<f32> {
    let gaussian = Normal::new(0.5f32, 1.0).expect("a valid normal");
    let which = u64::from(*source == OodSource::Gaussian);
    let mut out = Vec::with_capacity(count * 3 * size * size);
    for i in first..first + count {
        let mut rng = keyed_rng(seed, Stream::Analysis, which, i as u64);
        for c in 0..3 {
            for _ in 0..size * size {
                let pixel = if which == 1 {
                    gaussian.sample(&mut rng).clamp(0.0, 1.0)
                } else {
                    rng.random::<f32>()
                };
                out.push((pixel - mean[c]) / std[c]);
            }
        }
    }
    out
}

/// How images are scored.
pub struct Scorer<'a> {
    pub subject: &'a Subject,
    /// Needed when `odin_eps > 0`.
    pub attacker: Option<&'a Attacker>,
    pub temperature: f32,
    pub odin_eps: f32,
}

impl Scorer<'_> {
    /// The scores of `n` normalised `[3][size][size]` images.
    pub fn scores(&self, images: Vec<f32>, n: usize, size: usize) -> Vec<f32> {
        let s = self.subject;
        let images = match self.attacker.filter(|_| self.odin_eps > 0.0) {
            Some(attacker) => {
                let batch = Images {
                    images: &images,
                    n,
                    size,
                };
                let predicted = |logits: &[f32]| predictions(logits, s.classes);
                let (sign, _) = attacker.gradient_sign_for(batch, predicted, self.temperature);
                let step = Step {
                    eps: -self.odin_eps,
                    clip: false,
                };
                stepped(&images, &sign, size, step, s.mean, s.std)
            }
            None => images,
        };
        s.probabilities(images, n, size, self.temperature)
            .chunks_exact(s.classes)
            .map(|row| row.iter().fold(0.0f32, |m, &v| m.max(v)))
            .collect()
    }
}

/// The scores of every image of a set, in order.
pub fn set_scores(
    scorer: &Scorer,
    set: &OodSet,
    seed: u64,
    size: usize,
    batch: usize,
) -> Result<Vec<f32>> {
    let mut scores = Vec::with_capacity(set.len());
    match set {
        OodSet::Images(loader) => super::each_batch(loader, "scores", |b| {
            let n = b.len();
            scores.extend(scorer.scores(b.images, n, b.size));
            Ok(())
        })?,
        OodSet::Synthetic { source, count } => {
            let s = scorer.subject;
            let mut first = 0;
            while first < *count {
                let n = batch.min(count - first);
                let images = synthetic(source, seed, (first, n), size, (s.mean, s.std));
                scores.extend(scorer.scores(images, n, size));
                first += n;
            }
        }
    }
    Ok(scores)
}

/// One out-of-distribution set's detection metrics, and its ROC thinned to about 1,000
/// points (for a figure).
pub struct SetResult {
    pub name: String,
    pub images: usize,
    pub detection: Detection,
    pub roc: Vec<(f64, f64)>,
}

/// Where the scores come from and how they are batched.
pub struct Scoring<'a> {
    pub scorer: Scorer<'a>,
    /// Keys the synthetic sets' draws.
    pub seed: u64,
    pub size: usize,
    pub batch: usize,
}

impl Scoring<'_> {
    /// The in-distribution images' count and each set's result against them.
    pub fn detect(
        &self,
        inside: &OodSet,
        sets: &[(String, OodSet)],
    ) -> Result<(usize, Vec<SetResult>)> {
        let scores = |set: &OodSet| set_scores(&self.scorer, set, self.seed, self.size, self.batch);
        let positive = scores(inside)?;
        let mut results = Vec::new();
        for (name, set) in sets {
            let negative = scores(set)?;
            let curve = roc(&positive, &negative);
            let every = (curve.len() / 1000).max(1);
            results.push(SetResult {
                name: name.clone(),
                images: negative.len(),
                detection: Detection::of(&positive, &negative),
                roc: curve
                    .iter()
                    .step_by(every)
                    .chain(curve.last())
                    .map(|p| (p.fpr, p.tpr))
                    .collect(),
            });
        }
        Ok((positive.len(), results))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn synthetic_sets_are_odins_and_do_not_depend_on_batching() {
        let norm = ([0.0; 3], [1.0; 3]);
        let whole = synthetic(&OodSource::Gaussian, 3, (0, 6), 4, norm);
        let parts = [
            synthetic(&OodSource::Gaussian, 3, (0, 2), 4, norm),
            synthetic(&OodSource::Gaussian, 3, (2, 4), 4, norm),
        ]
        .concat();
        assert_eq!(whole, parts);
        assert!(whole.iter().all(|v| (0.0..=1.0).contains(v)));
        // clamp(N(0.5, 1)) puts about 31% of the pixels at each bound.
        let at_zero = whole.iter().filter(|&&v| v == 0.0).count() as f64 / whole.len() as f64;
        assert!((0.2..0.42).contains(&at_zero), "{at_zero}");
        let uniform = synthetic(&OodSource::Uniform, 3, (0, 50), 4, norm);
        let mean = uniform.iter().sum::<f32>() / uniform.len() as f32;
        assert!((mean - 0.5).abs() < 0.03, "{mean}");
        assert_ne!(uniform[..96], whole[..96]);
    }

    #[test]
    fn sources_are_named_by_what_they_are() {
        assert_eq!(OodSource::parse("uniform").unwrap(), OodSource::Uniform);
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(
            OodSource::parse(&dir.path().display().to_string()).unwrap(),
            OodSource::Folder(dir.path().to_path_buf())
        );
        let err = OodSource::parse("/nowhere/lsun").unwrap_err().to_string();
        assert!(err.contains("--ood /nowhere/lsun"), "{err}");
    }
}
