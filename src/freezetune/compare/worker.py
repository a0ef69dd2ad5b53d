"""One arm of a comparison: a :class:`~freezetune.training.recipe.Recipe` trained a block of steps at a time.

An arm trains through the same recipe as ``freezetune train`` (its learning-rate schedule, gradual
unfreezing and execution path included), pulling steps from :meth:`Recipe.loop`. It either runs
in this process (:class:`InlineArm`) or in its own worker process (:class:`ProcessArm`), driven
over a socket. Only a worker process makes an arm's memory figure its own: on CPU the peak resident
set size can only be attributed to one arm if nothing else shares the process.

On Linux workers are forked from a server that has imported torch and never run it (see
:mod:`freezetune.compare.forkserver`; elsewhere they are fresh interpreters), never from the
process that drives them: forking a process whose OpenMP thread pool already ran can deadlock, and
the server gives every arm the same clean starting RSS.

The protocol between the parent and an arm is :class:`ArmProtocol`: ``setup``, ``fill`` (cached
arms), ``steps`` and ``finish``, in that order, each answered before the next is sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import traceback
from collections.abc import Iterator
from dataclasses import asdict
from typing import Protocol

import torch

from freezetune import errors
from freezetune.compare.arms import ArmSpec
from freezetune.compare.forkserver import ForkServer, FreshWorkers
from freezetune.config import Config
from freezetune.freezing.integrity import (
    batchnorm_drift,
    combined_sha256,
    frozen_layer_batchnorm_state,
    tensor_sha256,
)
from freezetune.measure.device import device_description
from freezetune.measure.memory import (
    SavedActivations,
    current_rss_bytes,
    high_water_rss_bytes,
    memory_parts,
    reset_peak_memory,
    reset_peak_rss,
)
from freezetune.measure.timing import timing_stats
from freezetune.speed.prefix import training_step_flops
from freezetune.training.optim import optimizer_state_bytes
from freezetune.training.recipe import Recipe, StepRecord
from freezetune.training.state import StopReason
from freezetune.training.step import BatchSource

# How long the parent waits for a worker to exit after its last answer.
_JOIN_TIMEOUT_S = 30.0


class ArmProtocol(Protocol):
    """What the parent can ask of an arm; :class:`ArmRunner` implements it, workers serve it."""

    def setup(self, total_steps: int) -> dict:
        """Builds the arm; ``total_steps`` is every step it will run (warm-up included)."""

    def fill(self) -> dict:
        """Fills the feature cache (cached arms only)."""

    def steps(self, n: int, warmup: bool) -> list[dict]:
        """Trains ``n`` more steps."""

    def finish(self) -> dict:
        """Checks integrity and summarises the arm."""


COMMANDS = ("setup", "fill", "steps", "finish")


class ArmRunner:
    """Builds one arm's :class:`Recipe` and trains it on command.

    Args:
        config: The arm's complete config (freeze spec, weights file and output folder set).
        spec: The arm's identity.
        measure_memory: Whether this runner owns its process, so its memory figure is its own.
    """

    def __init__(self, config: Config, spec: ArmSpec, measure_memory: bool):
        self.config, self.spec, self.measure_memory = config, spec, measure_memory
        self.recipe: Recipe | None = None
        self.losses: list[float] = []
        self.timed: list[float] = []
        self.warmup_steps = 0
        self._events: Iterator | None = None
        self._batch_hash = hashlib.sha256()
        self._memory_start: dict = {}
        self._saved_bytes: int | None = None  # one step's saved activations (memory pass only)
        self._bn_before: dict[str, str] = {}

    def setup(self, total_steps: int) -> dict:
        """Builds model, freeze plan, optimizer and data; returns what is known before training."""
        recipe = self.recipe = Recipe(self.config, plain_baseline=self.spec.mode == "plain").setup()
        recipe.extend_to(total_steps)
        cfg = self.config
        cached = recipe.engine.execution.frozen_prefix if recipe.engine.cache is not None else None
        flops = training_step_flops(recipe.model, cfg, cached)
        state = {name: tensor_sha256(t) for name, t in recipe.model.state_dict().items()}
        self._bn_before = frozen_layer_batchnorm_state(recipe.model)
        self._events = recipe.loop()
        self._memory_start = self._start_memory_window()
        return {
            "params": {k: recipe.freeze.initial_params[k] for k in ("total", "trainable", "frozen", "trainable_pct")},
            "flops": flops,
            "initial_weights_sha256": combined_sha256(state),
            "device": device_description(recipe.device),
            "frozen_batchnorm_layers": len(recipe.plan.frozen_bn),
            "weights_source": recipe.loaded.weights_source,
            "execution": recipe.engine.speed(),
        }

    def fill(self) -> dict:
        """Fills the feature cache (cached arms only), so that every step after it reads features."""
        seconds = self.recipe.fill_cache()
        return {"cache_fill_s": seconds, "cache_bytes": self.recipe.engine.cache.nbytes}

    def steps(self, n: int, warmup: bool) -> list[dict]:
        """Trains ``n`` steps of the recipe's loop; returns each step's loss and synchronized wall time."""
        out = []
        for _ in range(n):
            record = self._counted_step() if self.measure_memory and self._saved_bytes is None else self._next_step()
            self._hash_batch(record)  # outside the timed step
            self.losses.append(record.loss)
            if warmup:
                self.warmup_steps += 1
            else:
                self.timed.append(record.step_time_s)
            out.append({"loss": record.loss, "seconds": record.step_time_s})
        return out

    def _counted_step(self) -> StepRecord:
        """A step whose saved activations are counted: what its backward keeps alive, weights aside."""
        with SavedActivations(self.recipe.model) as saved:
            record = self._next_step()
        self._saved_bytes = saved.nbytes
        return record

    def _next_step(self) -> StepRecord:
        for event in self._events:
            if isinstance(event, StepRecord):
                return event
        # extend_to() gave the loop every step the comparison asks for, so only a non-finite loss ends it.
        reason = self.recipe.stop_reason
        why = self.recipe.progress.nonfinite if reason is StopReason.NONFINITE else reason
        raise errors.NonFiniteLossError(f"arm {self.spec.name}: training stopped early ({why})")

    def _hash_batch(self, record: StepRecord) -> None:
        """Hashes the batch's images and labels, proving that every arm trained on the same data.

        A cached arm receives features, so its images are looked up in the dataset by index.
        """
        batch, inputs = record.batch, record.batch.inputs
        if batch.source is BatchSource.FEATURES:
            inputs = torch.stack([self.recipe.data.train[int(i)][0] for i in batch.indices])
        for t in (inputs, batch.labels):
            self._batch_hash.update(t.contiguous().numpy())

    def finish(self) -> dict:
        """Checks freeze integrity and summarises timing, memory, optimizer state and loss."""
        recipe = self.recipe
        ended = recipe.finish(summary=False)  # the arm writes no summary: the comparison's record is its own
        integrity = ended.integrity
        timing = timing_stats(self.timed, self.config.data.batch_size)
        return {
            "timing": {**timing, "warmup_steps": self.warmup_steps, "step_times_s": list(self.timed)},
            "memory": self._memory(),
            "optimizer_state_bytes": optimizer_state_bytes(recipe.optimizer),
            "loss": {"first": self.losses[0] if self.losses else None,
                     "last": self.losses[-1] if self.losses else None},
            "losses": list(self.losses),
            "frozen_batchnorm_drift": batchnorm_drift(self._bn_before, frozen_layer_batchnorm_state(recipe.model)),
            "steps": len(self.losses),
            "batches_sha256": self._batch_hash.hexdigest(),
            "freeze_integrity": {
                "ok": integrity["ok"],
                "tensors_checked": integrity["tensors_checked"],
                "changed": integrity["changed"],
                "sha256_before": ended.frozen_sha256_before,
                "sha256_after": integrity["sha256"],
            },
        }

    def _start_memory_window(self) -> dict:
        device = self.recipe.device
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
        device = self.recipe.device
        if not self.measure_memory:
            return {"peak_bytes": None, "kind": "not measured (arms share one process)"}
        parts = memory_parts(self.recipe.model, optimizer_state_bytes(self.recipe.optimizer), self._saved_bytes)
        if device.type == "cuda":
            return {"peak_bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated",
                    **self._memory_start, **parts}
        peak = high_water_rss_bytes()
        before = self._memory_start["rss_before_bytes"]
        return {"peak_bytes": max(0, peak - before), "kind": "cpu_peak_rss_growth",
                "peak_rss_bytes": peak, **self._memory_start, **parts}


def serve(runner: ArmRunner, command: str, args: tuple):
    """Runs one protocol command on a runner.

    Raises:
        RuntimeError: On a command that is not part of :class:`ArmProtocol`.
    """
    if command not in COMMANDS:
        raise RuntimeError(f"unknown arm command {command!r}; the protocol is {', '.join(COMMANDS)}")
    return getattr(runner, command)(*args)


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
        self._pending = serve(self._runner, command, args)

    def wait(self):
        """Returns the answer to the last command."""
        return self._pending

    def close(self) -> None:
        """Nothing to release."""


# A worker measures peak memory. On CPU that is the growth of the resident set, which with glibc's
# default allocator follows its heap, not what is alive: the adaptive mmap threshold moves freed
# blocks of up to 32 MiB into a heap that keeps them, so the same BatchNorm-only ResNet18 step at
# 224 px (batch 16) grew by 200 to 294 MiB from one process to the next. With a fixed threshold,
# every block over 128 KiB is mapped and unmapped on its own, and the growth is the live peak:
# 341.4 and 341.5 MiB in two processes. Other allocators ignore the variable.
MEMORY_WORKER_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def worker_env() -> dict[str, str]:
    """The environment of a memory worker: this process's, with a fixed mmap threshold unless one is set."""
    return {**MEMORY_WORKER_ENV, **os.environ}


