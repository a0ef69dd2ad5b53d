"""What waiting for data costs, and what ``data.num_workers`` and the JPEG decoder do about it.

Makes (once) an ImageFolder of 256-px JPEGs cut from scikit-learn's two sample photographs
(random crops, scales, flips and colour shifts, so the files have a real photo's entropy), then:

1. decodes every file with PIL and with ``torchvision.io.decode_jpeg`` (each through the run's
   eval transform), median per image after a warm-up pass;
2. trains ResNet18 at batch 32 without the feature cache, at 224 px frozen through layer3 and at
   32 px training fc only, once per ``data.num_workers`` value, each a ``freezetune train``
   process, and reads each run's ``summary.json`` ``data`` section (waits for data, end-to-end samples/s).

Usage::

    .venv/bin/python scripts/bench_data.py --out runs/bench-data --workers 0 auto \\
        --json benchmarks/data-loading-cpu-2threads-torch2.14.1.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def make_folder(root: Path, per_class: int = 100, classes: int = 4, size: int = 256, seed: int = 0) -> Path:
    """An ImageFolder with train/ (``per_class`` JPEGs per class) and val/ (a quarter as many)."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_sample_images

    if (root / "done").exists():
        return root
    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    for split, n in (("train", per_class), ("val", per_class // 4)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                photo = photos[(c + i) % len(photos)]
                side = int(rng.integers(size, min(photo.shape[:2]) + 1))
                y = int(rng.integers(0, photo.shape[0] - side + 1))
                x = int(rng.integers(0, photo.shape[1] - side + 1))
                crop = photo[y:y + side, x:x + side].astype(np.float32)
                crop = crop * rng.uniform(0.7, 1.3, size=3) + rng.uniform(-20, 20)
                image = Image.fromarray(crop.clip(0, 255).astype(np.uint8)).resize((size, size), Image.BILINEAR)
                if rng.random() < 0.5:
                    image = image.transpose(Image.FLIP_LEFT_RIGHT)
                image.save(folder / f"{i:04d}.jpg", quality=90)
    (root / "done").write_text("")
    return root


def decode_times(root: Path, image_size: int = 224) -> dict:
    """Median seconds per image through the eval transform: PIL (what freezetune uses), and
    torchvision's JPEG decoder with the resize on the tensor (the alternative it measured)."""
    import warnings

    import torch
    from PIL import Image
    from torchvision import io
    from torchvision import transforms as T

    from freezetune.config import DataConfig
    from freezetune.training.data import IMAGENET_MEAN, IMAGENET_STD, _transform

    files = [str(p) for p in sorted((root / "train").rglob("*.jpg"))]
    pil_transform = _transform(DataConfig(source="imagefolder", root=str(root), image_size=image_size), train=False)
    resize = int(round(image_size * 256 / 224))
    tensor_transform = T.Compose([T.Resize(resize, antialias=True), T.CenterCrop(image_size),
                                  T.ConvertImageDtype(torch.float32), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])

    def pil(path):
        with Image.open(path) as im:
            return pil_transform(im.convert("RGB"))

    def decode_jpeg(path):
        with warnings.catch_warnings():  # deprecated in torchvision 0.29 for TorchCodec's decoder
            warnings.simplefilter("ignore", DeprecationWarning)
            return tensor_transform(io.decode_jpeg(io.read_file(path), mode=io.ImageReadMode.RGB))

    torch.set_num_threads(1)  # as in a loader worker
    result = {"image_size": image_size}
    for name, fn in (("pil", pil), ("decode_jpeg_tensor_resize", decode_jpeg)):
        for path in files[:20]:
            fn(path)  # warm-up
        times = []
        for path in files:
            start = time.perf_counter()
            fn(path)
            times.append(time.perf_counter() - start)
        result[name] = {"median_s": statistics.median(times), "images": len(files)}
    result["decode_jpeg_speedup"] = result["pil"]["median_s"] / result["decode_jpeg_tensor_resize"]["median_s"]
    return result


PRESETS = {
    # The measurement: a real step, where the data is a small part of the time.
    "224px-until-layer3": ["data.image_size=224", "freeze.trainable=null", "freeze.until=layer3"],
    # A cheap step (32 px, fc only): decoding 256-px JPEGs is then most of the time.
    "32px-fc-only": ["data.image_size=32", "freeze.trainable=[fc]"],
}


def train(root: Path, out: Path, workers: str, epochs: int, preset: str) -> dict:
    """One ``freezetune train`` process; the run's data and timing sections, and its whole-process time."""
    cmd = [sys.executable, "-m", "freezetune", "train", "-c", "configs/quickstart.yaml",
           "model.weights=none", "data.source=imagefolder", f"data.root={root}", "model.num_classes=4",
           *PRESETS[preset], "data.batch_size=32", "data.val_size=0", f"data.num_workers={workers}",
           "train.feature_cache=off", f"train.epochs={epochs}", "train.warmup_steps=2", "device=cpu",
           f"output.dir={out}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={"FREEZETUNE_OFFLINE": "1", "COLUMNS": "200",
                                                                   **__import__("os").environ})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"num_workers={workers}: train failed\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    data, timing = summary["data"], summary["timing"]
    return {"preset": preset, "num_workers": workers, "resolved_workers": data.get("num_workers"),
            "wait_s": data["wait_s"], "train_s": data["train_s"], "wait_share": data["wait_share"],
            "samples_per_s_steps": timing["samples_per_s"],
            "samples_per_s_end_to_end": data["end_to_end_samples_per_s"], "input_bound": data["input_bound"],
            "process_wall_s": wall, "command": " ".join(cmd[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-data"))
    parser.add_argument("--workers", nargs="+", default=["0", "auto"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--json", type=Path, default=None, help="write the results here too")
    args = parser.parse_args()
    import torch

    root = make_folder(args.out / "images")
    rows = [train(root, args.out / f"{p}-workers-{w}", w, args.epochs, p) for p in args.presets for w in args.workers]
    result = {"decode": decode_times(root), "runs": rows, "torch": torch.__version__,
              "machine": f"{platform.processor() or platform.machine()}, {len(__import__('os').sched_getaffinity(0))} "
                         "CPUs", "date": time.strftime("%Y-%m-%d")}
    text = json.dumps(result, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
