"""Mutation check of the core: does the test suite reject each wrong program of ``mutants.py``?

    python tests/mutation/run.py                    # every mutant, on a copy of the working tree
    python tests/mutation/run.py --committed        # on a copy of HEAD (what RESULTS.md reports)
    python tests/mutation/run.py --only select-tie-later unpad-no-round
    python tests/mutation/run.py --committed --write tests/mutation/RESULTS.md

The checkout itself is never modified: the files are copied to a temporary folder, each mutant is
written there, its tests run with ``pytest -x`` in a fork of this process (which imported torch and
transformers once; ``OMP_NUM_THREADS=1``, a per-mutant timeout, no bytecode written, a fresh
hypothesis database), and the file is put back. A guard plugin makes
every pytest run check that ``dualview`` and ``dualview.adapters`` are imported from the copy
(the editable install would otherwise serve the checkout's files).

A periodic check, not part of CI: one run takes about 20 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
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
EXAMPLES: int | None = None
"""Hypothesis examples per property test (--examples); None keeps the CI profile's 100."""
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
        if source.is_symlink():  # dualview/adapters -> ../adapters stays a link into the copy
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).symlink_to(os.readlink(source))
        elif source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return f"working tree on commit {head} (with uncommitted changes, if any)"


def prepare(dest: Path) -> None:
    """Add the guard plugin (``dualview.adapters`` is the copy's symlink to its ``adapters/``)."""
    (dest / "_mutation_guard.py").write_text(GUARD)


# Imported once by this process; each test run is a fork of it, so a mutant pays for pytest and
# its tests, not for importing torch and transformers again (about 7 s of CPU each).
PRELOAD = (
    "torch", "einops", "hypothesis", "pytest", "safetensors.torch", "transformers",
    "transformers.image_processing_utils", "transformers.models.llava_next.modeling_llava_next",
    "transformers.models.llava_next.processing_llava_next", "transformers.models.llava_next.image_processing_llava_next",
)


def preload() -> None:
    import importlib

    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except ImportError:
            pass
    import torch

    torch.set_num_threads(1)


def run_tests(copy: Path, tests: tuple[str, ...], timeout: float) -> tuple[int | None, str, float]:
    """Run pytest on ``tests`` in a fork whose imports resolve to ``copy``.
    -> (return code, or None on timeout; output; seconds)."""
    shutil.rmtree(copy / ".hypothesis", ignore_errors=True)  # no example replayed from another mutant
    missing = [t for t in tests if not (copy / t).is_file()]
    if missing:
        raise SystemExit(f"test files missing from the copy: {missing}")
    args = [*tests, "-x", "-q", "-p", "no:cacheprovider", "-p", "_mutation_guard", "-o", "addopts=", "-rf", "--tb=no"]
    log = copy / ".mutation-log"
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: run the tests, exit with pytest's code
        code = 3
        try:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            os.chdir(copy)
            sys.path.insert(0, str(copy))
            os.environ["MUTATION_COPY"] = str(copy)
            if EXAMPLES is not None:  # tests/conftest.py loads the profile HYPOTHESIS_PROFILE names
                from hypothesis import HealthCheck, settings

                settings.register_profile("mutation", max_examples=EXAMPLES, deadline=None, derandomize=True,
                                          suppress_health_check=[HealthCheck.too_slow])
                os.environ["HYPOTHESIS_PROFILE"] = "mutation"
            import pytest

            code = int(pytest.main(args))
        except BaseException as e:  # noqa: BLE001 - anything the mutant breaks is a failed run
            print(f"mutation runner: {type(e).__name__}: {e}", flush=True)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    code: int | None = None
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            break
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            break
        time.sleep(0.2)
    output = log.read_text(errors="replace") if log.exists() else ""
    return code, output, time.monotonic() - start


