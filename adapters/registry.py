"""The one adapter registry: which :class:`~dualview.adapters.base.HostAdapter` takes which host class.

Every entry point reads it: ``dualview.apply`` / ``load`` / ``from_pretrained`` find the adapter of a
model (or of a saved folder's architecture) here, and the "use adapter X" hints name what it holds.
Defining a ``HostAdapter`` subclass that declares a ``name`` calls :func:`register_adapter` (as PEFT's
``register_peft_method``), so an adapter defined in the user's own module works with every entry
point as soon as its class exists. The package's own adapters register when their module is first
imported: :func:`registered_adapters` imports those whose host library is installed.
"""

from __future__ import annotations

import importlib
from typing import Optional

BUILTIN = ("hf_llava", "hf_llava_next", "hf_llava_onevision", "hf_internvl", "hf_idefics3", "llava15")
"""The package's adapter modules (``dualview.adapters.<name>``); each registers its adapter on import."""

_REGISTRY: dict[str, type] = {}
_MISSING: set[str] = set()  # the package's adapters whose host library did not import


def register_adapter(adapter: type) -> type:
    """Register ``adapter`` under its ``name`` for the host classes in its ``hosts``, and tie each of its
    dual-view classes to it (``dualview_adapter``). Returns it (usable as a class decorator).

    A ValueError for a name, a host class or a dual-view class another adapter class already holds (the
    same class defined again, as a reloaded module does, replaces its earlier self); a TypeError for
    ``hosts`` / ``dual_view_classes`` of the wrong shape. Nothing changes when it is refused."""
    name = adapter.__dict__.get("name")
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"adapter name must be an identifier (a module-like name), got {name!r} on {adapter.__qualname__}")
    held = _REGISTRY.get(name)
    if held is not None and not _same_class(held, adapter):
        raise ValueError(f"adapter name {name!r} is taken by {_where(held)}; {_where(adapter)} needs another name")
    hosts, classes = adapter.hosts, adapter.dual_view_classes
    if not isinstance(hosts, tuple) or not hosts or not all(isinstance(h, type) for h in hosts):
        raise TypeError(f"{adapter.__qualname__}.hosts must be a non-empty tuple of host classes, got {hosts!r}")
    _check_dual_view_classes(adapter, classes)
    for other in _REGISTRY.values():
        if other.name == name:
            continue
        claimed = set(other.hosts) & set(hosts)
        if claimed:
            raise ValueError(
                f"host class(es) {sorted(c.__name__ for c in claimed)} are taken by adapter {other.name!r} "
                f"({_where(other)}); {_where(adapter)} cannot take them too"
            )
        shared = [c for c in classes if c in other.dual_view_classes]
        if shared:  # re-tying it would make the other adapter's models refuse their own adapter
            raise ValueError(
                f"dual-view class {shared[0].__name__} is taken by adapter {other.name!r} ({_where(other)}); "
                f"{_where(adapter)} needs its own (a subclass of it, with its own dualview_plain)"
            )
    for cls in classes:
        cls.dualview_adapter = adapter
    _REGISTRY[name] = adapter
    return adapter


def _check_dual_view_classes(adapter: type, classes: object) -> None:
    """A TypeError unless ``classes`` is a tuple of classes, each naming the host class it extends
    (``dualview_plain``, one of its bases): what ``apply`` swaps and ``unapply`` restores."""
    if not isinstance(classes, tuple) or not all(isinstance(c, type) for c in classes):
        raise TypeError(f"{adapter.__qualname__}.dual_view_classes must be a tuple of dual-view classes, got {classes!r}")
    for cls in classes:
        plain = getattr(cls, "dualview_plain", None)
        if not isinstance(plain, type) or plain is cls or not issubclass(cls, plain):
            raise TypeError(
                f"{adapter.__qualname__}.dual_view_classes: {cls.__name__} must set dualview_plain to the host class "
                f"it extends (one of its bases), got {plain!r}"
            )


def registered_adapters() -> dict[str, type]:
    """Adapter name -> adapter class: the package's (those whose host library imports) and any other
    registered one."""
    for module in BUILTIN:
        if module not in _REGISTRY and module not in _MISSING:
            try:
                importlib.import_module(f"dualview.adapters.{module}")
            except ImportError:  # its host library is not installed: no model of its hosts can exist
                _MISSING.add(module)
    return dict(_REGISTRY)


def adapter_for_class(cls: type) -> Optional[type]:
    """The adapter that takes host class ``cls`` (itself, its nearest registered base class, or the
    plain class of a dual-view class), or None."""
    adapters = registered_adapters().values()
    for base in cls.__mro__:
        for adapter in adapters:
            if base in adapter.hosts or any(base in (c, c.dualview_plain) for c in adapter.dual_view_classes):
                return adapter
    return None


def adapter_named(name: str) -> type:
    """The adapter registered as ``name``; a ValueError listing the registered names otherwise."""
    adapters = registered_adapters()
    if name not in adapters:
        raise ValueError(f"no dualview adapter is registered as {name!r}; registered: {sorted(adapters)}")
    return adapters[name]


def _same_class(a: type, b: type) -> bool:
    return a is b or (a.__module__, a.__qualname__) == (b.__module__, b.__qualname__)


def _where(adapter: type) -> str:
    return f"{adapter.__module__}.{adapter.__qualname__}"
