"""The argument checks of the public boundary, all in one module: sizes, grids, positive ints, choices,
tensors, optional dependencies. Each error is one line naming the argument, the expectation and what
came; inside the modules the shapes are trusted."""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Optional

import torch


MAX_GRID_SIDE = 32
"""Largest number of rows or columns accepted (1024 sub-images; far past any real budget)."""


def check_size(value: object, name: str) -> tuple[int, int]:
    """``value`` as a ``(height, width)`` pair of positive ints, or a ValueError naming ``name``."""
    if (
        not isinstance(value, (tuple, list))
        or len(value) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise ValueError(f"{name} must be a (height, width) pair of positive ints, got {value!r}")
    return int(value[0]), int(value[1])


def check_grid(grid: object, name: str = "grid", *, max_side: Optional[int] = MAX_GRID_SIDE) -> tuple[int, int]:
    """``grid`` as ``(rows, cols)`` with ``1 <= rows, cols <= max_side``, or a ValueError.

    ``max_side``: the sanity limit on a grid someone chooses (DCM, the command line); None for a
    grid that an image was already cut into (a host's processor, the DEM's input): any positive size."""
    if (
        not isinstance(grid, (tuple, list))
        or len(grid) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in grid)
        or not all(1 <= v <= (max_side or v) for v in grid)
    ):
        allowed = f"ints in 1..{max_side}" if max_side is not None else "positive ints"
        raise ValueError(f"{name} must be (rows, cols) with {allowed} or 'auto', got {grid!r}")
    return int(grid[0]), int(grid[1])


def check_positive_int(value: object, name: str, *, allow_none: bool = False) -> Optional[int]:
    """``value`` if it is an int > 0 (a bool or a float is refused), or None where ``allow_none``."""
    if allow_none and value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
    return value


def check_bool(value: object, name: str) -> bool:
    """``value`` if it is True or False: a truthy string (``"no"``) or an int is refused, not read as a flag."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be a bool, got {value!r}")
    return value


def check_number(value: object, name: str, *, positive: bool = False) -> float:
    """``value`` as a float if it is a finite real number (not a bool, a string or a tensor), > 0
    where ``positive``."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (positive and value <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {value!r}")
    return float(value)


def check_out_size(value: object, name: str = "out_size", *, allow_tower: bool = False) -> object:
    """A DEM's output map: None (the full map), an int ``n`` (``(n, n)``) or an ``(out_h, out_w)``
    pair of positive ints, returned as a tuple; ``"tower"`` too (kept) where ``allow_tower`` (the
    adapters' option: the tower's token grid)."""
    if value is None or (allow_tower and value == "tower"):
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value, value
    if isinstance(value, (tuple, list)):
        return check_size(value, name)
    tower = "'tower' (the tower's token grid), " if allow_tower else ""
    raise ValueError(f"{name} must be {tower}a positive int, an (out_h, out_w) pair of positive ints or None, got {value!r}")


def check_pinpoints(value: object, name: str = "pinpoints") -> list[tuple[int, int]]:
    """LLaVA-NeXT's ``image_grid_pinpoints``: a non-empty list of ``(height, width)`` pairs of positive ints."""
    if not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{name} must be a non-empty list of (height, width), got {value!r}")
    return [check_size(point, f"{name} entry") for point in value]


def check_tower_batch_size(value: object, name: str = "tower_batch_size") -> object:
    """None (automatic chunks), ``"all"`` (one call) or a positive int (crops per tower call)."""
    if value is None or (isinstance(value, str) and value == "all"):  # a numpy 0-d "all" compares equal too
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, None (automatic) or 'all', got {value!r}")
    return value


def check_choice(value: object, name: str, choices: Iterable[object]) -> None:
    """``value`` must be one of ``choices`` and of its type: a numpy 0-d array ``array("squash")``
    compares equal to ``"squash"`` but would be recorded (and fail to save) as an array."""
    choices = tuple(choices)
    if not any(_same_kind(value, choice) and value == choice for choice in choices):
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def _same_kind(value: object, choice: object) -> bool:
    if isinstance(value, bool) != isinstance(choice, bool):  # True is not the choice 1
        return False
    return isinstance(value, type(choice))


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


# The limits of every command line (dualview show / budget / bench, the demo): one set, checked by
# the argparse types below, so that a value one command refuses no other accepts.
PATCH_SIZE = 14
"""The patch size of the towers the commands build or assume (CLIP ViT-L/14); ``budget`` has ``--patch-size``."""
MIN_CROP_SIZE = 14
MAX_CROP_SIZE = 2016
"""Largest crop size: 144x144 = 20736 tokens per crop at patch 14 (CLIP-336 has 576)."""


def crop_size_rule(patch_size: Optional[int] = PATCH_SIZE) -> str:
    """What a crop size must be, in words: ``an int in 14..2016, a multiple of the patch size 14``."""
    multiple = f", a multiple of the patch size {patch_size}" if patch_size else ""
    return f"an int in {MIN_CROP_SIZE}..{MAX_CROP_SIZE}{multiple}"


def crop_size_option(patch_size: Optional[int] = PATCH_SIZE):
    """An argparse ``type`` for a crop size (``--crop-size``, the benchmark's ``--crop``): an int in
    :data:`MIN_CROP_SIZE`..:data:`MAX_CROP_SIZE`, a multiple of ``patch_size`` (None: a command with
    its own ``--patch-size`` checks that after parsing), else a usage error (exit 2) that argparse
    prefixes with the option's name."""
    import argparse  # only the command lines need it

    def parse(text: str) -> int:
        value = int(text) if text.strip().lstrip("+-").isdigit() else 0
        if not MIN_CROP_SIZE <= value <= MAX_CROP_SIZE or (patch_size and value % patch_size):
            raise argparse.ArgumentTypeError(f"must be {crop_size_rule(patch_size)}, got {text!r}")
        return value

    return parse
