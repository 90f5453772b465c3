"""How an adapter lives inside its host model, the way PEFT lives in a transformers model.

``apply`` swaps the class of the host's inner module (``LlavaModel``, a llava ``Llava*ForCausalLM``, ...)
for a module-level subclass of it (a :class:`DualViewHost`) that overrides the one hook where images
become features (``get_image_features``, ``encode_images``), registers the DEM as the real submodule
``spatial_embed`` and records the options in ``config.dualview``. The hook looks everything up at
call time (the DEM in the module tree, the options in the config), so a replaced or reloaded
``spatial_embed`` is what runs, and the model pickles, deep-copies and ``torch.save`` s like the
plain one. :func:`detach` swaps the plain classes back and removes the DEM and the options. What a
host is (its projector, the options it fixes, its tower's geometry) is its adapter's
(:class:`~dualview.adapters.base.HostAdapter`), which every dual-view class points at.
"""

from __future__ import annotations

import functools
import gc
import warnings
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch
from torch import nn

from dualview import DCM, DEM, DualViewEncoder
from dualview import grid as G
from dualview._device import placement  # noqa: F401 - the adapters' name for it
from dualview.gate import DualViewGate

from ._common import CONFIG_KEY, DEM_ATTR, GATE_ATTR, DualViewOptions, record_options, recorded_options
from .registry import adapter_for_class

@dataclass(frozen=True)
class Geometry:
    """What the host's tower hands the DEM: ``dim`` channels per token, crops of ``crop`` pixels cut
    into ``patch``-pixel patches (``feat_size`` tokens)."""

    dim: int
    crop: int
    patch: int

    @property
    def feat_size(self) -> G.Size:
        return G.crop_tokens(self.crop, self.patch)


@dataclass(frozen=True)
class Placement:
    """Where dual view lives in one host model: ``outer`` (the model ``apply`` was given), ``inner`` (the
    module whose image hook becomes dual view) and ``dem_parent`` (the module that holds the projector,
    and gets ``spatial_embed`` and ``spatial_gate``). They may be one module."""

    outer: nn.Module
    inner: nn.Module
    dem_parent: nn.Module

    def modules(self) -> list[nn.Module]:
        """outer, inner, dem_parent, each once."""
        out: list[nn.Module] = []
        for module in (self.outer, self.inner, self.dem_parent):
            if all(module is not m for m in out):
                out.append(module)
        return out


