"""``HostAdapter``: what every host adapter does, written once (PEFT's ``BaseTuner`` pattern).

An adapter declares the facts of its host and implements its hooks; the base owns the user API:
``apply`` (type check with the "use adapter X" hint, options with the host's fixed choices, the DEM
in the projector's dtype and device, rollback when the built encoder fails), ``unapply``,
``encoder_of``, ``budget``, ``from_pretrained``. Defining a subclass with a ``name`` registers it
(:func:`~dualview.adapters.registry.register_adapter`): ``dualview.apply`` and the other entry points
then find it from the model's class, wherever the subclass is defined.

    class LlavaAdapter(HostAdapter):
        name = "hf_llava"                          # how messages and saved adapters name it
        hosts = (LlavaForConditionalGeneration,)   # the classes apply takes
        dual_view_classes = (DualViewLlavaModel,)  # swapped in for the plain classes they extend
        def _measure(cls, module): ...             # dim, crop, patch of the tower the DEM reads
        def _make_tower(cls, inner, call): ...     # the patch-token tower of one image call

Hooks (``_``-named, overridden by adapters) are verbs; the user API is not overridden except where a
host's budget or loading differs (``budget``, ``from_pretrained``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Union

from torch import nn

from dualview import DualViewEncoder
from dualview import grid as G
from dualview.budget import Budget

from . import _host
from ._host import Geometry, Placement
from ._common import CONFIG_KEY, DualViewOptions, host_folder, recorded_options, reload, with_fixed
from .registry import adapter_for_class, register_adapter


class HostAdapter:
    """Base of the per-host adapters; used as classes (every method is a classmethod)."""

    # ---- the host's facts (each declared once, here) -----------------------------------------------

    name: ClassVar[str] = ""
    """How messages, the registry and saved adapters name the adapter (its module's name, for the package's)."""
    hosts: ClassVar[tuple[type, ...]] = ()
    """The host classes :meth:`apply` takes (a subclass of one too, where only inner modules are swapped)."""
    dual_view_classes: ClassVar[tuple[type, ...]] = ()
    """The dual-view classes swapped in at :meth:`apply`, each for the plain class it names as
    ``dualview_plain``: the inner model's (a :class:`~._host.DualViewHost`), and where the host needs it
    the outer model's or the DEM holder's."""
    projector: ClassVar[str] = "multi_modal_projector"
    """The projector's attribute on the DEM holder: the DEM is made in its dtype and on its device."""
    fixed: ClassVar[dict] = {}
    """Options the host decides (passing the same value is allowed), and why (:attr:`fixed_why`).
    ``fixed["out_size"] is None``: the host packs the DEM's full map back into its tiles."""
    fixed_why: ClassVar[str] = ""
    follows: ClassVar[dict[str, str]] = {}
    """Option -> host config attribute it follows at every call (recorded as None)."""
    processor_tiles: ClassVar[bool] = False
    """The host's processor picks the grid (InternVL, Idefics3): :meth:`budget` reads its settings."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            register_adapter(cls)

    # ---- the host's hooks --------------------------------------------------------------------------

    @classmethod
    def _place(cls, model: nn.Module) -> Placement:
        """Where dual view goes in ``model`` (plain or adapted). Default: the inner model ``model.model``
        is swapped and holds the DEM; a bare inner model is taken too."""
        inner = getattr(model, "model", model)
        return Placement(outer=model, inner=inner, dem_parent=inner)

    @classmethod
    def _measure(cls, module: nn.Module) -> Geometry:
        """The tower's channels (at the configured feature layers), crop and patch, read from ``module``
        (the DEM holder, or any module with the host's config)."""
        raise NotImplementedError(f"{cls.__qualname__} must implement _measure(module) -> Geometry")

    @classmethod
    def _make_tower(cls, inner: nn.Module, call: dict) -> nn.Module:
        """The patch-token tower of one image call of ``inner`` (the dual-view inner model); ``call``: the
        call's own settings (e.g. ``vision_feature_layer``, ``output_hidden_states``), the config's where absent."""
        raise NotImplementedError(f"{cls.__qualname__} must implement _make_tower(inner, call) -> the tower")

    @classmethod
    def _check_host(cls, model: nn.Module) -> None:
        """Host checks at :meth:`apply`, before anything changes (e.g. the select strategy)."""

    @classmethod
    def _prepare_host(cls, model: nn.Module) -> Callable[[], None]:
        """After :meth:`_check_host`, what the host needs before dual view is installed (e.g. loading a
        delay-loaded vision tower); returns how to undo it, called when :meth:`apply` fails after it."""
        return lambda: None

    # ---- what the base owns ------------------------------------------------------------------------

    @classmethod
    def full_map(cls) -> bool:
        """Whether the host packs the DEM's full ``R*h x C*w`` map into its tiles (``out_size`` fixed to None)."""
        return "out_size" in cls.fixed and cls.fixed["out_size"] is None

    @classmethod
    def geometry(cls, module: nn.Module) -> Geometry:
        """What the tower of ``module`` (a host model, its DEM holder, or any module with its config) hands the DEM."""
        return cls._measure(module)

    @classmethod
    def options(cls, config: Any, options: dict) -> DualViewOptions:
        """The user's options with the host's fixed choices; a conflicting one is a ValueError."""
        follows = {name: getattr(config, attr) for name, attr in cls.follows.items()}
        return with_fixed(options, cls.fixed, cls.fixed_why, follows=follows)

    @classmethod
    def options_in(cls, config: Any) -> DualViewOptions:
        """The options an adapted model runs with now: ``config.dualview`` (the host's fixed choices
        checked) with the options the host's config decides (:attr:`follows`) read from it."""
        recorded = recorded_options(config)
        if recorded is None:
            raise ValueError(
                f"config.{CONFIG_KEY} is missing: the dual-view options of this model were removed; call "
                f"dualview.unapply(model) and apply dual view again"
            )
        try:
            options = cls.options(config, dict(recorded))
        except (TypeError, ValueError) as e:  # a hand-edited config: say where the option comes from
            raise type(e)(f"config.{CONFIG_KEY}: {e}") from None
        live = {name: getattr(config, attr) for name, attr in cls.follows.items()}
        return DualViewOptions.from_kwargs(**{**options.to_dict(), **live}) if live else options

    @classmethod
    def check_type(cls, model: nn.Module) -> None:
        """A TypeError unless ``model`` is one of :attr:`hosts` or a subclass of one, naming the adapter
        that fits. A subclass keeps its own class and methods where dual view swaps inner modules only;
        a subclass of a class that is itself swapped is refused at :meth:`apply`, saying why."""
        if isinstance(model, cls.hosts):
            return
        other = adapter_for_class(type(model)) or adapter_for_class(type(getattr(model, "model", model)))
        hint = f"; use {other.__module__}.{other.__qualname__}" if other is not None and other is not cls else ""
        names = " or ".join(host.__name__ for host in cls.hosts)
        raise TypeError(f"model must be a {names}, got {type(model).__name__}{hint}")

    @classmethod
    def apply(cls, model: nn.Module, **options: Any) -> nn.Module:
        """Install dual view in place; returns the model. A new DEM (the host's ``_init_weights``, the
        projector's dtype and device) and the gate ``init`` asks for are registered beside the
        projector; the options go to ``config.dualview``. Every option is checked now: an encoder that
        cannot be built leaves the plain model behind (what :meth:`_prepare_host` did undone)."""
        cls.check_type(model)
        place = cls._place(model)
        opts = cls.options(model.config, options)
        _host.check_not_applied(place.inner)
        _host.check_dem_parent_inside(place, cls)
        cls._check_host(model)
        undo = cls._prepare_host(model)
        try:
            geometry = cls.geometry(place.dem_parent)
            dem = _host.new_dem(opts, geometry.dim, geometry.feat_size, like=getattr(place.dem_parent, cls.projector),
                                init=place.inner._initialize_weights)
            _host.attach(place, cls, options=opts, dem=dem, config=model.config)
            return _host.checked(model, cls.encoder_of, cls.unapply)
        except BaseException:  # the plain model back, as it was before _prepare_host
            undo()
            raise

    @classmethod
    def unapply(cls, model: nn.Module) -> nn.Module:
        """The plain model back (classes, no DEM, no gate, no ``config.dualview``); returns it."""
        _host.detach(cls._place(model), cls, config=model.config)
        return model

    @classmethod
    def encoder_of(cls, model: nn.Module) -> DualViewEncoder:
        """The DualViewEncoder that runs now: DCM from ``config.dualview``, the host's tower at its
        configured feature layers, the registered DEM (and gate)."""
        inner = _host.adapted(cls._place(model).inner, cls)
        return inner.dualview_encoder(cls._make_tower(inner, {}))

    @classmethod
    def budget(cls, model: nn.Module, image_size: G.Size, *, processor: Any = None) -> Budget:
        """Tower passes and LLM tokens for one ``(H, W)`` image; runs nothing. Every adapter has this
        signature: ``processor`` is the host's processor, read by hosts whose processor picks the grid
        (:attr:`processor_tiles`); the others take the grid from the model and refuse one."""
        cls.check_budget_processor(processor)
        return cls.encoder_of(model).budget(image_size)

    @classmethod
    def check_budget_processor(cls, processor: Any) -> None:
        """A ValueError for a processor given to a host whose model alone decides the budget."""
        if processor is not None and not cls.processor_tiles:
            raise ValueError(
                f"processor must be None for {cls.name}: the model's options and config decide its grid, "
                f"got {type(processor).__name__}"
            )

    @classmethod
    def from_pretrained(cls, path: Union[str, Path], **kwargs: Any) -> nn.Module:
        """Load a model saved from an adapted one: the plain class (told that the DEM keys are
        expected), dual view re-applied with the options in its config.json, the DEM (and gate)
        weights restored strictly, into the host class its config.json names (``architectures``) where
        the adapter takes more than one. ``kwargs`` go to the host's ``from_pretrained``."""
        return reload(cls._saved_host(path, kwargs), path, cls.apply, **kwargs)

    @classmethod
    def _saved_host(cls, path: Union[str, Path], kwargs: dict) -> type:
        """The class of :attr:`hosts` that loads the folder ``path`` (``kwargs``: ``from_pretrained``'s): the
        one the folder's config.json names in ``architectures`` (its dual-view class's plain one), or the
        adapter's only host class."""
        if len(cls.hosts) == 1:
            return cls.hosts[0]
        folder, _ = host_folder(path, kwargs)
        archs = json.loads((folder / "config.json").read_text()).get("architectures") or []
        named = {host.__name__: host for host in cls.hosts}
        for arch in archs:
            host = named.get(arch) or named.get(arch.removeprefix("DualView"))
            if host is not None:
                return host
        raise ValueError(
            f"{str(path)!r}: config.json names architectures {archs}, none of the {cls.name} adapter's host classes "
            f"{sorted(named)}"
        )


class SavedAsPlain:
    """Mixin of a prepared processor class (before the host's processor class): it saves as the plain
    processor it was made from (``processor_class`` in its saved config), so that any transformers
    loads it back; call the adapter's ``prepare_processor`` again after loading."""

    def to_dict(self) -> dict:
        out = super().to_dict()
        out["processor_class"] = plain_processor_class(type(self)).__name__
        return out


def plain_processor_class(cls: type) -> type:
    """The first class in ``cls``'s MRO that is not a :class:`SavedAsPlain` one: the host's processor."""
    return next(c for c in cls.__mro__ if not issubclass(c, SavedAsPlain))


def prepare(processor: Any, prepared: dict[type, type]) -> Any:
    """``processor`` made its prepared class in place (``prepared``: plain class -> prepared class);
    a prepared one is returned as it is; another class is a TypeError naming the plain ones."""
    if type(processor) in prepared.values():
        return processor
    if type(processor) not in prepared:
        names = " or ".join(cls.__name__ for cls in prepared)
        raise TypeError(f"processor must be a transformers {names}, got {type(processor).__name__}")
    processor.__class__ = prepared[type(processor)]
    return processor
