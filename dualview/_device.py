"""Where a module computes, also when accelerate offloaded it (``cpu_offload``, ``dispatch_model``,
``device_map`` loading): its weights then sit on "meta" behind hooks that load them at each call."""

from __future__ import annotations

import torch
from torch import nn


def placement(module: nn.Module) -> torch.device:
    """The device ``module`` computes on: its parameters', or, when accelerate offloaded it (its
    weights on "meta" behind accelerate's hooks, loaded from "cpu" / "disk" at each call), the
    hooks' execution device. "meta" only for a module built on meta without hooks."""
    ref = next(module.parameters())
    if ref.device.type != "meta":
        return ref.device
    for sub in module.modules():
        hook = getattr(sub, "_hf_hook", None)
        for one in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook
            device = getattr(one, "execution_device", None)
            if device is not None:
                return torch.device(device)
    return ref.device
