"""Serve dual-view models with vLLM: a plug-in (``pip install "/path/to/dualview[vllm]"`` from a checkout).

vLLM loads every ``vllm.general_plugins`` entry point at start-up; dualview's calls :func:`register`,
which registers the architecture ``DualViewLlavaNextForConditionalGeneration`` (a subclass of vLLM's
own ``LlavaNextForConditionalGeneration``). A folder saved from a model adapted by
:mod:`dualview.adapters.hf_llava_next` is served as is once its ``config.json`` names that
architecture: save it with :func:`save_pretrained`, or mark a saved folder with :func:`mark_for_vllm`
(or pass ``--hf-overrides '{"architectures": ["DualViewLlavaNextForConditionalGeneration"]}'``)::

    from dualview.integrations import vllm_plugin
    vllm_plugin.save_pretrained(model, "my-dualview-model")    # model.save_pretrained + architectures
    processor.save_pretrained("my-dualview-model")
    # then: vllm serve ./my-dualview-model

What the subclass changes is only where vLLM turns pixels into features
(``_process_image_pixels``): the AnyRes base image, the R*C tiles and the R*C strided global crops
``canvas[a::R, b::C]`` of every image go through vLLM's vision tower in ONE batch, the DEM fuses the
local and global maps, and the fused map is cut back into the tiles' windows in the host's order;
the projector, unpad and ``image_newline`` packing are vLLM's. That is exactly what
:func:`dualview.adapters.hf_llava_next.anyres_dual_view` computes (called here, not re-implemented),
so the number of image tokens is plain LLaVA-NeXT's and vLLM's own multi-modal processor stays
valid. The DEM is the submodule ``spatial_embed``, built from ``config.dualview`` and loaded from the
checkpoint's ``model.spatial_embed.*`` keys (strictly: vLLM refuses a checkpoint without them); under
``init="identity"`` the gate ``spatial_gate`` likewise, from ``model.spatial_gate.*``, and run as the
adapter runs it. Checkpoints written by transformers 5 name the vision tower ``vision_tower.embeddings.*``
where vLLM's module is ``vision_tower.vision_model.*``: the weight mapper accepts either. A weight held
under two names that load into one parameter (the tower's two layouts, ``model.spatial_embed.X`` and
``spatial_embed.X``) is refused, not loaded twice, and so is a DEM / gate weight whose name or shape the
config's options do not build (:func:`checked_weights`, the key and both shapes named).

:func:`register` also registers vLLM's plain ``LlavaNextForConditionalGeneration`` again, as a subclass
that only refuses a dual-view folder whose config.json still names the plain architecture, saying how
to mark it (:func:`check_plain_config`); vLLM alone would fail with "no module or parameter named 'model'".

This module imports without vLLM; the model class is built on first access (vLLM's registry
imports it by name: ``dualview.integrations.vllm_plugin:DualViewLlavaNextForConditionalGeneration``).
LLaVA-OneVision, InternVL and Idefics3 are not served yet (see docs/serving.md).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from dualview.adapters.interface import CONFIG_KEY, DEM_ATTR, GATE_ATTR, DualViewOptions, recorded_options

LLAVA_NEXT = "DualViewLlavaNextForConditionalGeneration"
ARCHITECTURES = {LLAVA_NEXT: "LlavaNextForConditionalGeneration"}
"""The plug-in's architectures -> the transformers host architecture each one serves."""
GUARDS = {host: f"Guarded{host}" for host in ARCHITECTURES.values()}
"""The served hosts' architectures -> vLLM's plain class of each, subclassed only to refuse a dual-view
checkpoint whose config.json still names the host (see :func:`check_plain_config`)."""


