"""Everything freezetune knows about ``timm/<name>`` models (the optional ``timm`` extra), in one place.

Names: ``timm/<name>`` names a timm model, checked against timm's registry (``timm.is_model``);
without timm installed every entry point says how to install it. timm is imported only inside
the functions that need it, so importing this module (and the catalog above it) never loads timm.

Freeze points: from timm's own stage grouping (``model.group_matcher(coarse=True)``, else
``model.feature_info``), read off a model built on the meta device; the head is
``model.get_classifier()``. :mod:`freezetune.models.catalog` asks here for every ``timm/`` name.

Weights: everything goes through ``timm.create_model``: random init (``pretrained=False``), a
local file through timm's own pretrained-config file override (``pretrained=True,
pretrained_cfg_overlay=dict(file=PATH)``, so timm's checkpoint filters and classifier handling
apply), and ImageNet weights from timm's Hugging Face hub (or URL) cache, downloaded when allowed.
Like torchvision's weights, a cached file is used without touching the network, and with
``FREEZETUNE_OFFLINE`` set nothing is downloaded.

Why one module below the catalog: the catalog (layer 1, which ``config`` asks about model names)
needs timm's names, stages, heads and input sizes, so this module sits in layer 1 with it and
imports nothing of the catalog's (only :mod:`freezetune.models.structure` and
:mod:`freezetune.models.download`). ``models.weights`` calls the weights half.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from freezetune.errors import ConfigError, MissingExtraError, WeightsError
from freezetune.models.download import download_within
from freezetune.models.structure import last_layer_path, on_meta, stage_members_cover

TIMM_PREFIX = "timm/"
TIMM_RULE = (
    "timm's own stage grouping (group_matcher(coarse=True), else feature_info): stem, then one "
    "freeze point per stage named after its module (layer1, stages_0, blocks_3), head: "
    "get_classifier() and the layers after the last stage"
)
# timm's hub files, in the order timm's own loader tries them.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


# --------------------------------------------------------------------------------------------
# Names


def is_timm_name(name: str) -> bool:
    """Whether ``name`` names a timm model (``timm/<name>``)."""
    return name.startswith(TIMM_PREFIX)


def timm_arch(name: str) -> str:
    """The timm model name in ``timm/<name>`` (e.g. ``resnet50`` or ``resnet50.a1_in1k``)."""
    return name[len(TIMM_PREFIX):]


def import_timm():
    """Imports timm (the optional ``timm`` extra).

    Raises:
        MissingExtraError: One line with the install command if timm cannot be imported.
    """
    try:
        import timm
    except ImportError as e:
        why = "is not installed" if isinstance(e, ModuleNotFoundError) or "None in sys.modules" in str(e) else (
            f"cannot be imported ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})")
        raise MissingExtraError.of("a timm/<name> model", "timm", "timm", why) from None
    return timm


def check_name(name: str) -> None:
    """Raises ConfigError, with close matches, if ``timm/<name>`` is not in timm's registry.

    Raises:
        ConfigError: If timm is missing (with the install command) or does not know the model.
    """
    timm = import_timm()
    arch = timm_arch(name)
    if not arch:
        raise ConfigError(f"{name!r} names no timm model; use timm/<name>, e.g. timm/resnet50")
    if timm.is_model(arch):
        return
    known = timm.list_models()
    close = difflib.get_close_matches(arch, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(TIMM_PREFIX + c) for c in close)}? " if close else ""
    raise ConfigError(f"unknown timm model {name!r}; {hint}timm.list_models() lists the {len(known)} timm models")


def select(pattern: str) -> list[str]:
    """The ``timm/<name>`` models matching ``timm/<fnmatch pattern>`` (a plain name matches itself).

    Raises:
        ConfigError: If nothing matches, or timm is missing.
    """
    arch = timm_arch(pattern)
    if not any(c in arch for c in "*?["):
        check_name(pattern)
        return [pattern]
    hits = [TIMM_PREFIX + n for n in import_timm().list_models(arch)]
    if not hits:
        raise ConfigError(f"no timm model matches {pattern!r}")
    return hits


# --------------------------------------------------------------------------------------------
# Building (structure only, or randomly initialised) and the head


def build(name: str) -> nn.Module:
    """``timm.create_model`` for ``timm/<name>``, randomly initialised, with timm's default head.

    Raises:
        ConfigError: If timm is missing or does not know the model.
    """
    check_name(name)
    return import_timm().create_model(timm_arch(name), pretrained=False)


def meta_model(name: str) -> nn.Module:
    """The timm model with every tensor on the meta device: its structure, with no memory or init cost.

    Raises:
        ConfigError: If timm is missing or does not know the model.
    """
    check_name(name)
    try:
        with torch.device("meta"):
            return build(name)
    except Exception:  # noqa: BLE001 - a builder computing with tensor values; on_meta copes
        pass
    return on_meta(lambda: build(name))


def _is_timm_model(model: nn.Module) -> bool:
    return hasattr(model, "pretrained_cfg") and callable(getattr(model, "get_classifier", None))


def classifier_path(model: nn.Module) -> str | None:
    """Dotted name of a timm model's ``get_classifier()`` layer, or None (not timm, or no such layer)."""
    if not _is_timm_model(model):
        return None
    classifier = model.get_classifier()
    if isinstance(classifier, (tuple, list)) and classifier:  # distilled models: (head, head_dist)
        classifier = classifier[0]
    if not isinstance(classifier, nn.Module) or getattr(classifier, "weight", None) is None:
        return None
    return next((n for n, m in model.named_modules() if m is classifier and n), None)


