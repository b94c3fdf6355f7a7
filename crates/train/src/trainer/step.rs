//! One training step's parts: the optimiser, the mixing, the mixed forward pass, the loss and
//! its gradients, clipping, and the update.

use burn::module::{Module, ModuleVisitor, Param, ParamGroup};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::loss::cross_entropy_with_logits;
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;

use cutmix_augment::{
    Centre, CutMix, CutMixOrMixup, Cutout, Mixing, Mixup, Mode, Partner, Targets, Variant,
};
use cutmix_data::Batch;
use cutmix_kernels::sgd::Sgd;
use cutmix_models::Model;

use crate::config::{
    BoxCentre, Config, MixMethod, MixMode, PartnerKind, ProbSchedule, TargetRule, TrainSection,
};

/// Parameters that `train.decay_bn_and_bias = false` leaves out of weight decay: BatchNorm's
/// weight (gamma) and bias (beta), and every bias.
const NO_DECAY: &str = r"(^|\.)(gamma|beta|bias)$";

/// SGD as `torch.optim.SGD(momentum, nesterov, weight_decay, dampening=0)` with the run's
/// momentum, Nesterov and weight decay (optionally not on BatchNorm parameters and biases):
/// Burn's `Sgd`, bit for bit, with its step in one pass on every thread on flex
/// ([`cutmix_kernels::sgd::Sgd`]).
pub fn sgd(train: &TrainSection) -> ModuleOptimizer {
    let config = |weight_decay: f64| {
        let momentum = (train.momentum > 0.0).then_some(MomentumConfig {
            momentum: train.momentum,
            dampening: 0.0,
            nesterov: train.nesterov,
        });
        Sgd::new(momentum, weight_decay as f32)
    };
    let mut optimizer = ModuleOptimizer::from(config(train.weight_decay));
    let filtered = !train.decay_bn_and_bias && train.weight_decay > 0.0;
    if filtered {
        let no_decay = ParamGroup::from_regex(NO_DECAY).expect("a valid pattern");
        optimizer = optimizer.with_group(no_decay, config(0.0), None);
    }
    let scale = train.classifier_scale();
    if scale != 1.0 {
        // With the classifier's gradients scaled by `scale` (`apply_step`) and its weight decay
        // too, SGD's momentum buffer is `scale` times the unscaled one, so each step moves the
        // classifier by `scale * lr` times what it would: its own learning rate, exactly.
        let group = |name: &str| ParamGroup::from_regex(name).expect("a valid pattern");
        let bias_decay = if filtered { 0.0 } else { train.weight_decay };
        optimizer = optimizer
            .with_group(
                group(CLASSIFIER_WEIGHT),
                config(train.weight_decay * scale),
                None,
            )
            .with_group(group(CLASSIFIER_BIAS), config(bias_decay * scale), None);
    }
    optimizer
}

/// The classifier's parameters (torchvision's `fc`).
const CLASSIFIER_WEIGHT: &str = r"(^|\.)fc\.weight$";
const CLASSIFIER_BIAS: &str = r"(^|\.)fc\.bias$";

/// What one optimiser step applies besides the gradients.
#[derive(Clone, Copy, Debug)]
pub struct Update {
    pub lr: f64,
    /// Clip the gradients' global norm to this first (0 = no clip).
    pub clip: f64,
    /// The classifier's learning rate over `lr` ([`TrainSection::classifier_scale`]).
    pub classifier_scale: f64,
}

impl Update {
    /// A step at `lr`, no clipping, one learning rate for everything.
    pub fn plain(lr: f64) -> Self {
        Self {
            lr,
            clip: 0.0,
            classifier_scale: 1.0,
        }
    }
}

