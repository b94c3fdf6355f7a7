//! Helpers the integration tests share (`runs.rs`, `distributed.rs`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::tensor::Tensor;

/// The workspace root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The lines of a run folder's `metrics.jsonl`.
pub fn metrics(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Waits until the `state.json` at `path` exists and satisfies `what` (at most 300 s).
pub fn wait_for_state(path: &Path, what: impl Fn(&serde_json::Value) -> bool) {
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(300) {
        if let Some(state) = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            && what(&state)
        {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("{} never appeared", path.display());
}

/// Every float tensor of `model` (BatchNorm statistics included), flattened in order.
pub fn floats(model: &cutmix_models::Model) -> Vec<f32> {
    struct Collect(Vec<f32>);
    impl ModuleVisitor for Collect {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            let values = param.val().into_data().try_into_vec_as::<f32>().unwrap();
            self.0.extend(values);
        }
    }
    let mut collect = Collect(Vec::new());
    model.visit(&mut collect);
    collect.0
}
