"""``dualview.adapters`` in a source checkout: the top-level ``adapters/`` folder.

The adapters live in ``adapters/`` at the repository root (the layout is part of the design) and
are installed as ``dualview.adapters`` (``package-dir`` in pyproject.toml): the wheel ships
``adapters/*.py`` here instead of this file. Without an install (``PYTHONPATH=.``, an IDE reading
the checkout) this file stands in: it loads ``adapters/__init__.py`` as ``dualview.adapters``, with
``adapters/`` as the package's search path, so ``dualview.adapters.<name>`` imports the real files.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_FOLDER = Path(__file__).resolve().parents[2] / "adapters"
_INIT = _FOLDER / "__init__.py"
if not _INIT.is_file():
    raise ImportError(
        f"dualview.adapters: the checkout's adapters/ folder was not found at {str(_FOLDER)!r}; "
        "run from a complete checkout or install the package (pip install .)"
    )
_spec = importlib.util.spec_from_file_location(__name__, _INIT, submodule_search_locations=[str(_FOLDER)])
_module = importlib.util.module_from_spec(_spec)
# the import system returns what sys.modules holds once this file has run: the real package
sys.modules[__name__] = _module
_spec.loader.exec_module(_module)
