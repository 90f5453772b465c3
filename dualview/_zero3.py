"""Reading parameters that DeepSpeed ZeRO-3 partitioned.

Under ZeRO-3 every parameter's local tensor is empty (shape ``(0,)``): its real size is ``ds_numel``
and its values exist only inside ``deepspeed.zero.GatheredParameters``. What dual view reads outside a
forward (parameter counts, the weights :func:`dualview.save_adapter` writes) goes through these
helpers; for parameters DeepSpeed does not manage (no ``ds_id``) they are the plain reads, and
deepspeed is not imported. :func:`grid_order`, :func:`call_count` and :func:`tie_unused` keep the
engines' per-grid DEM calls and the chunked tower calls in step across ranks under ZeRO-3 (and cost
nothing without it).
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from .grid import Grid


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


def in_lockstep(module: object) -> bool:
    """Whether ``module`` (an ``nn.Module``, else never) is ZeRO-3 partitioned over several initialised
    ranks: then each of its calls is a collective, and every rank must call it equally often."""
    return (isinstance(module, nn.Module) and is_partitioned(module) and dist.is_available()
            and dist.is_initialized() and dist.get_world_size() > 1)


def call_count(module: object, calls: int) -> int:
    """How often to call ``module`` for a rank that needs ``calls`` calls: ``calls`` (no collective), or,
    when :func:`in_lockstep`, the most any rank needs (one ``all_gather_object``: a collective)."""
    if not in_lockstep(module):
        return calls
    return max(_from_every_rank(int(calls)))


def grid_order(module: nn.Module, grids: Iterable[Grid]) -> list[Grid]:
    """The grids to call ``module`` (the DEM) for, in call order: this rank's own, as given (no
    collective) -- or, when ``module`` is ZeRO-3 partitioned over several ranks, the sorted union of
    every rank's, the same list on all of them (one ``all_gather_object``: a collective).

    Why: ZeRO-3 all-gathers a module's partitioned weights at each of its calls (forward, and again in
    backward), a collective every rank must make as often and in the same order. The engines call the DEM
    (and the gate) once per distinct grid of a batch, and each rank's batch has its own image shapes:
    a rank runs the grids it lacks on a dummy input (:func:`tie_unused` keeps them in its backward)."""
    grids = list(grids)
    if not in_lockstep(module):
        return grids
    every = _from_every_rank(sorted({(int(r), int(c)) for r, c in grids}))
    return sorted({tuple(grid) for rank in every for grid in rank})


def _from_every_rank(value: object) -> list:
    """``value`` of every rank, in rank order (one ``all_gather_object``: a collective)."""
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, value)
    return every


def tie_unused(out: torch.Tensor, unused: Sequence[torch.Tensor]) -> torch.Tensor:
    """``out`` plus zero times the ``unused`` (dummy) outputs: the same values (``x + 0``), and a graph in
    which backward reaches the dummy calls (their ZeRO-3 gathers) and adds zero to the weights' grads.
    The zeros are taken element-wise before the sum, so no overflow of a large dummy can make a NaN."""
    if not unused:
        return out
    return out + sum(u.mul(0).sum() for u in unused).to(out)
