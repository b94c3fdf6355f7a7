#!/usr/bin/env python3
"""Checks that this project's weights and PyTorch's are the same network, both ways.

Export: trains a tiny run (one epoch on the shipped images), exports it with `export`, loads
the file into torchvision's ResNet (strict=True) or the reference's PyramidNet, and compares
PyTorch's logits with what `eval --dump` recorded for the same input batch.

Import: builds torchvision's ResNet and the reference PyramidNet in PyTorch with every weight
and BatchNorm statistic randomised, saves them as safetensors and as a reference-style
`.pth.tar` (`{"state_dict": ...}` with DataParallel's `module.` prefix), evaluates them with
`eval --dump` and compares the logits the other way.

Cost: parameter counts and multiply-accumulates from `train --list-models` against PyTorch's.

`--write-fixture` instead writes the small PyTorch-made files the Rust tests load without Python
(crates/train/tests/fixtures/): a CIFAR ResNet-8 saved as the reference saves checkpoints, in
PyTorch's current ZIP format and in the legacy format of 2019, and its logits on a fixed input.

Needs torch, torchvision and safetensors (`just interop` makes a venv with them) and the
release binaries (`cargo build --release`). Exits non-zero when a check fails.

    .venv/bin/python scripts/check_torch_interop.py [--bin target/release] [--work DIR]
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from safetensors.torch import load_file, save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MINI = os.path.join(REPO, "assets", "cifar10-mini")
QUICKSTART = os.path.join(REPO, "configs", "quickstart.toml")
TOLERANCE = 1e-4


def rand_bbox(height, width, lam, rng):
    """The CutMix reference's rand_bbox (train.py), with height and width named as they are:
    a box of sqrt(1 - lam) of each side around a uniform centre, clipped to the image."""
    ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = rng.randint(height), rng.randint(width)
    y1, y2 = np.clip(cy - cut_h // 2, 0, height), np.clip(cy + cut_h // 2, 0, height)
    x1, x2 = np.clip(cx - cut_w // 2, 0, width), np.clip(cx + cut_w // 2, 0, width)
    return int(y1), int(y2), int(x1), int(x2)


# ---------------------------------------------------------------------------------------------
# The CutMix reference's PyramidNet (pyramidnet.py), written out with its parameter names.
# ---------------------------------------------------------------------------------------------


class PyramidBasic(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, keep=1.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.stride, self.keep = stride, keep

    def branch(self, x):
        out = self.conv1(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(out)))
        return self.bn3(out)

    def forward(self, x):
        out = self.branch(x) * self.keep
        shortcut = F.avg_pool2d(x, 2, 2, ceil_mode=True) if self.stride != 1 else x
        pad = out.shape[1] - shortcut.shape[1]
        if pad > 0:
            shortcut = torch.cat([shortcut, shortcut.new_zeros(shortcut.shape[0], pad, *shortcut.shape[2:])], 1)
        return out + shortcut


class PyramidBottleneck(PyramidBasic):
    expansion = 4

    def __init__(self, inplanes, planes, stride, keep=1.0):
        nn.Module.__init__(self)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn4 = nn.BatchNorm2d(planes * 4)
        self.stride, self.keep = stride, keep

    def branch(self, x):
        out = self.conv1(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        return self.bn4(out)


class PyramidNet(nn.Module):
    def __init__(self, depth, alpha, num_classes, bottleneck, shakedrop=0.0):
        super().__init__()
        block = PyramidBottleneck if bottleneck else PyramidBasic
        n = (depth - 2) // (9 if bottleneck else 6)
        add_rate = alpha / (3 * n)
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        width, inplanes, index = 16.0, 16, 0
        for stage in range(3):
            layers = []
            for i in range(n):
                width += add_rate
                planes = int(round(width))
                keep = 1.0 - shakedrop * (index + 1) / (3 * n)
                layers.append(block(inplanes, planes, 2 if (stage > 0 and i == 0) else 1, keep))
                inplanes = planes * block.expansion
                index += 1
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.bn_final = nn.BatchNorm2d(inplanes)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.bn1(self.conv1(x))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.relu(self.bn_final(x))
        return self.fc(x.mean((2, 3)))


# ---------------------------------------------------------------------------------------------


class Checks:
    def __init__(self):
        self.rows = []

    def add(self, name, value, ok, detail=""):
        self.rows.append((name, value, ok, detail))
        print(f"{'ok  ' if ok else 'FAIL'} {name}: {value} {detail}", flush=True)

    def failed(self):
        return [row for row in self.rows if not row[2]]


def run(cmd, **kwargs):
    print("$", " ".join(cmd), flush=True)
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, **kwargs)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"command failed: {' '.join(cmd)}")
    return result


def relative_error(ours, theirs):
    return ((ours - theirs).abs().max() / theirs.abs().max().clamp_min(1e-12)).item()


# The PyramidNets checked: (depth, alpha, bottleneck, ShakeDrop's final drop probability).
PYRAMIDNETS = {
    "pyramidnet200": (200, 240, True, 0.0),
    "pyramidnet110_shakedrop": (110, 48, False, 0.5),
}


def model_sets(kind):
    """`--set`s describing each checked network on the shipped images."""
    if kind.startswith("resnet"):
        return [
            "model.arch=resnet",
            f"model.depth={int(kind[6:])}",
            "data.transforms=imagenet",
            "data.image_size=224",
        ]
    depth, alpha, bottleneck, shakedrop = PYRAMIDNETS[kind]
    return [
        "model.arch=pyramidnet",
        f"model.depth={depth}",
        f"model.alpha={alpha}",
        f"model.bottleneck={str(bottleneck).lower()}",
        f"model.shakedrop={shakedrop}",
        "data.transforms=cifar",
        "data.image_size=32",
    ]


def common_sets(work, name, classes):
    return [
        f"name={name}",
        f"output_dir={os.path.join(work, 'runs')}",
        f"data.root={MINI}",
        "backend=flex",
        f"model.num_classes={classes}",
        "train.epochs=1",
        "train.batch_size=8",
        "data.train_limit=16",
        "data.val_limit=8",
    ]


def with_sets(sets):
    return [arg for s in sets for arg in ("--set", s)]


def torch_model(kind, classes):
    if kind.startswith("resnet"):
        return getattr(torchvision.models, kind)(num_classes=classes)
    depth, alpha, bottleneck, shakedrop = PYRAMIDNETS[kind]
    return PyramidNet(depth, alpha, classes, bottleneck, shakedrop)


def eval_dump(bins, sets, weights, dump):
    out = run([os.path.join(bins, "eval"), "--config", QUICKSTART, "--weights", weights, "--dump", dump] + with_sets(sets))
    return json.loads(out.stdout.strip().splitlines()[-1])


def check_export(bins, work, kind, checks):
    classes = 10
    name = f"interop_{kind}"
    sets = common_sets(work, name, classes) + model_sets(kind)
    run([os.path.join(bins, "train"), "--config", QUICKSTART] + with_sets(sets))
    exported = os.path.join(work, f"{kind}_export.safetensors")
    run([os.path.join(bins, "export"), "--run", os.path.join(work, "runs", name), "--which", "last", "--out", exported])
    dump = os.path.join(work, f"{kind}_export_dump.safetensors")
    eval_dump(bins, sets, exported, dump)
    model = torch_model(kind, classes)
    result = model.load_state_dict(load_file(exported), strict=True)
    model.eval()
    recorded = load_file(dump)
    with torch.no_grad():
        logits = model(recorded["input"])
    error = relative_error(recorded["logits"], logits)
    checks.add(f"export {kind} -> PyTorch (strict=True, {result})", f"relative error {error:.2e}", error < TOLERANCE)


def randomise(model, generator):
    """Every weight and BatchNorm statistic random, so a wrong name or layout shows."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 1.5, generator=generator)
                module.num_batches_tracked.fill_(123)
            elif isinstance(module, nn.Linear):
                module.bias.normal_(0, 0.1, generator=generator)


