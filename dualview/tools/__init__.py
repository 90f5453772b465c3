"""The tooling around the modules: the ``dualview`` command (:mod:`.cli`, :mod:`.show`), the demo
(``python -m dualview.tools.demo``), INF-LLaVA checkpoint conversion (:mod:`.convert`) and the
patches for LLaVA forks (:mod:`.upstream`, ``upstream_patches/``). The core never imports it."""
