"""Mutation check of the core: does the test suite reject each wrong program of ``mutants.py``?

    python tests/mutation/run.py                    # every mutant, on a copy of the working tree
    python tests/mutation/run.py --committed        # on a copy of HEAD (what RESULTS.md reports)
    python tests/mutation/run.py --only select-tie-later unpad-no-round
    python tests/mutation/run.py --committed --write tests/mutation/RESULTS.md

The checkout itself is never modified: the files are copied to a temporary folder, each mutant is
written there, its tests run with ``pytest -x`` (``OMP_NUM_THREADS=1``, a per-mutant timeout, no
bytecode written, a fresh hypothesis database), and the file is put back. A guard plugin makes
every pytest run check that ``dualview`` and ``dualview.adapters`` are imported from the copy
(the editable install would otherwise serve the checkout's files).

A periodic check, not part of CI: one run takes about 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from io import BytesIO
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from mutants import MUTANTS, Mutant  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
GUARD_EXIT = 99
GUARD = f'''"""pytest plugin written by tests/mutation/run.py: the copy's modules must be the ones imported."""
import os
from pathlib import Path

def pytest_configure(config):
    import dualview
    import dualview.adapters
    root = Path(os.environ["MUTATION_COPY"]).resolve()
    for module in (dualview, dualview.adapters):
        where = Path(module.__file__).resolve()
        if root not in where.parents:
            print(f"mutation guard: {{module.__name__}} imported from {{where}}, not from the copy {{root}}")
            os._exit({GUARD_EXIT})