def _head_path(model: nn.Module) -> str:
    # What catalog.head_path answers for a timm model.
    return classifier_path(model) or last_layer_path(model)


def owns_head(model: nn.Module) -> bool:
    """Whether the head of this model is timm's to replace (``get_classifier`` and ``reset_classifier``)."""
    return classifier_path(model) is not None and hasattr(model, "reset_classifier")


def replace_head(model: nn.Module, num_classes: int) -> bool:
    """``model.reset_classifier(num_classes)`` on the classifier's device and dtype, if the size differs.

    For a model where :func:`owns_head` is true.

    Returns:
        Whether the head was replaced.
    """
    layer = model.get_submodule(classifier_path(model))
    size = getattr(layer, "out_features", getattr(layer, "out_channels", None))
    if size == num_classes:
        return False
    with torch.device(layer.weight.device):
        model.reset_classifier(num_classes)
    model.get_classifier().to(layer.weight.dtype)
    return True


@functools.cache
def input_size_rule(name: str) -> tuple[int | None, int | None]:
    """``(exact, minimum)`` input size: exact for models timm marks ``fixed_input_size``, else none."""
    cfg = getattr(meta_model(name), "pretrained_cfg", None) or {}
    if cfg.get("fixed_input_size") and cfg.get("input_size"):
        return int(cfg["input_size"][-1]), None
    return None, None


# --------------------------------------------------------------------------------------------
# Freeze points