def register() -> None:
    """The ``vllm.general_plugins`` entry point: register the dual-view architectures with vLLM
    (lazily, by name: nothing of vLLM's model code is imported here), and the hosts' architectures as
    their guarded plain classes. Idempotent."""
    from vllm import ModelRegistry

    supported = set(ModelRegistry.get_supported_archs())
    for arch in ARCHITECTURES:
        if arch not in supported:
            ModelRegistry.register_model(arch, f"{__name__}:{arch}")
    for host, guard in GUARDS.items():
        ModelRegistry.register_model(host, f"{__name__}:{guard}")


def check_plain_config(config: Any, architecture: str) -> None:
    """A ValueError for a config saved from a dual-view model (it has a ``dualview`` entry) that names the
    plain ``architecture``: vLLM's plain class would fail on the DEM weights ("no module or parameter
    named 'model'") and could never serve dual view. Any other config passes."""
    if getattr(config, CONFIG_KEY, None) is None:
        return
    served = _served_as([architecture], f"architecture {architecture!r}")
    raise ValueError(
        f"this checkpoint was saved from a dual-view model (its config.json has a '{CONFIG_KEY}' entry) but names the "
        f"architecture {architecture!r}, which vLLM serves without dual view: mark the folder for the plug-in with "
        f"dualview.integrations.vllm_plugin.mark_for_vllm(folder) (or save it with vllm_plugin.save_pretrained), or "
        f"pass --hf-overrides '{{\"architectures\": [\"{served}\"]}}' (vllm.LLM(..., hf_overrides=...))"
    )


def _check_options(entry: Any, where: str) -> None:
    """``config.dualview`` of ``where`` must be the dict of dual-view options an adapter records:
    ``None`` (switched off by hand) or another value is refused, not served as dual view."""

    if not isinstance(entry, dict):
        raise ValueError(
            f"{where} was not saved from a dual-view model: its config's '{CONFIG_KEY}' entry must be the dict of "
            f"dual-view options recorded by dualview.adapters.hf_llava_next, got {json.dumps(entry) if entry is None else type(entry).__name__}"
        )
    try:
        DualViewOptions.from_kwargs(**entry)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: its config's '{CONFIG_KEY}' entry is not valid dual-view options: {e}") from None


def mark_for_vllm(folder: Union[str, Path]) -> Path:
    """Point ``folder/config.json`` (saved from a dual-view model) at the plug-in's architecture,
    so that ``vllm serve folder`` runs dual view. transformers' loaders ignore the field (the
    adapter's ``from_pretrained`` still loads the folder). The config is replaced atomically (a
    temporary file, then ``os.replace``). Returns the config path."""
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    if CONFIG_KEY not in config:
        raise ValueError(f"{str(folder)!r} was not saved from a dual-view model: its config.json has no "
                         f"'{CONFIG_KEY}' entry (apply dualview.adapters.hf_llava_next before saving)")
    _check_options(config[CONFIG_KEY], repr(str(folder)))
    archs = config.get("architectures") or []
    if archs and all(a in ARCHITECTURES for a in archs):
        return path
    config["architectures"] = [_served_as(archs, repr(str(folder)))]
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=".config.", suffix=".json", delete=False) as tmp:
        tmp.write(json.dumps(config, indent=2, sort_keys=True) + "\n")
    try:
        os.chmod(tmp.name, path.stat().st_mode & 0o777)  # the temporary file's 0600 would hide the config
        os.replace(tmp.name, path)
    except BaseException:
        os.unlink(tmp.name)
        raise
    return path


def _served_as(archs: list, where: str) -> str:
    """The plug-in's architecture serving a checkpoint whose config names ``archs``."""
    hosts = {host: arch for arch, host in ARCHITECTURES.items()}
    if len(archs) != 1 or archs[0] not in hosts:
        raise ValueError(f"{where}: architectures {archs} has no dual-view vLLM architecture; served: "
                         f"{sorted(hosts)} (as {sorted(ARCHITECTURES)})")
    return hosts[archs[0]]


