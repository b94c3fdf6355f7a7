//! Property tests over every method, mode and partner rule, on random images and many seeds,
//! on flex and on wgpu (Mesa's software Vulkan device where there is no GPU).

use burn::tensor::{Device, DeviceKind, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use crate::*;

const CLASSES: usize = 7;

fn devices() -> [Device; 2] {
    [Device::flex(), Device::wgpu(DeviceKind::Cpu)]
}

fn methods(prob: f64) -> Vec<(String, Mixing)> {
    let mut all = Vec::new();
    for mode in [Mode::Batch, Mode::Elem] {
        for partner in [Partner::Permutation, Partner::Flip, Partner::Roll] {
            let cutmix = CutMix {
                beta: 1.0,
                prob,
                mode,
                partner,
                variant: Default::default(),
            };
            let mixup = Mixup {
                alpha: 0.4,
                prob,
                mode,
                partner,
            };
            let tag = format!("{mode:?}/{partner:?}");
            all.push((format!("cutmix {tag}"), Mixing::CutMix(cutmix.clone())));
            all.push((format!("mixup {tag}"), Mixing::Mixup(mixup.clone())));
            all.push((
                format!("cutmix+mixup {tag}"),
                Mixing::CutMixOrMixup(CutMixOrMixup {
                    cutmix,
                    mixup,
                    switch_prob: 0.5,
                }),
            ));
        }
    }
    all.push(("cutout".into(), Mixing::Cutout(Cutout { size: 5, prob })));
    for (tag, variant) in table8_variants() {
        for mode in [Mode::Batch, Mode::Elem] {
            let cutmix = CutMix {
                beta: 1.0,
                prob,
                mode,
                partner: Partner::Permutation,
                variant,
            };
            all.push((format!("cutmix {tag} {mode:?}"), Mixing::CutMix(cutmix)));
        }
    }
    all
}

/// The paper's Table 8 variants (scheduled CutMix is CutMix with a ramped probability:
/// [`Mixing::with_prob_scaled`]).
fn table8_variants() -> Vec<(&'static str, Variant)> {
    vec![
        (
            "centre-gaussian",
            Variant {
                centre: Centre::Gaussian { sigma: 0.1 },
                ..Variant::default()
            },
        ),
        (
            "fixed-size",
            Variant {
                box_size: Some(4),
                ..Variant::default()
            },
        ),
        (
            "one-hot",
            Variant {
                targets: Targets::OneHot,
                ..Variant::default()
            },
        ),
        (
            "complete-label",
            Variant {
                targets: Targets::Complete,
                ..Variant::default()
            },
        ),
    ]
}

fn random_batch(batch: usize, channels: usize, side: usize, seed: u64) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..batch * channels * side * side)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect()
}

fn to_vec<const D: usize>(tensor: Tensor<D>) -> Vec<f32> {
    tensor.into_data().try_into_vec_as::<f32>().unwrap()
}

/// The draw applied pixel by pixel on the host, one image at a time.
fn naive(draw: &Draw, images: &[f32], batch: usize, channels: usize, side: usize) -> Vec<f32> {
    let plane = side * side;
    let mut out = vec![0.0; images.len()];
    for i in 0..batch {
        let p = draw.partners[i];
        let cut = draw.boxes[i];
        for c in 0..channels {
            for y in 0..side {
                for x in 0..side {
                    let at = |image: usize| (image * channels + c) * plane + y * side + x;
                    let partner = if draw.zero_fill { 0.0 } else { images[at(p)] };
                    let inside = (cut.y1..cut.y2).contains(&y) && (cut.x1..cut.x2).contains(&x);
                    out[at(i)] = if inside {
                        partner
                    } else {
                        let b = draw.blends[i];
                        images[at(i)] * b + partner * (1.0 - b)
                    };
                }
            }
        }
    }
    out
}