class GuardsDualViewModules:
    """Mixin of a dual-view class whose instance holds ``spatial_embed`` (and ``spatial_gate``): assigning
    one is checked before it replaces the registered one (a DEM of the tower's width and token grid,
    a gate of the DEM's width), and the new DEM's settings are recorded in ``config.dualview`` so that
    what is saved describes what runs; deleting them, or assigning None, is refused
    (:func:`check_kept`: ``unapply`` removes dual view). ``dualview_adapter`` is set when the adapter
    that lists the class registers."""

    dualview_adapter: ClassVar[type]  # the HostAdapter subclass
    dualview_plain: ClassVar[type]
    """The host class this subclass extends: what ``unapply`` restores."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in (DEM_ATTR, GATE_ATTR):  # every other attribute (train(), accelerate's hooks) as usual
            return super().__setattr__(name, value)
        adapter = type(self).dualview_adapter
        if not isinstance(value, nn.Module):  # None or another value would remove the DEM (or the gate)
            check_kept(self, name, value, adapter=adapter.name)
            return super().__setattr__(name, value)
        check_holds_dem(self, name)
        module = unwrap_dem(value)
        if name == DEM_ATTR:  # a wrong DEM is refused before it replaces the right one
            check_assigned_dem(self, module, adapter)
        else:
            check_gate_fits(module, dim=unwrap_dem(dem_of(self)).dim, adapter=adapter.name)
        super().__setattr__(name, value)
        if name == DEM_ATTR:
            record_dem_settings(self.config, module)  # what is saved describes the DEM that runs

    def __delattr__(self, name: str) -> None:
        check_kept(self, name, adapter=type(self).dualview_adapter.name, deleting=True)
        super().__delattr__(name)


class DualViewHost(GuardsDualViewModules):
    """First base of every dual-view subclass of a host's inner module.

    A subclass names the plain host class it extends (``dualview_plain``) and overrides the host's image
    hook, which reads :attr:`dualview_options`, :attr:`dualview_dem` and :attr:`dualview_gate` at every
    call and builds its encoder with :meth:`dualview_encoder`; its adapter lists it in
    ``dual_view_classes``.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        plain = cls.__dict__.get("dualview_plain")
        if plain is not None:
            _inherit_conversion_mapping(cls, plain)

    @classmethod
    def is_custom_code(cls) -> bool:
        """transformers treats classes outside its package as custom code and then skips their
        checkpoint key conversions; a dual-view subclass is the plain host class plus a hook."""
        plain = getattr(cls, "dualview_plain", None)
        return plain.is_custom_code() if plain is not None and hasattr(plain, "is_custom_code") else False

    def save_pretrained(self, *args: Any, **kwargs: Any) -> Any:
        dem = self.dualview_dem
        record_dem_settings(self.config, dem)  # the saved options describe the DEM that is saved
        return super().save_pretrained(*args, **kwargs)

    @property
    def dualview_options(self) -> DualViewOptions:
        """The options in ``config.dualview``, read now (a changed config is what runs)."""
        return type(self).dualview_adapter.options_in(self.config)

    @property
    def dualview_dem(self) -> DEM:
        """The DEM registered in the module tree, looked up now (through wrappers that keep it:
        ``torch.compile``, activation checkpointing, PEFT's ``modules_to_save``) and checked to fit."""
        dem = unwrap_dem(dem_of(self))
        check_assigned_dem(dem_parent_of(self), dem, type(self).dualview_adapter)
        return dem

    @property
    def dualview_gate(self) -> Optional[DualViewGate]:
        """The :class:`~dualview.gate.DualViewGate` registered beside the DEM (``spatial_gate``), looked
        up now through the same wrappers; None under ``init="released"``. A missing or surplus gate
        for the recorded ``init`` is a ValueError."""
        init = self.dualview_options.init
        gate = gate_of(self)
        if init == "released":
            if gate is not None:
                raise ValueError(
                    f"{GATE_ATTR} is registered but config.{CONFIG_KEY}['init'] is 'released' (no gate): delete "
                    f"{GATE_ATTR} or record init='identity'"
                )
            return None
        if gate is None:
            raise ValueError(f"config.{CONFIG_KEY}['init'] is 'identity' but the model has no {GATE_ATTR} submodule")
        gate = unwrap_dem(gate)
        check_gate_fits(gate, dim=self.dualview_dem.dim, adapter=type(self).dualview_adapter.name)
        return gate

    def dualview_project(self, feats: torch.Tensor) -> torch.Tensor:
        """``feats`` through the host's projector (connector), cast to its dtype first: a DEM kept in
        another precision than the model (a float32 DEM in bf16, or the reverse) hands it the model's."""
        projector = getattr(dem_parent_of(self), type(self).dualview_adapter.projector)
        return projector(to_dtype_of(feats, projector))

    def dualview_encoder(self, tower: nn.Module) -> DualViewEncoder:
        """DCM (from the options) -> ``tower`` -> the registered DEM -> thumbnail fusion, built now; the
        crop and patch are the adapter's geometry of this host."""
        geometry = type(self).dualview_adapter.geometry(dem_parent_of(self))
        return encoder_from(self.dualview_options, tower, self.dualview_dem, crop_size=geometry.crop,
                            patch_size=geometry.patch, gate=self.dualview_gate)


