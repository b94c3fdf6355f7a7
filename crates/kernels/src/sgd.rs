//! SGD as PyTorch's `torch.optim.SGD` (momentum, dampening, Nesterov, L2 weight decay), a Burn
//! optimiser ([`Sgd`]) whose step on flex f32 is one pass over each parameter on every thread.
//!
//! Burn's `Sgd` runs up to seven tensor ops per parameter (the decay's multiply and add, the
//! momentum's two multiplies and add, the step's multiply and subtract), each a pass over the
//! parameter on the main thread (flex's elementwise ops run on one thread below 4M values,
//! which every parameter of these models is): 4% of ResNet-50's training step on a 2-core Zen 3,
//! with both workers waiting. [`step`] does the same f32 operations per value in the same
//! order, so the parameters and momentum buffers are bit for bit Burn's; the state is recorded
//! under Burn's names, so a checkpoint written by either optimiser resumes with the other.

use burn::optim::momentum::MomentumConfig;
use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{DType, Device, Tensor};
use rayon::prelude::*;

use crate::{CpuKernels, on_flex};
use burn::backend::Dispatch;

/// Values per parallel task (64 KiB); smaller parameters (biases, BatchNorm's) run on the
/// calling thread.
const CHUNK: usize = 1 << 14;

/// The momentum of an SGD step, as Burn's `Momentum` keeps it (f32).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MomentumRule {
    /// `mu`, the velocity's decay.
    pub momentum: f32,
    /// `1 - dampening`, the gradient's weight in the velocity after the first step.
    pub keep: f32,
    pub nesterov: bool,
}

/// The constants of one parameter's SGD step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdRule {
    pub lr: f32,
    /// The L2 penalty added to the gradient (`p * decay + g`), if any.
    pub weight_decay: Option<f32>,
    pub momentum: Option<MomentumRule>,
    /// Whether the velocity starts here (it is then the gradient itself, whatever `velocity`
    /// holds).
    pub first: bool,
}

/// One parameter's step, value by value, in Burn's order of f32 operations:
/// `g = p * decay + g`; `v = g` on the first step, else `v = g * keep + v * mu`; the update
/// `d = v * mu + g` with Nesterov, else `d = v`; `p = p - d * lr`. `velocity` must be given
/// exactly when `rule` has momentum. On every thread for parameters of more than one chunk.
pub fn step(param: &mut [f32], grad: &[f32], velocity: Option<&mut [f32]>, rule: &SgdRule) {
    assert_eq!(
        param.len(),
        grad.len(),
        "sgd: parameter and gradient lengths"
    );
    assert_eq!(
        velocity.is_some(),
        rule.momentum.is_some(),
        "sgd: a velocity exactly with momentum"
    );
    let serial = param.len() <= CHUNK;
    match velocity {
        Some(velocity) => {
            assert_eq!(velocity.len(), param.len(), "sgd: velocity length");
            let task = |((p, g), v): ((&mut [f32], &[f32]), &mut [f32])| {
                for ((p, &g), v) in p.iter_mut().zip(g).zip(v.iter_mut()) {
                    step_value(p, g, Some(v), rule);
                }
            };
            if serial {
                task(((param, grad), velocity));
            } else {
                param
                    .par_chunks_mut(CHUNK)
                    .zip(grad.par_chunks(CHUNK))
                    .zip(velocity.par_chunks_mut(CHUNK))
                    .for_each(task);
            }
        }
        None => {
            let task = |(p, g): (&mut [f32], &[f32])| {
                for (p, &g) in p.iter_mut().zip(g) {
                    step_value(p, g, None, rule);
                }
            };
            if serial {
                task((param, grad));
            } else {
                param
                    .par_chunks_mut(CHUNK)
                    .zip(grad.par_chunks(CHUNK))
                    .for_each(task);
            }
        }
    }
}

/// [`step`] for one value.
#[inline(always)]
fn step_value(p: &mut f32, g: f32, v: Option<&mut f32>, rule: &SgdRule) {
    let mut g = match rule.weight_decay {
        Some(decay) => *p * decay + g,
        None => g,
    };
    if let (Some(m), Some(v)) = (rule.momentum, v) {
        *v = if rule.first {
            g
        } else {
            g * m.keep + *v * m.momentum
        };
        g = if m.nesterov { *v * m.momentum + g } else { *v };
    }
    *p -= g * rule.lr;
}

