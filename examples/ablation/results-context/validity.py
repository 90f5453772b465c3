"""The context task's pre-registered validity checks: the 99% accuracy intervals (two-way bootstrap,
5000 resamples) of the arms that cannot see the pointer must contain chance (25%).

    python examples/ablation/results-context/validity.py examples/ablation/results-context/main
"""

import json
import sys
from pathlib import Path

from dualview.ablation.report import _generator, _scores
from dualview.ablation.stats import bootstrap_mean

ARMS = ("local_only@context", "resize@context", "anyres@context", "s2@context")

out = Path(sys.argv[1])
for arm in ARMS:
    runs = {int(p.stem[4:]): json.loads(p.read_text()) for p in (out / "runs" / arm).glob("seed*.json")}
    ci = bootstrap_mean(_scores(runs, sorted(runs)), resamples=5000, level=0.99, generator=_generator())
    print(f"{arm}: {100 * ci.estimate:.1f} [{100 * ci.low:.1f}, {100 * ci.high:.1f}] over {len(runs)} seeds; "
          f"contains 25%: {ci.low <= 0.25 <= ci.high}")