def check_assigned_dem(parent: nn.Module, dem: nn.Module, adapter: type) -> None:
    """The one check that the host whose DEM holder is ``parent`` can use ``dem`` (at assignment to
    ``spatial_embed``, at every call and before saving): a :class:`~dualview.DEM` that fits the
    ``adapter``'s geometry (:func:`check_dem_fits`). ``parent`` need not be a dual-view class."""
    if not isinstance(dem, DEM):
        raise TypeError(f"{DEM_ATTR} must be a dualview.DEM, got {type(dem).__name__}")
    geometry = adapter.geometry(parent)
    recorded = recorded_options(parent.config) or {}
    check_dem_fits(dem, adapter=adapter.name, expects=(geometry.dim, geometry.feat_size), full_map=adapter.full_map(),
                   thumbnail_fusion=recorded.get("thumbnail_fusion"))


def check_holds_dem(module: nn.Module, name: str) -> None:
    """A TypeError when ``name`` (``spatial_embed`` / ``spatial_gate``) is assigned on a dual-view module that
    does not hold the DEM (llava's outer model: its DEM lives on ``get_model()``): there it would shadow
    the DEM that runs, and be saved beside it. The message names the submodule that holds it."""
    if DEM_ATTR in module._modules:
        return
    holder = next((path for path, m in module.named_modules() if DEM_ATTR in m._modules), None)
    where = f"its submodule {holder!r}" if holder is not None else "the module the adapter's placement names"
    raise TypeError(
        f"{name} cannot be assigned on this {type(module).__name__}: dual view's DEM and gate live on {where}; "
        "assign it there"
    )


def check_kept(parent: nn.Module, name: str, value: Any = None, *, adapter: str, deleting: bool = False) -> None:
    """A TypeError when assigning ``value`` (not a module) to ``name`` on ``parent``, or deleting it
    (``deleting``), would remove the registered DEM (``spatial_embed``) or the gate ``init="identity"``
    runs (``spatial_gate``): they are kept; :func:`unapply` removes dual view."""
    if name not in (DEM_ATTR, GATE_ATTR) or parent._modules.get(name) is None:
        return
    if name == DEM_ATTR:
        what, kind = "DEM", "a dualview.DEM"
    elif name == GATE_ATTR and (recorded_options(parent.config) or {}).get("init") == "identity":
        what, kind = "gate", "a dualview.gate.DualViewGate (config.dualview['init'] is 'identity')"
    else:
        return
    wrong = f"{name} cannot be deleted" if deleting else f"{name} must be {kind}, got {type(value).__name__}"
    raise TypeError(
        f"{wrong}: the registered {what} is kept; to remove dual view call dualview.adapters.{adapter}.unapply(model)"
    )


def check_gate_fits(gate: nn.Module, *, dim: int, adapter: str) -> None:
    """The one check of a gate assigned to (or found at) ``spatial_gate``: a learnable
    ``DualViewGate(dim, init="identity")`` of the DEM's ``dim``; a TypeError / ValueError naming it."""
    where = f"dualview.adapters.{adapter}: the gate at {GATE_ATTR}"
    if not isinstance(gate, DualViewGate):
        raise TypeError(f"{where} must be a dualview.gate.DualViewGate, got {type(gate).__name__}")
    if gate.init != "identity":
        raise ValueError(f"{where} must have init='identity' (a learnable g), got init={gate.init!r}")
    if gate.dim != dim:
        raise ValueError(f"{where} must have dim={dim} (the DEM's), got dim={gate.dim}")


def new_gate(options: DualViewOptions, dem: DEM) -> Optional[DualViewGate]:
    """The gate ``options.init`` asks for, on the DEM's device and in its dtype (``g = 0``), or None."""
    if options.init == "released":
        return None
    ref = next(dem.parameters())
    return DualViewGate(dem.dim, init="identity", device=ref.device, dtype=ref.dtype)


