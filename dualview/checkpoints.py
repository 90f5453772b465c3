"""Reading INF-LLaVA checkpoints safely: safetensors, or ``torch.load(weights_only=True)``; never an
arbitrary unpickle. A checkpoint is a file or a folder read the way transformers reads one: through
its shard index or its standard weight file names, never "every file in it". Shard names stay
inside the folder; only the tensors asked for are read; DEM weights must be floating point and of
the expected shapes (nothing is cast silently). Every failure is one line naming the file and key.
"""

from __future__ import annotations

import json
import os
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Mapping, Optional, Union

import torch
from torch import nn

from ._checks import require

DEM_MARK = "spatial_embed."
"""Released INF-LLaVA checkpoints keep the DEM under ``model.spatial_embed.``."""
PROJECTOR_MARK = "mm_projector."
DEM_TOP_LEVEL = ("attention.", "ffn_crop.", "ffn_stride.", "ln_fuse.", "fuse_conv.")
"""First names of the DEM's own keys, to find bare DEM keys in a file."""
DEM_DIM_KEY = "attention.linears.0.weight"
"""The DEM weight whose (dim, dim) shape gives the DEM's width."""

WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
"""What a weight may be stored as. float8 is refused too: loading it would be a silent lossy cast."""

PathLike = Union[str, "os.PathLike[str]"]
_TORCH_SUFFIXES = (".bin", ".pt", ".pth")

# A folder's weight files, in the order transformers looks for them: an index (sharded), the
# single file, a complete set of shards without an index. `mm_projector.bin` is what LLaVA's and
# INF-LLaVA's pretraining stage saves (projector, and the DEM for INF-LLaVA).
_FOLDER_LAYOUTS = (
    ("model.safetensors.index.json", "model.safetensors", "model"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin", "pytorch_model"),
)
_PROJECTOR_FILE = "mm_projector.bin"
_SHARD_NAME = r"^(?P<stem>{stem})-(?P<i>\d{{5}})-of-(?P<n>\d{{5}})\.(?P<ext>{ext})$"


def _require_safetensors() -> None:
    require("safetensors", extra="hf", feature="reading a .safetensors checkpoint")


def _load_refusal(error: Exception) -> str:
    """What went wrong in ``torch.load(weights_only=True)``, in one phrase, without torch's advice
    to retry with ``weights_only=False`` (which would run whatever the file holds: never do it)."""
    text = str(error)
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", text, re.S)
    if unpickler:
        return "the file's pickle was refused (" + " ".join(unpickler[1].split()) + ")"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not re.search(r"weights_only|trusted source|arbitrary code", line)]
    return lines[0] if lines else type(error).__name__


def _read_file(path: Path, keep: Callable[[str], bool]) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        _require_safetensors()
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
            raise ValueError(
                f"checkpoint {str(path)!r} could not be read with torch.load(weights_only=True), which accepts "
                f"tensors and plain containers only: {_load_refusal(e)}. It is a corrupted file or holds other "
                "pickled objects, which dualview never loads: save the tensors again (safetensors, or a dict of tensors)"
            ) from None
        if not isinstance(state, Mapping):
            raise ValueError(f"checkpoint {str(path)!r} must hold a dict of tensors, got {type(state).__name__}")
        return {k: v for k, v in state.items() if keep(k) and isinstance(v, torch.Tensor)}
    raise ValueError(
        f"checkpoint {str(path)!r} must be .safetensors or one of {_TORCH_SUFFIXES}, or a checkpoint folder"
    )


def _inside_folder(name: object) -> bool:
    """Whether a shard name from an index is a relative path that stays in the checkpoint folder.

    Checked on the name, not on the resolved path: the Hugging Face cache keeps a checkpoint's
    files as symlinks into ``../../blobs``, and those must still load."""
    if not isinstance(name, str) or not name or "\\" in name or "\x00" in name:
        return False
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    return not (posix.is_absolute() or windows.is_absolute() or windows.drive or ".." in posix.parts)


HUB_REPO_PREFIX = "models--"
"""The Hugging Face hub cache keeps a model repository in ``models--<owner>--<name>/``: its
``snapshots/<revision>/<file>`` are symlinks to ``../../blobs/<hash>`` of that same folder."""


