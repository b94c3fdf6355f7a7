#!/usr/bin/env python3
"""The PyTorch side of the GPU training-step benchmark (scripts/bench_gpu.sh runs both).

    python scripts/bench_gpu.py --model NAME [--batch B] [--side S] [--warmup W] [--steps N]
                                [--repeats R] [--mode fp32|tf32|amp_bf16] [--device cuda|cpu]

The same networks as `bench_gpu` (parameter counts printed to check) and the same step: a fixed
batch of random images copied from (pinned) host memory every step, CutMix as the reference's
train.py does it (lambda ~ Beta(1, 1), a random permutation, one box per batch, lambda corrected
to the kept area), forward, `lam * CE(y) + (1 - lam) * CE(y[perm])`, backward, SGD (momentum 0.9,
Nesterov, weight decay 5e-4). Modes: `fp32` (TF32 off: the comparison the ratio is made with),
`tf32` (TF32 matmuls and convolutions, PyTorch's cuDNN default), `amp_bf16` (autocast to bf16
with channels_last: what a tuned PyTorch run uses). The first W steps are synchronised and
timed one by one; then R repeats of N steps, each synchronised once. Prints one JSON line:
{"model", "batch", "side", "mode", "warmup_s", "step_ms", "median_ms", "peak_gpu_mib", "params"}.
"""
import argparse
import json
import os
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_torch_interop import CifarResNet, PyramidNet, rand_bbox  # noqa: E402

# name: (network, side, batch), as `bench_gpu --list`.
MODELS = {
    "cifar_resnet20": (lambda: CifarResNet(20, 10), 32, 128, 10),
    "pyramidnet200_a240": (lambda: PyramidNet(200, 240, 100, True), 32, 64, 100),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=1000), 224, 64, 1000),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, choices=sorted(MODELS))
    parser.add_argument("--batch", type=int)
    parser.add_argument("--side", type=int)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--mode", default="fp32", choices=["fp32", "tf32", "amp_bf16"])
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    make, side, batch, classes = MODELS[args.model]
    side, batch = args.side or side, args.batch or batch
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.backends.cuda.matmul.allow_tf32 = args.mode == "tf32"
    torch.backends.cudnn.allow_tf32 = args.mode == "tf32"
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    rng = np.random.RandomState(0)
    model = make().to(device)
    memory_format = torch.channels_last if args.mode == "amp_bf16" else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    images = torch.randn(batch, 3, side, side)
    labels = torch.randint(0, classes, (batch,))
    if cuda:
        images, labels = images.pin_memory(), labels.pin_memory()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.mode == "amp_bf16")

    def step():
        x = images.to(device, non_blocking=True).to(memory_format=memory_format)
        y = labels.to(device, non_blocking=True)
        lam = rng.beta(1.0, 1.0)
        perm = torch.randperm(batch, device=device)
        y1, y2, x1, x2 = rand_bbox(side, side, lam, rng)
        x[:, :, y1:y2, x1:x2] = x[perm, :, y1:y2, x1:x2]
        lam = 1 - (y2 - y1) * (x2 - x1) / (side * side)
        with autocast:
            out = model(x)
            loss = F.cross_entropy(out, y) * lam + F.cross_entropy(out, y[perm]) * (1.0 - lam)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return loss

    def sync():
        if cuda:
            torch.cuda.synchronize()

    model.train()
    warmup_s = []
    for _ in range(args.warmup):
        start = time.perf_counter()
        step()
        sync()
        warmup_s.append(time.perf_counter() - start)
    step_ms = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(args.steps):
            loss = step()
        loss = loss.item()
        step_ms.append((time.perf_counter() - start) * 1e3 / args.steps)
        if not np.isfinite(loss):
            raise SystemExit(f"{args.model}: loss {loss}")
    peak = torch.cuda.max_memory_reserved() / 2**20 if cuda else None
    print(json.dumps({
        "model": args.model, "batch": batch, "side": side, "mode": args.mode,
        "device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
        "warmup_s": [round(s, 3) for s in warmup_s], "step_ms": [round(t, 2) for t in step_ms],
        "median_ms": round(statistics.median(step_ms), 2),
        "peak_gpu_mib": None if peak is None else round(peak), "params": params,
    }), flush=True)


if __name__ == "__main__":
    main()