/// The `[augment]` section as a mixing method.
pub fn mixing(config: &Config) -> Mixing {
    let a = &config.augment;
    let mode = match a.mode {
        MixMode::Batch => Mode::Batch,
        MixMode::Elem => Mode::Elem,
    };
    let partner = match a.partner {
        PartnerKind::Permutation => Partner::Permutation,
        PartnerKind::Flip => Partner::Flip,
        PartnerKind::Roll => Partner::Roll,
    };
    let cutmix = CutMix {
        beta: a.beta,
        prob: a.prob,
        mode,
        partner,
        variant: Variant {
            centre: match a.box_centre {
                BoxCentre::Uniform => Centre::Uniform,
                BoxCentre::Gaussian => Centre::Gaussian {
                    sigma: a.centre_sigma,
                },
            },
            box_size: (a.box_size > 0).then_some(a.box_size),
            targets: match a.targets {
                TargetRule::Area => Targets::Area,
                TargetRule::Onehot => Targets::OneHot,
                TargetRule::Complete => Targets::Complete,
            },
        },
    };
    let mixup = Mixup {
        alpha: a.mixup_alpha,
        prob: a.prob,
        mode,
        partner,
    };
    match a.method {
        MixMethod::None => Mixing::None,
        MixMethod::Cutmix => Mixing::CutMix(cutmix),
        MixMethod::Mixup => Mixing::Mixup(mixup),
        MixMethod::Cutout => Mixing::Cutout(Cutout {
            size: a.cutout_size,
            prob: a.prob,
        }),
        MixMethod::CutmixMixup => Mixing::CutMixOrMixup(CutMixOrMixup {
            cutmix,
            mixup,
            switch_prob: a.switch_prob,
        }),
    }
}

/// The share of `prob` that epoch `epoch` (0-based) of `epochs` mixes with: 1, or under
/// `prob_schedule = "linear"` a ramp from 0 in the first epoch to 1 in the last.
pub fn prob_factor(schedule: ProbSchedule, epoch: usize, epochs: usize) -> f64 {
    match schedule {
        ProbSchedule::Constant => 1.0,
        ProbSchedule::Linear if epochs <= 1 => 1.0,
        ProbSchedule::Linear => (epoch as f64 / (epochs - 1) as f64).min(1.0),
    }
}

/// Uploads a host batch's images as an NCHW tensor; returns it with the labels.
pub fn images_tensor(batch: Batch, device: &Device) -> (Tensor<4>, Vec<usize>) {
    let shape = [batch.len(), 3, batch.size, batch.size];
    let images = Tensor::from_data(TensorData::new(batch.images, shape), device);
    (images, batch.labels)
}

/// What one optimisation step saw, read back to the host.
pub struct StepOutput {
    pub loss: f32,
    /// `[batch][classes]` logits, row-major.
    pub logits: Vec<f32>,
}

/// The soft-target cross-entropy of `logits` against `targets` and the gradients of the loss
/// times `loss_scale` (1 / the number of accumulated batches); the (unscaled) loss stays on the
/// device.
pub fn loss_and_grads(
    model: &Model,
    logits: Tensor<2>,
    targets: Tensor<2>,
    loss_scale: f32,
) -> (GradientsParams, Tensor<1>) {
    let loss = cross_entropy_with_logits(logits, targets);
    let scaled = if loss_scale == 1.0 {
        loss.clone()
    } else {
        loss.clone() * loss_scale
    };
    let grads = GradientsParams::from_grads(scaled.backward(), model);
    (grads, loss.detach())
}

/// [`loss_and_grads`], with the loss and the logits read back (tests and benchmarks; the
/// training loop keeps them on the device).
pub fn backward(
    model: &Model,
    logits: Tensor<2>,
    targets: Tensor<2>,
    loss_scale: f32,
) -> (GradientsParams, StepOutput) {
    let seen = logits.clone().detach();
    let (grads, loss) = loss_and_grads(model, logits, targets, loss_scale);
    let output = StepOutput {
        loss: loss.into_scalar::<f32>(),
        logits: seen
            .into_data()
            .try_into_vec_as::<f32>()
            .expect("f32 logits"),
    };
    (grads, output)
}

/// One optimiser step with `grads`: their global norm clipped first when `update.clip` is set,
/// then the classifier's scaled by `update.classifier_scale` (its own learning rate, with the
/// optimiser [`sgd`] built).
pub fn apply_step(
    model: Model,
    optimizer: &mut ModuleOptimizer,
    grads: GradientsParams,
    update: Update,
) -> Model {
    let device = model.devices().into_iter().next().unwrap_or_default();
    cutmix_kernels::on_cpu_threads(&device, || update_model(model, optimizer, grads, update))
}