def resolves_inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, a file of ``folder``, is inside ``folder`` once its symlinks are resolved, or
    is a file of the Hugging Face hub cache's own layout: ``folder`` under ``models--*/snapshots/<rev>/``
    and ``path`` linking to a blob of that same ``models--*/blobs/``. Any other link out is not."""
    target, root = path.resolve(), folder.resolve()
    if target.is_relative_to(root):
        return True
    snapshot = next((p for p in (root, *root.parents) if p.parent.name == "snapshots"), None)
    if snapshot is None:
        return False
    repo = snapshot.parent.parent
    return repo.name.startswith(HUB_REPO_PREFIX) and target.parent == repo / "blobs"


def check_resolves_inside(path: Path, folder: Path, *, what: str) -> None:
    """A ValueError naming ``path`` and where it leads when it links out of ``folder`` (:func:`resolves_inside`)."""
    if not resolves_inside(path, folder):
        raise ValueError(
            f"{what} {str(path)!r} is a link to {str(path.resolve())!r}, outside the folder {str(folder)!r}: refused "
            f"(links are followed inside the folder, and in the Hugging Face cache from snapshots/<revision>/ to "
            f"the blobs/ of the same {HUB_REPO_PREFIX}* folder)"
        )


def read_index(index: Path) -> dict[str, str]:
    """The ``weight_map`` (key -> shard file name) of a shard index, every name checked to stay in
    the index's folder and to exist there."""
    try:
        data = json.loads(index.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint index {str(index)!r} could not be read as JSON: {e}") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(
            f"checkpoint index {str(index)!r} has no 'weight_map' (a non-empty {{tensor key: shard file}} object), "
            f"got {type(weight_map).__name__ if weight_map is not None else 'none'}"
        )
    for key, name in weight_map.items():
        if not _inside_folder(name):
            raise ValueError(
                f"checkpoint index {str(index)!r}: key {key!r} names the shard {name!r}, which is not a file "
                "inside the checkpoint folder (absolute paths and '..' are refused)"
            )
    for name in sorted(set(weight_map.values())):
        if not (index.parent / name).is_file():
            raise FileNotFoundError(
                f"checkpoint index {str(index)!r} names the shard {name!r}, which does not exist in {str(index.parent)!r}"
            )
    return weight_map


def _unindexed_shards(folder: Path, stem: str, ext: str) -> list[Path]:
    """A complete ``<stem>-0000i-of-0000n.<ext>`` set without an index (all n present), else []."""
    name = re.compile(_SHARD_NAME.format(stem=re.escape(stem), ext=re.escape(ext)))
    found = [m for p in folder.iterdir() if (m := name.match(p.name))]
    if not found:
        return []
    counts = {int(m["n"]) for m in found}
    present = {int(m["i"]) for m in found}
    if len(counts) != 1 or present != set(range(1, counts.pop() + 1)):
        names = sorted(m.string for m in found)
        raise ValueError(
            f"checkpoint folder {str(folder)!r} holds an incomplete or mixed set of shards {names} and no index"
        )
    return sorted(folder / m.string for m in found)


