"""INF-LLaVA checkpoint -> a small dualview safetensors file: the DEM (``spatial_embed.*``) and the
projector (``mm_projector.*``), with the DEM's configuration in the metadata."""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from .checkpoints import DEM_MARK, PROJECTOR_MARK, read_tensors, strip_prefix
from .enhance import DEM

FORMAT = "dualview-inf-llava/1"
# What the released SpatialEmbed is; num_heads cannot be read off the weights.
RELEASED = {"num_heads": 8, "out_size": (24, 24), "directions": "both", "fusion": "linear_concat", "resample": "bilinear"}


def convert_inf_llava(source: Path, output: Path) -> dict:
    """Read ``source`` (a checkpoint folder, sharded or not, or one weight file such as the
    pretraining stage's ``mm_projector.bin``) safely and write ``output``. Returns a summary."""
    from safetensors.torch import save_file

    tensors = read_tensors(source, keep=lambda k: DEM_MARK in k or PROJECTOR_MARK in k)
    dem_state = strip_prefix(tensors, DEM_MARK)
    if not dem_state:
        raise ValueError(f"checkpoint {str(source)!r} holds no '{DEM_MARK}' keys: it is not an INF-LLaVA checkpoint")
    dem = DEM.from_inf_llava(dem_state, **{k: v for k, v in RELEASED.items()})  # strict: every key checked
    projector = strip_prefix(tensors, PROJECTOR_MARK)
    out = {f"{DEM_MARK}{k}": v.contiguous() for k, v in dem_state.items()}
    out.update({f"{PROJECTOR_MARK}{k}": v.contiguous() for k, v in projector.items()})
    metadata = {"format": FORMAT, "dim": str(dem.dim), "source": str(source)}
    metadata.update({k: "x".join(map(str, v)) if isinstance(v, tuple) else str(v) for k, v in RELEASED.items()})
    output.parent.mkdir(parents=True, exist_ok=True)
    save_file(out, str(output), metadata=metadata)
    return {"dim": dem.dim, "dem_tensors": len(dem_state), "projector_tensors": len(projector)}


def load_converted(path: Union[str, Path]) -> tuple[DEM, dict[str, torch.Tensor]]:
    """A file written by :func:`convert_inf_llava` -> (the DEM configured from its metadata, the
    projector's state dict with bare keys)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{str(path)!r} is not a dualview conversion (metadata format {meta.get('format')!r})")
    out_h, out_w = (int(v) for v in meta["out_size"].split("x"))
    dem = DEM.from_inf_llava(
        path, num_heads=int(meta["num_heads"]), out_size=(out_h, out_w), directions=meta["directions"],
        fusion=meta["fusion"], resample=meta["resample"],
    )
    projector = strip_prefix(read_tensors(path, keep=lambda k: k.startswith(PROJECTOR_MARK)), PROJECTOR_MARK)
    return dem, projector
