//! The Rust side of the GPU training-step benchmark (`scripts/bench_gpu.sh`, `just bench-gpu`,
//! runs it beside the same models in PyTorch on CUDA).
//!
//! ```text
//! bench_gpu --model resnet50 [--batch 64] [--side 224] [--warmup 3] [--steps 10] [--repeats 3]
//! bench_gpu --list
//! ```
//!
//! Times whole training steps as `train` runs them (the batch uploaded from the host, CutMix,
//! forward, backward, SGD with Nesterov momentum and weight decay), on wgpu by default. The
//! first `--warmup` steps are waited for and timed one by one: they compile the kernels and
//! autotune them. Then `--repeats` times `--steps` steps are queued with no read in between and
//! waited for once, as the training loop does; a repeat's time over its steps is one figure.
//! Prints one JSON line: `{"model", "batch", "side", "backend", "adapter", "compiler",
//! "warmup_s": [...], "step_ms": [...], "median_ms", "peak_gpu_mib"}`.
//!
//! `--f16-check` instead measures whether an f16 convolution on the device accumulates in f32
//! (what mixed-precision training needs, and what PyTorch's autocast does): a 3x3 convolution
//! of a 32x64x32x32 batch in f16 against the f32 convolution of the same f16-rounded inputs, as
//! `max |difference| / max |reference|`, beside the error that rounding the output to f16 alone
//! makes. Prints `{"f16_supported", "accumulation_error", "output_rounding_error", ...}`.

use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use burn::tensor::module::conv2d;
use burn::tensor::ops::ConvOptions;
use burn::tensor::{Device, Distribution, FloatDType, Tensor};
use clap::Parser;

use cutmix_train::backend;
use cutmix_train::bench::{StepBench, find, median, models};
use cutmix_train::config::BackendChoice;

#[derive(Parser)]
#[command(about = "Time training steps of the benchmark models on a GPU (wgpu)")]
struct Args {
    /// One of `--list`.
    #[arg(long, default_value = "resnet50")]
    model: String,
    /// Batch size (default: the model's GPU benchmark batch).
    #[arg(long)]
    batch: Option<usize>,
    /// Image side (default: the model's; smaller for a dry run).
    #[arg(long)]
    side: Option<usize>,
    /// Steps timed one by one first (kernel compilation, autotuning).
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Steps per timed repeat.
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Timed repeats.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Device: wgpu (default) or flex (a CPU comparison).
    #[arg(long, value_enum, default_value_t = BackendChoice::Wgpu)]
    backend: BackendChoice,
    /// List the models and their GPU batches.
    #[arg(long)]
    list: bool,
    /// Measure f16 convolution accuracy instead (does it accumulate in f32?).
    #[arg(long)]
    f16_check: bool,
}

/// `max |a - b| / max |b|`.
fn relative_error(a: Tensor<4>, b: Tensor<4>) -> Result<f32> {
    let values = |t: Tensor<4>| -> Result<Vec<f32>> {
        t.cast(FloatDType::F32)
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| anyhow!("reading a tensor back: {e:?}"))
    };
    let (a, b) = (values(a)?, values(b)?);
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs()));
    let worst = a
        .iter()
        .zip(&b)
        .fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    Ok(worst / scale.max(f32::MIN_POSITIVE))
}

/// The f16 convolution's error against the f32 convolution of the same f16-rounded inputs (the
/// accumulation's error alone), and the error of rounding that reference to f16 (what an f32
/// accumulation would leave).
fn f16_check(device: &Device, description: &str) -> Result<()> {
    let supported = device.supports_dtype(FloatDType::F16);
    let mut line = format!(
        "{{\"f16_supported\": {supported}, \"adapter\": {}, \"compiler\": \"{}\"",
        serde_json::to_string(description)?,
        compiler(description)
    );
    if supported {
        device.seed(0);
        let half = |t: Tensor<4>| t.cast(FloatDType::F16);
        let x = half(Tensor::random(
            [32, 64, 32, 32],
            Distribution::Normal(0.0, 1.0),
            device,
        ));
        let w = half(Tensor::random(
            [64, 64, 3, 3],
            Distribution::Normal(0.0, 0.05),
            device,
        ));
        let options = ConvOptions::new([1, 1], [1, 1], [1, 1], 1);
        let in_f16 = conv2d(x.clone(), w.clone(), None, options.clone());
        let f32 = |t: Tensor<4>| t.cast(FloatDType::F32);
        let reference = conv2d(f32(x), f32(w), None, options);
        let accumulation = relative_error(in_f16, reference.clone())?;
        let rounding = relative_error(half(reference.clone()), reference)?;
        line.push_str(&format!(
            ", \"accumulation_error\": {accumulation:.2e}, \"output_rounding_error\": {rounding:.2e}"
        ));
    }
    println!("{line}}}");
    Ok(())
}