def check_import(bins, work, kind, checks):
    classes = 1000 if kind.startswith("resnet") else 100
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = torch_model(kind, classes)
    randomise(model, generator)
    model.eval()
    state = model.state_dict()
    as_safetensors = os.path.join(work, f"{kind}_torch.safetensors")
    save_file({k: v.contiguous() for k, v in state.items()}, as_safetensors)
    as_pth = os.path.join(work, f"{kind}_torch.pth.tar")
    torch.save(
        {"epoch": 1, "arch": kind, "state_dict": {f"module.{k}": v for k, v in state.items()}, "best_err1": 0.0},
        as_pth,
    )
    sets = common_sets(work, f"import_{kind}", classes) + model_sets(kind)
    for label, path in (("safetensors", as_safetensors), (".pth.tar with module.", as_pth)):
        dump = os.path.join(work, f"{kind}_import_dump.safetensors")
        eval_dump(bins, sets, path, dump)
        recorded = load_file(dump)
        with torch.no_grad():
            logits = model(recorded["input"])
        error = relative_error(recorded["logits"], logits)
        checks.add(f"import {kind} from PyTorch ({label})", f"relative error {error:.2e}", error < TOLERANCE)
    return as_safetensors


def check_finetune(bins, work, weights, checks):
    """A 1000-class torchvision checkpoint fine-tuned on the 10 shipped classes."""
    sets = common_sets(work, "finetune", 10) + model_sets("resnet50") + [f"model.init_from={weights}"]
    out = run([os.path.join(bins, "train"), "--config", QUICKSTART] + with_sets(sets))
    line = next((l for l in out.stdout.splitlines() if l.startswith("init from")), "")
    ok = "re-initialised fc.weight ([1000, 2048] in the file, [10, 2048] here)" in line and "loaded 265 tensors" in line
    checks.add("fine-tune resnet50 1000 -> 10 classes", line, ok)


