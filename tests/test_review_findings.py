"""Adversarial review of the issue 22 adapter fixes, the serving / evaluation integrations and the
run scripts: each test is a concrete defect found in review and FAILS on the reviewed code (branch
``review``). A test passes once its defect is fixed; see the review report for the expected
behaviour of each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import torch

from dualview.adapters import hf_llava
from dualview.integrations import vllm_plugin

from .integrations import tiny_llava_next
from .test_adapter_hf_llava import adapted

ROOT = Path(__file__).resolve().parents[1]


def _dem_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _two_adapted_models():
    """Two adapted hf_llava models that differ only in their DEM weights (b = a + 1)."""
    a, _ = adapted()
    b, _ = adapted()
    with torch.no_grad():
        for pa, pb in zip(a.model.spatial_embed.parameters(), b.model.spatial_embed.parameters()):
            pb.copy_(pa + 1.0)
    return a, b


# ---- 1. from_pretrained reads the DEM from other files than the host's weights -----------------------


def test_from_pretrained_with_subfolder_restores_the_dem_of_that_subfolder(tmp_path):
    """``reload`` passes ``subfolder`` to the host's from_pretrained but reads the DEM from ``path``
    itself: the DEM of ANOTHER checkpoint (the parent folder's) is loaded silently beside the
    subfolder's host weights (a run folder with its final model and checkpoint-N/ subfolders)."""
    a, b = _two_adapted_models()
    a.save_pretrained(tmp_path)  # e.g. the final model
    b.save_pretrained(tmp_path / "checkpoint-500")  # an intermediate checkpoint
    loaded = hf_llava.from_pretrained(tmp_path, subfolder="checkpoint-500")
    same = _dem_equal(loaded.model.spatial_embed, b.model.spatial_embed)
    assert same, "the DEM came from the parent folder, not from subfolder='checkpoint-500'"


def test_from_pretrained_with_variant_restores_the_dem_of_that_variant(tmp_path):
    """``variant="ema"`` loads ``model.ema.safetensors`` for the host but the DEM from
    ``model.safetensors`` (checkpoints.weight_files knows no variants): a silent mix of two checkpoints."""
    a, b = _two_adapted_models()
    a.save_pretrained(tmp_path)
    b.save_pretrained(tmp_path, variant="ema")
    loaded = hf_llava.from_pretrained(tmp_path, variant="ema")
    same = _dem_equal(loaded.model.spatial_embed, b.model.spatial_embed)
    assert same, "the DEM came from model.safetensors, not from variant='ema' (model.ema.safetensors)"


# ---- 2. vllm_plugin.save_pretrained / mark_for_vllm ---------------------------------------------------


def test_vllm_save_pretrained_refuses_a_plain_model_before_writing_anything(tmp_path):
    """``vllm_plugin.save_pretrained`` saves first and checks after: a plain (not adapted) LLaVA-NeXT
    overwrites the folder (here: a good dual-view save) and only then raises. With ``push_to_hub=True``
    the unmarked folder is already uploaded when the check runs."""
    folder = tmp_path / "served"
    vllm_plugin.save_pretrained(tiny_llava_next.model(seed=0), folder)  # a good dual-view folder
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    with pytest.raises(ValueError, match="dual-view"):
        vllm_plugin.save_pretrained(tiny_llava_next.model(dual_view=False), folder)
    after = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    same = after == before
    assert same, "the refused plain model overwrote the dual-view folder before the refusal"


def test_mark_for_vllm_refuses_a_folder_whose_dualview_entry_is_null(tmp_path):
    """``mark_for_vllm`` tests ``'dualview' in config`` only: ``"dualview": null`` (config.dualview set
    to None, e.g. by hand to switch dual view off) is marked for the dual-view architecture."""
    model = tiny_llava_next.model(dual_view=False)
    model.config.dualview = None
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["dualview"] is None
    with pytest.raises(ValueError, match="dualview"):
        vllm_plugin.mark_for_vllm(tmp_path)


# ---- 3. DEM assignment: a refused value already replaced the DEM ------------------------------------


def test_a_refused_none_assignment_leaves_the_registered_dem_in_place():
    """``DualViewHost.__setattr__`` checks only ``nn.Module`` values before assigning: ``spatial_embed =
    None`` is assigned, THEN refused (TypeError from the settings record), leaving a model without DEM
    that every later call refuses. The docstring promises 'a wrong DEM is refused before it replaces
    the right one'."""
    model, _ = adapted()
    dem = model.model.spatial_embed
    with pytest.raises((TypeError, ValueError), match="spatial_embed"):
        model.model.spatial_embed = None
    assert model.model._modules.get("spatial_embed") is dem


# ---- 4. scripts: lanes that skip, lanes that never refresh ------------------------------------------


def _copy_scripts(tmp_path: Path, *names: str) -> Path:
    work = tmp_path / "clone"
    work.mkdir()
    for name in names:
        src = ROOT / name
        (shutil.copytree if src.is_dir() else shutil.copy)(src, work / name)
    return work


@pytest.mark.skipif(shutil.which("python3") is None, reason="needs python3 (lanes/setup.sh makes a venv)")
def test_a_lane_whose_index_is_unreachable_fails_instead_of_being_skipped(tmp_path):
    """lanes/setup.sh exits 3 ("cannot be installed on this machine", lanes/run.sh: SKIPPED, exit 0)
    whenever pip prints 'Could not find a version' / 'No matching distribution': pip prints exactly that
    when the index cannot be reached (and for a mistyped pin). A network outage, or any CI machine,
    turns the serving lanes into a green 'SKIPPED' and .ci/run reports '[ci] ok'."""
    work = _copy_scripts(tmp_path, "lanes", "pyproject.toml")
    env = {**os.environ, "PIP_CONFIG_FILE": os.devnull, "PIP_FIND_LINKS": "", "PIP_INDEX_URL": "http://127.0.0.1:9/simple",
           "PIP_RETRIES": "0", "PIP_TIMEOUT": "2"}
    run = subprocess.run(["bash", "lanes/run.sh", "eval"], cwd=work, env=env, capture_output=True, text=True,
                         timeout=300)
    # accelerate==1.16.0 (lanes/eval.txt's first pin) is on PyPI: the lane was not "not served", it was unreachable
    assert run.returncode != 0, f"an unreachable index skipped the lane with exit 0:\n{run.stderr[-600:]}"


_STUB_PYTHON3 = textwrap.dedent("""\
    #!/usr/bin/env bash
    # python3 -m venv DIR: a fake venv whose pip / python only log their arguments
    if [ "$1" = -m ] && [ "$2" = venv ]; then
      mkdir -p "$3/bin"
      printf '#!/usr/bin/env bash\\necho "pip $*" >> "$STUB_LOG"\\n[ "$1" = freeze ] && echo torch==2.14.1\\nexit 0\\n' > "$3/bin/pip"
      printf '#!/usr/bin/env bash\\necho "python $*" >> "$STUB_LOG"\\nexit 0\\n' > "$3/bin/python"
      chmod +x "$3/bin/pip" "$3/bin/python"
      exit 0
    fi
    exit 97
    """)


def _run_compat_new(work: Path, log: Path) -> list[str]:
    stub = work / "stub-bin"
    stub.mkdir(exist_ok=True)
    (stub / "python3").write_text(_STUB_PYTHON3)
    (stub / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}{os.pathsep}{os.environ['PATH']}", "STUB_LOG": str(log)}
    env.pop("DUALVIEW_TORCH", None)
    start = len(log.read_text().splitlines()) if log.exists() else 0
    run = subprocess.run(["bash", "run.sh", "test-compat", "new", "-q"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return log.read_text().splitlines()[start:]


def test_the_newest_releases_lane_is_not_capped_at_the_local_torch(tmp_path):
    """`bash run.sh test-compat new` is documented as 'whatever pip resolves today, no constraints: the
    first to see a new release break us', but it installs TORCH_SPEC's default 'torch<=2.14.1
    torchvision<=0.29.1': a new torch release is never seen by the lane meant to see it."""
    work = _copy_scripts(tmp_path, "run.sh", "pyproject.toml")
    calls = _run_compat_new(work, tmp_path / "calls.log")
    torch_install = [c for c in calls if c.startswith("pip install") and " torch" in c]
    assert torch_install and not any("<=" in c for c in torch_install), torch_install


def test_the_newest_releases_lane_resolves_again_on_a_later_run(tmp_path):
    """The stamp of .venv-compat-new hashes pyproject.toml and run.sh only, and pip runs without
    --upgrade: once made, the 'newest releases' venv is never resolved again (a second run, a week
    later, installs nothing and tests last week's releases)."""
    work = _copy_scripts(tmp_path, "run.sh", "pyproject.toml")
    log = tmp_path / "calls.log"
    _run_compat_new(work, log)
    second = _run_compat_new(work, log)
    assert any(c.startswith("pip install") and ("-U" in c.split() or "--upgrade" in c.split()) for c in second), (
        f"the second run of the newest-releases lane resolved nothing: {second}"
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))


# ---- 5. the lmms-eval loader's patch of llava_hf.model_map ------------------------------------------


def _fake_llava_hf(monkeypatch):
    import types

    names = ["lmms_eval", "lmms_eval.models", "lmms_eval.models.simple", "lmms_eval.models.simple.llava_hf"]
    modules = [types.ModuleType(n) for n in names]
    for parent, child, name in zip(modules, modules[1:], names[1:]):
        setattr(parent, name.rsplit(".", 1)[1], child)
    for name, module in zip(names, modules):
        monkeypatch.setitem(sys.modules, name, module)
    modules[-1].model_map = {"llava": "plain LlavaForConditionalGeneration"}
    return modules[-1]


def test_the_model_map_patch_is_undone_when_two_loads_overlap(monkeypatch):
    """``dual_view_loading`` saves the map it finds and puts that back: two loads that overlap (two
    threads, or two evaluators built in one process) restore in the wrong order and leave llava_hf's
    module-level map patched for good, so every later plain ``--model llava_hf`` goes through
    DualViewLoader (a plain checkpoint is then refused: 'was not saved from a dual-view model')."""
    from dualview.integrations import lmms_eval_models

    llava_hf = _fake_llava_hf(monkeypatch)
    original = dict(llava_hf.model_map)
    first = lmms_eval_models.dual_view_loading("dualview_llava_next")
    second = lmms_eval_models.dual_view_loading("dualview_llava_onevision")
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)  # the first load ends while the second still runs
    second.__exit__(None, None, None)
    assert llava_hf.model_map == original, f"llava_hf.model_map left patched: {llava_hf.model_map}"


# ---- 6. bad input without one clear error ------------------------------------------------------------


def test_a_list_of_images_as_pixel_values_gets_a_clear_error_naming_pixel_values():
    """hf_llava.check_resolution returns early for anything but a tensor, and the encoder then fails
    with "AttributeError: 'list' object has no attribute 'to'": no argument, expected or actual named."""
    model, _ = adapted()
    with pytest.raises((TypeError, ValueError), match="pixel_values"):
        model.model.get_image_features(pixel_values=[torch.randn(3, 84, 84)])
