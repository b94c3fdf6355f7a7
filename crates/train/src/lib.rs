//! Training, evaluation and checkpoints for the CutMix recipes: the config and its checks, the
//! backend choice, the loop (SGD with Nesterov momentum, multistep/step/cosine schedules,
//! soft-target cross-entropy), metrics, crash-safe checkpoints in the run folder, and weights in
//! and out (fine-tuning from safetensors / PyTorch / burnpack files, export to safetensors),
//! and PNG figures of runs.

pub mod analyze;
pub mod backend;
pub mod bench;
pub mod cam_figure;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod datasets;
pub mod ema;
pub mod localize;
pub mod metrics;
pub mod plots;
pub mod schedule;
pub mod trainer;
pub mod weights;
pub mod world;

/// Large buffers (activations, gradients, the kernels' unfolded inputs) start on a cache line,
/// as PyTorch's allocator makes them: the matrix products read them in place, a 64-byte
/// register at a time (`cutmix_kernels::alloc`). Every binary that links this crate runs with it.
#[global_allocator]
static ALLOC: cutmix_kernels::alloc::CacheLineAligned = cutmix_kernels::alloc::CacheLineAligned;
