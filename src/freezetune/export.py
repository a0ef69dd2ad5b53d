"""``freezetune export``: a run's base weights merged with its trainable-only checkpoint.

The checkpoint format itself (what is saved, the base hash, merging) is
:mod:`freezetune.training.trainable`; this module rebuilds the base a run started from and
writes the merged weights as one ``.safetensors`` file (:func:`export_run`), or the folded
eval-mode network as ONNX, checked with onnxruntime before it is written (:func:`export_onnx`).
A LoRA run's adapters are merged into the weights for both; :func:`export_peft` writes them in
peft's own adapter format instead.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from freezetune import __version__
from freezetune.atomic import TEMP_SUFFIX, atomic_write, write_error
from freezetune.errors import FreezetuneError, MissingExtraError, RunDirError, WeightsError, first_line
from freezetune.freezing.plan import apply_freeze
from freezetune.lock import hold
from freezetune.models.catalog import stages
from freezetune.models.lora import has_lora, lora_layers, merge_lora, require_peft, save_peft_adapter
from freezetune.models.weights import LoadedModel, build_model
from freezetune.training.run_dir import RunDir
from freezetune.training.trainable import META_KEY, Trainable, load_trainable, merge


def rebuild_base(run_dir: str | Path, trainable: Trainable, base: str | Path | None = None):
    """Rebuilds a run's starting model from its config, or from a given weights file.

    Mirrors :func:`freezetune.training.recipe.setup`: seed, then build the model, so a random-init base comes
    back bit for bit. The global torch RNG is left as it was.

    Returns:
        The :class:`freezetune.models.weights.LoadedModel`.

    Raises:
        RunDirError: If the run folder has no config.yaml.
        WeightsError: If the weights cannot be had or do not fit.
    """
    cfg = RunDir(run_dir).config()
    if base is not None:
        weights = str(base)
        if not weights.endswith((".pth", ".pt", ".safetensors")):
            raise WeightsError(f"--base {weights}: expected a .pth, .pt or .safetensors file")
    else:
        source = trainable.manifest.get("weights_source", "random-init")
        weights = "none" if source == "random-init" else source
    model_cfg = cfg.model.model_copy(update={"weights": weights})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        loaded = build_model(model_cfg)
        if cfg.adapt.method == "lora":  # the adapters' names, as the run's checkpoint has them
            apply_freeze(loaded.model, cfg.freeze, cfg.model.name, cfg.adapt)
        return loaded


def export_run(
    run_dir: str | Path, out: str | Path, base: str | Path | None = None, overwrite: bool = False
) -> dict:
    """Merges a run's base weights with its trainable checkpoint and writes full weights.

    The result loads with ``model.weights: <out>``.

    Args:
        run_dir: The run folder.
        out: Destination ``.safetensors`` file.
        base: Weights file to use as the base instead of rebuilding it from the run's config.
        overwrite: Whether an existing ``out`` may be replaced.

    Returns:
        ``{"out", "bytes", "step", "base", "trainable_bytes", "tensors_from_checkpoint"}``.

    Raises:
        WeightsError: If the base does not match the checkpoint.
        RunDirError: If ``out`` exists (without ``overwrite``) or its folder does not.
        FolderLockedError: If another process writes ``out``'s folder (a run still training there).
        WriteError: If ``out`` cannot be written; no partial file is left.
    """
    from safetensors.torch import save

    out = Path(out)
    _check_out(out, ".safetensors", overwrite)
    merged, trainable, loaded = merged_state(run_dir, base)
    if has_lora(loaded.model):  # the adapters folded into the convolutions: plain names, no peft needed
        model = loaded.model.cpu().float()
        model.load_state_dict(merged)
        merged = merge_lora(model).state_dict()
    meta = _export_meta(run_dir, trainable, loaded)
    m = trainable.manifest
    data = save({n: t.contiguous() for n, t in merged.items()}, metadata={META_KEY: json.dumps(meta)})
    with hold(out.parent, "export", create=False):  # e.g. a run folder another process still trains into
        atomic_write(out, lambda f: f.write(data))
    return {"out": str(out), "bytes": len(data), "step": m["step"], "base": loaded.weights_source,
            "trainable_bytes": trainable.path.stat().st_size,
            "tensors_from_checkpoint": len(trainable.tensors)}


# --------------------------------------------------------------------------------------------
# ONNX

ONNX_INPUT, ONNX_OUTPUT = "images", "logits"
# The check: onnxruntime's logits must equal PyTorch's (the unfolded eval-mode model) within
# |onnx - torch| <= ONNX_ATOL + ONNX_RTOL * |torch|, elementwise (numpy.allclose's rule).
ONNX_ATOL = 1e-4
ONNX_RTOL = 1e-4
CHECK_BATCHES = (1, 3)
# The batch size the exporter traces with: not 1, so that it does not specialise the batch dimension.
_TRACE_BATCH = 2
# Weights beyond this go to an external data file beside the .onnx: protobuf refuses messages over 2 GiB.
EXTERNAL_DATA_BYTES = 1 << 30
_ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")


class ExportError(FreezetuneError):
    """A run cannot be exported in the format asked for (missing extra, unexportable model, failed check)."""


def require_onnx() -> None:
    """Checks that the ``onnx`` extra is installed.

    Raises:
        MissingExtraError: Naming the missing packages and the install command.
    """
    missing = []
    for name in _ONNX_PACKAGES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        why = "is not installed" if len(missing) == 1 else "are not installed"
        raise MissingExtraError.of("--format onnx", ", ".join(missing), "onnx", why)


def export_onnx(run_dir: str | Path, out: str | Path, base: str | Path | None = None, overwrite: bool = False,
                atol: float = ONNX_ATOL, rtol: float = ONNX_RTOL) -> dict:
    """Exports a run's fine-tuned model to ONNX with torch's exporter, and checks it with onnxruntime.

    The model is the merged network (as :func:`export_run` writes it) in eval mode, with every
    Conv+BatchNorm pair that torch.fx finds folded into one convolution; its input is
    ``images: float32[batch, 3, S, S]`` (``S = data.image_size``, batch dynamic, normalized as in
    training) and its output ``logits: float32[batch, num_classes]``. Before anything is written
    the file passes ``onnx.checker`` and onnxruntime (CPU) runs it at batch sizes
    :data:`CHECK_BATCHES`: its logits must match the unfolded PyTorch model's within
    ``atol + rtol * |logit|``. A failed check writes nothing.

    Args:
        run_dir: The run folder.
        out: Destination ``.onnx`` file (written atomically; with an ``.onnx.data`` file beside it
            when the weights exceed :data:`EXTERNAL_DATA_BYTES`).
        base: Weights file to use as the base instead of rebuilding it from the run's config.
        overwrite: Whether an existing ``out`` may be replaced.
        atol: Absolute tolerance of the check.
        rtol: Relative tolerance of the check.

    Returns:
        What was written and checked: ``out``, ``bytes``, ``data_file``, ``model``, ``step``,
        ``base``, ``input``, ``opset``, ``fold`` and ``check``.

    Raises:
        MissingExtraError: If the onnx extra is missing.
        ExportError: If the exporter fails, or the check fails.
        RunDirError: If ``out`` is not a writable new ``.onnx`` path (or ``overwrite`` is off).
        WeightsError: If the base does not match the checkpoint.
    """
    out = Path(out)
    data_file = out.with_name(out.name + ".data")
    _check_out(out, ".onnx", overwrite, data_file)
    require_onnx()
    model, meta = merged_model(run_dir, base)
    if has_lora(model):
        merge_lora(model)  # one convolution per adapted layer: the graph ONNX gets is the plain network
    size = RunDir(run_dir).config().data.image_size
    inputs = check_inputs(size)
    with torch.no_grad():
        expected = [model(x).numpy() for x in inputs]  # the unfolded eval-mode model is the reference
    folded, fold = fold_for_inference(model)
    start = time.perf_counter()
    program = _onnx_program(folded, size, meta["model"])
    proto = program.model_proto
    _add_metadata(proto, meta, size)
    external = _weight_bytes(folded) > EXTERNAL_DATA_BYTES
    writer = _write_external if external else _write_single
    with hold(out.parent, "export", create=False):
        written, check = writer(program, proto, out, inputs, expected, atol, rtol)
    return {"out": str(out), "bytes": written, "data_file": str(data_file) if external else None,
            "model": meta["model"], "num_classes": meta["num_classes"], "step": meta["step"],
            "base": meta["base"], "input": [None, 3, size, size], "opset": _opset(proto),
            "fold": {**fold, "onnx_batchnorm_ops": _count_ops(proto, "BatchNormalization")},
            "check": check, "seconds": time.perf_counter() - start}


def export_peft(run_dir: str | Path, out: str | Path, base: str | Path | None = None,
                overwrite: bool = False) -> dict:
    """Writes a LoRA run's adapter in peft's format (``adapter_model.safetensors``, ``adapter_config.json``).

    ``peft.PeftModel.from_pretrained(model, out)`` on the run's base model (its architecture with
    ``num_classes`` outputs and the weights it started from) gives the fine-tuned model back: the
    adapters, and the head as a module trained whole (``modules_to_save``).

    Args:
        run_dir: The folder of a run with ``adapt.method: lora``.
        out: The folder to write (it must not exist, unless ``overwrite``).
        base: Weights file to use as the base instead of rebuilding it from the run's config.
        overwrite: Whether an existing ``out`` may be replaced.

    Returns:
        ``{"out", "bytes", "tensors", "step", "base", "rank", "targets"}``.

    Raises:
        ExportError: If the run trained no adapters.
        MissingExtraError: If peft is not installed.
        RunDirError: If ``out`` exists (without ``overwrite``) or its folder does not.
        WeightsError: If the base does not match the checkpoint.
    """
    out = Path(out)
    cfg = RunDir(run_dir).config()
    if cfg.adapt.method != "lora":
        raise ExportError(f"{run_dir}: --format peft writes LoRA adapters, and this run trained none "
                          f"(adapt.method: {cfg.adapt.method}); use safetensors or onnx")
    require_peft("--format peft")
    if out.exists() and not overwrite:
        raise RunDirError(f"--out {out}: already exists; choose another path or pass --overwrite")
    if not out.parent.is_dir():
        raise RunDirError(f"--out {out}: folder {out.parent} does not exist")
    model, meta = merged_model(run_dir, base)
    fresh = rebuild_base(run_dir, load_trainable(run_dir), base).model
    merge_lora(fresh)  # untrained adapters (B = 0) folded away: the plain base model
    head = list(stages(cfg.model.name)["head"])
    with hold(out.parent, "export", create=False), tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        staged = Path(tmp) / out.name
        tensors = save_peft_adapter(model, fresh, cfg.adapt.lora, head, staged)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staged, out)
    size = sum(f.stat().st_size for f in out.iterdir())
    return {"out": str(out), "bytes": size, "tensors": tensors, "step": meta["step"], "base": meta["base"],
            "rank": cfg.adapt.lora.rank, "targets": len(lora_layers(model))}


def merged_state(run_dir: str | Path, base: str | Path | None = None,
                 trainable_file: str | Path | None = None) -> tuple[dict, Trainable, LoadedModel]:
    """A run's base (rebuilt, or ``base``) merged with its trainable checkpoint, as a state dict.

    Args:
        run_dir: The run folder.
        base: Weights file to use as the base instead of rebuilding it from the run's config.
        trainable_file: A trainable-only checkpoint other than the run folder's own.

    Returns:
        The merged state dict, the trainable checkpoint, and the rebuilt base model.

    Raises:
        RunDirError: If the folder holds no run.
        WeightsError: If the base does not match the checkpoint.
    """
    trainable = load_trainable(trainable_file if trainable_file is not None else run_dir)
    loaded = rebuild_base(run_dir, trainable, base)
    return merge(loaded.model.state_dict(), trainable, f"base {loaded.weights_source}"), trainable, loaded


def merged_model(run_dir: str | Path, base: str | Path | None = None,
                 trainable_file: str | Path | None = None) -> tuple[nn.Module, dict]:
    """A run's fine-tuned network on the CPU in eval mode (:func:`merged_state` loaded into the base).

    Returns:
        The model and ``{"model", "num_classes", "step", "exported_from", "base"}``.

    Raises:
        RunDirError: If the folder holds no run.
        WeightsError: If the base does not match the checkpoint.
    """
    merged, trainable, loaded = merged_state(run_dir, base, trainable_file)
    model = loaded.model.cpu().float()
    model.load_state_dict(merged)
    return model.eval(), _export_meta(run_dir, trainable, loaded)


def _export_meta(run_dir: str | Path, trainable: Trainable, loaded: LoadedModel) -> dict:
    """What an exported file says about itself: model, classes, step, the run and the base."""
    m = trainable.manifest
    return {"model": m["model"], "num_classes": m["num_classes"], "step": m["step"],
            "exported_from": str(run_dir), "base": loaded.weights_source}


def check_inputs(image_size: int) -> list[torch.Tensor]:
    """The check's inputs: one seeded batch per size in :data:`CHECK_BATCHES`, scaled like normalized images."""
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(b, 3, image_size, image_size, generator=gen) for b in CHECK_BATCHES]