def with_variant(name: str, variant: Optional[str]) -> str:
    """``name`` as transformers names a ``variant`` of it: ``model.safetensors`` -> ``model.ema.safetensors``,
    ``model.safetensors.index.json`` -> ``model.safetensors.index.ema.json``."""
    if variant is None:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def weight_files(folder: PathLike, *, variant: Optional[str] = None, use_safetensors: Optional[bool] = None) -> list[Path]:
    """The weight files of a checkpoint folder, found as transformers finds them: the shard index
    (``model.safetensors.index.json``), ``model.safetensors``, a complete set of
    ``model-0000i-of-0000n.safetensors`` shards; then the same for ``pytorch_model*.bin``; then
    ``mm_projector.bin``. Other files (``training_args.bin``, optimizer states) are never read.

    ``variant`` and ``use_safetensors`` as ``from_pretrained`` takes them: ``variant="ema"`` reads
    ``model.ema.safetensors`` (its index, its ``model.ema-0000i-of-0000n`` shards) and never the plain
    files; ``use_safetensors=False`` reads ``pytorch_model*.bin`` only, ``True`` safetensors only."""
    folder = Path(folder)
    if variant is not None and (not isinstance(variant, str) or not variant or "/" in variant or "\\" in variant):
        raise ValueError(f"variant must be a non-empty name without path separators, or None, got {variant!r}")
    layouts = [
        (index, single, stem) for index, single, stem in _FOLDER_LAYOUTS
        if use_safetensors is None or use_safetensors == single.endswith(".safetensors")
    ]
    for index_name, single_name, stem in layouts:
        ext = single_name.rsplit(".", 1)[1]
        index = folder / with_variant(index_name, variant)
        if index.is_file():
            return [folder / name for name in sorted(set(read_index(index).values()))]
        if (folder / with_variant(single_name, variant)).is_file():
            return [folder / with_variant(single_name, variant)]
        shards = _unindexed_shards(folder, stem if variant is None else f"{stem}.{variant}", ext)
        if shards:
            return shards
    if variant is None and use_safetensors is not True and (folder / _PROJECTOR_FILE).is_file():
        return [folder / _PROJECTOR_FILE]
    held = sorted(p.name for p in folder.iterdir())
    if variant is None and use_safetensors is None:
        wanted = f"model.safetensors, its index or shards, pytorch_model.bin, its index or shards, {_PROJECTOR_FILE}"
    else:
        names = [with_variant(single, variant) for _, single, _ in layouts]
        wanted = f"{' or '.join(names)}, its index or shards, for variant={variant!r}, use_safetensors={use_safetensors!r}"
    raise ValueError(
        f"checkpoint folder {str(folder)!r} holds none of the standard weight files ({wanted}); it holds "
        f"{held[:8]}{' ...' if len(held) > 8 else ''}: pass the weight file itself"
    )


def checkpoint_files(path: PathLike) -> list[Path]:
    """Every file :func:`read_tensors` reads for ``path``: the file itself, or a folder's weight
    files (:func:`weight_files`) and its shard index."""
    path = Path(path)
    if not path.is_dir():
        return [path]
    indexes = [path / index for index, _, _ in _FOLDER_LAYOUTS if (path / index).is_file()]
    return indexes + weight_files(path)


