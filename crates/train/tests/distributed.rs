//! Data-parallel runs of the `train` binary on two ranks under `mpirun` (Open MPI), on flex.
//! Built only with the `mpi` feature: `cargo test --release --features cutmix-train/mpi --test
//! distributed` (needs `mpirun`: Debian's openmpi-bin).
#![cfg(feature = "mpi")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use burn::module::{Module, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::{Device, Tensor, TensorData};

use cutmix_data::{Shard, Stream, keyed_rng};
use cutmix_train::config::Config;
use cutmix_train::trainer::{Update, apply_step, loss_and_grads, sgd};

mod common;
use common::{floats, metrics, repo, wait_for_state};

fn quickstart() -> PathBuf {
    repo().join("configs/quickstart.toml")
}

/// A small run: ResNet-8 on `images` of the shipped training images, 64 validation images.
fn sets(out: &Path, images: usize, batch: usize, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        format!("output_dir={}", out.display()),
        format!("data.root={}", repo().join("assets/cifar10-mini").display()),
        "backend=flex".into(),
        "model.depth=8".into(),
        format!("train.batch_size={batch}"),
        format!("data.train_limit={images}"),
        "data.val_limit=64".into(),
        "data.workers=1".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

/// `train` with `args`, under `mpirun -np ranks` (or alone for 0).
fn command(ranks: usize, args: &[String]) -> Command {
    let train = env!("CARGO_BIN_EXE_train");
    let mut command = if ranks == 0 {
        Command::new(train)
    } else {
        let mut c = Command::new("mpirun");
        c.args([
            "--allow-run-as-root",
            "--oversubscribe",
            "--bind-to",
            "none",
        ])
        .args(["--mca", "btl", "self,vader"])
        .args(["--mca", "btl_vader_single_copy_mechanism", "none"])
        .args(["-np", &ranks.to_string(), train]);
        c
    };
    command.args(args);
    command
}

fn train_args(sets: &[String], resume: bool) -> Vec<String> {
    let mut args = vec!["--config".to_string(), quickstart().display().to_string()];
    if resume {
        args.push("--resume".into());
    }
    for set in sets {
        args.push("--set".into());
        args.push(set.clone());
    }
    args
}

fn run(ranks: usize, sets: &[String], resume: bool) -> Output {
    let output = command(ranks, &train_args(sets, resume))
        .output()
        .expect("mpirun runs (Debian: openmpi-bin)");
    assert!(
        output.status.success(),
        "{} rank(s) failed:\n{}\n{}",
        ranks,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

fn spawn(ranks: usize, sets: &[String]) -> Child {
    command(ranks, &train_args(sets, false))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn config(sets: &[String]) -> Config {
    Config::load(&quickstart(), sets).unwrap()
}

fn fresh_model(config: &Config, device: &Device) -> cutmix_models::Model {
    let mut rng = keyed_rng(config.seed, Stream::Init, 0, 0);
    config
        .model_config()
        .unwrap()
        .init(&mut rng, device)
        .unwrap()
}

fn checkpoint_model(config: &Config, folder: &Path) -> Vec<f32> {
    let model = fresh_model(config, &Device::flex())
        .try_load_file(folder.join("model.bpk"))
        .unwrap();
    floats(&model)
}

/// The gradients of `model` on `rank`'s first batch of epoch 0 (no mixing).
fn half_batch_gradients(
    config: &Config,
    model: &cutmix_models::Model,
    rank: usize,
    device: &Device,
) -> Vec<f32> {
    let data = cutmix_train::datasets::build(config).unwrap();
    let train = data.train.sharded(Shard {
        rank,
        count: 2,
        pad: true,
    });
    let batch = train.epoch(0).next().unwrap().unwrap();
    let (images, labels) = cutmix_train::trainer::images_tensor(batch, device);
    let logits = model.forward_train(images, &mut keyed_rng(0, Stream::Regularize, 0, 0));
    let targets = cutmix_augment::one_hot(&labels, 10, device);
    let (grads, _) = loss_and_grads(model, logits, targets, 1.0);
    struct Flat<'a>(&'a GradientsParams, Vec<f32>);
    impl ModuleVisitor for Flat<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if let Some(g) = self.0.get::<D>(param.id) {
                self.1
                    .extend(g.into_data().try_into_vec_as::<f32>().unwrap());
            }
        }
    }
    let mut flat = Flat(&grads, Vec::new());
    model.visit(&mut flat);
    flat.1
}

/// `values` as the gradients of `model`'s parameters, in order.
fn as_gradients(model: &cutmix_models::Model, values: &[f32]) -> GradientsParams {
    struct Fill<'a> {
        values: &'a [f32],
        at: usize,
        grads: GradientsParams,
    }
    impl ModuleVisitor for Fill<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if !param.is_require_grad() {
                return;
            }
            let shape = param.val().dims();
            let len: usize = shape.iter().product();
            let data = TensorData::new(self.values[self.at..self.at + len].to_vec(), shape);
            let device = param.val().device();
            self.grads
                .register(param.id, Tensor::<D>::from_data(data, &device));
            self.at += len;
        }
    }
    let mut fill = Fill {
        values,
        at: 0,
        grads: GradientsParams::new(),
    };
    model.visit(&mut fill);
    assert_eq!(fill.at, values.len(), "every gradient placed");
    fill.grads
}

