"""The upstream patches (``dualview/tools/upstream_patches``) and ``dualview upstream``, checked with git on
the commit-pinned snapshots of the forks' files in ``../shared/upstream`` (test data, skipped when
absent): they apply, the patched files compile, the patched code computes what the adapters compute,
and the command applies, merges, refuses and reports as it says."""

from __future__ import annotations

import ast
import contextlib
import importlib
import os
import py_compile
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch import nn

from dualview.tools.cli import main as cli_main
from dualview.tools.upstream import FORKS, UpstreamError, apply_patch, patch_text, touched_files

from . import tiny_models as tiny

REPO = Path(__file__).resolve().parents[1]
SNAPSHOTS = REPO.parent / "shared" / "upstream"
SNAPSHOT_DIRS = {"llava": "LLaVA", "llava-next": "LLaVA-NeXT"}

pytestmark = [
    pytest.mark.skipif(shutil.which("git") is None, reason="needs the `git` program"),
    pytest.mark.filterwarnings("ignore:.*is not. with a literal:SyntaxWarning"),  # the fork's own `is not 0`
    # llava's own forward passes `past_key_values`, which transformers 5 deprecates: not ours to fix
    pytest.mark.filterwarnings("ignore:.*past_key_values.*:FutureWarning"),
]


def require_snapshots() -> None:
    """Skip (the calling test) when the forks' pinned files are absent, as in a plain clone."""
    if not SNAPSHOTS.is_dir():
        pytest.skip(f"needs the forks' pinned files at {SNAPSHOTS} (test data beside the project; a plain clone has none)")


def git(folder: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        ["git", "-c", "user.name=test", "-c", "user.email=test@example.com", "-c", "commit.gpgsign=false", *args],
        cwd=folder, input=stdin, text=True, capture_output=True, check=True,
    )
    return result.stdout


def fork_checkout(tmp_path: Path, key: str) -> Path:
    """The snapshot of fork ``key`` as a git repository with one commit, in ``tmp_path``."""
    require_snapshots()
    root = tmp_path / key
    shutil.copytree(SNAPSHOTS / SNAPSHOT_DIRS[key], root)
    git(root, "init", "-q")
    git(root, "add", "-A")
    git(root, "commit", "-q", "-m", "snapshot")
    return root


def commit_edit(root: Path, path: str, old: str, new: str) -> None:
    file = root / path
    text = file.read_text()
    assert text.count(old) == 1, old
    file.write_text(text.replace(old, new))
    git(root, "commit", "-q", "-am", f"local edit of {path}")


def patched_copy(tmp_path: Path, key: str) -> Path:
    root = fork_checkout(tmp_path, key)
    git(root, "apply", "-", stdin=patch_text(key))
    return root


# The patches against the snapshots -----------------------------------------------------------------


@pytest.mark.parametrize("key", sorted(FORKS))
def test_patch_is_made_against_the_pinned_commit_and_git_apply_check_accepts_it(tmp_path, key):
    require_snapshots()
    snapshot = (SNAPSHOTS / SNAPSHOT_DIRS[key] / "SNAPSHOT").read_text().split()
    assert snapshot == [FORKS[key].repository, FORKS[key].commit]
    root = fork_checkout(tmp_path, key)
    git(root, "apply", "--check", "-", stdin=patch_text(key))  # raises on any rejected hunk


@pytest.mark.parametrize("key", sorted(FORKS))
def test_patched_files_compile(tmp_path, key):
    root = patched_copy(tmp_path, key)
    files = touched_files(patch_text(key))
    assert "llava/model/llava_arch.py" in files and "llava/train/train.py" in files
    for path in files:
        py_compile.compile(str(root / path), cfile=str(tmp_path / "pyc" / (path + "c")), doraise=True)


@pytest.mark.parametrize("key", sorted(FORKS))
def test_docs_explain_every_patched_file_and_point_at_the_shipped_patch(key):
    docs = (REPO / "docs" / "upstream.md").read_text()
    assert f"dualview/tools/upstream_patches/{FORKS[key].patch_file}" in docs
    for path in touched_files(patch_text(key)):
        assert f"`{path}`" in docs, f"docs/upstream.md says nothing about {path}"


def function_from(source_file: Path, name: str, namespace: dict | None = None):
    """One top-level function of a patched file, compiled alone (its module imports trl, deepspeed...)."""
    tree = ast.parse(source_file.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = dict(namespace or {})
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(source_file), "exec"), scope)  # noqa: S102
    return scope[name]


