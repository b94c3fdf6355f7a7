//! The kernels on flex's tensors: f32 inputs run this crate's kernels (made contiguous first when
//! they are views); other dtypes and grouped convolutions run flex's own ops.

use burn::backend::flex::FlexTensor;
use burn::backend::ops::{ActivationOps, ConvOptions, FloatTensorOps, ModuleOps};
use burn::backend::{DType, Flex, TensorData, TensorMetadata};

use crate::CpuKernels;
use crate::batch_norm::{self, Planes};
use crate::conv::{self, ConvShape};
use crate::residual;
use crate::sgd::{self, SgdRule};

/// A flex tensor's values as one contiguous f32 slice (copying a view first).
fn contiguous(tensor: FlexTensor) -> FlexTensor {
    if tensor.as_slice::<f32>().is_some() {
        tensor
    } else {
        tensor.to_contiguous()
    }
}

fn values(tensor: &FlexTensor) -> &[f32] {
    tensor.as_slice::<f32>().expect("a contiguous f32 tensor")
}

/// Whether a tensor's values may be written in place: nothing else shares them and they are
/// its whole storage, in order.
fn in_place(tensor: &FlexTensor) -> bool {
    let elements = tensor.shape().num_elements();
    tensor.is_unique()
        && tensor.layout().contiguous_offsets() == Some((0, elements))
        && tensor.bytes().len() == elements * size_of::<f32>()
}

/// `tensor` itself where it may be written in place, else a contiguous copy of its values.
fn unshared(tensor: FlexTensor) -> FlexTensor {
    if in_place(&tensor) {
        return tensor;
    }
    let dims = tensor.shape().to_vec();
    self::tensor(values(&contiguous(tensor)).to_vec(), dims)
}

/// The values of a tensor [`unshared`] returned, to write.
fn storage(tensor: &mut FlexTensor) -> &mut [f32] {
    tensor
        .try_storage_mut::<f32>()
        .expect("an unshared f32 tensor")
}

fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Flex's own ReLU of `tensor` when `relu` is set (the fallbacks for other dtypes).
fn relu_if(relu: bool, tensor: FlexTensor) -> FlexTensor {
    if relu { Flex::relu(tensor) } else { tensor }
}

fn all_f32(tensors: &[&FlexTensor]) -> bool {
    tensors.iter().all(|t| t.dtype() == DType::F32)
}

/// `op(target[i], other[i])` over two f32 tensors of one shape, on every thread: written over
/// `target` where nothing else shares it, else into a new tensor. (`op` a function item, so it
/// is inlined into the loops.)
fn zip_f32(
    target: FlexTensor,
    other: FlexTensor,
    op: impl Fn(f32, f32) -> f32 + Sync + Send,
) -> FlexTensor {
    let other = contiguous(other);
    if in_place(&target) {
        let mut target = target;
        let out = target
            .try_storage_mut::<f32>()
            .expect("an unshared f32 tensor");
        residual::zip_in_place(out, values(&other), op);
        return target;
    }
    let dims = target.shape().to_vec();
    let target = contiguous(target);
    tensor(residual::zip(values(&target), values(&other), op), dims)
}

