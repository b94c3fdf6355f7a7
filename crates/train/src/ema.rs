//! An exponential moving average of the weights, as timm's `ModelEmaV2`: after every optimiser
//! step, every float tensor of the model (weights and BatchNorm's running statistics alike)
//! moves `1 - decay` of the way from its average to its current value. The average is evaluated
//! and checkpointed beside the raw weights (`ema.bpk`) and can be exported (`export --ema`).

use std::any::Any;
use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;

use cutmix_models::Model;

/// The averaged model (on the training device, without autodiff) and its decay.
pub struct Ema {
    pub model: Model,
    decay: f64,
}

impl Ema {
    /// Starts the average at `model`'s current weights.
    pub fn new(model: &Model, decay: f64) -> Self {
        Self::from_average(model.valid(), decay)
    }

    /// Continues an average saved earlier (its tensors must carry the training model's ids,
    /// as a checkpoint loaded into `model.valid()` does).
    pub fn from_average(average: Model, decay: f64) -> Self {
        Self {
            model: average,
            decay,
        }
    }

    /// `average = decay * average + (1 - decay) * current`, tensor by tensor.
    pub fn update(&mut self, current: &Model) {
        struct Collect(HashMap<ParamId, Box<dyn Any>>);
        impl ModuleVisitor for Collect {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                self.0.insert(param.id, Box::new(param.val()));
            }
        }
        struct Blend {
            current: HashMap<ParamId, Box<dyn Any>>,
            decay: f64,
        }
        impl ModuleMapper for Blend {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                let current = self
                    .current
                    .remove(&param.id)
                    .and_then(|value| value.downcast::<Tensor<D>>().ok());
                let Some(current) = current else {
                    return param;
                };
                let decay = self.decay;
                param.map(|average| average * decay + *current * (1.0 - decay))
            }
        }
        let mut collect = Collect(HashMap::new());
        current.valid().visit(&mut collect);
        let mut blend = Blend {
            current: collect.0,
            decay: self.decay,
        };
        self.model = self.model.clone().map(&mut blend);
    }
}