def fold_for_inference(model: nn.Module) -> tuple[nn.Module, dict]:
    """Folds every BatchNorm that directly follows a convolution (or linear layer) into it, in eval mode.

    Uses ``torch.fx.experimental.optimization.fuse``, which finds the pairs in the traced graph
    of any architecture (a BatchNorm whose input is used elsewhere too is left as it is), unlike
    :func:`freezetune.speed.prefix.fold_batchnorm`, which knows ResNet's module names only. The
    model is modified in place. A model that torch.fx cannot trace is exported unfolded:
    torch's ONNX exporter still folds constant Conv+BatchNorm pairs in its own graph optimizer,
    and ``onnx_batchnorm_ops`` in the result says how many were left.

    Returns:
        The folded model, and ``{"method", "batchnorm_before", "batchnorm_folded", "note"}``.
    """
    from torch.fx.experimental.optimization import fuse

    before = _count_batchnorm(model)
    if before == 0:
        return model, {"method": "none", "batchnorm_before": 0, "batchnorm_folded": 0, "note": "no BatchNorm"}
    try:
        folded = fuse(model, inplace=True)
    except Exception as e:  # noqa: BLE001 - symbolic tracing fails in many ways; all mean "not traceable"
        note = f"torch.fx cannot trace it ({first_line(e)})"
        return model, {"method": "none", "batchnorm_before": before, "batchnorm_folded": 0, "note": note}
    left = _count_batchnorm(folded)
    note = f"{left} BatchNorm not after a convolution or linear layer, kept" if left else ""
    return folded.eval(), {"method": "torch.fx", "batchnorm_before": before, "batchnorm_folded": before - left,
                           "note": note}


