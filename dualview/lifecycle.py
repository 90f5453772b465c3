"""Dual view's lifecycle as PEFT users expect it: one entry point for every host, adapter-only
checkpoints, trainable-parameter reports and freeze presets.

    import dualview
    model = dualview.apply(model, init="identity")      # the adapter is chosen from the model's class
    dualview.freeze(model, "warm_start")                 # DEM + gate trainable, everything else frozen
    dualview.trainable_parameters(model)                 # prints and returns the counts
    ... train ...
    dualview.save_adapter(model, "dv")                   # DEM + gate weights and the options, a few MB
    plain = LlavaNextForConditionalGeneration.from_pretrained(...)
    model = dualview.load(plain, "dv")                   # the right adapter, those options, those weights

The adapters come from the one registry (:mod:`dualview.adapters.registry`): the package's adapters
whose host library imports, and any ``HostAdapter`` subclass defined elsewhere. Nothing here imports a
host library before it is needed.
"""

from __future__ import annotations

import copy
import json
import sys
import tempfile
from functools import partial
from pathlib import Path
from typing import Any, Callable, Optional, Union

from torch import nn

from . import _zero3
from ._device import cpu_state_dict

ADAPTER_WEIGHTS = "dualview_adapter.safetensors"
"""File name of the DEM (+ gate) weights written by :func:`save_adapter`."""
ADAPTER_CONFIG = "dualview_adapter.json"
"""File name of the options, adapter name and dualview version written by :func:`save_adapter`."""
FORMAT = 1
PRESETS = ("stage1", "warm_start", "warm_start_lora")
""":func:`freeze` presets: the paper's stage-1 alignment (DEM + gate + projector), a warm start of a
trained host (DEM + gate), and the warm start with a LoRA on the language model."""
DEM_PREFIX, GATE_PREFIX = "spatial_embed.", "spatial_gate."
_DUAL_VIEW_NAMES = (DEM_PREFIX[:-1], GATE_PREFIX[:-1])  # the submodules' names
LORA_TARGETS = r"^(?!.*(vision|spatial_)).*\.(q_proj|k_proj|v_proj|o_proj)$"
"""Default LoRA targets of ``"warm_start_lora"``: the language model's attention projections (every
``q/k/v/o_proj`` outside the vision tower and the DEM)."""
PEFT_CONFIG = "adapter_config.json"
"""PEFT's adapter config file: :func:`save_adapter` of a PEFT model writes PEFT's adapter beside dual view's."""
DUAL_VIEW_EXCLUDED = (
    r"(?#the DEM and gate of dual view: PeftModel.from_pretrained on a host without dual view drops them; "
    r"load this adapter with dualview.load)"
    r"(.*\.)?(spatial_embed|spatial_gate)(\..*)?"
)
"""``exclude_modules`` that ``"warm_start_lora"`` gives the LoRA: no LoRA inside the DEM and gate (PEFT trains
them whole), and PEFT's loader, given the adapter and a host without dual view, warns that it excluded
nothing, quoting this text (a regex comment: parentheses inside would end it)."""

# ---- the adapter table ----------------------------------------------------------------------------


def adapters() -> dict[str, type]:
    """Adapter name -> adapter class (:class:`~dualview.adapters.base.HostAdapter`), every registered one."""
    from dualview.adapters.registry import registered_adapters

    return registered_adapters()


def host_table() -> dict[type, str]:
    """Host class -> adapter name, from each adapter's ``hosts``."""
    return {cls: name for name, adapter in adapters().items() for cls in adapter.hosts}