def test_llava_next_trainer_saves_the_dem_with_the_adapter_only_in_stage_1(tmp_path):
    """The DEM rides with the projector: stage 1 (projector + DEM) saves mm_projector.bin only, and
    what it saves holds the DEM; stage 2 (+ LLM) saves the whole model."""
    root = patched_copy(tmp_path, "llava-next")
    only_adapter = function_from(root / "llava/train/llava_trainer.py", "should_only_save_mm_adapter")
    args = lambda parts: types.SimpleNamespace(mm_tunable_parts=parts, lora_enable=False)  # noqa: E731
    assert only_adapter(args("mm_mlp_adapter,mm_spatial_embed"))
    assert only_adapter(args("mm_spatial_embed,mm_mlp_adapter"))
    assert only_adapter(args("mm_mlp_adapter"))
    assert not only_adapter(args("mm_mlp_adapter,mm_spatial_embed,mm_language_model"))
    assert not only_adapter(args("mm_vision_tower,mm_mlp_adapter,mm_spatial_embed,mm_language_model"))
    trainer = (root / "llava/train/llava_trainer.py").read_text()
    assert trainer.count('keys_to_match = ["mm_projector", "vision_resampler", "spatial_embed"]') == 2
    assert 'lr_mapper["spatial_embed"]' in trainer
    train = (root / "llava/train/train.py").read_text()
    assert '"vision_resampler" not in name and "spatial_embed" not in name' in train  # LLM tuning leaves the DEM alone
    assert '"vision_resampler", "spatial_embed"]' in train  # not a LoRA target, saved with the adapter


# haotian-liu/LLaVA: the patched llava-torch against dualview.adapters.llava15 -------------------------

PATCHED_LLAVA = """
import sys, warnings, torch
warnings.simplefilter("ignore")
import llava
assert llava.__file__.startswith(sys.argv[1]), llava.__file__
from llava.model.language_model.llava_llama import LlavaConfig, LlavaLlamaForCausalLM
settings = dict(
    vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, mm_vision_tower=sys.argv[2], mm_hidden_size=32,
    mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
    image_aspect_ratio="pad",
)
torch.manual_seed(0)
plain = LlavaLlamaForCausalLM(LlavaConfig(**settings))
assert not hasattr(plain.get_model(), "spatial_embed")  # dual view is opt-in
torch.manual_seed(0)
model = LlavaLlamaForCausalLM(LlavaConfig(**settings, dualview={"grid": [2, 3], "num_heads": 2})).eval()
model.get_model().get_vision_tower().load_model()
with torch.no_grad():
    for p in model.get_model().spatial_embed.parameters():
        p.add_(torch.randn_like(p))
model.save_pretrained(sys.argv[3])
again, info = LlavaLlamaForCausalLM.from_pretrained(sys.argv[3], output_loading_info=True)
assert not info["missing_keys"] and all("vision_tower" in k for k in info["unexpected_keys"]), info
for name, p in model.get_model().spatial_embed.state_dict().items():
    assert torch.equal(again.get_model().spatial_embed.state_dict()[name], p), name
ids = torch.tensor([[1, 5, -200, 7, 8, 9, 10, 6]])
pixels = torch.rand(1, 3, 84, 100)
with torch.no_grad():
    logits = model(input_ids=ids, images=pixels).logits
assert model.generate(ids, images=pixels, max_new_tokens=2).shape == (1, 2)
torch.save({"ids": ids, "pixels": pixels, "logits": logits}, sys.argv[3] + "/io.pt")
"""


def test_llava_patch_on_installed_llava_torch_matches_the_llava15_adapter(tmp_path):
    """The patch applies (git apply) to the installed llava-torch, whose llava_arch.py differs from the
    snapshot by 2 lines outside the hunks; the patched fork, with dual view switched on by
    ``config.dualview`` (a 2x3 grid, a non-square canvas), loads its DEM with plain from_pretrained
    (no missing key) and gives, bit for bit, the logits of ``dualview.adapters.llava15`` on the
    unpatched package and the same saved folder."""
    llava = pytest.importorskip("llava")
    from transformers import CLIPImageProcessor, CLIPVisionModel

    from dualview.adapters import llava15

    fork = tmp_path / "fork"
    shutil.copytree(Path(llava.__file__).parent, fork / "llava", ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["git", "apply", "-"], input=patch_text("llava"), text=True, cwd=fork, check=True)
    tower = tmp_path / "clip28"
    tiny.seeded(0)
    CLIPVisionModel(tiny.clip_config(image_size=28)).save_pretrained(tower)
    CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}).save_pretrained(tower)
    saved = tmp_path / "saved"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fork), str(REPO)]), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-c", PATCHED_LLAVA, str(fork), str(tower), str(saved)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    io = torch.load(saved / "io.pt")
    model = llava15.from_pretrained(saved)
    assert llava15.encoder_of(model).dcm.grid == (2, 3)
    with torch.no_grad():
        assert torch.equal(model(input_ids=io["ids"], images=io["pixels"]).logits, io["logits"])