class ProcessArm:
    """Runs an :class:`ArmRunner` in a worker process of its own, one command at a time.

    The worker is started by :func:`~freezetune.compare.forkserver.start_workers`' server (one
    per comparison, shared by its arms), which imported torch once for all of them. Commands and
    answers are pickled over a socket pair, leaving the worker's stdout and stderr free for
    libraries.
    """

    def __init__(self, config: Config, spec: ArmSpec, server: ForkServer | FreshWorkers):
        self.spec = spec
        self._server = server
        self._pid, self._conn = server.spawn()
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
            code = self._server.wait(self._pid, 5)
            raise RuntimeError(
                f"arm {self.spec.name}: worker process died (exit code {code}); out of memory?"
            ) from None
        if status == "ok":
            return payload
        if status == "user_error":
            # Every user-facing error class lives in freezetune.errors, so its type survives the trip.
            cls = getattr(errors, payload["type"], errors.FreezetuneError)
            raise cls(payload["message"])
        raise RuntimeError(f"arm {self.spec.name}: worker failed:\n{payload['traceback']}")

    def close(self) -> None:
        """Lets the worker exit, and stops it if it does not."""
        with contextlib.suppress(OSError):
            self._conn.close()
        with contextlib.suppress(RuntimeError):  # a dead server took its workers' exit codes with it
            if self._server.wait(self._pid, _JOIN_TIMEOUT_S) is None:
                self._server.kill(self._pid)


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
            conn.send(("ok", serve(runner, command, args)))
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
