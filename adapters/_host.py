"""How an adapter lives inside its host model, the way PEFT lives in a transformers model.

``apply`` swaps the class of ONE host module (``LlavaModel``, a llava ``Llava*ForCausalLM``, ...)
for a module-level subclass of it that overrides the one hook where images become features
(``get_image_features``, ``encode_images``), registers the DEM as the real submodule
``spatial_embed`` and records the options in ``config.dualview``. The hook looks everything up at
call time (the DEM in the module tree, the options in the config), so a replaced or reloaded
``spatial_embed`` is what runs, and the model pickles, deep-copies and ``torch.save`` s like the
plain one. :func:`unapply` swaps the plain class back and removes the DEM and the options.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from dualview import DCM, DEM, DualViewEncoder
from dualview import grid as G

from ._common import CONFIG_KEY, DualViewOptions, record_options, recorded_options

DEM_ATTR = "spatial_embed"
"""Name of the DEM submodule (INF-LLaVA's), on the module whose class is swapped or its inner model."""


class DualViewHost:
    """First base of every dual-view subclass of a host module.

    A subclass names its adapter and the plain host class it extends; its hook reads
    :attr:`dualview_options` and :attr:`dualview_dem` at every call.
    """

    dualview_adapter: ClassVar[str] = ""
    """Module name under ``dualview.adapters`` (for messages)."""
    dualview_plain: ClassVar[type]
    """The host class this subclass extends: what :func:`unapply` restores."""

    @property
    def dualview_options(self) -> DualViewOptions:
        """The options in ``config.dualview``, read now (a changed config is what runs)."""
        recorded = recorded_options(self.config)
        if recorded is None:
            raise ValueError(
                f"config.{CONFIG_KEY} is missing: the dual-view options of this {type(self).__name__} were removed; "
                f"call dualview.adapters.{self.dualview_adapter}.unapply(model) and apply it again"
            )
        return DualViewOptions.from_kwargs(**recorded)

    @property
    def dualview_dem(self) -> DEM:
        """The DEM registered in the module tree, looked up now."""
        dem = dem_of(self)
        if not isinstance(dem, DEM):
            raise TypeError(f"{DEM_ATTR} must be a dualview.DEM, got {type(dem).__name__}")
        return dem

    def dualview_encoder(self, tower: nn.Module, *, crop_size: int, patch_size: int) -> DualViewEncoder:
        """DCM (from the options) -> ``tower`` -> the registered DEM -> thumbnail fusion, built now."""
        return encoder_from(self.dualview_options, tower, self.dualview_dem, crop_size=crop_size, patch_size=patch_size)


def dem_of(host: nn.Module) -> nn.Module:
    """``host.spatial_embed``, or where the host keeps its language model's wrapper, its inner model's."""
    if DEM_ATTR in host._modules:
        return host._modules[DEM_ATTR]
    inner = host.get_model() if hasattr(host, "get_model") else None
    if inner is not None and DEM_ATTR in inner._modules:
        return inner._modules[DEM_ATTR]
    raise AttributeError(f"{type(host).__name__} has no {DEM_ATTR} submodule")


def encoder_from(
    options: DualViewOptions, tower: nn.Module, dem: DEM, *, crop_size: int, patch_size: int
) -> DualViewEncoder:
    """A DualViewEncoder over ``tower`` with a DCM built from ``options`` and the given ``dem``."""
    dcm = DCM(crop_size, options.grid, fit=options.fit, max_tiles=options.max_tiles, pinpoints=options.pinpoints)
    return DualViewEncoder(
        tower, dcm, dem, thumbnail_fusion=options.thumbnail_fusion, tower_batch_size=options.tower_batch_size,
        patch_size=patch_size,
    )


def new_dem(
    options: DualViewOptions, dim: int, feat_size: G.Size, *, like: nn.Module, init: Optional[Callable] = None
) -> DEM:
    """A fresh DEM of ``dim`` channels for the options, on the device and in the dtype of ``like``
    (the host's projector). ``out_size="tower"`` means the tower's token grid ``feat_size``.

    ``init``: the host's per-module initialiser (transformers' ``_init_weights``). The DEM is then
    made on the meta device and every layer initialised by it alone, as the host initialises
    weights missing from a checkpoint: one rule, and one seed gives one DEM, whichever path built it.
    """
    out_size = feat_size if options.out_size == "tower" else options.out_size
    ref = next(like.parameters())
    device = ref.device if ref.device.type != "meta" else torch.device("cpu")
    settings = dict(out_size=out_size, directions=options.directions, fusion=options.fusion, resample=options.resample)
    if init is None:
        return DEM(dim, options.num_heads, **settings, device=device, dtype=ref.dtype)
    dem = DEM(dim, options.num_heads, **settings, device="meta", dtype=ref.dtype).to_empty(device=device)
    dem.apply(init)  # post-order, as transformers' initialize_weights visits modules
    return dem


def attach(
    host: nn.Module,
    subclass: type,
    *,
    options: DualViewOptions,
    dem: DEM,
    config: Any,
    dem_parent: Optional[nn.Module] = None,
) -> None:
    """Swap ``host``'s class for ``subclass``, register ``dem`` as ``spatial_embed`` on ``dem_parent``
    (default: ``host``) and record ``options`` in ``config``."""
    plain = subclass.dualview_plain
    check_not_applied(host)
    if type(host) is not plain:
        fits = adapter_for(type(host))
        hint = f": use dualview.adapters.{fits}" if fits else ""
        raise TypeError(
            f"dualview.adapters.{subclass.dualview_adapter} adapts {plain.__name__} models, got "
            f"{type(host).__name__}{hint}"
        )
    host.__class__ = subclass
    (dem_parent if dem_parent is not None else host).add_module(DEM_ATTR, dem)
    record_options(config, options)


def check_not_applied(host: nn.Module) -> None:
    """A ValueError if ``host`` already carries dual view (``apply`` twice is a mistake, not a no-op:
    a second DEM would silently replace a trained one)."""
    if isinstance(host, DualViewHost):
        adapter = type(host).dualview_adapter
        raise ValueError(
            f"dual view is already applied to this {type(host).dualview_plain.__name__} (by dualview.adapters."
            f"{adapter}); call dualview.adapters.{adapter}.unapply(model) first to apply it again"
        )


def unapply(host: nn.Module, *, config: Any, dem_parent: Optional[nn.Module] = None) -> None:
    """Undo :func:`attach`: the plain class back, the DEM and the recorded options removed."""
    if not isinstance(host, DualViewHost):
        raise ValueError(f"this {type(host).__name__} has no dual view applied: nothing to unapply")
    host.__class__ = type(host).dualview_plain
    parent = dem_parent if dem_parent is not None else host
    if DEM_ATTR in parent._modules:
        delattr(parent, DEM_ATTR)
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)