#[test]
fn two_ranks_step_as_one_process_on_the_mean_of_their_gradients_and_stay_identical() {
    let out = tempfile::tempdir().unwrap();
    // 32 images at batch 16 on each of two ranks: one step.
    let sets = sets(
        out.path(),
        32,
        16,
        &["train.epochs=1", "augment.method=\"none\""],
    );
    let output = run(2, &sets, false);
    let log = stdout(&output);
    assert!(log.contains("rank 1 of 2"), "{log}");
    let line = log
        .lines()
        .find(|l| l.starts_with("weights identical on all 2 ranks after epoch 1"))
        .unwrap_or_else(|| panic!("no checksum line in\n{log}"));
    let checkpoint = out.path().join("quickstart/checkpoints/last");

    // The same step taken here: each rank's half-batch gradient (each from its own model, so
    // BatchNorm's running statistics see only rank 0's half, as rank 0's do), their mean, SGD.
    let config = config(&sets);
    let device = Device::flex().autodiff();
    let model = fresh_model(&config, &device);
    let other = fresh_model(&config, &device);
    let g0 = half_batch_gradients(&config, &model, 0, &device);
    let g1 = half_batch_gradients(&config, &other, 1, &device);
    let mean: Vec<f32> = g0.iter().zip(&g1).map(|(a, b)| (a + b) * 0.5).collect();
    let grads = as_gradients(&model, &mean);
    let lr = cutmix_train::schedule::learning_rate(&config.train, 0, 0, 1);
    let stepped = apply_step(model, &mut sgd(&config.train), grads, Update::plain(lr));
    let expected = floats(&stepped.valid());
    let found = checkpoint_model(&config, &checkpoint);
    assert_eq!(expected.len(), found.len());
    let worst = expected
        .iter()
        .zip(&found)
        .map(|(a, b)| (a - b).abs() / a.abs().max(1e-3))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-5, "relative difference {worst}");

    // The checksum the ranks agreed on is the checksum of the weights rank 0 saved.
    let model = fresh_model(&config, &Device::flex().autodiff())
        .try_load_file(checkpoint.join("model.bpk"))
        .unwrap();
    let checksum = format!("{:016x}", cutmix_train::world::World::checksum(&model));
    assert!(line.contains(&checksum), "{line} vs {checksum}");
}

#[test]
fn sync_bn_normalises_two_ranks_by_their_whole_batch_as_one_process_at_twice_the_batch() {
    // One step of 2 x 16 with SyncBatchNorm against one process at 32: the same images, the same
    // statistics (running ones included) and the same gradients, so the same weights.
    let (two, one) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = [
        "train.epochs=1",
        "augment.method=\"none\"",
        "train.sync_bn=true",
    ];
    let output = run(2, &sets(two.path(), 32, 16, &extra), false);
    assert!(stdout(&output).contains("statistics over the batches of all 2 ranks"));
    run(0, &sets(one.path(), 32, 32, &extra), false);
    let config = config(&sets(one.path(), 32, 32, &extra));
    let (a, b) = (
        checkpoint_model(&config, &two.path().join("quickstart/checkpoints/last")),
        checkpoint_model(&config, &one.path().join("quickstart/checkpoints/last")),
    );
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-2))
        .fold(0.0f32, f32::max);
    assert!(worst < 1e-4, "relative difference {worst}");
    // Without it, each rank's statistics are its own half's: the weights differ.
    let per_rank = tempfile::tempdir().unwrap();
    run(2, &sets(per_rank.path(), 32, 16, &extra[..2]), false);
    let c = checkpoint_model(
        &config,
        &per_rank.path().join("quickstart/checkpoints/last"),
    );
    let apart = c
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs() / y.abs().max(1e-2))
        .fold(0.0f32, f32::max);
    assert!(apart > 1e-3, "per-rank statistics should differ ({apart})");
}