def timm_stages(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """A timm model's freeze points, from timm's own stage grouping.

    The groups are those of ``model.group_matcher(coarse=True)`` (what timm uses for layer-wise
    learning-rate decay), or, for a model without one, one group per ``model.feature_info`` module.
    A group timm names once (``stem``) keeps that name; the numbered groups (timm's ``blocks``) are
    named after their first module (``layer1``, ``stages_0``, ``blocks_3``). Parameters timm leaves
    unmatched (the neck and classifier) and ``get_classifier()`` form ``head``. Members are the
    outermost modules (or loose parameters) lying wholly inside one group.

    Returns:
        Stage name -> members, ending with ``head``; empty when timm groups nothing (neither a
        group matcher nor feature info), and :func:`freezetune.models.catalog.derive_stages`
        then falls back to the model's own module names.
    """
    params = [n for n, _ in model.named_parameters()]
    head = _head_path(model)
    matcher = None
    with contextlib.suppress(AttributeError, NotImplementedError, TypeError):
        matcher = model.group_matcher(coarse=True)
    groups = _matcher_groups(model, matcher) if matcher else _feature_info_groups(model, params, head)
    if not groups:
        return {}
    # Everything from the group holding the classifier on is the head.
    gid_of: dict[str, int] = {}
    labels: list[str | None] = []
    head_gid = None
    for label, names in groups:
        if head_gid is None and any(stage_members_cover(n, (head,)) for n in names):
            head_gid = len(labels)
            labels.append("head")
        elif head_gid is None:
            labels.append(label)
        gid = head_gid if head_gid is not None else len(labels) - 1
        for n in names:
            gid_of[n] = gid
    for n in params:
        if stage_members_cover(n, (head,)) or n not in gid_of:
            if head_gid is None:
                head_gid = len(labels)
                labels.append("head")
            gid_of[n] = head_gid
    members = _collapse({n: gid_of[n] for n in params})
    out: dict[str, tuple[str, ...]] = {}
    counts = {label: labels.count(label) for label in labels}
    for gid, label in enumerate(labels):
        if gid == head_gid or not members.get(gid):
            continue
        name = label if label and counts[label] == 1 else members[gid][0].replace(".", "_")
        if name in out or name == "head":
            name = f"{label or 'group'}{gid}"
        out[name] = tuple(members[gid])
    out["head"] = tuple(members.get(head_gid, (head,)))
    return out


def _matcher_groups(model: nn.Module, matcher) -> list[tuple[str | None, list[str]]]:
    """The coarse parameter groups of timm in order, each with the matcher key that made it (None: unmatched)."""
    from timm.models import group_parameters

    grouped = group_parameters(model, matcher)
    out = []
    for gid in sorted(grouped):
        names = list(grouped[gid])
        out.append((_matcher_label(matcher, names[0]) if names else None, names))
    return out


def _matcher_label(matcher, param: str) -> str | None:
    if not isinstance(matcher, dict):
        return None
    for label, spec in matcher.items():
        if spec is None:
            continue
        specs = [s[0] for s in spec] if isinstance(spec, (list, tuple)) else [spec]
        if any(re.match(s, param) for s in specs):
            return label
    return None


def _feature_info_groups(model: nn.Module, params: list[str], head: str) -> list[tuple[str | None, list[str]]]:
    """One group per ``feature_info`` module; parameters before the first go to ``stem``.

    Parameters between two feature modules join the group before them; the classifier is left
    out (it becomes ``head``).
    """
    info = getattr(model, "feature_info", None)
    modules = [f["module"] for f in info] if info else []
    if not modules:
        return []
    groups: dict[str, list[str]] = {"stem": []}
    current = "stem"
    for n in params:
        if stage_members_cover(n, (head,)):
            continue
        owner = next((m for m in modules if stage_members_cover(n, (m,))), None)
        if owner is not None:
            current = owner
        groups.setdefault(current, []).append(n)
    return [(k if k == "stem" else None, v) for k, v in groups.items() if v]


def _collapse(gid_of: dict[str, int]) -> dict[int, list[str]]:
    """Each group's outermost module paths (or loose parameter names) whose parameters are all in it."""
    under: dict[str, set[int]] = {}
    for p, g in gid_of.items():
        parts = p.split(".")
        for i in range(1, len(parts)):
            under.setdefault(".".join(parts[:i]), set()).add(g)
    out: dict[int, list[str]] = {}
    for p, g in gid_of.items():
        parts = p.split(".")
        member = next((".".join(parts[:i]) for i in range(1, len(parts)) if under[".".join(parts[:i])] == {g}), p)
        if member not in out.setdefault(g, []):
            out[g].append(member)
    return out


# --------------------------------------------------------------------------------------------
# Weights


def pretrained_cfg(name: str) -> dict:
    """The pretrained config timm resolves for ``timm/<name>`` (its default tag unless one is given)."""
    cfg = getattr(meta_model(name), "pretrained_cfg", None)
    return dict(cfg or {})


def create(name: str, num_classes: int, weights_file: str | Path | None = None,
           file_classes: int | None = None) -> nn.Module:
    """``timm.create_model`` for ``timm/<name>``, randomly initialised or loaded from a file.

    Args:
        name: ``timm/<name>``.
        num_classes: Outputs of the classifier timm builds.
        weights_file: A state dict file loaded through ``pretrained_cfg_overlay=dict(file=...)``.
        file_classes: The file's classifier rows, when known: timm then loads the head too and
            checks every key strictly (it keeps a head only when it matches ``num_classes``).

    Raises:
        ConfigError: If timm is missing or does not know the model.
        WeightsError: If the file does not fit the model.
    """
    timm = import_timm()
    arch = timm_arch(name)
    if weights_file is None:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes)
    overlay: dict = {"file": str(weights_file)}
    # timm keeps the file's head (and loads strictly) only when the overlay's classes match the
    # model's; a file without a head loads non-strictly (the caller checks the other keys).
    overlay["num_classes"] = file_classes if file_classes is not None else -1
    try:
        return timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=num_classes)
    except (RuntimeError, ValueError, KeyError, OSError, AssertionError) as e:
        raise WeightsError(f"{weights_file}: weights do not fit {name} ({_short(e)})") from None