def adapter_for(model: nn.Module) -> tuple[str, type]:
    """(name, class) of the adapter whose hosts include ``model``'s class (or the nearest base class);
    a TypeError listing the supported host classes otherwise. A ``peft.PeftModel``: its base model's."""
    from dualview.adapters.registry import adapter_for_class

    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module (a vision-language host model), got {type(model).__name__}")
    base = peft_base(model)
    model = model if base is None else base
    adapter = adapter_for_class(type(model))
    if adapter is not None and isinstance(model, adapter.hosts):
        return adapter.name, adapter
    supported = ", ".join(sorted(f"{cls.__name__} ({name})" for cls, name in host_table().items()))
    raise TypeError(
        f"dualview has no adapter for {type(model).__name__}: supported host classes are {supported} "
        "(adapters whose host library is not installed are not listed)"
    )


def dual_view_host(model: nn.Module) -> nn.Module:
    """The module of ``model`` (itself or a submodule) that carries dual view, or a ValueError."""
    from dualview.adapters.interface import dual_view_host as find

    return find(model)


# ---- apply / unapply -------------------------------------------------------------------------------


def apply(model: nn.Module, **options: Any) -> nn.Module:
    """Install dual view with the adapter of ``model``'s class, in place; returns it. ``options``: the
    adapter's (:class:`~dualview.adapters.interface.DualViewOptions`, e.g. ``init="identity"``)."""
    _refuse_peft_wrapper(model, "apply")
    _, adapter = adapter_for(model)
    return adapter.apply(model, **options)


def unapply(model: nn.Module) -> nn.Module:
    """The plain model back (the adapter that installed dual view removes it); returns it. On a
    ``peft.PeftModel`` dual view leaves its base model, the LoRA stays, and PEFT's config no longer
    names the DEM and gate (``modules_to_save``, ``exclude_modules``)."""
    base = peft_base(model)
    target = model if base is None else base
    host = dual_view_host(target)
    type(host).dualview_adapter.unapply(target)
    if base is not None:
        _forget_dual_view_in_peft(model)
    return model


def from_pretrained(path: Union[str, Path], **kwargs: Any) -> nn.Module:
    """Load a WHOLE model saved with ``save_pretrained`` from an adapted one: the adapter is chosen
    from its config.json (``architectures``), which must hold the ``dualview`` options; ``kwargs``
    go to the adapter's ``from_pretrained`` (dtype, device_map, subfolder, ...)."""
    folder = Path(path) / (kwargs.get("subfolder") or "")
    if not (folder / "config.json").is_file() and (folder / ADAPTER_CONFIG).is_file():
        raise ValueError(
            f"{str(folder)!r} holds a dual-view adapter ({ADAPTER_CONFIG}, written by dualview.save_adapter), not a "
            f"whole model: load the plain host with its class's from_pretrained, then dualview.load(model, {str(folder)!r})"
        )
    config = _read_json(folder / "config.json", what="config.json of a saved model")
    if "dualview" not in config:
        raise ValueError(f"{str(path)!r} was not saved from a dual-view model: its config.json has no 'dualview' entry")
    archs = config.get("architectures") or []
    by_name = {cls.__name__: name for cls, name in host_table().items()}
    for arch in archs:
        name = by_name.get(arch) or by_name.get(arch.removeprefix("DualView"))
        if name is not None:
            return adapters()[name].from_pretrained(path, **kwargs)
    raise ValueError(
        f"{str(path)!r}: config.json names architectures {archs}, none of which a dualview adapter hosts "
        f"({sorted(by_name)})"
    )


# ---- adapter-only checkpoints --------------------------------------------------------------------


