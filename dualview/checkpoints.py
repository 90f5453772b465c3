"""Reading INF-LLaVA checkpoints safely: safetensors, or ``torch.load(weights_only=True)``; never an
arbitrary unpickle. A checkpoint is a file or a (sharded) folder; only the tensors asked for are read."""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Mapping, Union

import torch

DEM_MARK = "spatial_embed."
"""Released INF-LLaVA checkpoints keep the DEM under ``model.spatial_embed.``."""
PROJECTOR_MARK = "mm_projector."
DEM_TOP_LEVEL = ("attention.", "ffn_crop.", "ffn_stride.", "ln_fuse.", "fuse_conv.")
"""First names of the DEM's own keys, to find bare DEM keys in a file."""

PathLike = Union[str, "os.PathLike[str]"]
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")


def _read_file(path: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys() if keep(k)}
        except SafetensorError as e:
            raise ValueError(f"checkpoint {str(path)!r} is not a readable safetensors file: {e}") from None
    if path.suffix in _TORCH_SUFFIXES:
        try:
            # mmap reads only the tensors kept, but needs the zip format (torch >= 1.6 files)
            mmap = zipfile.is_zipfile(path)
            with warnings.catch_warnings():  # the refusal is reported below, once
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # pickle refusals and truncation both end here
            reason = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise ValueError(
                f"checkpoint {str(path)!r} could not be read with torch.load(weights_only=True), which accepts "
                f"tensors and plain containers only: {reason}"
            ) from None
        if not isinstance(state, Mapping):
            raise ValueError(f"checkpoint {str(path)!r} must hold a dict of tensors, got {type(state).__name__}")
        return {k: v for k, v in state.items() if keep(k) and isinstance(v, torch.Tensor)}
    raise ValueError(
        f"checkpoint {str(path)!r} must be .safetensors or one of {_TORCH_SUFFIXES}, or a checkpoint folder"
    )


def _shards(folder: Path) -> list[Path]:
    """The weight files of a checkpoint folder: those an index names, else every weight file in it."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
    files = sorted(folder.glob("*.safetensors")) or sorted(
        p for p in folder.iterdir() if p.suffix in _TORCH_SUFFIXES
    )
    if not files:
        raise ValueError(f"checkpoint folder {str(folder)!r} holds no .safetensors or .bin weight files")
    return files


def read_tensors(path: PathLike, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """Tensors whose key passes ``keep`` from a weight file or a (sharded) checkpoint folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    files = _shards(path) if path.is_dir() else [path]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(_read_file(file, keep))
    return tensors


def strip_prefix(state: Mapping[str, torch.Tensor], mark: str) -> dict[str, torch.Tensor]:
    """Keys ``<anything>{mark}<name>`` as ``<name>``. All such keys must share one prefix."""
    prefixes = {k[: k.index(mark) + len(mark)] for k in state if mark in k}
    if len(prefixes) > 1:
        raise ValueError(f"state dict holds several '{mark}' prefixes {sorted(prefixes)}: pass one module's weights")
    if not prefixes:
        return {}
    (prefix,) = prefixes
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def load_dem_state(source: Union[Mapping[str, torch.Tensor], PathLike]) -> dict[str, torch.Tensor]:
    """The DEM's weights under bare keys (``attention.linears.0.weight``, ...).

    ``source``: a state dict with bare keys or keys prefixed ``...spatial_embed.``, or a path
    (file or folder) holding them.
    """
    if isinstance(source, (str, os.PathLike)):
        source = read_tensors(source, keep=lambda k: DEM_MARK in k or k.startswith(DEM_TOP_LEVEL))
    if not isinstance(source, Mapping):
        raise TypeError(f"state_dict_or_path must be a dict or a path, got {type(source).__name__}")
    state = strip_prefix(source, DEM_MARK) or dict(source)
    if "attention.linears.0.weight" not in state:
        raise ValueError(
            "no INF-LLaVA DEM weights found: expected keys 'attention.linears.0.weight', ... "
            f"bare or under a '...{DEM_MARK}' prefix; got {sorted(source)[:8]}{' ...' if len(source) > 8 else ''}"
        )
    return state
