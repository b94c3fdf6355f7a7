//! The processes of a run: one alone, or several launched by `mpirun` / `srun` that train
//! data-parallel, as PyTorch's DistributedDataParallel (DESIGN.md, "Many devices").
//!
//! Every process (rank) builds the same model from the seed, trains on its own part of each
//! epoch, and after each backward pass the gradients are summed over all ranks with MPI's
//! all-reduce (in buckets, through host memory) and divided by their number, so every rank takes
//! the same optimiser step and all hold the same weights. Rank 0 alone writes the run folder.
//! Collectives come from MPI (the `mpi` feature, rsmpi); a build without it runs one process and
//! refuses to start under a launcher that started several.

use anyhow::Result;
use burn::module::{Module, ModuleMapper, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Tensor, TensorData};

use cutmix_models::Model;

/// Gradients are all-reduced in buckets of at most this many floats (25 MiB, DDP's
/// `bucket_cap_mb` default).
pub const BUCKET_FLOATS: usize = 25 * 1024 * 1024 / 4;

/// The environment variables MPI launchers and Slurm set: the number of processes launched, and
/// this process's place among those on its machine.
const SIZE_VARS: [&str; 3] = ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "SLURM_STEP_NUM_TASKS"];
#[cfg(feature = "mpi")]
const LOCAL_RANK_VARS: [&str; 3] = [
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
];
#[cfg(feature = "mpi")]
const LOCAL_SIZE_VARS: [&str; 2] = ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"];

fn env_number(vars: &[&str]) -> Option<usize> {
    vars.iter()
        .find_map(|var| std::env::var(var).ok()?.trim().parse().ok())
}

/// The seed of rank `rank`'s own random draws (mixing, ShakeDrop): the run's seed on rank 0, so
/// one process draws what it always did, and a different one on every other rank.
pub fn rank_seed(seed: u64, rank: usize) -> u64 {
    if rank == 0 {
        seed
    } else {
        seed ^ (rank as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29)
    }
}

/// How many processes a launcher started with this one (1 when none did).
pub fn launched_size() -> usize {
    env_number(&SIZE_VARS).unwrap_or(1).max(1)
}

/// The processes of this run and the collectives between them.
pub struct World {
    rank: usize,
    size: usize,
    local_rank: usize,
    local_size: usize,
    #[cfg(feature = "mpi")]
    mpi: Option<mpi_world::Mpi>,
}

impl Default for World {
    fn default() -> Self {
        Self::single()
    }
}

impl World {
    /// One process on its own.
    pub fn single() -> Self {
        Self {
            rank: 0,
            size: 1,
            local_rank: 0,
            local_size: 1,
            #[cfg(feature = "mpi")]
            mpi: None,
        }
    }

    /// The world this process was launched into: MPI's when a launcher started several
    /// processes (and this build has MPI), else one process. Call once, first thing in `main`:
    /// it also gives each process its share of the machine's cores.
    pub fn init() -> Result<Self> {
        let launched = launched_size();
        if launched == 1 {
            return Ok(Self::single());
        }
        let world = Self::init_mpi(launched)?;
        world.share_cores();
        Ok(world)
    }

    #[cfg(feature = "mpi")]
    fn init_mpi(_launched: usize) -> Result<Self> {
        let mpi = mpi_world::Mpi::init()?;
        let (rank, size) = (mpi.rank(), mpi.size());
        let (local_rank, local_size) =
            match (env_number(&LOCAL_RANK_VARS), env_number(&LOCAL_SIZE_VARS)) {
                (Some(rank), Some(size)) => (rank, size),
                _ => mpi.local(),
            };
        Ok(Self {
            rank,
            size,
            local_rank,
            local_size,
            mpi: Some(mpi),
        })
    }

