#!/usr/bin/env python3
"""Writes the PyTorch side of the training-step test (crates/train/tests/fixtures/train_step_*).

For a small CIFAR ResNet (ResNet-8) and a small PyramidNet (depth 11, alpha 24, bottleneck,
ShakeDrop off), in training mode: the initial weights and BatchNorm statistics (every one
randomised, so a misplaced tensor shows), one batch of 8 real images from assets/cifar10-mini
(CIFAR normalisation), and two SGD steps (lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4,
dampening 0) each on that batch mixed by CutMix as the reference's train.py mixes it: lambda
~ Beta(1, 1), a random permutation of the batch as partners, the box from `rand_bbox` (height and
width named correctly), `x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]`, lambda corrected to
the kept area, loss `lam * CE(out, y) + (1 - lam) * CE(out, y[perm])`.

A ReLU's gradient jumps at 0, so a pre-activation within rounding of 0 can take the other side in
another implementation (one element's gradient, a few percent of a BatchNorm bias gradient):
draws are repeated until every pre-activation of both steps is at least 2e-6 away from 0.

The steps are computed in float64 from the f32 starting values (the exact answer, stored as
f32), and once more in f32: PyTorch's own f32 error against the exact answer is stored per tensor.

Each file holds `init.<name>` (the state dict before), `input`, `labels`, per step `step<k>.perm`,
`step<k>.box` (y1, y2, x1, x2), `step<k>.lam`, `step<k>.input` (the mixed batch) and
`step<k>.loss`, then `final.<name>` (the state dict after both steps: weights and running
statistics), `momentum.<name>` (SGD's momentum buffer of every parameter),
`torch_f32_error.final.<name>` / `torch_f32_error.momentum.<name>` (PyTorch f32's
`max |f32 - exact| / max |exact|`), and `hparams` (lr, momentum, weight decay). The Rust test
(`crates/train/tests/runs.rs`, `two_sgd_steps_equal_pytorchs`) replays both steps on flex and
on wgpu and compares every tensor.

    .venv/bin/python scripts/write_train_step_fixture.py
"""
import copy
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_torch_interop import REPO, CifarResNet, PyramidNet, rand_bbox, randomise  # noqa: E402

LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 5e-4
MEAN = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1) / 255
STD = torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1) / 255
MODELS = {
    "cifar_resnet8": lambda: CifarResNet(8, 10),
    "pyramidnet11_a24": lambda: PyramidNet(11, 24, 10, True),
}


def real_batch():
    """Image 0000.jpg of the first 8 classes of the shipped subset, normalised."""
    train = os.path.join(REPO, "assets", "cifar10-mini", "train")
    classes = sorted(os.listdir(train))[:8]
    pixels = [np.asarray(Image.open(os.path.join(train, c, "0000.jpg")).convert("RGB")) for c in classes]
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    return ((x - MEAN) / STD).contiguous(), torch.arange(len(classes), dtype=torch.int64)


class ReluMargin:
    """The smallest |input| of every ReLU while active (F.relu and nn.ReLU both call F.relu)."""

    def __init__(self):
        self.smallest = float("inf")
        self.original = F.relu

    def __enter__(self):
        def relu(x, inplace=False):
            self.smallest = min(self.smallest, x.detach().abs().min().item())
            return self.original(x, inplace=inplace)

        torch.nn.functional.relu = relu
        return self

    def __exit__(self, *exc):
        torch.nn.functional.relu = self.original


def draw_cutmix(batch, height, width, rng, generator):
    """One CutMix draw as train.py makes it: partners, box, lambda corrected to the kept area."""
    while True:
        lam = rng.beta(1.0, 1.0)
        perm = torch.randperm(batch, generator=generator)
        box = rand_bbox(height, width, lam, rng)
        area = (box[1] - box[0]) * (box[3] - box[2])
        if 0 < area < height * width and not torch.equal(perm, torch.arange(batch)):
            return perm, box, 1.0 - area / (height * width)


