"""The single-point mutants of the core: each one is a small wrong program the tests must reject.

A mutant replaces ``old`` (which must occur exactly once in ``path``) with ``new``. They are
written out by hand, not generated, so that each one is a plausible mistake (an operator swapped,
an off-by-one, the wrong permutation or index, a dropped rounding, a reversed tie-break, a removed
validation) and the run is reproducible. ``equivalent`` holds the reason when the change cannot
alter any observable result; such a mutant is still run, and one that dies is reported.

``tests`` names the test files run against the mutant; the core mutants run the core tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

CORE_TESTS = (
    "tests/test_grid.py",
    "tests/test_budgets.py",
    "tests/test_cropping.py",
    "tests/test_enhance.py",
    "tests/test_encoder.py",
    "tests/test_reliability.py",
    "tests/test_checkpoints.py",
    "tests/test_reference_dem.py",
)
"""Fast first: with ``-x`` most mutants die in the first files."""

FIRST_TESTS = {
    "dualview/grid.py": ("tests/test_grid.py", "tests/test_budgets.py"),
    "dualview/layout.py": ("tests/test_cropping.py", "tests/test_enhance.py"),
    "dualview/cropping.py": ("tests/test_cropping.py",),
    "dualview/enhance.py": ("tests/test_enhance.py", "tests/test_reference_dem.py"),
    "dualview/encoder.py": ("tests/test_encoder.py", "tests/test_budgets.py"),
    "dualview/checkpoints.py": ("tests/test_checkpoints.py", "tests/test_enhance.py", "tests/test_reliability.py"),
}
"""The test files most likely to kill a mutant of each core file run first (the set is the same)."""

HF_LLAVA_NEXT_TESTS = ("tests/test_adapter_hf_llava_next.py",)
LLAVA15_TESTS = ("tests/test_adapter_llava15.py",)


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str
    old: str
    new: str
    what: str
    equivalent: Optional[str] = None
    tests: tuple[str, ...] = CORE_TESTS


def _m(id, path, old, new, what, equivalent=None, tests=CORE_TESTS):  # noqa: A002 - short table rows
    if tests == CORE_TESTS:
        first = FIRST_TESTS.get(path, ())
        tests = first + tuple(t for t in CORE_TESTS if t not in first)
    return Mutant(id, path, old, new, what, equivalent, tests)


GRID = "dualview/grid.py"
LAYOUT = "dualview/layout.py"
CROP = "dualview/cropping.py"
DEM_ = "dualview/enhance.py"
ENC = "dualview/encoder.py"
CKPT = "dualview/checkpoints.py"
NEXT = "adapters/hf_llava_next.py"
L15 = "adapters/llava15.py"

MUTANTS: list[Mutant] = [
    # ---- grid.py: validation -------------------------------------------------------------------
    _m("grid-size-zero", GRID, "and not isinstance(v, bool) and v > 0 for v in value)",
       "and not isinstance(v, bool) and v >= 0 for v in value)", "check_size accepts a 0 side"),
    _m("grid-max-side-excluded", GRID, "1 <= v <= MAX_GRID_SIDE for v in grid", "1 <= v < MAX_GRID_SIDE for v in grid",
       "check_grid rejects the documented maximum side 32"),
    _m("grid-min-side-zero", GRID, "1 <= v <= MAX_GRID_SIDE for v in grid", "0 <= v <= MAX_GRID_SIDE for v in grid",
       "check_grid accepts 0 rows"),
    _m("grid-bool-accepted", GRID,
       "or not all(isinstance(v, int) and not isinstance(v, bool) for v in grid)",
       "or not all(isinstance(v, int) for v in grid)", "check_grid accepts True as a side"),
    _m("parse-grid-case", GRID, 'parts = text.lower().split("x")', 'parts = text.split("x")',
       "parse_grid rejects '2X3'"),
    _m("parse-grid-parts", GRID, "if len(parts) != 2 or not all(p.isdigit() for p in parts):",
       "if not all(p.isdigit() for p in parts[:2]):", "parse_grid reads '2x3x4' as 2x3"),
    _m("positive-int-zero", GRID, "isinstance(value, bool) or value <= 0:", "isinstance(value, bool) or value < 0:",
       "check_positive_int accepts 0"),
    # ---- grid.py: grid choice --------------------------------------------------------------------
    _m("candidates-strict", GRID, "if r * c <= max_tiles]", "if r * c < max_tiles]",
       "candidate_grids leaves out grids of exactly max_tiles tiles"),
    _m("candidates-order", GRID, "key=lambda g: (g[0] * g[1], g[0]))", "key=lambda g: (g[0] * g[1], -g[0]))",
       "candidate_grids orders equal tile counts by rows descending (ties go to tall grids)"),
    _m("candidates-side", GRID, "side = min(max_tiles, MAX_GRID_SIDE)", "side = min(max_tiles, MAX_GRID_SIDE) - 1",
       "candidate_grids misses the 1 x max_tiles strips"),
    _m("select-tie-later", GRID, "(effective == best_effective and waste < best_waste)",
       "(effective == best_effective and waste <= best_waste)",
       "select_grid breaks exact ties towards the later candidate"),
    _m("select-effective-ge", GRID, "if effective > best_effective or", "if effective >= best_effective or",
       "select_grid takes any equally effective later candidate, whatever it wastes"),
    _m("select-scale-max", GRID, "scale = min(canvas_w / width, canvas_h / height)",
       "scale = max(canvas_w / width, canvas_h / height)", "select_grid scales to cover instead of fit"),
    _m("select-no-floor", GRID, "effective = min(int(width * scale) * int(height * scale), width * height)",
       "effective = min(int(width * scale * height * scale), width * height)",
       "select_grid drops the per-side rounding down"),
    _m("select-no-cap", GRID, "effective = min(int(width * scale) * int(height * scale), width * height)",
       "effective = int(width * scale) * int(height * scale)",
       "select_grid counts upscaled pixels as effective"),
    _m("select-waste-plain", GRID, "waste = canvas_h * canvas_w - effective", "waste = canvas_h * canvas_w",
       "select_grid's waste without subtracting the kept pixels",
       equivalent="waste is compared only between candidates of equal `effective`, so subtracting it "
                  "changes no comparison"),
    _m("pinpoints-swap", GRID, "(height // crop_size, width // crop_size)", "(width // crop_size, height // crop_size)",
       "grids_from_pinpoints reads pinpoints as (width, height)"),
    _m("pinpoints-width-unchecked", GRID, "if height % crop_size or width % crop_size:", "if height % crop_size:",
       "grids_from_pinpoints accepts a width that is not a multiple of the crop"),
    # ---- grid.py: boxes ----------------------------------------------------------------------------
    _m("fit-squash-swap", GRID, "return Box(0, 0, canvas_h, canvas_w)", "return Box(0, 0, canvas_w, canvas_h)",
       "squash box with height and width swapped"),
    _m("fit-ceil-dropped", GRID, "new_w, new_h = canvas_w, min(math.ceil(height * scale_w), canvas_h)",
       "new_w, new_h = canvas_w, min(int(height * scale_w), canvas_h)",
       "pad box rounds the short side down instead of up (LLaVA-NeXT ceil)"),
    _m("fit-margin-top", GRID, "return Box((canvas_h - new_h) // 2, (canvas_w - new_w) // 2, new_h, new_w)",
       "return Box((canvas_h - new_h + 1) // 2, (canvas_w - new_w) // 2, new_h, new_w)",
       "pad box puts the odd margin's extra pixel at the top"),
    _m("fit-branch-le", GRID, "if scale_w < scale_h:", "if scale_w <= scale_h:",
       "pad box branch on equal scales",
       equivalent="with equal scales both branches give the whole canvas (each side clamped to it)"),
    _m("fit-scale-swap", GRID, "new_h, new_w = canvas_h, min(math.ceil(width * scale_h), canvas_w)",
       "new_h, new_w = canvas_h, min(math.ceil(width * scale_w), canvas_w)",
       "pad box scales the width with the wrong axis' factor"),
    _m("unpad-no-round", GRID, "new_h = int(round(height * (map_w / width), 7))",
       "new_h = int(height * (map_w / width))", "unpad_box without LLaVA-NeXT's round(., 7) (rows)"),
    _m("unpad-no-round-cols", GRID, "new_w = int(round(width * (map_h / height), 7))",
       "new_w = int(width * (map_h / height))", "unpad_box without LLaVA-NeXT's round(., 7) (columns)"),
    _m("unpad-keep-new-h", GRID, "return Box(pad, 0, map_h - 2 * pad, map_w)", "return Box(pad, 0, new_h, map_w)",
       "unpad_box keeps new_h rows instead of removing the padding on both sides"),
    _m("unpad-wrong-axis", GRID, "new_w = int(round(width * (map_h / height), 7))",
       "new_w = int(round(width * (map_w / height), 7))", "unpad_box scales with the wrong map side"),
    _m("unpad-branch-ge", GRID, "if width / height > map_w / map_h:", "if width / height >= map_w / map_h:",
       "unpad_box branch on equal aspect ratios",
       equivalent="with equal aspect ratios both branches keep the whole map (the rounded side equals the map's)"),
    _m("crop-tokens-unchecked", GRID, "    if crop_size % patch_size:\n", "    if False:\n",
       "crop_tokens accepts a crop that is not a multiple of the patch"),
    # ---- grid.py: budgets (shared by the encoder, the adapters, the CLI) ------------------------------
    _m("budget-thumb-always", GRID, "tower_passes=2 * rows * cols + int(thumbnail),", "tower_passes=2 * rows * cols + 1,",
       "dual_view_budget counts a thumbnail pass that DCM(thumbnail=False) does not run"),
    _m("budget-need-feat", GRID, 'need_feat = out_size is None or thumbnail_fusion == "concat"',
       "need_feat = out_size is None", "dual_view_budget does not ask for feat_size with concat"),
    _m("budget-full-map", GRID, "dem_tokens = rows * cols * feat_size[0] * feat_size[1]",
       "dem_tokens = rows * rows * feat_size[0] * feat_size[1]", "full-map tokens use R*R"),
    _m("budget-thumb-tokens", GRID, 'thumb_tokens = feat_size[0] * feat_size[1] if thumbnail_fusion == "concat" else 0',
       'thumb_tokens = feat_size[0] * feat_size[1] if thumbnail_fusion != "none" and feat_size else 0',
       "dual_view_budget adds thumbnail tokens for 'mean'"),
    _m("budget-canvas-swap", GRID, "canvas_size=(rows * crop_size, cols * crop_size),\n        tower_passes=2",
       "canvas_size=(cols * crop_size, rows * crop_size),\n        tower_passes=2",
       "dual_view_budget's canvas (width, height)"),
    _m("anyres-newline-per-col", GRID, "tokens=h * w + box.height * (box.width + 1),",
       "tokens=h * w + (box.height + 1) * box.width,", "anyres_budget: one newline per column instead of per row"),
    _m("anyres-no-base", GRID, "tower_passes=1 + rows * cols,", "tower_passes=rows * cols,",
       "anyres_budget forgets the base image's pass"),
    _m("anyres-map-axis", GRID, "box = unpad_box(image_size, (rows * h, cols * w))",
       "box = unpad_box(image_size, (rows * h, cols * h))", "anyres_budget's map uses h for both sides"),
    _m("anyres-base-tokens", GRID, "tokens=h * w + box.height", "tokens=h * h + box.height",
       "anyres_budget's base image as h*h tokens"),
    _m("resize-budget-tokens", GRID, "return Budget(\"resize\", (1, 1), (crop_size, crop_size), 1, feat_size[0] * feat_size[1])",
       "return Budget(\"resize\", (1, 1), (crop_size, crop_size), 1, feat_size[0] * feat_size[0])",
       "resize_budget as h*h tokens"),
    _m("s2-passes", GRID, "sum(k * k for k in scales),", "sum(k for k in scales),", "s2_budget counts k passes per scale"),
    # ---- layout.py ---------------------------------------------------------------------------------
    _m("layout-pix-global-rows", LAYOUT, '_PIX_GLOBAL = "b c (s1 R) (s2 C)', '_PIX_GLOBAL = "b c (R s1) (s2 C)',
       "global crops are contiguous along rows"),
    _m("layout-pix-local-order", LAYOUT, '_PIX_LOCAL = "b c (R s1) (C s2) -> b (R C) c s1 s2"',
       '_PIX_LOCAL = "b c (R s1) (C s2) -> b (C R) c s1 s2"', "local crops column-major"),
    _m("layout-pix-global-order", LAYOUT, '_PIX_GLOBAL = "b c (s1 R) (s2 C) -> b (R C) c s1 s2"',
       '_PIX_GLOBAL = "b c (s1 R) (s2 C) -> b (C R) c s1 s2"', "global crops column-major"),
    _m("layout-feat-local-transpose", LAYOUT, '_FEAT_LOCAL = "b (R h) (C w) d -> b (R C) (h w) d"',
       '_FEAT_LOCAL = "b (R h) (C w) d -> b (R C) (w h) d"', "window tokens column-major"),
    _m("layout-feat-global-order", LAYOUT, '_FEAT_GLOBAL = "b (h R) (w C) d -> b (R C) (h w) d"',
       '_FEAT_GLOBAL = "b (h R) (w C) d -> b (C R) (h w) d"', "groups column-major"),
    _m("layout-perms-swapped", LAYOUT, "    return g2w, w2g\n", "    return w2g, g2w\n",
       "token_permutations returns the two permutations swapped"),
    _m("layout-positions-groups", LAYOUT, "    return windows_to_map(ids, rows, cols, h, w)[0, ..., 0]",
       "    return groups_to_map(ids, rows, cols, h, w)[0, ..., 0]",
       "map_positions_in_window_order gives group-order positions"),
    # ---- cropping.py -------------------------------------------------------------------------------
    _m("resize-always", CROP, "    if tuple(images.shape[-2:]) == tuple(size):\n        return images\n", "",
       "an image already of the target size is resampled anyway"),
    _m("resize-half-precision", CROP, "images.to(torch.promote_types(images.dtype, torch.float32)),",
       "images,", "resizing computed in the input's half precision"),
    _m("resize-align-corners", CROP, "align_corners=False if smooth else None,", "align_corners=True if smooth else None,",
       "resize with align_corners=True"),
    _m("resize-antialias", CROP, "antialias=antialias if smooth else False,", "antialias=smooth,",
       "resize always antialiases"),
    _m("dcm-pinpoints-fixed-grid", CROP, "            if pinpoints is not None:\n                raise",
       "            if False:\n                raise", "pinpoints silently ignored with a fixed grid"),
    _m("dcm-grid-for-wh", CROP, "return G.select_grid(G.check_size(tuple(image_size), \"image_size\"), self.crop_size, self.candidates)",
       "return G.select_grid(G.check_size(tuple(image_size), \"image_size\")[::-1], self.crop_size, self.candidates)",
       "grid choice on (W, H)"),
    _m("dcm-canvas-swap", CROP, "canvas_size = (grid[0] * self.crop_size, grid[1] * self.crop_size)",
       "canvas_size = (grid[1] * self.crop_size, grid[0] * self.crop_size)", "canvas (C*s, R*s)"),
    _m("dcm-pad-value", CROP, "canvas = content.new_full((*images.shape[:2], *canvas_size), self.pad_value)",
       "canvas = content.new_zeros((*images.shape[:2], *canvas_size))", "pad_value ignored"),
    _m("dcm-small-min", CROP, "if not self.allow_small and max(image_size) < self.crop_size:",
       "if not self.allow_small and min(image_size) < self.crop_size:",
       "an image with one side long enough is refused"),
    _m("dcm-finite-any", CROP, "if self.check_finite and not bool(torch.isfinite(images).all()):",
       "if self.check_finite and not bool(torch.isfinite(images).any()):", "one NaN pixel passes check_finite"),
    _m("dcm-thumb-from-canvas", CROP, "thumb = resize(images, (self.crop_size, self.crop_size)",
       "thumb = resize(canvas, (self.crop_size, self.crop_size)", "thumbnail from the padded canvas"),
    _m("dcm-image-size-swap", CROP, "image_size = (images.shape[-2], images.shape[-1])",
       "image_size = (images.shape[-1], images.shape[-2])", "image size read as (W, H)"),
    _m("dualcrops-canvas-swap", CROP, "return rows * self.crop_size, cols * self.crop_size",
       "return cols * self.crop_size, rows * self.crop_size", "DualCrops.canvas_size as (width, height)"),
    # ---- enhance.py: DEM ---------------------------------------------------------------------------
    _m("dem-l2g-perm", DEM_, "e_global = self._attend(global_tok.index_select(1, plan.g2w), local_feats)",
       "e_global = self._attend(global_tok.index_select(1, plan.w2g), local_feats)",
       "local_to_global gathers the global queries with the group-order permutation"),
    _m("dem-g2l-perm", DEM_, "e_local = self._attend(local_tok.index_select(1, plan.w2g), global_feats)",
       "e_local = self._attend(local_tok.index_select(1, plan.g2w), global_feats)",
       "global_to_local gathers the local queries with the window-order permutation"),
    _m("dem-g2l-raw-global-order", DEM_, "eg = global_tok.index_select(1, plan.g2w_kept)",
       "eg = global_tok if keep is None else global_tok.index_select(1, keep)",
       "global_to_local fuses the raw global tokens in group order instead of window order"),
    _m("dem-l2g-local-kept", DEM_, "el = local_tok if keep is None else local_tok.index_select(1, keep)",
       "el = local_tok if keep is None else local_tok.index_select(1, plan.g2w_kept)",
       "local_to_global samples the raw local map at group-order positions"),
    _m("dem-both-q-perms", DEM_, "q_rows = torch.cat(((first + batch * n) + g2w, first + w2g)).flatten()",
       "q_rows = torch.cat(((first + batch * n) + w2g, first + g2w)).flatten()",
       "both: the two query permutations swapped"),
    _m("dem-both-q-source", DEM_, "q_rows = torch.cat(((first + batch * n) + g2w, first + w2g)).flatten()",
       "q_rows = torch.cat((first + g2w, first + w2g)).flatten()", "both: global queries read from the local features"),
    _m("dem-both-unbind", DEM_, "e_global, e_local = self.attention(q, kv.flatten(0, 1))",
       "e_local, e_global = self.attention(q, kv.flatten(0, 1))", "both: the two enhanced maps swapped"),
    _m("dem-g2l-el-order", DEM_, "el = e_local.index_select(1, plan.g2w_kept)",
       "el = e_local if keep is None else e_local.index_select(1, keep)",
       "enhanced local tokens used in group order"),
    _m("dem-sample-even-x", DEM_, "(map_h // out_h) % 2 == 0 or (map_w // out_w) % 2 == 0",
       "(map_h // out_h) % 2 == 0", "sampled fusion also for an even factor across columns"),
    _m("dem-sample-stride-axis", DEM_, "[ky // 2::ky, kx // 2::kx]", "[ky // 2::ky, kx // 2::ky]",
       "sampled columns with the row stride"),
    _m("dem-sample-offset", DEM_, "[ky // 2::ky, kx // 2::kx]", "[0::ky, 0::kx]",
       "sampled tokens off the bilinear centres (off by k//2)"),
    _m("dem-sample-conv", DEM_, 'if self.out_size is None or self.resample != "bilinear" or self.fusion == "conv3x3":',
       'if self.out_size is None or self.resample != "bilinear":', "sampled fusion tried for conv3x3"),
    _m("dem-sample-divisible", DEM_, "if map_h % out_h or map_w % out_w or", "if map_h % out_h or",
       "sampled fusion when the columns are not an integer multiple"),
    _m("dem-resample-align", DEM_, 'mode="bilinear", align_corners=False)', 'mode="bilinear", align_corners=True)',
       "resampling with align_corners=True"),
    _m("dem-resample-maxpool", DEM_, "out = F.adaptive_avg_pool2d(chans_first, self.out_size)",
       "out = F.adaptive_max_pool2d(chans_first, self.out_size)", "avgpool resampling takes the max"),
    _m("dem-resample-none-check", DEM_, "if self.out_size is None or (self.resample is None and self.out_size == map_size):",
       "if self.out_size is None or self.resample is None:", "resample=None ignores a different out_size"),
    _m("dem-concat-order", DEM_, "mixed = torch.cat((self.ffn_crop(el), self.ffn_stride(eg)), dim=-1)",
       "mixed = torch.cat((self.ffn_crop(eg), self.ffn_stride(el)), dim=-1)", "linear_concat: FFNs on the wrong maps"),
    _m("dem-fuse-residual", DEM_, "return self.ln_fuse(mixed + eg + el)", "return self.ln_fuse(mixed + eg)",
       "fusion drops the local residual"),
    _m("dem-conv-input-order", DEM_, 'pair = rearrange(torch.cat((el, eg), dim=-1), "b y x d -> b d y x")',
       'pair = rearrange(torch.cat((eg, el), dim=-1), "b y x d -> b d y x")', "conv3x3 input channels (EG, EL)"),
    _m("dem-add-sub", DEM_, "return self.ln_fuse(el + eg)", "return self.ln_fuse(el - eg)", "add fusion subtracts"),
    _m("dem-conv-layout", DEM_, 'fused = self._fuse(to_map(el), to_map(eg))',
       'fused = self._fuse(to_map(el), to_map(eg).transpose(1, 2).reshape(to_map(eg).shape))',
       "conv3x3 sees the global map scrambled"),
    _m("attn-scale", DEM_, "scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1])",
       "scores = query @ key.transpose(-2, -1) / math.sqrt(query.shape[-1] * self.num_heads)",
       "explicit attention scaled by sqrt(D) instead of sqrt(D/H)"),
    _m("attn-residual", DEM_, 'return self.ln(w_o(rearrange(out, "n h t d -> n t (h d)")) + q)',
       'return self.ln(w_o(rearrange(out, "n h t d -> n t (h d)")))', "attention block without its residual"),
    _m("attn-kv-order", DEM_, "torch.cat((w_k.weight, w_v.weight))", "torch.cat((w_v.weight, w_k.weight))",
       "K and V weights swapped"),
    _m("dem-ffn-hidden", DEM_, "max(dim // 16, 1)", "max(dim // 8, 1)", "FFN hidden width dim // 8"),
    _m("dem-odd-dim", DEM_, "            if dim % 2:\n                raise", "            if False:\n                raise",
       "linear_concat accepts an odd dim"),
    _m("dem-empty-batch", DEM_, "        if batch == 0:\n            raise", "        if False:\n            raise",
       "an empty batch reaches torch"),
    _m("dem-dtype-and", DEM_, "if x.dtype != param.dtype or x.device != param.device:",
       "if x.dtype != param.dtype and x.device != param.device:", "a dtype mismatch alone passes the check"),
    _m("dem-feat-size-check", DEM_, "        if h * w != tokens:\n", "        if h * w > tokens:\n",
       "feat_size with too few tokens accepted"),
    _m("dem-plan-key", DEM_, "key = (rows, cols, h, w, batch, device, self.directions, out_size, self.resample, self.fusion)",
       "key = (rows, cols, h, w, batch, device, self.directions, self.resample, self.fusion)",
       "plan cache ignores out_size"),
    _m("dem-plan-bound", DEM_, "if len(self._plans) >= _MAX_PLANS:", "if len(self._plans) > _MAX_PLANS:",
       "plan cache holds one plan more than its bound"),
    _m("dem-output-tokens", DEM_, "return grid[0] * grid[1] * feat_size[0] * feat_size[1]",
       "return grid[0] * grid[0] * feat_size[0] * feat_size[1]", "output_tokens with R*R"),
    _m("dem-fused-tokens", DEM_, "        return self.out_size[0] * self.out_size[1]\n\n    def _attend",
       "        return self.out_size[0] * self.out_size[0]\n\n    def _attend", "fused_tokens with out_h*out_h"),
    # ---- encoder.py --------------------------------------------------------------------------------
    _m("enc-preset-pad", ENC, 'dcm = DCM(336, (3, 3), fit="squash"', 'dcm = DCM(336, (3, 3), fit="pad"',
       "the inf_llava preset pads instead of squashing"),
    _m("enc-budget-thumb", ENC, "thumbnail=self.dcm.thumbnail,", "thumbnail=True,",
       "budget() counts a thumbnail pass that DCM(thumbnail=False) does not run"),
    _m("enc-dtype-cast", ENC, "        feats = feats.to(self.dem.ln_fuse.weight.dtype)\n", "",
       "tower output not cast to the DEM's dtype"),
    _m("enc-views-swapped", ENC, "            local.append(next(feats).unflatten(0, batch_crops))\n"
                                 "            glob.append(next(feats).unflatten(0, batch_crops))",
       "            glob.append(next(feats).unflatten(0, batch_crops))\n"
       "            local.append(next(feats).unflatten(0, batch_crops))", "local and global features swapped"),
    _m("enc-thumb-of-first", ENC, "out[i] = self._fuse_thumbnail(tokens, thumb[i])",
       "out[i] = self._fuse_thumbnail(tokens, thumb[idx[0]])", "every image of a grid group gets the first thumbnail"),
    _m("enc-mean-halved", ENC, "return (thumb + dem_tokens) / 2", "return thumb + dem_tokens", "mean fusion not halved"),
    _m("enc-concat-order", ENC, "return torch.cat((thumb, dem_tokens), dim=1)", "return torch.cat((dem_tokens, thumb), dim=1)",
       "concat puts the thumbnail last"),
    _m("enc-needs-thumb", ENC, 'if thumbnail_fusion != "none" and not dcm.thumbnail:',
       'if thumbnail_fusion == "concat" and not dcm.thumbnail:', "mean fusion without a thumbnail accepted"),
    _m("enc-feat-size", ENC, "return G.crop_tokens(self.dcm.crop_size, self.patch_size)",
       "return G.crop_tokens(self.dcm.crop_size, self.patch_size * 2)", "feat_size from twice the patch"),
    # ---- checkpoints.py -------------------------------------------------------------------------------
    _m("ckpt-prefix-cut", CKPT, "prefixes = {k[: k.index(mark) + len(mark)] for k in keys if mark in k}",
       "prefixes = {k[: k.index(mark)] for k in keys if mark in k}", "prefix stripped without the mark"),
    _m("ckpt-strict-unexpected", CKPT, "    if missing or unexpected:\n", "    if missing:\n",
       "a DEM state with an unexpected key passes the strict check"),
    _m("ckpt-shape-numel", CKPT, "if tensor.shape != expected[key].shape:", "if tensor.numel() != expected[key].numel():",
       "a weight of the right size but another shape (transposed) passes"),
    _m("ckpt-shards-off-by-one", CKPT, "present != set(range(1, counts.pop() + 1))",
       "present != set(range(1, counts.pop()))", "a complete set of unindexed shards is called incomplete"),
    _m("ckpt-inside-dotdot", CKPT, ' or ".." in posix.parts)', ")",
       "an index naming '../x.safetensors' reads outside the folder"),
    _m("ckpt-several-prefixes", CKPT, "if len(prefixes) > 1:", "if len(prefixes) > 2:",
       "two different spatial_embed prefixes accepted"),
    _m("ckpt-bare-keys", CKPT, "keep=lambda k: DEM_MARK in k or k.startswith(DEM_TOP_LEVEL)",
       "keep=lambda k: DEM_MARK in k", "files with bare DEM keys read as empty"),
    _m("ckpt-top-level-conv", CKPT, '"ln_fuse.", "fuse_conv.")', '"ln_fuse.")',
       "bare fuse_conv keys (conv3x3 DEMs) not read from files"),
    _m("ckpt-weights-only", CKPT, "weights_only=True, mmap=mmap)", "weights_only=False, mmap=mmap)",
       "torch.load unpickles arbitrary objects"),
    _m("ckpt-mapping-check", CKPT, "        if not isinstance(state, Mapping):\n            raise",
       "        if False:\n            raise", "a .bin holding a list reaches .items()"),
    _m("ckpt-exists", CKPT, "    if not path.exists():\n        raise", "    if False:\n        raise",
       "a missing path gives the reader's own error"),
    _m("ckpt-index-first", CKPT, "        if index.is_file():\n            return [folder / name",
       "        if False:\n            return [folder / name", "a folder's shard index is ignored (the single file wins)"),
    # ---- adapters: their grid and token arithmetic -------------------------------------------------
    _m("next-budget-passes", NEXT, "passes = encoder.budget(size).tower_passes",
       "passes = 1 + encoder.budget(size).tower_passes", "LLaVA-NeXT adapter budget counts the base twice",
       tests=HF_LLAVA_NEXT_TESTS),
    _m("next-budget-grid", NEXT, "plain = G.anyres_budget(size, grid, encoder.dcm.crop_size, encoder.feat_size)",
       "plain = G.anyres_budget(size, grid[::-1], encoder.dcm.crop_size, encoder.feat_size)",
       "LLaVA-NeXT adapter budget on the transposed grid", tests=HF_LLAVA_NEXT_TESTS),
    _m("l15-canvas-side", L15, "side = max(dcm.grid) * dcm.crop_size", "side = min(dcm.grid) * dcm.crop_size",
       "LLaVA-1.5 adapter's canvas side from the shorter grid side", tests=LLAVA15_TESTS),
]
