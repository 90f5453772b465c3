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


def cpu_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """``module.state_dict()`` copied to the CPU, also when accelerate offloaded it: each submodule's
    weights are loaded from its hook's store (``align_module_device``) while they are read. A tensor
    left on "meta" (no hook holds it) is a ValueError naming it."""
    state = module.state_dict()
    if not any(t.device.type == "meta" for t in state.values()):
        return {k: t.detach().to("cpu", copy=True).contiguous() for k, t in state.items()}
    from accelerate.utils import align_module_device

    found: dict[str, torch.Tensor] = {}
    for name, sub in module.named_modules():
        with align_module_device(sub, "cpu"):  # loads sub's own offloaded weights for this read
            for key, tensor in sub.state_dict().items():
                full = f"{name}.{key}" if name else key
                if tensor.device.type != "meta" and full not in found:
                    found[full] = tensor.detach().to("cpu", copy=True).contiguous()
    missing = sorted(set(state) - set(found))
    if missing:
        raise ValueError(f"the weights {missing} are on the 'meta' device with no accelerate hook that holds them")
    return {k: found[k] for k in state}