def check_dem_fits(
    dem: DEM, *, adapter: str, expects: Optional[tuple[int, G.Size]], full_map: bool, thumbnail_fusion: Optional[str],
) -> None:
    """The one check that a host can use ``dem`` (at assignment to ``spatial_embed``, at every call and
    before saving: a saved DEM the host cannot use could not be loaded back): its ``dim`` is the
    tower's channels; its ``out_size`` is None where the host packs the full map into its tiles, and
    the tower's token grid under ``thumbnail_fusion="mean"`` (the thumbnail's tokens are averaged
    with the DEM's). A ValueError naming ``spatial_embed``, the expected and the actual value."""
    where = f"dualview.adapters.{adapter}: the DEM at {DEM_ATTR}"
    if expects is not None and dem.dim != expects[0]:
        raise ValueError(
            f"{where} must have dim={expects[0]} (the channels the vision tower gives at the configured "
            f"vision_feature_layer), got dim={dem.dim}"
        )
    if full_map and dem.out_size is not None:
        raise ValueError(
            f"{where} must have out_size=None (the host packs the DEM's full map into its tiles), got "
            f"out_size={dem.out_size} (e.g. DEM.from_inf_llava(ckpt, out_size=None))"
        )
    if thumbnail_fusion == "mean" and expects is not None and dem.out_size != tuple(expects[1]):
        raise ValueError(
            f"{where} must have out_size={tuple(expects[1])} (thumbnail_fusion='mean' averages the thumbnail's "
            f"tokens with the DEM's), got out_size={dem.out_size}"
        )


def dtype_of(module: nn.Module) -> torch.dtype:
    """The dtype of ``module``'s first floating-point parameter (the precision it computes in)."""
    for param in module.parameters():
        if param.is_floating_point():
            return param.dtype
    raise ValueError(f"{type(module).__name__} has no floating-point parameters")