def save_adapter(model: nn.Module, folder: Union[str, Path]) -> Path:
    """Write only dual view's own state: ``dualview_adapter.safetensors`` (the DEM under
    ``spatial_embed.*``, the gate under ``spatial_gate.*`` with ``init="identity"``) and
    ``dualview_adapter.json`` (adapter name, dualview version, host class, options). Returns the folder.
    :func:`load` puts it on a plain host. Of a ``peft.PeftModel`` (``freeze(model, "warm_start_lora")``)
    PEFT's adapter is saved too (``model.save_pretrained``: the LoRA, and the DEM and gate as
    ``modules_to_save``), so that :func:`load` gives the same PEFT model back. All files are written
    all or nothing (:func:`dualview._output.write_files_atomically`): a new folder appears complete,
    an existing one keeps its other files. Under DeepSpeed ZeRO-3 every rank calls it (the DEM's
    partitioned weights are gathered, a collective) and rank 0 writes."""
    from safetensors.torch import save_file

    from dualview import __version__
    from dualview._output import write_files_atomically
    from dualview.adapters.interface import record_dem_settings, recorded_options

    host = dual_view_host(model)
    dem, gate = host.dualview_dem, host.dualview_gate
    record_dem_settings(host.config, dem)  # the saved options describe the DEM that is saved
    parts = {DEM_PREFIX: dem, GATE_PREFIX: gate}
    parts = {prefix: module for prefix, module in parts.items() if module is not None}
    with _zero3.gathered(*parts.values()):  # ZeRO-3: the full weights, not the empty local shards
        # offloaded by accelerate: the weights its hooks hold, not the "meta" placeholders
        tensors = {prefix + k: v for prefix, module in parts.items() for k, v in cpu_state_dict(module).items()}
    if _zero3.is_partitioned(dem) and not _is_rank_zero():  # every rank gathered; one writes
        return Path(folder)
    base = peft_base(model)
    outer = type(model if base is None else base)
    plain = getattr(outer, "dualview_plain", outer)
    meta = {
        "format": FORMAT, "adapter": type(host).dualview_adapter.name, "dualview_version": __version__,
        "host": plain.__name__, "weights": ADAPTER_WEIGHTS, "options": recorded_options(host.config),
    }
    files = {ADAPTER_WEIGHTS: lambda path: save_file(tensors, str(path), metadata={"format": "pt"})}
    with tempfile.TemporaryDirectory() as peft_folder:
        if base is not None:  # PEFT's adapter_config.json + adapter_model.safetensors, in the same one write
            model.save_pretrained(peft_folder)
            files.update({f.name: partial(_copy_file, f) for f in Path(peft_folder).iterdir() if f.is_file()})
            meta["peft"] = True
        files.update(_stale_peft_files(Path(folder), files))
        text = json.dumps(meta, indent=2, sort_keys=True) + "\n"
        files[ADAPTER_CONFIG] = lambda path: path.write_text(text)
        return write_files_atomically(folder, files, name="folder")


def _copy_file(source: Path, path: Path) -> None:
    path.write_bytes(source.read_bytes())


PEFT_FILES = (PEFT_CONFIG, "adapter_model.safetensors", "adapter_model.bin")
"""The files of a PEFT adapter that ``PeftModel.from_pretrained`` reads from a folder."""


def _stale_peft_files(folder: Path, written: dict) -> dict:
    """PEFT files in ``folder`` that this save does not write, marked for removal (None) when an
    earlier :func:`save_adapter` wrote them: left there, ``PeftModel.from_pretrained`` would load an
    old LoRA beside the new DEM. Files dualview did not write are an error, never removed."""
    from dualview._output import OutputError

    stale = [name for name in PEFT_FILES if name not in written and (folder / name).exists()]
    if not stale:
        return {}
    meta_path = folder / ADAPTER_CONFIG
    try:
        ours = json.loads(meta_path.read_text()).get("peft") is True
    except (OSError, ValueError, AttributeError):
        ours = False
    if not ours:
        raise OutputError(
            f"folder {str(folder)!r} holds PEFT's {stale}, which dualview.save_adapter did not write: a PEFT load of "
            "the folder would mix them with this adapter; save to another folder or remove them"
        )
    return {name: None for name in stale}