impl CpuKernels for Flex {
    fn fused_batch_norm_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
        relu: bool,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        if !all_f32(&[&x, &gamma, &beta]) {
            let out = <Flex as ModuleOps<Flex>>::batch_norm_train(x, gamma, beta, epsilon);
            return (relu_if(relu, out.output), out.mean, out.variance);
        }
        let dims = x.shape().to_vec();
        let planes = Planes::from_dims(&dims);
        let (x, gamma, beta) = (contiguous(x), contiguous(gamma), contiguous(beta));
        let (x, gamma, beta) = (values(&x), values(&gamma), values(&beta));
        let out = batch_norm::forward(x, gamma, beta, epsilon, planes, relu);
        (
            tensor(out.output, dims),
            tensor(out.mean, vec![planes.channels]),
            tensor(out.variance, vec![planes.channels]),
        )
    }

    fn fused_batch_norm_train_backward(
        x: FlexTensor,
        gamma: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        output_grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        batch_norm_backward(x, None, [gamma, mean, variance], epsilon, output_grad)
    }

    fn fused_batch_norm_relu_train_backward(
        x: FlexTensor,
        output: FlexTensor,
        gamma: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        output_grad: FlexTensor,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        batch_norm_backward(
            x,
            Some(output),
            [gamma, mean, variance],
            epsilon,
            output_grad,
        )
    }

    fn batch_norm_inference(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        mean: FlexTensor,
        variance: FlexTensor,
        epsilon: f64,
        relu: bool,
    ) -> FlexTensor {
        if !all_f32(&[&x, &gamma, &beta, &mean, &variance]) {
            let out =
                <Flex as ModuleOps<Flex>>::batch_norm(x, gamma, beta, mean, variance, epsilon);
            return relu_if(relu, out);
        }
        let planes = Planes::from_dims(&x.shape().to_vec());
        let [gamma, beta, mean, variance] = [gamma, beta, mean, variance].map(contiguous);
        let running = batch_norm::Running {
            mean: values(&mean),
            variance: values(&variance),
            gamma: values(&gamma),
            beta: values(&beta),
            epsilon,
        };
        if in_place(&x) {
            let mut x = x;
            let out = x.try_storage_mut::<f32>().expect("an unshared f32 tensor");
            batch_norm::inference(None, out, running, planes, relu);
            return x;
        }
        let dims = x.shape().to_vec();
        let x = contiguous(x);
        let mut out = vec![0f32; values(&x).len()];
        batch_norm::inference(Some(values(&x)), &mut out, running, planes, relu);
        tensor(out, dims)
    }

    fn add_relu(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        if !all_f32(&[&a, &b]) || a.shape() != b.shape() {
            return Flex::relu(Flex::float_add(a, b));
        }
        zip_f32(a, b, residual::add_relu)
    }

    fn relu_backward_fused(output: FlexTensor, grad: FlexTensor) -> FlexTensor {
        if !all_f32(&[&output, &grad]) || output.shape() != grad.shape() {
            return Flex::relu_backward(output, grad);
        }
        zip_f32(grad, output, residual::relu_backward)
    }

    fn add_padded_channels(a: FlexTensor, b: FlexTensor) -> FlexTensor {
        assert!(all_f32(&[&a, &b]), "add_padded_channels on flex: f32 only");
        let items = a.shape()[0];
        let b = contiguous(b);
        let mut a = unshared(a);
        let out = a.try_storage_mut::<f32>().expect("an unshared f32 tensor");
        residual::add_leading(out, values(&b), items);
        a
    }

    fn leading_channels(x: FlexTensor, channels: usize) -> FlexTensor {
        assert_eq!(x.dtype(), DType::F32, "leading_channels on flex: f32 only");
        let mut dims = x.shape().to_vec();
        if dims[1] == channels {
            return x;
        }
        let x = contiguous(x);
        let per_channel: usize = dims[2..].iter().product();
        let out = residual::leading(values(&x), dims[0], channels * per_channel);
        dims[1] = channels;
        tensor(out, dims)
    }

    fn sgd_momentum_step(
        param: FlexTensor,
        grad: FlexTensor,
        velocity: FlexTensor,
        rule: SgdRule,
    ) -> (FlexTensor, FlexTensor) {
        assert!(
            all_f32(&[&param, &grad, &velocity]),
            "sgd_step on flex: f32 only"
        );
        let grad = contiguous(grad);
        let (mut param, mut velocity) = (unshared(param), unshared(velocity));
        sgd::step(
            storage(&mut param),
            values(&grad),
            Some(storage(&mut velocity)),
            &rule,
        );
        (param, velocity)
    }

    fn sgd_plain_step(param: FlexTensor, grad: FlexTensor, rule: SgdRule) -> FlexTensor {
        assert!(all_f32(&[&param, &grad]), "sgd_step on flex: f32 only");
        let grad = contiguous(grad);
        let mut param = unshared(param);
        sgd::step(storage(&mut param), values(&grad), None, &rule);
        param
    }

    fn all_reduce_sum(x: FlexTensor) -> FlexTensor {
        let Some(reducer) = crate::batch_norm_reducer() else {
            return x;
        };
        let dims = x.shape().to_vec();
        let mut summed = values(&contiguous(x)).to_vec();
        reducer(&mut summed);
        tensor(summed, dims)
    }

    fn conv2d_no_bias(x: FlexTensor, weight: FlexTensor, options: ConvOptions<2>) -> FlexTensor {
        if options.groups != 1 || !all_f32(&[&x, &weight]) {
            return <Flex as ModuleOps<Flex>>::conv2d(x, weight, None, options);
        }
        let shape = conv_shape(&x, &weight, None, &options);
        let (x, weight) = (contiguous(x), contiguous(weight));
        let output = conv::forward(values(&x), values(&weight), shape);
        let [oh, ow] = shape.output;
        tensor(output, vec![shape.batch, shape.out_channels, oh, ow])
    }

    fn conv2d_input_grad(
        x: FlexTensor,
        weight: FlexTensor,
        output_grad: FlexTensor,
        options: ConvOptions<2>,
    ) -> FlexTensor {
        if options.groups != 1 || !all_f32(&[&x, &weight, &output_grad]) {
            return <Flex as ModuleOps<Flex>>::conv2d_x_backward(x, weight, output_grad, options);
        }
        let shape = conv_shape(&x, &weight, Some(&output_grad), &options);
        let (weight, output_grad) = (contiguous(weight), contiguous(output_grad));
        let grad = conv::input_grad(values(&weight), values(&output_grad), shape);
        let [h, w] = shape.input;
        tensor(grad, vec![shape.batch, shape.in_channels, h, w])
    }

    fn conv2d_weight_grad(
        x: FlexTensor,
        weight: FlexTensor,
        output_grad: FlexTensor,
        options: ConvOptions<2>,
    ) -> FlexTensor {
        if options.groups != 1 || !all_f32(&[&x, &weight, &output_grad]) {
            return <Flex as ModuleOps<Flex>>::conv2d_weight_backward(
                x,
                weight,
                output_grad,
                options,
            );
        }
        let shape = conv_shape(&x, &weight, Some(&output_grad), &options);
        let (x, output_grad) = (contiguous(x), contiguous(output_grad));
        let grad = conv::weight_grad(values(&x), values(&output_grad), shape);
        let [kh, kw] = shape.kernel;
        tensor(grad, vec![shape.out_channels, shape.in_channels, kh, kw])
    }
}