def two_steps(model, images, labels, draws):
    """Two SGD steps on `images` mixed by `draws`: what they leave, and the ReLU margin."""
    tensors = {}
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    with ReluMargin() as margin:
        for step, (perm, (y1, y2, x1, x2), lam) in enumerate(draws):
            x = images.clone()
            x[:, :, y1:y2, x1:x2] = images[perm, :, y1:y2, x1:x2]
            out = model(x)
            loss = F.cross_entropy(out, labels) * lam + F.cross_entropy(out, labels[perm]) * (1.0 - lam)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            tensors[f"step{step}.perm"] = perm
            tensors[f"step{step}.box"] = torch.tensor([y1, y2, x1, x2], dtype=torch.int64)
            tensors[f"step{step}.lam"] = torch.tensor([lam], dtype=torch.float32)
            tensors[f"step{step}.input"] = x
            tensors[f"step{step}.loss"] = loss.detach().reshape(1)
    tensors.update({f"final.{k}": v.clone() for k, v in model.state_dict().items()})
    for param_name, param in model.named_parameters():
        tensors[f"momentum.{param_name}"] = optimizer.state[param]["momentum_buffer"].clone()
    return tensors, margin.smallest


def relative_error(ours, exact):
    return ((ours.double() - exact).abs().max() / exact.abs().max().clamp_min(1e-30)).item()


def write(name, make, folder):
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    model = make()
    randomise(model, generator)
    model.train()
    tensors = {f"init.{k}": v.clone() for k, v in model.state_dict().items()}
    images, labels = real_batch()
    tensors["input"], tensors["labels"] = images, labels
    tensors["hparams"] = torch.tensor([LR, MOMENTUM, WEIGHT_DECAY], dtype=torch.float32)
    rng = np.random.RandomState(3)
    # The steps run in float64 from the same (f32) starting values: the stored results are the
    # exact answer to f32 precision, not one more f32 rounding of it. The same steps in f32
    # give PyTorch's own error against it, stored per tensor (`torch_f32_error.<name>`): on
    # BatchNorm bias gradients, sums that nearly cancel, it reaches 1e-4.
    for attempt in range(1, 201):
        draws = [draw_cutmix(len(labels), *images.shape[2:], rng, generator) for _ in range(2)]
        exact, margin = two_steps(copy.deepcopy(model).double(), images.double(), labels, draws)
        if margin >= 2e-6:
            break
    else:
        raise SystemExit(f"{name}: no draws kept every ReLU input 2e-6 from 0 in 200 attempts")
    in_f32, _ = two_steps(copy.deepcopy(model), images, labels, draws)
    tensors.update({k: v.float() if v.is_floating_point() else v for k, v in exact.items()})
    worst = 0.0
    for key, value in exact.items():
        if key.startswith(("final.", "momentum.")) and value.is_floating_point():
            error = relative_error(in_f32[key], value)
            tensors[f"torch_f32_error.{key}"] = torch.tensor([error], dtype=torch.float32)
            worst = max(worst, error)
    for step in range(2):
        y1, y2, x1, x2 = exact[f"step{step}.box"].tolist()
        print(f"{name} step {step}: box y {y1}..{y2} x {x1}..{x2}, lambda {exact[f'step{step}.lam'].item():.4f}, "
              f"loss {exact[f'step{step}.loss'].item():.6f}")
    print(f"{name}: draw {attempt}, smallest |ReLU input| {margin:.2e}, PyTorch f32 against f64: worst {worst:.1e}")
    path = os.path.join(folder, f"train_step_{name}.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"torch": torch.__version__})
    print(f"wrote {path}")


def main():
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    folder = os.path.join(REPO, "crates", "train", "tests", "fixtures")
    for name, make in MODELS.items():
        write(name, make, folder)


if __name__ == "__main__":
    main()