#[test]
fn the_batched_result_equals_a_per_image_loop_and_targets_are_consistent() {
    let (batch, channels, side) = (6, 2, 9);
    let labels = [0, 1, 2, 3, 4, 5];
    for (device, (name, mixing)) in devices()
        .into_iter()
        .flat_map(|device| methods(0.7).into_iter().map(move |m| (device.clone(), m)))
    {
        for seed in 0..12 {
            let pixels = random_batch(batch, channels, side, seed);
            let images = Tensor::<4>::from_data(
                TensorData::new(pixels.clone(), [batch, channels, side, side]),
                &device,
            );
            let draw = mixing.draw(batch, side, side, &mut StdRng::seed_from_u64(seed));
            let mixed = draw.apply(images, &labels, CLASSES);
            let ours = to_vec(mixed.images);
            let expected = naive(&draw, &pixels, batch, channels, side);
            for (a, b) in ours.iter().zip(&expected) {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{name} {device:?} seed {seed}: {a} vs {b}"
                );
            }
            let targets = to_vec(mixed.targets);
            for i in 0..batch {
                let row = &targets[i * CLASSES..(i + 1) * CLASSES];
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-6, "{name}: row {i} sums to {sum}");
                let lambda = draw.lambdas[i];
                let partner = labels[draw.partners[i]];
                let nonzero = row.iter().filter(|&&v| v > 0.0).count();
                if partner != labels[i] && lambda > 0.0 && lambda < 1.0 {
                    assert_eq!(nonzero, 2, "{name}: two classes in row {i}");
                    assert_eq!(row[labels[i]], lambda);
                } else {
                    assert_eq!(nonzero, 1, "{name}: one class in row {i}");
                }
                // CutMix's lambda is the counted share of the image's own pixels (the target
                // variants have their own rules, tested below).
                let by_area = !name.contains("one-hot") && !name.contains("complete");
                if by_area && draw.blends[i] == 1.0 && !draw.zero_fill && partner != labels[i] {
                    let own = (side * side - draw.boxes[i].area()) as f32 / (side * side) as f32;
                    assert_eq!(lambda, own, "{name}: lambda of image {i}");
                }
            }
        }
    }
}

#[test]
fn prob_zero_is_the_identity_for_every_method() {
    let pixels = random_batch(4, 3, 8, 1);
    for (device, (name, mixing)) in devices()
        .into_iter()
        .flat_map(|device| methods(0.0).into_iter().map(move |m| (device.clone(), m)))
    {
        let images = Tensor::<4>::from_data(TensorData::new(pixels.clone(), [4, 3, 8, 8]), &device);
        let mixed = mixing.apply(
            images,
            &[0, 1, 2, 3],
            CLASSES,
            &mut StdRng::seed_from_u64(3),
        );
        assert_eq!(to_vec(mixed.images), pixels, "{name}");
        assert!(mixed.lambdas.iter().all(|&l| l == 1.0), "{name}");
    }
}

#[test]
fn elem_mode_draws_each_image_its_own_box_and_lambda() {
    let cutmix = CutMix {
        beta: 1.0,
        prob: 1.0,
        mode: Mode::Elem,
        partner: Partner::Permutation,
        variant: Default::default(),
    };
    let draw = cutmix.draw(32, 32, 32, &mut StdRng::seed_from_u64(0));
    let distinct: std::collections::BTreeSet<_> = draw
        .boxes
        .iter()
        .map(|b| (b.y1, b.y2, b.x1, b.x2))
        .collect();
    assert!(
        distinct.len() > 20,
        "{} distinct boxes of 32",
        distinct.len()
    );
    let batch = CutMix {
        mode: Mode::Batch,
        ..cutmix
    }
    .draw(32, 32, 32, &mut StdRng::seed_from_u64(0));
    assert!(batch.boxes.iter().all(|b| *b == batch.boxes[0]));
}