def adapted(host: nn.Module, adapter: str) -> DualViewHost:
    """``host`` if it carries dual view, else a ValueError saying how to apply it."""
    if not isinstance(host, DualViewHost):
        raise ValueError(f"model has no dual view: call dualview.adapters.{adapter}.apply(model) first")
    return host


# plain host class name -> the adapter that fits it (for the "wrong adapter" message)
_ADAPTER_FOR = {
    "LlavaModel": "hf_llava",
    "LlavaNextModel": "hf_llava_next",
    "LlavaOnevisionModel": "hf_llava_onevision",
    "InternVLModel": "hf_internvl",
    "Idefics3Model": "hf_idefics3",
    "SmolVLMModel": "hf_idefics3",
    "LlavaLlamaForCausalLM": "llava15",
    "LlavaMistralForCausalLM": "llava15",
    "LlavaMptForCausalLM": "llava15",
}


def adapter_for(cls: type) -> Optional[str]:
    """The adapter module that handles host class ``cls`` (by name), if any."""
    return _ADAPTER_FOR.get(cls.__name__)


# ---- the vision tower's own outputs, for get_image_features(output_hidden_states=..., output_attentions=...)


class RecordingTower(nn.Module):
    """A patch-token tower (``HFVisionTower``) that, when asked, also keeps the transformers vision
    model's ``hidden_states`` / ``attentions`` of every crop it ran (one entry per layer, crops of all
    chunks concatenated in tower-batch order: the order :meth:`DualViewEncoder.encode_crops` gathers
    them in). Without a request it is the tower itself (layer-truncated where the tower does that)."""

    def __init__(self, tower: nn.Module, *, hidden_states: bool = False, attentions: bool = False) -> None:
        super().__init__()
        self.tower = tower
        self.hidden_states = hidden_states
        self.attentions = attentions
        self.recorded: list = []
        self.patch_size = tower.patch_size

    def outputs(self) -> dict:
        """``hidden_states`` / ``attentions`` tuples over all recorded chunks (keys only when asked)."""
        out = {}
        for key, wanted in (("hidden_states", self.hidden_states), ("attentions", self.attentions)):
            if wanted and self.recorded:
                per_chunk = [getattr(o, key) for o in self.recorded]
                out[key] = tuple(torch.cat(layer) for layer in zip(*per_chunk))
        return out

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if not (self.hidden_states or self.attentions):
            return self.tower(pixels)
        tower = self.tower
        dtype = next(tower.model.parameters()).dtype
        out = tower.model(
            pixel_values=pixels.to(dtype=dtype), output_hidden_states=True, output_attentions=self.attentions, return_dict=True
        )
        self.recorded.append(out)
        feats = torch.cat([out.hidden_states[i] for i in tower.layers], dim=-1)
        if getattr(tower, "select", "patch") == "patch":
            feats = feats[:, tower.num_prefix_tokens:]
        return feats.to(pixels.dtype)


def output_flags(config: Any, kwargs: dict) -> tuple[bool, bool]:
    """``output_hidden_states`` / ``output_attentions`` as the host reads them: the call's keyword,
    else the config's. A list of indices for ``output_hidden_states`` counts as a request."""
    flags = []
    for key in ("output_hidden_states", "output_attentions"):
        value = kwargs.get(key)
        if value is None:
            value = getattr(config, key, False)
        flags.append(bool(value) if not isinstance(value, (list, tuple)) else True)
    return flags[0], flags[1]
