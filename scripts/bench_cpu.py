#!/usr/bin/env python3
"""The PyTorch side of the CPU training-step benchmark (scripts/bench_cpu.sh runs both).

    python scripts/bench_cpu.py --model NAME [--batch B] [--steps N] [--warmup W] [--threads T]
    python scripts/bench_cpu.py --ops [--threads T]
    python scripts/bench_cpu.py --model NAME --eval [--batch B] [--steps N] [--warmup W]

The same networks as `bench_cpu` (parameter counts printed to check), fp32, `T` threads
(default 2), random images and labels; a step is zero_grad, forward, cross-entropy, backward,
SGD (momentum 0.9, Nesterov, weight decay 5e-4) and `loss.item()`. Prints one JSON line:
{"model", "batch", "steps_ms", "median_ms", "peak_rss_mib", "params"}.

--eval times evaluation instead: model.eval(), forward under torch.no_grad(), the logits read
back (.numpy()); the line has "mode": "eval".

--ops times the ops `bench_cpu --ops` times, on the same shapes (CONV_SHAPES and BN_SHAPES are
copies of the Rust side's): conv forward, conv input gradient (torch.nn.grad.conv2d_input),
conv weight gradient (torch.nn.grad.conv2d_weight), BatchNorm training forward + backward (with
and without a ReLU after it), BatchNorm + ReLU in evaluation.
"""
import argparse
import json
import os
import resource
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_torch_interop import CifarResNet, PyramidNet  # noqa: E402


def resnet18_cifar_stem(num_classes):
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


MODELS = {
    "cifar_resnet20": (lambda: CifarResNet(20, 10), 32, 64),
    "resnet18_cifar_stem": (lambda: resnet18_cifar_stem(10), 32, 64),
    "pyramidnet110_a48_bottleneck": (lambda: PyramidNet(110, 48, 100, True), 32, 64),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=1000), 224, 8),
}


# batch, in channels, side, out channels, kernel, stride (as crates/train/src/bin/bench_cpu.rs).
CONV_SHAPES = [(64, 16, 32, 16, 3, 1), (64, 32, 16, 32, 3, 1), (64, 64, 8, 64, 3, 1), (64, 64, 32, 64, 3, 1), (64, 128, 16, 128, 3, 1),
               (64, 64, 32, 128, 3, 2), (64, 256, 8, 256, 3, 1), (64, 128, 16, 256, 3, 2), (64, 64, 32, 128, 1, 2),
               (64, 512, 4, 512, 3, 1),
               (8, 3, 224, 64, 7, 2), (8, 64, 56, 64, 3, 1), (8, 128, 28, 128, 3, 1), (8, 256, 28, 256, 3, 2), (8, 256, 14, 256, 3, 1),
               (8, 256, 56, 64, 1, 1), (8, 1024, 14, 256, 1, 1), (8, 256, 14, 1024, 1, 1), (8, 512, 7, 2048, 1, 1)]
BN_SHAPES = [(64, 16, 32), (64, 64, 32), (8, 256, 56)]


def time_ms(work):
    """Median and minimum ms of `work` over 7 runs after 5 warm-ups (as bench_cpu --ops)."""
    for _ in range(5):
        work()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        work()
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return times[3], times[0]


def report(op, shape, timing):
    median, least = timing
    print(json.dumps({"op": op, "shape": shape, "median_ms": round(median, 2), "min_ms": round(least, 2)}), flush=True)


def ops():
    for n, c, side, k, kernel, stride in CONV_SHAPES:
        pad = kernel // 2
        out = (side + 2 * pad - kernel) // stride + 1
        x = torch.empty(n, c, side, side).uniform_(-1, 1)
        w = torch.empty(k, c, kernel, kernel).uniform_(-1, 1)
        g = torch.empty(n, k, out, out).uniform_(-1, 1)
        shape = f"{n}x{c}x{side}x{side} k{k} {kernel}x{kernel}/{stride}"
        report("conv forward", shape, time_ms(lambda: F.conv2d(x, w, None, stride, pad)))
        report("conv input grad", shape, time_ms(lambda: torch.nn.grad.conv2d_input(x.shape, w, g, stride, pad)))
        report("conv weight grad", shape, time_ms(lambda: torch.nn.grad.conv2d_weight(x, w.shape, g, stride, pad)))
    for n, c, side in BN_SHAPES:
        bn = nn.BatchNorm2d(c).train()
        x = torch.empty(n, c, side, side).uniform_(-1, 1).requires_grad_()
        g = torch.empty(n, c, side, side).uniform_(-1, 1)

        def step(relu):
            x.grad = None
            y = bn(x)
            ((F.relu(y) if relu else y) * g).sum().backward()
        shape = f"{n}x{c}x{side}x{side}"
        report("batchnorm train fwd+bwd", shape, time_ms(lambda: step(False)))
        report("batchnorm+relu train fwd+bwd", shape, time_ms(lambda: step(True)))
        frozen = nn.BatchNorm2d(c).eval()
        frozen.running_mean.uniform_(-1, 1)
        frozen.running_var.uniform_(0.5, 1.5)
        x_eval = x.detach()
        with torch.no_grad():
            report("batchnorm+relu eval", shape, time_ms(lambda: F.relu(frozen(x_eval))))


def evaluate(args, build, side, batch):
    model = build().eval()
    images = torch.empty(batch, 3, side, side).uniform_(-2, 2)
    times = []
    with torch.no_grad():
        for step in range(args.warmup + args.steps):
            start = time.perf_counter()
            model(images).numpy()
            if step >= args.warmup:
                times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({
        "model": args.model,
        "mode": "eval",
        "batch": batch,
        "steps_ms": [round(t, 1) for t in times],
        "median_ms": round(statistics.median(times), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", choices=sorted(MODELS))
    parser.add_argument("--ops", action="store_true")
    parser.add_argument("--eval", action="store_true")
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.ops:
        return ops()
    if args.model is None:
        parser.error("--model or --ops is needed")
    build, side, batch = MODELS[args.model]
    batch = args.batch or batch
    if args.eval:
        return evaluate(args, build, side, batch)
    model = build().train()
    classes = model.fc.out_features
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    images = torch.empty(batch, 3, side, side).uniform_(-2, 2)
    labels = torch.randint(0, classes, (batch,))
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(images), labels)
        loss.backward()
        optimizer.step()
        loss.item()
        if step >= args.warmup:
            times.append((time.perf_counter() - start) * 1e3)
    print(json.dumps({
        "model": args.model,
        "batch": batch,
        "steps_ms": [round(t, 1) for t in times],
        "median_ms": round(statistics.median(times), 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "params": sum(p.numel() for p in model.parameters()),
    }))


if __name__ == "__main__":
    main()
