#!/usr/bin/env python3
"""The torchvision side of the loader benchmark: ImageFolder + transforms with PIL, one core.

    python scripts/bench_loader.py --folder DIR [--cifar DIR] [--limit N] [--batch B]

Times the same pipelines `cargo run --release --bin bench_loader` times, on the same files, on
one thread (torch.set_num_threads(1), no worker processes), batches stacked as DataLoader's
collate does. Prints one JSON line per pipeline: {"pipeline", "images", "seconds", "img_per_s"}.

- decode: PIL's decode (libjpeg-turbo) of each file to RGB, as torchvision's loader does.
- imagenet-train: the CutMix reference's ImageNet training transform: RandomResizedCrop(224),
  RandomHorizontalFlip, ToTensor, its ColorJitter(0.4, 0.4, 0.4) and Lighting(0.1) (utils.py,
  on tensors), Normalize.
- imagenet-train-plain: the same without colour jitter and lighting (torchvision's recipe).
- imagenet-val: Resize(256), CenterCrop(224), ToTensor, Normalize.
- cifar-train: RandomCrop(32, padding=4), RandomHorizontalFlip, ToTensor, Normalize, on PIL
  images made from the in-memory uint8 array as torchvision's CIFAR10 dataset does.
"""
import argparse
import json
import os
import random
import time

import numpy as np
import torch
from PIL import Image
from torchvision import datasets, transforms


class Lighting:
    """The reference's AlexNet-style PCA lighting (utils.py)."""

    def __init__(self, alphastd, eigval, eigvec):
        self.alphastd = alphastd
        self.eigval = torch.tensor(eigval)
        self.eigvec = torch.tensor(eigvec)

    def __call__(self, img):
        if self.alphastd == 0:
            return img
        alpha = img.new().resize_(3).normal_(0, self.alphastd)
        rgb = (self.eigvec.type_as(img).clone()
               .mul(alpha.view(1, 3).expand(3, 3))
               .mul(self.eigval.view(1, 3).expand(3, 3))
               .sum(1).squeeze())
        return img.add(rgb.view(3, 1, 1).expand_as(img))


def grayscale(img):
    gs = img.clone()
    gs[0].mul_(0.299).add_(gs[1], alpha=0.587).add_(gs[2], alpha=0.114)
    gs[1].copy_(gs[0])
    gs[2].copy_(gs[0])
    return gs


def blend(img1, img2, alpha):
    return img1.lerp(img2, alpha)


class ColorJitter:
    """The reference's brightness / contrast / saturation jitter in random order (utils.py)."""

    def __init__(self, brightness, contrast, saturation):
        self.var = (brightness, contrast, saturation)

    def __call__(self, img):
        ops = [0, 1, 2]
        random.shuffle(ops)
        for op in ops:
            var = self.var[op]
            alpha = random.uniform(-var, var)
            if op == 0:  # brightness
                img = blend(img, img.new().resize_as_(img).zero_(), alpha)
            elif op == 1:  # contrast
                gs = grayscale(img)
                gs.fill_(gs.mean())
                img = blend(img, gs, alpha)
            else:  # saturation
                img = blend(img, grayscale(img), alpha)
        return img


NORMALIZE = transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
EIGVAL = [0.2175, 0.0188, 0.0045]
EIGVEC = [[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]]


def pipelines():
    return {
        "imagenet-train": transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            ColorJitter(0.4, 0.4, 0.4), Lighting(0.1, EIGVAL, EIGVEC), NORMALIZE]),
        "imagenet-train-plain": transforms.Compose([
            transforms.RandomResizedCrop(224), transforms.RandomHorizontalFlip(), transforms.ToTensor(), NORMALIZE]),
        "imagenet-val": transforms.Compose([
            transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(), NORMALIZE]),
    }


def run_batches(get, n, batch):
    start = time.perf_counter()
    for first in range(0, n, batch):
        torch.stack([get(i) for i in range(first, min(n, first + batch))])
    return time.perf_counter() - start


def report(name, images, seconds):
    print(json.dumps({"pipeline": name, "images": images, "seconds": round(seconds, 3),
                      "img_per_s": round(images / seconds, 1)}), flush=True)


def cifar_array(folder):
    """Records of data_batch_*.bin as an [N, 32, 32, 3] uint8 array."""
    records = []
    for k in range(1, 6):
        raw = np.fromfile(os.path.join(folder, f"data_batch_{k}.bin"), dtype=np.uint8)
        records.append(raw.reshape(-1, 3073)[:, 1:])
    return np.concatenate(records).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--folder", required=True, help="an image folder: <class>/<image>")
    parser.add_argument("--cifar", help="a folder with CIFAR-10 data_batch_1..5.bin")
    parser.add_argument("--limit", type=int, default=0)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    torch.set_num_threads(1)
    random.seed(0)
    torch.manual_seed(0)
    files = [path for path, _ in datasets.ImageFolder(args.folder).samples]
    files = files if args.limit == 0 else files[:args.limit]
    start = time.perf_counter()
    for path in files:
        with open(path, "rb") as f:
            Image.open(f).convert("RGB")
    report("decode", len(files), time.perf_counter() - start)
    for name, transform in pipelines().items():
        dataset = datasets.ImageFolder(args.folder, transform)
        n = len(dataset) if args.limit == 0 else min(args.limit, len(dataset))
        run_batches(lambda i: dataset[i][0], min(n, 32), args.batch)  # warm the page cache
        report(name, n, run_batches(lambda i: dataset[i][0], n, args.batch))
    if args.cifar:
        array = cifar_array(args.cifar)
        transform = transforms.Compose([
            transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            transforms.Normalize([125.3 / 255, 123.0 / 255, 113.9 / 255], [63.0 / 255, 62.1 / 255, 66.7 / 255])])
        get = lambda i: transform(Image.fromarray(array[i]))
        report("cifar-train", len(array), run_batches(get, len(array), args.batch))


if __name__ == "__main__":
    main()
