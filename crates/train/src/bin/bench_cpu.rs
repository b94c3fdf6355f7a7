//! The Rust side of the CPU training-step benchmark (`scripts/bench_cpu.sh`, `just bench-cpu`,
//! runs it beside the same models in PyTorch).
//!
//! ```text
//! cargo run --release --bin bench_cpu -- --model cifar_resnet20 [--batch 64] [--steps 5] [--warmup 2]
//! cargo run --release --bin bench_cpu -- --list
//! cargo run --release --bin bench_cpu -- --ops
//! cargo run --release --bin bench_cpu -- --model resnet50 --eval
//! ```
//!
//! Times whole training steps on flex (forward, backward, SGD with Nesterov momentum and
//! weight decay; the loss read back, so the step is finished) on random images and labels, and
//! prints one JSON line: `{"model", "batch", "steps_ms": [...], "median_ms", "peak_rss_mib"}`.
//! With `--eval`: forward passes in evaluation mode instead (the line's `"mode": "eval"`).
//! With `--ops`: the ops a step spends its time in, one JSON line per op and shape (`{"op",
//! "shape", "median_ms", "min_ms"}`, over 7 runs after 5 warm-ups): conv forward, conv input
//! gradient, conv weight gradient and BatchNorm's training forward + backward, on shapes from
//! the benchmarked models, each through `cutmix-kernels` (what training runs) and through
//! flex's own op (`<op>, flex's`). `--only TEXT` times those whose `<op> <shape>` contains it.

use std::time::Instant;

use anyhow::{Result, bail};
use burn::tensor::{Device, Tensor, TensorData};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use cutmix_augment::one_hot;
use cutmix_models::ModelConfig;
use cutmix_train::config::TrainSection;
use cutmix_train::metrics::peak_rss_mib;
use cutmix_train::trainer::{sgd, train_step};

/// The CPU benchmark's models: name, network, input side, default batch.
fn models() -> Vec<(&'static str, ModelConfig, usize, usize)> {
    cutmix_train::bench::models()
        .into_iter()
        .filter_map(|m| Some((m.name, m.config, m.side, m.cpu_batch?)))
        .collect()
}

#[derive(Parser)]
#[command(about = "Time training steps of the benchmark models on the CPU (flex)")]
struct Args {
    /// One of `--list`.
    #[arg(long, default_value = "cifar_resnet20")]
    model: String,
    /// Batch size (default: the model's benchmark batch).
    #[arg(long)]
    batch: Option<usize>,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Untimed steps first.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// List the models and their default batches.
    #[arg(long)]
    list: bool,
    /// Time single ops instead of a model's step.
    #[arg(long)]
    ops: bool,
    /// With `--ops`: only the ops whose `<op> <shape>` contains this text (`3x3/2`, `weight
    /// grad`, `forward 64x256x8x8`: ours alone, `flex's 64x` flex's alone).
    #[arg(long, requires = "ops")]
    only: Option<String>,
    /// Time evaluation instead (forward only, BatchNorm's running statistics, no autodiff; the
    /// logits read back), as PyTorch's `model.eval()` under `torch.no_grad()`.
    #[arg(long)]
    eval: bool,
}

