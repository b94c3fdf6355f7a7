//! The run configuration: a TOML file, `--set section.key=value` overrides, and the checks that
//! run before anything is written.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};

use cutmix_models::{Arch, ModelConfig};

/// Which device trains the model (DESIGN.md, "Backends").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum BackendChoice {
    /// A real GPU through wgpu if there is one, else flex.
    Auto,
    Wgpu,
    Flex,
    Ndarray,
}

/// A whole run.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Run folder name: `<output_dir>/<name>/`.
    pub name: String,
    #[serde(default)]
    pub seed: u64,
    #[serde(default = "default_backend")]
    pub backend: BackendChoice,
    #[serde(default = "default_output_dir")]
    pub output_dir: PathBuf,
    pub model: ModelSection,
    pub data: DataSection,
    #[serde(default)]
    pub augment: AugmentSection,
    pub train: TrainSection,
}

fn default_backend() -> BackendChoice {
    BackendChoice::Auto
}

fn default_output_dir() -> PathBuf {
    PathBuf::from("runs")
}

/// `[model]`
fn default_last_stride() -> usize {
    2
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// `resnet`, `cifar_resnet` or `pyramidnet`.
    pub arch: String,
    pub depth: usize,
    /// PyramidNet's total widening.
    #[serde(default)]
    pub alpha: f64,
    /// Bottleneck blocks (CIFAR families; ImageNet ResNets decide by depth).
    #[serde(default)]
    pub bottleneck: bool,
    pub num_classes: usize,
    /// ShakeDrop's drop probability at the last PyramidNet block (0 = off, 0.5 = the paper).
    #[serde(default)]
    pub shakedrop: f64,
    /// The stride of an ImageNet ResNet's `layer4`: 2 (torchvision), or 1 for weakly-supervised
    /// localization (a 14x14 last map at 224; the same weights load).
    #[serde(default = "default_last_stride")]
    pub last_stride: usize,
    /// Optional weights to start from: safetensors (PyTorch names), a PyTorch checkpoint
    /// (`.pth`, `.pth.tar`) or a burnpack (`.bpk`) of this project.
    #[serde(default)]
    pub init_from: String,
    /// Start the classifier afresh even when `init_from` has one of the right shape (the
    /// paper's ImageNet localization fine-tuning).
    #[serde(default)]
    pub reinit_classifier: bool,
}

/// Which dataset reader.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DatasetKind {
    Cifar10,
    Cifar100,
    Imagefolder,
    /// CUB-200-2011 as distributed: `data.root` is the `CUB_200_2011` folder; the official
    /// train/test split, 200 classes, the localization transforms (`wsol`) by default.
    Cub,
}

/// Which family of host transforms (and normalisation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransformKind {
    /// Pad-and-crop + flip, CIFAR mean and std.
    Cifar,
    /// RandomResizedCrop + flip, resize + centre crop for evaluation, ImageNet mean and std.
    Imagenet,
    /// The localization recipe: resize to a 256x256 square (at 224), random 224 crop + flip;
    /// evaluation resize to 256x256 + centre crop; ImageNet mean and std.
    Wsol,
}

/// What fills the 4-pixel border of the `cifar` training crops.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PadMode {
    /// Black (torchvision's RandomCrop default; the reference's).
    #[default]
    Zeros,
    /// The normalisation's mean (0 after normalisation).
    Mean,
    /// The image mirrored at its edge.
    Reflect,
    /// The edge pixels repeated.
    Edge,
}

