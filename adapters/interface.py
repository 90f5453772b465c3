"""The adapter interface: what integrations (``dualview.integrations``) and third-party adapters build on.

Writing an adapter: subclass :class:`HostAdapter` (its hooks and declarations are documented there; a
subclass with a ``name`` is registered by :func:`register_adapter`), and make the host's inner class a
:class:`DualViewHost` whose image hook reads :attr:`DualViewHost.dualview_options`,
:attr:`DualViewHost.dualview_dem`, :attr:`DualViewHost.dualview_gate` and builds its encoder with
:meth:`DualViewHost.dualview_encoder`.

Reading an adapted model: :func:`dual_view_host` finds the module that carries dual view; its adapter
is ``type(host).dualview_adapter``, whose :meth:`HostAdapter.options_in` gives the options a config runs
with and :meth:`HostAdapter.geometry` what the tower hands the DEM; :func:`dem_parent_of` is where the
DEM (``DEM_ATTR``), the gate (``GATE_ATTR``) and the projector are.

Building dual view elsewhere (a serving engine's own model class): :func:`new_dem`, :func:`new_gate` and
:func:`encoder_from` make the DEM, the gate and the encoder exactly as ``apply`` does.
"""

from __future__ import annotations

from ._common import (
    CONFIG_KEY, DEM_ATTR, GATE_ATTR, DualViewOptions, record_options, recorded_options,
)
from ._host import (
    DualViewHost, GuardsDualViewModules, dem_parent_of, dem_settings, encoder_from, new_dem, new_gate,
    record_dem_settings, unwrap_dem,
)
from .base import Geometry, HostAdapter, Placement
from .registry import adapter_for_class, adapter_named, register_adapter, registered_adapters


def dual_view_host(model):
    """The module of ``model`` (itself or a submodule) that carries dual view, or a ValueError."""
    for module in model.modules():
        if isinstance(module, DualViewHost):
            return module
    raise ValueError(f"this {type(model).__name__} has no dual view: call dualview.apply(model) first")


__all__ = [
    "CONFIG_KEY", "DEM_ATTR", "GATE_ATTR", "DualViewHost", "DualViewOptions", "Geometry", "GuardsDualViewModules",
    "HostAdapter", "Placement", "adapter_for_class", "adapter_named", "dem_parent_of", "dem_settings", "dual_view_host",
    "encoder_from", "new_dem", "new_gate", "record_dem_settings", "record_options", "recorded_options",
    "register_adapter", "registered_adapters", "unwrap_dem",
]