/// Conv shapes of the benchmarked models: batch, in channels, side, out channels, kernel,
/// stride.
pub const CONV_SHAPES: [(usize, usize, usize, usize, usize, usize); 19] = [
    (64, 16, 32, 16, 3, 1),   // CIFAR ResNet-20, layer1
    (64, 32, 16, 32, 3, 1),   // CIFAR ResNet-20, layer2
    (64, 64, 8, 64, 3, 1),    // CIFAR ResNet-20, layer3
    (64, 64, 32, 64, 3, 1),   // ResNet-18 CIFAR stem, layer1
    (64, 128, 16, 128, 3, 1), // ResNet-18 CIFAR stem, layer2
    (64, 64, 32, 128, 3, 2),  // ResNet-18 CIFAR stem, layer2's first (stride 2)
    (64, 256, 8, 256, 3, 1),  // ResNet-18 CIFAR stem, layer3
    (64, 128, 16, 256, 3, 2), // ResNet-18 CIFAR stem, layer3's first
    (64, 64, 32, 128, 1, 2),  // ResNet-18 CIFAR stem, layer2's shortcut
    (64, 512, 4, 512, 3, 1),  // ResNet-18 CIFAR stem, layer4
    (8, 3, 224, 64, 7, 2),    // ResNet-50 stem
    (8, 64, 56, 64, 3, 1),    // ResNet-50 layer1 3x3
    (8, 128, 28, 128, 3, 1),  // ResNet-50 layer2 3x3
    (8, 256, 28, 256, 3, 2),  // ResNet-50 layer3's first 3x3 (stride 2)
    (8, 256, 14, 256, 3, 1),  // ResNet-50 layer3 3x3
    (8, 256, 56, 64, 1, 1),   // ResNet-50 layer1 1x1 reduce
    (8, 1024, 14, 256, 1, 1), // ResNet-50 layer3 1x1 reduce
    (8, 256, 14, 1024, 1, 1), // ResNet-50 layer3 1x1 expand
    (8, 512, 7, 2048, 1, 1),  // ResNet-50 layer4 1x1 expand
];

/// BatchNorm shapes: batch, channels, side.
pub const BN_SHAPES: [(usize, usize, usize); 3] = [(64, 16, 32), (64, 64, 32), (8, 256, 56)];

/// Milliseconds of one op over 7 runs after 5 warm-ups: the median, and the minimum, which
/// moves less between runs on a shared machine. (PyTorch's first few runs of a shape are slow,
/// its allocator and oneDNN settling: CIFAR's 16-channel 32x32 forward took 15.8, 4.4, 2.3,
/// 2.0, 1.9 ms, then 1.6-1.8; with one warm-up its median of 5 read 5-17 ms.)
struct Timing {
    median: f64,
    min: f64,
}