def save_pretrained(model: Any, folder: Union[str, Path], **kwargs: Any) -> Path:
    """``model.save_pretrained(folder, **kwargs)`` of an adapted model, then :func:`mark_for_vllm`.

    The model is checked first (a dual-view model of a host the plug-in serves): a refused model
    writes nothing. ``push_to_hub`` is refused (it would upload the folder before it is marked):
    upload the saved folder afterwards, e.g. with ``huggingface_hub.upload_folder``."""
    if kwargs.get("push_to_hub"):
        raise ValueError(
            "push_to_hub=True is not supported: it uploads the folder before its config.json names the plug-in's "
            "architecture; save, then upload the folder (huggingface_hub.upload_folder(folder_path=folder, ...))"
        )
    where = f"model ({type(model).__name__})"
    from dualview.adapters.interface import DualViewHost

    inner = getattr(model, "model", None)
    config = getattr(model, "config", None)
    if not isinstance(inner, DualViewHost) or config is None or CONFIG_KEY not in vars(config):
        raise ValueError(
            f"{where} is not a dual-view model: apply dualview.adapters.hf_llava_next to a LlavaNextForConditionalGeneration "
            f"before saving it for vLLM (its inner model is a {type(inner).__name__})"
        )
    _check_options(getattr(config, CONFIG_KEY), where)
    _served_as([type(model).__name__], where)
    model.save_pretrained(folder, **kwargs)
    mark_for_vllm(folder)
    return Path(folder)


_TOWER_NAME = re.compile(r"^(model\.)?vision_tower\.(vision_model\.)?")
"""A vision-tower weight in either layout: llava-hf's ``vision_tower.vision_model.*`` or transformers 5's
``model.vision_tower.*`` (no ``vision_model.`` level); both load into vLLM's ``vision_tower.vision_model.*``."""
_DUAL_VIEW_NAME = re.compile(rf"^(model\.)?({DEM_ATTR}|{GATE_ATTR})\.")
"""A DEM or gate weight: the adapter saves ``model.spatial_embed.*`` / ``model.spatial_gate.*``; vLLM's
model holds them as ``spatial_embed.*`` / ``spatial_gate.*``, and a bare name loads there too."""
DUAL_VIEW_PREFIXES = {f"model.{DEM_ATTR}.": f"{DEM_ATTR}.", f"model.{GATE_ATTR}.": f"{GATE_ATTR}."}
"""The adapter's checkpoint prefixes of the DEM and the gate -> the plug-in model's (vLLM's weight mapper)."""


def served_name(name: str) -> Optional[str]:
    """The plug-in model's parameter that the checkpoint weight ``name`` loads into, for the weights
    saved under two names (the vision tower's layouts, the DEM's and gate's prefixed and bare names);
    None for any other weight (the host's own, which vLLM's mapper places)."""
    match = _TOWER_NAME.match(name)
    if match:
        return "vision_tower.vision_model." + name[match.end():]
    match = _DUAL_VIEW_NAME.match(name)
    if match:
        return f"{match.group(2)}." + name[match.end():]
    return None


def checked_weights(weights: Any, dual_view: Mapping[str, tuple]) -> Any:
    """``weights`` ((name, tensor) pairs, as vLLM's loader takes them) passed on one by one, checked
    against ``dual_view`` (the served DEM's and gate's parameter names, e.g. ``spatial_embed.pos``, ->
    shapes). A ValueError naming the checkpoint key for: a weight present under two names that load into
    one parameter (the later would silently win, where transformers keeps the first: two engines, two
    models); a DEM / gate weight the served model has no parameter for; one of another shape."""
    seen: dict = {}
    for name, tensor in weights:
        target = served_name(name)
        if target is not None:
            if target in seen:
                raise ValueError(
                    f"checkpoint holds the weight {target!r} twice, as {seen[target]!r} and {name!r} (both load into "
                    f"one parameter of the served model): keep one name in the checkpoint"
                )
            seen[target] = name
            if _DUAL_VIEW_NAME.match(name):
                _check_dual_view_weight(name, target, tuple(tensor.shape), dual_view)
        yield name, tensor


