//! Whole runs of the `train` binary and of the training step, on small real data.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::module::Module;
use burn::tensor::{Device, DeviceKind};
use rand::SeedableRng;
use rand::rngs::StdRng;

use cutmix_augment::{CutMix, Mixing, Mode, Partner};
use cutmix_data::{Dataset, ImageFolder};
use cutmix_models::{Arch, ModelConfig};
use cutmix_train::config::TrainSection;
use cutmix_train::trainer::{images_tensor, sgd, train_step};

mod common;
use common::{floats, metrics, repo, wait_for_state};

fn mini() -> PathBuf {
    repo().join("assets/cifar10-mini")
}

fn train(config: &Path, sets: &[String]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_train"));
    command.arg("--config").arg(config);
    for set in sets {
        command.arg("--set").arg(set);
    }
    command.output().expect("train runs")
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The CIFAR ResNet-8 the quick runs train, initialised from `seed`.
fn resnet8(seed: u64, device: &Device) -> cutmix_models::Model {
    ModelConfig {
        arch: Arch::CifarResNet,
        depth: 8,
        alpha: 0.0,
        bottleneck: false,
        shakedrop: 0.0,
        num_classes: 10,
        last_stride: 2,
    }
    .init(&mut StdRng::seed_from_u64(seed), device)
    .unwrap()
}

/// A small, fast quickstart: ResNet-8 on 192 + 64 of the shipped images.
fn quick_sets(out: &Path, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        format!("output_dir={}", out.display()),
        format!("data.root={}", mini().display()),
        "backend=flex".into(),
        "model.depth=8".into(),
        "train.epochs=2".into(),
        "train.batch_size=32".into(),
        "data.train_limit=192".into(),
        "data.val_limit=64".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

#[test]
fn quickstart_writes_metrics_and_checkpoints_and_never_overwrites_a_run() {
    let out = tempfile::tempdir().unwrap();
    let config = repo().join("configs/quickstart.toml");
    let output = train(&config, &quick_sets(out.path(), &[]));
    assert!(output.status.success(), "{}", stderr(&output));
    let run = out.path().join("quickstart");
    let lines = metrics(&run);
    assert_eq!(lines.len(), 2);
    for key in [
        "epoch",
        "lr",
        "train_loss",
        "val_loss",
        "val_top1_err",
        "val_top5_err",
        "images_per_sec",
        "epoch_seconds",
        "backend",
    ] {
        assert!(lines[1].get(key).is_some(), "metrics lack {key}");
    }
    assert_eq!(lines[1]["backend"], "flex");
    assert!(lines[1]["peak_rss_mib"].as_f64().unwrap() > 1.0);
    let csv = std::fs::read_to_string(run.join("metrics.csv")).unwrap();
    let rows: Vec<&str> = csv.lines().collect();
    assert_eq!(rows.len(), 3, "{csv}");
    assert!(rows[0].starts_with("epoch,lr,train_loss,"), "{csv}");
    assert!(rows[2].starts_with("2,"), "{csv}");
    for folder in ["last", "best", "epoch-0002"] {
        for file in ["model.bpk", "optimizer.bpk", "state.json"] {
            assert!(
                run.join("checkpoints").join(folder).join(file).is_file(),
                "{folder}/{file}"
            );
        }
    }
    // keep_last = 1 in the quickstart: the first epoch's folder is gone.
    assert!(!run.join("checkpoints/epoch-0001").exists());
    assert!(run.join("config.toml").is_file() && run.join("classes.txt").is_file());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("metrics.jsonl"), "{stdout}");

    // The weights load back into the same architecture.
    assert!(!weights(Some(&run)).is_empty());

    // The run's figure, and two runs on one figure.
    let curves = image::open(run.join("curves.png")).unwrap();
    assert_eq!((curves.width(), curves.height()), (1500, 460));
    let figure = out.path().join("both.png");
    let compared = command(
        env!("CARGO_BIN_EXE_compare_runs"),
        &[
            run.display().to_string(),
            run.display().to_string(),
            "--out".into(),
            figure.display().to_string(),
        ],
    );
    assert!(compared.status.success(), "{}", stderr(&compared));
    assert!(image::open(&figure).is_ok());
    let nothing = command(
        env!("CARGO_BIN_EXE_compare_runs"),
        &[out.path().display().to_string()],
    );
    assert_one_line_error(&nothing, &["metrics.jsonl"]);

    // A second run with the same name goes to quickstart-2.
    let again = train(&config, &quick_sets(out.path(), &["train.epochs=1"]));
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(metrics(&run).len(), 2);
    assert_eq!(metrics(&out.path().join("quickstart-2")).len(), 1);
}

#[test]
fn same_seed_gives_the_same_run_whatever_the_worker_count() {
    let config = repo().join("configs/quickstart.toml");
    let runs: Vec<(tempfile::TempDir, PathBuf)> = ["data.workers=0", "data.workers=3"]
        .iter()
        .map(|workers| {
            let out = tempfile::tempdir().unwrap();
            let output = train(
                &config,
                &quick_sets(out.path(), &[workers, "augment.prob=1.0"]),
            );
            assert!(output.status.success(), "{}", stderr(&output));
            let run = out.path().join("quickstart");
            (out, run)
        })
        .collect();
    let (a, b) = (metrics(&runs[0].1), metrics(&runs[1].1));
    for (x, y) in a.iter().zip(&b) {
        for key in ["train_loss", "train_top1_err", "val_loss", "val_top1_err"] {
            assert_eq!(x[key], y[key], "{key} differs between worker counts");
        }
    }
    // The files carry per-process parameter ids; the values must be identical.
    let (w0, w1) = (weights(Some(&runs[0].1)), weights(Some(&runs[1].1)));
    assert_eq!(w0.len(), w1.len());
    assert!(w0 == w1, "weights differ between processes");
    assert!(w0 != weights(None), "the checkpoint's weights were loaded");
}

/// Every tensor of a run's last model (BatchNorm statistics included), flattened in order;
/// with no run, of a freshly initialised one.
fn weights(run: Option<&Path>) -> Vec<f32> {
    let model = resnet8(123, &Device::flex());
    let model = match run {
        Some(run) => model
            .try_load_file(run.join("checkpoints/last/model.bpk"))
            .unwrap(),
        None => model,
    };
    floats(&model)
}

/// Writes the first `count` shipped images as a CIFAR-100 binary file (fine label = class).
fn write_cifar100(path: &Path, count: usize, offset: usize) {
    let folder = ImageFolder::open(&mini().join("train"), None).unwrap();
    let mut bytes = Vec::new();
    for i in 0..count {
        // Spread over the classes: the folder is sorted by class.
        let index = (offset + i * 97) % folder.len();
        let (sample, label) = folder.get(index).unwrap();
        let image = sample.decode(1).unwrap();
        bytes.extend([label as u8 / 2, label as u8]);
        for c in 0..3 {
            bytes.extend(image.pixels.iter().skip(c).step_by(3));
        }
    }
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn the_papers_cifar100_recipe_runs_unchanged_on_a_small_file() {
    let data = tempfile::tempdir().unwrap();
    write_cifar100(&data.path().join("train.bin"), 24, 0);
    write_cifar100(&data.path().join("test.bin"), 16, 5);
    let out = tempfile::tempdir().unwrap();
    let output = train(
        &repo().join("configs/cifar100_cutmix.toml"),
        &[
            format!("output_dir={}", out.path().display()),
            format!("data.root={}", data.path().display()),
            "backend=flex".into(),
            "train.epochs=1".into(),
            "train.batch_size=8".into(),
            "data.train_limit=16".into(),
            "data.val_limit=16".into(),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("26844952 parameters"), "{stdout}");
    let run = out.path().join("cifar100_pyramidnet200_cutmix");
    let lines = metrics(&run);
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["lr"], 0.25);
    assert!(run.join("checkpoints/last/model.bpk").is_file());
}

/// Asserts a failed run printed exactly one line that contains every `needle`.
fn assert_one_line_error(output: &Output, needles: &[&str]) {
    assert!(!output.status.success(), "the run should fail");
    let err = stderr(output);
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    for needle in needles {
        assert!(err.contains(needle), "`{needle}` missing from: {err}");
    }
}

#[test]
fn user_mistakes_end_in_one_clear_line() {
    let out = tempfile::tempdir().unwrap();
    let paper = repo().join("configs/cifar100_cutmix.toml");
    let base = |root: &Path| {
        vec![
            format!("output_dir={}", out.path().display()),
            format!("data.root={}", root.display()),
            "backend=flex".to_string(),
        ]
    };

    let missing = out.path().join("nowhere/cifar-100-binary");
    let output = train(&paper, &base(&missing));
    assert_one_line_error(&output, &["train.bin", "fetch_cifar.sh cifar100"]);

    let mut sets = base(&missing);
    sets.push("train.lrr=0.1".into());
    assert_one_line_error(&train(&paper, &sets), &["lrr"]);

    let mut sets = base(&missing);
    sets.push("model.depth=100".into());
    assert_one_line_error(&train(&paper, &sets), &["model.depth", "9n+2"]);

    let truncated = tempfile::tempdir().unwrap();
    write_cifar100(&truncated.path().join("train.bin"), 3, 0);
    write_cifar100(&truncated.path().join("test.bin"), 2, 0);
    let file = truncated.path().join("train.bin");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 10]).unwrap();
    assert_one_line_error(
        &train(&paper, &base(truncated.path())),
        &["train.bin", "not a whole number"],
    );

    // Nothing was written for any of them.
    assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
}

#[cfg(not(feature = "ndarray"))]
#[test]
fn ndarray_without_the_feature_says_how_to_build_it_in() {
    let out = tempfile::tempdir().unwrap();
    let output = train(
        &repo().join("configs/quickstart.toml"),
        &quick_sets(out.path(), &["backend=ndarray"]),
    );
    assert_one_line_error(&output, &["--features ndarray"]);
}

/// One training step from the same weights and batch on two devices.
fn two_steps(device: &Device) -> (f32, f32) {
    let train_device = device.clone().autodiff();
    let model = resnet8(3, &train_device);
    let folder = ImageFolder::open(&mini().join("train"), None).unwrap();
    let loader = cutmix_data::Loader::new(
        std::sync::Arc::new(folder),
        Some((0..8).map(|i| i * 250).collect()),
        cutmix_data::Transform::CifarTrain {
            size: 32,
            padding: 4,
            pad: cutmix_data::Pad::Zeros,
        },
        cutmix_data::CIFAR_MEAN,
        cutmix_data::CIFAR_STD,
        cutmix_data::LoaderConfig {
            batch_size: 8,
            shuffle: true,
            drop_last: false,
            workers: 0,
            prefetch: 1,
            seed: 1,
            strict: false,
        },
    );
    let batch = loader.epoch(0).next().unwrap().unwrap();
    let mixing = Mixing::CutMix(CutMix {
        beta: 1.0,
        prob: 1.0,
        mode: Mode::Batch,
        partner: Partner::Permutation,
        variant: Default::default(),
    });
    let section: TrainSection = toml::from_str("epochs = 1\nbatch_size = 8\nlr = 0.1").unwrap();
    let mut optimizer = sgd(&section);
    let mut losses = Vec::new();
    let mut model = model;
    for _ in 0..2 {
        let (images, labels) = images_tensor(batch.clone(), &train_device);
        let mixed = mixing.apply(images, &labels, 10, &mut StdRng::seed_from_u64(4));
        let logits = model.forward(mixed.images);
        let (next, out) = train_step(model, &mut optimizer, logits, mixed.targets, 0.1);
        model = next;
        losses.push(out.loss);
    }
    (losses[0], losses[1])
}

#[test]
fn a_training_step_gives_the_same_loss_on_wgpu_and_flex() {
    let flex = two_steps(&Device::flex());
    // The software Vulkan adapter (mesa-vulkan-drivers) stands in for a GPU here.
    let wgpu = two_steps(&Device::wgpu(DeviceKind::Cpu));
    let close = |a: f32, b: f32| (a - b).abs() <= 1e-4 * a.abs().max(1.0);
    assert!(
        close(flex.0, wgpu.0),
        "first step: flex {} wgpu {}",
        flex.0,
        wgpu.0
    );
    assert!(
        close(flex.1, wgpu.1),
        "after one update: flex {} wgpu {}",
        flex.1,
        wgpu.1
    );
    assert!(flex.1 < flex.0, "the step lowers the loss on its own batch");
}

fn command(binary: &str, args: &[String]) -> Output {
    Command::new(binary)
        .args(args)
        .output()
        .expect("the binary runs")
}

fn with_sets(sets: &[String]) -> Vec<String> {
    sets.iter()
        .flat_map(|set| ["--set".to_string(), set.clone()])
        .collect()
}