def file_head_rows(name: str, state: dict[str, torch.Tensor]) -> int | None:
    """Rows of the classifier weight in a state dict (None: the file holds no head under that name)."""
    w = state.get(f"{_head_path(meta_model(name))}.weight")
    return int(w.shape[0]) if w is not None and w.ndim >= 2 else None


def imagenet_file(name: str, allow_download: bool, timeout: float | None = None, quiet: bool = False) -> Path:
    """The local file of timm's default pretrained weights for ``timm/<name>``, downloading if allowed.

    Looks in timm's caches first (the Hugging Face hub cache, or torch.hub's ``checkpoints`` for
    URL weights); downloads through the same hub only when allowed and ``FREEZETUNE_OFFLINE`` is unset.

    Args:
        name: ``timm/<name>`` (a ``.tag`` picks other weights, e.g. ``timm/resnet50.a1_in1k``).
        allow_download: Whether to download when the file is not cached.
        timeout: Socket timeout for the download, in seconds.
        quiet: Keep the download's progress bars off the terminal.

    Raises:
        WeightsError: If the model has no pretrained weights, or they are not cached and cannot
            be downloaded; says how to place them by hand.
    """
    cfg = pretrained_cfg(name)
    hub_id, url = cfg.get("hf_hub_id"), cfg.get("url")
    if not hub_id and not url:
        raise WeightsError(f"timm has no pretrained weights for {name}; set model.weights to a file, or to none")
    cached = _cached(hub_id, url, cfg.get("hf_hub_filename"))
    if cached is not None:
        return cached
    where = f"the Hugging Face hub repo {hub_id.split('@')[0]}" if hub_id else url
    how = (
        f"download it from {where} (timm's cache: HF_HOME / TORCH_HOME), "
        "or set model.weights to a .pth/.safetensors path, or to none"
    )
    if not allow_download or os.environ.get("FREEZETUNE_OFFLINE"):
        raise WeightsError(f"timm weights for {name} are not in timm's cache; {how}")
    return download_within(lambda progress: _download(hub_id, url, cfg.get("hf_hub_filename"), progress=progress),
                           timeout, quiet, f"timm weights for {name}", how)


def _split_hub(hub_id: str) -> tuple[str, str | None]:
    repo, _, revision = hub_id.partition("@")
    return repo, revision or None


def _cached(hub_id: str | None, url: str | None, filename: str | None) -> Path | None:
    if hub_id:
        with contextlib.suppress(ImportError):
            from huggingface_hub import try_to_load_from_cache

            repo, revision = _split_hub(hub_id)
            for file in (filename,) if filename else _HUB_FILES:
                hit = try_to_load_from_cache(repo, file, revision=revision)
                if isinstance(hit, str) and os.path.isfile(hit):
                    return Path(hit)
    if url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
        if path.is_file():
            return path
    return None


def _download(hub_id: str | None, url: str | None, filename: str | None, progress: bool) -> Path:
    if hub_id:
        from huggingface_hub import hf_hub_download

        repo, revision = _split_hub(hub_id)
        files = (filename,) if filename else _HUB_FILES
        last: Exception | None = None
        for file in files:
            try:
                return Path(hf_hub_download(repo, file, revision=revision))
            except Exception as e:  # a missing file (try the next) or the network
                last = e
        if not url:
            raise last  # type: ignore[misc]
    from timm.models._hub import download_cached_file

    return Path(download_cached_file(url, check_hash=False, progress=progress))


def load_file(path: Path) -> dict[str, torch.Tensor]:
    """Reads a hub weights file (``.safetensors``, or a torch file with ``weights_only=True``)."""
    if path.suffix == ".safetensors" or path.name.endswith("safetensors"):
        from safetensors.torch import load_file as load_safetensors

        return load_safetensors(str(path))
    return torch.load(path, map_location="cpu", weights_only=True)


def _short(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return " ".join(lines)[:300] if lines else type(e).__name__