/// `[data]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataSection {
    pub dataset: DatasetKind,
    /// CIFAR: the folder with the `.bin` files; imagefolder: holds `train/` and `val/`; cub:
    /// the `CUB_200_2011` folder.
    pub root: PathBuf,
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Transform family; by default `cifar` for the CIFAR datasets, `imagenet` for folders,
    /// `wsol` for CUB.
    #[serde(default)]
    pub transforms: Option<TransformKind>,
    /// Background threads preparing batches (0: on the training thread).
    #[serde(default = "default_workers")]
    pub workers: usize,
    /// Batches prepared ahead of the one in use: the loader's memory is at most
    /// `(prefetch + 1)` batches of f32 images, whatever the dataset's size.
    #[serde(default = "default_prefetch")]
    pub prefetch: usize,
    /// `imagefolder` with a flat `val/` (all images in one folder, as ImageNet ships it): the
    /// file of `<image> <class>` lines that labels them (Kaggle's `LOC_val_solution.csv` works).
    #[serde(default)]
    pub val_labels: Option<PathBuf>,
    /// Stop at the first image that cannot be decoded instead of skipping it (skipped files are
    /// counted and named at the end of each epoch).
    #[serde(default)]
    pub strict: bool,
    /// `cifar100`: train on the 20 superclasses (coarse labels) instead of the 100 classes.
    #[serde(default)]
    pub coarse_labels: bool,
    /// 0 = all; else a seeded random subset of this many training examples.
    #[serde(default)]
    pub train_limit: usize,
    /// 0 = all; else a seeded random subset of this many validation examples.
    #[serde(default)]
    pub val_limit: usize,
    /// `imagenet` training transforms: brightness, contrast and saturation jitter strength
    /// (0 = off; 0.4 in the reference).
    #[serde(default)]
    pub color_jitter: f32,
    /// `imagenet` training transforms: PCA lighting's alpha standard deviation (0 = off; 0.1 in
    /// the reference).
    #[serde(default)]
    pub lighting: f32,
    /// `cifar` training transforms: what fills the 4-pixel border before the random crop:
    /// `zeros` (black, the reference's), `mean`, `reflect` or `edge`.
    #[serde(default)]
    pub pad_mode: PadMode,
}

fn default_image_size() -> usize {
    32
}

fn default_workers() -> usize {
    2
}

fn default_prefetch() -> usize {
    4
}

impl DataSection {
    /// The transform family in effect.
    pub fn transform_kind(&self) -> TransformKind {
        self.transforms.unwrap_or(match self.dataset {
            DatasetKind::Cifar10 | DatasetKind::Cifar100 => TransformKind::Cifar,
            DatasetKind::Imagefolder => TransformKind::Imagenet,
            DatasetKind::Cub => TransformKind::Wsol,
        })
    }
}

/// Batch mixing methods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixMethod {
    None,
    Cutmix,
    Mixup,
    Cutout,
    /// timm's switch: CutMix with probability `switch_prob`, else Mixup.
    #[serde(rename = "cutmix+mixup")]
    CutmixMixup,
}

/// How mixing draws: `batch` is the reference (one lambda and box per batch), `elem` draws per
/// image.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixMode {
    Batch,
    Elem,
}

/// How mixing partners are chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PartnerKind {
    /// A random permutation of the batch (the reference).
    Permutation,
    /// The batch reversed (timm).
    Flip,
    /// The batch shifted by one (torchvision).
    Roll,
}

/// Where mixing happens: on the input images, or on the feature map after a stage
/// (feature-level CutMix, the paper's ablation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MixAt {
    Input,
    Layer1,
    Layer2,
    Layer3,
    Layer4,
}

impl MixAt {
    /// The stage after which features are mixed (1-based), or `None` for the input.
    pub fn stage(self) -> Option<usize> {
        match self {
            Self::Input => None,
            Self::Layer1 => Some(1),
            Self::Layer2 => Some(2),
            Self::Layer3 => Some(3),
            Self::Layer4 => Some(4),
        }
    }
}

/// Where a CutMix box's centre is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BoxCentre {
    /// Uniformly over the image (CutMix).
    Uniform,
    /// From a Gaussian around the image centre (`centre_sigma`; centre-Gaussian CutMix).
    Gaussian,
}

/// How CutMix's targets weigh the two labels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TargetRule {
    /// By the share of pixels (CutMix).
    Area,
    /// The label of the larger area only (one-hot CutMix).
    Onehot,
    /// 0.5 / 0.5 whatever the areas (complete-label CutMix).
    Complete,
}

/// How the mixing probability moves over training.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbSchedule {
    /// `prob` throughout.
    Constant,
    /// From 0 in the first epoch linearly to `prob` in the last (scheduled CutMix).
    Linear,
}

