"""What every adapter shares: the dual-view options, recorded in the host model's config so that
``save_pretrained`` / ``from_pretrained`` round-trips them, and the DEM weight reload. How an adapter
lives in its host is :mod:`._host`."""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from torch import nn

from dualview import DEM
from dualview import grid as G
from dualview._checks import (
    check_bool, check_choice, check_number, check_out_size, check_pinpoints, check_positive_int, check_tower_batch_size,
)
from dualview.checkpoints import Origin, check_dem_state, read_tensors, strip_prefix, weight_files
from dualview.cropping import FITS
from dualview.encoder import THUMBNAIL_FUSIONS
from dualview.enhance import DIRECTIONS, FUSIONS, RESAMPLES
from dualview.gate import GATE_INITS, DualViewGate

CONFIG_KEY = "dualview"
"""Attribute of the host model's config (and key of its config.json) holding the options."""
DEM_ATTR = "spatial_embed"
"""Name of the DEM submodule (INF-LLaVA's), on the module that holds the host's projector."""
GATE_ATTR = "spatial_gate"
"""Name of the :class:`~dualview.gate.DualViewGate` submodule under ``init="identity"``, beside the DEM
(none under ``init="released"``: released checkpoints keep their keys)."""


@dataclass
class DualViewOptions:
    """The dual-view choices of an adapted model. Defaults are the released INF-LLaVA: a 3x3 grid
    squashed to ``3*crop`` (upstream pads to square before), DEM to the tower's token grid,
    ``(thumbnail + dem) / 2``: as many LLM tokens as plain LLaVA-1.5."""

    grid: Union[tuple[int, int], str] = (3, 3)
    fit: str = "squash"
    max_tiles: int = 9
    pinpoints: Optional[Sequence[Sequence[int]]] = None
    num_heads: int = 8
    out_size: Union[tuple[int, int], str, None] = "tower"  # "tower": the tower's (h, w)
    directions: str = "both"
    fusion: str = "linear_concat"
    resample: Optional[str] = "bilinear"
    thumbnail_fusion: str = "mean"
    tower_batch_size: Union[int, str, None] = None  # None: automatic chunks, "all": one call
    ffn_hidden: Optional[int] = None  # DEM fusion FFN width (None: max(dim // 16, 1))
    eps: float = 1e-5  # DEM LayerNorm epsilon
    init: str = "released"  # "identity": a gate (spatial_gate, g = 0) keeps the host's features at initialisation
    fast: bool = True  # DEM(fast=...): the fast path (same output as the paper's steps as written)

    def __post_init__(self) -> None:
        """Every option's type and range, checked when the options are made (at ``apply``, and from a
        config read back, before the model changes): one ValueError naming the option, the expected
        and the actual value. Sequences become tuples; what needs the host (the grid's pinpoints as
        multiples of its crop, num_heads dividing its width) is checked when the encoder is built."""
        self.grid = G.grid_spec(self.grid)
        check_choice(self.fit, "fit", FITS)
        check_positive_int(self.max_tiles, "max_tiles")
        if self.pinpoints is not None:
            check_pinpoints(self.pinpoints)
        check_positive_int(self.num_heads, "num_heads")
        self.out_size = check_out_size(self.out_size, allow_tower=True)
        check_choice(self.directions, "directions", DIRECTIONS)
        check_choice(self.fusion, "fusion", FUSIONS)
        check_choice(self.resample, "resample", RESAMPLES)
        check_choice(self.thumbnail_fusion, "thumbnail_fusion", THUMBNAIL_FUSIONS)
        check_tower_batch_size(self.tower_batch_size)
        check_positive_int(self.ffn_hidden, "ffn_hidden", allow_none=True)
        self.eps = check_number(self.eps, "eps", positive=True)
        check_choice(self.init, "init", GATE_INITS)
        check_bool(self.fast, "fast")

    @classmethod
    def from_kwargs(cls, **options: Any) -> "DualViewOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise TypeError(f"unknown dual-view option(s) {unknown}; known: {sorted(known)}")
        return cls(**options)

    def to_dict(self) -> dict:
        """JSON-able (tuples become lists), for ``config.json``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def with_fixed(options: dict, fixed: dict, why: str, *, follows: Optional[dict] = None) -> DualViewOptions:
    """The user's ``options`` with a host's ``fixed`` choices; passing a fixed choice with another
    value is a ValueError that says ``why`` it is fixed.

    ``follows``: options the host's config decides at every call (name -> its current value, e.g.
    AnyRes's pinpoints): a value passed (or recorded by an older save) must be that one, and None
    is recorded, so a later change of the config is what runs."""
    fixed = {**fixed, **(follows or {})}
    for name in sorted(fixed.keys() & options.keys()):
        if name in (follows or {}) and options[name] is None:
            continue
        if _jsonable(options[name]) != _jsonable(fixed[name]):
            raise ValueError(f"option {name} is fixed {why} to {fixed[name]!r}, got {options[name]!r}")
    return DualViewOptions.from_kwargs(**{**options, **fixed, **{name: None for name in (follows or {})}})


def _jsonable(value: Any) -> Any:
    """``value`` as config.json holds it (tuples become lists), for comparing options."""
    return json.loads(json.dumps(value))


def record_options(config: Any, options: DualViewOptions) -> None:
    """Store the options on the host config so that ``save_pretrained`` writes them."""
    setattr(config, CONFIG_KEY, options.to_dict())


def recorded_options(config: Any) -> Optional[dict]:
    return getattr(config, CONFIG_KEY, None)


def load_dem_weights(
    dem: DEM, folder: Union[str, Path], prefix: str, *, variant: Optional[str] = None, use_safetensors: Optional[bool] = None,
) -> None:
    """Load ``<prefix>*`` tensors of a saved checkpoint folder into ``dem``, strictly.

    ``from_pretrained`` of the plain host class drops the DEM keys it does not know; this puts
    them back, bit-exactly, from the same weight files (``variant``, ``use_safetensors`` as given to
    ``from_pretrained``). The keys, floating-point dtypes and shapes are checked first (a
    checkpoint of ints, bools or float8 is refused, not cast); a float checkpoint in another
    precision than the model is loaded into the model's precision, as ``from_pretrained`` does."""
    files = dict(variant=variant, use_safetensors=use_safetensors)
    state = strip_prefix(read_tensors(folder, keep=lambda k: k.startswith(prefix), **files), prefix)
    if not state:
        raise ValueError(f"checkpoint {str(folder)!r} holds no '{prefix}*' DEM weights")
    read = weight_files(folder, **files) if Path(folder).is_dir() else [Path(folder)]
    origin = Origin(read[0] if len(read) == 1 else Path(folder), prefix)
    check_dem_state(state, dem, origin=origin, model="the DEM of the recorded options")
    dem.load_state_dict(state)