def first_failure(output: str) -> str:
    match = re.search(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
    if match:
        return match.group(1)
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else "no output"


def run_mutant(copy: Path, mutant: Mutant, timeout: float) -> Outcome:
    if not mutant.path:  # a baseline: the unmutated code
        code, output, seconds = run_tests(copy, mutant.tests, timeout)
        if code == GUARD_EXIT:
            raise SystemExit(f"import guard failed:\n{output}")
        status = "survived" if code == 0 else "killed"
        return Outcome(mutant, status, seconds, first_failure(output) if code else "all tests passed")
    path = copy / mutant.path
    if not path.is_file():
        return Outcome(mutant, "stale", 0.0, f"{mutant.path} not found")
    original = path.read_text()
    count = original.count(mutant.old)
    if count != 1:
        return Outcome(mutant, "stale", 0.0, f"the text to replace occurs {count} times in {mutant.path}")
    try:
        path.write_text(original.replace(mutant.old, mutant.new))  # dualview/adapters links to adapters/: one file
        code, output, seconds = run_tests(copy, mutant.tests, timeout)
    finally:
        path.write_text(original)
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
        f"Run {date} on the {source}: `python tests/mutation/run.py {' '.join(sys.argv[1:])}` "
        f"({minutes:.0f} min on {os.cpu_count()} shared CPU cores; hypothesis examples per property test: "
        f"{EXAMPLES if EXAMPLES is not None else 'the CI profile (100)'}).",
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
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per mutant (default 1800: generous, so that a loaded machine is not read as a kill)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="write the report (markdown) to FILE")
    parser.add_argument("--keep", action="store_true", help="keep the temporary copy")
    parser.add_argument("--jobs", type=int, default=1, help="mutants run at once, each on its own copy (default 1)")
    parser.add_argument("--examples", type=int, help="hypothesis examples per property test (default: the CI "
                        "profile's 100); fewer is faster and may let a subtle mutant live")
    parser.add_argument("--tests", nargs="+", metavar="FILE", help="run these test files against every chosen mutant")
    args = parser.parse_args(argv)
    global EXAMPLES
    EXAMPLES = args.examples

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
        os.environ.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
        sys.dont_write_bytecode = True
        preload()
        # The unmutated code must pass each test set, or no result means anything: the baselines
        # run first, beside the mutants, and are checked at the end.
        suites = {frozenset(m.tests): m.tests for m in chosen}.values()
        baselines = [Mutant(f"baseline-{i}", "", "", "", "the unmutated code", tests=t) for i, t in enumerate(suites)]
        chosen = baselines + chosen
        start = time.monotonic()
        copies = [copy] + [Path(tempfile.mkdtemp(prefix="dualview-mutation-")) for _ in range(args.jobs - 1)]
        for extra in copies[1:]:
            shutil.copytree(copy, extra, symlinks=True, dirs_exist_ok=True)  # dualview/adapters stays a link
        results = copy / ".mutation-results.jsonl"
        workers = []
        for j, worker_copy in enumerate(copies):
            pid = os.fork()
            if pid == 0:  # one worker per copy: every jobs-th mutant, one at a time
                code = 0
                try:
                    for i, mutant in enumerate(chosen):
                        if i % args.jobs != j:
                            continue
                        outcome = run_mutant(worker_copy, mutant, args.timeout)
                        with open(results, "a") as f:
                            f.write(json.dumps(dict(id=mutant.id, status=outcome.status, seconds=outcome.seconds,
                                                    detail=outcome.detail)) + "\n")
                        flag = " (declared equivalent)" if mutant.equivalent else ""
                        print(f"[{i + 1}/{len(chosen)}] {mutant.id}: {outcome.status}{flag} in {outcome.seconds:.0f} s"
                              f" - {outcome.detail}", flush=True)
                except BaseException as e:  # noqa: BLE001
                    print(f"worker {j}: {type(e).__name__}: {e}", flush=True)
                    code = 1
                os._exit(code)
            workers.append(pid)
        failed = [pid for pid in workers if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0]
        for extra in copies[1:]:
            if not args.keep:
                shutil.rmtree(extra, ignore_errors=True)
        if failed:
            raise SystemExit("a worker failed (see above)")
        by_id = {}
        for line in results.read_text().splitlines():
            row = json.loads(line)
            by_id[row["id"]] = row
        outcomes = [Outcome(m, by_id[m.id]["status"], by_id[m.id]["seconds"], by_id[m.id]["detail"]) for m in chosen]
        for o in outcomes[:len(baselines)]:
            if o.status != "survived":
                raise SystemExit(f"the unmutated copy fails {' '.join(o.mutant.tests)}: {o.detail}; no result is valid")
            print(f"baseline passes {' '.join(o.mutant.tests)} in {o.seconds:.0f} s", flush=True)
        outcomes = outcomes[len(baselines):]
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