/// `[augment]` (every key optional: no mixing unless `method` says so).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentSection {
    pub method: MixMethod,
    /// CutMix: lambda ~ Beta(beta, beta).
    pub beta: f64,
    /// Share of batches (or images, in `elem` mode) that are mixed; Cutout: share of images.
    pub prob: f64,
    pub mode: MixMode,
    pub partner: PartnerKind,
    /// Mixup: lambda ~ Beta(mixup_alpha, mixup_alpha).
    pub mixup_alpha: f64,
    /// Cutout: side of the zeroed square (16 on CIFAR in the paper).
    pub cutout_size: usize,
    /// `cutmix+mixup`: probability of CutMix rather than Mixup.
    pub switch_prob: f64,
    /// Mixing runs in the first `off_epoch` epochs, then stops (timm's rule; 0 = never stops).
    pub off_epoch: usize,
    /// Where to mix: `input`, or the feature map after `layer1` .. `layer4`.
    pub at: MixAt,
    /// CutMix's box centre: `uniform` (CutMix) or `gaussian` (the paper's Table 8
    /// centre-Gaussian CutMix).
    pub box_centre: BoxCentre,
    /// `box_centre = "gaussian"`: the standard deviation as a fraction of the image side (the
    /// paper gives none).
    pub centre_sigma: f64,
    /// CutMix: a fixed box side in pixels (of the mixed map) instead of one drawn from lambda,
    /// 0 = drawn (fixed-size CutMix: 16 at 32x32).
    pub box_size: usize,
    /// CutMix's targets: `area` (CutMix), `onehot` (the label of the larger area) or
    /// `complete` (0.5 / 0.5).
    pub targets: TargetRule,
    /// `constant`, or `linear`: the probability rises from 0 in the first epoch to `prob` in
    /// the last (scheduled CutMix).
    pub prob_schedule: ProbSchedule,
}

impl Default for AugmentSection {
    fn default() -> Self {
        Self {
            method: MixMethod::None,
            beta: 1.0,
            prob: 0.5,
            mode: MixMode::Batch,
            partner: PartnerKind::Permutation,
            mixup_alpha: 1.0,
            cutout_size: 16,
            switch_prob: 0.5,
            off_epoch: 0,
            at: MixAt::Input,
            box_centre: BoxCentre::Uniform,
            centre_sigma: 0.25,
            box_size: 0,
            targets: TargetRule::Area,
            prob_schedule: ProbSchedule::Constant,
        }
    }
}

/// Learning-rate schedules, stepped per epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScheduleKind {
    /// x gamma at each epoch in `milestones`.
    Multistep,
    /// x gamma every `step_size` epochs.
    Step,
    /// Cosine from lr to 0 over the epochs after warmup.
    Cosine,
}

/// `[train]`
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainSection {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f64,
    #[serde(default = "default_momentum")]
    pub momentum: f64,
    #[serde(default = "default_true")]
    pub nesterov: bool,
    #[serde(default = "default_weight_decay")]
    pub weight_decay: f64,
    #[serde(default = "default_schedule")]
    pub schedule: ScheduleKind,
    #[serde(default)]
    pub milestones: Vec<usize>,
    #[serde(default = "default_gamma")]
    pub gamma: f64,
    /// Epochs between decays for `schedule = "step"`.
    #[serde(default)]
    pub step_size: usize,
    /// Epochs of linear warmup from 0 to lr (per step).
    #[serde(default)]
    pub warmup_epochs: usize,
    /// How many `checkpoints/epoch-NNNN` folders to keep (`last` and `best` are always kept).
    #[serde(default = "default_keep_last")]
    pub keep_last: usize,
    /// Label smoothing of the training targets (0 = none), applied after mixing.
    #[serde(default)]
    pub label_smoothing: f64,
    /// Apply weight decay to BatchNorm weights and biases and to biases too (`true`, as the
    /// reference's `torch.optim.SGD`); `false` decays only conv and linear weights (timm's
    /// `filter_bias_and_bn`).
    #[serde(default = "default_true")]
    pub decay_bn_and_bias: bool,
    /// Clip the gradients' global L2 norm (over all parameters, as
    /// `torch.nn.utils.clip_grad_norm_`) to this before each step; 0 = off.
    #[serde(default)]
    pub clip_grad_norm: f64,
    /// The classifier's (`fc`) own base learning rate, scheduled as `lr` is (the paper's
    /// localization recipes: fc 0.01, the rest 0.001 on CUB); 0 = `lr`.
    #[serde(default)]
    pub classifier_lr: f64,
    /// Sum the gradients of this many batches before each optimiser step (each batch's loss
    /// divided by it), for an effective batch of `batch_size * accumulate`; 1 = off.
    #[serde(default = "default_accumulate")]
    pub accumulate: usize,
    /// Keep an exponential moving average of the weights with this decay per optimiser step
    /// (timm's `--model-ema-decay`, e.g. 0.9998), evaluated and checkpointed beside the raw
    /// weights; 0 = off.
    #[serde(default)]
    pub ema_decay: f64,
    /// Batches between reads of the loss and errors back from the device (for the progress
    /// bar, the log lines and a diverged-run check); they are also read at the end of each
    /// epoch. A read waits for the device to finish every step queued before it, so on a GPU
    /// it should be rare; the metrics are the same whatever the interval.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
    /// Also write `checkpoints/last` inside an epoch once this many minutes have passed since
    /// the last checkpoint (0 = only at epoch ends), so a killed run loses at most this much.
    #[serde(default)]
    pub checkpoint_minutes: f64,
    /// Also write `checkpoints/last` every this many optimiser steps inside an epoch (0 = off).
    #[serde(default)]
    pub checkpoint_steps: usize,
    /// With several processes (`mpirun`): normalise by the batch statistics of all of them
    /// together (PyTorch's SyncBatchNorm) instead of each process's batch by itself (DDP's
    /// default). On flex.
    #[serde(default)]
    pub sync_bn: bool,
}

