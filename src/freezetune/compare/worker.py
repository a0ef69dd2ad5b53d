"""One arm of a comparison: a model trained under one freeze spec, a block of steps at a time.

An arm normally lives in its own worker process (:class:`ProcessArm`), driven by the parent over a
socket. That is what makes its memory figure its own: on CPU the peak resident set size can
only be attributed to one arm if nothing else (another arm's model, activations or allocator
caches) shares the process. :class:`InlineArm` runs the same :class:`ArmRunner` in this process,
which is faster to start but cannot measure per-arm memory.

Workers are fresh interpreters, not forks: forking a process whose OpenMP thread pool already ran
can deadlock, and a fresh interpreter also gives every arm the same clean starting RSS.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import socket
import subprocess
import sys
import traceback
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection

import torch
from torch import nn

from freezetune import errors
from freezetune.config import Config
from freezetune.freezing.plan import combined_sha256, fingerprint, tensor_sha256
from freezetune.measure.flops import step_flops, without_prefix
from freezetune.measure.timing import (
    current_rss_bytes,
    device_description,
    peak_rss_bytes,
    reset_peak_memory,
    timing_stats,
)
from freezetune.speed.prefix import prefix_modules
from freezetune.training.optim import plain_optimizer
from freezetune.training.recipe import Run, epoch_batches, fill_cache, optimizer_state_bytes, setup, train_step

# How long the parent waits for a worker to exit after its last answer.
_JOIN_TIMEOUT_S = 30.0


@dataclass
class ArmSpec:
    """What distinguishes one arm from the others.

    Attributes:
        name: Short key used in the JSON output (``full``, ``frozen``, ``layer3``...).
        label: What a person reads in tables and plots.
        freeze: The ``freeze`` config section for this arm, as plain data.
        mode: How the frozen part is run (see :data:`freezetune.compare.run.MODES`): ``full`` for the
            baseline, ``plain`` (a plain ``requires_grad=False`` loop: BatchNorm in train mode, no
            fast path, every parameter handed to torch's default SGD), ``optimized`` (freezetune's
            path) or ``cached`` (the same with the feature cache filled, so every step is a
            later-epoch step).
        depth: The freeze point of a depth-sweep arm, else None.
    """

    name: str
    label: str
    freeze: dict = field(default_factory=dict)
    mode: str = "optimized"
    depth: str | None = None


class ArmRunner:
    """Builds one arm with :func:`freezetune.training.recipe.setup` and trains it on command.

    Args:
        config: The arm's complete config (freeze spec, weights file and output folder set).
        spec: The arm's identity.
        measure_memory: Whether this runner owns its process, so its memory figure is its own.
    """

    def __init__(self, config: Config, spec: ArmSpec, measure_memory: bool):
        self.config, self.spec, self.measure_memory = config, spec, measure_memory
        self.run: Run | None = None
        self.losses: list[float] = []
        self.timed: list[float] = []
        self.warmup_steps = 0
        self._batches: Iterator | None = None
        self._batch_hash = hashlib.sha256()
        self._memory_start: dict = {}
        self._bn_before: dict[str, str] = {}

    def setup(self) -> dict:
        """Builds model, freeze plan, optimizer and data; returns what is known before training."""
        self.run = run = setup(self.config)
        cfg = self.config
        if self.spec.mode == "plain":
            run.optimizer = plain_optimizer(run.model, cfg.optim)
        flops = step_flops(run.model, cfg.data.batch_size, cfg.data.image_size, cfg.model.num_classes)
        if run.cache is not None:
            flops = without_prefix(flops, prefix_modules(cfg.model.name, run.speed["frozen_prefix"]))
        state = {name: tensor_sha256(t) for name, t in run.model.state_dict().items()}
        self._bn_before = frozen_layer_batchnorm_state(run.model)
        self._batches = _batches(run)
        self._memory_start = self._start_memory_window()
        return {
            "params": {k: run.params[k] for k in ("total", "trainable", "frozen", "trainable_pct")},
            "flops": flops,
            "initial_weights_sha256": combined_sha256(state),
            "device": device_description(run.device),
            "frozen_batchnorm_layers": len(run.plan.frozen_bn),
            "weights_source": run.loaded.weights_source,
            "execution": getattr(run, "speed", {}),
        }

    def fill(self) -> dict:
        """Fills the feature cache (cached arms only), so that every step after it reads features."""
        seconds = fill_cache(self.run)
        self._batches = _batches(self.run)  # from the first batch again, now served from the cache
        return {"cache_fill_s": seconds, "cache_bytes": self.run.cache.nbytes}

    def steps(self, n: int, warmup: bool) -> list[dict]:
        """Trains ``n`` steps; returns each step's loss and synchronized wall time."""
        out = []
        loss_fn = nn.CrossEntropyLoss()
        for _ in range(n):
            batch = next(self._batches)
            self._hash_batch(batch)  # outside the timed step
            loss, seconds = train_step(self.run, batch, loss_fn)
            self.losses.append(loss)
            if warmup:
                self.warmup_steps += 1
            else:
                self.timed.append(seconds)
            out.append({"loss": loss, "seconds": seconds})
        return out

    def _hash_batch(self, batch) -> None:
        """Hashes the batch's images and labels, proving that every arm trained on the same data.

        A cached arm receives features, so its images are looked up in the dataset by index.
        """
        inputs, labels, indices, kind = batch
        if kind == "features":
            inputs = torch.stack([self.run.data.train[int(i)][0] for i in indices])
        for t in (inputs, labels):
            self._batch_hash.update(t.contiguous().numpy())

    def finish(self) -> dict:
        """Checks freeze integrity and summarises timing, memory, optimizer state and loss."""
        run = self.run
        after = fingerprint(run.model, run.plan)
        changed = sorted(k for k in run.frozen_before if after.get(k) != run.frozen_before[k])
        timing = timing_stats(self.timed, self.config.data.batch_size)
        return {
            "timing": {**timing, "warmup_steps": self.warmup_steps, "step_times_s": list(self.timed)},
            "memory": self._memory(),
            "optimizer_state_bytes": optimizer_state_bytes(run.optimizer),
            "loss": {"first": self.losses[0] if self.losses else None,
                     "last": self.losses[-1] if self.losses else None},
            "losses": list(self.losses),
            "frozen_batchnorm_drift": batchnorm_drift(self._bn_before, frozen_layer_batchnorm_state(run.model)),
            "steps": len(self.losses),
            "batches_sha256": self._batch_hash.hexdigest(),
            "freeze_integrity": {
                "ok": not changed,
                "tensors_checked": len(after),
                "changed": changed,
                "sha256_before": combined_sha256(run.frozen_before),
                "sha256_after": combined_sha256(after),
            },
        }

    def _start_memory_window(self) -> dict:
        device = self.run.device
        if not self.measure_memory:
            return {}
        if device.type == "cuda":
            reset_peak_memory(device)
            return {"allocated_before_bytes": int(torch.cuda.memory_allocated(device))}
        # Setup (building synthetic data, the FLOP count's model copy) peaks above the steady
        # state; resetting the high-water mark keeps that out of the arm's training peak.
        reset = reset_peak_rss()
        return {"rss_before_bytes": current_rss_bytes(), "peak_reset": reset}

    def _memory(self) -> dict:
        device = self.run.device
        if not self.measure_memory:
            return {"peak_bytes": None, "kind": "not measured (arms share one process)"}
        if device.type == "cuda":
            return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated",
                    **self._memory_start}
        peak = high_water_rss_bytes()
        before = self._memory_start["rss_before_bytes"]
        return {"peak_bytes": max(0, peak - before), "kind": "cpu_peak_rss_growth",
                "peak_rss_bytes": peak, **self._memory_start}