    #[cfg(not(feature = "mpi"))]
    fn init_mpi(launched: usize) -> Result<Self> {
        anyhow::bail!(
            "this train binary was started as one of {launched} processes (mpirun / srun), but it is built without MPI: build it with `cargo build --release --features cutmix-train/mpi` (needs libopenmpi-dev and libclang-dev), or run one process"
        )
    }

    /// With several processes on one machine and no `RAYON_NUM_THREADS`, each takes an equal
    /// share of the cores for its CPU kernels, instead of every one taking them all.
    fn share_cores(&self) {
        if self.local_size <= 1 || std::env::var_os("RAYON_NUM_THREADS").is_some() {
            return;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = (cores / self.local_size).max(1);
        // Fails only when the pool already exists; it then keeps its size.
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build_global();
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// This process's place among the processes on its machine (which GPU it takes).
    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// Whether this process writes the run folder and prints the run's log (rank 0).
    pub fn is_primary(&self) -> bool {
        self.rank == 0
    }

    /// One line for the log: which process this is.
    pub fn describe(&self) -> String {
        format!(
            "rank {} of {} (local rank {} of {} on this machine), {} CPU thread(s)",
            self.rank,
            self.size,
            self.local_rank,
            self.local_size,
            rayon::current_num_threads()
        )
    }

    /// Sums `values` over all ranks, in place.
    pub fn sum_f32(&self, values: &mut [f32]) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            mpi.sum_f32(values);
        }
        let _ = values;
    }