def to_dtype_of(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """``x`` cast to the precision of ``module``: what a DEM kept in another precision than the model
    (a float32 DEM in a bfloat16 model, or the reverse) gets from the tower and hands the projector."""
    return x.to(dtype_of(module))


def owners(module: nn.Module) -> list[nn.Module]:
    """The modules that hold ``module`` as a direct submodule. torch modules keep no parent, so they
    are found through the garbage collector's referrers (the owner's ``_modules`` dict); one scan
    of the live objects per level, run at ``apply`` only."""
    found = []
    for holder in gc.get_referrers(module):
        if not isinstance(holder, dict):
            continue
        for owner in gc.get_referrers(holder):
            if isinstance(owner, dict):  # an instance __dict__ that holds the _modules dict
                owner = next((m for m in gc.get_referrers(owner) if isinstance(m, nn.Module) and m.__dict__ is owner),
                             None)
            if isinstance(owner, nn.Module) and owner.__dict__.get("_modules") is holder and owner not in found:
                found.append(owner)
    return found


def dem_parent_of(host: nn.Module) -> nn.Module:
    """The module holding ``spatial_embed`` (and ``spatial_gate``) for the dual-view ``host``: itself, or the
    submodule its adapter's placement put the DEM on (llava's inner model, beside ``mm_projector``). It is
    looked up in ``host``'s own tree (:func:`attach` places it there): the adapter's ``_place`` reads the
    model ``apply`` was given, which the host cannot reach."""
    for module in host.modules():
        if DEM_ATTR in module._modules:
            return module
    raise AttributeError(f"{type(host).__name__} has no {DEM_ATTR} submodule")


def dem_of(host: nn.Module) -> nn.Module:
    """The registered DEM of the dual-view ``host`` (on its DEM holder)."""
    return dem_parent_of(host)._modules[DEM_ATTR]


def gate_of(host: nn.Module) -> Optional[nn.Module]:
    """``spatial_gate`` beside the DEM, or None."""
    return dem_parent_of(host)._modules.get(GATE_ATTR)


def unwrap_dem(module: nn.Module) -> nn.Module:
    """The module holding the weights behind the wrappers users put around a DEM."""
    for _ in range(8):
        inner = (getattr(module, "_orig_mod", None)  # torch.compile
                 or getattr(module, "_checkpoint_wrapped_module", None)  # activation checkpointing
                 or _peft_active(module))
        if inner is None:
            return module
        module = inner
    return module


def _peft_active(module: nn.Module) -> Optional[nn.Module]:
    """PEFT's ``ModulesToSaveWrapper``: the trained copy of the active adapter, else the original."""
    copies = getattr(module, "modules_to_save", None)
    if copies is None or not hasattr(module, "original_module"):
        return None
    active = getattr(module, "active_adapter", None)
    active = active[0] if isinstance(active, (list, tuple)) and active else active
    if getattr(module, "disable_adapters", False) or active not in copies:
        return module.original_module
    return copies[active]


def dem_settings(dem: DEM) -> dict:
    """The options that rebuild ``dem``'s architecture (its weights aside)."""
    out = {
        "num_heads": dem.attention.num_heads, "out_size": None if dem.out_size is None else list(dem.out_size),
        "directions": dem.directions, "fusion": dem.fusion, "eps": dem.ln_fuse.eps, "fast": dem.fast,
        "ffn_hidden": dem.ffn_crop[0].out_features if dem.fusion == "linear_concat" else None,
    }
    if dem.out_size is not None:  # without resampling the option is unused (and fixed by full-map hosts)
        out["resample"] = dem.resample
    return out


def record_dem_settings(config: Any, dem: DEM) -> None:
    """Write ``dem``'s settings into ``config.dualview`` where they differ."""
    recorded = recorded_options(config)
    if recorded is None:
        return
    settings = dem_settings(dem)
    if any(recorded.get(k, "missing") != v for k, v in settings.items()):
        setattr(config, CONFIG_KEY, {**recorded, **settings})


def encoder_from(
    options: DualViewOptions, tower: nn.Module, dem: DEM, *, crop_size: int, patch_size: int,
    gate: Optional[DualViewGate] = None,
) -> DualViewEncoder:
    """A DualViewEncoder over ``tower`` with a DCM built from ``options``, the given ``dem`` and, under
    ``init="identity"``, ``gate``."""
    # no thumbnail when nothing uses it: thumbnail_fusion="none" would otherwise pay a tower pass per image
    dcm = DCM(crop_size, options.grid, fit=options.fit, max_tiles=options.max_tiles, pinpoints=options.pinpoints,
              thumbnail=options.thumbnail_fusion != "none")
    return DualViewEncoder(
        tower, dcm, dem, thumbnail_fusion=options.thumbnail_fusion, tower_batch_size=options.tower_batch_size,
        patch_size=patch_size, init=options.init, gate=gate,
    )


def new_dem(
    options: DualViewOptions, dim: int, feat_size: G.Size, *, like: nn.Module, init: Optional[Callable] = None
) -> DEM:
    """A fresh DEM of ``dim`` channels for the options, on the device and in the dtype of ``like``
    (the host's projector; where ``device_map`` offloaded it, on the device it runs on, with real
    weights: see :func:`placement`). ``out_size="tower"`` means the tower's token grid ``feat_size``.

    ``init``: the host's per-module initialiser (transformers' ``_init_weights``). The DEM is then
    made on the meta device and every layer initialised by it alone, as the host initialises
    weights missing from a checkpoint: one rule, and one seed gives one DEM, whichever path built it.
    """
    out_size = feat_size if options.out_size == "tower" else options.out_size
    dtype, device = dtype_of(like), placement(like)
    settings = dict(out_size=out_size, directions=options.directions, fusion=options.fusion, resample=options.resample,
                    ffn_hidden=options.ffn_hidden, eps=options.eps, fast=options.fast)
    if init is None:
        return DEM(dim, options.num_heads, **settings, device=device, dtype=dtype)
    dem = DEM(dim, options.num_heads, **settings, device="meta", dtype=dtype)
    if device.type == "meta":  # a host built on meta: its loader initialises what is missing
        return dem
    dem = dem.to_empty(device=device)
    dem.apply(init)  # post-order, as transformers' initialize_weights visits modules
    return dem


def attach(place: Placement, adapter: type, *, options: DualViewOptions, dem: DEM, config: Any) -> None:
    """Swap the classes of ``place``'s modules for ``adapter``'s dual-view classes (the inner module's
    must exist; the outer model's and the DEM holder's where the adapter has one), register ``dem`` as
    ``spatial_embed`` on the DEM holder, beside it the gate ``options.init`` asks for (``spatial_gate``,
    see :func:`new_gate`), and record ``options`` in ``config``. Nothing changes when a class is refused."""
    dual_view = {cls.dualview_plain: cls for cls in adapter.dual_view_classes}
    swaps = []
    for module in place.modules():
        target = dual_view.get(type(module))
        if target is not None:
            swaps.append((module, target))
            continue
        base = next((plain for plain in dual_view if isinstance(module, plain)), None)
        if base is not None:  # a user's subclass of a class dual view swaps: its own methods would be lost
            raise TypeError(f"dualview.adapters.{adapter.name} adapts {base.__name__} models, got "
                            f"{type(module).__name__}{subclass_refused(type(module), base)}")
        if module is place.inner:
            names = sorted(plain.__name__ for plain in dual_view)
            fits = adapter_for_class(type(module))
            hint = f": use {fits.__module__}.{fits.__qualname__}" if fits is not None and fits is not adapter else ""
            raise TypeError(f"dualview.adapters.{adapter.name} adapts {' or '.join(names)} models, got "
                            f"{type(module).__name__}{hint}")
    if recorded_options(config) is not None:
        warn_dropped_dual_view(type(place.inner).__name__)
    for module, target in swaps:
        swap_class(module, target)
    place.dem_parent.add_module(DEM_ATTR, dem)
    gate = new_gate(options, dem)
    if gate is not None:
        place.dem_parent.add_module(GATE_ATTR, gate)
    record_options(config, options)
    record_dem_settings(config, dem)  # config.dualview describes the DEM that runs (its out_size, widths)


def check_dem_parent_inside(place: Placement, adapter: type) -> None:
    """A TypeError unless the DEM holder is the inner module or one of its submodules: the inner module's
    image hook finds the DEM only in its own tree (:func:`dem_parent_of`)."""
    if any(module is place.dem_parent for module in place.inner.modules()):
        return
    raise TypeError(
        f"{adapter.__module__}.{adapter.__qualname__}._place must put the DEM holder (dem_parent) on the inner module "
        f"or a submodule of it (its image hook looks for the DEM there), got a {type(place.dem_parent).__name__} "
        f"outside the {type(place.inner).__name__}"
    )


def subclass_refused(cls: type, plain: type) -> str:
    """Why a subclass ``cls`` of the host class ``plain`` is refused where dual view swaps that module's
    own class (``""`` when ``cls`` is no subclass of it)."""
    if not issubclass(cls, plain):
        return ""
    return (
        f" (a subclass of {plain.__name__}: dual view swaps this module's class for a subclass of {plain.__name__}, "
        f"which would drop {cls.__name__}'s own methods; apply it to a plain {plain.__name__})"
    )


def warn_dropped_dual_view(cls_name: str) -> None:
    """A loud warning: a plain host that carries ``config.dualview`` was loaded from a dual-view
    checkpoint by the plain class (``...ForConditionalGeneration.from_pretrained``,
    ``AutoModelForImageTextToText``), which drops the DEM's and the gate's weights as unexpected keys."""
    warnings.warn(
        f"this {cls_name} carries config.{CONFIG_KEY}: it was loaded from a dual-view checkpoint by the plain class, "
        f"which DROPPED the trained DEM ({DEM_ATTR}.*) and gate ({GATE_ATTR}.*); the dual view applied now starts "
        "from a new, untrained DEM. Load such a checkpoint with dualview.from_pretrained(path) (or the adapter's "
        "from_pretrained) to keep them",
        UserWarning, stacklevel=4,
    )


def _inherit_conversion_mapping(cls: type, plain: type) -> None:
    """Give a dual-view subclass the checkpoint key conversions transformers keeps for its plain
    class name, so an adapted model saves (and loads) the plain model's keys plus the DEM's."""
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping, register_checkpoint_conversion_mapping,
        )
    except ImportError:  # pragma: no cover - transformers without conversion mappings
        return
    mapping = get_checkpoint_conversion_mapping(plain.__name__)
    if mapping:
        register_checkpoint_conversion_mapping(cls.__name__, mapping, overwrite=True)