# LLaVA-VL/LLaVA-NeXT: the patched llava_arch.py, loaded with stand-ins ---------------------------------

S, PATCH = 28, 14  # crop and patch size: 2x2 tokens per crop
VISION_DIM, TEXT_DIM, VOCAB = 16, 32, 16
# symmetric under (h, w) <-> (w, h): the fork reads pinpoints as [w, h], transformers as [h, w]
PINPOINTS = [[S, 2 * S], [2 * S, S], [2 * S, 2 * S], [3 * S, S], [S, 3 * S]]
IMAGE_TOKEN_INDEX = -200


def _package(name: str, folder: Path | None = None) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(folder)] if folder is not None else []
    return module


class _IdentityResampler(nn.Module):
    """Stand-in for the fork's ``build_vision_resampler`` with no resampler type: the identity."""

    config: dict = {}

    def forward(self, features, *args, **kwargs):
        return features


def _mlp2x_gelu(config, delay_load=False, **kwargs):
    """Stand-in for the fork's ``build_vision_projector``, for ``mm_projector_type='mlp2x_gelu'``:
    Linear(mm_hidden, hidden) -> GELU -> Linear(hidden, hidden)."""
    if config.mm_projector_type != "mlp2x_gelu":
        raise ValueError(f"the stand-in projector builds mlp2x_gelu only, got {config.mm_projector_type!r}")
    return nn.Sequential(
        nn.Linear(config.mm_hidden_size, config.hidden_size), nn.GELU(), nn.Linear(config.hidden_size, config.hidden_size)
    )


@contextlib.contextmanager
def llava_next_modules(root: Path):
    """Import the patched fork's ``llava.model.llava_arch`` from ``root``; yields the module.

    Stood in (the fork's package cannot be installed here and the snapshot holds only the files a
    dual-view PR touches): the packages ``llava``, ``llava.model``, ``llava.model.multimodal_encoder``
    (their ``__init__`` files import every language model; here empty, pointing at the snapshot's
    folders); ``llava.utils`` (``rank0_print`` / ``rank_print``: silent); the vision resampler
    builder (identity, as the fork's ``mm_resampler_type=None``); the projector builder
    (``mlp2x_gelu``, :func:`_mlp2x_gelu`); the encoder modules ``imagebind``, ``open_clip_encoder``,
    ``hf_vision``, ``mlcd_encoder`` (empty classes; never built here). Real: the patched
    ``llava_arch.py``, ``mm_utils.py``, ``constants.py``, ``multimodal_encoder/builder.py``,
    ``clip_encoder.py`` (the CLIP tower that runs), ``siglip_encoder.py``. The installed llava-torch
    modules are set aside meanwhile and put back after.
    """
    owned = lambda name: name == "llava" or name.startswith("llava.")  # noqa: E731
    saved = {name: module for name, module in sys.modules.items() if owned(name)}
    for name in saved:
        del sys.modules[name]
    stand_ins = {
        "llava": _package("llava", root / "llava"),
        "llava.model": _package("llava.model", root / "llava/model"),
        "llava.model.multimodal_encoder": _package("llava.model.multimodal_encoder", root / "llava/model/multimodal_encoder"),
        "llava.model.multimodal_resampler": _package("llava.model.multimodal_resampler"),
        "llava.model.multimodal_projector": _package("llava.model.multimodal_projector"),
    }
    for name, attrs in {
        "llava.utils": {"rank0_print": lambda *a, **k: None, "rank_print": lambda *a, **k: None},
        "llava.model.multimodal_resampler.builder": {"build_vision_resampler": lambda *a, **k: _IdentityResampler()},
        "llava.model.multimodal_projector.builder": {"build_vision_projector": _mlp2x_gelu},
        "llava.model.multimodal_encoder.imagebind": {"ImageBindWrapper": type("ImageBindWrapper", (), {})},
        "llava.model.multimodal_encoder.open_clip_encoder": {"OpenCLIPVisionTower": type("OpenCLIPVisionTower", (), {})},
        "llava.model.multimodal_encoder.hf_vision": {"HFVisionTower": type("HFVisionTower", (), {})},
        "llava.model.multimodal_encoder.mlcd_encoder": {
            "MLCDVisionTower": type("MLCDVisionTower", (), {}), "MLCDVisionTowerS2": type("MLCDVisionTowerS2", (), {}),
        },
    }.items():
        stand_ins[name] = types.ModuleType(name)
        vars(stand_ins[name]).update(attrs)
    sys.modules.update(stand_ins)
    try:
        yield importlib.import_module("llava.model.llava_arch")
    finally:
        for name in [name for name in sys.modules if owned(name)]:
            del sys.modules[name]
        sys.modules.update(saved)