#[test]
fn two_ranks_track_one_process_at_twice_the_batch_and_validate_as_it() {
    let (two, one) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let extra = ["train.epochs=3"];
    run(2, &sets(two.path(), 192, 16, &extra), false);
    run(0, &sets(one.path(), 192, 32, &extra), false);
    let (m2, m1) = (
        metrics(&two.path().join("quickstart")),
        metrics(&one.path().join("quickstart")),
    );
    assert_eq!(m2.len(), 3);
    for (a, b) in m2.iter().zip(&m1) {
        let (la, lb) = (
            a["train_loss"].as_f64().unwrap(),
            b["train_loss"].as_f64().unwrap(),
        );
        assert!(
            (la - lb).abs() < 0.15,
            "train loss {la} (2 x 16) vs {lb} (1 x 32)"
        );
    }
    // Validation split over the ranks and summed: `eval` of the saved weights in one process
    // gives the numbers the two ranks reported.
    let last = two.path().join("quickstart/checkpoints/last/model.bpk");
    let output = Command::new(env!("CARGO_BIN_EXE_eval"))
        .arg("--config")
        .arg(quickstart())
        .arg("--weights")
        .arg(&last)
        .args(
            sets(two.path(), 192, 16, &extra)
                .iter()
                .flat_map(|s| ["--set".to_string(), s.clone()]),
        )
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let eval: serde_json::Value = serde_json::from_str(stdout(&output).trim()).unwrap();
    let reported = &m2[2];
    assert_eq!(eval["top1_err"], reported["val_top1_err"]);
    assert_eq!(eval["top5_err"], reported["val_top5_err"]);
    let (le, lr) = (
        eval["loss"].as_f64().unwrap(),
        reported["val_loss"].as_f64().unwrap(),
    );
    assert!((le - lr).abs() < 1e-6, "val loss {le} vs {lr}");
}

#[test]
fn runs_resume_on_another_number_of_ranks_and_a_stop_on_one_rank_stops_all() {
    let out = tempfile::tempdir().unwrap();
    let run_dir = out.path().join("quickstart");
    let with = |epochs: usize| sets(out.path(), 96, 16, &[&format!("train.epochs={epochs}")]);
    // 2 ranks -> 1 -> 2, at epoch ends.
    run(2, &with(1), false);
    let resumed = run(0, &with(2), true);
    assert!(stdout(&resumed).contains("resuming"));
    run(2, &with(3), true);
    assert_eq!(metrics(&run_dir).len(), 3);

    // SIGTERM to rank 1 alone in the middle of an epoch: both ranks stop after the same step,
    // rank 0 saves once; --resume on two ranks ends on the weights of an uninterrupted run.
    let whole = tempfile::tempdir().unwrap();
    let extra = ["train.epochs=2", "train.checkpoint_steps=1"];
    run(2, &sets(whole.path(), 192, 16, &extra), false);
    let stopped = tempfile::tempdir().unwrap();
    let sets_s = sets(stopped.path(), 192, 16, &extra);
    let child = spawn(2, &sets_s);
    let state = stopped
        .path()
        .join("quickstart/checkpoints/last/state.json");
    wait_for_state(&state, |s| {
        s["epoch"] == 1 && s["batch"].as_u64() >= Some(2)
    });
    let ranks = child_pids(child.id());
    assert_eq!(ranks.len(), 2, "two ranks under mpirun: {ranks:?}");
    signal("TERM", *ranks.iter().max().unwrap());
    let output = child.wait_with_output().unwrap();
    let log = stdout(&output);
    if log.contains("interrupted in epoch") {
        assert!(log.contains("SIGTERM"), "{log}");
        assert_eq!(log.matches("interrupted in epoch").count(), 1, "{log}");
        run(2, &sets_s, true);
    } else {
        // The signal came after the last step.
        assert!(output.status.success(), "{log}");
    }
    let config = config(&sets_s);
    assert!(
        checkpoint_model(&config, &stopped.path().join("quickstart/checkpoints/last"))
            == checkpoint_model(&config, &whole.path().join("quickstart/checkpoints/last")),
        "the run stopped by SIGTERM on one rank and resumed differs from the uninterrupted run"
    );
    let (a, b) = (
        metrics(&stopped.path().join("quickstart")),
        metrics(&whole.path().join("quickstart")),
    );
    for (x, y) in a.iter().zip(&b) {
        for key in ["train_loss", "val_loss", "val_top1_err"] {
            assert_eq!(x[key], y[key], "{key}");
        }
    }
}

#[test]
fn a_rank_killed_ends_the_run_with_a_clear_error_and_resume_continues() {
    let out = tempfile::tempdir().unwrap();
    let sets = sets(out.path(), 192, 16, &["train.epochs=4"]);
    let child = spawn(2, &sets);
    let state = out.path().join("quickstart/checkpoints/last/state.json");
    wait_for_state(&state, |s| s["epoch"].as_u64() >= Some(1));
    let ranks = child_pids(child.id());
    signal("KILL", *ranks.iter().max().unwrap());
    let started = Instant::now();
    let output = child.wait_with_output().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the other rank went on waiting"
    );
    assert!(!output.status.success());
    let said = format!(
        "{}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(said.contains("signal 9"), "{said}");
    let resumed = run(2, &sets, true);
    assert!(stdout(&resumed).contains("resuming"));
    assert_eq!(metrics(&out.path().join("quickstart")).len(), 4);
}

/// The processes `parent` started (the ranks under mpirun).
fn child_pids(parent: u32) -> Vec<u32> {
    let output = Command::new("pgrep")
        .args(["-P", &parent.to_string()])
        .output()
        .unwrap();
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn signal(name: &str, pid: u32) {
    let status = Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}
