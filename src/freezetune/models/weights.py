"""Building the network and loading its starting weights.

Weights come from torchvision's own cache and download (``imagenet``), a local file (``.pth``/``.pt``
loaded with ``weights_only=True``, or ``.safetensors``), or nowhere (``none``). ``auto`` prefers
ImageNet but never blocks an offline machine: it falls back to random init and says so loudly.

Any torchvision classification model can be built (see :mod:`freezetune.models.catalog` for their freeze
points); its classifier layer (ResNet ``fc``, MobileNet/EfficientNet/ConvNeXt ``classifier[-1]``,
ViT ``heads.head``) is replaced to give ``num_classes`` outputs.

``timm/<name>`` models are built by :mod:`freezetune.models.timm_models` (all of freezetune's timm
code) through ``timm.create_model``, with the same weights keywords and the same offline behaviour.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from freezetune.config import ModelConfig
from freezetune.errors import WeightsError, first_line
from freezetune.models import timm_models
from freezetune.models.catalog import (
    AUX_PREFIXES,
    build,
    check_image_size,
    check_model_name,
    head_layer,
    input_size_rule,
    meta_model,
    replace_head,
)
from freezetune.models.download import download_within
from freezetune.models.timm_models import is_timm_name

# How long ``weights: auto`` may spend trying to download before giving up on ImageNet.
AUTO_DOWNLOAD_TIMEOUT_S = 10.0

@dataclass
class LoadedModel:
    """A model plus where its weights came from.

    Attributes:
        model: The network, on the CPU.
        weights_source: ``imagenet``, ``random-init`` or the weights file path.
        notice: A warning for the user (e.g. ``auto`` fell back to random init), or None.
        head_replaced: Whether the classifier was swapped for ``num_classes`` outputs.
    """

    model: nn.Module
    weights_source: str
    notice: str | None = None
    head_replaced: bool = False


def build_model(cfg: ModelConfig) -> LoadedModel:
    """Creates the model and loads its weights as ``cfg.weights`` says.

    Args:
        cfg: The ``model`` section of the config.

    Returns:
        The model with weights loaded and the head sized for ``cfg.num_classes``.

    Raises:
        WeightsError: If the weights cannot be had or do not fit.
        ConfigError: For ``timm/<name>`` when timm is not installed or does not know the model.
    """
    if is_timm_name(cfg.name):
        return _build_timm(cfg)
    if cfg.weights not in ("none", "imagenet", "auto"):
        return _from_file(cfg)
    model = build(cfg.name)
    _guard_input_size(model, cfg.name)
    notice = None
    if cfg.weights == "none":
        source = "random-init"
    elif cfg.weights == "imagenet":
        _load_imagenet(model, imagenet_state_dict(cfg.name, allow_download=True))
        source = "imagenet"
    elif cfg.weights == "auto":
        try:
            state = imagenet_state_dict(cfg.name, allow_download=True, timeout=AUTO_DOWNLOAD_TIMEOUT_S, quiet=True)
            _load_imagenet(model, state)
            source = "imagenet"
        except WeightsError as e:
            source = "random-init"
            notice = _random_init_notice(e)
    head_replaced = replace_head(model, cfg.num_classes)
    return LoadedModel(model, source, notice, head_replaced)


def _from_file(cfg: ModelConfig) -> LoadedModel:
    """The model with its weights from a file; only a head the file does not hold is initialised.

    Every other tensor comes from the file, so the model is built on the meta device and given
    memory without initialising it: random init of a ResNet18 costs more than loading it (a
    seventh of a second here, paid by every run of a sweep). A model with tensors that are not
    in a state dict (non-persistent buffers, computed at build time) is built as usual.
    """
    state = read_weights_file(cfg.weights)
    model = meta_model(cfg.name)
    if set(dict(model.named_buffers())) - set(model.state_dict()):
        model = build(cfg.name)
    else:
        model = model.to_empty(device="cpu")
    _guard_input_size(model, cfg.name)
    _, built_head = head_layer(model)
    head_replaced = _fit_head(model, state, cfg.num_classes)
    _load_state(model, state, cfg.weights)
    name, head = head_layer(model)
    if head is built_head and f"{name}.weight" not in state:
        head.reset_parameters()  # neither loaded nor replaced by a fresh one: give it its init
    return LoadedModel(model, str(cfg.weights), None, head_replaced)


def _random_init_notice(e: WeightsError) -> str:
    return (
        f"ImageNet weights unavailable ({e}); training from RANDOM INIT. "
        "Frozen random layers make a poor feature extractor: use weights: imagenet "
        "or a weights file for real fine-tuning."
    )


def _build_timm(cfg: ModelConfig) -> LoadedModel:
    """``build_model`` for ``timm/<name>``: every path goes through ``timm.create_model``."""
    check_model_name(cfg.name)
    notice = None
    if cfg.weights == "none":
        model, source, replaced = timm_models.create(cfg.name, cfg.num_classes), "random-init", False
    elif cfg.weights in ("imagenet", "auto"):
        try:
            if cfg.weights == "imagenet":
                path = timm_models.imagenet_file(cfg.name, allow_download=True)
            else:
                path = timm_models.imagenet_file(cfg.name, allow_download=True, timeout=AUTO_DOWNLOAD_TIMEOUT_S,
                                                 quiet=True)
            model = timm_models.create(cfg.name, cfg.num_classes, weights_file=path)
            source = "imagenet"
            replaced = timm_models.pretrained_cfg(cfg.name).get("num_classes") != cfg.num_classes
        except WeightsError as e:
            if cfg.weights == "imagenet":
                raise
            model, source, replaced = timm_models.create(cfg.name, cfg.num_classes), "random-init", False
            notice = _random_init_notice(e)
    else:
        state = read_weights_file(cfg.weights)  # refuses pickled code and non-state-dicts in one line
        rows = timm_models.file_head_rows(cfg.name, state)
        model = timm_models.create(cfg.name, rows or cfg.num_classes, weights_file=cfg.weights, file_classes=rows)
        if rows is None:
            _check_backbone_keys(model, state, cfg.weights)
        replaced = replace_head(model, cfg.num_classes) or rows is None
        source = str(cfg.weights)
    _guard_input_size(model, cfg.name)
    return LoadedModel(model, source, notice, replaced)


def _check_backbone_keys(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """A head-less file was loaded non-strictly by timm: every other key must have been in it."""
    head_name, _ = head_layer(model)
    missing = [k for k in model.state_dict() if k not in state and not k.startswith(f"{head_name}.")]
    if missing:
        raise WeightsError(f"{source}: weights do not fit the model; missing keys: {_few(missing)}")


def _load_imagenet(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    _load_state(model, state, "imagenet")
    if hasattr(model, "transform_input"):
        # GoogLeNet/Inception: torchvision's ImageNet weights expect its input re-normalisation.
        model.transform_input = True


class InputSizeCheck:
    """Forward pre-hook: a one-line config error instead of a shape error deep inside the model.

    ViT (position embeddings) and MaxViT (window partitions) accept one image size; AlexNet and
    Inception-v3 have a minimum. See :func:`freezetune.models.catalog.check_image_size`.
    """

    def __init__(self, name: str):
        self.name = name

    def __call__(self, module: nn.Module, args: tuple) -> None:
        """Raises ConfigError if the batch's images do not have a size the model accepts."""
        h, w = args[0].shape[-2:]
        check_image_size(self.name, h, w)


