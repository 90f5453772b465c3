"""Shape and type checks for the public boundary. Each error names the argument, the expectation and
what came; inside the modules the shapes are trusted."""

from __future__ import annotations

from typing import Iterable

import torch


def check_choice(value: object, name: str, choices: Iterable[object]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_float_tensor(x: object, name: str, ndim: int, layout: str) -> torch.Tensor:
    """``x`` must be a floating-point tensor with ``ndim`` dims; ``layout`` reads like ``(B, 3, H, W)``."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D {layout}, got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor {layout}, got dtype {x.dtype}")
    return x


def check_same_shape(a: torch.Tensor, a_name: str, b: torch.Tensor, b_name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{a_name} and {b_name} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


class MissingDependency(ImportError):
    """An optional dependency is not installed; the message names the extra that brings it."""


PIP_NAMES = {"PIL": "pillow"}
"""Distribution names that differ from the module's."""


def require(*modules: str, extra: str, feature: str) -> None:
    """Import ``modules`` now, before any work, or raise one :class:`MissingDependency` line that
    names the extra that brings it (``dualview[viz]``) and how to install it: dualview is installed
    from a checkout (no package index serves it), so ``pip install '.[viz]'`` there, or the module's
    own distribution."""
    import importlib

    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise MissingDependency(
                f"{feature} needs {module}, which is not installed: install dualview[{extra}] "
                f"(pip install '.[{extra}]' in the dualview checkout), or pip install {PIP_NAMES.get(module, module)}"
            ) from None