def load(model: nn.Module, folder: Union[str, Path]) -> nn.Module:
    """Apply the adapter saved by :func:`save_adapter` in ``folder`` to the PLAIN ``model``, with the
    saved options, and load its weights strictly: missing or unexpected keys, shapes that differ,
    non-floating-point tensors, and a weight or config file outside the folder (a name with ``..``,
    an absolute path, or a symlink that resolves out of the folder other than the Hugging Face
    cache's ``snapshots/<rev>/<file>`` -> ``blobs/<hash>``) are refused (one ValueError naming the
    file); on any error the model is left as it was, ``config.dualview`` included. Returns the model;
    for a folder saved from a ``peft.PeftModel``, ``peft.PeftModel.from_pretrained(model, folder)`` of
    it (LoRA, DEM and gate as saved)."""
    from dualview.adapters.interface import CONFIG_KEY, DualViewOptions
    from dualview.checkpoints import _inside_folder, check_resolves_inside, read_tensors

    _refuse_peft_wrapper(model, "load")
    folder = Path(folder)
    meta_path = folder / ADAPTER_CONFIG
    _refuse_peft_only_folder(folder)
    what = "dual-view adapter config (written by dualview.save_adapter)"
    check_resolves_inside(meta_path, folder, what=what)
    meta = _read_json(meta_path, what=what)
    for key, kind in (("adapter", str), ("options", dict), ("weights", str)):
        if not isinstance(meta.get(key), kind):
            raise ValueError(f"{str(meta_path)!r}: '{key}' must be a {kind.__name__}, got {meta.get(key)!r}")
    if not isinstance(meta.get("peft", False), bool):
        raise ValueError(f"{str(meta_path)!r}: 'peft' must be a bool, got {meta['peft']!r}")
    if meta.get("peft") and not (folder / PEFT_CONFIG).is_file():
        raise FileNotFoundError(
            f"{str(meta_path)!r} was saved from a PEFT model, but PEFT's {str(folder / PEFT_CONFIG)!r} does not exist"
        )
    if meta.get("peft"):  # PEFT reads these itself: they must not lead out of the folder either
        for peft_file in PEFT_FILES:
            check_resolves_inside(folder / peft_file, folder, what=f"PEFT's {peft_file} beside {str(meta_path)!r}")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(meta_path)!r}: format {meta.get('format')!r} is not one this dualview reads ({FORMAT})")
    try:  # every saved option's type and range (a hand-edited eps "x"), before the model changes
        DualViewOptions.from_kwargs(**meta["options"])
    except (TypeError, ValueError) as e:
        raise type(e)(f"{str(meta_path)!r}: 'options': {e}") from None
    name, adapter = adapter_for(model)
    if meta["adapter"] != name:
        raise ValueError(
            f"{str(meta_path)!r} holds a dualview.adapters.{meta['adapter']} adapter (saved from a {meta.get('host')}), "
            f"but the model is a {type(model).__name__}, which dualview.adapters.{name} adapts"
        )
    if not _inside_folder(meta["weights"]) or Path(meta["weights"]).suffix != ".safetensors":
        raise ValueError(
            f"{str(meta_path)!r}: 'weights' must name a .safetensors file inside {str(folder)!r}, got {meta['weights']!r}"
        )
    weights = folder / meta["weights"]
    check_resolves_inside(weights, folder, what=f"the weight file named by {str(meta_path)!r}")
    if not weights.is_file():
        raise FileNotFoundError(f"{str(meta_path)!r} names the weight file {str(weights)!r}, which does not exist")
    state = read_tensors(weights)
    # a plain host loaded by its plain class from a whole dual-view folder carries config.dualview; apply
    # would warn that it starts from an untrained DEM, but the trained one is loaded here
    carried = getattr(model.config, CONFIG_KEY, _MISSING)
    if carried is not _MISSING:
        delattr(model.config, CONFIG_KEY)
    try:
        adapter.apply(model, **meta["options"])  # a failure leaves the plain model (apply rolls back)
    except Exception:
        _put_back(model.config, CONFIG_KEY, carried)
        raise
    before = _peft_sensitive_state(model)
    try:
        _load_adapter_state(model, state, weights)
        if meta.get("peft"):
            import peft

            return peft.PeftModel.from_pretrained(model, str(folder))
    except Exception:
        _undo_peft_injection(model, before)
        adapter.unapply(model)
        _put_back(model.config, CONFIG_KEY, carried)
        raise
    return model