def _guard_input_size(model: nn.Module, name: str) -> None:
    if input_size_rule(name) != (None, None):
        model.register_forward_pre_hook(InputSizeCheck(name))


def imagenet_state_dict(name: str, allow_download: bool, timeout: float | None = None, quiet: bool = False) -> dict:
    """Fetches torchvision's published ImageNet weights through torchvision's cache.

    For ``timm/<name>``, timm's default pretrained weights through timm's hub cache.

    Args:
        name: torchvision model name, e.g. ``resnet18``, or ``timm/<name>``.
        allow_download: Whether to download when the file is not in the cache.
        timeout: Socket timeout for the download, in seconds.
        quiet: Keep torch.hub's "Downloading: ..." line (stdout) and progress bar (stderr) off the
            terminal (``weights: auto`` tries quietly; when it cannot download, its notice says so).

    Returns:
        The state dict.

    Raises:
        WeightsError: With instructions for placing the file by hand when it cannot be had.
    """
    if is_timm_name(name):
        return timm_models.load_file(timm_models.imagenet_file(name, allow_download, timeout, quiet))
    weights = torchvision.models.get_model_weights(name).DEFAULT
    filename = os.path.basename(weights.url)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if cached.exists():
        return safe_torch_load(cached)
    how = (
        f"download {weights.url} and place it at {cached} (or set TORCH_HOME), "
        "or set model.weights to a .pth/.safetensors path, or to none"
    )
    if not allow_download or os.environ.get("FREEZETUNE_OFFLINE"):
        raise WeightsError(f"{filename} is not in torchvision's cache; {how}")
    return download_within(lambda progress: weights.get_state_dict(progress=progress, check_hash=True),
                           timeout, quiet, filename, how)


