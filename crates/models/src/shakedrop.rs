//! ShakeDrop (Yamada et al., 2018) as PyramidNet+ShakeDrop applies it to each residual branch,
//! following the PyTorch port the CutMix authors' PyramidNet code uses.
//!
//! Training: one gate per batch, kept with probability `1 - drop_prob`. A kept batch passes
//! unchanged; a dropped one is scaled per sample by alpha ~ U(-1, 1) in the forward pass and
//! its gradient by beta ~ U(0, 1) in the backward pass. Evaluation scales by the expectation,
//! `1 - drop_prob`. Block `l` of `L` drops with probability `p_L * l / L` (the keep probability
//! decays linearly from 1 to `1 - p_L`; `p_L = 0.5` in the paper).

use burn::module::Module;
use burn::tensor::{Tensor, TensorData};
use rand::{Rng, RngExt};

/// The ShakeDrop gate of one residual branch.
#[derive(Module, Debug)]
pub struct ShakeDrop {
    /// Probability that a training batch is perturbed (0 = never).
    pub drop_prob: f64,
}

impl ShakeDrop {
    /// The linear-decay rule: block `index` (0-based) of `total` drops with probability
    /// `final_drop * (index + 1) / total`.
    pub fn linear_decay(final_drop: f64, index: usize, total: usize) -> Self {
        Self {
            drop_prob: final_drop * (index + 1) as f64 / total as f64,
        }
    }

    /// The evaluation form: the branch scaled by the keep probability.
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, h, w]`; output: the same.
    pub fn forward_eval(&self, x: Tensor<4>) -> Tensor<4> {
        if self.drop_prob == 0.0 {
            x
        } else {
            x.mul_scalar(1.0 - self.drop_prob)
        }
    }

    /// The training form, drawing the gate, alpha and beta from `rng` (gate first, then one
    /// alpha per sample, then one beta per sample).
    ///
    /// # Shapes
    /// - `x`: `[batch, channels, h, w]`; output: the same.
    pub fn forward_train(&self, x: Tensor<4>, rng: &mut impl Rng) -> Tensor<4> {
        if self.drop_prob == 0.0 {
            return x;
        }
        let kept = rng.random::<f64>() >= self.drop_prob;
        if kept {
            return x;
        }
        let batch = x.dims()[0];
        let alpha: Vec<f32> = (0..batch).map(|_| rng.random_range(-1.0..1.0)).collect();
        let beta: Vec<f32> = (0..batch).map(|_| rng.random_range(0.0..1.0)).collect();
        let device = x.device();
        let per_sample = |values: Vec<f32>| {
            Tensor::<4>::from_data(TensorData::new(values, [batch, 1, 1, 1]), &device)
        };
        let (alpha, beta) = (per_sample(alpha), per_sample(beta));
        // Forward value x * alpha, gradient beta: the detached part carries the difference.
        let through = x.clone() * beta;
        through.clone() + (x * alpha - through).detach()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn values(x: Tensor<4>) -> Vec<f32> {
        x.into_data().try_into_vec_as::<f32>().unwrap()
    }

    #[test]
    fn keep_probability_decays_linearly_to_one_minus_the_final_drop() {
        let total = 66;
        let first = ShakeDrop::linear_decay(0.5, 0, total).drop_prob;
        let last = ShakeDrop::linear_decay(0.5, total - 1, total).drop_prob;
        assert!((first - 0.5 / 66.0).abs() < 1e-12);
        assert_eq!(last, 0.5);
    }

    #[test]
    fn dropped_batches_scale_forward_by_alpha_and_gradients_by_beta() {
        let device = Device::flex().autodiff();
        let shake = ShakeDrop { drop_prob: 1.0 };
        let x = Tensor::<4>::ones([3, 2, 2, 2], &device).require_grad();
        let mut rng = StdRng::seed_from_u64(7);
        let out = shake.forward_train(x.clone(), &mut rng);
        let forward = values(out.clone().detach());
        let grads = out.sum().backward();
        let grad = values(x.grad(&grads).unwrap());

        // The same draws, replayed: gate, then alphas, then betas.
        let mut replay = StdRng::seed_from_u64(7);
        let _gate = replay.random::<f64>();
        let alpha: Vec<f32> = (0..3).map(|_| replay.random_range(-1.0..1.0)).collect();
        let beta: Vec<f32> = (0..3).map(|_| replay.random_range(0.0..1.0)).collect();
        for sample in 0..3 {
            for i in 0..8 {
                let at = sample * 8 + i;
                assert!((forward[at] - alpha[sample]).abs() < 1e-6);
                assert!((grad[at] - beta[sample]).abs() < 1e-6);
            }
        }
        assert!(alpha.iter().all(|a| (-1.0..1.0).contains(a)));
        assert!(beta.iter().all(|b| (0.0..1.0).contains(b)));
    }

    #[test]
    fn evaluation_scales_by_the_keep_probability_and_zero_is_identity() {
        let device = Device::flex();
        let x = Tensor::<4>::ones([1, 1, 1, 2], &device);
        let half = ShakeDrop { drop_prob: 0.25 }.forward_eval(x.clone());
        assert_eq!(values(half), vec![0.75, 0.75]);
        let off = ShakeDrop { drop_prob: 0.0 };
        let mut rng = StdRng::seed_from_u64(0);
        assert_eq!(values(off.forward_train(x, &mut rng)), vec![1.0, 1.0]);
    }
}