class _TextModel(nn.Module):
    """Stands in for the fork's language model (``LlamaModel`` / ``Qwen2Model``), the base class of
    ``LlavaMetaModel``: only its config, dtype and ``embed_tokens`` are read on the image path."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32


class _CausalLM(nn.Module):
    def __init__(self, inner_cls, config):
        super().__init__()
        self.config = config
        self.model = inner_cls(config)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")


def fork_model(arch, config):
    """The fork's ``LlavaMetaModel`` and ``LlavaMetaForCausalLM`` over the stand-in language model."""
    inner_cls = type("TinyLlavaNextModel", (arch.LlavaMetaModel, _TextModel), {})
    lm_cls = type("TinyLlavaNextForCausalLM", (arch.LlavaMetaForCausalLM, _CausalLM), {"get_model": lambda self: self.model})
    return lm_cls(inner_cls, config).eval()


def fork_config(tower: Path, **overrides):
    settings = dict(
        mm_vision_tower=str(tower), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        mm_hidden_size=VISION_DIM, hidden_size=TEXT_DIM, vocab_size=VOCAB, mm_projector_type="mlp2x_gelu",
        mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres", image_grid_pinpoints=PINPOINTS,
        mm_newline_position="one_token", mm_spatial_pool_mode="bilinear", mm_spatial_pool_stride=2,
        add_faster_video=False, delay_load=False,
    )
    return types.SimpleNamespace(**{**settings, **overrides})


@pytest.fixture(scope="module")
def hf_next():
    """A tiny transformers LlavaNextForConditionalGeneration with dual view (hf_llava_next adapter),
    every weight random (DEM too)."""
    transformers = pytest.importorskip("transformers")
    from dualview.adapters import hf_llava_next

    vision = transformers.CLIPVisionConfig(
        image_size=S, patch_size=PATCH, hidden_size=VISION_DIM, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2,
    )
    text = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )
    config = transformers.LlavaNextConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS, image_token_id=4,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )
    tiny.seeded(0)
    model = hf_llava_next.apply(transformers.LlavaNextForConditionalGeneration(config).eval(), num_heads=2)
    with torch.no_grad():
        for p in model.model.spatial_embed.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return model


@pytest.fixture(scope="module")
def next_fork(tmp_path_factory, hf_next):
    """(arch module, tower folder, load) for the patched LLaVA-NeXT fork; ``load(config)`` builds a
    fork model holding ``hf_next``'s weights: vision tower (saved and read back by the fork's CLIP
    tower), projector, image_newline, text embeddings and, with dual view, the DEM."""
    from transformers import CLIPImageProcessor

    tmp = tmp_path_factory.mktemp("llava-next")
    root = patched_copy(tmp, "llava-next")
    tower = tmp / "clip"
    hf_next.model.vision_tower.save_pretrained(tower)
    CLIPImageProcessor(size={"shortest_edge": S}, crop_size={"height": S, "width": S}).save_pretrained(tower)
    hf = hf_next.model
    projector = hf.multi_modal_projector

    def load(arch, config):
        model = fork_model(arch, config)
        inner = model.get_model()
        with torch.no_grad():
            inner.mm_projector[0].load_state_dict(projector.linear_1.state_dict())
            inner.mm_projector[2].load_state_dict(projector.linear_2.state_dict())
            if "unpad" in config.mm_patch_merge_type:
                inner.image_newline.copy_(hf.image_newline)
            inner.embed_tokens.weight.copy_(hf.language_model.embed_tokens.weight)
        if getattr(config, "dualview", None) is not None:
            inner.spatial_embed.load_state_dict(hf.spatial_embed.state_dict())
        return model

    with llava_next_modules(root) as arch:
        yield arch, tower, load