/// [`apply_step`] on the calling thread.
fn update_model(
    model: Model,
    optimizer: &mut ModuleOptimizer,
    mut grads: GradientsParams,
    update: Update,
) -> Model {
    if update.clip > 0.0 {
        clip_global_norm(&model, &mut grads, update.clip);
    }
    if update.classifier_scale != 1.0 {
        let fc = model.classifier();
        let scale = update.classifier_scale as f32;
        if let Some(grad) = grads.remove::<2>(fc.weight.id) {
            grads.register(fc.weight.id, grad.mul_scalar(scale));
        }
        if let Some(bias) = &fc.bias
            && let Some(grad) = grads.remove::<1>(bias.id)
        {
            grads.register(bias.id, grad.mul_scalar(scale));
        }
    }
    optimizer.step(update.lr, model, grads)
}

/// One training step on one batch: backward, then the optimiser, with the loss and logits read
/// back (tests and benchmarks).
pub fn train_step(
    model: Model,
    optimizer: &mut ModuleOptimizer,
    logits: Tensor<2>,
    targets: Tensor<2>,
    lr: f64,
) -> (Model, StepOutput) {
    let (grads, out) = backward(&model, logits, targets, 1.0);
    (apply_step(model, optimizer, grads, Update::plain(lr)), out)
}

/// Scales every gradient by `min(1, max_norm / (norm + 1e-6))`, `norm` being the L2 norm of all
/// gradients together, as `torch.nn.utils.clip_grad_norm_` (on the device, no read-back).
/// Returns the norm before clipping.
pub fn clip_global_norm(model: &Model, grads: &mut GradientsParams, max_norm: f64) -> Tensor<1> {
    struct SquaredSum<'a> {
        grads: &'a GradientsParams,
        total: Option<Tensor<1>>,
    }
    impl ModuleVisitor for SquaredSum<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.grads.get::<D>(param.id) {
                let squares = grad.powi_scalar(2).sum();
                self.total = Some(match self.total.take() {
                    Some(total) => total + squares,
                    None => squares,
                });
            }
        }
    }
    struct Scale<'a> {
        grads: &'a mut GradientsParams,
        factor: Tensor<1>,
    }
    impl ModuleVisitor for Scale<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(grad) = self.grads.remove::<D>(param.id) {
                let factor = self.factor.clone().reshape([1; D]);
                self.grads.register(param.id, grad * factor);
            }
        }
    }
    let mut sum = SquaredSum { grads, total: None };
    model.visit(&mut sum);
    let Some(total) = sum.total else {
        return Tensor::zeros([1], &Device::default());
    };
    let norm = total.sqrt();
    let factor = ((norm.clone() + 1e-6).recip() * max_norm).clamp_max(1.0);
    model.visit(&mut Scale { grads, factor });
    norm
}

/// The training forward pass of one batch with its mixing: on the input images, or on the
/// feature map after a stage (`augment.at`). Returns the logits and the soft targets.
#[allow(clippy::too_many_arguments)]
pub fn mixed_forward(
    model: &Model,
    images: Tensor<4>,
    labels: &[usize],
    num_classes: usize,
    mixing: &Mixing,
    at: Option<usize>,
    mix_rng: &mut StdRng,
    model_rng: &mut StdRng,
) -> (Tensor<2>, Tensor<2>) {
    match at {
        None => {
            let mixed = mixing.apply(images, labels, num_classes, mix_rng);
            (model.forward_train(mixed.images, model_rng), mixed.targets)
        }
        Some(stage) => {
            let mut targets = None;
            let logits = model.forward_train_mixed(images, stage, model_rng, &mut |features| {
                let mixed = mixing.apply(features, labels, num_classes, mix_rng);
                targets = Some(mixed.targets);
                mixed.images
            });
            (logits, targets.expect("the model ran the mixing stage"))
        }
    }
}