def dual_view_shapes(module: Any) -> dict:
    """The DEM's and the gate's state-dict names on ``module`` (which holds them as ``spatial_embed`` /
    ``spatial_gate``: the plug-in's model, the adapter's inner model) -> shapes."""
    held = {attr: _stood_for(module._modules[attr]) for attr in (DEM_ATTR, GATE_ATTR) if attr in module._modules}
    return {f"{attr}.{key}": tuple(tensor.shape) for attr, sub in held.items() for key, tensor in sub.state_dict().items()}


def _stood_for(module: Any) -> Any:
    """``module``, or the module a vLLM ``StageMissingLayer`` stands for (a tower module skipped when images
    are off: built on "meta", kept in its ``__dict__["module"]``, its checkpoint weights dropped)."""
    return vars(module).get("module") or module


def _check_dual_view_weight(name: str, target: str, shape: tuple, dual_view: Mapping[str, tuple]) -> None:
    """The checkpoint's DEM / gate weight ``name`` fits the served model's parameter ``target``."""
    if target not in dual_view:
        raise ValueError(
            f"checkpoint weight {name!r} has no parameter {target!r} in the dual-view model built from its config's "
            f"'{CONFIG_KEY}' options (which has {sorted(dual_view)}): the config does not match the weights"
        )
    if shape != tuple(dual_view[target]):
        raise ValueError(
            f"checkpoint weight {name!r} has shape {shape}, but the dual-view model built from its config's "
            f"'{CONFIG_KEY}' options has {target!r} of shape {tuple(dual_view[target])}: the config does not match "
            f"the weights"
        )


def served_options(config: Any) -> DualViewOptions:
    """The options a served model runs with: its ``config.dualview`` (refused without one), AnyRes's
    fixed choices checked (a fixed option edited by hand is a ValueError), the pinpoints the config's."""
    from dualview.adapters.hf_llava_next import LlavaNextAdapter

    if recorded_options(config) is None:
        raise ValueError(
            f"{LLAVA_NEXT} serves models saved from dualview.adapters.hf_llava_next: this config has no "
            f"'{CONFIG_KEY}' entry"
        )
    return LlavaNextAdapter.options_in(config)


