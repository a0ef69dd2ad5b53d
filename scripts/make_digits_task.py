"""Writes the input-shift transfer task: UCI digits, and the same digits inverted under a fixed noise pattern.

The task behind the per-arm learning rates of ``freezetune sweep`` (docs/sweep.md, "Measured"):
a backbone trained on the digits as they are, then fine-tuned on an input-level shift of them,
where the paper answer (Lee et al., ICLR 2023, surgical fine-tuning) is to tune the first block,
and where each freeze depth has its own best learning rate. The digits come with scikit-learn
(``pip install scikit-learn``; nothing is downloaded).

    python scripts/make_digits_task.py data/digits        # writes data/digits/{source,shift}
    freezetune train --config configs/sweep/digits_source.yaml
    freezetune export runs/digits-source --out runs/digits-source.safetensors
    freezetune sweep --config configs/sweep/digits_shift.yaml --arms configs/sweep/digits_arms.yaml

``source/`` holds the first 1000 digits (train) and 200 more (val); ``shift/`` holds 20 images a
class for training and the rest for validation, all from the 797 digits the source never saw.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32


def to_image(digit: np.ndarray, pattern: np.ndarray | None) -> Image.Image:
    """An 8x8 digit (0..16) as a 32-px RGB image; with a pattern, inverted and the pattern added."""
    gray = digit.astype(np.float32) / 16.0
    rgb = np.repeat(np.asarray(Image.fromarray((gray * 255).astype(np.uint8)).resize((SIZE, SIZE), Image.BILINEAR),
                               dtype=np.float32)[..., None] / 255.0, 3, axis=2)
    if pattern is not None:
        rgb = np.clip(1.0 - rgb + pattern, 0.0, 1.0) * 0.8
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def write(root: Path, split: str, images, labels, pattern) -> None:
    for i, (digit, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / split / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        to_image(digit, pattern).save(folder / f"{i:04d}.png")


def main() -> None:
    from sklearn.datasets import load_digits

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--per-class", type=int, default=20, help="shifted training images per class")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    digits = load_digits()
    images, labels = digits.images, digits.target
    write(args.root / "source", "train", images[:1000], labels[:1000], None)
    write(args.root / "source", "val", images[1000:1200], labels[1000:1200], None)
    pattern = np.random.default_rng(12345).uniform(-0.35, 0.35, size=(SIZE, SIZE, 3)).astype(np.float32)
    rest = list(range(1000, len(images)))
    random.Random(args.seed).shuffle(rest)
    train = [i for c in range(10) for i in [j for j in rest if labels[j] == c][: args.per_class]]
    val = sorted(set(rest) - set(train))
    write(args.root / "shift", "train", images[train], labels[train], pattern)
    write(args.root / "shift", "val", images[val], labels[val], pattern)
    print(f"{args.root}: source 1000/200, shift {len(train)}/{len(val)} images (train/val), 10 classes")


if __name__ == "__main__":
    main()