/// `localize` on real images: its classification agrees with `eval`'s, whole-image boxes are
/// found at the sweep's threshold 0 (the whole map is foreground), and each bad input is one
/// line naming the file, line or flag.
#[test]
fn localize_scores_class_activation_maps_against_box_files() {
    let out = tempfile::tempdir().unwrap();
    let config = repo().join("configs/quickstart.toml");
    let sets = quick_sets(out.path(), &["train.epochs=1"]);
    let output = train(&config, &sets);
    assert!(output.status.success(), "{}", stderr(&output));
    let weights = out.path().join("quickstart/checkpoints/best/model.bpk");
    let run_tool = |binary: &str, extra: &[&str]| {
        let mut args = vec![
            "--config".to_string(),
            config.display().to_string(),
            "--weights".into(),
            weights.display().to_string(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        args.extend(with_sets(&sets));
        command(binary, &args)
    };

    // Every validation image of the mini set, its whole 32x32 frame as its box.
    let val = mini().join("val");
    let mut lines = Vec::new();
    for class in std::fs::read_dir(&val).unwrap().flatten() {
        for image in std::fs::read_dir(class.path()).unwrap().flatten() {
            let name = format!(
                "{}/{}",
                class.file_name().to_string_lossy(),
                image.file_name().to_string_lossy()
            );
            lines.push(format!("{name} 0 0 31 31"));
        }
    }
    let boxes = out.path().join("boxes.txt");
    std::fs::write(&boxes, lines.join("\n")).unwrap();
    let boxes_arg = boxes.display().to_string();
    let figure = out.path().join("cams.png");
    let figure_arg = figure.display().to_string();
    let localized = run_tool(
        env!("CARGO_BIN_EXE_localize"),
        &[
            "--boxes",
            &boxes_arg,
            "--figure",
            &figure_arg,
            "--figure-images",
            "3",
        ],
    );
    assert!(localized.status.success(), "{}", stderr(&localized));
    // Three rows of three 128-pixel cells (32x32 crops drawn 4x) with 4-pixel gaps.
    let png = image::open(&figure).expect("the figure is a PNG");
    assert_eq!((png.width(), png.height()), (3 * 128 + 16, 3 * 132 + 4));
    // Several weight files: a JSON line each, their CAMs side by side after the image.
    let weights_arg = weights.display().to_string();
    let compared = run_tool(
        env!("CARGO_BIN_EXE_localize"),
        &[
            "--boxes",
            &boxes_arg,
            "--figure",
            &figure_arg,
            "--figure-images",
            "2",
            "--weights",
            &weights_arg,
            "--weights",
            &weights_arg,
        ],
    );
    assert!(compared.status.success(), "{}", stderr(&compared));
    assert_eq!(String::from_utf8_lossy(&compared.stdout).lines().count(), 3);
    let png = image::open(&figure).expect("the figure is a PNG");
    assert_eq!((png.width(), png.height()), (4 * 132 + 4, 2 * 132 + 4));
    let stdout = String::from_utf8_lossy(&localized.stdout).into_owned();
    assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
    let found: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let evaluated = run_tool(env!("CARGO_BIN_EXE_eval"), &[]);
    let evaluated: serde_json::Value =
        serde_json::from_slice(&evaluated.stdout).expect("eval's JSON line");
    assert_eq!(found["images"], 64);
    let top1 = 100.0 - evaluated["top1_err"].as_f64().unwrap();
    assert!(
        (found["top1_cls"].as_f64().unwrap() - top1).abs() < 0.01,
        "{found} vs {evaluated}"
    );
    assert_eq!(found["max_box_acc"], 100.0, "{found}");
    assert_eq!(found["max_box_acc_threshold"], 0.0, "{found}");
    let loc = found["top1_loc"].as_f64().unwrap();
    assert!(
        loc <= found["gt_known_loc"].as_f64().unwrap() && loc <= top1 + 0.01,
        "{found}"
    );

    // Bad input: an image without a box, a malformed line, a threshold outside [0, 1].
    let partial = out.path().join("partial.txt");
    std::fs::write(&partial, lines[..lines.len() / 2].join("\n")).unwrap();
    let malformed = out.path().join("malformed.txt");
    std::fs::write(&malformed, format!("{}\nairplane/x.jpg 1 2 3\n", lines[0])).unwrap();
    let (partial_arg, malformed_arg) = (
        partial.display().to_string(),
        malformed.display().to_string(),
    );
    for (extra, needles) in [
        (
            vec!["--boxes", partial_arg.as_str()],
            vec!["partial.txt", "no box for image"],
        ),
        (
            vec!["--boxes", malformed_arg.as_str()],
            vec!["malformed.txt", "line 2"],
        ),
        (
            vec!["--boxes", boxes_arg.as_str(), "--threshold", "2"],
            vec!["--threshold 2"],
        ),
    ] {
        let output = run_tool(env!("CARGO_BIN_EXE_localize"), &extra);
        assert!(!output.status.success());
        let message = stderr(&output);
        let last = message.trim().lines().last().unwrap_or("");
        for needle in needles {
            assert!(last.contains(needle), "{message}");
        }
    }
}

#[test]
fn exported_weights_evaluate_as_the_run_did_and_fine_tune_on_new_classes() {
    let out = tempfile::tempdir().unwrap();
    let config = repo().join("configs/quickstart.toml");
    let sets = quick_sets(out.path(), &["train.epochs=1"]);
    let output = train(&config, &sets);
    assert!(output.status.success(), "{}", stderr(&output));
    let run = out.path().join("quickstart");

    // export: torchvision's names, num_batches_tracked = optimiser steps (192 / 32 = 6).
    let file = out.path().join("resnet8.safetensors");
    let exported = command(
        env!("CARGO_BIN_EXE_export"),
        &[
            "--run".into(),
            run.display().to_string(),
            "--which".into(),
            "best".into(),
            "--out".into(),
            file.display().to_string(),
        ],
    );
    assert!(exported.status.success(), "{}", stderr(&exported));
    let (_, tensors) = cutmix_models::read_weights(&file).unwrap();
    assert_eq!(tensors["fc.weight"].shape, vec![10, 64]);
    assert_eq!(
        tensors["layer2.0.downsample.0.weight"].shape,
        vec![32, 16, 1, 1]
    );
    assert_eq!(
        tensors["layer3.0.bn2.num_batches_tracked"].data,
        cutmix_models::HostData::I64(vec![6])
    );

    // eval of the exported file and of the burnpack gives the run's own validation numbers.
    let best = &metrics(&run)[0];
    let eval_json = |weights: &Path, dump: Option<&Path>| {
        let mut args = vec![
            "--config".to_string(),
            config.display().to_string(),
            "--weights".into(),
            weights.display().to_string(),
        ];
        if let Some(dump) = dump {
            args.extend(["--dump".to_string(), dump.display().to_string()]);
        }
        args.extend(with_sets(&sets));
        let output = command(env!("CARGO_BIN_EXE_eval"), &args);
        assert!(output.status.success(), "{}", stderr(&output));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert_eq!(stdout.lines().count(), 1, "one JSON line: {stdout}");
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()
    };
    let dump = out.path().join("dump.safetensors");
    let from_export = eval_json(&file, Some(&dump));
    let from_bpk = eval_json(&run.join("checkpoints/best/model.bpk"), None);
    assert_eq!(from_export["images"], 64);
    for key in ["loss", "top1_err", "top5_err"] {
        assert_eq!(from_export[key], from_bpk[key], "{key}");
    }
    assert_eq!(from_export["top1_err"], best["val_top1_err"]);
    assert!(
        (from_export["loss"].as_f64().unwrap() - best["val_loss"].as_f64().unwrap()).abs() < 1e-5
    );
    let (_, dumped) = cutmix_models::read_weights(&dump).unwrap();
    assert_eq!(dumped["input"].shape, vec![32, 3, 32, 32]);
    assert_eq!(dumped["logits"].shape, vec![32, 10]);

    // Fine-tuning with another number of classes re-initialises the classifier only.
    let finetune = train(
        &config,
        &quick_sets(
            out.path(),
            &[
                "train.epochs=1",
                "name=finetune",
                "model.num_classes=12",
                &format!("model.init_from={}", file.display()),
            ],
        ),
    );
    assert!(finetune.status.success(), "{}", stderr(&finetune));
    let stdout = String::from_utf8_lossy(&finetune.stdout);
    assert!(
        stdout.contains(
            "loaded 45 tensors, re-initialised fc.weight ([10, 64] in the file, [12, 64] here), fc.bias ([10] in the file, [12] here), unused none"
        ),
        "{stdout}"
    );

    // Export and eval mistakes are one line naming the path.
    let nowhere = out.path().join("missing-folder/x.safetensors");
    for (binary, args) in [
        (
            env!("CARGO_BIN_EXE_export"),
            vec![
                "--run".to_string(),
                run.display().to_string(),
                "--out".into(),
                nowhere.display().to_string(),
            ],
        ),
        (
            env!("CARGO_BIN_EXE_export"),
            vec!["--run".to_string(), out.path().display().to_string()],
        ),
        (
            env!("CARGO_BIN_EXE_eval"),
            vec![
                "--config".to_string(),
                config.display().to_string(),
                "--weights".into(),
                nowhere.display().to_string(),
            ],
        ),
    ] {
        let output = command(binary, &args);
        assert!(!output.status.success());
        let message = stderr(&output);
        assert_eq!(message.trim().lines().count(), 1, "{message}");
        assert!(
            message.contains(&nowhere.display().to_string())
                || message.contains("not a run folder"),
            "{message}"
        );
        assert!(!message.contains("(os error 2): No such"), "{message}");
    }

    // A file for another architecture is one line naming the file and the tensor.
    let wrong = train(
        &config,
        &quick_sets(
            out.path(),
            &[
                "model.depth=14",
                &format!("model.init_from={}", file.display()),
            ],
        ),
    );
    assert!(!wrong.status.success());
    let message = stderr(&wrong);
    assert_eq!(message.trim().lines().count(), 1, "{message}");
    assert!(message.contains("resnet8.safetensors"), "{message}");
    assert!(message.contains("model.init_from"), "{message}");
}

#[test]
fn the_papers_imagenet_recipe_runs_unchanged_on_a_small_folder() {
    let out = tempfile::tempdir().unwrap();
    let output = train(
        &repo().join("configs/imagenet_resnet50_cutmix.toml"),
        &[
            format!("output_dir={}", out.path().display()),
            format!("data.root={}", mini().display()),
            "backend=flex".into(),
            // Small enough for a test: 16 images at 64x64, one epoch.
            "data.image_size=64".into(),
            "data.train_limit=16".into(),
            "data.val_limit=8".into(),
            "train.batch_size=8".into(),
            "train.epochs=1".into(),
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let run = out.path().join("imagenet_resnet50_cutmix");
    assert_eq!(metrics(&run).len(), 1);
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    for line in [
        "depth = 50",
        "color_jitter = 0.4",
        "lighting = 0.1",
        "prob = 1.0",
        "step_size = 75",
        "batch_size = 8",
    ] {
        assert!(resolved.contains(line), "{line} not in {resolved}");
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("25557032 parameters"), "{stdout}");
}

/// A CUB-200-2011 folder as distributed, made of real images of the shipped subset: 3 classes,
/// 4 training and 2 test images each (ids not in file order, as a hand-edited list may be),
/// each with a box.
fn cub_folder(root: &Path) {
    let classes = ["airplane", "cat", "ship"];
    let (mut images, mut labels, mut split, mut boxes, mut names) = (
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
    );
    let mut id = 100;
    for (c, class) in classes.iter().enumerate() {
        let folder = format!("{:03}.{class}", c + 1);
        names.push_str(&format!("{} {folder}\n", c + 1));
        let dir = root.join("images").join(&folder);
        std::fs::create_dir_all(&dir).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(mini().join("train").join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for (i, file) in files.iter().take(6).enumerate() {
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            std::fs::copy(file, dir.join(&name)).unwrap();
            id -= 1;
            images.push_str(&format!("{id} {folder}/{name}\n"));
            labels.push_str(&format!("{id} {}\n", c + 1));
            split.push_str(&format!("{id} {}\n", u8::from(i < 4)));
            boxes.push_str(&format!("{id} 4.0 6.0 20.0 18.0\n"));
        }
    }
    for (file, text) in [
        ("images.txt", images),
        ("image_class_labels.txt", labels),
        ("train_test_split.txt", split),
        ("bounding_boxes.txt", boxes),
        ("classes.txt", names),
    ] {
        std::fs::write(root.join(file), text).unwrap();
    }
}

/// The paper's CUB localization recipe as shipped: a missing ImageNet weights file is one line
/// naming it; without it (at 64x64, one epoch on a CUB-layout folder) ResNet-50 with layer4 at
/// stride 1 trains on the official split, and `localize` reads the folder's own boxes.
#[test]
fn the_papers_cub_recipe_trains_and_localizes_on_a_cub_layout_folder() {
    let data = tempfile::tempdir().unwrap();
    let root = data.path().join("CUB_200_2011");
    cub_folder(&root);
    let out = tempfile::tempdir().unwrap();
    let config = repo().join("configs/cub_resnet50_cutmix.toml");
    let mut sets = vec![
        format!("output_dir={}", out.path().display()),
        format!("data.root={}", root.display()),
        "backend=flex".to_string(),
    ];
    assert_one_line_error(
        &train(&config, &sets),
        &["model.init_from", "resnet50-0676ba61.pth"],
    );
    sets.extend(
        [
            "model.init_from=",
            "data.image_size=64",
            "train.batch_size=6",
            "train.epochs=1",
        ]
        .map(String::from),
    );
    let output = train(&config, &sets);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("12 training and 6 validation images (3 classes)"),
        "{stdout}"
    );
    let run = out.path().join("cub_resnet50_cutmix");
    let resolved = std::fs::read_to_string(run.join("config.toml")).unwrap();
    for line in [
        "last_stride = 1",
        "dataset = \"cub\"",
        "transforms = \"wsol\"",
        "classifier_lr = 0.01",
        "step_size = 150",
    ] {
        assert!(resolved.contains(line), "{line} not in {resolved}");
    }
    let mut args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--weights".into(),
        run.join("checkpoints/last/model.bpk").display().to_string(),
    ];
    args.extend(with_sets(&sets));
    let localized = command(env!("CARGO_BIN_EXE_localize"), &args);
    assert!(localized.status.success(), "{}", stderr(&localized));
    let line: serde_json::Value =
        serde_json::from_slice(localized.stdout.trim_ascii_end()).unwrap();
    assert_eq!(line["images"], 6, "{line}");

    // The same test images as ImageNet ships its validation set: flat, labelled and boxed by
    // LOC_val_solution.csv.
    let imagenet = data.path().join("imagenet");
    let mut csv = String::from("ImageId,PredictionString\n");
    for (wnid, class) in [
        ("n001", "001.airplane"),
        ("n002", "002.cat"),
        ("n003", "003.ship"),
    ] {
        std::fs::create_dir_all(imagenet.join("train").join(wnid)).unwrap();
        std::fs::create_dir_all(imagenet.join("val")).unwrap();
        let mut files: Vec<PathBuf> = std::fs::read_dir(root.join("images").join(class))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for file in &files[4..] {
            let stem = file.file_stem().unwrap().to_string_lossy();
            std::fs::copy(file, imagenet.join(format!("val/{wnid}_{stem}.jpg"))).unwrap();
            csv.push_str(&format!("{wnid}_{stem},{wnid} 4 6 24 24 {wnid} 0 0 9 9 \n"));
        }
    }
    let solution = imagenet.join("LOC_val_solution.csv");
    std::fs::write(&solution, csv).unwrap();
    let mut flat = args.clone();
    flat.extend(with_sets(&[
        "data.dataset=imagefolder".into(),
        format!("data.root={}", imagenet.display()),
        format!("data.val_labels={}", solution.display()),
    ]));
    flat.extend(["--imagenet-boxes".into(), solution.display().to_string()]);
    let localized = command(env!("CARGO_BIN_EXE_localize"), &flat);
    assert!(localized.status.success(), "{}", stderr(&localized));
    let flat_line: serde_json::Value =
        serde_json::from_slice(localized.stdout.trim_ascii_end()).unwrap();
    assert_eq!(flat_line["images"], 6, "{flat_line}");
    assert_eq!(
        flat_line["top1_cls"], line["top1_cls"],
        "{flat_line} vs {line}"
    );

    // Weights of another architecture: one line naming the file.
    args[3] = fixtures()
        .join("cifar_resnet8.pth.tar")
        .display()
        .to_string();
    let output = command(env!("CARGO_BIN_EXE_localize"), &args);
    assert_one_line_error(&output, &["cifar_resnet8.pth.tar", "another architecture"]);
}

/// An image folder of real images (3 classes from the shipped subset) with the awkward files a
/// scraped dataset has planted among them; returns the two files that cannot be decoded.
fn awkward_folder(root: &Path) -> [PathBuf; 2] {
    let classes = ["airplane", "cat", "ship"];
    for (split, skip, take) in [("train", 0, 12), ("val", 12, 4)] {
        for class in classes {
            let source = mini().join("train").join(class);
            let mut files: Vec<PathBuf> = std::fs::read_dir(&source)
                .unwrap()
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for file in files.iter().skip(skip).take(take) {
                std::fs::copy(file, dir.join(file.file_name().unwrap())).unwrap();
            }
        }
    }
    let cat = root.join("train/cat");
    let real = std::fs::read(
        mini()
            .join("train/cat")
            .read_dir()
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .path(),
    )
    .unwrap();
    let photo = image::load_from_memory(&real).unwrap().to_rgb8();
    // Converted and used: grayscale JPEG, RGBA PNG, 16-bit PNG, CMYK JPEG, a 1600 x 1200 JPEG.
    image::DynamicImage::ImageRgb8(photo.clone())
        .to_luma8()
        .save(cat.join("gray.jpg"))
        .unwrap();
    image::DynamicImage::ImageRgb8(photo.clone())
        .to_rgba8()
        .save(cat.join("rgba.png"))
        .unwrap();
    image::DynamicImage::ImageRgb8(photo.clone())
        .to_rgb16()
        .save(cat.join("deep.png"))
        .unwrap();
    std::fs::copy(
        repo().join("crates/data/tests/fixtures/cmyk.jpg"),
        cat.join("cmyk.jpg"),
    )
    .unwrap();
    image::imageops::resize(&photo, 1600, 1200, image::imageops::FilterType::Triangle)
        .save(cat.join("large.jpg"))
        .unwrap();
    // Ignored: not an image by its extension; an empty class folder keeps its label.
    std::fs::write(cat.join("notes.txt"), "not an image").unwrap();
    std::fs::write(cat.join(".DS_Store"), [0u8; 64]).unwrap();
    std::fs::create_dir(root.join("train/zebra")).unwrap();
    // Skipped: a truncated download and an error page saved as .jpg.
    let truncated = cat.join("truncated.jpg");
    std::fs::write(&truncated, &real[..real.len() - 20]).unwrap();
    let garbage = root.join("train/ship/garbage.jpg");
    std::fs::write(&garbage, "<html>404 Not Found</html>").unwrap();
    [truncated, garbage]
}

fn folder_sets(out: &Path, root: &Path, extra: &[&str]) -> Vec<String> {
    let mut sets = vec![
        format!("output_dir={}", out.display()),
        format!("data.root={}", root.display()),
        "backend=flex".into(),
        "data.dataset=imagefolder".into(),
        "data.transforms=imagenet".into(),
        "model.depth=8".into(),
        "train.epochs=1".into(),
        "train.batch_size=8".into(),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    sets
}

#[test]
fn awkward_files_are_converted_skipped_and_named_or_stop_a_strict_run() {
    let data = tempfile::tempdir().unwrap();
    let [truncated, garbage] = awkward_folder(data.path());
    let out = tempfile::tempdir().unwrap();
    let config = repo().join("configs/quickstart.toml");
    let output = train(&config, &folder_sets(out.path(), data.path(), &[]));
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    // 36 real images + 5 converted + 2 unreadable (the .txt and .DS_Store are not listed).
    assert!(
        stdout.contains("43 training and 12 validation images (4 classes)"),
        "{stdout}"
    );
    assert!(stdout.contains("zebra has no images"), "{stdout}");
    assert!(
        stdout.contains("epoch 1: skipped 2 image file(s)"),
        "{stdout}"
    );
    for path in [&truncated, &garbage] {
        let line = format!("skipped: {}: ", path.display());
        assert!(stdout.contains(&line), "no `{line}` in {stdout}");
    }
    assert!(stdout.contains("truncated JPEG"), "{stdout}");
    let last = metrics(&out.path().join("quickstart")).pop().unwrap();
    assert_eq!(last["skipped_images"], 2);
    let classes = std::fs::read_to_string(out.path().join("quickstart/classes.txt")).unwrap();
    assert_eq!(classes, "airplane\ncat\nship\nzebra");

    let strict = train(
        &config,
        &folder_sets(out.path(), data.path(), &["data.strict=true"]),
    );
    assert!(!strict.status.success());
    let error = stderr(&strict);
    assert_eq!(error.trim().lines().count(), 1, "{error}");
    assert!(
        error.contains(&*truncated.to_string_lossy())
            || error.contains(&*garbage.to_string_lossy()),
        "{error}"
    );
}

#[test]
fn a_flat_validation_folder_is_labelled_by_its_file() {
    let data = tempfile::tempdir().unwrap();
    awkward_folder(data.path());
    // Flatten val/<class>/x.jpg into val/x.jpg with a labels file, as ImageNet ships it.
    let val = data.path().join("val");
    let mut lines = String::from("ImageId,PredictionString\n");
    for class in ["airplane", "cat", "ship"] {
        for entry in std::fs::read_dir(val.join(class)).unwrap() {
            let path = entry.unwrap().path();
            let name = format!("{class}_{}", path.file_name().unwrap().to_string_lossy());
            std::fs::rename(&path, val.join(&name)).unwrap();
            let stem = name.trim_end_matches(".jpg");
            lines.push_str(&format!("{stem},{class} 0 0 31 31\n"));
        }
        std::fs::remove_dir(val.join(class)).unwrap();
    }
    let labels = data.path().join("LOC_val_solution.csv");
    std::fs::write(&labels, lines).unwrap();
    let out = tempfile::tempdir().unwrap();
    let config = repo().join("configs/quickstart.toml");
    let missing = train(&config, &folder_sets(out.path(), data.path(), &[]));
    assert_one_line_error(&missing, &["data.val_labels"]);
    let output = train(
        &config,
        &folder_sets(
            out.path(),
            data.path(),
            &[&format!("data.val_labels={}", labels.display())],
        ),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("12 validation images"), "{stdout}");
}

/// The folder of the PyTorch-written test files.
fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

/// The tensors of a PyTorch-written fixture file.
fn pytorch_fixture(file: &str) -> cutmix_models::StateDict {
    cutmix_models::read_weights(&fixtures().join(file))
        .unwrap()
        .1
}

/// The PyTorch-written CIFAR ResNet-8 (`cifar_resnet8.pth.tar`) on `device`.
fn pytorch_resnet8(device: &Device) -> cutmix_models::Model {
    let file = fixtures().join("cifar_resnet8.pth.tar");
    cutmix_train::weights::load(resnet8(5, device), &file)
        .unwrap()
        .0
}

/// Files PyTorch wrote (scripts/check_torch_interop.py --write-fixture): a CIFAR ResNet-8 with
/// every weight and BatchNorm statistic random, saved as the reference saves checkpoints
/// (`{"state_dict": {"module.conv1.weight": ...}, "epoch": ...}`) in PyTorch's ZIP format and
/// in the legacy format of 2019, and its logits on a fixed input.
#[test]
fn reference_style_pytorch_checkpoints_load_and_give_pytorchs_logits() {
    use burn::module::Module;
    use burn::tensor::{Tensor, TensorData};

    let fixtures = fixtures();
    let expected = pytorch_fixture("cifar_resnet8_logits.safetensors");
    let floats = |name: &str| fixture_floats(&expected, name);
    let device = Device::flex();
    for file in ["cifar_resnet8.pth.tar", "cifar_resnet8_legacy.pth.tar"] {
        let (model, summary) =
            cutmix_train::weights::load(resnet8(5, &device), &fixtures.join(file)).unwrap();
        assert_eq!(summary.loaded, 47, "{file}: {summary}");
        assert!(summary.reinitialised.is_empty() && summary.unused.is_empty());
        let input =
            Tensor::<4>::from_data(TensorData::new(floats("input"), [2, 3, 32, 32]), &device);
        let logits = model
            .valid()
            .forward(input)
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        let theirs = floats("logits");
        let scale = theirs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let error = logits
            .iter()
            .zip(&theirs)
            .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()))
            / scale;
        assert!(error < 1e-4, "{file}: relative error {error}");
    }
    // `model.reinit_classifier`: the same file without its classifier, whatever its shape.
    let file = fixtures.join("cifar_resnet8.pth.tar");
    let fresh = resnet8(5, &device);
    let fresh_fc = fresh.classifier().weight.val().into_data();
    let (model, summary) = cutmix_train::weights::load_backbone(fresh, &file).unwrap();
    assert_eq!(summary.loaded, 45, "{summary}");
    assert_eq!(summary.reinitialised.len(), 2, "{summary}");
    assert!(
        summary
            .to_string()
            .contains("fc.weight ([10, 64] in the file"),
        "{summary}"
    );
    assert_eq!(model.classifier().weight.val().into_data(), fresh_fc);
}

/// `analyze` end to end on the PyTorch-written ResNet-8 and 64 real validation images: each
/// analysis agrees with `eval` where it must (no attack, no hole, a hole the size of the image
/// for boundary occlusion, lambda 0 and 1 for both mixes), writes its figure, and each bad input
/// is named on the error's first line.
#[test]
fn analyze_runs_every_analysis_and_names_bad_input() {
    let out = tempfile::tempdir().unwrap();
    let weights = fixtures()
        .join("cifar_resnet8.pth.tar")
        .display()
        .to_string();
    let config = repo().join("configs/quickstart.toml").display().to_string();
    let sets = with_sets(&[
        "backend=flex".into(),
        format!("data.root={}", mini().display()),
        "model.depth=8".into(),
        "data.val_limit=64".into(),
    ]);
    let analyze = |args: &[&str]| {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.extend([
            "--config".into(),
            config.clone(),
            "--weights".into(),
            weights.clone(),
        ]);
        all.extend(sets.iter().cloned());
        command(env!("CARGO_BIN_EXE_analyze"), &all)
    };
    let json = |output: &Output| -> serde_json::Value {
        assert!(output.status.success(), "{}", stderr(output));
        serde_json::from_slice(output.stdout.trim_ascii_end()).unwrap()
    };
    let mut eval_args = vec![
        "--config".to_string(),
        config.clone(),
        "--weights".into(),
        weights.clone(),
    ];
    eval_args.extend(sets.iter().cloned());
    let evaluated = json(&command(env!("CARGO_BIN_EXE_eval"), &eval_args));
    let clean_err = evaluated["top1_err"].as_f64().unwrap();
    let is_clean = |v: &serde_json::Value| (v.as_f64().unwrap() - clean_err).abs() < 0.006;
    let figure = |name: &str| out.path().join(name).display().to_string();

    let fgsm = json(&analyze(&[
        "fgsm",
        "--label",
        "fixture",
        "--eps",
        "0,8/255",
        "--figure",
        &figure("fgsm.png"),
    ]));
    assert_eq!(
        (fgsm["images"].as_u64(), fgsm["label"].as_str()),
        (Some(64), Some("fixture"))
    );
    assert!(is_clean(&fgsm["top1_err"][0]), "{fgsm}");
    assert_eq!(fgsm["eps"][1], 0.031373);
    assert!(
        fgsm["top1_acc"][1].as_f64() <= fgsm["clean_top1_acc"].as_f64(),
        "{fgsm}"
    );

    let occlusion = json(&analyze(&[
        "occlusion",
        "--sizes",
        "0,16,32",
        "--figure",
        &figure("occlusion.png"),
    ]));
    assert!(is_clean(&occlusion["centre_top1_err"][0]), "{occlusion}");
    assert!(is_clean(&occlusion["boundary_top1_err"][2]), "{occlusion}");
    assert_eq!(occlusion["fill"], "black");

    let between = json(&analyze(&[
        "between",
        "--steps",
        "3",
        "--pairs",
        "48",
        "--figure",
        &figure("between.png"),
    ]));
    for k in [0, 2] {
        assert_eq!(
            between["mixup_neither"][k], between["cutmix_neither"][k],
            "{between}"
        );
    }
    assert_eq!(between["pairs"], 48, "{between}");

    let cat = mini().join("train/cat").display().to_string();
    let cifar_file = out.path().join("ood.bin");
    write_cifar100(&cifar_file, 16, 0);
    let cifar_arg = cifar_file.display().to_string();
    let ood = json(&analyze(&[
        "ood",
        "--ood",
        "uniform",
        "--ood",
        &cifar_arg,
        "--ood",
        &cat,
        "--synthetic-images",
        "32",
        "--figure",
        &figure("ood.png"),
    ]));
    assert_eq!(ood["sets"]["uniform"]["images"], 32, "{ood}");
    assert_eq!(ood["sets"]["cat"]["images"], 200, "{ood}");
    assert_eq!(ood["sets"]["ood.bin"]["images"], 16, "{ood}");
    let auroc = ood["mean"]["auroc"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&auroc), "{ood}");

    let calibrated = json(&analyze(&[
        "calibration",
        "--fit-temperature",
        "--figure",
        &figure("reliability.png"),
    ]));
    assert!(is_clean(&calibrated["top1_err"]), "{calibrated}");
    assert_eq!(calibrated["held_out_after"]["images"], 32, "{calibrated}");
    assert!(calibrated["temperature"].as_f64().unwrap() > 0.0);
    for name in [
        "fgsm.png",
        "occlusion.png",
        "between.png",
        "ood.png",
        "reliability.png",
    ] {
        let png = image::open(out.path().join(name)).expect("a PNG");
        assert!(png.width() >= 520 && png.height() == 460, "{name}");
    }

    // Bad input: the first line of the error names the flag, folder or file.
    let empty = out.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let empty_arg = empty.display().to_string();
    for (args, needles) in [
        (vec!["fgsm", "--eps", "2"], vec!["--eps", "not in [0, 1]"]),
        (vec!["fgsm", "--eps", "x/255"], vec!["--eps"]),
        (
            vec!["ood", "--ood", "/nowhere/lsun"],
            vec!["--ood /nowhere/lsun"],
        ),
        (vec!["ood", "--ood", &empty_arg], vec!["empty", "no images"]),
        (vec!["between", "--steps", "1"], vec!["--steps 1"]),
        (
            vec!["calibration", "--label", "a", "--label", "b"],
            vec!["--label", "2 labels for 1"],
        ),
        (vec!["occlusion", "--sizes", "40"], vec!["--sizes", "40"]),
        (
            vec!["calibration", "--set", "model.num_classes=12"],
            vec!["cifar_resnet8.pth.tar", "model.num_classes"],
        ),
    ] {
        let output = analyze(&args);
        assert!(!output.status.success(), "{args:?} should fail");
        let message = stderr(&output);
        let first = message
            .lines()
            .find(|l| l.starts_with("error"))
            .unwrap_or("");
        for needle in needles {
            assert!(
                first.contains(needle),
                "{args:?}: `{needle}` not in {message}"
            );
        }
    }
}

/// FGSM's adversarial batches (8/255 and 2/255, true labels, clipped) and ODIN's perturbed
/// batch (-0.0014 at temperature 1000, predicted labels) of the PyTorch-written ResNet-8
/// fixture in evaluation mode equal PyTorch's to 1e-5 (`scripts/check_torch_interop.py
/// --write-fgsm-fixture`), except where PyTorch's gradient is too small for its sign to be
/// defined by float rounding.
#[test]
fn fgsm_and_odin_batches_equal_pytorchs() {
    use cutmix_train::analyze::attack::{Attacker, Images, Step, stepped};

    let expected = pytorch_fixture("cifar_resnet8_fgsm.safetensors");
    let floats = |name: &str| fixture_floats(&expected, name);
    let model = pytorch_resnet8(&Device::flex().autodiff());
    let attacker = Attacker::new(&model, 10);
    let input = floats("input");
    let labels: Vec<usize> = floats("labels").iter().map(|&v| v as usize).collect();
    let (mean, std) = (cutmix_data::CIFAR_MEAN, cutmix_data::CIFAR_STD);
    let compare = |ours: &[f32], theirs: &[f32], grad: &[f32], what: &str| {
        let scale = grad.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let mut undefined = 0;
        for ((a, b), g) in ours.iter().zip(theirs).zip(grad) {
            if g.abs() < 1e-6 * scale {
                undefined += 1;
            } else {
                assert!(
                    (a - b).abs() < 1e-5,
                    "{what}: ours {a}, PyTorch's {b} (gradient {g})"
                );
            }
        }
        assert!(
            undefined * 1000 < ours.len(),
            "{what}: {undefined} values of undefined sign"
        );
        let moved = ours
            .iter()
            .zip(&input)
            .filter(|(a, x)| (*a - *x).abs() > 1e-4)
            .count();
        assert!(
            moved * 2 > ours.len(),
            "{what}: the step moved only {moved} values"
        );
    };
    let batch = Images {
        images: &input,
        n: 4,
        size: 32,
    };
    let (sign, _) = attacker.gradient_sign_for(batch, |_| labels.clone(), 1.0);
    for (eps, name) in [(8.0 / 255.0, "fgsm_8"), (2.0 / 255.0, "fgsm_2")] {
        let step = Step { eps, clip: true };
        let ours = stepped(&input, &sign, 32, step, mean, std);
        compare(&ours, &floats(name), &floats("grad"), name);
    }
    // ODIN: one forward pass on the frozen model gives the logits (those of evaluation mode),
    // the predicted classes as targets and the gradient.
    let eval_logits =
        cutmix_train::analyze::host(model.valid().forward(burn::tensor::Tensor::<4>::from_data(
            burn::tensor::TensorData::new(input.clone(), [4, 3, 32, 32]),
            &Device::flex(),
        )));
    let predicted = |logits: &[f32]| cutmix_train::analyze::predictions(logits, 10);
    let (sign, logits) = attacker.gradient_sign_for(batch, predicted, 1000.0);
    assert!(
        relative_error(&logits, &eval_logits) < 1e-5,
        "not evaluation mode"
    );
    let step = Step {
        eps: -0.0014,
        clip: false,
    };
    let ours = stepped(&input, &sign, 32, step, mean, std);
    compare(&ours, &floats("odin"), &floats("odin_grad"), "odin");
}

/// Class activation maps of the PyTorch-written ResNet-8 fixture equal PyTorch's (the last
/// feature map weighed by `fc.weight`, bilinear upsampling, min-max normalisation; written by
/// `scripts/check_torch_interop.py --write-cam-fixture`) for every class, to 1e-4.
#[test]
fn class_activation_maps_equal_pytorchs() {
    use burn::module::Module;
    use burn::tensor::{Tensor, TensorData};

    let expected = pytorch_fixture("cifar_resnet8_cams.safetensors");
    let floats = |name: &str| fixture_floats(&expected, name);
    let device = Device::flex();
    let model = pytorch_resnet8(&device).valid();
    let input = Tensor::<4>::from_data(TensorData::new(floats("input"), [2, 3, 32, 32]), &device);
    let features = model.features(input);
    let [n, channels, h, w] = features.dims();
    assert_eq!([n, channels, h, w], [2, 64, 8, 8]);
    let features = features.into_data().try_into_vec_as::<f32>().unwrap();
    let weight = model.classifier().weight.val().transpose();
    let weight = weight.into_data().try_into_vec_as::<f32>().unwrap();
    let theirs = floats("cams");
    let plane = channels * h * w;
    let mut worst = 0f32;
    for image in 0..n {
        for class in 0..10 {
            let ours = cutmix_analysis::cam::cam(
                &features[image * plane..(image + 1) * plane],
                [channels, h, w],
                &weight,
                class,
                [32, 32],
            );
            let start = (image * 10 + class) * 32 * 32;
            for (a, b) in ours.iter().zip(&theirs[start..start + 32 * 32]) {
                worst = worst.max((a - b).abs());
            }
        }
    }
    assert!(
        worst < 1e-4,
        "largest difference from PyTorch's maps: {worst}"
    );
}

#[test]
fn list_models_prints_the_zoo_with_parameters_and_macs() {
    let output = command(env!("CARGO_BIN_EXE_train"), &["--list-models".into()]);
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let row = |name: &str| -> Vec<String> {
        let line = stdout
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .unwrap_or_else(|| panic!("{name} not listed: {stdout}"));
        line.split_whitespace().map(str::to_string).collect()
    };
    assert_eq!(row("resnet50")[1..3], ["25557032", "4.089"]);
    assert_eq!(row("resnet101")[1..3], ["44549160", "7.801"]);
    assert_eq!(row("pyramidnet200_a240")[1..3], ["26844952", "4.520"]);
}

/// Every mixing method draws on the host and moves pixels with plain tensor ops, so the same
/// seed gives the same mixed batch and targets on flex and on wgpu.
#[test]
fn every_mixing_method_gives_the_same_batch_on_wgpu_and_flex() {
    use burn::tensor::{Tensor, TensorData};
    use cutmix_augment::{CutMixOrMixup, Cutout, Mixup};

    let (batch, side) = (8, 12);
    let pixels: Vec<f32> = (0..batch * 3 * side * side)
        .map(|i| ((i * 7919) % 1000) as f32 / 250.0 - 2.0)
        .collect();
    let labels = [0, 1, 2, 3, 4, 5, 6, 7];
    let mut methods = vec![Mixing::Cutout(Cutout { size: 5, prob: 0.8 })];
    for mode in [Mode::Batch, Mode::Elem] {
        let cutmix = CutMix {
            beta: 1.0,
            prob: 0.9,
            mode,
            partner: Partner::Permutation,
            variant: Default::default(),
        };
        let mixup = Mixup {
            alpha: 1.0,
            prob: 0.9,
            mode,
            partner: Partner::Flip,
        };
        methods.push(Mixing::CutMix(cutmix.clone()));
        methods.push(Mixing::Mixup(mixup.clone()));
        methods.push(Mixing::CutMixOrMixup(CutMixOrMixup {
            cutmix,
            mixup,
            switch_prob: 0.5,
        }));
    }
    let run = |mixing: &Mixing, device: &Device, seed: u64| {
        let images = Tensor::<4>::from_data(
            TensorData::new(pixels.clone(), [batch, 3, side, side]),
            device,
        );
        let mixed = mixing.apply(images, &labels, 8, &mut StdRng::seed_from_u64(seed));
        let values = |t: TensorData| t.try_into_vec_as::<f32>().unwrap();
        (
            values(mixed.images.into_data()),
            values(mixed.targets.into_data()),
        )
    };
    let wgpu = Device::wgpu(DeviceKind::Cpu);
    let mut changed = 0;
    for mixing in &methods {
        for seed in 0..3 {
            let (flex_images, flex_targets) = run(mixing, &Device::flex(), seed);
            let (wgpu_images, wgpu_targets) = run(mixing, &wgpu, seed);
            assert_eq!(flex_targets, wgpu_targets, "{mixing:?} seed {seed}");
            for (a, b) in flex_images.iter().zip(&wgpu_images) {
                assert!((a - b).abs() < 1e-6, "{mixing:?} seed {seed}: {a} vs {b}");
            }
            changed += usize::from(flex_images != pixels);
        }
    }
    // prob < 1 leaves some batches alone; most must have been mixed for the test to mean much.
    assert!(changed >= 2 * methods.len(), "{changed} mixed batches");
}

/// A whole one-epoch run from the same seed on flex and on wgpu (software Vulkan here): the
/// same training loss, each run labelled with its backend.
#[test]
fn one_epoch_on_wgpu_matches_flex() {
    let config = repo().join("configs/quickstart.toml");
    let losses: Vec<(f64, String)> = ["flex", "wgpu"]
        .iter()
        .map(|backend| {
            let out = tempfile::tempdir().unwrap();
            let output = train(
                &config,
                &quick_sets(
                    out.path(),
                    &[
                        &format!("backend={backend}"),
                        "train.epochs=1",
                        "data.train_limit=64",
                        "data.val_limit=32",
                        "augment.mode=elem",
                        "augment.prob=1.0",
                    ],
                ),
            );
            assert!(output.status.success(), "{backend}: {}", stderr(&output));
            let line = &metrics(&out.path().join("quickstart"))[0];
            (
                line["train_loss"].as_f64().unwrap(),
                line["backend"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(losses[0].1, "flex");
    assert_eq!(losses[1].1, "wgpu");
    let (a, b) = (losses[0].0, losses[1].0);
    assert!((a - b).abs() <= 1e-4 * a.abs(), "flex {a} vs wgpu {b}");
}

#[test]
fn every_method_and_mode_trains_and_batch_and_elem_differ() {
    let config = repo().join("configs/quickstart.toml");
    let out = tempfile::tempdir().unwrap();
    let runs: [(&str, &[&str]); 7] = [
        ("cutmix-batch", &["augment.prob=1.0"]),
        ("cutmix-elem", &["augment.prob=1.0", "augment.mode=elem"]),
        ("mixup", &["augment.method=mixup", "augment.partner=flip"]),
        ("cutout", &["augment.method=cutout", "augment.prob=1.0"]),
        (
            "switch",
            &[
                "augment.method=cutmix+mixup",
                "augment.mode=elem",
                "augment.partner=roll",
            ],
        ),
        ("features", &["augment.at=layer2", "augment.prob=1.0"]),
        (
            "smooth-off",
            &["train.label_smoothing=0.1", "augment.off_epoch=1"],
        ),
    ];
    let mut losses = std::collections::HashMap::new();
    for (name, sets) in runs {
        let mut all = vec![
            format!("name={name}"),
            "train.epochs=1".to_string(),
            "data.train_limit=64".into(),
            "data.val_limit=32".into(),
        ];
        all.extend(sets.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let output = train(&config, &quick_sets(out.path(), &refs));
        assert!(output.status.success(), "{name}: {}", stderr(&output));
        let line = &metrics(&out.path().join(name))[0];
        let loss = line["train_loss"].as_f64().unwrap();
        assert!(loss.is_finite(), "{name}");
        losses.insert(name, loss);
    }
    assert_ne!(losses["cutmix-batch"], losses["cutmix-elem"]);
    assert_ne!(losses["cutmix-batch"], losses["features"]);

    // A stage the model does not have is refused, naming the key.
    let wrong = train(&config, &quick_sets(out.path(), &["augment.at=layer4"]));
    assert!(!wrong.status.success());
    assert!(stderr(&wrong).contains("augment.at"), "{}", stderr(&wrong));
}

/// Feature-level CutMix corrects lambda at the feature map's resolution: after `layer2` of a
/// CIFAR ResNet a 32x32 input is 16x16, so every own-label weight is a multiple of 1/256.
#[test]
fn feature_level_cutmix_corrects_lambda_at_the_feature_resolution() {
    use burn::tensor::{Tensor, TensorData};
    use cutmix_train::trainer::mixed_forward;

    let device = Device::flex().autodiff();
    let model = resnet8(1, &device);
    let mixing = Mixing::CutMix(CutMix {
        beta: 1.0,
        prob: 1.0,
        mode: Mode::Elem,
        partner: Partner::Permutation,
        variant: Default::default(),
    });
    let labels: Vec<usize> = (0..8).collect();
    let images = Tensor::<4>::from_data(
        TensorData::new(vec![0.5f32; 8 * 3 * 32 * 32], [8, 3, 32, 32]),
        &device,
    );
    let mut shapes = Vec::new();
    let (logits, targets) = mixed_forward(
        &model,
        images,
        &labels,
        10,
        &mixing,
        Some(2),
        &mut StdRng::seed_from_u64(3),
        &mut StdRng::seed_from_u64(4),
    );
    assert_eq!(logits.dims(), [8, 10]);
    let targets: Vec<f32> = targets.into_data().try_into_vec_as::<f32>().unwrap();
    let mut fractional = 0;
    for (i, row) in targets.chunks(10).enumerate() {
        let own = row[labels[i]] * 256.0;
        assert!(
            (own - own.round()).abs() < 1e-3,
            "row {i}: {}",
            row[labels[i]]
        );
        fractional += usize::from(row[labels[i]] < 1.0);
        shapes.push(own);
    }
    assert!(fractional > 0, "some image was mixed: {shapes:?}");
}

/// Every tensor of a checkpoint folder's model, flattened in order.
fn checkpoint_weights(folder: &Path) -> Vec<f32> {
    weights_file(folder, "model.bpk")
}

/// Every float tensor of one of a checkpoint's weights files (`model.bpk`, `ema.bpk`).
fn weights_file(folder: &Path, file: &str) -> Vec<f32> {
    let model = resnet8(123, &Device::flex())
        .try_load_file(folder.join(file))
        .unwrap();
    floats(&model)
}

#[test]
fn a_run_killed_after_an_epoch_and_resumed_equals_the_uninterrupted_run() {
    let config = repo().join("configs/quickstart.toml");
    let extra = [
        "train.epochs=3",
        "train.schedule=multistep",
        "train.milestones=[2]",
        "augment.prob=1.0",
        "augment.mode=elem",
        "train.ema_decay=0.9",
    ];
    let whole = tempfile::tempdir().unwrap();
    let output = train(&config, &quick_sets(whole.path(), &extra));
    assert!(output.status.success(), "{}", stderr(&output));

    // The same run, killed (SIGKILL) once its first checkpoint is complete, then resumed.
    let broken = tempfile::tempdir().unwrap();
    let sets = quick_sets(broken.path(), &extra);
    let mut command = Command::new(env!("CARGO_BIN_EXE_train"));
    command.arg("--config").arg(&config);
    for set in &sets {
        command.arg("--set").arg(set);
    }
    let mut child = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let run = broken.path().join("quickstart");
    let state = run.join("checkpoints/last/state.json");
    let started = std::time::Instant::now();
    while !state.is_file() && started.elapsed().as_secs() < 300 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let killed_after: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert!(
        killed_after["epoch"].as_u64().unwrap() < 3,
        "killed before the end"
    );

    let mut resumed = Command::new(env!("CARGO_BIN_EXE_train"));
    resumed.arg("--config").arg(&config).arg("--resume");
    for set in &sets {
        resumed.arg("--set").arg(set);
    }
    let output = resumed.output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("resuming"), "{stdout}");

    let (a, b) = (
        checkpoint_weights(&whole.path().join("quickstart/checkpoints/last")),
        checkpoint_weights(&run.join("checkpoints/last")),
    );
    assert!(
        a == b,
        "the resumed run's weights differ from the uninterrupted run's"
    );
    assert!(
        weights_file(&whole.path().join("quickstart/checkpoints/last"), "ema.bpk")
            == weights_file(&run.join("checkpoints/last"), "ema.bpk"),
        "the resumed run's moving average differs"
    );
    let (ma, mb) = (metrics(&whole.path().join("quickstart")), metrics(&run));
    assert_eq!(mb.len(), 3, "one line per epoch, none repeated");
    for (x, y) in ma.iter().zip(&mb) {
        for key in ["epoch", "train_loss", "val_loss", "val_top1_err", "lr"] {
            assert_eq!(x[key], y[key], "{key}");
        }
    }

    // Ctrl-C in the middle of an epoch: a checkpoint of that point, exit code 130, and the
    // resumed run still ends on the same weights.
    let stopped = tempfile::tempdir().unwrap();
    let stopped_sets = quick_sets(stopped.path(), &extra);
    let mut command = Command::new(env!("CARGO_BIN_EXE_train"));
    command.arg("--config").arg(&config);
    for set in &stopped_sets {
        command.arg("--set").arg(set);
    }
    let child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let run_c = stopped.path().join("quickstart");
    let first = run_c.join("checkpoints/epoch-0001/state.json");
    let started = std::time::Instant::now();
    while !first.is_file() && started.elapsed().as_secs() < 300 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    let signal = Command::new("sh")
        .arg("-c")
        .arg(format!("kill -INT {}", child.id()))
        .status()
        .unwrap();
    assert!(signal.success());
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.code() == Some(130) {
        assert!(stdout.contains("interrupted in epoch"), "{stdout}");
        let mut resume_c = Command::new(env!("CARGO_BIN_EXE_train"));
        resume_c.arg("--config").arg(&config).arg("--resume");
        for set in &stopped_sets {
            resume_c.arg("--set").arg(set);
        }
        let output = resume_c.output().unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        assert!(
            checkpoint_weights(&run_c.join("checkpoints/last")) == a,
            "the run stopped with Ctrl-C and resumed differs from the uninterrupted run"
        );
    } else {
        // The signal came after the last step: the run finished normally.
        assert!(output.status.success(), "{}", stderr(&output));
    }

    // Resuming a finished run does nothing; resuming a run that does not exist says so.
    let again = resumed.output().unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    assert_eq!(metrics(&run).len(), 3);
    let mut missing = Command::new(env!("CARGO_BIN_EXE_train"));
    missing.arg("--config").arg(&config).arg("--resume");
    for set in quick_sets(broken.path(), &["name=never-started"]) {
        missing.arg("--set").arg(set);
    }
    let nothing = missing.output().unwrap();
    assert!(!nothing.status.success());
    let message = stderr(&nothing);
    assert!(
        message.contains("never-started") && message.contains("--resume"),
        "{message}"
    );
}

/// `train` with `sets`, started in the background.
fn spawn_train(config: &Path, sets: &[String], resume: bool) -> std::process::Child {
    let mut command = Command::new(env!("CARGO_BIN_EXE_train"));
    command.arg("--config").arg(config);
    if resume {
        command.arg("--resume");
    }
    for set in sets {
        command.arg("--set").arg(set);
    }
    command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn sigterm_and_sigkill_in_the_middle_of_an_epoch_resume_to_the_uninterrupted_run() {
    let config = repo().join("configs/quickstart.toml");
    let extra = ["train.epochs=3", "train.batch_size=16"];
    let whole = tempfile::tempdir().unwrap();
    let output = train(&config, &quick_sets(whole.path(), &extra));
    assert!(output.status.success(), "{}", stderr(&output));
    let expected = checkpoint_weights(&whole.path().join("quickstart/checkpoints/last"));
    let expected_metrics = metrics(&whole.path().join("quickstart"));
    let same_run = |run: &Path| {
        assert!(
            checkpoint_weights(&run.join("checkpoints/last")) == expected,
            "the resumed run's weights differ from the uninterrupted run's"
        );
        let found = metrics(run);
        assert_eq!(found.len(), 3);
        // The epoch cut in two reports the whole epoch's training numbers too.
        for (x, y) in found.iter().zip(&expected_metrics) {
            for key in [
                "epoch",
                "train_loss",
                "train_top1_err",
                "val_loss",
                "val_top1_err",
            ] {
                assert_eq!(x[key], y[key], "{key}");
            }
        }
    };

    // SIGTERM (Slurm's and Kubernetes' notice): a checkpoint after the current step, status 143.
    let stopped = tempfile::tempdir().unwrap();
    let sets = quick_sets(stopped.path(), &extra);
    let child = spawn_train(&config, &sets, false);
    let run = stopped.path().join("quickstart");
    wait_for_state(&run.join("checkpoints/epoch-0001/state.json"), |_| true);
    let kill = |signal: &str, pid: u32| {
        let status = Command::new("kill")
            .args([format!("-{signal}"), pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    kill("TERM", child.id());
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    if output.status.code() == Some(143) {
        assert!(
            stdout.contains("interrupted in epoch") && stdout.contains("SIGTERM"),
            "{stdout}"
        );
        let resumed = train_resume(&config, &sets);
        assert!(resumed.status.success(), "{}", stderr(&resumed));
        same_run(&run);
    } else {
        // The signal came after the last step.
        assert!(output.status.success(), "{}", stderr(&output));
    }

    // SIGKILL after a checkpoint inside an epoch (`train.checkpoint_steps`): nothing but the
    // steps since it is lost, and the resumed run is the uninterrupted one.
    let killed = tempfile::tempdir().unwrap();
    let mut sets = quick_sets(killed.path(), &extra);
    sets.push("train.checkpoint_steps=5".into());
    let mut child = spawn_train(&config, &sets, false);
    let run = killed.path().join("quickstart");
    wait_for_state(&run.join("checkpoints/last/state.json"), |s| {
        s["epoch"] == 1 && s["batch"].as_u64() > Some(0)
    });
    child.kill().unwrap();
    child.wait().unwrap();
    let resumed = train_resume(&config, &sets);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let log = String::from_utf8_lossy(&resumed.stdout).into_owned();
    assert!(
        log.contains("resuming") && log.contains("in epoch 2 after batch"),
        "{log}"
    );
    same_run(&run);

    // SIGUSR1 (Slurm's warning before the time limit): saved, and status 75 for a requeue.
    let warned = tempfile::tempdir().unwrap();
    let sets = quick_sets(warned.path(), &extra);
    let child = spawn_train(&config, &sets, false);
    wait_for_state(
        &warned
            .path()
            .join("quickstart/checkpoints/epoch-0001/state.json"),
        |_| true,
    );
    kill("USR1", child.id());
    let output = child.wait_with_output().unwrap();
    if output.status.code() != Some(0) {
        assert_eq!(output.status.code(), Some(75), "{}", stderr(&output));
        let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(stdout.contains("SIGUSR1"), "{stdout}");
        let resumed = train_resume(&config, &sets);
        assert!(resumed.status.success(), "{}", stderr(&resumed));
        same_run(&warned.path().join("quickstart"));
    }
}

fn train_resume(config: &Path, sets: &[String]) -> Output {
    let mut command = Command::new(env!("CARGO_BIN_EXE_train"));
    command.arg("--config").arg(config).arg("--resume");
    for set in sets {
        command.arg("--set").arg(set);
    }
    command.output().unwrap()
}

#[test]
fn a_damaged_checkpoint_is_named_and_resume_falls_back_to_the_newest_intact_one() {
    let config = repo().join("configs/quickstart.toml");
    let out = tempfile::tempdir().unwrap();
    let sets = quick_sets(out.path(), &["train.epochs=3", "train.keep_last=2"]);
    let output = train(&config, &sets);
    assert!(output.status.success(), "{}", stderr(&output));
    let run = out.path().join("quickstart");
    // Cut `last`'s weights in half (`epoch-0003` shares the file: both are damaged).
    let weights = run.join("checkpoints/last/model.bpk");
    let len = std::fs::metadata(&weights).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&weights)
        .unwrap()
        .set_len(len / 2)
        .unwrap();
    let mut longer = sets.clone();
    longer.push("train.epochs=4".into());
    let resumed = train_resume(&config, &longer);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let log = String::from_utf8_lossy(&resumed.stdout).into_owned();
    assert!(
        log.contains("passing over a damaged checkpoint")
            && log.contains("truncated or damaged")
            && log.contains("continuing from the newest intact checkpoint")
            && log.contains("epoch-0002")
            && log.contains("after epoch 2"),
        "{log}"
    );
    assert_eq!(metrics(&run).len(), 4);

    // A garbled state.json is damaged too, and with nothing intact left the error says so.
    for folder in std::fs::read_dir(run.join("checkpoints")).unwrap() {
        let folder = folder.unwrap().path();
        if folder.join("state.json").is_file() {
            std::fs::write(folder.join("state.json"), b"{\"epoch\": ").unwrap();
        }
    }
    let failed = train_resume(&config, &longer);
    assert_one_line_error(
        &failed,
        &["every checkpoint", "damaged", "not a training state"],
    );
}

#[cfg(not(feature = "mpi"))]
#[test]
fn a_default_build_started_as_several_processes_says_how_to_build_mpi_in() {
    let out = tempfile::tempdir().unwrap();
    let mut command = Command::new(env!("CARGO_BIN_EXE_train"));
    command
        .arg("--config")
        .arg(repo().join("configs/quickstart.toml"))
        .env("OMPI_COMM_WORLD_SIZE", "2");
    for set in quick_sets(out.path(), &[]) {
        command.arg("--set").arg(set);
    }
    let output = command.output().unwrap();
    assert_one_line_error(&output, &["2 processes", "--features cutmix-train/mpi"]);
    assert!(!out.path().join("quickstart").exists(), "nothing written");
}

#[test]
fn a_run_folder_takes_one_process_and_resume_restarts_a_run_that_had_no_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let config = repo().join("configs/quickstart.toml");
    let sets = quick_sets(out.path(), &["train.epochs=3"]);
    let mut first = Command::new(env!("CARGO_BIN_EXE_train"));
    first.arg("--config").arg(&config);
    for set in &sets {
        first.arg("--set").arg(set);
    }
    let mut running = first.stdout(std::process::Stdio::null()).spawn().unwrap();
    let run = out.path().join("quickstart");
    while !run.join("config.toml").is_file() {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut second = Command::new(env!("CARGO_BIN_EXE_train"));
    second.arg("--config").arg(&config).arg("--resume");
    for set in &sets {
        second.arg("--set").arg(set);
    }
    let refused = second.output().unwrap();
    assert_one_line_error(&refused, &["in use by another train process"]);
    assert!(running.wait().unwrap().success());
    let finished = metrics(&run);
    assert_eq!(finished.len(), 3);
    for key in [
        "step_seconds",
        "loader_wait_seconds",
        "eval_seconds",
        "checkpoint_seconds",
    ] {
        let seconds = finished[2][key].as_f64().unwrap();
        assert!(
            seconds > 0.0 && seconds < finished[2]["epoch_seconds"].as_f64().unwrap(),
            "{key}"
        );
    }

    // A crash after the last checkpoint but before its metrics line: --resume puts it back.
    let log = run.join("metrics.jsonl");
    let text = std::fs::read_to_string(&log).unwrap();
    let first_two: Vec<&str> = text.lines().take(2).collect();
    std::fs::write(&log, first_two.join("\n") + "\n").unwrap();
    let back = second.output().unwrap();
    assert!(back.status.success(), "{}", stderr(&back));
    let restored = metrics(&run);
    assert_eq!(restored.len(), 3);
    assert_eq!(restored[2]["val_top1_err"], finished[2]["val_top1_err"]);
    assert_eq!(restored[2]["train_loss"], finished[2]["train_loss"]);

    // A run killed before its first checkpoint: --resume starts it over in the same folder.
    let early = out.path().join("early");
    std::fs::create_dir_all(early.join("checkpoints")).unwrap();
    let restarted = train(
        &config,
        &quick_sets(out.path(), &["name=early", "train.epochs=1"]),
    );
    // Without --resume the folder is taken: the run goes to early-2.
    assert!(restarted.status.success(), "{}", stderr(&restarted));
    assert!(out.path().join("early-2/metrics.jsonl").is_file());
    let mut resume = Command::new(env!("CARGO_BIN_EXE_train"));
    resume.arg("--config").arg(&config).arg("--resume");
    for set in quick_sets(out.path(), &["name=early", "train.epochs=1"]) {
        resume.arg("--set").arg(set);
    }
    let output = resume.output().unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("starting it from the beginning"),
        "{stdout}"
    );
    assert_eq!(metrics(&early).len(), 1);
}

/// The first shipped batch of 8 images, untransformed, as tensors.
fn fixed_batch(device: &Device, offset: usize) -> (burn::tensor::Tensor<4>, Vec<usize>) {
    let folder = ImageFolder::open(&mini().join("train"), None).unwrap();
    let loader = cutmix_data::Loader::new(
        std::sync::Arc::new(folder),
        Some((0..8).map(|i| offset + i * 250).collect()),
        cutmix_data::Transform::CifarEval { size: 32 },
        cutmix_data::CIFAR_MEAN,
        cutmix_data::CIFAR_STD,
        cutmix_data::LoaderConfig {
            batch_size: 8,
            shuffle: false,
            drop_last: false,
            workers: 0,
            prefetch: 1,
            seed: 1,
            strict: false,
        },
    );
    images_tensor(loader.epoch(0).next().unwrap().unwrap(), device)
}

/// Every float tensor of a model by its PyTorch name.
fn named(model: &cutmix_models::Model) -> std::collections::BTreeMap<String, Vec<f32>> {
    cutmix_models::state_dict(model, 0)
        .into_iter()
        .filter_map(|(name, tensor)| match tensor.data {
            cutmix_models::HostData::F32(values) => Some((name, values)),
            _ => None,
        })
        .collect()
}

/// One SGD step (no momentum) from the same model and batch under `section`.
fn one_step(section: &str) -> std::collections::BTreeMap<String, Vec<f32>> {
    let device = Device::flex().autodiff();
    let model = resnet8(5, &device);
    let (images, labels) = fixed_batch(&device, 0);
    let targets = cutmix_augment::one_hot(&labels, 10, &device);
    let section: TrainSection = toml::from_str(section).unwrap();
    let mut optimizer = sgd(&section);
    let logits = model.forward(images);
    let (model, _) = train_step(model, &mut optimizer, logits, targets, 0.1);
    named(&model.valid())
}

#[test]
fn weight_decay_can_leave_batchnorm_and_biases_alone() {
    let base = "epochs = 1\nbatch_size = 8\nlr = 0.1\nmomentum = 0.0\n";
    let without = one_step(&format!("{base}weight_decay = 0.0"));
    let all = one_step(&format!("{base}weight_decay = 0.5"));
    let filtered = one_step(&format!(
        "{base}weight_decay = 0.5\ndecay_bn_and_bias = false"
    ));
    let initial = named(&resnet8(5, &Device::flex()));
    let mut decayed = 0;
    for (name, start) in &initial {
        if name.contains("running_") {
            continue;
        }
        let is_weight =
            name.ends_with(".weight") && !name.contains("bn") && !name.contains("downsample.1");
        for (i, &w0) in start.iter().enumerate().step_by(97) {
            // SGD: w1 = w0 - lr * (g + wd * w0); the decayed step is 0.1 * 0.5 * w0 lower.
            let decay = 0.05 * w0;
            let (plain, all, filtered) = (without[name][i], all[name][i], filtered[name][i]);
            assert!(
                (plain - decay - all).abs() < 1e-5,
                "{name}[{i}] with decay everywhere"
            );
            let expected = if is_weight { plain - decay } else { plain };
            assert!(
                (expected - filtered).abs() < 1e-5,
                "{name}[{i}]: {filtered} vs {expected}"
            );
            decayed += usize::from(is_weight && w0 != 0.0);
        }
    }
    assert!(decayed > 100);
}

/// All gradients of a model, flattened in visiting order.
fn flat_grads(model: &cutmix_models::Model, grads: &burn::optim::GradientsParams) -> Vec<f32> {
    use burn::module::{ModuleVisitor, Param};
    struct Collect<'a> {
        grads: &'a burn::optim::GradientsParams,
        out: Vec<f32>,
    }
    impl ModuleVisitor for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<burn::tensor::Tensor<D>>) {
            if let Some(grad) = self.grads.get::<D>(param.id) {
                self.out
                    .extend(grad.into_data().try_into_vec_as::<f32>().unwrap());
            }
        }
    }
    let mut collect = Collect {
        grads,
        out: Vec::new(),
    };
    model.visit(&mut collect);
    collect.out
}

#[test]
fn clipping_scales_all_gradients_to_the_global_norm_and_accumulation_averages_batches() {
    use cutmix_train::trainer::{backward, clip_global_norm};
    let device = Device::flex().autodiff();
    let model = resnet8(6, &device);
    let gradients = |offset: usize, scale: f32| {
        let (images, labels) = fixed_batch(&device, offset);
        let targets = cutmix_augment::one_hot(&labels, 10, &device);
        backward(&model, model.forward(images), targets, scale).0
    };
    let mut grads = gradients(0, 1.0);
    let before = flat_grads(&model, &grads);
    let norm = before
        .iter()
        .map(|g| f64::from(*g).powi(2))
        .sum::<f64>()
        .sqrt();
    let reported = clip_global_norm(&model, &mut grads, norm / 4.0).into_scalar::<f32>();
    assert!(
        (f64::from(reported) - norm).abs() < 1e-4 * norm,
        "{reported} vs {norm}"
    );
    let after = flat_grads(&model, &grads);
    for (a, b) in before.iter().zip(&after) {
        assert!(
            (a / 4.0 - b).abs() <= 1e-6 + 1e-4 * a.abs(),
            "{a} / 4 vs {b}"
        );
    }
    // A bound above the norm leaves the gradients as they are.
    let mut untouched = gradients(0, 1.0);
    clip_global_norm(&model, &mut untouched, norm * 2.0);
    assert_eq!(flat_grads(&model, &untouched), before);

    // Two batches accumulated at loss scale 1/2 give the mean of their gradients.
    let (a, b) = (gradients(0, 1.0), gradients(3, 1.0));
    let mut accumulator = burn::optim::GradientsAccumulator::<cutmix_models::Model>::new();
    accumulator.accumulate(&model, gradients(0, 0.5));
    accumulator.accumulate(&model, gradients(3, 0.5));
    let summed = flat_grads(&model, &accumulator.grads());
    for ((x, y), s) in flat_grads(&model, &a)
        .iter()
        .zip(flat_grads(&model, &b))
        .zip(summed)
    {
        assert!(((x + y) / 2.0 - s).abs() <= 1e-6 + 1e-4 * s.abs());
    }
}

#[test]
fn accumulation_and_clipping_train_with_fewer_steps() {
    let out = tempfile::tempdir().unwrap();
    let config = repo().join("configs/quickstart.toml");
    let output = train(
        &config,
        &quick_sets(
            out.path(),
            &[
                "train.accumulate=4",
                "train.clip_grad_norm=1.0",
                "train.decay_bn_and_bias=false",
            ],
        ),
    );
    assert!(output.status.success(), "{}", stderr(&output));
    // 192 images in batches of 32: 6 batches, so 2 steps per epoch (4, then the last 2).
    let state =
        std::fs::read_to_string(out.path().join("quickstart/checkpoints/last/state.json")).unwrap();
    let state: serde_json::Value = serde_json::from_str(&state).unwrap();
    assert_eq!(state["step"], 4);
    let bad = train(&config, &quick_sets(out.path(), &["train.accumulate=0"]));
    assert_one_line_error(&bad, &["train.accumulate"]);
}

#[test]
fn the_moving_average_blends_every_tensor_and_evaluates_as_the_run_reported() {
    use cutmix_train::ema::Ema;
    // The average after one update towards the model one SGD step later (weights and
    // BatchNorm statistics both moved; the average follows by parameter id, as during a run).
    let device = Device::flex().autodiff();
    let model = resnet8(1, &device);
    let mut ema = Ema::new(&model, 0.9);
    let before = named(&model.valid());
    let (images, labels) = fixed_batch(&device, 0);
    let targets = cutmix_augment::one_hot(&labels, 10, &device);
    let section: TrainSection = toml::from_str("epochs = 1\nbatch_size = 8\nlr = 0.1").unwrap();
    let logits = model.forward_train(images, &mut StdRng::seed_from_u64(0));
    let (model, _) = train_step(model, &mut sgd(&section), logits, targets, 0.1);
    ema.update(&model);
    let (after, averaged) = (named(&model.valid()), named(&ema.model));
    assert!(
        after["bn1.running_mean"].iter().any(|&v| v != 0.0),
        "statistics moved"
    );
    assert_ne!(
        after["conv1.weight"], before["conv1.weight"],
        "weights moved"
    );
    for (name, values) in &averaged {
        for (i, v) in values.iter().enumerate() {
            let expected = 0.9 * before[name][i] + 0.1 * after[name][i];
            assert!(
                (v - expected).abs() <= 1e-6 * expected.abs().max(1.0),
                "{name}[{i}]"
            );
        }
    }

    // A run with the average: evaluated each epoch, checkpointed, exported, evaluated again.
    let out = tempfile::tempdir().unwrap();
    let config = repo().join("configs/quickstart.toml");
    let output = train(&config, &quick_sets(out.path(), &["train.ema_decay=0.5"]));
    assert!(output.status.success(), "{}", stderr(&output));
    let run = out.path().join("quickstart");
    let last = metrics(&run).pop().unwrap();
    assert!(last["ema_val_top1_err"].is_number(), "{last}");
    assert!(String::from_utf8_lossy(&output.stdout).contains("moving average of the weights"));
    let exported = out.path().join("ema.safetensors");
    let export = command(
        env!("CARGO_BIN_EXE_export"),
        &[
            "--run".into(),
            run.display().to_string(),
            "--which".into(),
            "last".into(),
            "--ema".into(),
            "--out".into(),
            exported.display().to_string(),
        ],
    );
    assert!(export.status.success(), "{}", stderr(&export));
    let mut args = vec![
        "--config".to_string(),
        run.join("config.toml").display().to_string(),
        "--weights".into(),
        exported.display().to_string(),
    ];
    args.extend(with_sets(&[format!("data.root={}", mini().display())]));
    let evaluated = command(env!("CARGO_BIN_EXE_eval"), &args);
    assert!(evaluated.status.success(), "{}", stderr(&evaluated));
    let line: serde_json::Value = serde_json::from_slice(&evaluated.stdout).unwrap();
    assert_eq!(line["top1_err"], last["ema_val_top1_err"]);
    assert_eq!(line["loss"], last["ema_val_loss"]);

    // A run without it says so when asked for it.
    let plain = tempfile::tempdir().unwrap();
    assert!(
        train(&config, &quick_sets(plain.path(), &["train.epochs=1"]))
            .status
            .success()
    );
    let refused = command(
        env!("CARGO_BIN_EXE_export"),
        &[
            "--run".into(),
            plain.path().join("quickstart").display().to_string(),
            "--ema".into(),
        ],
    );
    assert_one_line_error(&refused, &["train.ema_decay"]);
}

#[test]
fn a_diverging_run_stops_and_names_its_last_good_checkpoint() {
    let out = tempfile::tempdir().unwrap();
    let config = repo().join("configs/quickstart.toml");
    let first = train(&config, &quick_sets(out.path(), &["train.epochs=1"]));
    assert!(first.status.success(), "{}", stderr(&first));
    let mut resume = Command::new(env!("CARGO_BIN_EXE_train"));
    resume.arg("--config").arg(&config).arg("--resume");
    for set in quick_sets(out.path(), &["train.epochs=2", "train.lr=1e30"]) {
        resume.arg("--set").arg(set);
    }
    let diverged = resume.output().unwrap();
    let said = String::from_utf8_lossy(&diverged.stdout);
    assert!(
        said.contains(
            "differs from the run's config.toml: train.epochs 1 -> 2, train.lr 0.1 -> 1000000000000000000000000000000.0"
        ),
        "{said}"
    );
    let checkpoints = out.path().join("quickstart/checkpoints");
    assert_one_line_error(
        &diverged,
        &[
            "at epoch 2",
            "lower train.lr (now 1e30)",
            &checkpoints.display().to_string(),
            "(epoch 1), with --resume",
        ],
    );
    let fresh = train(
        &config,
        &quick_sets(out.path(), &["name=fresh", "train.lr=1e30"]),
    );
    assert_one_line_error(&fresh, &["at epoch 1", "no checkpoint yet"]);
}

/// A tensor of a fixture file as f32 values.
fn fixture_floats(tensors: &cutmix_models::StateDict, name: &str) -> Vec<f32> {
    match &tensors[name].data {
        cutmix_models::HostData::F32(values) => values.clone(),
        cutmix_models::HostData::I64(values) => values.iter().map(|&v| v as f32).collect(),
    }
}

/// `max |ours - theirs| / max |theirs|` (0 when both are all zeros).
fn relative_error(ours: &[f32], theirs: &[f32]) -> f32 {
    assert_eq!(ours.len(), theirs.len());
    let scale = theirs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let worst = ours
        .iter()
        .zip(theirs)
        .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
    if scale == 0.0 { worst } else { worst / scale }
}

/// What two replayed steps leave: the weights and BatchNorm statistics, the momentum buffers
/// (by PyTorch name), the losses and the mixed batches.
struct Replayed {
    weights: std::collections::BTreeMap<String, Vec<f32>>,
    buffers: std::collections::BTreeMap<String, Vec<f32>>,
    losses: Vec<f32>,
    mixed: Vec<Vec<f32>>,
}

/// Replays the two SGD steps of a PyTorch fixture on `device`.
fn replay_pytorch_steps(
    config: &ModelConfig,
    fixture: &cutmix_models::StateDict,
    device: &Device,
) -> Replayed {
    use burn::tensor::{Tensor, TensorData};
    use cutmix_augment::{CutBox, Draw};

    let device = device.clone().autodiff();
    let fresh = config.init(&mut StdRng::seed_from_u64(0), &device).unwrap();
    let initial: cutmix_models::StateDict = fixture
        .iter()
        .filter_map(|(name, t)| Some((name.strip_prefix("init.")?.to_string(), t.clone())))
        .collect();
    let (mut model, summary) = cutmix_models::load_state_dict(fresh, &initial, "fc.").unwrap();
    assert!(summary.reinitialised.is_empty(), "{summary}");
    let hparams = fixture_floats(fixture, "hparams");
    let (lr, momentum, weight_decay) = (hparams[0], hparams[1], hparams[2]);
    let section: TrainSection = toml::from_str(&format!(
        "epochs = 1\nbatch_size = 8\nlr = {lr}\nmomentum = {momentum}\nnesterov = true\nweight_decay = {weight_decay}"
    ))
    .unwrap();
    let mut optimizer = sgd(&section);
    let labels: Vec<usize> = fixture_floats(fixture, "labels")
        .iter()
        .map(|&l| l as usize)
        .collect();
    let input = fixture_floats(fixture, "input");
    let (mut losses, mut mixed_batches) = (Vec::new(), Vec::new());
    for step in 0..2 {
        let images =
            Tensor::<4>::from_data(TensorData::new(input.clone(), [8, 3, 32, 32]), &device);
        let perm = fixture_floats(fixture, &format!("step{step}.perm"));
        let b = fixture_floats(fixture, &format!("step{step}.box"));
        let cut = CutBox {
            y1: b[0] as usize,
            y2: b[1] as usize,
            x1: b[2] as usize,
            x2: b[3] as usize,
        };
        let lambda = cut.kept_share(32, 32);
        assert_eq!(
            lambda,
            fixture_floats(fixture, &format!("step{step}.lam"))[0]
        );
        let draw = Draw {
            partners: perm.iter().map(|&p| p as usize).collect(),
            boxes: vec![cut; 8],
            blends: vec![1.0; 8],
            lambdas: vec![lambda; 8],
            zero_fill: false,
        };
        let mixed = draw.apply(images, &labels, 10);
        mixed_batches.push(
            mixed
                .images
                .clone()
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap(),
        );
        let logits = model.forward_train(mixed.images, &mut StdRng::seed_from_u64(0));
        let (next, out) = train_step(model, &mut optimizer, logits, mixed.targets, f64::from(lr));
        model = next;
        losses.push(out.loss);
    }
    let weights = named(&model.valid());
    // The momentum buffers, named through the parameter ids the optimiser keys them by.
    let saved = tempfile::tempdir().unwrap();
    let file = saved.path().join("optimizer.bpk");
    optimizer.save(&file).unwrap();
    let (_, state) = cutmix_models::read_weights(&file).unwrap();
    let mut buffers = std::collections::BTreeMap::new();
    for (id, name, transposed) in cutmix_models::param_names(&model) {
        if name.contains("running_") {
            continue; // BatchNorm's statistics are buffers, not parameters: no momentum.
        }
        let prefix = format!("{}.", id.val());
        let (key, tensor) = state
            .iter()
            .find(|(key, _)| key.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no optimiser state for {name}"));
        let cutmix_models::HostData::F32(values) = &tensor.data else {
            panic!("{key} holds floats");
        };
        let values = if transposed {
            let (rows, cols) = (tensor.shape[0], tensor.shape[1]);
            (0..rows * cols)
                .map(|i| values[(i % rows) * cols + i / rows])
                .collect()
        } else {
            values.clone()
        };
        buffers.insert(name, values);
    }
    Replayed {
        weights,
        buffers,
        losses,
        mixed: mixed_batches,
    }
}

/// Two training steps equal PyTorch's: a fixture written by PyTorch
/// (`scripts/write_train_step_fixture.py`) holds a small CIFAR ResNet's and a small PyramidNet's
/// initial weights and statistics, a batch of real images, two CutMix draws (box, partner order,
/// lambda) and everything after two SGD steps with Nesterov momentum and weight decay, computed
/// in float64 (the exact answer). Replayed on flex and on wgpu, the mixed batches equal
/// PyTorch's, and every weight, BatchNorm running statistic and momentum buffer is within 1e-4
/// relative (`max |ours - exact| / max |exact|`) of the exact answer, or within 3 times
/// PyTorch's own f32 error on that tensor where that is larger (BatchNorm bias gradients are
/// sums that nearly cancel: PyTorch's f32 misses the exact ones by up to 9e-5).
#[test]
fn two_sgd_steps_equal_pytorchs() {
    let fixtures = fixtures();
    let models = [
        (
            "train_step_cifar_resnet8.safetensors",
            Arch::CifarResNet,
            8,
            0.0,
        ),
        (
            "train_step_pyramidnet11_a24.safetensors",
            Arch::PyramidNet,
            11,
            24.0,
        ),
    ];
    for (file, arch, depth, alpha) in models {
        let config = ModelConfig {
            arch,
            depth,
            alpha,
            bottleneck: arch == Arch::PyramidNet,
            shakedrop: 0.0,
            num_classes: 10,
            last_stride: 2,
        };
        let (_, fixture) = cutmix_models::read_weights(&fixtures.join(file)).unwrap();
        // The relative error allowed: 3x PyTorch's own f32 error, and at least `floor`. On
        // wgpu (lavapipe) the floor is 3e-4: its reductions' order follows the CPU (on an AMD
        // Zen 5 with AVX-512, the BatchNorm bias momentum of PyramidNet's first block came to
        // 1.6e-4, PyTorch's f32 error 4.3e-5; 4.4e-5 and below on flex).
        for (device, floor) in [
            (Device::flex(), 1e-4f32),
            (Device::wgpu(DeviceKind::Cpu), 3e-4),
        ] {
            let replayed = replay_pytorch_steps(&config, &fixture, &device);
            let at = format!("{file} on {device:?}");
            for step in 0..2 {
                let theirs = fixture_floats(&fixture, &format!("step{step}.input"));
                let error = relative_error(&replayed.mixed[step], &theirs);
                assert!(
                    error < 1e-7,
                    "{at}: the mixed batch of step {step}: {error}"
                );
                let loss = replayed.losses[step];
                let theirs = fixture_floats(&fixture, &format!("step{step}.loss"))[0];
                assert!(
                    (loss - theirs).abs() <= 1e-5 * theirs.abs(),
                    "{at}: loss {loss} vs {theirs}"
                );
            }
            let mut compared = 0;
            let tensors = [
                ("final", &replayed.weights),
                ("momentum", &replayed.buffers),
            ];
            for (kind, values) in tensors {
                for (name, ours) in values {
                    let key = format!("{kind}.{name}");
                    let exact = fixture_floats(&fixture, &key);
                    let torch_f32 = fixture_floats(&fixture, &format!("torch_f32_error.{key}"))[0];
                    let bound = floor.max(3.0 * torch_f32);
                    let error = relative_error(ours, &exact);
                    assert!(
                        error <= bound,
                        "{at}: {key} relative error {error} (bound {bound}; PyTorch f32's {torch_f32})"
                    );
                    compared += 1;
                }
            }
            let expected = fixture
                .keys()
                .filter(|k| {
                    (k.starts_with("final.") && !k.ends_with("num_batches_tracked"))
                        || k.starts_with("momentum.")
                })
                .count();
            assert_eq!(compared, expected, "{at}: every tensor compared");
        }
    }
}

/// Training and validation keep their numbers on the device and read them back every
/// `train.log_every` batches (and at the end of an epoch), never per batch: the reads of a run
/// are counted, and a run's metrics do not depend on how often it reads.
#[test]
fn an_epoch_reads_its_numbers_back_at_the_progress_interval_only() {
    use cutmix_train::config::Config;
    use cutmix_train::trainer::{RunOptions, host_reads};
    let config_path = repo().join("configs/quickstart.toml");
    let run = |log_every: usize| {
        let out = tempfile::tempdir().unwrap();
        let mut sets = quick_sets(out.path(), &["augment.prob=1.0"]);
        sets.push(format!("train.log_every={log_every}"));
        let config = Config::load(&config_path, &sets).unwrap();
        let before = host_reads();
        let summary = cutmix_train::trainer::train(&config, &RunOptions::default()).unwrap();
        (host_reads() - before, summary.metrics, out)
    };
    // 192 training images in batches of 32: 6 batches; 64 validation images: 2 batches.
    let (every_two, metrics, _a) = run(2);
    assert_eq!(
        every_two,
        2 * (3 + 1),
        "per epoch: 3 training reads, 1 validation read"
    );
    let (every_four, again, _b) = run(4);
    assert_eq!(
        every_four,
        2 * (2 + 1),
        "per epoch: reads at batch 4 and at the end, 1 validation read"
    );
    for (x, y) in metrics.iter().zip(&again) {
        assert_eq!(x.train_loss, y.train_loss);
        assert_eq!(x.train_top1_err, y.train_top1_err);
        assert_eq!(x.val_loss, y.val_loss);
        assert_eq!(x.val_top1_err, y.val_top1_err);
    }
}

/// A run on wgpu times its first steps (kernel compilation and autotuning) and says so, and
/// CubeCL's caches go to the user's cache folder (`$XDG_CACHE_HOME/cubecl`, else
/// `~/.cache/cubecl`), not to the working directory's Cargo `target/`. The run gets a cache
/// folder of its own: CubeCL's autotune database, opened at once by this process (the
/// in-process wgpu tests) and by the child, panicked in its shared write-ahead log once
/// ("reader slot released by non-owner", turso_core 0.8.3), on the second `cargo test` of a
/// machine, with the cache already there.
#[test]
fn a_wgpu_run_reports_its_warm_up_and_keeps_the_kernel_cache_per_user() {
    let out = tempfile::tempdir().unwrap();
    let sets = quick_sets(
        out.path(),
        &[
            "backend=wgpu",
            "train.epochs=1",
            "data.train_limit=64",
            "data.val_limit=32",
        ],
    );
    let user_cache = out.path().join("user-cache");
    let output = Command::new(env!("CARGO_BIN_EXE_train"))
        .arg("--config")
        .arg(repo().join("configs/quickstart.toml"))
        .args(with_sets(&sets))
        .env("XDG_CACHE_HOME", &user_cache)
        .output()
        .expect("train runs");
    assert!(output.status.success(), "{}", stderr(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("GPU warm-up: the first 2 steps took"),
        "{stdout}"
    );
    let folder = user_cache.join("cubecl");
    assert!(
        stdout.contains(&format!("cached in {}", folder.display())),
        "{stdout}"
    );
    let entries = std::fs::read_dir(&folder).map(|d| d.count()).unwrap_or(0);
    assert!(entries > 0, "nothing cached in {}", folder.display());
}

/// Composite localization images from the shipped real photos: each a 64x64 canvas of another
/// photo (upscaled 2x, dimmed), with a photo of the class pasted at a random place and size
/// (20-32 pixels); written as an image folder under `root/<split>/<class>/`, the boxes as
/// `<class>/<file> x0 y0 x1 y1` lines. Returns the boxes file.
fn pasted_localization_set(root: &Path, split: &str, per_class: usize, seed: u64) -> PathBuf {
    use image::imageops::{FilterType, resize};
    use rand::RngExt;
    let source = mini().join(split);
    let mut classes: Vec<_> = std::fs::read_dir(&source).unwrap().flatten().collect();
    classes.sort_by_key(|e| e.file_name());
    let photos: Vec<Vec<PathBuf>> = classes
        .iter()
        .map(|class| {
            let mut files: Vec<_> = std::fs::read_dir(class.path())
                .unwrap()
                .flatten()
                .map(|e| e.path())
                .collect();
            files.sort();
            files
        })
        .collect();
    let mut rng = StdRng::seed_from_u64(seed);
    let mut lines = Vec::new();
    for (c, class) in classes.iter().enumerate() {
        let dir = root.join(split).join(class.file_name());
        std::fs::create_dir_all(&dir).unwrap();
        for (i, object) in photos[c].iter().take(per_class).enumerate() {
            let other = &photos[(c + 1 + i % (classes.len() - 1)) % classes.len()];
            let background = image::open(&other[(i * 7) % other.len()])
                .unwrap()
                .to_rgb8();
            let mut canvas = resize(&background, 64, 64, FilterType::Triangle);
            canvas
                .pixels_mut()
                .for_each(|p| p.0 = p.0.map(|v| (v as f32 * 0.35 + 40.0) as u8));
            let side = rng.random_range(20..=32u32);
            let pasted = resize(
                &image::open(object).unwrap().to_rgb8(),
                side,
                side,
                FilterType::Triangle,
            );
            let (x, y) = (
                rng.random_range(0..=64 - side),
                rng.random_range(0..=64 - side),
            );
            image::imageops::overlay(&mut canvas, &pasted, x as i64, y as i64);
            let name = format!("{i:04}.png");
            canvas.save(dir.join(&name)).unwrap();
            let class = class.file_name().to_string_lossy().into_owned();
            lines.push(format!(
                "{class}/{name} {x} {y} {} {}",
                x + side - 1,
                y + side - 1
            ));
        }
    }
    let boxes = root.join(format!("{split}_boxes.txt"));
    std::fs::write(&boxes, lines.join("\n")).unwrap();
    boxes
}

/// Real photos pasted at random places onto other photos: a small network trained on them for
/// a few epochs finds the objects with its class activation maps far more often than a fixed
/// box of the mean size at the centre does (MaxBoxAcc, the threshold chosen by the sweep; at
/// the paper's fixed 0.15 too, by less: such a weak network's maps are wide).
#[test]
fn cams_of_a_trained_network_find_pasted_real_objects() {
    let out = tempfile::tempdir().unwrap();
    let data = out.path().join("pasted");
    pasted_localization_set(&data, "train", 120, 1);
    let val_boxes = pasted_localization_set(&data, "val", 30, 2);
    let config = repo().join("configs/quickstart.toml");
    let sets: Vec<String> = [
        format!("output_dir={}", out.path().display()),
        format!("data.root={}", data.display()),
        "backend=flex".into(),
        "model.depth=8".into(),
        "data.image_size=64".into(),
        "train.epochs=6".into(),
        "train.batch_size=32".into(),
        "augment.method=none".into(),
    ]
    .into();
    let output = train(&config, &sets);
    assert!(output.status.success(), "{}", stderr(&output));
    let weights = out.path().join("quickstart/checkpoints/last/model.bpk");
    let mut args = vec![
        "--config".to_string(),
        config.display().to_string(),
        "--weights".into(),
        weights.display().to_string(),
        "--boxes".into(),
        val_boxes.display().to_string(),
    ];
    args.extend(with_sets(&sets));
    let localized = command(env!("CARGO_BIN_EXE_localize"), &args);
    assert!(localized.status.success(), "{}", stderr(&localized));
    let found: serde_json::Value = serde_json::from_slice(&localized.stdout).unwrap();

    // The fixed-box baseline: the mean box, centred, against every image's box.
    let boxes: Vec<[f32; 4]> = std::fs::read_to_string(&val_boxes)
        .unwrap()
        .lines()
        .map(|l| {
            let v: Vec<f32> = l
                .split_whitespace()
                .skip(1)
                .map(|f| f.parse().unwrap())
                .collect();
            [v[0], v[1], v[2], v[3]]
        })
        .collect();
    let side = boxes.iter().map(|b| b[2] - b[0] + 1.0).sum::<f32>() / boxes.len() as f32;
    let start = (64.0 - side) / 2.0;
    let centre =
        cutmix_analysis::boxes::PixelBox::new(start, start, start + side - 1.0, start + side - 1.0);
    let hits = boxes
        .iter()
        .filter(|b| {
            centre.iou(&cutmix_analysis::boxes::PixelBox::new(
                b[0], b[1], b[2], b[3],
            )) >= 0.5
        })
        .count();
    let baseline = 100.0 * hits as f64 / boxes.len() as f64;
    let at_best = found["max_box_acc"].as_f64().unwrap();
    let at_paper = found["gt_known_loc"].as_f64().unwrap();
    eprintln!("pasted objects: {found}; centre-box baseline {baseline:.1}%");
    // Measured here (AMD EPYC): MaxBoxAcc 49.7% at threshold 0.39, GT-known 28.0% at the
    // paper's 0.15, the centre box 11.3%; top-1 classification 22% after 6 short epochs.
    assert!(
        at_best >= 2.5 * baseline && at_best >= baseline + 25.0,
        "CAM boxes at the best threshold {at_best}% vs the centre box {baseline}%: {found}"
    );
    assert!(
        at_paper > baseline,
        "CAM boxes at 0.15: {at_paper}% vs {baseline}%: {found}"
    );
}

/// `train.classifier_lr`: one SGD step (momentum, Nesterov, weight decay) moves the classifier
/// exactly as a step at that learning rate moves it, and everything else as a step at `lr`.
#[test]
fn the_classifier_takes_its_own_learning_rate() {
    use burn::tensor::{Distribution, Tensor};
    use cutmix_train::trainer::{Update, apply_step, loss_and_grads};

    let device = Device::flex().autodiff();
    let images = Tensor::<4>::random([6, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
    let targets = Tensor::<2>::from_data(
        burn::tensor::TensorData::new(
            (0..60)
                .map(|i| if i % 10 == (i / 10) % 10 { 1.0f32 } else { 0.0 })
                .collect(),
            [6, 10],
        ),
        &device,
    );
    let step = |text: &str| {
        let section: TrainSection = toml::from_str(text).unwrap();
        let model = resnet8(7, &device);
        let (grads, _) =
            loss_and_grads(&model, model.forward(images.clone()), targets.clone(), 1.0);
        let update = Update {
            lr: section.lr,
            clip: 0.0,
            classifier_scale: section.classifier_scale(),
        };
        apply_step(model, &mut sgd(&section), grads, update)
    };
    let common = "epochs = 1\nbatch_size = 6\nweight_decay = 5e-4\nnesterov = true\n";
    let split = step(&format!("{common}lr = 0.1\nclassifier_lr = 1.0"));
    let fast = step(&format!("{common}lr = 1.0"));
    let slow = step(&format!("{common}lr = 0.1"));
    let fc = |m: &cutmix_models::Model| {
        let fc = m.classifier();
        let mut v = fc
            .weight
            .val()
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        v.extend(
            fc.bias
                .as_ref()
                .unwrap()
                .val()
                .into_data()
                .try_into_vec_as::<f32>()
                .unwrap(),
        );
        v
    };
    let close = |a: &[f32], b: &[f32]| {
        a.iter()
            .zip(b)
            .all(|(x, y)| (x - y).abs() <= 1e-6 * (1.0 + y.abs()))
    };
    assert!(
        close(&fc(&split), &fc(&fast)),
        "the classifier moved as at lr 1.0"
    );
    assert!(!close(&fc(&split), &fc(&slow)), "and not as at lr 0.1");
    // The first convolution (432 values, first in the visit order) moved as at lr 0.1.
    let (body, body_slow, body_fast) = (floats(&split), floats(&slow), floats(&fast));
    assert!(close(&body[..432], &body_slow[..432]));
    assert!(!close(&body[..432], &body_fast[..432]));
}