    /// Sums `values` over all ranks, in place.
    pub fn sum_f64(&self, values: &mut [f64]) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            mpi.sum_f64(values);
        }
        let _ = values;
    }

    /// The largest of each of `values` over all ranks, in place.
    pub fn max_u64(&self, values: &mut [u64]) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            mpi.max_u64(values);
        }
        let _ = values;
    }

    /// Every rank's `value`, in rank order.
    pub fn gather_u64(&self, value: u64) -> Vec<u64> {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            return mpi.gather_u64(value);
        }
        vec![value]
    }

    /// Rank 0's `bytes`, on every rank.
    pub fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            mpi.broadcast_bytes(bytes);
        }
        let _ = bytes;
    }

    /// A sum over all ranks that the kernels can call (SyncBatchNorm); `None` for one process.
    pub fn reducer(&self) -> Option<cutmix_kernels::Reducer> {
        #[cfg(feature = "mpi")]
        if self.mpi.is_some() {
            return Some(Box::new(mpi_world::sum_f32_world));
        }
        None
    }

    /// Ends every process of the run at once (after an error on this one only, so the others
    /// do not wait for it forever).
    pub fn abort(&self, code: i32) {
        #[cfg(feature = "mpi")]
        if let Some(mpi) = &self.mpi {
            mpi.abort(code);
        }
        let _ = code;
    }

    /// Averages the gradients of `model`'s parameters over all ranks: each rank's are summed
    /// in buckets of [`BUCKET_FLOATS`] and divided by the number of ranks.
    pub fn average_gradients(&self, model: &Model, grads: &mut GradientsParams) {
        if self.size == 1 {
            return;
        }
        let mut flat = Flatten {
            grads,
            values: Vec::new(),
            shapes: Vec::new(),
        };
        model.visit(&mut flat);
        let Flatten { values, shapes, .. } = flat;
        let mut values = values;
        for bucket in values.chunks_mut(BUCKET_FLOATS) {
            self.sum_f32(bucket);
        }
        let scale = 1.0 / self.size as f32;
        values.iter_mut().for_each(|v| *v *= scale);
        model.visit(&mut Unflatten {
            grads,
            values: &values,
            shapes: &shapes,
            at: 0,
            next: 0,
        });
    }

    /// A checksum of `model`'s trained parameters (their f32 bits; BatchNorm's running
    /// statistics, which are each rank's own, left out), the same on every rank that holds the
    /// same weights. `model` is on a device with autodiff (the one it trains on).
    pub fn checksum(model: &Model) -> u64 {
        struct Hash(u64);
        impl ModuleVisitor for Hash {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if !param.val().is_require_grad() {
                    return;
                }
                let values = param
                    .val()
                    .into_data()
                    .try_into_vec_as::<f32>()
                    .expect("f32 parameters");
                for v in values {
                    self.0 = (self.0 ^ u64::from(v.to_bits())).wrapping_mul(0x0100_0000_01b3);
                }
            }
        }
        let mut hash = Hash(0xcbf2_9ce4_8422_2325);
        model.visit(&mut hash);
        hash.0
    }

    /// Checks that every rank holds the same weights (at a checkpoint); returns their checksum
    /// (`None` for one process: nothing to compare).
    pub fn check_same_weights(&self, model: &Model, where_: &str) -> Result<Option<u64>> {
        if self.size == 1 {
            return Ok(None);
        }
        let sums = self.gather_u64(Self::checksum(model));
        if sums.iter().any(|&s| s != sums[0]) {
            let each: Vec<String> = sums
                .iter()
                .enumerate()
                .map(|(rank, sum)| format!("rank {rank} {sum:016x}"))
                .collect();
            return Err(EveryRank(format!(
                "the ranks hold different weights {where_} ({}): data-parallel training went out of step; continue from the last checkpoint with --resume",
                each.join(", ")
            ))
            .into());
        }
        Ok(Some(sums[0]))
    }

    /// Gives every rank rank 0's BatchNorm running statistics (as DDP broadcasts its buffers):
    /// each rank's running averages saw only its own batches. With `everything`, every float
    /// tensor of `model` (a moving average of the weights, which has no optimiser). Parameters
    /// keep their identities, so the optimiser's momentum stays with them.
    pub fn broadcast_buffers(&self, model: Model, everything: bool) -> Model {
        if self.size == 1 {
            return model;
        }
        // Running statistics hold their last update aside until synchronised.
        let _synchronised = model.valid();
        let chosen = |param_requires_grad: bool| everything || !param_requires_grad;
        struct Collect<F: Fn(bool) -> bool> {
            chosen: F,
            values: Vec<f32>,
        }
        impl<F: Fn(bool) -> bool> ModuleVisitor for Collect<F> {
            fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
                if (self.chosen)(param.val().is_require_grad()) {
                    let values = param.val().into_data().try_into_vec_as::<f32>();
                    self.values.extend(values.expect("f32 tensors"));
                }
            }
        }
        let mut collect = Collect {
            chosen,
            values: Vec::new(),
        };
        model.visit(&mut collect);
        let mut bytes: Vec<u8> = collect
            .values
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        self.broadcast_bytes(&mut bytes);
        if self.is_primary() {
            return model;
        }
        let values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        struct Replace<'a, F: Fn(bool) -> bool> {
            chosen: F,
            values: &'a [f32],
            at: usize,
        }
        impl<F: Fn(bool) -> bool> ModuleMapper for Replace<'_, F> {
            fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
                if !(self.chosen)(param.val().is_require_grad()) {
                    return param;
                }
                let (at, values) = (&mut self.at, self.values);
                param.map(|tensor| {
                    let shape = tensor.dims();
                    let len: usize = shape.iter().product();
                    let data = TensorData::new(values[*at..*at + len].to_vec(), shape);
                    *at += len;
                    Tensor::from_data(data, &tensor.device())
                })
            }
        }
        model.map(&mut Replace {
            chosen,
            values: &values,
            at: 0,
        })
    }
}

/// An error every rank meets at once (they compared the same numbers), so none needs to end
/// the others: rank 0 reports it and all exit.
#[derive(Debug)]
pub struct EveryRank(pub String);

impl std::fmt::Display for EveryRank {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for EveryRank {}

/// Gradients into one host vector, in the model's parameter order.
struct Flatten<'a> {
    grads: &'a mut GradientsParams,
    values: Vec<f32>,
    /// (shape, device) of each parameter with a gradient, in order.
    shapes: Vec<(Vec<usize>, burn::tensor::Device)>,
}

