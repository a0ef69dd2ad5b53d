"""Facts about a module tree that hold for every model, torchvision or timm: no family knowledge.

Building a model on the meta device, which parameters a freeze point's member covers, and the
last layer that classifies. :mod:`freezetune.models.catalog` (torchvision) and
:mod:`freezetune.models.timm_models` (timm) both stand on these, so neither needs the other's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import nn


def on_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """Runs a model builder with every parameter put on the meta device as it is registered.

    Not ``with torch.device("meta")``: some builders (RegNet's) compute with tensors and need
    their values. Moving each parameter as it is registered keeps such builders working, and the
    initialisers that run afterwards touch only meta tensors.

    Args:
        build: Builds the model (no arguments).

    Returns:
        The model, with every tensor (buffers too) on the meta device.
    """
    with _parameters_on_meta():
        model = build()
    return model.to("meta")


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    # Not thread-safe (it patches nn.Module for the duration); build from one thread.
    register = nn.Module.register_parameter

    def to_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = to_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def stage_members_cover(param: str, members: tuple[str, ...] | list[str]) -> bool:
    """Whether a parameter name falls under one of a stage's members.

    Args:
        param: A dotted parameter name (``features.3.block.0.0.weight``).
        members: Dotted module names, or parameter names for loose parameters.
    """
    return any(param == m or param.startswith(m + ".") for m in members)


def last_layer_path(model: nn.Module) -> str:
    """Dotted name of the last ``nn.Linear``, else of the last ``nn.Conv2d`` (SqueezeNet's classifier).

    Raises:
        IndexError: If the model has neither.
    """
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    return (linears or convs)[-1]