fn default_log_every() -> usize {
    20
}

impl TrainSection {
    /// The classifier's learning rate over everything else's (1 unless `classifier_lr` is set).
    pub fn classifier_scale(&self) -> f64 {
        if self.classifier_lr > 0.0 {
            self.classifier_lr / self.lr
        } else {
            1.0
        }
    }
}

fn default_accumulate() -> usize {
    1
}

fn default_momentum() -> f64 {
    0.9
}

fn default_true() -> bool {
    true
}

fn default_weight_decay() -> f64 {
    1e-4
}

fn default_schedule() -> ScheduleKind {
    ScheduleKind::Multistep
}

fn default_gamma() -> f64 {
    0.1
}

fn default_keep_last() -> usize {
    2
}

impl Config {
    /// Reads `path`, applies `overrides` (`section.key=value`, in order) and checks the result.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config {}", path.display()))?;
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|e| anyhow!("{}: {}", path.display(), one_line(&e.to_string())))?;
        for assignment in overrides {
            apply_override(&mut table, assignment)?;
        }
        let config = Self::from_table(table).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        config.validate()?;
        Ok(config)
    }

    /// Deserialises a table, naming the full dotted key of any bad entry.
    pub fn from_table(table: toml::Table) -> Result<Self> {
        let value = toml::Value::Table(table);
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path = e.path().to_string();
            let message = one_line(&e.inner().to_string());
            // toml repeats the key at the end of some messages; it is named in front already.
            let message = message
                .strip_suffix(&format!(" in `{path}`"))
                .unwrap_or(&message)
                .to_string();
            if path == "." || path.is_empty() {
                anyhow!("{message}")
            } else {
                anyhow!("config key {path}: {message}")
            }
        })
    }

    /// The model description this config asks for.
    pub fn model_config(&self) -> Result<ModelConfig> {
        let arch = Arch::parse(&self.model.arch).ok_or_else(|| {
            anyhow!(
                "config key model.arch: unknown architecture `{}`, expected one of {}",
                self.model.arch,
                Arch::NAMES.join(", ")
            )
        })?;
        Ok(ModelConfig {
            arch,
            depth: self.model.depth,
            alpha: self.model.alpha,
            bottleneck: self.model.bottleneck,
            shakedrop: self.model.shakedrop,
            num_classes: self.model.num_classes,
            last_stride: self.model.last_stride,
        })
    }

    /// Rejects impossible values, naming the key, before anything is written.
    pub fn validate(&self) -> Result<()> {
        let model = self.model_config()?;
        model.validate().map_err(|e| {
            let key = match e {
                cutmix_models::ModelError::InvalidDepth { .. } => "model.depth",
                cutmix_models::ModelError::InvalidAlpha(_) => "model.alpha",
                cutmix_models::ModelError::NoClasses => "model.num_classes",
                cutmix_models::ModelError::InvalidLastStride(_) => "model.last_stride",
                cutmix_models::ModelError::InvalidShakeDrop(_) => "model.shakedrop",
            };
            anyhow!("config key {key}: {e}")
        })?;
        let check = |ok: bool, key: &str, why: &str| -> Result<()> {
            if ok {
                Ok(())
            } else {
                bail!("config key {key}: {why}")
            }
        };
        let name_ok = !self.name.is_empty()
            && !self.name.contains(['/', '\\'])
            && self.name != "."
            && self.name != "..";
        check(
            name_ok,
            "name",
            "must be a non-empty folder name without slashes",
        )?;
        let t = &self.train;
        check(t.epochs >= 1, "train.epochs", "must be at least 1")?;
        check(t.batch_size >= 1, "train.batch_size", "must be at least 1")?;
        check(
            t.lr.is_finite() && t.lr > 0.0,
            "train.lr",
            "must be a positive number",
        )?;
        check(
            (0.0..1.0).contains(&t.momentum),
            "train.momentum",
            "must be in [0, 1)",
        )?;
        check(
            t.classifier_lr.is_finite() && t.classifier_lr >= 0.0,
            "train.classifier_lr",
            "must be a number >= 0 (0 = train.lr)",
        )?;
        check(t.accumulate >= 1, "train.accumulate", "must be at least 1")?;
        check(t.log_every >= 1, "train.log_every", "must be at least 1")?;
        check(
            t.checkpoint_minutes.is_finite() && t.checkpoint_minutes >= 0.0,
            "train.checkpoint_minutes",
            "must be a number of minutes >= 0 (0 = only at epoch ends)",
        )?;
        check(
            (0.0..1.0).contains(&t.ema_decay),
            "train.ema_decay",
            "must be in [0, 1) (0 = off; timm uses 0.9998)",
        )?;
        check(
            t.clip_grad_norm.is_finite() && t.clip_grad_norm >= 0.0,
            "train.clip_grad_norm",
            "must be a number >= 0 (0 = off)",
        )?;
        check(
            t.weight_decay.is_finite() && t.weight_decay >= 0.0,
            "train.weight_decay",
            "must be a number >= 0",
        )?;
        check(
            t.gamma.is_finite() && t.gamma > 0.0,
            "train.gamma",
            "must be a positive number",
        )?;
        check(
            t.milestones.windows(2).all(|w| w[0] < w[1]),
            "train.milestones",
            "must be strictly increasing",
        )?;
        check(
            t.schedule != ScheduleKind::Step || t.step_size >= 1,
            "train.step_size",
            "must be at least 1 with schedule = \"step\"",
        )?;
        let a = &self.augment;
        let uses = |methods: &[MixMethod]| methods.contains(&a.method);
        if uses(&[MixMethod::Cutmix, MixMethod::CutmixMixup]) {
            check(
                a.beta.is_finite() && a.beta > 0.0,
                "augment.beta",
                "must be a positive number",
            )?;
        }
        if uses(&[MixMethod::Mixup, MixMethod::CutmixMixup]) {
            check(
                a.mixup_alpha.is_finite() && a.mixup_alpha > 0.0,
                "augment.mixup_alpha",
                "must be a positive number",
            )?;
        }
        if uses(&[MixMethod::Cutout]) {
            check(
                a.cutout_size >= 1,
                "augment.cutout_size",
                "must be at least 1",
            )?;
        }
        check(
            (0.0..=1.0).contains(&a.prob),
            "augment.prob",
            "must be in [0, 1]",
        )?;
        let stages = match model.arch {
            Arch::ResNet | Arch::ResNetCifarStem => 4,
            Arch::CifarResNet | Arch::PyramidNet => 3,
        };
        check(
            a.at.stage().is_none_or(|stage| stage <= stages),
            "augment.at",
            &format!("this model has stages layer1 .. layer{stages}"),
        )?;
        check(
            (0.0..=1.0).contains(&a.switch_prob),
            "augment.switch_prob",
            "must be in [0, 1]",
        )?;
        check(
            (0.0..1.0).contains(&t.label_smoothing),
            "train.label_smoothing",
            "must be in [0, 1)",
        )?;
        for (value, key) in [
            (self.data.color_jitter, "data.color_jitter"),
            (self.data.lighting, "data.lighting"),
        ] {
            check(
                value.is_finite() && value >= 0.0,
                key,
                "must be a number >= 0",
            )?;
        }
        check(
            self.data.image_size >= 8,
            "data.image_size",
            "must be at least 8",
        )?;
        let cutmix = matches!(a.method, MixMethod::Cutmix | MixMethod::CutmixMixup);
        for (set, key) in [
            (a.box_centre != BoxCentre::Uniform, "augment.box_centre"),
            (a.box_size != 0, "augment.box_size"),
            (a.targets != TargetRule::Area, "augment.targets"),
        ] {
            check(
                !set || cutmix,
                key,
                "is a variant of CutMix: set augment.method = \"cutmix\" (or \"cutmix+mixup\")",
            )?;
        }
        check(
            a.centre_sigma.is_finite() && a.centre_sigma > 0.0,
            "augment.centre_sigma",
            "must be a number > 0",
        )?;
        check(
            !self.model.reinit_classifier || !self.model.init_from.is_empty(),
            "model.reinit_classifier",
            "re-initialises the classifier of model.init_from's weights; set model.init_from",
        )?;
        check(
            !self.data.coarse_labels || self.data.dataset == DatasetKind::Cifar100,
            "data.coarse_labels",
            "only CIFAR-100 has coarse labels (set data.dataset = \"cifar100\")",
        )?;
        check(
            self.data.val_labels.is_none() || self.data.dataset == DatasetKind::Imagefolder,
            "data.val_labels",
            "labels a flat validation folder of an `imagefolder` dataset only",
        )?;
        Ok(())
    }

    /// The resolved config as TOML, as written into the run folder.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("a config always serialises")
    }
}