/// SGD with momentum and weight decay, as Burn's `SgdConfig::new().with_momentum(..)
/// .with_weight_decay(..).build()` (PyTorch's `torch.optim.SGD`), its step fused into one
/// pass on flex f32 ([`step`]) and Burn's tensor ops elsewhere.
#[derive(Clone, Debug)]
pub struct Sgd {
    weight_decay: Option<f32>,
    momentum: Option<MomentumRule>,
}

impl Sgd {
    /// SGD with `momentum` (plain SGD when `None`) and the L2 penalty `weight_decay` (none at
    /// 0), both as Burn's `SgdConfig` takes them.
    pub fn new(momentum: Option<MomentumConfig>, weight_decay: f32) -> Self {
        Self {
            weight_decay: (weight_decay != 0.0).then_some(weight_decay),
            momentum: momentum.map(|m| MomentumRule {
                momentum: m.momentum as f32,
                keep: (1.0 - m.dampening) as f32,
                nesterov: m.nesterov,
            }),
        }
    }

    /// Burn's `Sgd::step`, op by op (the backends without the fused step).
    fn step_with_ops<const D: usize>(
        &self,
        rule: &SgdRule,
        param: Tensor<D>,
        mut grad: Tensor<D>,
        velocity: Option<Tensor<D>>,
    ) -> (Tensor<D>, Option<Tensor<D>>) {
        if let Some(decay) = rule.weight_decay {
            grad = param.clone().mul_scalar(decay).add(grad);
        }
        let mut next = None;
        if let Some(m) = rule.momentum {
            let velocity = match velocity.filter(|_| !rule.first) {
                Some(v) => grad
                    .clone()
                    .mul_scalar(m.keep)
                    .add(v.mul_scalar(m.momentum)),
                None => grad.clone(),
            };
            grad = if m.nesterov {
                velocity.clone().mul_scalar(m.momentum).add(grad)
            } else {
                velocity.clone()
            };
            next = Some(velocity);
        }
        (param - grad.mul_scalar(rule.lr), next)
    }
}

/// [`Sgd`]'s state for one parameter: its velocity, with momentum.
#[derive(Clone, Debug)]
pub struct SgdState<const D: usize> {
    pub velocity: Option<Tensor<D>>,
}

/// Where Burn's `SgdState` records its momentum's velocity (`momentum` then `velocity`).
const VELOCITY: &str = "momentum.velocity";

impl<const D: usize> RecordState for SgdState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        if let Some(velocity) = &self.velocity {
            out.push_tensor(prefix, VELOCITY, velocity.clone().into_data());
        }
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        let velocity = src
            .take_tensor(prefix, VELOCITY)
            .map(|data| Tensor::from_data(data, device));
        Some(Self { velocity })
    }
}

impl Optimizer for Sgd {
    type State<const D: usize> = SgdState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let velocity = state.and_then(|s| s.velocity);
        let rule = SgdRule {
            lr: lr as f32,
            weight_decay: self.weight_decay,
            momentum: self.momentum,
            first: velocity.is_none(),
        };
        let fused = on_flex(&tensor.device())
            && [tensor.dtype(), grad.dtype()] == [DType::F32; 2]
            && velocity.as_ref().is_none_or(|v| v.dtype() == DType::F32);
        let (tensor, velocity) = match (fused, velocity, self.momentum) {
            (false, velocity, _) => self.step_with_ops(&rule, tensor, grad, velocity),
            (true, _, None) => {
                let tensor =
                    Dispatch::sgd_plain_step(tensor.into_dispatch(), grad.into_dispatch(), rule);
                (Tensor::from_dispatch(tensor), None)
            }
            (true, velocity, Some(_)) => {
                // The first step's velocity is written over with the gradient.
                let velocity = velocity.unwrap_or_else(|| grad.zeros_like());
                let (tensor, velocity) = Dispatch::sgd_momentum_step(
                    tensor.into_dispatch(),
                    grad.into_dispatch(),
                    velocity.into_dispatch(),
                    rule,
                );
                (
                    Tensor::from_dispatch(tensor),
                    Some(Tensor::from_dispatch(velocity)),
                )
            }
        };
        (tensor, Some(SgdState { velocity }))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        SgdState {
            velocity: state.velocity.map(|v| v.to_device(device)),
        }
    }
}
