//! Class activation maps (Zhou et al., CVPR 2016): for a network that ends in global average
//! pooling and a linear classifier, `CAM_c(y, x) = sum_k w[c, k] * f_k(y, x)` on the last
//! feature map `f` (`[K, h, w]`), upsampled to the input size and min-max normalised.

/// `CAM_class` on one image's features (`[channels, h, w]` row-major) with the classifier's
/// weight (`[classes, channels]` row-major, torchvision's `fc.weight`); `[h, w]`.
pub fn class_map(
    features: &[f32],
    [channels, h, w]: [usize; 3],
    weight: &[f32],
    class: usize,
) -> Vec<f32> {
    assert_eq!(features.len(), channels * h * w, "CAM features length");
    assert!(
        weight.len() >= (class + 1) * channels && weight.len().is_multiple_of(channels),
        "CAM: class {class} is not a row of a [classes, {channels}] classifier weight"
    );
    let row = &weight[class * channels..(class + 1) * channels];
    let mut map = vec![0f64; h * w];
    for (k, &wk) in row.iter().enumerate() {
        let plane = &features[k * h * w..(k + 1) * h * w];
        for (m, &f) in map.iter_mut().zip(plane) {
            *m += wk as f64 * f as f64;
        }
    }
    map.into_iter().map(|v| v as f32).collect()
}

/// Bilinear resampling of `map` (`[h, w]`) to `[out_h, out_w]` with PyTorch's
/// `F.interpolate(mode="bilinear", align_corners=False)` arithmetic: source coordinate
/// `(i + 0.5) * in / out - 0.5`, clamped at 0, neighbours clamped at the edge.
pub fn upsample_bilinear(map: &[f32], [h, w]: [usize; 2], [out_h, out_w]: [usize; 2]) -> Vec<f32> {
    assert_eq!(map.len(), h * w, "map length");
    let taps = |out: usize, len: usize| -> Vec<(usize, usize, f32)> {
        let scale = len as f32 / out as f32;
        (0..out)
            .map(|i| {
                let src = (scale * (i as f32 + 0.5) - 0.5).max(0.0);
                let i0 = (src as usize).min(len - 1);
                let i1 = if i0 < len - 1 { i0 + 1 } else { i0 };
                (i0, i1, src - i0 as f32)
            })
            .collect()
    };
    let (rows, cols) = (taps(out_h, h), taps(out_w, w));
    let mut out = Vec::with_capacity(out_h * out_w);
    for &(y0, y1, ly) in &rows {
        for &(x0, x1, lx) in &cols {
            let top = map[y0 * w + x0] * (1.0 - lx) + map[y0 * w + x1] * lx;
            let bottom = map[y1 * w + x0] * (1.0 - lx) + map[y1 * w + x1] * lx;
            out.push(top * (1.0 - ly) + bottom * ly);
        }
    }
    out
}

/// Min-max normalisation in place: `(m - min) / (max - min)`; a constant map becomes zeros.
pub fn normalise(map: &mut [f32]) {
    let (min, max) = map
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = max - min;
    if range.is_nan() || range <= 0.0 || range.is_infinite() {
        map.fill(0.0);
        return;
    }
    for v in map.iter_mut() {
        *v = (*v - min) / range;
    }
}

/// The CAM of `class` for one image as the analyses use it: [`class_map`], upsampled to the
/// input's `[height, width]` with [`upsample_bilinear`], then [`normalise`]d.
pub fn cam(
    features: &[f32],
    shape: [usize; 3],
    weight: &[f32],
    class: usize,
    input: [usize; 2],
) -> Vec<f32> {
    let [_, h, w] = shape;
    let map = class_map(features, shape, weight, class);
    let mut up = upsample_bilinear(&map, [h, w], input);
    normalise(&mut up);
    up
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_map_is_the_weighted_sum_of_the_feature_planes() {
        // Two channels of 2x2, three classes.
        let features = [1.0, 2.0, 3.0, 4.0, 10.0, 0.0, -10.0, 5.0];
        let weight = [1.0, 0.0, 0.0, 1.0, 0.5, -1.0];
        assert_eq!(
            class_map(&features, [2, 2, 2], &weight, 0),
            [1.0, 2.0, 3.0, 4.0]
        );
        assert_eq!(
            class_map(&features, [2, 2, 2], &weight, 1),
            [10.0, 0.0, -10.0, 5.0]
        );
        assert_eq!(
            class_map(&features, [2, 2, 2], &weight, 2),
            [-9.5, 1.0, 11.5, -3.0]
        );
    }

    /// Values from PyTorch 2.x: `F.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]),
    /// size=(4, 4), mode="bilinear", align_corners=False)`.
    #[test]
    fn bilinear_upsampling_matches_pytorch() {
        let up = upsample_bilinear(&[0.0, 1.0, 2.0, 3.0], [2, 2], [4, 4]);
        let want = [
            0.0, 0.25, 0.75, 1.0, //
            0.5, 0.75, 1.25, 1.5, //
            1.5, 1.75, 2.25, 2.5, //
            2.0, 2.25, 2.75, 3.0,
        ];
        for (g, w) in up.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{up:?}");
        }
        // `F.interpolate(torch.arange(6.).reshape(1, 1, 2, 3), size=(5, 7), ...)`: uneven
        // scales in both directions.
        let up = upsample_bilinear(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [2, 3], [5, 7]);
        let want = [
            0.0,
            0.142_857_15,
            0.571_428_6,
            1.0,
            1.428_571_5,
            1.857_142_9,
            2.0, //
            0.3,
            0.442_857_18,
            0.871_428_7,
            1.3,
            1.728_571_4,
            2.157_142_9,
            2.3, //
            1.5,
            1.642_857_2,
            2.071_428_5,
            2.5,
            2.928_571_4,
            3.357_143,
            3.5, //
            2.7,
            2.842_857_4,
            3.271_428_6,
            3.7,
            4.128_571_5,
            4.557_143,
            4.7, //
            3.0,
            3.142_857_3,
            3.571_428_5,
            4.0,
            4.428_571_7,
            4.857_143,
            5.0,
        ];
        for (g, w) in up.iter().zip(want) {
            assert!((g - w).abs() < 1e-5, "{up:?}");
        }
        // Same size: the identity.
        let same = upsample_bilinear(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0], [2, 3], [2, 3]);
        assert_eq!(same, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn normalisation_spans_zero_to_one_and_flattens_constants() {
        let mut m = [2.0, 4.0, 3.0];
        normalise(&mut m);
        assert_eq!(m, [0.0, 1.0, 0.5]);
        let mut flat = [7.0; 5];
        normalise(&mut flat);
        assert_eq!(flat, [0.0; 5]);
    }
}