impl ModuleVisitor for Flatten<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if let Some(grad) = self.grads.get::<D>(param.id) {
            self.shapes.push((grad.dims().to_vec(), grad.device()));
            let data = grad.into_data().convert::<f32>();
            self.values
                .extend_from_slice(data.as_slice::<f32>().expect("f32 gradients"));
        }
    }
}

/// The averaged gradients back in place, in the same order.
struct Unflatten<'a, 'b> {
    grads: &'a mut GradientsParams,
    values: &'b [f32],
    shapes: &'b [(Vec<usize>, burn::tensor::Device)],
    at: usize,
    next: usize,
}

impl ModuleVisitor for Unflatten<'_, '_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if self.grads.get::<D>(param.id).is_none() {
            return;
        }
        let (shape, device) = &self.shapes[self.next];
        let len: usize = shape.iter().product();
        let values = self.values[self.at..self.at + len].to_vec();
        let grad = Tensor::<D>::from_data(TensorData::new(values, shape.clone()), device);
        self.grads.register(param.id, grad);
        self.at += len;
        self.next += 1;
    }
}

#[cfg(feature = "mpi")]
mod mpi_world {
    use anyhow::{Result, anyhow};
    use mpi::collective::SystemOperation;
    use mpi::datatype::Equivalence;
    use mpi::environment::Universe;
    use mpi::topology::SimpleCommunicator;
    use mpi::traits::*;

    /// `values` combined by `op` over every rank of `world`, in place.
    fn all_reduce<T: Equivalence + Copy>(
        world: &SimpleCommunicator,
        values: &mut [T],
        op: SystemOperation,
    ) {
        let send = values.to_vec();
        world.all_reduce_into(&send[..], values, op);
    }

    /// Sums `values` over MPI's world communicator (for callers without a [`Mpi`]: the
    /// kernels; only the training thread calls it).
    pub fn sum_f32_world(values: &mut [f32]) {
        all_reduce(&SimpleCommunicator::world(), values, SystemOperation::sum());
    }

    /// MPI's world communicator, and the universe that finalises MPI when dropped.
    pub struct Mpi {
        world: SimpleCommunicator,
        _universe: Universe,
    }

    impl Mpi {
        pub fn init() -> Result<Self> {
            // Only the training thread calls MPI (the loader's threads never do).
            let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)
                .ok_or_else(|| anyhow!("MPI is already initialised in this process"))?;
            Ok(Self {
                world: universe.world(),
                _universe: universe,
            })
        }

        pub fn rank(&self) -> usize {
            self.world.rank() as usize
        }

        pub fn size(&self) -> usize {
            self.world.size() as usize
        }

        /// This rank's place and count among the ranks that share its memory (its machine).
        pub fn local(&self) -> (usize, usize) {
            let node = self.world.split_shared(self.world.rank());
            (node.rank() as usize, node.size() as usize)
        }

        pub fn sum_f32(&self, values: &mut [f32]) {
            all_reduce(&self.world, values, SystemOperation::sum());
        }

        pub fn sum_f64(&self, values: &mut [f64]) {
            all_reduce(&self.world, values, SystemOperation::sum());
        }

        pub fn max_u64(&self, values: &mut [u64]) {
            all_reduce(&self.world, values, SystemOperation::max());
        }

        pub fn gather_u64(&self, value: u64) -> Vec<u64> {
            let mut all = vec![0u64; self.size()];
            self.world.all_gather_into(&value, &mut all[..]);
            all
        }

        pub fn broadcast_bytes(&self, bytes: &mut Vec<u8>) {
            let root = self.world.process_at_rank(0);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
        }

        pub fn abort(&self, code: i32) {
            self.world.abort(code);
        }
    }
}