def compare_logits(got: list, expected: list, atol: float, rtol: float) -> dict:
    """Compares onnxruntime's logits with PyTorch's, batch by batch.

    Returns:
        ``{"batches", "max_abs_diff", "max_abs_logit", "atol", "rtol", "ok", "worst_batch"}``.
    """
    import numpy as np

    diffs, worst, ok = [], None, True
    for g, e in zip(got, expected, strict=True):
        if g.shape != e.shape:
            return {"batches": list(CHECK_BATCHES), "max_abs_diff": float("inf"), "max_abs_logit": None,
                    "atol": atol, "rtol": rtol, "ok": False, "worst_batch": e.shape[0],
                    "why": f"output shape {tuple(g.shape)}, expected {tuple(e.shape)}"}
        diff = np.abs(g.astype(np.float64) - e.astype(np.float64))
        diffs.append(float(diff.max()))
        if not (diff <= atol + rtol * np.abs(e)).all() and ok:
            ok, worst = False, e.shape[0]
    return {"batches": list(CHECK_BATCHES), "max_abs_diff": max(diffs),
            "max_abs_logit": float(max(np.abs(e).max() for e in expected)), "atol": atol, "rtol": rtol,
            "ok": ok, "worst_batch": worst}


def run_onnxruntime(model: bytes | str, inputs: list[torch.Tensor]) -> list:
    """Runs an ONNX model (serialized, or a path) on the CPU with onnxruntime; one output array per input."""
    import onnxruntime as ort

    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return [session.run(None, {name: x.numpy()})[0] for x in inputs]