/// The compiler CubeCL picks for the adapter: SPIR-V on Vulkan when built with the `vulkan`
/// feature (cooperative-matrix matmuls, f16), WGSL otherwise.
fn compiler(description: &str) -> &'static str {
    if cfg!(feature = "vulkan") && description.contains("Vulkan") {
        "spirv"
    } else if description.starts_with("flex") {
        "none"
    } else {
        "wgsl"
    }
}

fn run(args: &Args) -> Result<()> {
    if args.list {
        for model in models() {
            if let Some(batch) = model.gpu_batch {
                println!("{} {} {batch}", model.name, model.side);
            }
        }
        return Ok(());
    }
    if args.f16_check {
        let chosen = backend::select(args.backend)?;
        return f16_check(&chosen.device, &chosen.description);
    }
    let model = find(&args.model)?;
    let batch = args
        .batch
        .or(model.gpu_batch)
        .ok_or_else(|| anyhow!("{} has no GPU batch: give --batch", model.name))?;
    let side = args.side.unwrap_or(model.side);
    if args.steps == 0 || args.repeats == 0 {
        bail!("--steps and --repeats must be at least 1");
    }
    let chosen = backend::select(args.backend)?;
    let device = chosen.device.clone();
    let mut bench = StepBench::new(&model.config, batch, side, &device)?;
    let peak = || {
        device
            .memory_pool_usage()
            .map(|usage| usage.bytes_reserved as f64 / (1024.0 * 1024.0))
    };
    let sync = || {
        device
            .sync()
            .map_err(|e| anyhow!("the device failed to run the step: {e:?}"))
    };
    let mut warmup_s = Vec::new();
    for _ in 0..args.warmup {
        let start = Instant::now();
        let loss = bench.step();
        sync()?;
        warmup_s.push(start.elapsed().as_secs_f64());
        drop(loss);
    }
    let mut peak_mib = peak();
    let mut step_ms = Vec::new();
    for _ in 0..args.repeats {
        let start = Instant::now();
        let mut last = None;
        for _ in 0..args.steps {
            last = Some(bench.step());
        }
        let loss = last.expect("at least one step").into_scalar::<f32>();
        step_ms.push(start.elapsed().as_secs_f64() * 1e3 / args.steps as f64);
        if !loss.is_finite() {
            bail!("{}: the loss is {loss}", model.name);
        }
        peak_mib = match (peak_mib, peak()) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
    }
    let list = |values: &[f64], digits: usize| {
        let shown: Vec<String> = values.iter().map(|v| format!("{v:.digits$}")).collect();
        format!("[{}]", shown.join(", "))
    };
    println!(
        "{{\"model\": \"{}\", \"batch\": {batch}, \"side\": {side}, \"backend\": \"{}\", \"adapter\": {}, \"compiler\": \"{}\", \"warmup_s\": {}, \"step_ms\": {}, \"median_ms\": {:.2}, \"peak_gpu_mib\": {}}}",
        model.name,
        chosen.name,
        serde_json::to_string(&chosen.description).context("the adapter's name")?,
        compiler(&chosen.description),
        list(&warmup_s, 3),
        list(&step_ms, 2),
        median(&step_ms),
        peak_mib.map_or("null".into(), |m| format!("{m:.0}")),
    );
    Ok(())
}

fn main() {
    backend::quiet_mesa();
    cutmix_train::backend::keep_freed_memory();
    let args = Args::parse();
    if let Err(e) = run(&args) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