#[test]
fn box_starts_cover_every_row_and_column_in_both_modes() {
    for mode in [Mode::Batch, Mode::Elem] {
        let cutmix = CutMix {
            beta: 1.0,
            prob: 1.0,
            mode,
            partner: Partner::Permutation,
            variant: Default::default(),
        };
        let mut rng = StdRng::seed_from_u64(11);
        let (mut starts, mut ends) = ([0usize; 8], [0usize; 9]);
        for _ in 0..4000 {
            let draw = cutmix.draw(2, 8, 8, &mut rng);
            let b = draw.boxes[0];
            starts[b.y1] += 1;
            starts[b.x1] += 1;
            ends[b.y2] += 1;
            ends[b.x2] += 1;
        }
        // Every start position is reached, the last row and column included, and every end.
        assert!(starts.iter().all(|&n| n > 0), "{mode:?} starts {starts:?}");
        assert!(ends[1..].iter().all(|&n| n > 0), "{mode:?} ends {ends:?}");
    }
}

#[test]
fn corrected_lambda_statistics_match_a_direct_simulation_of_the_reference() {
    // The reference's rand_bbox written out independently (numpy semantics), with its own
    // generator: lam ~ U(0, 1) (Beta(1, 1)), cut = int(W * sqrt(1 - lam)), centre uniform,
    // clip(c -/+ cut // 2, 0, W), lam = 1 - area / (W * H).
    fn moments(values: &[f64]) -> (f64, f64) {
        let mean = values.iter().sum::<f64>() / values.len() as f64;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / values.len() as f64;
        (mean, var.sqrt())
    }
    for side in [32usize, 224] {
        let n = 40_000;
        let mut rng = StdRng::seed_from_u64(99);
        let simulated: Vec<f64> = (0..n)
            .map(|_| {
                let lam: f64 = rng.random();
                let cut = (side as f64 * (1.0 - lam).sqrt()) as i64;
                let (cx, cy) = (
                    rng.random_range(0..side as i64),
                    rng.random_range(0..side as i64),
                );
                let clip = |v: i64| v.clamp(0, side as i64);
                let w = clip(cx + cut / 2) - clip(cx - cut / 2);
                let h = clip(cy + cut / 2) - clip(cy - cut / 2);
                1.0 - (w * h) as f64 / (side * side) as f64
            })
            .collect();
        let cutmix = CutMix {
            beta: 1.0,
            prob: 1.0,
            mode: Mode::Elem,
            partner: Partner::Permutation,
            variant: Default::default(),
        };
        let mut ours_rng = StdRng::seed_from_u64(5);
        let ours: Vec<f64> = (0..n / 8)
            .flat_map(|_| cutmix.draw(8, side, side, &mut ours_rng).lambdas)
            .map(f64::from)
            .collect();
        let ((m1, s1), (m2, s2)) = (moments(&simulated), moments(&ours));
        assert!(
            (m1 - m2).abs() < 0.01,
            "side {side}: mean {m2} vs simulated {m1}"
        );
        assert!(
            (s1 - s2).abs() < 0.01,
            "side {side}: std {s2} vs simulated {s1}"
        );
    }
}

#[test]
fn label_smoothing_keeps_rows_summing_to_one() {
    let device = Device::flex();
    let targets = soft_targets(&[0, 2], &[1, 2], &[0.7, 1.0], 4, &device);
    let smoothed = to_vec(smooth_targets(targets, 0.1));
    assert!((smoothed[0] - (0.7 * 0.9 + 0.025)).abs() < 1e-6);
    assert!((smoothed[1] - (0.3 * 0.9 + 0.025)).abs() < 1e-6);
    assert!((smoothed[3] - 0.025).abs() < 1e-6);
    for row in smoothed.chunks(4) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
}

