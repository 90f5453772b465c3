"""dualview: INF-LLaVA's dual-perspective cropping (DCM) and enhancement (DEM) as standalone modules,
and adapters that install them into vision-language hosts.

    from dualview import DCM, DEM, DualViewEncoder
    model = dualview.apply(model, init="identity")   # the adapter is chosen from the model's class
"""

from .cropping import DCM, DualCrops
from .encoder import DualViewEncoder
from .enhance import DEM
from .gate import DualViewGate
from .budget import Budget
from .grid import Box
from .tiled import TiledImage
from .lifecycle import apply, freeze, from_pretrained, load, save_adapter, trainable_parameters, unapply

__all__ = [
    "DCM", "DEM", "DualCrops", "DualViewEncoder", "DualViewGate", "Box", "Budget", "TiledImage",
    "apply", "freeze", "from_pretrained", "load", "save_adapter", "trainable_parameters", "unapply",
]
__version__ = "0.3.0"
