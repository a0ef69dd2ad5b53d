"""What a training step's memory is made of, per way of fine-tuning with frozen weights.

For each arm (full fine-tuning, the freeze depths, and the sliver methods of ``adapt.method``) and
each image size, runs ResNet18 for 1 warm-up and 2 measured steps in a worker process of its own
(the memory pass of ``freezetune compare`` and ``sweep --memory``), on synthetic data with random
weights (memory does not depend on their values), and reports the peak (CPU: peak-RSS growth;
CUDA: max allocated) with its parts: weights, gradients, optimizer state, and the activations one
step saved for backward (a saved-tensor hook).

Usage::

    .venv/bin/python scripts/bench_memory.py --sizes 64 224 --batch-size 16 \\
        --json benchmarks/sliver-memory-cpu-2threads-torch2.14.1.json
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

ARMS = {  # name: (label, overrides)
    "full": ("full fine-tuning", []),
    "layer1": ("frozen ..layer1", ["freeze.until=layer1"]),
    "layer3": ("frozen ..layer3", ["freeze.until=layer3"]),
    "layer4": ("fc only", ["freeze.until=layer4"]),
    "bn": ("BatchNorm only", ["adapt.method=bn"]),
    "bias": ("biases only", ["adapt.method=bias"]),
    "lora-r4": ("LoRA r4, every conv", ["adapt.method=lora", "adapt.lora.rank=4"]),
    "lora-r16": ("LoRA r16, every conv", ["adapt.method=lora", "adapt.lora.rank=16"]),
    "lora-l34": ("LoRA r8 on layer3-4, rest frozen", ["adapt.method=lora", "freeze.until=layer2"]),
    # train.lean_backward: the same arms keeping less for backward (models/lean.py)
    "full-lean": ("full fine-tuning, lean backward", ["train.lean_backward=true"]),
    "bn-lean": ("BatchNorm only, lean backward", ["adapt.method=bn", "train.lean_backward=true"]),
    "bias-lean": ("biases only, lean backward", ["adapt.method=bias", "train.lean_backward=true"]),
    "lora-r4-lean": ("LoRA r4, every conv, lean backward",
                     ["adapt.method=lora", "adapt.lora.rank=4", "train.lean_backward=true"]),
}


def measure(size: int, batch: int, device: str, names: list[str] | None = None) -> dict:
    """Every arm's memory record at one image size, each from a process of its own."""
    from freezetune.compare.arms import ArmSpec
    from freezetune.compare.run import memory_pass
    from freezetune.config import load_config

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        configs, specs = [], []
        for name, (label, overrides) in ARMS.items():
            if names and name not in names and name != "full":
                continue
            cfg = load_config(None, ["model.weights=none", f"data.image_size={size}", f"data.batch_size={batch}",
                                     f"data.train_size={batch * 4}", "data.val_size=0", f"device={device}",
                                     "train.feature_cache=off", f"output.dir={tmp}/{name}", *overrides])
            configs.append(cfg)
            specs.append(ArmSpec(name, label, cfg.freeze.model_dump(mode="json"),
                                 "full" if name == "full" else "optimized"))
        return memory_pass(configs, specs)


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def table(results: dict) -> list[str]:
    """Markdown rows: per size and arm, peak and parts in MiB, saved activations against full's."""
    lines = ["| px | arm | peak | saved activations | vs full | weights | gradients | optimizer state |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size, arms in results.items():
        full = arms["full"]["saved_activation_bytes"]
        for name, m in arms.items():
            share = m["saved_activation_bytes"] / full if full else float("nan")
            lines.append(f"| {size} | {ARMS[name][0]} | {mib(m['peak_bytes'])} | {mib(m['saved_activation_bytes'])} "
                         f"| {share:.2f}× | {mib(m['param_bytes'])} | {mib(m['grad_bytes'])} "
                         f"| {mib(m['optimizer_state_bytes'])} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 224])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arms", nargs="+", choices=list(ARMS), help="Only these arms (and full).")
    parser.add_argument("--json", type=Path, help="Write the raw records here.")
    args = parser.parse_args()
    import torch

    start = time.time()
    results = {str(size): measure(size, args.batch_size, args.device, args.arms) for size in args.sizes}
    print("\n".join(table(results)))
    if args.json:
        record = {"command": "python scripts/bench_memory.py " + " ".join(
                      [f"--sizes {' '.join(map(str, args.sizes))}", f"--batch-size {args.batch_size}",
                       f"--device {args.device}"] + ([f"--arms {' '.join(args.arms)}"] if args.arms else [])),
                  "when": time.strftime("%Y-%m-%d %H:%M:%S %z"), "seconds": time.time() - start,
                  "machine": {"cpus": __import__("os").cpu_count(), "platform": platform.platform()},
                  "torch": torch.__version__, "batch_size": args.batch_size,
                  "arms": {k: v[0] for k, v in ARMS.items() if not args.arms or k in args.arms or k == "full"},
                  "results": results}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