def _check_out(out: Path, suffix: str, overwrite: bool, *also: Path) -> None:
    """Refuses a destination with the wrong suffix, one that exists (without ``overwrite``) or a missing folder."""
    if out.suffix != suffix:
        raise RunDirError(f"--out {out}: must end with {suffix}")
    for path in (out, *also):
        if path.exists() and not overwrite:
            what = "already exists" if path == out else f"{path} already exists"
            raise RunDirError(f"--out {out}: {what}; choose another path or pass --overwrite")
    if not out.parent.is_dir():
        raise RunDirError(f"--out {out}: folder {out.parent} does not exist")


def _onnx_program(model: nn.Module, size: int, name: str):
    """torch.onnx's (dynamo) export of ``model`` with a dynamic batch dimension."""
    example = torch.zeros(_TRACE_BATCH, 3, size, size)
    batch = torch.export.Dim("batch", min=1)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the exporter's deprecation and tracing chatter
            return torch.onnx.export(model, (example,), dynamo=True, dynamic_shapes=({0: batch},),
                                     input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
                                     external_data=False, verbose=False, optimize=True)
    except Exception as e:  # noqa: BLE001 - the exporter's failures have no common base class
        raise ExportError(f"{name}: torch.onnx.export failed ({first_line(e)}); --debug shows why") from e