def read_tensors(
    path: PathLike, keep: Callable[[str], bool] = lambda key: True, *,
    variant: Optional[str] = None, use_safetensors: Optional[bool] = None,
) -> dict[str, torch.Tensor]:
    """Tensors whose key passes ``keep`` from a weight file or a (sharded) checkpoint folder
    (``variant`` / ``use_safetensors``: which of a folder's files, see :func:`weight_files`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    files = weight_files(path, variant=variant, use_safetensors=use_safetensors) if path.is_dir() else [path]
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(_read_file(file, keep))
    return tensors


def find_prefix(keys, mark: str) -> Optional[str]:
    """The one ``<anything>{mark}`` prefix of the keys holding ``mark``, or None if none does."""
    prefixes = {k[: k.index(mark) + len(mark)] for k in keys if mark in k}
    if len(prefixes) > 1:
        raise ValueError(f"state dict holds several '{mark}' prefixes {sorted(prefixes)}: pass one module's weights")
    return prefixes.pop() if prefixes else None


def strip_prefix(state: Mapping[str, torch.Tensor], mark: str) -> dict[str, torch.Tensor]:
    """Keys ``<anything>{mark}<name>`` as ``<name>``. All such keys must share one prefix."""
    prefix = find_prefix(state, mark)
    if prefix is None:
        return {}
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _file_holding(path: Path, key: str) -> Path:
    """The file of a checkpoint (a file or a folder) that holds ``key``, for error messages."""
    if not path.is_dir():
        return path
    for index_name, _, _ in _FOLDER_LAYOUTS:
        if (path / index_name).is_file():
            name = read_index(path / index_name).get(key)
            return path / name if name else path
    files = weight_files(path)
    if len(files) == 1:
        return files[0]
    for file in files:  # shards without an index: read the safetensors headers only
        if file.suffix == ".safetensors":
            _require_safetensors()
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                if key in f.keys():
                    return file
    return path


@dataclass(frozen=True)
class Origin:
    """Where a state dict with bare keys came from, for error messages: a checkpoint (a file or a
    folder) and the prefix its keys had there (``model.spatial_embed.``), or an in-memory dict."""

    path: Optional[Path] = None
    prefix: str = ""

    def __str__(self) -> str:
        return "state dict" if self.path is None else f"checkpoint {str(self.path)!r}"

    def key(self, key: str) -> str:
        """``checkpoint '<the file holding it>', key '<the key as stored>'``."""
        stored = self.prefix + key
        if self.path is None:
            return f"state dict key {stored!r}"
        return f"checkpoint {str(_file_holding(self.path, stored))!r}, key {stored!r}"


def dem_dim(state: Mapping[str, torch.Tensor], origin: Origin = Origin()) -> int:
    """The DEM width ``dim``, read off ``attention.linears.0.weight`` (a float ``(dim, dim)`` tensor)."""
    weight = state[DEM_DIM_KEY]
    _check_weight_dtype(weight, origin, DEM_DIM_KEY)
    if weight.ndim != 2 or weight.shape[0] != weight.shape[1] or weight.shape[0] == 0:
        raise ValueError(
            f"{origin.key(DEM_DIM_KEY)}: expected a square (dim, dim) weight with dim > 0, got shape {tuple(weight.shape)}"
        )
    return int(weight.shape[0])


def _check_weight_dtype(tensor: object, origin: Origin, key: str) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{origin.key(key)}: expected a tensor, got {type(tensor).__name__}")
    if tensor.dtype not in WEIGHT_DTYPES:
        names = ", ".join(str(d).replace("torch.", "") for d in WEIGHT_DTYPES)
        raise ValueError(
            f"{origin.key(key)}: dtype {str(tensor.dtype).replace('torch.', '')}, expected a floating-point "
            f"weight ({names}); it is not cast"
        )


def check_dem_state(
    state: Mapping[str, torch.Tensor],
    expected: Union[nn.Module, Mapping[str, torch.Tensor]],
    *,
    origin: Origin = Origin(),
    model: str = "the DEM",
) -> None:
    """Strict check of a DEM state dict (bare keys) against a DEM or its ``state_dict()``, before
    ``load_state_dict``: the same keys, every tensor floating point (float16 / bfloat16 / float32 /
    float64; ints, bools and float8 are refused, not cast) and of the expected shape. A ValueError
    names the file and the key (``origin``) and what was expected."""
    expected = expected.state_dict() if isinstance(expected, nn.Module) else expected
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{origin} does not match {model}: missing keys {missing}, unexpected keys {unexpected}"
        )
    for key in sorted(state):
        tensor = state[key]
        _check_weight_dtype(tensor, origin, key)
        if tensor.shape != expected[key].shape:
            raise ValueError(
                f"{origin.key(key)}: shape {tuple(tensor.shape)}, expected {tuple(expected[key].shape)} for {model}"
            )


def dem_state_and_origin(source: Union[Mapping[str, torch.Tensor], PathLike]) -> tuple[dict[str, torch.Tensor], Origin]:
    """:func:`load_dem_state`, and where the keys came from (for :func:`check_dem_state`'s messages)."""
    path = None
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        source = read_tensors(path, keep=lambda k: DEM_MARK in k or k.startswith(DEM_TOP_LEVEL))
    if not isinstance(source, Mapping):
        raise TypeError(f"state_dict_or_path must be a dict or a path, got {type(source).__name__}")
    prefix = find_prefix(source, DEM_MARK)
    state = strip_prefix(source, DEM_MARK) if prefix is not None else dict(source)
    origin = Origin(path, prefix or "")
    if DEM_DIM_KEY not in state:
        raise ValueError(
            f"no INF-LLaVA DEM weights found in {origin}: expected keys '{DEM_DIM_KEY}', ... "
            f"bare or under a '...{DEM_MARK}' prefix; got {sorted(source)[:8]}{' ...' if len(source) > 8 else ''}"
        )
    return state, origin


def load_dem_state(source: Union[Mapping[str, torch.Tensor], PathLike]) -> dict[str, torch.Tensor]:
    """The DEM's weights under bare keys (``attention.linears.0.weight``, ...).

    ``source``: a state dict with bare keys or keys prefixed ``...spatial_embed.``, or a path
    (file or folder) holding them.
    """
    return dem_state_and_origin(source)[0]