def _peft_sensitive_state(model: nn.Module) -> tuple[dict, bool]:
    """What ``PeftModel.from_pretrained`` changes before it reads the weights, besides injecting its
    layers: each parameter's ``requires_grad`` (it freezes the base model) and whether the model has a
    ``peft_config`` (train modes change only once loading succeeded)."""
    return {n: p.requires_grad for n, p in model.named_parameters()}, hasattr(model, "peft_config")


def _undo_peft_injection(model: nn.Module, before: tuple[dict, bool]) -> None:
    """Take out what a failed ``PeftModel.from_pretrained`` left in ``model``: its tuner layers (back to
    their base layers), its ``modules_to_save`` wrappers (back to the wrapped module), its config,
    and the flags it set. Nothing to do when PEFT was not imported."""
    tuners = sys.modules.get("peft.tuners.tuners_utils")
    wrappers = sys.modules.get("peft.utils.other")
    if tuners is None or wrappers is None:
        return
    injected = (tuners.BaseTunerLayer, wrappers.AuxiliaryTrainingWrapper)
    while True:  # one at a time: a replacement renames nothing, but the walk must see the new tree
        name = next((n for n, m in model.named_modules() if isinstance(m, injected)), None)
        if name is None:
            break
        layer = model.get_submodule(name)
        plain = layer.original_module if isinstance(layer, wrappers.AuxiliaryTrainingWrapper) else layer.get_base_layer()
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, plain)
    grads, had_config = before
    if not had_config and hasattr(model, "peft_config"):
        del model.peft_config
    for n, p in model.named_parameters():
        p.requires_grad_(grads.get(n, p.requires_grad))


_MISSING = object()


def _put_back(config: Any, key: str, value: Any) -> None:
    """``config.<key>`` as it was before a failed :func:`load` (``_MISSING``: it had none)."""
    if hasattr(config, key):
        delattr(config, key)
    if value is not _MISSING:
        setattr(config, key, value)


def _load_adapter_state(model: nn.Module, state: dict, weights: Path) -> None:
    """``state`` (read from ``weights``) into the DEM and gate just applied, strictly."""
    from dualview.checkpoints import Origin, check_dem_state

    host = dual_view_host(model)
    parts = {DEM_PREFIX: host.dualview_dem, GATE_PREFIX: host.dualview_gate}
    unexpected = sorted(k for k in state if not any(k.startswith(p) for p, m in parts.items() if m is not None))
    if unexpected:
        raise ValueError(
            f"checkpoint {str(weights)!r} does not match the adapter of the saved options: unexpected keys {unexpected}"
        )
    for prefix, target in parts.items():
        if target is None:
            continue
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        check_dem_state(sub, target, origin=Origin(weights, prefix), model=f"the {prefix.rstrip('.')} of the saved options")
        target.load_state_dict(sub)


# ---- PEFT wrappers ------------------------------------------------------------------------------------


def peft_base(model: nn.Module) -> Optional[nn.Module]:
    """The host model a ``peft.PeftModel`` wraps, or None for any other model."""
    peft = sys.modules.get("peft")  # a PeftModel exists only once peft is imported
    if peft is not None and isinstance(model, peft.PeftModel):
        return model.get_base_model()
    return None


def _refuse_peft_wrapper(model: nn.Module, call: str) -> None:
    """``apply`` / ``load`` under PEFT would add a DEM that PEFT neither trains as its own nor saves."""
    if peft_base(model) is not None:
        raise ValueError(
            f"dualview.{call}: model is a peft.PeftModel; dual view goes on the host before PEFT wraps it "
            f"(dualview.{call}(host, ...), then dualview.freeze(host, 'warm_start_lora') adds the LoRA with the DEM "
            "and gate as modules_to_save)"
        )