/// Each Table 8 variant's defining property, on flex and wgpu: Gaussian centres crowd the
/// middle, fixed-size boxes have the fixed side wherever they are not clipped, one-hot targets
/// go to the larger area, complete-label targets are 0.5 / 0.5, and a scaled probability mixes
/// that share of batches.
#[test]
fn table8_variants_keep_their_defining_property() {
    let (batch, side) = (8, 16);
    let labels: Vec<usize> = (0..batch).map(|i| i % CLASSES).collect();
    let variants = table8_variants();
    let variant = |tag: &str| variants.iter().find(|(t, _)| *t == tag).unwrap().1;
    let cutmix = |variant: Variant| CutMix {
        beta: 1.0,
        prob: 1.0,
        mode: Mode::Elem,
        partner: Partner::Permutation,
        variant,
    };
    // Box centres: mean distance from the image centre, Gaussian (sigma 0.1) against uniform.
    let spread = |v: Variant| {
        let mut rng = StdRng::seed_from_u64(4);
        let mut total = 0.0;
        for _ in 0..500 {
            let b = cutmix(v).draw(1, 32, 32, &mut rng).boxes[0];
            let (cy, cx) = ((b.y1 + b.y2) as f64 / 2.0, (b.x1 + b.x2) as f64 / 2.0);
            total += ((cy - 16.0).powi(2) + (cx - 16.0).powi(2)).sqrt();
        }
        total / 500.0
    };
    let (gaussian, uniform) = (
        spread(variant("centre-gaussian")),
        spread(Variant::default()),
    );
    assert!(
        gaussian < 0.5 * uniform,
        "gaussian {gaussian} vs uniform {uniform}"
    );
    for device in devices() {
        for seed in 0..20 {
            let pixels = random_batch(batch, 3, side, seed);
            let images = || {
                Tensor::<4>::from_data(
                    TensorData::new(pixels.clone(), [batch, 3, side, side]),
                    &device,
                )
            };
            let mut rng = StdRng::seed_from_u64(seed);
            // Fixed size: 4 x 4 unless the box reaches an edge.
            let draw = cutmix(variant("fixed-size")).draw(batch, side, side, &mut rng);
            for b in &draw.boxes {
                let inside = b.y1 > 0 && b.x1 > 0 && b.y2 < side && b.x2 < side;
                assert!(b.y2 - b.y1 <= 4 && b.x2 - b.x1 <= 4, "{b:?}");
                if inside {
                    assert_eq!(b.area(), 16, "{b:?}");
                }
            }
            // One-hot: the label of the larger area, by counted pixels.
            let draw = cutmix(variant("one-hot")).draw(batch, side, side, &mut rng);
            let targets = to_vec(draw.apply(images(), &labels, CLASSES).targets);
            for i in 0..batch {
                let kept = draw.boxes[i].kept_share(side, side);
                let winner = if kept >= 0.5 {
                    labels[i]
                } else {
                    labels[draw.partners[i]]
                };
                assert_eq!(
                    targets[i * CLASSES + winner],
                    1.0,
                    "{device:?} seed {seed} row {i}"
                );
            }
            // Complete label: half and half once anything is pasted from another class.
            let draw = cutmix(variant("complete-label")).draw(batch, side, side, &mut rng);
            let targets = to_vec(draw.apply(images(), &labels, CLASSES).targets);
            for i in 0..batch {
                let partner = labels[draw.partners[i]];
                if draw.boxes[i].area() > 0 && partner != labels[i] {
                    assert_eq!(targets[i * CLASSES + labels[i]], 0.5);
                    assert_eq!(targets[i * CLASSES + partner], 0.5);
                }
            }
        }
    }
    // Scheduled: the probability scaled by the ramp; 0 mixes nothing.
    let reference = Mixing::CutMix(CutMix {
        mode: Mode::Batch,
        ..cutmix(Variant::default())
    });
    let mut rng = StdRng::seed_from_u64(1);
    let share = |factor: f64, rng: &mut StdRng| {
        let scaled = reference.with_prob_scaled(factor);
        (0..2000)
            .filter(|_| scaled.draw(2, 8, 8, rng).boxes[0] != CutBox::EMPTY)
            .count() as f64
            / 2000.0
    };
    assert_eq!(share(0.0, &mut rng), 0.0);
    let half = share(0.5, &mut rng);
    assert!((half - 0.5).abs() < 0.05, "{half}");
}