def load_gate_weights(gate: DualViewGate, folder: Union[str, Path], prefix: str, **files: Any) -> None:
    """Load the ``<prefix>*`` tensors (``g``) of a saved checkpoint folder into ``gate``, strictly (the
    checks of :func:`load_dem_weights`)."""
    state = strip_prefix(read_tensors(folder, keep=lambda k: k.startswith(prefix), **files), prefix)
    if not state:
        raise ValueError(
            f"checkpoint {str(folder)!r} holds no '{prefix}*' gate weights, but its options say init='identity'"
        )
    check_dem_state(state, gate, origin=Origin(Path(folder), prefix), model="the gate of the recorded options")
    gate.load_state_dict(state)


_NOT_FROM_FOLDER = ("state_dict", "gguf_file", "from_tf", "from_flax")
"""``from_pretrained`` arguments that load the host from elsewhere than the folder's weight files,
where the DEM is read: refused (the DEM would come from another checkpoint than the host)."""


def host_folder(path: Union[str, Path], kwargs: dict) -> tuple[Path, dict]:
    """The local folder whose weight files ``from_pretrained(path, **kwargs)`` of the host reads
    (``path/subfolder``), and the arguments that choose its files (``variant``, ``use_safetensors``),
    so that the DEM is read from the same files as the host. dualview downloads nothing: a Hub id
    is refused before anything is downloaded."""
    passed = sorted(k for k in _NOT_FROM_FOLDER if kwargs.get(k) not in (None, False, ""))
    if passed:
        raise ValueError(
            f"from_pretrained argument(s) {passed} are not supported: the DEM is read from the weight files of "
            f"the folder {str(path)!r} (and its subfolder / variant), the host must come from the same files; got "
            + ", ".join(f"{k}={type(kwargs[k]).__name__}" for k in passed)
        )
    subfolder = kwargs.get("subfolder") or ""
    folder = Path(path) / subfolder
    if not folder.is_dir():
        raise ValueError(
            f"path must be a local folder saved from a dual-view model (dualview downloads nothing: fetch a Hub "
            f"model first, e.g. huggingface_hub.snapshot_download), got {str(path)!r}"
            + (f" with subfolder={subfolder!r}" if subfolder else "") + f": {str(folder)!r} is not a folder"
        )
    return folder, {"variant": kwargs.get("variant"), "use_safetensors": kwargs.get("use_safetensors")}