/// TOML errors span several lines with a source excerpt; keep the message's first line.
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('|') && !l.starts_with("-->"))
        .filter(|l| !l.chars().next().is_some_and(|c| c.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Parses `--set` values as TOML (`3`, `0.1`, `true`, `[150, 225]`, `"text"`); anything else is
/// taken as a plain string.
fn parse_value(text: &str) -> toml::Value {
    toml::from_str::<toml::Table>(&format!("value = {text}"))
        .ok()
        .and_then(|mut t| t.remove("value"))
        .unwrap_or_else(|| toml::Value::String(text.to_string()))
}

/// Applies one `section.key=value` override.
fn apply_override(table: &mut toml::Table, assignment: &str) -> Result<()> {
    let (key, value) = assignment
        .split_once('=')
        .ok_or_else(|| anyhow!("--set {assignment}: expected section.key=value"))?;
    let key = key.trim();
    let parts: Vec<&str> = key.split('.').collect();
    if parts.iter().any(|p| p.is_empty()) {
        bail!("--set {assignment}: `{key}` is not a dotted config key");
    }
    let (last, sections) = parts.split_last().expect("split gives one part at least");
    let mut current = table;
    for (depth, section) in sections.iter().enumerate() {
        let entry = current
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry.as_table_mut().ok_or_else(|| {
            anyhow!(
                "--set {assignment}: config key {} is a value, not a section",
                parts[..=depth].join(".")
            )
        })?;
    }
    current.insert(last.to_string(), parse_value(value.trim()));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
        name = "t"
        [model]
        arch = "cifar_resnet"
        depth = 20
        num_classes = 10
        [data]
        dataset = "cifar10"
        root = "data"
        [train]
        epochs = 3
        batch_size = 8
        lr = 0.1
        milestones = [1, 2]
    "#;

    fn load(overrides: &[&str]) -> Result<Config> {
        let mut table: toml::Table = toml::from_str(BASE).unwrap();
        for o in overrides {
            apply_override(&mut table, o)?;
        }
        let config = Config::from_table(table)?;
        config.validate()?;
        Ok(config)
    }

    fn error(overrides: &[&str]) -> String {
        load(overrides).unwrap_err().to_string()
    }

    #[test]
    fn cutmix_variants_need_cutmix_and_map_to_the_mixing() {
        let config = load(&[
            "augment.method=cutmix",
            "augment.box_centre=gaussian",
            "augment.centre_sigma=0.1",
            "augment.box_size=16",
            "augment.targets=onehot",
        ])
        .unwrap();
        let cutmix_augment::Mixing::CutMix(cutmix) = crate::trainer::mixing(&config) else {
            panic!("CutMix expected");
        };
        assert_eq!(
            cutmix.variant,
            cutmix_augment::Variant {
                centre: cutmix_augment::Centre::Gaussian { sigma: 0.1 },
                box_size: Some(16),
                targets: cutmix_augment::Targets::OneHot,
            }
        );
        for key in ["augment.box_size=16", "augment.targets=complete"] {
            let e = error(&["augment.method=mixup", key]);
            assert!(
                e.contains(key.split('=').next().unwrap()) && e.contains("variant of CutMix"),
                "{e}"
            );
        }
        assert!(error(&["augment.centre_sigma=0"]).contains("augment.centre_sigma"));
        use crate::trainer::prob_factor;
        let ramp: Vec<f64> = (0..5)
            .map(|e| prob_factor(ProbSchedule::Linear, e, 5))
            .collect();
        assert_eq!(ramp, [0.0, 0.25, 0.5, 0.75, 1.0]);
        assert_eq!(prob_factor(ProbSchedule::Constant, 0, 5), 1.0);
        assert_eq!(prob_factor(ProbSchedule::Linear, 0, 1), 1.0);
    }

    /// Every shipped recipe parses and passes the checks (the data is not opened).
    #[test]
    fn every_shipped_config_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Config::load(&path, &[]).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
                count += 1;
            }
        }
        assert!(count >= 7, "{count} configs in {}", dir.display());
        let wsol = Config::load(&dir.join("imagenet_resnet50_wsol.toml"), &[]).unwrap();
        assert!(wsol.model.reinit_classifier && wsol.model.last_stride == 1);
        assert_eq!(wsol.data.transform_kind(), TransformKind::Wsol);
        assert_eq!(wsol.train.classifier_scale(), 10.0);
        let error = Config::load(
            &dir.join("imagenet_resnet50_wsol.toml"),
            &["model.init_from=".into()],
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("model.reinit_classifier"), "{error}");
    }

    #[test]
    fn overrides_parse_toml_values_and_fall_back_to_strings() {
        let config = load(&[
            "train.lr=0.5",
            "train.milestones=[5, 9]",
            "data.root=/data/cifar-10",
            "augment.method=cutmix",
            "train.nesterov=false",
        ])
        .unwrap();
        assert_eq!(config.train.lr, 0.5);
        assert_eq!(config.train.milestones, vec![5, 9]);
        assert_eq!(config.data.root, PathBuf::from("/data/cifar-10"));
        assert_eq!(config.augment.method, MixMethod::Cutmix);
        assert!(!config.train.nesterov);
    }

    #[test]
    fn bad_keys_and_values_name_the_full_dotted_key() {
        assert!(
            error(&["train.lrr=1"]).contains("lrr"),
            "{}",
            error(&["train.lrr=1"])
        );
        assert!(error(&["train.lr=fast"]).contains("train.lr"));
        assert!(error(&["train.lr=-1"]).contains("train.lr"));
        assert!(error(&["train.batch_size=0"]).contains("train.batch_size"));
        assert!(error(&["train.milestones=[3, 2]"]).contains("train.milestones"));
        assert!(error(&["model.depth=21"]).contains("model.depth"));
        assert!(error(&["augment.method=mixer"]).contains("augment.method"));
        assert!(error(&["train.lr.x=1"]).contains("train.lr"));
    }

    #[test]
    fn milestones_past_the_last_epoch_are_allowed() {
        assert!(load(&["train.milestones=[150, 225]"]).is_ok());
    }

    #[test]
    fn resolved_config_round_trips() {
        let config = load(&[]).unwrap();
        let again = Config::from_table(toml::from_str(&config.to_toml()).unwrap()).unwrap();
        assert_eq!(again.to_toml(), config.to_toml());
    }
}
