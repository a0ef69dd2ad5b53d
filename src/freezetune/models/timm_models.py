"""Building ``timm/<name>`` models with their weights (the optional ``timm`` extra).

Everything goes through ``timm.create_model``: random init (``pretrained=False``), a local file
through timm's own pretrained-config file override (``pretrained=True,
pretrained_cfg_overlay=dict(file=PATH)``, so timm's checkpoint filters and classifier handling
apply), and ImageNet weights from timm's Hugging Face hub (or URL) cache, downloaded when allowed.
Like torchvision's weights, a cached file is used without touching the network, and with
``FREEZETUNE_OFFLINE`` set nothing is downloaded. timm is imported only inside these functions.

The freeze points and the head are in :mod:`freezetune.models.catalog` (``timm_stages``), which
the import layers put below this module.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from freezetune.errors import WeightsError
from freezetune.models.catalog import head_path, import_timm, meta_model, timm_arch
from freezetune.models.download import download_within

# timm's hub files, in the order timm's own loader tries them.
_HUB_FILES = ("model.safetensors", "pytorch_model.bin")


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
    w = state.get(f"{head_path(meta_model(name))}.weight")
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
