//! The differentiable implementations: forward passes on the inner backend, recorded as one
//! node each with a handwritten backward (the same structure as burn-autodiff's own
//! `batch_norm_train` and `conv2d`, with this crate's kernels in the backward).

use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::ops::{ActivationOps, ConvOptions, ModuleOps};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, TensorMetadata};

use crate::CpuKernels;
use crate::sgd::SgdRule;

type Inner<B> = FloatTensor<B>;

#[derive(Debug)]
struct BatchNormTrainStep;

impl<B: CpuKernels> Backward<B, 3> for BatchNormTrainStep {
    /// Input and gamma checkpointed; the batch statistics kept as the forward computed them;
    /// the output too when the forward had the ReLU.
    type State = (NodeId, NodeId, Inner<B>, Inner<B>, f64, Option<Inner<B>>);

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_gamma, node_beta] = ops.parents;
        let output_grad = grads.consume::<B>(&ops.node);
        let (x_state, gamma_state, mean, variance, epsilon, relu_output) = ops.state;
        let x = checkpointer.retrieve_node_output::<Inner<B>>(x_state);
        let gamma = checkpointer.retrieve_node_output::<Inner<B>>(gamma_state);
        let (x_grad, gamma_grad, beta_grad) = match relu_output {
            Some(output) => B::fused_batch_norm_relu_train_backward(
                x,
                output,
                gamma,
                mean,
                variance,
                epsilon,
                output_grad,
            ),
            None => {
                B::fused_batch_norm_train_backward(x, gamma, mean, variance, epsilon, output_grad)
            }
        };
        if let Some(node) = node_x {
            grads.register::<B>(node.id, x_grad);
        }
        if let Some(node) = node_gamma {
            grads.register::<B>(node.id, gamma_grad);
        }
        if let Some(node) = node_beta {
            grads.register::<B>(node.id, beta_grad);
        }
    }
}

#[derive(Debug)]
struct Conv2dNoBiasStep;

impl<B: CpuKernels> Backward<B, 2> for Conv2dNoBiasStep {
    type State = (NodeId, NodeId, ConvOptions<2>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight] = ops.parents;
        let output_grad = grads.consume::<B>(&ops.node);
        let (x_state, weight_state, options) = ops.state;
        let x = checkpointer.retrieve_node_output::<Inner<B>>(x_state);
        let weight = checkpointer.retrieve_node_output::<Inner<B>>(weight_state);
        if let Some(node) = node_x {
            let grad = B::conv2d_input_grad(
                x.clone(),
                weight.clone(),
                output_grad.clone(),
                options.clone(),
            );
            grads.register::<B>(node.id, grad);
        }
        if let Some(node) = node_weight {
            let grad = B::conv2d_weight_grad(x, weight, output_grad, options);
            grads.register::<B>(node.id, grad);
        }
    }
}

#[derive(Debug)]
struct AddReluStep;

impl<B: CpuKernels> Backward<B, 2> for AddReluStep {
    /// The output (the gradient is zero where it is).
    type State = Inner<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let output_grad = grads.consume::<B>(&ops.node);
        let grad = B::relu_backward_fused(ops.state, output_grad);
        if let Some(node) = node_a {
            grads.register::<B>(node.id, grad.clone());
        }
        if let Some(node) = node_b {
            grads.register::<B>(node.id, grad);
        }
    }
}

#[derive(Debug)]
struct AddPaddedChannelsStep;

impl<B: CpuKernels> Backward<B, 2> for AddPaddedChannelsStep {
    /// The channels of `b`.
    type State = usize;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node_a, node_b] = ops.parents;
        let output_grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node_b {
            grads.register::<B>(node.id, B::leading_channels(output_grad.clone(), ops.state));
        }
        if let Some(node) = node_a {
            grads.register::<B>(node.id, output_grad);
        }
    }
}

#[derive(Debug)]
struct AllReduceSumStep;

impl<B: CpuKernels> Backward<B, 1> for AllReduceSumStep {
    type State = ();

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let [node] = ops.parents;
        let output_grad = grads.consume::<B>(&ops.node);
        if let Some(node) = node {
            grads.register::<B>(node.id, B::all_reduce_sum(output_grad));
        }
    }
}

impl<B: CpuKernels, C: CheckpointStrategy> CpuKernels for Autodiff<B, C> {
    fn all_reduce_sum(x: FloatTensor<Self>) -> FloatTensor<Self> {
        AllReduceSumStep
            .prepare::<C>([x.node()])
            .compute_bound()
            .stateless(B::all_reduce_sum(x.into_primitive()))
    }

    fn add_relu(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        match AddReluStep
            .prepare::<C>([a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::add_relu(a.into_primitive(), b.into_primitive());
                prep.finish(output.clone(), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::add_relu(a.into_primitive(), b.into_primitive()))
            }
        }
    }

