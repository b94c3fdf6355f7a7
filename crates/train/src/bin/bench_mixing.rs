//! `bench_mixing`: what each mixing method costs per batch, next to the training step of the
//! model it feeds, on flex (the CPU backend).
//!
//! ```sh
//! cargo run --release --bin bench_mixing            # both shapes
//! cargo run --release --bin bench_mixing -- --quick # the CIFAR shape only
//! ```

use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;

use cutmix_augment::{CutMix, CutMixOrMixup, Cutout, Mixing, Mixup, Mode, Partner};
use cutmix_models::{Arch, ModelConfig};
use cutmix_train::config::TrainSection;
use cutmix_train::trainer::{sgd, train_step};

fn methods() -> Vec<(&'static str, Mixing)> {
    let cutmix = |mode| CutMix {
        beta: 1.0,
        prob: 1.0,
        mode,
        partner: Partner::Permutation,
        variant: Default::default(),
    };
    let mixup = |mode| Mixup {
        alpha: 1.0,
        prob: 1.0,
        mode,
        partner: Partner::Permutation,
    };
    vec![
        ("none", Mixing::None),
        ("cutmix batch", Mixing::CutMix(cutmix(Mode::Batch))),
        ("cutmix elem", Mixing::CutMix(cutmix(Mode::Elem))),
        ("mixup batch", Mixing::Mixup(mixup(Mode::Batch))),
        ("mixup elem", Mixing::Mixup(mixup(Mode::Elem))),
        (
            "cutout",
            Mixing::Cutout(Cutout {
                size: 16,
                prob: 1.0,
            }),
        ),
        (
            "cutmix+mixup elem",
            Mixing::CutMixOrMixup(CutMixOrMixup {
                cutmix: cutmix(Mode::Elem),
                mixup: mixup(Mode::Elem),
                switch_prob: 0.5,
            }),
        ),
    ]
}

fn median(mut seconds: Vec<f64>) -> f64 {
    seconds.sort_by(f64::total_cmp);
    seconds[seconds.len() / 2]
}

/// Median seconds of one training step (forward, backward, SGD) at this shape.
fn step_seconds(config: &ModelConfig, shape: [usize; 4], repeats: usize) -> f64 {
    let device = Device::flex().autodiff();
    let mut model = config
        .init(&mut StdRng::seed_from_u64(0), &device)
        .expect("a valid model");
    let section: TrainSection =
        toml::from_str("epochs = 1\nbatch_size = 1\nlr = 0.1").expect("a valid section");
    let mut optimizer = sgd(&section);
    let images = Tensor::<4>::ones(shape, &device);
    let labels: Vec<usize> = (0..shape[0]).map(|i| i % config.num_classes).collect();
    let mut times = Vec::new();
    for _ in 0..repeats + 1 {
        let mixed = Mixing::None.apply(
            images.clone(),
            &labels,
            config.num_classes,
            &mut StdRng::seed_from_u64(0),
        );
        let start = Instant::now();
        let logits = model.forward(mixed.images);
        let (next, _) = train_step(model, &mut optimizer, logits, mixed.targets, 0.1);
        model = next;
        times.push(start.elapsed().as_secs_f64());
    }
    times.remove(0); // warm-up
    median(times)
}

/// Median seconds of one mixing call, the result read back so that the work is done.
fn mixing_seconds(mixing: &Mixing, shape: [usize; 4], classes: usize, repeats: usize) -> f64 {
    let device = Device::flex();
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|i| (i % 251) as f32 / 251.0)
        .collect();
    let images = Tensor::<4>::from_data(TensorData::new(values, shape), &device);
    let labels: Vec<usize> = (0..shape[0]).map(|i| i % classes).collect();
    let mut rng = StdRng::seed_from_u64(1);
    let mut times = Vec::new();
    for _ in 0..repeats + 3 {
        let input = images.clone();
        let start = Instant::now();
        let mixed = mixing.apply(input, &labels, classes, &mut rng);
        let _ = mixed.images.slice([0..1, 0..1, 0..1, 0..1]).into_data();
        let _ = mixed.targets.slice([0..1, 0..1]).into_data();
        times.push(start.elapsed().as_secs_f64());
    }
    times.drain(..3);
    median(times)
}

fn report(title: &str, config: &ModelConfig, shape: [usize; 4], step_repeats: usize) {
    let step = step_seconds(config, shape, step_repeats);
    println!(
        "\n{title}: batch {shape:?}, training step {:.1} ms ({:.2} ms per image)",
        step * 1e3,
        step * 1e3 / shape[0] as f64
    );
    println!(
        "{:<20} {:>12} {:>14} {:>12}",
        "method", "ms / batch", "us / image", "% of step"
    );
    for (name, mixing) in methods() {
        let seconds = mixing_seconds(&mixing, shape, config.num_classes, 30);
        println!(
            "{name:<20} {:>12.3} {:>14.2} {:>11.4}%",
            seconds * 1e3,
            seconds * 1e6 / shape[0] as f64,
            100.0 * seconds / step
        );
    }
}

fn main() {
    // As `train` does, so the step it compares with is a run's.
    cutmix_train::backend::keep_freed_memory();
    let quick = std::env::args().any(|a| a == "--quick");
    println!(
        "flex (CPU), {} threads available",
        std::thread::available_parallelism().map_or(1, usize::from)
    );
    let cifar = ModelConfig {
        arch: Arch::CifarResNet,
        depth: 20,
        alpha: 0.0,
        bottleneck: false,
        shakedrop: 0.0,
        num_classes: 100,
        last_stride: 2,
    };
    report("CIFAR ResNet-20", &cifar, [64, 3, 32, 32], 5);
    if !quick {
        let resnet50 = ModelConfig {
            arch: Arch::ResNet,
            depth: 50,
            alpha: 0.0,
            bottleneck: true,
            shakedrop: 0.0,
            num_classes: 1000,
            last_stride: 2,
        };
        report("ResNet-50", &resnet50, [16, 3, 224, 224], 2);
    }
}
