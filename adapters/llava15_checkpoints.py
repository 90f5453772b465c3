"""Whole llava-torch checkpoints with dual view (:mod:`dualview.adapters.llava15` re-exports both
functions): a folder saved by ``save_pretrained`` of an adapted model, or an
INF-LLaVA release, whose keys are llava's plus ``model.spatial_embed.*`` (``transformer.`` for MPT).
The DEM alone, converted to a small file, is ``dualview convert-inf-llava`` (:mod:`dualview.tools.convert`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional, Union

from torch import nn

from dualview.checkpoints import read_tensors

from ._common import (
    CONFIG_KEY, check_device_map, expecting_unexpected_keys, from_pretrained_without_dem, host_folder, load_dem_weights,
    load_gate_weights, recorded_options,
)
from .registry import adapter_named

SAVED_TOWER = r"(^|\.)vision_tower\.vision_tower\."
"""Keys of the vision tower llava saves: llava builds the tower with delay_load=True, so
``from_pretrained`` of the class finds no module for them; they are loaded afterwards."""


def model_class(model_type: str) -> type:
    """The llava class (one of the adapter's ``hosts``) of a config's ``model_type``."""
    classes = {cls.config_class.model_type: cls for cls in adapter_named("llava15").hosts}
    if model_type not in classes:
        raise ValueError(f"config.model_type must be one of {sorted(classes)}, got {model_type!r}")
    return classes[model_type]


def _prefix(model: nn.Module, module: nn.Module) -> str:
    """State-dict prefix of ``module`` inside ``model``: ``model.spatial_embed.`` (``transformer.`` for MPT)."""
    return next(name for name, m in model.named_modules() if m is module) + "."


def from_pretrained(
    path: Union[str, Path], *, options: Optional[Mapping[str, Any]] = None,
    strict: bool = True, **kwargs: Any,
) -> nn.Module:
    """Load a dual-view llava model from a local folder: one saved by ``save_pretrained`` of an
    adapted model, or an INF-LLaVA checkpoint (keys ``model.spatial_embed.*``, ``model.mm_projector.*``).

    The llava class comes from ``config.model_type``; dual view is re-applied with the options in
    config.json (``options`` overrides them; neither: the released INF-LLaVA defaults), the DEM
    weights are loaded strictly, and vision-tower weights saved in the folder replace those read
    from ``mm_vision_tower``. With ``strict``, any other missing or unexpected key is a ValueError.
    ``kwargs`` go to ``from_pretrained`` of the class (``dtype``, ``device_map``, ...). A plain
    LLaVA-1.5 checkpoint has no DEM (ValueError here): use ``apply(cls.from_pretrained(path))``.
    """
    from transformers import AutoConfig  # knows llava's configs: importing llava's classes registered them

    path = Path(path)
    check_device_map(kwargs.get("device_map"))
    folder, files = host_folder(path, kwargs)  # the DEM and the tower are read from the host's own files
    adapter = adapter_named("llava15")  # the registry's: the adapter module imports this one
    cls = model_class(AutoConfig.from_pretrained(folder).model_type)
    with expecting_unexpected_keys(cls, SAVED_TOWER):
        model, info = from_pretrained_without_dem(cls, path, output_loading_info=True, **kwargs)
    problems = {k: sorted(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if strict and any(problems.values()):
        raise ValueError(f"checkpoint {str(path)!r} does not match {cls.__name__}: {problems}")
    settings = dict(recorded_options(model.config) or {})
    settings.update(options or {})
    if hasattr(model.config, CONFIG_KEY):  # recorded again by apply (a plain host carrying it is warned about)
        delattr(model.config, CONFIG_KEY)
    adapter.apply(model, **settings)
    encoder = adapter.encoder_of(model)
    load_dem_weights(encoder.dem, folder, _prefix(model, encoder.dem), **files)
    if encoder.gate is not None:
        load_gate_weights(encoder.gate, folder, _prefix(model, encoder.gate), **files)
    _load_saved_tower(model, folder, _prefix(model, model.get_model()) + "vision_tower.", files)
    return model


def _load_saved_tower(model: nn.Module, path: Path, prefix: str, files: Mapping[str, Any]) -> None:
    """Vision-tower weights stored in the checkpoint (llava saves them) replace the ones read from
    ``mm_vision_tower``: all of them, or none when the checkpoint has none."""
    saved = read_tensors(path, keep=lambda k: k.startswith(prefix), **files)
    if not saved:
        return
    tower = model.get_vision_tower()
    ref = next(tower.parameters())
    state = {k[len(prefix):]: v.to(device=ref.device, dtype=ref.dtype) for k, v in saved.items()}
    incompatible = tower.load_state_dict(state, strict=False)
    if incompatible.missing_keys or incompatible.unexpected_keys:
        raise ValueError(
            f"vision-tower weights under '{prefix}' in {str(path)!r} do not match the tower: missing keys "
            f"{sorted(incompatible.missing_keys)}, unexpected keys {sorted(incompatible.unexpected_keys)}"
        )


def load_checkpoint(model: nn.Module, path: Union[str, Path], *, strict: bool = True) -> None:
    """Load every tensor of a checkpoint (a file, or a sharded folder) with INF-LLaVA's key names
    (``model.spatial_embed.*``, ``model.mm_projector.*``, ...) into an adapted model.

    With ``strict`` a missing or unexpected key is a ValueError that names it. Allowed to be
    missing: a tied weight (``lm_head.weight`` saved once), and the whole vision tower when the
    checkpoint holds none of it (the tower then stays as read from ``mm_vision_tower``)."""
    adapter_named("llava15").encoder_of(model)  # the DEM must exist, or its keys would be "unexpected"
    incompatible = model.load_state_dict(read_tensors(path), strict=False)
    tied = set(model.all_tied_weights_keys)  # only the ties the config asks for (set by post_init)
    tower_prefix = _prefix(model, model.get_model()) + "vision_tower."
    tower_keys = {k for k in model.state_dict() if k.startswith(tower_prefix)}
    missing = set(incompatible.missing_keys) - tied
    if tower_keys <= missing:  # no tower in the checkpoint at all
        missing -= tower_keys
    if strict and (missing or incompatible.unexpected_keys):
        raise ValueError(
            f"checkpoint {str(path)!r} does not match the adapted {type(model).__name__}: missing keys "
            f"{sorted(missing)}, unexpected keys {sorted(incompatible.unexpected_keys)}"
        )