def anyres_pixels(arch, tower: Path, sizes):
    """The fork's own AnyRes preprocessing (mm_utils.process_anyres_image) of random images of
    ``(H, W)`` sizes, with transformers' CLIPImageProcessor -> list of (1 + R*C, 3, S, S) and the
    fork's image_sizes, ``(W, H)``."""
    from transformers import CLIPImageProcessor

    mm_utils = sys.modules["llava.mm_utils"]
    clip = CLIPImageProcessor.from_pretrained(tower)
    # transformers 4's attribute shapes, which the fork reads (transformers 5's `size` is no dict)
    processor = types.SimpleNamespace(
        size={"shortest_edge": S}, crop_size={"height": S, "width": S}, preprocess=clip.preprocess
    )
    pil = [tiny.pil_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    return [mm_utils.process_anyres_image(im, processor, PINPOINTS) for im in pil], [im.size for im in pil]


def multimodal_embeds(model, images, image_sizes, modalities, images_per_sample):
    """``prepare_inputs_labels_for_multimodal`` on one sample per group of ``images_per_sample`` images:
    text tokens around each image. -> list of (sequence, TEXT_DIM) embeddings."""
    rows = [[1, 5] + [IMAGE_TOKEN_INDEX, 7] * n + [8] for n in images_per_sample]
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [0] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]).bool()
    with torch.no_grad():
        out = model.prepare_inputs_labels_for_multimodal(
            ids, None, mask, None, None, images, modalities=modalities, image_sizes=image_sizes
        )
    embeds, new_mask = out[4], out[2]
    return [e[m] for e, m in zip(embeds, new_mask)]


# sizes (H, W): grids 1x2, 2x1, 2x2, 3x1, 1x3 and odd aspect ratios
NEXT_SIZES = [(28, 84), (90, 31), (57, 41), (100, 100), (40, 75)]