def from_pretrained_without_dem(cls: type, path: Union[str, Path], **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(path)`` of the plain host class, told that the DEM keys it does not
    know (``*spatial_embed.*``) are expected: they are loaded afterwards by :func:`load_dem_weights`."""
    with expecting_unexpected_keys(cls, r"(^|\.)spatial_(embed|gate)\."):
        return cls.from_pretrained(path, **kwargs)


@contextmanager
def expecting_unexpected_keys(cls: type, *patterns: str) -> Iterator[None]:
    """Inside the block, ``cls.from_pretrained`` takes checkpoint keys matching ``patterns`` (regexes)
    as expected (``_keys_to_ignore_on_load_unexpected``, after those the class has): keys that
    dualview loads itself afterwards. The class attribute is restored on exit (deleted if it was inherited)."""
    attr = "_keys_to_ignore_on_load_unexpected"
    had, old = attr in cls.__dict__, cls.__dict__.get(attr)
    setattr(cls, attr, list(getattr(cls, attr, None) or []) + list(patterns))
    try:
        yield
    finally:
        if had:
            setattr(cls, attr, old)
        else:
            delattr(cls, attr)


def check_device_map(device_map: Any) -> None:
    """The DEM is made after the host is loaded, next to its projector: a ``device_map`` entry
    for it would be ignored, so it is refused."""
    if isinstance(device_map, dict):
        named = sorted(k for k in device_map if "spatial_embed" in k)
        if named:
            raise ValueError(
                f"device_map entries {named}: the DEM is placed with the host's projector (it is small and "
                f"runs on every image); remove them and offload other modules"
            )


def reload(cls: type, path: Union[str, Path], apply: Any, **kwargs: Any) -> nn.Module:
    """``cls.from_pretrained(path)`` of a folder saved from an adapted model: the plain class, dual
    view re-applied (``apply(model, **options)``) with the options in its config.json, the DEM (and
    gate) weights restored strictly into the registered ``spatial_embed`` (``spatial_gate``), read
    under the names they have in the model."""
    check_device_map(kwargs.get("device_map"))
    folder, files = host_folder(path, kwargs)
    model = from_pretrained_without_dem(cls, path, **kwargs)
    options = recorded_options(model.config)
    if options is None:
        raise ValueError(f"{str(path)!r} was not saved from a dual-view model: its config has no '{CONFIG_KEY}' entry")
    delattr(model.config, CONFIG_KEY)  # recorded again by apply (a plain host carrying it is warned about)
    apply(model, **options)
    holder = next(name for name, module in model.named_modules() if DEM_ATTR in module._modules)
    prefix = f"{holder}." if holder else ""
    load_dem_weights(model.get_submodule(prefix + DEM_ATTR), folder, f"{prefix}{DEM_ATTR}.", **files)
    if options.get("init", "released") == "identity":
        load_gate_weights(model.get_submodule(prefix + GATE_ATTR), folder, f"{prefix}{GATE_ATTR}.", **files)
    return model