/// Both BatchNorm backwards: through the ReLU first when the forward's `relu_output` is given;
/// `per_channel` is `[gamma, mean, variance]`.
fn batch_norm_backward(
    x: FlexTensor,
    relu_output: Option<FlexTensor>,
    per_channel: [FlexTensor; 3],
    epsilon: f64,
    output_grad: FlexTensor,
) -> (FlexTensor, FlexTensor, FlexTensor) {
    let [gamma, mean, variance] = per_channel;
    let relu_f32 = relu_output.as_ref().is_none_or(|o| o.dtype() == DType::F32);
    if !relu_f32 || !all_f32(&[&x, &gamma, &mean, &variance, &output_grad]) {
        let output_grad = match relu_output {
            Some(output) => Flex::relu_backward(output, output_grad),
            None => output_grad,
        };
        let grads = <Flex as ModuleOps<Flex>>::batch_norm_train_backward(
            x,
            gamma,
            mean,
            variance,
            epsilon,
            output_grad,
        );
        return (grads.x_grad, grads.gamma_grad, grads.beta_grad);
    }
    let dims = x.shape().to_vec();
    let planes = Planes::from_dims(&dims);
    let [x, gamma, mean, variance, output_grad] =
        [x, gamma, mean, variance, output_grad].map(contiguous);
    let relu_output = relu_output.map(contiguous);
    let saved = batch_norm::Saved {
        x: values(&x),
        gamma: values(&gamma),
        mean: values(&mean),
        variance: values(&variance),
        epsilon,
        relu_output: relu_output.as_ref().map(values),
    };
    let grads = batch_norm::backward(saved, values(&output_grad), planes);
    (
        tensor(grads.x_grad, dims),
        tensor(grads.gamma_grad, vec![planes.channels]),
        tensor(grads.beta_grad, vec![planes.channels]),
    )
}

/// The geometry of a convolution of `x` by `weight`; the output size from the output gradient
/// when there is one, else from the options (begin and end padding).
fn conv_shape(
    x: &FlexTensor,
    weight: &FlexTensor,
    output_grad: Option<&FlexTensor>,
    options: &ConvOptions<2>,
) -> ConvShape {
    let [batch, in_channels, h, w] = dims4(x);
    let [out_channels, weight_in, kh, kw] = dims4(weight);
    assert_eq!(
        weight_in, in_channels,
        "conv2d: the weight takes {weight_in} input channels, the input has {in_channels}"
    );
    let output = match output_grad {
        Some(grad) => {
            let [_, _, oh, ow] = dims4(grad);
            [oh, ow]
        }
        None => [0, 1].map(|d| {
            let (begin, end) = options.padding[d];
            let input = [h, w][d] + begin + end;
            let span = options.dilation[d] * ([kh, kw][d] - 1) + 1;
            assert!(
                input >= span,
                "conv2d: a kernel spanning {span} does not fit an input of {input} (padded)"
            );
            (input - span) / options.stride[d] + 1
        }),
    };
    ConvShape {
        batch,
        in_channels,
        out_channels,
        input: [h, w],
        output,
        kernel: [kh, kw],
        stride: options.stride,
        padding: options.padding_begin(),
        dilation: options.dilation,
    }
}

fn dims4(tensor: &FlexTensor) -> [usize; 4] {
    let shape = tensor.shape();
    assert_eq!(
        shape.num_dims(),
        4,
        "conv2d tensors have rank 4, got {shape:?}"
    );
    [shape[0], shape[1], shape[2], shape[3]]
}