def test_llava_next_dual_view_path_matches_the_hf_llava_next_adapter(next_fork, hf_next):
    """On the same weights and the fork's own AnyRes pixels, the patched fork's image tokens (base,
    DEM-fused tiles, unpad, one newline per row, in the LLM input) equal those of transformers'
    LlavaNext with ``dualview.adapters.hf_llava_next``, for a batch of 5 images of 5 grids."""
    arch, tower, load = next_fork
    model = load(arch, fork_config(tower, dualview={"num_heads": 2}))
    assert model.get_model().spatial_embed.out_size is None
    pixels, fork_sizes = anyres_pixels(arch, tower, NEXT_SIZES)
    embeds = multimodal_embeds(model, pixels, fork_sizes, ["image"] * len(pixels), [1] * len(pixels))
    text = model.get_model().embed_tokens
    for patches, (width, height), seq in zip(pixels, fork_sizes, embeds):
        with torch.no_grad():
            expected = hf_next.model.get_image_features(patches[None], [[height, width]]).pooler_output[0]
        assert seq.shape[0] == 2 + expected.shape[0] + 2
        torch.testing.assert_close(seq[2:-2], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(seq[:2], text.weight[[1, 5]])


def test_llava_next_dual_view_output_is_not_the_plain_anyres_output(next_fork):
    """The comparison above can fail: without dual view the fork's tile tokens differ (same count)."""
    arch, tower, load = next_fork
    plain, dual = load(arch, fork_config(tower)), load(arch, fork_config(tower, dualview={"num_heads": 2}))
    assert not hasattr(plain.get_model(), "spatial_embed")
    pixels, sizes = anyres_pixels(arch, tower, NEXT_SIZES[:2])
    for a, b in zip(*(multimodal_embeds(m, pixels, sizes, ["image"] * 2, [1, 1]) for m in (plain, dual))):
        assert a.shape == b.shape and not torch.allclose(a, b)


def reference_dual_view_features(model, patches: torch.Tensor, grid) -> torch.Tensor:
    """What the patched encode must give for one AnyRes image, from the definition: canvas by
    concatenating the tiles, global crops by strided slicing, the fork's tower over tiles and global
    crops, the DEM, its map cut back into tile windows, the base image's features unchanged, then
    the projector. -> (1 + R*C, h*w, TEXT_DIM)."""
    rows, cols = grid
    inner = model.get_model()
    tiles = patches[1:]
    strided = tiny.global_crops(tiles, (rows, cols))
    with torch.no_grad():
        tower = inner.get_vision_tower()
        base, local, global_ = tower(patches[:1]), tower(tiles), tower(strided)
        fused = inner.spatial_embed(local[None], global_[None], grid)[0]  # (R*h*C*w,) row-major over the map
        side = tower.num_patches_per_side
        fmap = fused.view(rows * side, cols * side, -1)
        windows = torch.stack(
            [fmap[r * side : (r + 1) * side, c * side : (c + 1) * side].flatten(0, 1) for r in range(rows) for c in range(cols)]
        )
        return inner.mm_projector(torch.cat((base, windows)))


@pytest.mark.parametrize(
    "merge, aspect",
    [("spatial_unpad", "anyres_max_1"), ("spatial_unpad_nobase", "anyres"), ("spatial_maxpool2x2", "anyres"),
     ("spatial", "anyres_max_9"), ("flat", "anyres")],
)
def test_llava_next_merge_steps_run_unchanged_on_the_dual_view_features(next_fork, merge, aspect):
    """Dual view runs before the fork's merge: anyres_max_N interpolation, unpad, maxpool2x2, nobase
    and the newlines act on the dual-view features as they act on plain ones. Checked against the
    unpatched path (dual view off) whose encode_images returns the reference dual-view features."""
    arch, tower, load = next_fork
    dual = load(arch, fork_config(tower, dualview={"num_heads": 2}, mm_patch_merge_type=merge, image_aspect_ratio=aspect))
    plain = load(arch, fork_config(tower, mm_patch_merge_type=merge, image_aspect_ratio=aspect))
    assert plain.dual_view_grids([torch.zeros(5, 3, S, S)], [(41, 57)], []) == [None]  # off: the plain path
    sizes = [(90, 31), (100, 100), (57, 41)]
    pixels, fork_sizes = anyres_pixels(arch, tower, sizes)
    grids = dual.dual_view_grids(pixels, fork_sizes, [])
    assert grids == [(3, 1), (2, 2), (2, 2)]
    reference = torch.cat([reference_dual_view_features(dual, p, g) for p, g in zip(pixels, grids)])
    plain.encode_images = lambda images: reference  # the fork's hook point: one call, every patch
    got = multimodal_embeds(dual, pixels, fork_sizes, ["image"] * 3, [1, 1, 1])
    want = multimodal_embeds(plain, pixels, fork_sizes, ["image"] * 3, [1, 1, 1])
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_llava_next_videos_and_multi_image_samples_bypass_dual_view(next_fork):
    """In one batch with an AnyRes image: a video (its frames pooled by get_2dPool) and a two-image
    sample (each image padded to one patch, as the fork's data pipeline does) get exactly the tokens
    of the fork without dual view; the AnyRes image gets dual view."""
    arch, tower, load = next_fork
    dual = load(arch, fork_config(tower, dualview={"num_heads": 2}))
    plain = load(arch, fork_config(tower))
    anyres, anyres_sizes = anyres_pixels(arch, tower, [(57, 41)])
    frames = torch.randn(4, 3, S, S, generator=torch.Generator().manual_seed(1))
    singles = [torch.randn(1, 3, S, S, generator=torch.Generator().manual_seed(i)) for i in (2, 3)]
    images = [anyres[0], frames, *singles]
    sizes = [anyres_sizes[0], (S, S), (S, S), (S, S)]
    modalities = ["image", "video", "image", "image"]
    assert dual.dual_view_grids(images, sizes, [1]) == [(2, 2), None, None, None]
    got = multimodal_embeds(dual, images, sizes, modalities, [1, 1, 2])
    want = multimodal_embeds(plain, images, sizes, modalities, [1, 1, 2])
    assert got[0].shape == want[0].shape and not torch.allclose(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_llava_next_dem_is_built_from_config_dualview_and_loads_from_mm_projector_bin(next_fork, tmp_path):
    """``--dual_view`` makes config.dualview and the DEM; stage 2 reads the DEM back from stage 1's
    mm_projector.bin (keys ``model.spatial_embed.*``) and refuses a file with a DEM it cannot hold."""
    arch, tower, load = next_fork
    stage1 = load(arch, fork_config(tower, dualview={"num_heads": 2}))
    saved = {f"model.{k}": v for k, v in stage1.get_model().state_dict().items() if k.startswith(("mm_projector", "spatial_embed"))}
    torch.save(saved, tmp_path / "mm_projector.bin")
    model_args = dict(
        vision_tower=str(tower), mm_vision_select_layer=-2, mm_vision_select_feature="patch",
        pretrain_mm_mlp_adapter=str(tmp_path / "mm_projector.bin"), mm_patch_merge_type="spatial_unpad",
        mm_projector_type="mlp2x_gelu", add_faster_video=False,
    )
    config = fork_config(tower)
    stage2 = fork_model(arch, config)
    del stage2.get_model().mm_projector  # stage 2 starts from an LLM: the projector is built anew
    stage2.get_model().initialize_vision_modules(types.SimpleNamespace(**model_args, dual_view='{"num_heads": 2}'))
    assert config.dualview == {"num_heads": 2}
    for name, value in stage1.get_model().spatial_embed.state_dict().items():
        assert torch.equal(stage2.get_model().spatial_embed.state_dict()[name], value), name
    without = fork_model(arch, fork_config(tower))
    with pytest.raises(ValueError, match="spatial_embed.*--dual_view"):
        without.get_model().initialize_vision_modules(types.SimpleNamespace(**model_args, dual_view=None))


# dualview upstream -----------------------------------------------------------------------------------


def changed_files(root: Path) -> list[str]:
    return sorted(git(root, "diff", "--name-only").split())


def run_cli(*argv: str, capsys) -> tuple[int, str, str]:
    code = cli_main(["upstream", *argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("key", sorted(FORKS))
def test_command_applies_the_patch_to_a_clean_checkout(tmp_path, key, capsys):
    root = fork_checkout(tmp_path, key)
    code, out, err = run_cli(key, str(root), capsys=capsys)
    assert code == 0, err
    files = touched_files(patch_text(key))
    assert changed_files(root) == sorted(files)
    assert f"patched {FORKS[key].repository} checkout {root} cleanly" in out
    for path in files:
        assert path in out
    assert "pip install /path/to/dualview" in out and "--dual_view" in out
    assert "pip install dualview " not in out  # no package index serves it
    assert not git(root, "diff", "--cached", "--name-only")  # unstaged: git diff shows it all
    expected = patched_copy(tmp_path / "expected", key)
    for path in files:
        assert (root / path).read_text() == (expected / path).read_text()


def test_check_tells_how_it_would_apply_and_changes_nothing(tmp_path, capsys):
    root = fork_checkout(tmp_path, "llava-next")
    code, out, _ = run_cli("llava-next", str(root), "--check", capsys=capsys)
    assert code == 0
    assert "would patch LLaVA-VL/LLaVA-NeXT" in out and "cleanly" in out and "nothing changed" in out
    assert changed_files(root) == []


def test_an_unrelated_local_edit_is_absorbed_by_a_three_way_merge(tmp_path, capsys):
    """The fork changed a context line of a hunk (plain git apply fails): 3-way merging keeps both."""
    root = fork_checkout(tmp_path, "llava-next")
    commit_edit(root, "llava/model/llava_arch.py", "import random\n", "import random  # kept by the merge\n")
    with pytest.raises(subprocess.CalledProcessError):
        git(root, "apply", "--check", "-", stdin=patch_text("llava-next"))
    code, out, _ = run_cli("llava-next", str(root), "--check", capsys=capsys)
    assert code == 0 and "3-way merge" in out and changed_files(root) == []
    code, out, _ = run_cli("llava-next", str(root), capsys=capsys)
    assert code == 0 and "patched LLaVA-VL/LLaVA-NeXT" in out and "3-way merge" in out
    arch = (root / "llava/model/llava_arch.py").read_text()
    assert "import random  # kept by the merge" in arch and "def encode_images_dual_view" in arch
    assert changed_files(root) == sorted(touched_files(patch_text("llava-next")))


def test_a_conflicting_edit_is_reported_and_nothing_changes(tmp_path, capsys):
    root = fork_checkout(tmp_path, "llava")
    commit_edit(
        root, "llava/model/llava_arch.py",
        "        image_features = self.get_model().get_vision_tower()(images)\n",
        "        image_features = self.get_model().get_vision_tower()(images.float())\n",
    )
    for extra in ([], ["--check"]):
        code, out, err = run_cli("llava", str(root), *extra, capsys=capsys)
        assert code == 1 and not out
        assert err.count("\n") == 1 and "Traceback" not in err
        assert "conflicts with the fork's own changes in llava/model/llava_arch.py" in err
        assert "upstream_patches/llava.patch" in err
        assert changed_files(root) == [] and not git(root, "status", "--porcelain", "--untracked-files=no")


def test_a_dirty_tree_is_refused(tmp_path, capsys):
    root = fork_checkout(tmp_path, "llava")
    with open(root / "llava/train/train.py", "a") as f:
        f.write("# work in progress\n")
    code, out, err = run_cli("llava", str(root), capsys=capsys)
    assert code == 1 and not out and err.count("\n") == 1
    assert "uncommitted changes (llava/train/train.py)" in err
    assert changed_files(root) == ["llava/train/train.py"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda root: None, "not a git checkout"),
        (
            lambda root: (root / "llava/train/llava_trainer.py").unlink(),
            "is not a haotian-liu/LLaVA checkout: llava/train/llava_trainer.py missing",
        ),
        (lambda root: (root / "llava/model/llava_arch.py").write_text("print('hello')\n"), "llava/model/llava_arch.py in"),
    ],
    ids=["no-git", "missing-file", "unknown-file"],
)
def test_a_folder_that_is_not_the_fork_is_refused(tmp_path, capsys, make, message):
    require_snapshots()
    root = tmp_path / "fork"
    shutil.copytree(SNAPSHOTS / "LLaVA", root)
    make(root)
    if message != "not a git checkout":
        git(root, "init", "-q")
        git(root, "add", "-A")
        git(root, "commit", "-q", "-m", "not quite the fork")
    code, out, err = run_cli("llava", str(root), capsys=capsys)
    assert code == 1 and not out and err.count("\n") == 1 and "Traceback" not in err
    assert message in err


def test_the_other_forks_checkout_and_an_already_patched_one_are_refused(tmp_path, capsys):
    root = fork_checkout(tmp_path, "llava")
    code, _, err = run_cli("llava-next", str(root), capsys=capsys)
    assert code == 1 and "is not LLaVA-VL/LLaVA-NeXT's; it looks like haotian-liu/LLaVA: dualview upstream llava" in err
    assert run_cli("llava", str(root), capsys=capsys)[0] == 0
    git(root, "commit", "-q", "-am", "dual view")
    code, _, err = run_cli("llava", str(root), capsys=capsys)
    assert code == 1 and "already has dual view" in err
    code, _, err = run_cli("llava", str(root / "llava"), capsys=capsys)
    assert code == 1 and "must be the root of the fork's checkout" in err


def test_the_installed_command_has_help_and_fails_in_one_line(tmp_path):
    def command(*args):
        return subprocess.run([sys.executable, "-m", "dualview", "upstream", *args], capture_output=True, text=True, cwd=REPO)

    helped = command("--help")
    assert helped.returncode == 0 and "usage: dualview upstream" in helped.stdout and "FORK_DIR" in helped.stdout
    failed = command("llava-next", str(tmp_path))
    assert failed.returncode == 1 and not failed.stdout
    assert failed.stderr.strip() == f"dualview upstream: error: {tmp_path} is not a git checkout: clone the fork with git " \
        "(the patch is applied, and undone, with git)"


def test_apply_patch_raises_upstream_error_for_an_unknown_fork(tmp_path):
    with pytest.raises(UpstreamError, match=r"fork must be one of \['llava', 'llava-next'\], got 'vicuna'"):
        apply_patch("vicuna", tmp_path)


def test_the_patches_are_package_data_that_the_wheel_ships():
    """The command reads the patches next to the module; pyproject.toml must ship them."""
    for fork in FORKS.values():
        assert fork.patch_path.is_file() and fork.patch_path.parent.name == "upstream_patches"
    pyproject = (REPO / "pyproject.toml").read_text()
    assert re.search(r'^"dualview.tools" = \[[^\]]*"upstream_patches/\*\.patch"', pyproject, flags=re.M), (
        "pyproject.toml [tool.setuptools.package-data] must list upstream_patches/*.patch for dualview.tools"
    )


def test_dual_view_options_reach_the_dem_and_bad_ones_fail_clearly(next_fork):
    arch, tower, load = next_fork
    model = fork_model(arch, fork_config(tower, dualview={"num_heads": 4, "fusion": "add", "directions": "local_to_global"}))
    dem = model.get_model().spatial_embed
    assert (dem.num_heads, dem.fusion, dem.directions, dem.resample) == (4, "add", "local_to_global", None)
    with pytest.raises(ValueError, match="fusion"):
        fork_model(arch, fork_config(tower, dualview={"fusion": "concat"}))