'''


@dataclass
class Outcome:
    mutant: Mutant
    status: str  # killed | survived | timeout | stale
    seconds: float
    detail: str  # the first failing test, or why


def copy_tree(dest: Path, committed: bool) -> str:
    """The checkout's files (HEAD, or the working tree with untracked, non-ignored files) in ``dest``;
    returns a description of the source."""
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    if committed:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "HEAD"], capture_output=True, check=True).stdout
        with tarfile.open(fileobj=BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")
        return f"commit {head}"
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-co", "--exclude-standard", "-z"],
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return f"working tree on commit {head} (with uncommitted changes, if any)"


def prepare(dest: Path) -> None:
    """Make the copy importable on its own: ``dualview.adapters`` from the copy's ``adapters/``."""
    if not (dest / "dualview" / "adapters").exists():
        shutil.copytree(dest / "adapters", dest / "dualview" / "adapters")
    (dest / "_mutation_guard.py").write_text(GUARD)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str, float]:
    """-> (return code, or None on timeout; output; seconds)."""
    shutil.rmtree(copy / ".hypothesis", ignore_errors=True)  # no example replayed from another mutant
    missing = [t for t in tests if not (copy / t).is_file()]
    if missing:
        raise SystemExit(f"test files missing from the copy: {missing}")
    env = dict(os.environ, PYTHONPATH=str(copy), MUTATION_COPY=str(copy), OMP_NUM_THREADS="1",
               PYTHONDONTWRITEBYTECODE="1", PYTHONHASHSEED="0")
    cmd = [sys.executable, "-m", "pytest", *tests, "-x", "-q", "-p", "no:cacheprovider", "-p", "_mutation_guard",
           "-o", "addopts=", "-rf", "--tb=no"]
    start = time.monotonic()
    try:
        proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        out = (e.stdout or b"").decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return None, out, time.monotonic() - start
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - start


def first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if match:
        return match.group(1)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else "no output"


def run_mutant(copy: Path, mutant: Mutant, timeout: float) -> Outcome:
    path = copy / mutant.path
    if not path.is_file():
        return Outcome(mutant, "stale", 0.0, f"{mutant.path} not found")
    original = path.read_text()
    count = original.count(mutant.old)
    if count != 1:
        return Outcome(mutant, "stale", 0.0, f"the text to replace occurs {count} times in {mutant.path}")
    try:
        path.write_text(original.replace(mutant.old, mutant.new))
        if mutant.path.startswith("adapters/") and (copy / "dualview" / "adapters" / Path(mutant.path).name).is_file():
            shutil.copy2(path, copy / "dualview" / "adapters" / Path(mutant.path).name)
        code, output, seconds = run_tests(copy, mutant.tests, timeout)
    finally:
        path.write_text(original)
        if mutant.path.startswith("adapters/") and (copy / "dualview" / "adapters" / Path(mutant.path).name).is_file():
            shutil.copy2(path, copy / "dualview" / "adapters" / Path(mutant.path).name)
    if code == GUARD_EXIT:
        raise SystemExit(f"import guard failed for {mutant.id}:\n{output}")
    if code is None:
        return Outcome(mutant, "timeout", seconds, f"over {timeout:.0f} s")
    if code == 0:
        return Outcome(mutant, "survived", seconds, "all tests passed")
    return Outcome(mutant, "killed", seconds, first_failure(output))


def score(outcomes: list[Outcome]) -> tuple[int, int, int, list[Outcome], list[Outcome]]:
    """-> (killed incl. timeouts, non-equivalent run, equivalent survivors, real survivors, equivalent that died)."""
    ran = [o for o in outcomes if o.status != "stale"]
    killed = [o for o in ran if o.status in ("killed", "timeout")]
    equivalent_alive = [o for o in ran if o.status == "survived" and o.mutant.equivalent]
    real_survivors = [o for o in ran if o.status == "survived" and not o.mutant.equivalent]
    equivalent_killed = [o for o in killed if o.mutant.equivalent]
    return len(killed), len(ran) - len(equivalent_alive), len(equivalent_alive), real_survivors, equivalent_killed


def report(outcomes: list[Outcome], source: str, minutes: float) -> str:
    killed, counted, equivalent, survivors, equivalent_killed = score(outcomes)
    stale = [o for o in outcomes if o.status == "stale"]
    pct = 100.0 * killed / counted if counted else 0.0
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Mutation check: latest results",
        "",
        f"Run {date} on the {source}, `python tests/mutation/run.py --committed` "
        f"({minutes:.0f} min, {os.cpu_count()} CPU cores).",
        "",
        f"**Score: {killed} of {counted} non-equivalent mutants killed ({pct:.1f}%).** "
        f"{len(outcomes)} mutants: {killed} killed, {len(survivors)} survived, {equivalent} equivalent "
        f"(survive by construction, reasons below), {len(stale)} stale (text not found: the source moved on).",
        "",
    ]
    if survivors:
        lines += ["## Survivors (not equivalent: a missing test)", ""]
        lines += [f"- `{o.mutant.id}` ({o.mutant.path}): {o.mutant.what}" for o in survivors] + [""]
    if equivalent_killed:
        lines += ["## Declared equivalent but killed (the declaration is wrong)", ""]
        lines += [f"- `{o.mutant.id}`: {o.detail}" for o in equivalent_killed] + [""]
    lines += ["## Equivalent mutants", ""]
    lines += [f"- `{o.mutant.id}` ({o.mutant.path}): {o.mutant.what}. Equivalent: {o.mutant.equivalent}"
              for o in outcomes if o.mutant.equivalent and o.status == "survived"] + [""]
    if stale:
        lines += ["## Stale mutants", ""] + [f"- `{o.mutant.id}`: {o.detail}" for o in stale] + [""]
    lines += ["## Every mutant", "", "| mutant | file | wrong program | result | killed by | s |", "|---|---|---|---|---|---|"]
    for o in outcomes:
        what = o.mutant.what.replace("|", "\\|")
        lines.append(f"| `{o.mutant.id}` | {o.mutant.path} | {what} | {o.status} | {o.detail} | {o.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", metavar="ID", help="run these mutants only")
    parser.add_argument("--committed", action="store_true", help="mutate a copy of HEAD, not of the working tree")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant (default 300)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="write the report (markdown) to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--tests", nargs="+", metavar="FILE", help="run these test files against every chosen mutant")
    args = parser.parse_args(argv)

    ids = [m.id for m in MUTANTS]
    if len(set(ids)) != len(ids):
        raise SystemExit("mutant ids must be unique")
    chosen = MUTANTS if not args.only else [m for m in MUTANTS if m.id in args.only]
    if args.tests:
        chosen = [replace(m, tests=tuple(args.tests)) for m in chosen]
    unknown = set(args.only or ()) - set(ids)
    if unknown:
        raise SystemExit(f"unknown mutant id(s): {sorted(unknown)}")

    copy = Path(tempfile.mkdtemp(prefix="dualview-mutation-"))
    try:
        source = copy_tree(copy, args.committed)
        prepare(copy)
        print(f"copy of the {source} in {copy}", flush=True)
        suites = sorted({m.tests for m in chosen})
        for tests in suites:  # the unmutated code must pass, or no result means anything
            code, output, seconds = run_tests(copy, tests, args.timeout)
            if code == GUARD_EXIT:
                raise SystemExit(f"import guard failed:\n{output}")
            if code != 0:
                raise SystemExit(f"the unmutated copy fails {' '.join(tests)} ({first_failure(output)}):\n{output[-3000:]}")
            print(f"baseline passes {len(tests)} test file(s) in {seconds:.0f} s", flush=True)
        start = time.monotonic()
        outcomes = []
        for i, mutant in enumerate(chosen, 1):
            outcome = run_mutant(copy, mutant, args.timeout)
            outcomes.append(outcome)
            flag = " (declared equivalent)" if mutant.equivalent else ""
            print(f"[{i}/{len(chosen)}] {mutant.id}: {outcome.status}{flag} in {outcome.seconds:.0f} s - {outcome.detail}",
                  flush=True)
        minutes = (time.monotonic() - start) / 60
    finally:
        if not args.keep:
            shutil.rmtree(copy, ignore_errors=True)
    text = report(outcomes, source, minutes)
    if args.write:
        args.write.write_text(text)
    killed, counted, _, survivors, equivalent_killed = score(outcomes)
    print(f"\n{killed} of {counted} non-equivalent mutants killed ({100.0 * killed / max(counted, 1):.1f}%); "
          f"survivors: {[o.mutant.id for o in survivors]}; declared equivalent but killed: "
          f"{[o.mutant.id for o in equivalent_killed]}")
    return 1 if survivors or equivalent_killed else 0


if __name__ == "__main__":
    sys.exit(main())
