"""``HostAdapter``: what every host adapter does, written once (PEFT's ``BaseTuner`` pattern).

A host is a subclass that declares what is specific to it and implements the host's hooks; the base
owns the rest: ``apply`` (type check with the "use adapter X" hint, options with the host's fixed
choices, the DEM in the projector's dtype and device, rollback when the built encoder fails),
``unapply``, ``encoder_of``, ``budget``, ``from_pretrained`` and registration (defining the subclass
registers it; the adapter module re-exports its methods as the module's functions).

    class LlavaAdapter(HostAdapter):
        name = "hf_llava"                         # module under dualview.adapters
        hosts = (LlavaForConditionalGeneration,)  # outer classes apply takes
        dual_view_class = DualViewLlavaModel      # swapped in for model.model (a DualViewHost)
        def geometry(cls, config): ...            # dim, crop, patch of the tower the DEM reads
        def tower(cls, inner, kwargs): ...        # the patch-token tower of one call
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Union

from torch import nn

from dualview import DualViewEncoder
from dualview import grid as G
from dualview.budget import Budget

from . import _host
from ._common import DualViewOptions, reload, with_fixed


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


class HostAdapter:
    """Base of the per-host adapters; subclasses are used as classes (all methods are classmethods)."""

    name: ClassVar[str] = ""
    """The adapter's module name under ``dualview.adapters`` (for messages and the registry)."""
    hosts: ClassVar[tuple[type, ...]] = ()
    """The host classes :meth:`apply` takes (``dualview.apply`` picks the adapter for them)."""
    dual_view_class: ClassVar[type]
    """The :class:`~._host.DualViewHost` subclass swapped in for the host's inner model."""
    projector: ClassVar[str] = "multi_modal_projector"
    """The inner model's projector: the DEM is made in its dtype and on its device."""
    fixed: ClassVar[dict] = {}
    """Options the host decides (passing the same value is allowed), and why (:attr:`fixed_why`)."""
    fixed_why: ClassVar[str] = ""
    follows: ClassVar[dict[str, str]] = {}
    """Option -> host config attribute it follows at every call (recorded as None)."""

    registry: ClassVar[dict[str, type["HostAdapter"]]] = {}
    """Adapter name -> subclass, filled by defining a subclass."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__dict__.get("name"):
            HostAdapter.registry[cls.name] = cls

    # ---- the host's hooks --------------------------------------------------------------------------

    @classmethod
    def geometry(cls, config: Any) -> Geometry:
        """The tower's channels (at the configured feature layers), crop and patch, from the config."""
        raise NotImplementedError

    @classmethod
    def geometry_of(cls, inner: nn.Module) -> Geometry:
        """:meth:`geometry` of the inner model's config (a host whose tower holds its own config overrides this)."""
        return cls.geometry(inner.config)

    @classmethod
    def tower(cls, inner: nn.Module, kwargs: dict) -> nn.Module:
        """The patch-token tower of one call (``kwargs``: the call's, e.g. ``output_hidden_states``)."""
        raise NotImplementedError

    @classmethod
    def check_host(cls, model: nn.Module) -> None:
        """Host checks at :meth:`apply`, before anything changes (e.g. the select strategy)."""

    @classmethod
    def prepare_host(cls, model: nn.Module) -> Callable[[], None]:
        """After :meth:`check_host`, what the host needs before dual view is installed (e.g. loading a
        delay-loaded vision tower); returns how to undo it, called when :meth:`apply` fails after it
        (default: nothing to do)."""
        return lambda: None

    @classmethod
    def inner_of(cls, model: nn.Module) -> nn.Module:
        """The module whose class is swapped (default: ``model.model``; the inner model itself is taken too)."""
        return getattr(model, "model", model)

    @classmethod
    def dem_parent_of(cls, inner: nn.Module) -> nn.Module:
        """The module that holds the DEM, the gate and the projector (default: the inner model)."""
        return inner

    @classmethod
    def dual_view_class_for(cls, inner: nn.Module) -> type:
        """The dual-view class for ``inner`` (default: :attr:`dual_view_class`; a host family of
        several classes picks by ``type(inner)``)."""
        return cls.dual_view_class

    @classmethod
    def wrap(cls, model: nn.Module) -> None:
        """After the inner model is adapted: anything the outer model needs (default: nothing)."""

    @classmethod
    def unwrap(cls, model: nn.Module) -> None:
        """Undo :meth:`wrap` (default: nothing)."""

    # ---- what the base owns -----------------------------------------------------------------------

    @classmethod
    def check_type(cls, model: nn.Module) -> None:
        """A TypeError unless ``model`` is one of :attr:`hosts` or a subclass of one, naming the adapter
        that fits. A subclass keeps its own class and methods: dual view swaps the class of its inner
        model only, which must be the host's own (checked by :func:`._host.attach`)."""
        if isinstance(model, cls.hosts):
            return
        other = _host.adapter_for(type(model)) or _host.adapter_for(type(getattr(model, "model", model)))
        hint = f"; use dualview.adapters.{other}" if other and other != cls.name else ""
        names = " or ".join(host.__name__ for host in cls.hosts)
        raise TypeError(f"model must be a transformers {names}, got {type(model).__name__}{hint}")

    @classmethod
    def options(cls, config: Any, options: dict) -> DualViewOptions:
        """The user's options with the host's fixed choices; a conflicting one is a ValueError."""
        if not cls.fixed and not cls.follows:
            return DualViewOptions.from_kwargs(**options)
        follows = {name: getattr(config, attr) for name, attr in cls.follows.items()}
        return with_fixed(options, cls.fixed, cls.fixed_why, follows=follows)

    @classmethod
    def apply(cls, model: nn.Module, **options: Any) -> nn.Module:
        """Install dual view in place; returns the model. A new DEM (the host's ``_init_weights``, the
        projector's dtype and device) and the gate ``init`` asks for are registered beside the
        projector; the options go to ``config.dualview``. Every option is checked now: an encoder that
        cannot be built leaves the plain model behind (what :meth:`prepare_host` did undone)."""
        cls.check_type(model)
        inner, config = cls.inner_of(model), model.config
        opts = cls.options(config, options)
        _host.check_not_applied(inner)
        cls.check_host(model)
        undo = cls.prepare_host(model)
        try:
            geometry = cls.geometry_of(inner)
            parent = cls.dem_parent_of(inner)
            dem = _host.new_dem(opts, geometry.dim, geometry.feat_size, like=getattr(parent, cls.projector),
                                init=inner._initialize_weights)
            _host.attach(inner, cls.dual_view_class_for(inner), options=opts, dem=dem, config=config, dem_parent=parent)
            cls.wrap(model)
            return _host.checked(model, cls.encoder_of, cls.unapply)
        except BaseException:  # the plain model back, as it was before prepare_host
            undo()
            raise

    @classmethod
    def unapply(cls, model: nn.Module) -> nn.Module:
        """The plain model back (class, no DEM, no gate, no ``config.dualview``); returns it."""
        inner = cls.inner_of(model)
        _host.unapply(inner, config=model.config, dem_parent=cls.dem_parent_of(inner), adapter=cls.name)
        cls.unwrap(model)
        return model

    @classmethod
    def encoder_of(cls, model: nn.Module) -> DualViewEncoder:
        """The DualViewEncoder that runs now: DCM from ``config.dualview``, the host's tower at its
        configured feature layers, the registered DEM (and gate)."""
        inner = _host.adapted(cls.inner_of(model), cls.name)
        geometry = cls.geometry_of(inner)
        return inner.dualview_encoder(cls.tower(inner, {}), crop_size=geometry.crop, patch_size=geometry.patch)

    processor_tiles: ClassVar[bool] = False
    """The host's processor picks the grid (InternVL, Idefics3): :meth:`budget` reads its settings."""

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
        weights restored strictly. ``kwargs`` go to the host's ``from_pretrained``."""
        return reload(cls.hosts[0], path, cls.apply, **kwargs)


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