def count_macs(model, size):
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += output.numel() // output.shape[0] * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return total


def check_costs(bins, checks):
    out = run([os.path.join(bins, "train"), "--list-models"])
    listed = {}
    for line in out.stdout.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5 and fields[1].isdigit():
            listed[fields[0]] = (int(fields[1]), float(fields[2]))
    expected = {
        "resnet18": (torchvision.models.resnet18(), 224),
        "resnet50": (torchvision.models.resnet50(), 224),
        "resnet101": (torchvision.models.resnet101(), 224),
        "resnet152": (torchvision.models.resnet152(), 224),
        "pyramidnet200_a240": (PyramidNet(200, 240, 100, True), 32),
        "pyramidnet110_a48": (PyramidNet(110, 48, 100, False), 32),
    }
    for name, (model, size) in expected.items():
        params = sum(p.numel() for p in model.parameters())
        macs = count_macs(model, size) / 1e9
        ours = listed.get(name)
        ok = ours is not None and ours[0] == params and math.isclose(ours[1], macs, abs_tol=5e-4)
        checks.add(f"cost {name}", f"ours {ours}, PyTorch ({params}, {macs:.3f} GMACs)", ok)


class CifarResNet(nn.Module):
    """The CIFAR ResNet (6n+2, basic blocks, projection shortcuts) with torchvision's blocks."""

    def __init__(self, depth, num_classes):
        super().__init__()
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        inplanes = 16
        for stage, planes in enumerate((16, 32, 64)):
            blocks = []
            for i in range(n):
                stride = 2 if (stage > 0 and i == 0) else 1
                downsample = None
                if stride != 1 or inplanes != planes:
                    downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))
                blocks.append(torchvision.models.resnet.BasicBlock(inplanes, planes, stride, downsample))
                inplanes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


def write_fixture():
    folder = os.path.join(REPO, "crates", "train", "tests", "fixtures")
    os.makedirs(folder, exist_ok=True)
    generator = torch.Generator().manual_seed(1)
    torch.manual_seed(1)
    model = CifarResNet(8, 10)
    randomise(model, generator)
    model.eval()
    state = {f"module.{k}": v for k, v in model.state_dict().items()}
    checkpoint = {"epoch": 300, "arch": "resnet", "state_dict": state, "best_err1": 5.0}
    torch.save(checkpoint, os.path.join(folder, "cifar_resnet8.pth.tar"))
    torch.save(checkpoint, os.path.join(folder, "cifar_resnet8_legacy.pth.tar"), _use_new_zipfile_serialization=False)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        logits = model(x)
    save_file({"input": x, "logits": logits}, os.path.join(folder, "cifar_resnet8_logits.safetensors"))
    print(f"wrote the fixtures to {folder} (torch {torch.__version__})")


def write_cam_fixture():
    """Class activation maps of the committed CIFAR ResNet-8 fixture on its committed input, for
    every class: the last feature map weighed by fc.weight, upsampled bilinearly to the input
    (align_corners=False), min-max normalised per map (Zhou et al. 2016, as `localize` does)."""
    from safetensors.torch import load_file

    folder = os.path.join(REPO, "crates", "train", "tests", "fixtures")
    model = CifarResNet(8, 10)
    checkpoint = torch.load(os.path.join(folder, "cifar_resnet8.pth.tar"), map_location="cpu")
    model.load_state_dict({k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()})
    model.eval()
    x = load_file(os.path.join(folder, "cifar_resnet8_logits.safetensors"))["input"]
    with torch.no_grad():
        f = F.relu(model.bn1(model.conv1(x)))
        f = model.layer3(model.layer2(model.layer1(f)))
        maps = torch.einsum("ck,nkhw->nchw", model.fc.weight.double(), f.double())
        maps = F.interpolate(maps, size=x.shape[2:], mode="bilinear", align_corners=False)
        low = maps.amin(dim=(2, 3), keepdim=True)
        high = maps.amax(dim=(2, 3), keepdim=True)
        cams = ((maps - low) / (high - low)).float()
    save_file({"input": x, "cams": cams.contiguous()}, os.path.join(folder, "cifar_resnet8_cams.safetensors"))
    print(f"wrote cifar_resnet8_cams.safetensors to {folder} (torch {torch.__version__})")