def _refuse_peft_only_folder(folder: Path) -> None:
    """A folder of ``PeftModel.save_pretrained`` alone holds the DEM and gate weights but not the options
    that rebuild them: name the calls that load it."""
    if (folder / PEFT_CONFIG).is_file() and not (folder / ADAPTER_CONFIG).is_file():
        raise ValueError(
            f"{str(folder)!r} holds only PEFT's adapter ({PEFT_CONFIG}, from PeftModel.save_pretrained), not dual "
            f"view's options ({ADAPTER_CONFIG}): apply dual view with the options it was trained with, then load "
            "it with PEFT (model = dualview.apply(model, **options); model = PeftModel.from_pretrained(model, "
            "folder)); dualview.save_adapter(peft_model, folder) saves a folder dualview.load restores alone"
        )


def _forget_dual_view_in_peft(model: nn.Module) -> None:
    """Remove the DEM and gate from the PEFT configs of ``model`` (after :func:`unapply`): what it saves
    then loads on a plain host without PEFT looking for them."""
    names = set(_DUAL_VIEW_NAMES)
    for config in model.peft_config.values():
        kept = [n for n in (getattr(config, "modules_to_save", None) or []) if n not in names]
        if hasattr(config, "modules_to_save"):
            config.modules_to_save = kept or None
        excluded = getattr(config, "exclude_modules", None)
        if excluded == DUAL_VIEW_EXCLUDED:
            config.exclude_modules = None
        elif isinstance(excluded, str) and excluded.endswith(f")|{DUAL_VIEW_EXCLUDED}"):
            config.exclude_modules = excluded[len("(?:"):-len(f")|{DUAL_VIEW_EXCLUDED}")]
        elif isinstance(excluded, (list, set)):
            config.exclude_modules = type(excluded)(n for n in excluded if n not in names) or None


def _exclude_dual_view(excluded: Any) -> Any:
    """``exclude_modules`` of a LoRA config with the DEM and gate added (a regex, a list or a set)."""
    if excluded is None:
        return DUAL_VIEW_EXCLUDED
    if isinstance(excluded, str):
        return f"(?:{excluded})|{DUAL_VIEW_EXCLUDED}"
    return type(excluded)(sorted(set(excluded) | set(_DUAL_VIEW_NAMES)))


# ---- training helpers -------------------------------------------------------------------------------


def dual_view_modules(model: nn.Module) -> list[nn.Module]:
    """The DEM and (with ``init="identity"``) the gate of ``model``, as registered (PEFT wrappers kept)."""
    from dualview.adapters.interface import DEM_ATTR, GATE_ATTR, dem_parent_of

    parent = dem_parent_of(dual_view_host(model))
    return [parent._modules[a] for a in (DEM_ATTR, GATE_ATTR) if a in parent._modules]


def projector_of(model: nn.Module) -> nn.Module:
    """The host's projector (connector), beside the DEM."""
    from dualview.adapters.interface import dem_parent_of

    host = dual_view_host(model)
    return getattr(dem_parent_of(host), type(host).dualview_adapter.projector)


def trainable_parameters(model: nn.Module, *, print_fn: Optional[Callable[[str], Any]] = print) -> dict[str, Any]:
    """Counts of ``model``'s parameters, PEFT's ``print_trainable_parameters`` style, printed with
    ``print_fn`` (None: not printed): ``trainable``, ``total``, ``percent`` and ``dual_view`` (the DEM's
    and the gate's, trainable or not). Shared parameters count once. On a ``peft.PeftModel``, ``total``
    counts PEFT's frozen originals of its ``modules_to_save`` (as PEFT's ``print_trainable_parameters``)
    and ``dual_view`` the DEM and gate that run (PEFT's trained copies) once."""
    seen: set[int] = set()
    trainable = total = 0
    for param in model.parameters():
        if id(param) in seen:
            continue
        seen.add(id(param))
        total += _zero3.numel(param)
        trainable += _zero3.numel(param) if param.requires_grad else 0
    from dualview.adapters.interface import unwrap_dem

    try:
        own = {id(p): _zero3.numel(p) for m in dual_view_modules(model) for p in unwrap_dem(m).parameters()}
    except ValueError:  # a plain model
        own = {}
    counts = {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1),
              "dual_view": sum(own.values())}
    if print_fn is not None:
        print_fn(
            f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {counts['percent']:.4f} "
            f"|| dual view (DEM + gate): {counts['dual_view']:,}"
        )
    return counts