def __getattr__(name: str) -> Any:
    """The vLLM model classes, built (and cached) on first access: they subclass vLLM's."""
    if name == LLAVA_NEXT:
        cls = _llava_next_class()
        globals()[name] = cls
        return cls
    if name == GUARDS[ARCHITECTURES[LLAVA_NEXT]]:
        cls = _guarded_llava_next_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _llava_next_class() -> type:
    import torch
    from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration
    from vllm.model_executor.models.utils import WeightsMapper

    from dualview import DualViewEncoder
    from dualview.adapters import hf_llava_next
    from dualview.adapters.interface import encoder_from, new_dem, new_gate

    plain_mapper = LlavaNextForConditionalGeneration.hf_to_vllm_mapper

    class DualViewLlavaNextForConditionalGeneration(LlavaNextForConditionalGeneration):
        """vLLM's LLaVA-NeXT whose tile features are dual view (see the module docstring)."""

        hf_to_vllm_mapper = WeightsMapper(
            # transformers 5 saves the tower without its `vision_model.` level; llava-hf checkpoints have it
            orig_to_new_regex={re.compile(r"^(model\.)?vision_tower\.(?!vision_model\.)"): "vision_tower.vision_model."},
            orig_to_new_prefix={**DUAL_VIEW_PREFIXES, **plain_mapper.orig_to_new_prefix},
        )

        def load_weights(self, weights: Any) -> Any:
            return super().load_weights(checked_weights(weights, dual_view_shapes(self)))

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            super().__init__(vllm_config=vllm_config, prefix=prefix)
            options = self.dualview_options
            geometry = hf_llava_next.LlavaNextAdapter.geometry(self)  # read from self.config
            towers = list(self._tower_model_names)
            with self._mark_tower_model(vllm_config, "image"):  # skipped with the tower when images are off
                # with images off the projector is a StageMissingLayer: the DEM is made on "meta" beside it
                dem = new_dem(options, geometry.dim, geometry.feat_size, like=_stood_for(self.multi_modal_projector))
                gate = new_gate(options, dem)  # init="identity": the adapter's spatial_gate
                self.spatial_embed = dem
                if gate is not None:
                    self.spatial_gate = gate
            self._tower_model_names = towers + list(self._tower_model_names)

        @property
        def dualview_options(self) -> DualViewOptions:
            """``config.dualview`` with AnyRes's fixed choices checked, the pinpoints the config's."""
            return served_options(self.config)

        def dualview_encoder(self) -> DualViewEncoder:
            """DCM (from the options) -> vLLM's vision tower -> ``spatial_embed``, built now."""
            geometry = hf_llava_next.LlavaNextAdapter.geometry(self)
            tokens = geometry.feat_size[0] * geometry.feat_size[1]
            strategy = self.config.vision_feature_select_strategy

            def tower(pixels: torch.Tensor) -> torch.Tensor:
                feats = self._image_pixels_to_features(self.vision_tower, pixels)
                if feats.shape[1] != tokens:
                    raise ValueError(
                        f"dual view needs the tower's {tokens} patch tokens per crop, got {feats.shape[1]} with "
                        f"vision_feature_select_strategy={strategy!r}: use 'default' with a CLS tower (CLIP), "
                        f"'full' with SigLIP"
                    )
                return feats

            return encoder_from(self.dualview_options, tower, self.spatial_embed, crop_size=geometry.crop,
                                patch_size=geometry.patch, gate=getattr(self, GATE_ATTR, None))

        def _process_image_pixels(self, inputs: Any) -> tuple[torch.Tensor, ...]:
            """Per image (1 + R*C, h*w, text_dim): the base image's and the DEM-fused tiles' projected
            features, in vLLM's layout (its ``_merge_image_patch_embeddings`` unpads and packs them)."""
            pixel_values = inputs["pixel_values"]
            image_sizes = inputs.get("image_sizes")
            if image_sizes is None:
                raise ValueError(f"{LLAVA_NEXT} needs image_sizes (the AnyRes grid of each image) with pixel_values")
            if not isinstance(pixel_values, torch.Tensor):
                pixel_values = torch.cat(list(pixel_values))  # stacked (sum of 1 + R*C, 3, s, s)
            per_image = hf_llava_next.anyres_dual_view(self.dualview_encoder(), pixel_values, image_sizes)
            projector_dtype = next(self.multi_modal_projector.parameters()).dtype
            projected = self.multi_modal_projector(torch.cat(per_image).to(projector_dtype))
            return projected.split([t.shape[0] for t in per_image])

    DualViewLlavaNextForConditionalGeneration.__qualname__ = LLAVA_NEXT  # pickled by name, as registered
    return DualViewLlavaNextForConditionalGeneration


def _guarded_llava_next_class() -> type:
    from vllm.model_executor.models.llava_next import LlavaNextForConditionalGeneration

    host, name = ARCHITECTURES[LLAVA_NEXT], GUARDS[ARCHITECTURES[LLAVA_NEXT]]

    class Guarded(LlavaNextForConditionalGeneration):
        """vLLM's plain LLaVA-NeXT, which refuses a dual-view checkpoint not marked for the plug-in."""

        def __init__(self, *, vllm_config: Any, prefix: str = "") -> None:
            check_plain_config(vllm_config.model_config.hf_config, host)
            super().__init__(vllm_config=vllm_config, prefix=prefix)

    Guarded.__name__ = Guarded.__qualname__ = name  # pickled by name, as registered
    return Guarded
