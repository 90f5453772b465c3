"""INF-LLaVA checkpoint -> a small dualview safetensors file: the DEM (``spatial_embed.*``) and the
projector (``mm_projector.*``), with the DEM's configuration in the metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .._checks import check_positive_int, require
from .._output import check_not_input, check_writable, write_atomically
from ..checkpoints import (
    DEM_DIM_KEY, DEM_MARK, PROJECTOR_MARK, WEIGHT_DTYPES, Origin, check_dem_state, checkpoint_files, dem_dim,
    find_prefix, read_tensors, strip_prefix,
)
from ..enhance import DEM

FORMAT = "dualview-inf-llava/1"
# What the released SpatialEmbed is; num_heads cannot be read off the weights (the converter takes
# it as given, else assumes the released 8 and says so in the metadata: NUM_HEADS_FROM).
RELEASED = {"num_heads": 8, "out_size": (24, 24), "directions": "both", "fusion": "linear_concat", "resample": "bilinear"}
NUM_HEADS_FROM = "num_heads_from"
"""Metadata entry: ``given`` (the caller said), or ``assumed`` (the released value: the weights cannot tell)."""


OUTPUT_SUFFIX = ".safetensors"
"""The converted file is safetensors, and its name says so: ``-o dem.bin`` is refused."""


def check_output_name(output: Union[str, Path], name: str = "output") -> Path:
    """``output`` must name a ``.safetensors`` file, else one ValueError naming it (as ``name``;
    an empty ``name`` leaves it out, for argparse, which names the option itself)."""
    output = Path(output)
    if output.suffix != OUTPUT_SUFFIX:
        got = f"suffix {output.suffix!r}" if output.suffix else "no suffix"
        raise ValueError(
            f"{name + ' ' if name else ''}must be a {OUTPUT_SUFFIX} file (the converted checkpoint is safetensors "
            f"whatever its name; a .bin name would misdescribe it), got {str(output)!r} ({got}): "
            f"e.g. {str(output.with_suffix(OUTPUT_SUFFIX))!r}"
        )
    return output


def convert_inf_llava(
    source: Union[str, Path],
    output: Union[str, Path],
    *,
    num_heads: Optional[int] = None,
    output_name: str = "output",
    num_heads_name: str = "num_heads",
) -> dict:
    """Read ``source`` (a checkpoint folder, sharded or not, or one weight file such as the
    pretraining stage's ``mm_projector.bin``) safely and write ``output`` (a ``.safetensors`` file).
    Returns a summary (``num_heads``, and ``num_heads_assumed``).

    ``num_heads``: the DEM's attention heads, which its weights cannot tell; None assumes the
    released 8, and the metadata says so (``num_heads_from``: ``assumed``, else ``given``).

    ``output`` is never one of the files read (the same path, a symlink or a hard link to one is
    refused before anything is read) and is written atomically (a temporary file in its folder,
    then ``os.replace``), with the ordinary file mode (``0o666`` minus the umask). ``output_name``
    and ``num_heads_name`` are how the caller names them in error messages (the command: ``-o``,
    ``--num-heads``)."""
    require("safetensors", extra="hf", feature="converting an INF-LLaVA checkpoint")
    from safetensors.torch import save

    source, output = Path(source), Path(output)
    if num_heads is not None:
        check_positive_int(num_heads, num_heads_name)
    options = {**RELEASED, "num_heads": RELEASED["num_heads"] if num_heads is None else num_heads}
    # checked first: nothing is read before a command line mistake is reported
    if output.is_dir():
        raise ValueError(
            f"{output_name} {str(output)!r} is a folder: give the file to write, e.g. {str(output / 'dem.safetensors')!r}"
        )
    check_output_name(output, output_name)
    check_writable(output, name=output_name)  # a device, a FIFO, a path under a file: refused too
    if not source.exists():
        raise FileNotFoundError(f"checkpoint {str(source)!r} does not exist")
    check_not_input(output, checkpoint_files(source), name=output_name)
    tensors = read_tensors(source, keep=lambda k: DEM_MARK in k or PROJECTOR_MARK in k)
    dem_prefix = find_prefix(tensors, DEM_MARK)
    if dem_prefix is None:
        raise ValueError(f"checkpoint {str(source)!r} holds no '{DEM_MARK}' keys: it is not an INF-LLaVA checkpoint")
    dem_state = strip_prefix(tensors, DEM_MARK)
    origin = Origin(source, dem_prefix)
    if DEM_DIM_KEY not in dem_state:
        raise ValueError(f"{origin.key(DEM_DIM_KEY)} is missing: the DEM's weights are incomplete")
    dim = dem_dim(dem_state, origin)
    if dim % options["num_heads"]:
        given = "" if num_heads is not None else f" (assumed, the released value: pass {num_heads_name})"
        raise ValueError(
            f"{num_heads_name} {options['num_heads']}{given} does not divide the DEM's dim {dim} "
            f"({origin.key(DEM_DIM_KEY)}): give the number of heads the DEM was trained with"
        )
    dem = DEM(dim, **options)
    check_dem_state(dem_state, dem, origin=origin, model="the released INF-LLaVA DEM")  # keys, dtypes, shapes
    projector_prefix = find_prefix(tensors, PROJECTOR_MARK)
    projector = strip_prefix(tensors, PROJECTOR_MARK)
    for key, tensor in projector.items():
        if tensor.dtype not in WEIGHT_DTYPES:
            raise ValueError(
                f"{Origin(source, projector_prefix).key(key)}: dtype {tensor.dtype}, expected a floating-point weight"
            )
    out = {f"{DEM_MARK}{k}": v.contiguous() for k, v in dem_state.items()}
    out.update({f"{PROJECTOR_MARK}{k}": v.contiguous() for k, v in projector.items()})
    metadata = {"format": FORMAT, "dim": str(dem.dim), "source": str(source),
                NUM_HEADS_FROM: "assumed" if num_heads is None else "given"}
    metadata.update({k: "x".join(map(str, v)) if isinstance(v, tuple) else str(v) for k, v in options.items()})
    data = save(out, metadata=metadata)  # bytes: the file is written below, atomically, with the usual mode
    write_atomically(output, lambda tmp: tmp.write_bytes(data), name=output_name)
    return {"dim": dem.dim, "dem_tensors": len(dem_state), "projector_tensors": len(projector),
            "num_heads": dem.num_heads, "num_heads_assumed": num_heads is None}


def _metadata_value(meta: dict, key: str, path: Path, parse):
    """``parse(meta[key])``, or one ValueError naming the file and the entry."""
    if key not in meta:
        raise ValueError(
            f"{str(path)!r}: metadata entry {key!r} is missing (written by another version of the converter?): "
            "convert the checkpoint again with `dualview convert-inf-llava`"
        )
    try:
        return parse(meta[key])
    except ValueError:
        raise ValueError(f"{str(path)!r}: metadata entry {key!r} has an invalid value {meta[key]!r}") from None


def _size(text: str) -> tuple[int, int]:
    out_h, out_w = (int(v) for v in text.split("x"))  # a ValueError for anything but "HxW"
    return out_h, out_w


def load_converted(path: Union[str, Path]) -> tuple[DEM, dict[str, torch.Tensor]]:
    """A file written by :func:`convert_inf_llava` -> (the DEM configured from its metadata, the
    projector's state dict with bare keys)."""
    require("safetensors", extra="hf", feature="reading a converted checkpoint")
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"converted checkpoint {str(path)!r} does not exist or is not a file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except SafetensorError as e:
        raise ValueError(f"{str(path)!r} is not a readable safetensors file: {e}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a dualview conversion (metadata format {meta.get('format')!r})")
    options = dict(
        num_heads=_metadata_value(meta, "num_heads", path, int),
        out_size=_metadata_value(meta, "out_size", path, _size),
        directions=_metadata_value(meta, "directions", path, str),
        fusion=_metadata_value(meta, "fusion", path, str),
        resample=_metadata_value(meta, "resample", path, str),
    )
    dem = DEM.from_inf_llava(path, **options)
    projector = strip_prefix(read_tensors(path, keep=lambda k: k.startswith(PROJECTOR_MARK)), PROJECTOR_MARK)
    return dem, projector