fn time_ms(mut work: impl FnMut()) -> Timing {
    for _ in 0..5 {
        work();
    }
    let mut times: Vec<f64> = (0..7)
        .map(|_| {
            let start = Instant::now();
            work();
            start.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    times.sort_by(f64::total_cmp);
    Timing {
        median: times[3],
        min: times[0],
    }
}

fn random(shape: [usize; 4], rng: &mut StdRng, device: &Device) -> Tensor<4> {
    let values: Vec<f32> = (0..shape.iter().product())
        .map(|_| rng.random_range(-1.0..1.0))
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Which ops `--ops` times: those whose `<op> <shape>` contains `--only`'s text, or all.
struct Filter(Option<String>);

impl Filter {
    fn takes(&self, op: &str, shape: &str) -> bool {
        self.0
            .as_deref()
            .is_none_or(|text| format!("{op} {shape}").contains(text))
    }
}

fn report(op: &str, shape: String, t: Timing) {
    let (median, min) = (t.median, t.min);
    println!(
        "{{\"op\": \"{op}\", \"shape\": \"{shape}\", \"median_ms\": {median:.2}, \"min_ms\": {min:.2}}}"
    );
}

fn ops(filter: &Filter) {
    use burn::backend::Dispatch;
    use burn::backend::ops::ModuleOps;
    use burn::module::Module;
    use burn::nn::BatchNormConfig;
    use burn::tensor::activation::relu;
    use burn::tensor::module::{conv2d, conv2d_weight_backward};
    use burn::tensor::ops::ConvOptions;
    use cutmix_kernels::{
        batch_norm, batch_norm_relu, conv2d_input_grad, conv2d_no_bias, conv2d_weight_grad,
    };
    let device = Device::flex();
    let mut rng = StdRng::seed_from_u64(0);
    let read = |t: Tensor<4>| t.into_data();
    for (n, c, side, k, kernel, stride) in CONV_SHAPES {
        let pad = kernel / 2;
        let out = (side + 2 * pad - kernel) / stride + 1;
        let x = random([n, c, side, side], &mut rng, &device);
        let w = random([k, c, kernel, kernel], &mut rng, &device);
        let g = random([n, k, out, out], &mut rng, &device);
        let o = ConvOptions::new([stride; 2], [pad; 2], [1; 2], 1);
        let shape = format!("{n}x{c}x{side}x{side} k{k} {kernel}x{kernel}/{stride}");
        // Each op through cutmix-kernels (what training runs) and through flex's own op.
        let (x, w, g) = (&x, &w, &g);
        let cases: [(&str, &dyn Fn() -> Tensor<4>); 6] = [
            ("conv forward", &|| {
                conv2d_no_bias(x.clone(), w.clone(), o.clone())
            }),
            ("conv forward, flex's", &|| {
                conv2d(x.clone(), w.clone(), None, o.clone())
            }),
            ("conv input grad", &|| {
                conv2d_input_grad(x.clone(), w.clone(), g.clone(), o.clone())
            }),
            ("conv input grad, flex's", &|| {
                Tensor::from_dispatch(<Dispatch as ModuleOps<Dispatch>>::conv2d_x_backward(
                    x.clone().into_dispatch(),
                    w.clone().into_dispatch(),
                    g.clone().into_dispatch(),
                    o.clone(),
                ))
            }),
            ("conv weight grad", &|| {
                conv2d_weight_grad(x.clone(), w.clone(), g.clone(), o.clone())
            }),
            ("conv weight grad, flex's", &|| {
                conv2d_weight_backward(x.clone(), w.clone(), g.clone(), o.clone())
            }),
        ];
        for (op, run) in cases {
            if filter.takes(op, &shape) {
                report(op, shape.clone(), time_ms(|| drop(read(run()))));
            }
        }
    }
    let train = device.clone().autodiff();
    for (n, c, side) in BN_SHAPES {
        let bn = BatchNormConfig::new(c).init(&train);
        let x = random([n, c, side, side], &mut rng, &train).require_grad();
        let g = random([n, c, side, side], &mut rng, &train);
        let shape = format!("{n}x{c}x{side}x{side}");
        let fused = |x: Tensor<4>| batch_norm(&bn, x);
        let flex = |x: Tensor<4>| bn.forward(x);
        let fused_relu = |x: Tensor<4>| batch_norm_relu(&bn, x);
        let flex_relu = |x: Tensor<4>| relu(bn.forward(x));
        let cases: [(&str, &dyn Fn(Tensor<4>) -> Tensor<4>); 4] = [
            ("batchnorm train fwd+bwd", &fused),
            ("batchnorm train fwd+bwd, flex's", &flex),
            ("batchnorm+relu train fwd+bwd", &fused_relu),
            ("batchnorm+relu train fwd+bwd, flex's", &flex_relu),
        ];
        for (op, forward) in cases {
            if !filter.takes(op, &shape) {
                continue;
            }
            let ms = time_ms(|| {
                let grads = (forward(x.clone()) * g.clone()).sum().backward();
                let _ = x.grad(&grads).map(|grad| grad.into_data());
            });
            report(op, shape.clone(), ms);
        }
        let frozen = bn.valid();
        let x = random([n, c, side, side], &mut rng, &device);
        if filter.takes("batchnorm+relu eval", &shape) {
            let ours = time_ms(|| drop(read(batch_norm_relu(&frozen, x.clone()))));
            report("batchnorm+relu eval", shape.clone(), ours);
        }
        if filter.takes("batchnorm+relu eval, flex's", &shape) {
            let flex = time_ms(|| drop(read(relu(frozen.forward(x.clone())))));
            report("batchnorm+relu eval, flex's", shape.clone(), flex);
        }
    }
}

fn run(args: &Args) -> Result<()> {
    if args.ops {
        ops(&Filter(args.only.clone()));
        return Ok(());
    }
    if args.list {
        for (name, _, side, batch) in models() {
            println!("{name} {side} {batch}");
        }
        return Ok(());
    }
    let Some((name, config, side, default_batch)) =
        models().into_iter().find(|(n, ..)| *n == args.model)
    else {
        bail!("unknown model `{}` (see --list)", args.model);
    };
    let batch = args.batch.unwrap_or(default_batch);
    if args.steps == 0 || batch < 2 {
        bail!("--steps must be at least 1 and --batch at least 2 (BatchNorm)");
    }
    if args.eval {
        return evaluate(name, &config, side, batch, args);
    }
    let device = Device::flex().autodiff();
    let mut rng = StdRng::seed_from_u64(0);
    // Taken out and put back by each step (the optimiser moves it).
    let mut model = Some(config.init(&mut rng, &device)?);
    let section: TrainSection = toml::from_str(&format!(
        "epochs = 1\nbatch_size = {batch}\nlr = 0.1\nweight_decay = 5e-4"
    ))?;
    let mut optimizer = sgd(&section);
    let values = random_images(&mut rng, batch, side);
    let labels: Vec<usize> = (0..batch)
        .map(|_| rng.random_range(0..config.num_classes))
        .collect();
    let times = time_steps(args, |step| {
        let images = Tensor::<4>::from_data(
            TensorData::new(values.clone(), [batch, 3, side, side]),
            &device,
        );
        let targets = one_hot(&labels, config.num_classes, &device);
        let current = model.take().expect("the model is in place");
        // As the trainer runs its steps (`on_cpu_threads`).
        let (next, out) = cutmix_kernels::on_cpu_threads(&device, || {
            let logits = current.forward_train(images, &mut rng);
            train_step(current, &mut optimizer, logits, targets, 0.1)
        });
        model = Some(next);
        if !out.loss.is_finite() {
            bail!("{name}: loss {} at step {step}", out.loss);
        }
        Ok(())
    })?;
    print_times(name, "", batch, &times);
    Ok(())
}

/// Evaluation passes of `config` at `batch`: forward in evaluation mode on flex without
/// autodiff, the logits read back.
fn evaluate(
    name: &str,
    config: &ModelConfig,
    side: usize,
    batch: usize,
    args: &Args,
) -> Result<()> {
    let device = Device::flex();
    let mut rng = StdRng::seed_from_u64(0);
    let model = config.init(&mut rng, &device)?;
    let values = random_images(&mut rng, batch, side);
    let times = time_steps(args, |_| {
        let images = Tensor::<4>::from_data(
            TensorData::new(values.clone(), [batch, 3, side, side]),
            &device,
        );
        cutmix_kernels::on_cpu_threads(&device, || model.forward(images).into_data());
        Ok(())
    })?;
    print_times(name, "\"mode\": \"eval\", ", batch, &times);
    Ok(())
}

/// Pixel values for `batch` images of `side` x `side`, uniform in [-2, 2).
fn random_images(rng: &mut StdRng, batch: usize, side: usize) -> Vec<f32> {
    (0..batch * 3 * side * side)
        .map(|_| rng.random_range(-2.0..2.0))
        .collect()
}

/// Runs `step` (given its number) `--warmup` times untimed, then `--steps` times timed;
/// returns the timed ones in milliseconds.
fn time_steps(args: &Args, mut step: impl FnMut(usize) -> Result<()>) -> Result<Vec<f64>> {
    let mut times = Vec::new();
    for number in 0..args.warmup + args.steps {
        let start = Instant::now();
        step(number)?;
        if number >= args.warmup {
            times.push(start.elapsed().as_secs_f64() * 1e3);
        }
    }
    Ok(times)
}

/// The JSON line of a model's timed steps (`fields`: extra `"key": value, ` pairs).
fn print_times(name: &str, fields: &str, batch: usize, times: &[f64]) {
    let median = cutmix_train::bench::median(times);
    let steps: Vec<String> = times.iter().map(|t| format!("{t:.1}")).collect();
    println!(
        "{{\"model\": \"{name}\", {fields}\"batch\": {batch}, \"steps_ms\": [{}], \"median_ms\": {median:.1}, \"peak_rss_mib\": {:.1}, \"gemm\": \"{}\", \"rows_dot\": \"{}\"}}",
        steps.join(", "),
        peak_rss_mib().unwrap_or(0.0),
        cutmix_kernels::cpu::gemm_isa(),
        cutmix_kernels::rows_dot::Kernel::detect().name()
    );
}

fn main() {
    // As `train` does, so the benchmark times what a run trains with.
    cutmix_train::backend::keep_freed_memory();
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