def _write_single(program, proto, out: Path, inputs, expected, atol, rtol) -> tuple[int, dict]:
    """Checks the serialized model in memory, then writes it atomically: a failed check writes nothing."""
    import onnx

    data = proto.SerializeToString()
    onnx.checker.check_model(data, full_check=True)
    check = _checked(run_onnxruntime(data, inputs), expected, atol, rtol, out)
    atomic_write(out, lambda f: f.write(data))
    return len(data), check


def _write_external(program, proto, out: Path, inputs, expected, atol, rtol) -> tuple[int, dict]:
    """Saves, checks and renames a model whose weights go to an external data file beside ``out``.

    Both files are saved into a temp folder beside ``out``, checked there, then renamed into place
    (the data first, so the new .onnx never points at missing data); the temp folder goes in every case.
    """
    import onnx

    try:
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=TEMP_SUFFIX))
    except OSError as e:
        raise write_error(out, e) from e
    try:
        staged = tmp / out.name
        program.save(str(staged), external_data=True)
        onnx.checker.check_model(str(staged), full_check=True)
        check = _checked(run_onnxruntime(str(staged), inputs), expected, atol, rtol, out)
        data = staged.with_name(staged.name + ".data")
        written = staged.stat().st_size + data.stat().st_size
        os.replace(data, out.with_name(data.name))
        os.replace(staged, out)
        return written, check
    except OSError as e:
        raise write_error(out, e) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _checked(got: list, expected: list, atol: float, rtol: float, out: Path) -> dict:
    """The comparison's result; raises if it failed."""
    check = compare_logits(got, expected, atol, rtol)
    if not check["ok"]:
        detail = check.get("why") or (f"max |diff| {check['max_abs_diff']:.3g} over logits up to "
                                      f"{check['max_abs_logit']:.3g}")
        raise ExportError(f"--out {out}: onnxruntime's logits differ from PyTorch's at batch {check['worst_batch']} "
                          f"({detail}; tolerance {atol:g} + {rtol:g}*|logit|); nothing written")
    import onnxruntime

    return {**check, "runtime": f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)"}


def _add_metadata(proto, meta: dict, size: int) -> None:
    """What the file is, for whoever loads it: the run it came from and how inputs are normalized."""
    from freezetune.training.data import IMAGENET_MEAN, IMAGENET_STD

    info = {**meta, "input": f"{ONNX_INPUT}: float32[batch, 3, {size}, {size}], RGB in [0, 1] then "
                              "(x - mean) / std per channel", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(info)
    proto.producer_name = f"freezetune {__version__} (torch {torch.__version__})"


def _count_batchnorm(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _count_ops(proto, op_type: str) -> int:
    return sum(node.op_type == op_type for node in proto.graph.node)


def _opset(proto) -> int | None:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)


def _weight_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))

