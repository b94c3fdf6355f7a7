//! Compute cost: multiply-accumulates (MACs) per image, counted over convolutions and the
//! classifier as torchvision's model tables and fvcore count them ("GFLOPS" there).

use burn::nn::Linear;
use burn::nn::conv::Conv2d;

/// MACs of one bias-free convolution with padding `kernel / 2` on an `[h, w]` input; returns
/// them with the output size.
pub(crate) fn conv_macs(conv: &Conv2d, [h, w]: [usize; 2]) -> (u64, [usize; 2]) {
    let [out_channels, in_per_group, kh, kw] = conv.weight.lazy_shape().dims();
    let out =
        |size: usize, kernel: usize, stride: usize| (size + 2 * (kernel / 2) - kernel) / stride + 1;
    let (oh, ow) = (out(h, kh, conv.stride[0]), out(w, kw, conv.stride[1]));
    let macs = (oh * ow * out_channels * in_per_group * kh * kw) as u64;
    (macs, [oh, ow])
}

/// MACs of a linear layer on one input row.
pub(crate) fn linear_macs(linear: &Linear) -> u64 {
    linear.weight.lazy_shape().num_elements() as u64
}
