"""DualViewGate: how the DEM's tokens join the features the host would have used without it.

``gate(host, dual) = host + g * (dual - host)`` with a learnable per-channel ``g`` of shape ``(dim,)``:

- ``init="identity"``: ``g = 0`` (a parameter). At initialisation the output IS ``host`` (bit for bit
  in any floating dtype: ``host + 0 * x == host`` for finite ``x``), so a pretrained model keeps its
  behaviour until training moves ``g`` away from 0, as LoRA's zero-initialised ``B``, ControlNet's
  zero convolutions and Flamingo's tanh gates do. At step 0, ``d out / d g = dual - host`` is
  non-zero, so ``g`` learns from the first step; the DEM behind ``dual`` receives
  ``g * d loss / d out``, which is zero until ``g`` has moved (one optimizer step).
- ``init="released"``: INF-LLaVA's mean ``(host + dual) / 2`` (``g = 0.5``, fixed). ``g`` is then a
  non-persistent buffer: the module adds no key to a state dict, so released checkpoints load as
  before. The released formula is computed as ``(host + dual) / 2`` literally (bit-equal to the
  release; ``host + 0.5 * (dual - host)`` can differ in the last bit).

What "host" means is the caller's business; in this package it is what the plain host model would
compute for the same input: the thumbnail's tokens (LLaVA-1.5 hosts, ``thumbnail_fusion="mean"``)
or the plain local tiles' tokens laid out as the DEM's full map (AnyRes, InternVL, Idefics3 hosts,
``out_size=None``).
"""

from __future__ import annotations

import torch
from torch import nn

from ._checks import check_choice, check_positive_int

GATE_INITS = ("released", "identity")
"""The ``init`` choices: ``"released"`` (the paper's mean, no parameter), ``"identity"`` (the host at step 0)."""


class DualViewGate(nn.Module):
    """Learnable per-channel blend of host features and dual-view (DEM) features.

    Args:
        dim: ``D``, the channels of both inputs.
        init: ``"identity"`` (``g = 0``, learnable, the default) or ``"released"`` (``(host + dual) / 2``,
            ``g = 0.5`` fixed as a non-persistent buffer: no state-dict key).
        device, dtype: of ``g``.

    Shapes:
        forward(host (..., D), dual (..., D)) -> (..., D), in ``host``'s dtype. Both inputs must have
        the same shape. ``g`` is used in the inputs' precision where that is wider than its own.
    """

    def __init__(self, dim: int, *, init: str = "identity", device=None, dtype=None) -> None:
        super().__init__()
        check_positive_int(dim, "dim")
        check_choice(init, "init", GATE_INITS)
        self.dim = dim
        self.init = init
        if init == "identity":
            self.g = nn.Parameter(torch.zeros(dim, device=device, dtype=dtype))
        else:
            self.register_buffer("g", torch.full((dim,), 0.5, device=device, dtype=dtype), persistent=False)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, init={self.init!r}"

    def reset_parameters(self) -> None:
        """``g`` back to its initial value (0 for identity, 0.5 for released)."""
        with torch.no_grad():
            self.g.fill_(0.0 if self.init == "identity" else 0.5)

    def forward(self, host: torch.Tensor, dual: torch.Tensor) -> torch.Tensor:
        if not isinstance(host, torch.Tensor) or not isinstance(dual, torch.Tensor):
            raise TypeError(
                f"DualViewGate takes two tensors (host, dual), got {type(host).__name__} and {type(dual).__name__}"
            )
        if host.shape != dual.shape or host.shape[-1:] != (self.dim,):
            raise ValueError(
                f"DualViewGate(dim={self.dim}) needs host and dual features of one shape (..., {self.dim}), "
                f"got host {tuple(host.shape)} and dual {tuple(dual.shape)}"
            )
        if self.init == "released":
            return ((host + dual) / 2).to(host.dtype)
        g = self.g if self.g.dtype == torch.promote_types(self.g.dtype, host.dtype) else self.g.to(host.dtype)
        return (host + g.to(host.device) * (dual - host)).to(host.dtype)
