"""dualview: INF-LLaVA's dual-perspective cropping (DCM) and enhancement (DEM) as standalone modules.

    from dualview import DCM, DEM, DualViewEncoder
"""

from .cropping import DCM, DualCrops
from .encoder import DualViewEncoder
from .enhance import DEM
from .grid import Box, Budget

__all__ = ["DCM", "DEM", "DualCrops", "DualViewEncoder", "Box", "Budget"]
__version__ = "0.1.0"