def write_fgsm_fixture():
    """FGSM and ODIN perturbations of the committed CIFAR ResNet-8 fixture (evaluation mode) on
    four random images: pixels in [0, 1], normalised with the CIFAR mean and std the project
    uses, the loss's gradient taken with respect to the pixels; FGSM at 8/255 and 2/255 with
    the true labels, clipped to [0, 1]; ODIN's step (-0.0014, temperature 1000, the predicted
    labels, unclipped). Every image is stored normalised, as the model sees it."""
    folder = os.path.join(REPO, "crates", "train", "tests", "fixtures")
    model = CifarResNet(8, 10)
    checkpoint = torch.load(os.path.join(folder, "cifar_resnet8.pth.tar"), map_location="cpu")
    model.load_state_dict({k.removeprefix("module."): v for k, v in checkpoint["state_dict"].items()})
    model.eval()
    generator = torch.Generator().manual_seed(8)
    mean = torch.tensor([125.3, 123.0, 113.9]).view(1, 3, 1, 1) / 255
    std = torch.tensor([63.0, 62.1, 66.7]).view(1, 3, 1, 1) / 255
    pixels = torch.rand(4, 3, 32, 32, generator=generator)
    labels = torch.tensor([3, 0, 7, 9])

    def gradient(targets, temperature):
        p = pixels.clone().requires_grad_(True)
        loss = F.cross_entropy(model((p - mean) / std) / temperature, targets)
        (grad,) = torch.autograd.grad(loss, p)
        return grad

    tensors = {"input": ((pixels - mean) / std).contiguous(), "labels": labels}
    grad = gradient(labels, 1.0)
    tensors["grad"] = grad
    for eps, name in [(8 / 255, "fgsm_8"), (2 / 255, "fgsm_2")]:
        adv = (pixels + eps * grad.sign()).clamp(0, 1)
        tensors[name] = ((adv - mean) / std).contiguous()
    with torch.no_grad():
        predicted = model((pixels - mean) / std).argmax(1)
    odin_grad = gradient(predicted, 1000.0)
    tensors["odin_grad"] = odin_grad
    tensors["odin"] = (((pixels - 0.0014 * odin_grad.sign()) - mean) / std).contiguous()
    save_file(tensors, os.path.join(folder, "cifar_resnet8_fgsm.safetensors"))
    print(f"wrote cifar_resnet8_fgsm.safetensors to {folder} (torch {torch.__version__})")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bin", default=os.path.join(REPO, "target", "release"), help="folder with train, eval, export")
    parser.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument("--write-fixture", action="store_true", help="write the Rust tests' PyTorch files and exit")
    parser.add_argument("--write-cam-fixture", action="store_true", help="write the CAM test's PyTorch file (from the committed ResNet-8 fixture) and exit")
    parser.add_argument("--write-fgsm-fixture", action="store_true", help="write the FGSM / ODIN test's PyTorch file (from the committed ResNet-8 fixture) and exit")
    args = parser.parse_args()
    if args.write_fgsm_fixture:
        write_fgsm_fixture()
        return
    if args.write_fixture:
        write_fixture()
        return
    if args.write_cam_fixture:
        write_cam_fixture()
        return
    work = args.work or tempfile.mkdtemp(prefix="cutmix-interop-")
    os.makedirs(work, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    checks = Checks()
    check_costs(args.bin, checks)
    for kind in ("resnet50", "resnet101", "pyramidnet200", "pyramidnet110_shakedrop"):
        check_export(args.bin, work, kind, checks)
    imported = check_import(args.bin, work, "resnet50", checks)
    check_import(args.bin, work, "pyramidnet200", checks)
    check_finetune(args.bin, work, imported, checks)
    failed = checks.failed()
    print(f"\n{len(checks.rows) - len(failed)} of {len(checks.rows)} checks passed (scratch: {work})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