def read_weights_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Reads a state dict from ``.safetensors`` or, without unpickling code, ``.pth``/``.pt``.

    Raises:
        WeightsError: If the file is missing or is not a safe state dict of tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise WeightsError(f"{path}: not a valid safetensors file ({first_line(e)})") from None
    else:
        state = safe_torch_load(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = checkpoint_model_state(state, path)  # a freezetune checkpoint.pt (and its base file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: not a state dict (expected a mapping of names to tensors)")
    return state


# checkpoint.pt's formats. They are written by freezetune.training.checkpoint; they are named here
# because a checkpoint.pt is also a weights file (model.weights), and this layer may not import
# training. No "format" key: the first format, whose "model" is the full state dict.
CHECKPOINT_FORMAT = "freezetune-checkpoint/2"
BASE_FORMAT = "freezetune-base/1"
BASE_META_KEY = "freezetune"


def checkpoint_model_state(ckpt: dict, path: str | Path,
                           digest: Callable[[dict], str] | None = None) -> dict[str, torch.Tensor]:
    """The full state dict of a loaded freezetune ``checkpoint.pt``, of either format.

    A checkpoint of format 2 holds only the tensors that can change; the frozen base is the file
    its ``base`` entry names, beside ``path``, merged in under the checkpoint's own tensors.

    Args:
        ckpt: The loaded checkpoint.
        path: The file it was loaded from (the base file is looked for beside it).
        digest: Computes the sha256 of the base's tensors, to compare with the checkpoint's
            reference; None compares the digest the base file declares (this layer cannot hash
            tensors the way :mod:`freezetune.freezing.integrity` does; resume and evaluate pass it).

    Raises:
        WeightsError: If the format is unknown, or the base file is missing, unreadable, or not
            the one the checkpoint was saved with.
    """
    path = Path(path)
    fmt = ckpt.get("format")
    if fmt not in (None, CHECKPOINT_FORMAT):
        raise WeightsError(f"{path}: checkpoint format {fmt!r} is not one this freezetune reads "
                           f"({CHECKPOINT_FORMAT}); upgrade freezetune")
    ref = ckpt.get("base")
    if fmt is None or ref is None:
        return ckpt["model"]  # nothing left out: the checkpoint holds every tensor
    base_path, want = _base_ref(ref, path)
    base, declared = read_base_file(base_path, path.name)
    got = digest(base) if digest is not None else declared
    if got != want or declared != want:
        bad = got if got != want else declared
        raise WeightsError(f"{base_path}: not the base {path.name} was saved with: its frozen tensors have "
                           f"sha256 {bad[:12]}..., the checkpoint expects {want[:12]}...")
    return {**base, **ckpt["model"]}


def _base_ref(ref, path: Path) -> tuple[Path, str]:
    """The base file's path (a plain name, beside the checkpoint) and the sha256 the checkpoint expects."""
    name, want = (ref.get("file"), ref.get("sha256")) if isinstance(ref, dict) else (None, None)
    if not isinstance(name, str) or Path(name).name != name or name in ("", ".", "..") or not isinstance(want, str):
        raise WeightsError(f"{path}: malformed base reference {ref!r} (expected a file name and a sha256)")
    return path.parent / name, want


def read_base_file(path: Path, needed_by: str = "the checkpoint") -> tuple[dict[str, torch.Tensor], str]:
    """Reads a checkpoint's base file: its tensors and the sha256 its header declares.

    Args:
        path: The base file.
        needed_by: The checkpoint that needs it, for the error message.

    Raises:
        WeightsError: If the file is missing, not safetensors, or not a freezetune base.
    """
    if not path.is_file():
        raise WeightsError(f"{path}: not found; {needed_by} needs it for its frozen tensors "
                           "(keep the two files together)")
    header = read_base_header(path)
    if header is None:
        raise WeightsError(f"{path}: not a readable freezetune base file (no {BASE_FORMAT} header)")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path)), header["sha256"]
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: not a valid safetensors file ({first_line(e)})") from None


