//! Training, evaluation and checkpoints for the CutMix recipes: the config and its checks, the
//! backend choice, the loop (SGD with Nesterov momentum, multistep/step/cosine schedules,
//! soft-target cross-entropy), metrics, and crash-safe checkpoints in the run folder.

pub mod backend;
pub mod checkpoint;
pub mod config;
pub mod datasets;
pub mod metrics;
pub mod schedule;
pub mod trainer;
