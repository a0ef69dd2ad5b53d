"""Writes a small ImageFolder task: 8 shape classes, drawn at random sizes, places and colours.

A task of our own making for benchmarks (see docs/benchmarks.md, "Adaptive freezing"): unlike the
built-in synthetic data, colour says nothing about the class and the shapes need spatial
features, so it takes several epochs from random init and the early layers matter.

    python scripts/make_shapes_task.py data/shapes --train 200 --val 50 --size 48
    # a pretraining source for the fine-tuning measurements: other images, half the classes
    python scripts/make_shapes_task.py data/shapes-source --seed 1 --train 400 --classes circle,square,triangle,cross
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "cross", "ring", "bar", "ell", "diamond")


def draw(shape: str, size: int, rng: random.Random) -> Image.Image:
    bg = tuple(rng.randrange(0, 256) for _ in range(3))
    fg = tuple((c + rng.randrange(80, 176)) % 256 for c in bg)  # always far from the background
    img = Image.new("RGB", (size * 2, size * 2), bg)  # drawn at 2x, then downsampled: antialiased
    d = ImageDraw.Draw(img)
    s = size * 2
    r = rng.uniform(0.22, 0.36) * s
    cx, cy = rng.uniform(r + 2, s - r - 2), rng.uniform(r + 2, s - r - 2)
    w = max(3, int(r * rng.uniform(0.25, 0.4)))
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fg)
    elif shape == "ring":
        d.ellipse(box, outline=fg, width=w)
    elif shape == "square":
        d.polygon(_rotated(cx, cy, r, 4, rng.uniform(0, math.pi / 2) + math.pi / 4), fill=fg)
    elif shape == "diamond":
        d.polygon(_rotated(cx, cy, r, 4, rng.uniform(-0.2, 0.2)), fill=fg)
    elif shape == "triangle":
        d.polygon(_rotated(cx, cy, r, 3, rng.uniform(0, 2 * math.pi)), fill=fg)
    elif shape == "cross":
        d.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fg)
        d.rectangle((cx - w / 2, cy - r, cx + w / 2, cy + r), fill=fg)
    elif shape == "bar":
        d.rectangle((cx - r, cy - w / 2, cx + r, cy + w / 2), fill=fg)
    elif shape == "ell":
        d.rectangle((cx - r, cy + r - w, cx + r, cy + r), fill=fg)
        d.rectangle((cx - r, cy - r, cx - r + w, cy + r), fill=fg)
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8))).resize((size, size), Image.BILINEAR)
    noise = Image.effect_noise((size, size), rng.uniform(10, 30)).convert("RGB")
    return Image.blend(img, noise, rng.uniform(0.05, 0.15))


def _rotated(cx: float, cy: float, r: float, n: int, angle: float) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(angle + 2 * math.pi * k / n), cy + r * math.sin(angle + 2 * math.pi * k / n))
            for k in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", type=Path)
    p.add_argument("--train", type=int, default=200, help="images per class in train/")
    p.add_argument("--val", type=int, default=50, help="images per class in val/")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--classes", default=",".join(CLASSES),
                   help=f"comma-separated subset of {','.join(CLASSES)} (default: all)")
    args = p.parse_args()
    classes = [c for c in args.classes.split(",") if c]
    unknown = sorted(set(classes) - set(CLASSES))
    if unknown or not classes:
        p.error(f"--classes: unknown {', '.join(unknown) or '(none given)'}; choose from {', '.join(CLASSES)}")
    rng = random.Random(args.seed)
    for split, n in (("train", args.train), ("val", args.val)):
        for cls in classes:
            folder = args.root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                draw(cls, args.size, rng).save(folder / f"{i:04d}.png")
    print(f"{args.root}: {len(classes)} classes, {args.train}/{args.val} images per class (train/val)")


if __name__ == "__main__":
    main()