def frozen_layer_batchnorm_state(model: nn.Module) -> dict[str, str]:
    """sha256 of the running statistics of every BatchNorm whose own parameters are all frozen.

    Under ``batchnorm: frozen`` these never change; a plain loop (BatchNorm in train mode) keeps
    updating them even though ``requires_grad`` is False, which changes what the frozen layers compute.
    """
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not any(p.requires_grad for p in m.parameters()):
            for buf in ("running_mean", "running_var"):
                t = getattr(m, buf, None)
                if t is not None:
                    out[f"{name}.{buf}"] = tensor_sha256(t)
    return out


def batchnorm_drift(before: dict[str, str], after: dict[str, str]) -> dict:
    """How many frozen layers' BatchNorm statistics changed between two :func:`frozen_layer_batchnorm_state`."""
    changed = sorted({k.rsplit(".", 1)[0] for k, h in before.items() if after.get(k) != h})
    return {"layers_checked": len({k.rsplit(".", 1)[0] for k in before}), "layers_changed": len(changed),
            "changed": changed[:5]}


def _batches(run: Run) -> Iterator:
    """Training batches in the recipe's own order (seeded per epoch), epoch after epoch."""
    epoch = 0
    while True:
        yield from epoch_batches(run, epoch)
        epoch += 1


