"""Reading parameters that DeepSpeed ZeRO-3 partitioned.

Under ZeRO-3 every parameter's local tensor is empty (shape ``(0,)``): its real size is ``ds_numel``
and its values exist only inside ``deepspeed.zero.GatheredParameters``. What dual view reads outside a
forward (parameter counts, the weights :func:`dualview.save_adapter` writes) goes through these
helpers; for parameters DeepSpeed does not manage (no ``ds_id``) they are the plain reads, and
deepspeed is not imported.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

from torch import nn


def numel(param: nn.Parameter) -> int:
    """The parameter's number of elements, partitioned or not."""
    return getattr(param, "ds_numel", param.numel())


def is_partitioned(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is managed by ZeRO-3."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


@contextlib.contextmanager
def gathered(*modules: nn.Module) -> Iterator[None]:
    """Inside the block, the ZeRO-3 parameters of ``modules`` hold their full values (partitioned
    again after it). A collective: every rank must enter it. Without ZeRO-3 parameters, nothing."""
    params = [p for m in modules for p in m.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield
