#!/usr/bin/env python3
"""Builds an ImageNet-like image folder from real CIFAR-10 JPEGs, for the loader benchmark.

Each output image is a mosaic of real photographs (CIFAR tiles upscaled 2x), at the sizes
ImageNet's JPEGs come in (mostly 500 x 375 / 375 x 500 / 500 x 333, some larger), saved as
baseline JPEG at quality 90: about the bytes per pixel of ImageNet's training files.

    python scripts/make_bench_images.py SRC_TRAIN_DIR OUT_DIR [--count N] [--seed S]

SRC_TRAIN_DIR holds <class>/<image>.jpg (the unpacked ../shared/data/cifar10-train-jpg.tar.gz).
The class of a mosaic is the class of its tiles. OUT_DIR gets train/<class>/*.JPEG and
val/<class>/*.JPEG (one in ten), and cifar/data_batch_1..5.bin: 10,000 of the source images
(2,000 per file) in CIFAR-10's binary format, for the CIFAR loader benchmark.
"""
import argparse
import os
import random

from PIL import Image

SIZES = [(500, 375)] * 6 + [(375, 500)] * 3 + [(500, 333)] * 3 + [(500, 500), (640, 480), (333, 500), (800, 600), (1024, 768)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("src")
    parser.add_argument("out")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    classes = sorted(d for d in os.listdir(args.src) if os.path.isdir(os.path.join(args.src, d)))
    files = {c: sorted(os.listdir(os.path.join(args.src, c))) for c in classes}
    for i in range(args.count):
        cls = classes[i % len(classes)]
        w, h = rng.choice(SIZES)
        mosaic = Image.new("RGB", (w, h))
        for y in range(0, h, 64):
            for x in range(0, w, 64):
                name = rng.choice(files[cls])
                tile = Image.open(os.path.join(args.src, cls, name)).convert("RGB")
                mosaic.paste(tile.resize((64, 64), Image.BICUBIC), (x, y))
        split = "val" if i % 10 == 9 else "train"
        folder = os.path.join(args.out, split, cls)
        os.makedirs(folder, exist_ok=True)
        mosaic.save(os.path.join(folder, f"{i:06d}.JPEG"), quality=90)
    cifar = os.path.join(args.out, "cifar")
    os.makedirs(cifar, exist_ok=True)
    records = [(label, name) for label, c in enumerate(classes) for name in files[c][:1000]]
    rng.shuffle(records)
    for k in range(5):
        with open(os.path.join(cifar, f"data_batch_{k + 1}.bin"), "wb") as out:
            for label, name in records[k * 2000:(k + 1) * 2000]:
                image = Image.open(os.path.join(args.src, classes[label], name)).convert("RGB")
                planes = b"".join(band.tobytes() for band in image.resize((32, 32)).split())
                out.write(bytes([label]) + planes)


if __name__ == "__main__":
    main()