def swap_class(module: nn.Module, cls: type) -> None:
    """``module.__class__ = cls``, keeping accelerate's hooks (``device_map`` loading) on the new
    class's ``forward``: the hook calls the ``_old_forward`` it stored on the instance, bound to the
    class the module had when it was hooked, and ``generate`` reads the wrapper's signature; and
    keeping what its ``output_hidden_states`` / ``output_attentions`` record (transformers 5 keeps that
    per class)."""
    registry = _recordable_outputs()
    recorded = registry.get(module) if registry is not None else None
    module.__class__ = cls
    if recorded:  # the swapped-in class records what the plain one did (e.g. the LM's hidden states)
        registry[module] = recorded
    if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward"):
        module._old_forward = cls.forward.__get__(module, cls)
        hooked = module.__dict__.get("forward")
        if isinstance(hooked, functools.partial):
            module.forward = functools.update_wrapper(
                functools.partial(hooked.func, *hooked.args, **hooked.keywords), module._old_forward
            )


def _recordable_outputs() -> Optional[dict]:
    """transformers 5's registry of what each model class's ``output_hidden_states`` /
    ``output_attentions`` record (keyed by the class, filled when a model is built), or None."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # pragma: no cover - transformers 4: no registry
        return None
    return _CAN_RECORD_REGISTRY


def checked(model: nn.Module, build: Callable[[nn.Module], Any], unapply: Callable[[nn.Module], Any]) -> nn.Module:
    """``model`` once ``build(model)`` (its encoder) works: every option is checked at ``apply``,
    not at the first forward; any failure (a bad option, or an adapter's hook that raises) leaves the
    plain model behind."""
    try:
        build(model)
    except BaseException:
        unapply(model)
        raise
    return model


def check_not_applied(host: nn.Module) -> None:
    """A ValueError if ``host`` already carries dual view (``apply`` twice is a mistake, not a no-op:
    a second DEM would silently replace a trained one)."""
    if isinstance(host, DualViewHost):
        adapter = type(host).dualview_adapter.name
        raise ValueError(
            f"dual view is already applied to this {type(host).dualview_plain.__name__} (by dualview.adapters."
            f"{adapter}); call dualview.adapters.{adapter}.unapply(model) first to apply it again"
        )


def detach(place: Placement, adapter: type, *, config: Any) -> None:
    """Undo :func:`attach`: the plain classes back, the DEM, the gate and the recorded options removed."""
    if not isinstance(place.inner, DualViewHost):
        raise ValueError(f"this {type(place.inner).__name__} has no dual view applied: nothing to unapply")
    adapted(place.inner, adapter)
    for module in place.modules():
        if type(module) in adapter.dual_view_classes:
            swap_class(module, type(module).dualview_plain)
    for attr in (DEM_ATTR, GATE_ATTR):
        place.dem_parent._modules.pop(attr, None)  # past the refusal of check_kept
    if hasattr(config, CONFIG_KEY):
        delattr(config, CONFIG_KEY)


def adapted(host: nn.Module, adapter: type) -> DualViewHost:
    """``host`` if ``adapter`` installed dual view in it, else a ValueError saying what to call."""
    if not isinstance(host, DualViewHost):
        raise ValueError(f"model has no dual view: call dualview.adapters.{adapter.name}.apply(model) first")
    installed = type(host).dualview_adapter
    if installed is not adapter:
        raise ValueError(
            f"dual view was applied to this model by dualview.adapters.{installed.name}, not {adapter.name}: "
            f"use dualview.adapters.{installed.name}"
        )
    return host
