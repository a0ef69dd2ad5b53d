"""Building the :class:`~freezetune.training.step.Engine` that the execution decision describes.

:func:`freezetune.speed.execution.plan_execution` decides how steps run (a frozen prefix without
autograd, folded BatchNorm, the feature cache, layouts, compile, DDP); :func:`build_engine` builds
exactly that, for the freeze state the model is in now. The recipe calls it at setup and again
after every freeze change.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from freezetune.config import Config
from freezetune.freezing.plan import FreezePlan
from freezetune.speed.execution import plan_execution
from freezetune.speed.feature_cache import FeatureCache, cache_key
from freezetune.speed.precision import check_precision
from freezetune.speed.prefix import SplitForward
from freezetune.training import distributed as dist
from freezetune.training.step import DDPForward, Engine


def build_engine(model: nn.Module, plan: FreezePlan, cfg: Config, optimizer: torch.optim.Optimizer,
                 device: torch.device, info: dist.DistInfo, train_set: Dataset, run_dir: str | Path,
                 scaler: torch.amp.GradScaler | None, grad_probe: Callable[[], None] | None) -> Engine:
    """The engine for the current freeze state, with the decision it was built from as ``engine.execution``.

    Args:
        model: The model being trained (moved to ``device``).
        plan: Its freeze plan now.
        cfg: The run's config.
        optimizer: The run's optimizer.
        device: Where steps run.
        info: The distributed setup.
        train_set: The training set (the feature cache is keyed on it and sized by it).
        run_dir: Where an on-disk feature cache lives.
        scaler: The fp16 gradient scaler, kept across rebuilds so its loss scale survives.
        grad_probe: Called after every update (``freeze.auto``'s meter), or None.

    Raises:
        ConfigError: If the precision is not possible on the device.
    """
    check_precision(cfg.train.precision, device)
    if cfg.train.channels_last:
        model.to(memory_format=torch.channels_last)
    decision = plan_execution(model, plan, cfg, device, info.enabled)
    engine = Engine(model, optimizer, device, cfg.train.precision, cfg.train.channels_last,
                    cfg.train.stop_on_nonfinite, scaler=scaler, execution=decision, grad_probe=grad_probe)
    if decision.prefix_without_autograd.enabled:
        engine.split = SplitForward(model, cfg.model.name, list(decision.frozen_prefix),
                                    fold=decision.fold_batchnorm.enabled,
                                    prefix_channels_last=decision.prefix_channels_last.enabled,
                                    suffix_channels_last=cfg.train.channels_last)
    if decision.feature_cache.enabled:
        path = {"prefix": list(decision.frozen_prefix), "fold": decision.fold_batchnorm.enabled,
                "channels_last": decision.prefix_channels_last.enabled, "compile": decision.compile.enabled,
                "precision": cfg.train.precision}
        key = cache_key(model, plan, cfg, train_set, device, path)
        engine.cache = FeatureCache(len(train_set), Path(run_dir), key, cfg.train.feature_cache_max_bytes,
                                    device=device, rank=info.rank)
        # Validation features are kept in memory only, within what the training cache leaves.
        engine.val_features_max_bytes = cfg.train.feature_cache_max_bytes
    if decision.compile.enabled:
        if engine.split is not None:
            engine.split.prefix = torch.compile(engine.split.prefix)
            engine.split.head = torch.compile(engine.split.head)
        else:
            engine.compiled = torch.compile(model)
    # DDP registers the parameters that require grad when it is built, so it is (re)built
    # here, after every change of the freeze state.
    if decision.ddp.enabled:
        engine.ddp = dist.wrap(DDPForward(engine), info, device)
    return engine