    fn add_padded_channels(a: FloatTensor<Self>, b: FloatTensor<Self>) -> FloatTensor<Self> {
        let channels = b.shape()[1];
        match AddPaddedChannelsStep
            .prepare::<C>([a.node(), b.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(
                channels,
                B::add_padded_channels(a.into_primitive(), b.into_primitive()),
            ),
            OpsKind::UnTracked(prep) => prep.finish(B::add_padded_channels(
                a.into_primitive(),
                b.into_primitive(),
            )),
        }
    }

    fn sgd_momentum_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        velocity: FloatTensor<Self>,
        rule: SgdRule,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (param, velocity) = B::sgd_momentum_step(
            param.into_primitive(),
            grad.into_primitive(),
            velocity.into_primitive(),
            rule,
        );
        (Self::from_inner(param), Self::from_inner(velocity))
    }

    fn sgd_plain_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        rule: SgdRule,
    ) -> FloatTensor<Self> {
        Self::from_inner(B::sgd_plain_step(
            param.into_primitive(),
            grad.into_primitive(),
            rule,
        ))
    }

    fn leading_channels(_x: FloatTensor<Self>, _channels: usize) -> FloatTensor<Self> {
        panic!("leading_channels is a backward step here, not differentiable");
    }

    fn relu_backward_fused(
        _output: FloatTensor<Self>,
        _grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        panic!("the ReLU backward is not differentiable (no double backward)");
    }

    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let statistics = |mean, variance| (Self::from_inner(mean), Self::from_inner(variance));
        match BatchNormTrainStep
            .prepare::<C>([x.node(), gamma.node(), beta.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let gamma_state = prep.checkpoint(&gamma);
                let (output, mean, variance) = B::fused_batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                    relu,
                );
                let state = (
                    x_state,
                    gamma_state,
                    mean.clone(),
                    variance.clone(),
                    epsilon,
                    relu.then(|| output.clone()),
                );
                let output = prep.finish(state, output);
                let (mean, variance) = statistics(mean, variance);
                (output, mean, variance)
            }
            OpsKind::UnTracked(prep) => {
                let (output, mean, variance) = B::fused_batch_norm_train(
                    x.into_primitive(),
                    gamma.into_primitive(),
                    beta.into_primitive(),
                    epsilon,
                    relu,
                );
                let (mean, variance) = statistics(mean, variance);
                (prep.finish(output), mean, variance)
            }
        }
    }

    fn fused_batch_norm_train_backward(
        _x: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _mean: FloatTensor<Self>,
        _variance: FloatTensor<Self>,
        _epsilon: f64,
        _output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        panic!("the BatchNorm training backward is not differentiable (no double backward)");
    }

    fn fused_batch_norm_relu_train_backward(
        _x: FloatTensor<Self>,
        _output: FloatTensor<Self>,
        _gamma: FloatTensor<Self>,
        _mean: FloatTensor<Self>,
        _variance: FloatTensor<Self>,
        _epsilon: f64,
        _output_grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        panic!("the BatchNorm training backward is not differentiable (no double backward)");
    }

    /// Burn's own ops (differentiable in every argument): `batch_norm` only calls the kernel on
    /// a device without autodiff.
    fn batch_norm_inference(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        mean: FloatTensor<Self>,
        variance: FloatTensor<Self>,
        epsilon: f64,
        relu: bool,
    ) -> FloatTensor<Self> {
        let out = <Self as ModuleOps<Self>>::batch_norm(x, gamma, beta, mean, variance, epsilon);
        if relu { Self::relu(out) } else { out }
    }

    fn conv2d_no_bias(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        match Conv2dNoBiasStep
            .prepare::<C>([x.node(), weight.node()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(mut prep) => {
                let x_state = prep.checkpoint(&x);
                let weight_state = prep.checkpoint(&weight);
                let output =
                    B::conv2d_no_bias(x.into_primitive(), weight.into_primitive(), options.clone());
                prep.finish((x_state, weight_state, options), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::conv2d_no_bias(
                x.into_primitive(),
                weight.into_primitive(),
                options,
            )),
        }
    }

    fn conv2d_input_grad(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _output_grad: FloatTensor<Self>,
        _options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        panic!("the conv2d input gradient is not differentiable (no double backward)");
    }

    fn conv2d_weight_grad(
        _x: FloatTensor<Self>,
        _weight: FloatTensor<Self>,
        _output_grad: FloatTensor<Self>,
        _options: ConvOptions<2>,
    ) -> FloatTensor<Self> {
        panic!("the conv2d weight gradient is not differentiable (no double backward)");
    }
}