def reset_peak_rss() -> bool:
    """Resets this process's peak RSS (Linux ``clear_refs``); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water_rss_bytes() -> int:
    """Peak RSS since the last :func:`reset_peak_rss` (``VmHWM``), else the lifetime peak."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(r"^VmHWM:\s+(\d+)\s+kB", f.read(), re.MULTILINE)
        if match:
            return int(match.group(1)) * 1024
    except OSError:
        pass
    return peak_rss_bytes()


# --------------------------------------------------------------------------------------------
# Driving arms: in this process, or each in its own worker process


class InlineArm:
    """Runs an :class:`ArmRunner` in this process (no per-arm memory figure)."""

    def __init__(self, config: Config, spec: ArmSpec):
        self.spec = spec
        self._runner = ArmRunner(config, spec, measure_memory=False)
        self._pending = None

    def submit(self, command: str, *args) -> None:
        """Runs a command now; its answer is returned by :meth:`wait`."""
        self._pending = getattr(self._runner, command)(*args)

    def wait(self):
        """Returns the answer to the last command."""
        return self._pending

    def close(self) -> None:
        """Nothing to release."""


class ProcessArm:
    """Runs an :class:`ArmRunner` in a worker process (``python -m freezetune.compare.worker``), one command at a time.

    The worker is a fresh interpreter started with :mod:`subprocess` rather than
    :mod:`multiprocessing`, whose spawn start method re-imports the caller's ``__main__`` and so
    fails in scripts without an ``if __name__ == "__main__"`` guard. Commands and answers are
    pickled over a socket pair, leaving the worker's stdout and stderr free for libraries.
    """

    def __init__(self, config: Config, spec: ArmSpec):
        self.spec = spec
        parent, child = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "freezetune.compare.worker", str(child.fileno())],
                pass_fds=(child.fileno(),), stdin=subprocess.DEVNULL,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        self._conn = Connection(parent.detach())
        self._conn.send(("init", ({"config": config.to_dict(), "spec": asdict(spec)},)))

    def submit(self, command: str, *args) -> None:
        """Sends a command without waiting, so several workers can set up at once."""
        self._conn.send((command, args))

    def wait(self):
        """Returns the worker's answer, re-raising its error here.

        Raises:
            FreezetuneError: The worker hit a user error (same class and message).
            RuntimeError: The worker failed otherwise, or died.
        """
        try:
            status, payload = self._conn.recv()
        except (EOFError, ConnectionError):
            code = self._proc.wait(5)
            raise RuntimeError(
                f"arm {self.spec.name}: worker process died (exit code {code}); out of memory?"
            ) from None
        if status == "ok":
            return payload
        if status == "user_error":
            cls = getattr(errors, payload["type"], errors.FreezetuneError)
            raise cls(payload["message"])
        raise RuntimeError(f"arm {self.spec.name}: worker failed:\n{payload['traceback']}")

    def close(self) -> None:
        """Lets the worker exit, and stops it if it does not."""
        with contextlib.suppress(OSError):
            self._conn.close()
        try:
            self._proc.wait(_JOIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()


def worker_main(conn) -> None:
    """Entry point of a worker process: builds an :class:`ArmRunner` and serves its commands."""
    runner = None
    try:
        command, args = conn.recv()
        if command != "init":
            raise RuntimeError(f"worker expected init, got {command!r}")
        (init,) = args
        runner = ArmRunner(Config.model_validate(init["config"]), ArmSpec(**init["spec"]), measure_memory=True)
        while True:
            command, args = conn.recv()
            conn.send(("ok", getattr(runner, command)(*args)))
            if command == "finish":
                return
    except EOFError:
        return  # the parent went away; nothing to report to
    except errors.FreezetuneError as e:
        _send_quietly(conn, ("user_error", {"type": type(e).__name__, "message": str(e)}))
    except BaseException:  # report anything, including KeyboardInterrupt, rather than die silently
        _send_quietly(conn, ("error", {"traceback": traceback.format_exc()}))
    finally:
        conn.close()


def _send_quietly(conn, message) -> None:
    with contextlib.suppress(OSError, BrokenPipeError):
        conn.send(message)


if __name__ == "__main__":
    worker_main(Connection(int(sys.argv[1])))
