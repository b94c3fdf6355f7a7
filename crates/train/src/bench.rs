//! What the training-step benchmarks share (`bench_cpu`, `bench_gpu`): the benchmarked networks
//! with their batch sizes, a training step on fixed random data, and the timing helpers.

use anyhow::{Result, bail};
use burn::optim::ModuleOptimizer;
use burn::tensor::{Device, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};

use cutmix_augment::{CutMix, Mixing, Mode, Partner};
use cutmix_models::{Model, ModelConfig, Variant};

use crate::config::TrainSection;
use crate::trainer::{Update, apply_step, loss_and_grads, sgd};

/// A benchmarked network: its name, description, input side and batch on each kind of device.
pub struct BenchModel {
    pub name: &'static str,
    pub config: ModelConfig,
    pub side: usize,
    /// The batch `bench_cpu` times it at (`None`: not in the CPU benchmark).
    pub cpu_batch: Option<usize>,
    /// The batch `bench_gpu` times it at (`None`: not in the GPU benchmark).
    pub gpu_batch: Option<usize>,
}

/// The networks of both benchmarks: the zoo's (`train --list-models`), and PyramidNet-110
/// alpha 48 with bottleneck blocks.
pub fn models() -> Vec<BenchModel> {
    let zoo = |name: &str| {
        Variant::all()
            .into_iter()
            .find(|v| v.name == name)
            .expect("a model of the zoo")
    };
    let model = |name, variant: Variant, cpu, gpu| BenchModel {
        name,
        config: variant.config,
        side: variant.input_size,
        cpu_batch: cpu,
        gpu_batch: gpu,
    };
    let mut pyramidnet110_bottleneck = zoo("pyramidnet110_a48");
    pyramidnet110_bottleneck.config.bottleneck = true;
    vec![
        model("cifar_resnet20", zoo("cifar_resnet20"), Some(64), Some(128)),
        model(
            "resnet18_cifar_stem",
            zoo("resnet18_cifar_stem"),
            Some(64),
            None,
        ),
        model(
            "pyramidnet110_a48_bottleneck",
            pyramidnet110_bottleneck,
            Some(64),
            None,
        ),
        model(
            "pyramidnet200_a240",
            zoo("pyramidnet200_a240"),
            None,
            Some(64),
        ),
        model("resnet50", zoo("resnet50"), Some(8), Some(64)),
    ]
}

/// The network called `name`, or an error listing the names.
pub fn find(name: &str) -> Result<BenchModel> {
    let all = models();
    let names: Vec<&str> = all.iter().map(|m| m.name).collect();
    match all.into_iter().find(|m| m.name == name) {
        Some(model) => Ok(model),
        None => bail!(
            "unknown model `{name}`; expected one of {}",
            names.join(", ")
        ),
    }
}

/// Median of `values` (the upper one of an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted[sorted.len() / 2]
}

/// A training step as `train` runs one, on a fixed batch of random images uploaded from the
/// host every step: CutMix (the reference's batch mode, every batch mixed), forward,
/// soft-target cross-entropy, backward, SGD with Nesterov momentum and weight decay.
pub struct StepBench {
    model: Option<Model>,
    optimizer: ModuleOptimizer,
    images: Vec<f32>,
    labels: Vec<usize>,
    shape: [usize; 4],
    num_classes: usize,
    mixing: Mixing,
    rng: StdRng,
    device: Device,
}

impl StepBench {
    /// The network of `config` at `batch` images of `side` pixels, on `device` with autodiff.
    pub fn new(config: &ModelConfig, batch: usize, side: usize, device: &Device) -> Result<Self> {
        if batch < 2 {
            bail!("--batch must be at least 2 (BatchNorm)");
        }
        let device = device.clone().autodiff();
        let mut rng = StdRng::seed_from_u64(0);
        let model = config.init(&mut rng, &device)?;
        let section: TrainSection = toml::from_str(&format!(
            "epochs = 1\nbatch_size = {batch}\nlr = 0.1\nweight_decay = 5e-4"
        ))?;
        let images = (0..batch * 3 * side * side)
            .map(|_| rng.random_range(-2.0..2.0))
            .collect();
        let labels = (0..batch)
            .map(|_| rng.random_range(0..config.num_classes))
            .collect();
        Ok(Self {
            model: Some(model),
            optimizer: sgd(&section),
            images,
            labels,
            shape: [batch, 3, side, side],
            num_classes: config.num_classes,
            mixing: Mixing::CutMix(CutMix {
                beta: 1.0,
                prob: 1.0,
                mode: Mode::Batch,
                partner: Partner::Permutation,
                variant: Default::default(),
            }),
            rng,
            device,
        })
    }

    /// One step, queued on the device (nothing waits for it); returns its loss, on the device.
    pub fn step(&mut self) -> Tensor<1> {
        let images = Tensor::<4>::from_data(
            TensorData::new(self.images.clone(), self.shape),
            &self.device,
        );
        let mixed = self
            .mixing
            .apply(images, &self.labels, self.num_classes, &mut self.rng);
        let model = self.model.take().expect("the model is in place");
        let rng = &mut self.rng;
        let (grads, loss) = cutmix_kernels::on_cpu_threads(&self.device, || {
            let logits = model.forward_train(mixed.images, rng);
            loss_and_grads(&model, logits, mixed.targets, 1.0)
        });
        self.model = Some(apply_step(
            model,
            &mut self.optimizer,
            grads,
            Update::plain(0.1),
        ));
        loss
    }
}
