"""Evaluate dual-view models with lmms-eval (``pip install "/path/to/dualview[eval]"`` from a checkout).

lmms-eval (>= 0.7.3) reads the manifests of every ``lmms_eval.models`` entry point; dualview's
(:func:`manifests`) adds the models

    dualview_llava_next        LLaVA-NeXT saved from dualview.adapters.hf_llava_next
    dualview_llava_onevision   LLaVA-OneVision saved from dualview.adapters.hf_llava_onevision

each as a chat class and a simple class (``--force_simple``) that subclass lmms-eval's own
``llava_hf`` classes: its prompts, batching and generation are unchanged; only the model is loaded
with the adapter's ``from_pretrained``, so the dual-view options in ``config.json`` are re-applied
and the DEM weights restored (the plain ``llava_hf`` would load the host without them and evaluate
plain AnyRes). A folder not saved from a dual-view model, or a host of another kind than the model
id says, is an error, never a silent plain evaluation. The processor is the folder's, unchanged:
these adapters keep the host's image-token counts.

    python -m lmms_eval --model dualview_llava_next \\
        --model_args pretrained=./my-dualview-model,device=cuda,dtype=bfloat16 --tasks mme ...

lmms-eval's ``device_map=""`` default is refused by transformers 5: an empty ``device_map`` is not
passed on (lmms-eval then moves the model to ``device``). LLaVA-1.5 (``llava_hf``'s third host) is
not offered: :mod:`dualview.adapters.hf_llava` needs its processor prepared for the high-resolution
input, which ``llava_hf`` builds itself.

This module imports without lmms-eval; its classes are built on first access (lmms-eval imports
them by name).
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from typing import Any, Iterator, Optional

# lmms-eval model id -> (transformers model_type it serves, dualview adapter, simple class, chat class)
MODELS = {
    "dualview_llava_next": ("llava_next", "hf_llava_next", "DualViewLlavaNext", "DualViewLlavaNextChat"),
    "dualview_llava_onevision": (
        "llava_onevision", "hf_llava_onevision", "DualViewLlavaOnevision", "DualViewLlavaOnevisionChat",
    ),
}
_CLASSES = {simple: (model_id, False) for model_id, (_, _, simple, _) in MODELS.items()}
_CLASSES.update({chat: (model_id, True) for model_id, (_, _, _, chat) in MODELS.items()})


def manifests() -> list:
    """The ``lmms_eval.models`` entry point: one ``ModelManifest`` per dual-view host."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [
        ModelManifest(model_id=model_id, simple_class_path=f"{__name__}.{simple}", chat_class_path=f"{__name__}.{chat}")
        for model_id, (_, _, simple, chat) in MODELS.items()
    ]


class DualViewLoader:
    """Stands in for a transformers class in ``llava_hf``'s ``model_map`` while a dual-view model
    loads: ``from_pretrained`` is the adapter's (options re-applied, DEM restored), or an error for
    a host the model id does not serve. ``model_id`` None: the model id of the innermost
    :func:`dual_view_loading` open in this thread (what the patched map holds)."""

    def __init__(self, model_id: Optional[str], model_type: str) -> None:
        self.model_id = model_id
        self.model_type = model_type

    def from_pretrained(self, path: Any, *, device_map: Any = None, torch_dtype: Any = None, **kwargs: Any) -> Any:
        model_id = self.model_id
        if model_id is None:
            loading = _loading.get()
            if not loading:
                raise RuntimeError(f"DualViewLoader({self.model_type!r}) is used outside dual_view_loading(model_id)")
            model_id = loading[-1][0]
        served, adapter, _, _ = MODELS[model_id]
        if self.model_type != served:
            fits = [m for m, (t, *_) in MODELS.items() if t == self.model_type]
            hint = f": use --model {fits[0]}" if fits else ""
            raise ValueError(f"--model {model_id} evaluates {served} models, {str(path)!r} is a {self.model_type}{hint}")
        kwargs = {k: v for k, v in kwargs.items() if v is not None}  # e.g. attn_implementation=None
        if torch_dtype is not None:
            kwargs["dtype"] = torch_dtype  # transformers 5's name
        if device_map:  # lmms-eval's "" default: not passed (transformers 5 refuses it)
            kwargs["device_map"] = device_map
        from dualview.adapters.interface import adapter_named

        return adapter_named(adapter).from_pretrained(path, **kwargs)


# The loads open now: the map is patched by the first and restored by the last to end (in any order,
# from any thread); each thread (context) sees the model id of its own innermost load.
_loading: contextvars.ContextVar[tuple] = contextvars.ContextVar("dualview_lmms_eval_loading", default=())
_patch_lock = threading.Lock()
_patch: dict = {"open": 0, "saved": None}


@contextlib.contextmanager
def dual_view_loading(model_id: str) -> Iterator[None]:
    """While it is open, ``llava_hf`` loads every model type through :class:`DualViewLoader` (for
    this ``model_id`` in this thread). Loads may overlap (threads, several evaluators): the map is
    patched once and restored when the last open load ends."""
    from lmms_eval.models.simple import llava_hf

    if model_id not in MODELS:
        raise ValueError(f"model_id must be one of {sorted(MODELS)}, got {model_id!r}")
    entry = (model_id, object())
    with _patch_lock:
        if _patch["open"] == 0:
            _patch["saved"] = dict(llava_hf.model_map)
            types = set(_patch["saved"]) | {t for t, *_ in MODELS.values()}
            llava_hf.model_map.update({t: DualViewLoader(None, t) for t in types})
        _patch["open"] += 1
    _loading.set(_loading.get() + (entry,))
    try:
        yield
    finally:
        _loading.set(tuple(e for e in _loading.get() if e is not entry))
        with _patch_lock:
            _patch["open"] -= 1
            if _patch["open"] == 0:
                llava_hf.model_map.clear()
                llava_hf.model_map.update(_patch["saved"])
                _patch["saved"] = None


def __getattr__(name: str) -> Any:
    """The lmms-eval model classes, built (and cached) on first access: they subclass lmms-eval's."""
    if name in _CLASSES:
        cls = _build(name, *_CLASSES[name])
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _build(name: str, model_id: str, chat: bool) -> type:
    if chat:
        from lmms_eval.models.chat.llava_hf import LlavaHf as base
    else:
        from lmms_eval.models.simple.llava_hf import LlavaHf as base

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        with dual_view_loading(model_id):
            base.__init__(self, *args, **kwargs)

    kind = "chat" if chat else "simple"
    doc = f"lmms-eval's {kind} llava_hf with the model loaded by dualview.adapters.{MODELS[model_id][1]} ({model_id})."
    return type(name, (base,), {"__init__": __init__, "__module__": __name__, "__qualname__": name, "__doc__": doc,
                                "dualview_model_id": model_id})
