//! `bench_allreduce`: what averaging the gradients over the ranks costs, next to a training
//! step, for ResNet-50 (224) and PyramidNet-200 alpha 240 (CIFAR). Run under MPI:
//!
//!   mpirun -np 2 target/release/bench_allreduce [--steps 3] [--batch 8]
//!
//! Each rank computes real gradients (one backward pass at `--batch`, not timed), then the
//! all-reduce `train` does after every backward pass is timed (the gradients into one host
//! vector, summed in 25 MiB buckets with MPI_Allreduce, divided by the number of ranks, back
//! into tensors), and so is a whole training step at `--batch` on flex. Rank 0 prints one JSON
//! line per model.

use std::time::Instant;

use anyhow::Result;
use burn::tensor::{Device, Tensor, TensorData};
use clap::Parser;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use cutmix_augment::one_hot;
use cutmix_models::count_params;
use cutmix_train::bench::{StepBench, find, median};
use cutmix_train::trainer::loss_and_grads;
use cutmix_train::world::{BUCKET_FLOATS, World};

#[derive(Parser, Debug)]
#[command(about = "Times the gradient all-reduce of data-parallel training next to a step")]
struct Args {
    /// Timed repetitions of each.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Images per rank in the timed training step.
    #[arg(long, default_value_t = 8)]
    batch: usize,
}

fn main() -> Result<()> {
    cutmix_train::backend::keep_freed_memory();
    let args = Args::parse();
    let world = World::init()?;
    for name in ["resnet50", "pyramidnet200_a240"] {
        let bench = find(name)?;
        let device = Device::flex().autodiff();
        let mut rng = StdRng::seed_from_u64(world.rank() as u64);
        let model = bench.config.init(&mut StdRng::seed_from_u64(0), &device)?;
        let side = bench.side;
        let mut reduce_ms = Vec::new();
        for _ in 0..args.steps {
            let images: Vec<f32> = (0..2 * 3 * side * side)
                .map(|_| rng.random_range(-2.0..2.0))
                .collect();
            let images =
                Tensor::<4>::from_data(TensorData::new(images, [2, 3, side, side]), &device);
            let logits = model.forward_train(images, &mut rng);
            let targets = one_hot(&[0, 1], bench.config.num_classes, &device);
            let (mut grads, _) = loss_and_grads(&model, logits, targets, 1.0);
            // Start together, so one rank's backward pass is not timed as the other's wait.
            world.sum_f64(&mut [0.0]);
            let started = Instant::now();
            world.average_gradients(&model, &mut grads);
            reduce_ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let mut step = StepBench::new(&bench.config, args.batch, side, &Device::flex())?;
        let _ = step.step().into_scalar::<f32>();
        let mut step_ms = Vec::new();
        for _ in 0..args.steps {
            world.sum_f64(&mut [0.0]);
            let started = Instant::now();
            let _ = step.step().into_scalar::<f32>();
            step_ms.push(started.elapsed().as_secs_f64() * 1e3);
        }
        let params = count_params(&model);
        let (reduce, step) = (median(&reduce_ms), median(&step_ms));
        if world.is_primary() {
            println!(
                "{}",
                serde_json::json!({
                    "model": name,
                    "ranks": world.size(),
                    "threads_per_rank": rayon::current_num_threads(),
                    "parameters": params,
                    "gradient_mib": params as f64 * 4.0 / (1024.0 * 1024.0),
                    "buckets": params.div_ceil(BUCKET_FLOATS),
                    "allreduce_ms": reduce,
                    "allreduce_ms_all": reduce_ms,
                    "step_batch_per_rank": args.batch,
                    "step_ms": step,
                    "allreduce_share_of_step": reduce / step,
                })
            );
        }
    }
    Ok(())
}