def freeze(model: nn.Module, preset: str, *, lora: Any = None) -> nn.Module:
    """Set what trains, for the paper's stages:

    - ``"stage1"``: the DEM, the gate and the projector; everything else frozen.
    - ``"warm_start"``: the DEM and the gate only (a trained host kept exactly; with
      ``init="identity"`` training starts from the plain model's outputs).
    - ``"warm_start_lora"``: the DEM and the gate, plus a PEFT LoRA on the language model: returns
      ``peft.get_peft_model(model, config)`` with the DEM and gate as ``modules_to_save`` (trained
      and saved with the LoRA by PEFT's ``save_pretrained``). ``lora``: a ``peft.LoraConfig``
      (default: r=8, alpha=16, dropout 0 on :data:`LORA_TARGETS`); its ``modules_to_save`` gets the
      DEM and gate added, and its ``exclude_modules`` too (:data:`DUAL_VIEW_EXCLUDED`).

    On a ``peft.PeftModel``, ``"stage1"`` and ``"warm_start"`` train PEFT's copies of the DEM and gate
    (its originals stay frozen) and freeze the LoRA. Returns the model to train (the PEFT model for
    ``"warm_start_lora"``)."""
    from dualview.adapters.interface import unwrap_dem

    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    if preset == "warm_start_lora" and peft_base(model) is not None:
        raise ValueError(
            "freeze(model, 'warm_start_lora'): model is already a peft.PeftModel (PEFT cannot wrap it again); "
            "pass the dual-view host, or load a saved one to train on with "
            "PeftModel.from_pretrained(host, folder, is_trainable=True)"
        )
    own = dual_view_modules(model)
    model.requires_grad_(False)
    for module in own:
        unwrap_dem(module).requires_grad_(True)  # under PEFT its trained copy, not its frozen original
    if preset == "stage1":
        unwrap_dem(projector_of(model)).requires_grad_(True)
    if preset != "warm_start_lora":
        return model
    try:
        import peft
    except ImportError:
        raise ImportError("freeze(model, 'warm_start_lora') needs peft: pip install peft") from None
    from dualview.adapters.interface import dem_parent_of

    parent = dem_parent_of(dual_view_host(model))
    names = [n for n in _DUAL_VIEW_NAMES if n in parent._modules]
    if lora is None:
        lora = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=LORA_TARGETS)
    elif not isinstance(lora, peft.LoraConfig):
        raise TypeError(f"lora must be a peft.LoraConfig, got {type(lora).__name__}")
    else:  # PEFT keeps the config object as the model's own: the caller's must not be edited
        lora = copy.deepcopy(lora)
    lora.modules_to_save = sorted(set(lora.modules_to_save or []) | set(names))
    lora.exclude_modules = _exclude_dual_view(lora.exclude_modules)
    return peft.get_peft_model(model, lora)


def _is_rank_zero() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _read_json(path: Path, *, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{what} {str(path)!r} could not be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{what} {str(path)!r} must hold a JSON object, got {type(data).__name__}")
    return data


__all__ = [
    "ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DUAL_VIEW_EXCLUDED", "PEFT_CONFIG", "PRESETS", "adapter_for", "adapters",
    "apply", "dual_view_host", "freeze", "from_pretrained", "load", "peft_base", "save_adapter", "trainable_parameters",
    "unapply",
]