def read_base_header(path: Path) -> dict | None:
    """A base file's header (``format``, ``sha256``, ``hashes``: name -> sha256), or None if it has none."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {})[BASE_META_KEY])
    except (SafetensorError, OSError, ValueError, KeyError, TypeError):
        return None
    ok = isinstance(header, dict) and header.get("format") == BASE_FORMAT
    return header if ok and isinstance(header.get("sha256"), str) and isinstance(header.get("hashes"), dict) else None


def safe_torch_load(path: Path, what: str = "weights", mmap: bool = False):
    """``torch.load(..., weights_only=True)``: tensors and plain containers only, never code.

    Args:
        path: A ``.pt``/``.pth`` file.
        what: What the file should be, for the error message (``weights``, ``checkpoint``).
        mmap: Map the tensors' bytes instead of reading them (a zip-format file, as
            ``torch.save`` writes): the rest is read at once, a tensor's bytes when it is used.

    Raises:
        WeightsError: One line saying why the file was refused or could not be read.
    """
    try:
        with warnings.catch_warnings():
            # torch warns about e.g. pickle protocols right before failing; the error says it all.
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # unpickling, zip and weights_only errors share no base class
        text = str(e)
        if "WeightsUnpickler error" in text:
            after = text.split("WeightsUnpickler error:", 1)[1]
            detail = next((ln.strip() for ln in after.splitlines() if ln.strip()), "")
            detail = detail.split(" was not an allowed global")[0][:120]
            if "global" in detail.lower():
                raise WeightsError(
                    f"{path}: refused: unpickling it would call code ({detail}); freezetune "
                    "loads with weights_only=True and never runs pickled code; re-save it as a state "
                    "dict of tensors or as .safetensors"
                ) from None
            raise WeightsError(
                f"{path}: not a {what} file written by torch.save "
                f"(weights_only=True loading stopped at: {detail})"
            ) from None
        first = (text.strip().splitlines() or [type(e).__name__])[0][:200]
        raise WeightsError(f"{path}: cannot load {what} safely with weights_only=True ({first})") from None


def _fit_head(model: nn.Module, state: dict[str, torch.Tensor], num_classes: int) -> bool:
    """Sizes the head for the file, then drops the file's head if it is not ``num_classes`` wide."""
    name, layer = head_layer(model)
    w = state.get(f"{name}.weight")
    if w is None or w.ndim != layer.weight.ndim:
        return replace_head(model, num_classes)
    if w.shape[0] == num_classes:
        replace_head(model, num_classes)
        return False
    # The file's head is for other classes: keep the backbone, start a fresh head.
    for key in (f"{name}.weight", f"{name}.bias"):
        state.pop(key, None)
    replace_head(model, num_classes)
    return True


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Loads strictly, but tolerates a missing head (it was replaced on purpose)."""
    own = model.state_dict()
    head_name, _ = head_layer(model)
    # GoogLeNet/Inception are built without their auxiliary classifiers; ImageNet files hold them.
    state = {k: v for k, v in state.items() if k in own or not k.startswith(AUX_PREFIXES)}
    if source == "imagenet":
        # ImageNet heads have 1000 outputs; the head is replaced after loading.
        head_keys = {f"{head_name}.weight", f"{head_name}.bias"}
        state = {k: v for k, v in state.items() if k not in head_keys or own[k].shape == v.shape}
    missing = [k for k in own if k not in state and not k.startswith(f"{head_name}.")]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys: {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_few(unexpected)}")
        if wrong:
            parts.append(f"shape mismatch: {_few(wrong)}")
        raise WeightsError(f"{source}: weights do not fit the model; " + "; ".join(parts))
    model.load_state_dict(state, strict=False)


def _few(items: list[str], n: int = 5) -> str:
    more = f" (+{len(items) - n} more)" if len(items) > n else ""
    return ", ".join(items[:n]) + more

