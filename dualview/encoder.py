"""DualViewEncoder: DCM -> ONE vision-tower call over every crop -> DEM -> thumbnail fusion."""

from __future__ import annotations

import math
from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from . import grid as G
from .budget import Budget, dual_view_budget
from ._checks import check_size
from ._device import placement
from ._checks import check_choice, check_positive_int, check_tower_batch_size
from .cropping import DCM, DualCrops
from .enhance import DEM
from .gate import GATE_INITS, DualViewGate
from .tiled import TiledImage, encode_tiled
from ._zero3 import call_count, in_lockstep, tie_unused

Tower = Callable[[torch.Tensor], torch.Tensor]
"""Any callable (N, 3, s, s) -> (N, h*w, D) patch tokens (no CLS token)."""
THUMBNAIL_FUSIONS = ("mean", "concat", "none")


class DualViewEncoder(nn.Module):
    """High-resolution image encoder of INF-LLaVA, generalised.

    Every crop of the batch (``2*R*C`` per image plus the thumbnails) goes through ``tower`` in
    as few calls as keep its memory bounded (see ``tower_batch_size``); DEM fuses the local and
    global tokens; the thumbnail's tokens are then mixed in.

    Args:
        tower: callable (N, c, s, s) -> (N, h*w, D). If it has a ``patch_size`` attribute, the
            token grid ``(h, w) = (s // patch_size,) * 2`` is known without running it.
        dcm: the cropping module (its ``crop_size`` is the tower's input size).
        dem: the enhancement module (its ``dim`` is the tower's ``D``).
        thumbnail_fusion: ``"mean"`` (released: ``(thumb + dem) / 2``, needs ``out_size == (h, w)``),
            ``"concat"`` (thumbnail tokens, then DEM tokens) or ``"none"`` (DEM tokens only).
        tower_batch_size: how the crops are split into tower calls. ``None`` (default): automatic,
            the fewest equal chunks of at most :data:`AUTO_CHUNK_TOKENS` tokens each (one call up
            to that size; the tower's activation memory then stays bounded at any batch size, for
            a throughput within 3% of one call, see ``benchmarks/README.md``); one call when the
            tower's token count is unknown (no ``patch_size``). An int: at most that many crops
            per call. ``"all"``: one call, whatever the size.
        patch_size: the tower's patch size, when the tower does not say it (for :meth:`budget`).
        compile: ``True`` or a dict of ``torch.compile`` options (default ``dynamic=False``):
            the tower calls and the DEM run compiled, with static shapes, so each chunk size and
            each (batch, grid) compiles once (recompiles count against dynamo's
            ``recompile_limit``; a fixed int ``tower_batch_size`` keeps the chunk sizes to two).
            DCM and the glue stay eager: they depend on the image size and cost ~1% of the tower.
        init: ``"released"`` (default): the DEM's tokens are used as released (``"mean"``:
            ``(thumb + dem) / 2``). ``"identity"``: a :class:`~dualview.gate.DualViewGate` ``gate``
            (``g = 0``, learnable) blends the "host" tokens with the DEM's, ``host + g * (dem - host)``,
            so that at initialisation the encoder returns what the plain model would: with
            ``thumbnail_fusion="mean"`` the host tokens are the thumbnail's (the output is then the
            plain tower's thumbnail tokens); with the full map (``DEM(out_size=None)``) they are the
            plain local tiles' tokens laid out as the map, row-major over the canvas (with
            ``"concat"`` the thumbnail stays in front). Other settings have no plain counterpart of
            the DEM's shape: a ValueError.
        gate: the :class:`~dualview.gate.DualViewGate` to use under ``init="identity"`` (default: a
            new one with ``g = 0`` on the DEM's device and dtype); adapters pass the one registered
            in their host. Registered as the submodule ``gate``; None under ``"released"``.

    Shapes:
        forward((B, c, H, W)) -> (B, tokens, D);
        forward([(c, H_i, W_i), ...]) -> [(tokens_i, D), ...] (images grouped by grid, each
        group one DEM call, all crops one tower call).
    """

    def __init__(
        self,
        tower: Tower,
        dcm: DCM,
        dem: DEM,
        *,
        thumbnail_fusion: str = "mean",
        tower_batch_size: Union[int, str, None] = None,
        patch_size: Optional[int] = None,
        compile: Union[bool, dict] = False,
        init: str = "released",
        gate: Optional[DualViewGate] = None,
    ) -> None:
        super().__init__()
        if not callable(tower):
            raise TypeError(f"tower must be callable (N, 3, s, s) -> (N, h*w, D), got {type(tower).__name__}")
        if not isinstance(dcm, DCM):
            raise TypeError(f"dcm must be a dualview.DCM, got {type(dcm).__name__}")
        if not isinstance(dem, DEM):
            raise TypeError(f"dem must be a dualview.DEM, got {type(dem).__name__}")
        check_choice(thumbnail_fusion, "thumbnail_fusion", THUMBNAIL_FUSIONS)
        if thumbnail_fusion != "none" and not dcm.thumbnail:
            raise ValueError(f"thumbnail_fusion={thumbnail_fusion!r} needs DCM(thumbnail=True)")
        if thumbnail_fusion == "mean" and dem.out_size is None:
            raise ValueError(
                "thumbnail_fusion='mean' averages the thumbnail's h*w tokens with DEM's: it needs "
                "DEM(out_size=(h, w)), got out_size=None; use 'concat' or 'none' for the full map"
            )
        check_tower_batch_size(tower_batch_size)
        check_positive_int(patch_size, "patch_size", allow_none=True)
        gate = _check_gate(init, gate, dem, thumbnail_fusion)
        if not isinstance(compile, (bool, dict)):
            raise TypeError(f"compile must be a bool or a dict of torch.compile options, got {type(compile).__name__}")
        self.tower = tower
        self.dcm = dcm
        self.dem = dem
        self.thumbnail_fusion = thumbnail_fusion
        self.init = init
        self.gate = gate
        self.tower_batch_size = tower_batch_size
        self.patch_size = patch_size if patch_size is not None else getattr(tower, "patch_size", None)
        self._check_fit()
        self.compile_options = None if compile is False else {"dynamic": False, **({} if compile is True else compile)}
        self._compiled: dict[str, Callable] = {}  # built on first use; never pickled (see __getstate__)

    def _check_fit(self) -> None:
        """Refuse, before any tower runs, a DEM that cannot take what the tower gives: another
        width ``D`` than the tower's (when the tower says it, see :func:`tower_dim`), an
        ``out_size`` that the thumbnail's ``(h, w)`` tokens cannot be averaged with
        (``thumbnail_fusion="mean"``), or ``resample=None`` with an ``out_size`` that is not the
        fused map of every grid the DCM may choose (when the patch size is known)."""
        dim = tower_dim(self.tower)
        if dim is not None and dim != self.dem.dim:
            raise ValueError(
                f"dem must have the tower's width: the tower gives D={dim} channels per token, the DEM has dim={self.dem.dim}"
            )
        patch = self.patch_size
        if patch is None or not isinstance(patch, int) or patch <= 0 or self.dcm.crop_size % patch:
            return  # the token grid is not known before the tower runs
        feat = G.crop_tokens(self.dcm.crop_size, patch)
        out_size = self.dem.out_size
        if self.thumbnail_fusion == "mean" and out_size != feat:
            raise ValueError(
                f"thumbnail_fusion='mean' averages the thumbnail's (h, w)={feat} tokens (crop {self.dcm.crop_size}, "
                f"patch {patch}) with DEM's: it needs DEM(out_size={feat}), got out_size={out_size}; "
                "or use thumbnail_fusion='concat' or 'none'"
            )
        if self.dem.resample is None and out_size is not None:
            maps = sorted({(rows * feat[0], cols * feat[1]) for rows, cols in self.dcm.candidates})
            if maps != [out_size]:
                raise ValueError(
                    f"DEM(resample=None) keeps the fused map, of size {maps[0] if len(maps) == 1 else maps} for the "
                    f"DCM's grid{'' if len(maps) == 1 else 's'}, which differs from out_size={out_size}: "
                    "choose resample='bilinear' or 'avgpool', or out_size=None"
                )

    @classmethod
    def inf_llava(cls, tower: Tower, dem: DEM) -> "DualViewEncoder":
        """The released ``encode_images``: squash to ``3*336`` (bicubic, align_corners=False, no
        antialias, float32), 3x3 local + global crops, a bicubic thumbnail of the input, DEM to
        24x24, ``(thumb + dem) / 2``. ``dem`` is typically ``DEM.from_inf_llava(checkpoint)``."""
        released = dict(out_size=(24, 24), directions="both", fusion="linear_concat", resample="bilinear")
        actual = {key: getattr(dem, key) for key in released}
        if actual != released:
            raise ValueError(f"dem must have the released configuration {released}, got {actual}")
        dcm = DCM(336, (3, 3), fit="squash", thumbnail=True, interpolation="bicubic", antialias=False)
        return cls(tower, dcm, dem, thumbnail_fusion="mean")

    @property
    def feat_size(self) -> Optional[G.Size]:
        """Token grid ``(h, w)`` of one crop, if the tower's patch size is known."""
        if self.patch_size is None:
            return None
        return G.crop_tokens(self.dcm.crop_size, self.patch_size)

    def budget(self, image_size: G.Size) -> Budget:
        """Tower passes and output tokens for one image of ``(H, W)`` pixels; runs nothing."""
        grid = self.dcm.grid_for(check_size(tuple(image_size), "image_size"))
        return dual_view_budget(
            grid,
            self.dcm.crop_size,
            self.feat_size,
            out_size=self.dem.out_size,
            thumbnail=self.dcm.thumbnail,
            thumbnail_fusion=self.thumbnail_fusion,
        )

    def forward(self, images: Union[torch.Tensor, Sequence[torch.Tensor]]) -> Union[torch.Tensor, list[torch.Tensor]]:
        """The paper's steps: DCM cuts each image into ``R*C`` local tiles (and a thumbnail), the engine
        (:func:`dualview.tiled.encode_tiled`) cuts the ``R*C`` global crops from the same canvas, runs
        every crop through the tower in one batch and the DEM once per grid, then fuses the thumbnail.

        (B, c, H, W) -> (B, tokens, D); [(c, H_i, W_i), ...] -> [(tokens_i, D), ...]."""
        crops = self.dcm(images)
        if isinstance(crops, DualCrops):
            return self.encode_crops([crops])[0]
        return [tokens[0] for tokens in self.encode_crops(crops)]

    def encode_crops(self, crops: Sequence[DualCrops]) -> list[torch.Tensor]:
        """Encode DCM outputs: one tower batch for all of them, one DEM call per grid.

        -> one (B_i, tokens, D) tensor per element of ``crops``."""
        tokens = iter(encode_tiled(self, [image for c in crops for image in dcm_images(c)], dem_map=True))
        return [torch.stack([next(tokens) for _ in range(c.local_view.shape[0])]) for c in crops]

    def encode_tiled(self, images: Sequence["TiledImage"]) -> list[torch.Tensor]:
        """Tiles cut by a host -> per image (P_i, h*w, D) features in the host's order, the tiles'
        DEM-fused (:func:`dualview.tiled.encode_tiled`: one tower batch, one DEM call per grid)."""
        return encode_tiled(self, images)

    def run_dem(self, local: torch.Tensor, glob: torch.Tensor, grid: G.Grid, feat_size: G.Size) -> torch.Tensor:
        """(B, R*C, h*w, D) local and global crops' features of B images of one grid -> (B, tokens, D), the
        DEM's output (compiled when ``compile`` asks for it), in the DEM's dtype, on the device it computes
        on (:func:`dualview._device.placement`: its hooks' when accelerate offloaded it)."""
        device, dtype = placement(self.dem), self.dem.ln_fuse.weight.dtype
        return self._step("dem")(local.to(device=device, dtype=dtype), glob.to(device=device, dtype=dtype), grid, feat_size)

    def tower_chunks(self, crops: int) -> list[int]:
        """The crop count of each tower call for ``crops`` crops (see ``tower_batch_size``)."""
        check_tower_batch_size(self.tower_batch_size)
        if self.tower_batch_size == "all" or crops == 0:
            return [crops]
        if self.tower_batch_size is not None:
            size = self.tower_batch_size
            return [size] * (crops // size) + ([crops % size] if crops % size else [])
        tokens = self.tower_tokens
        return [crops] if tokens is None else even_chunks(crops, tokens, AUTO_CHUNK_TOKENS)

    @property
    def tower_tokens(self) -> Optional[int]:
        """Tokens the tower processes per crop (patch tokens + its ``num_prefix_tokens``), if known."""
        if self.feat_size is None:
            return None
        return self.feat_size[0] * self.feat_size[1] + int(getattr(self.tower, "num_prefix_tokens", 0))

    def run_tower(self, pixels: torch.Tensor, masks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(N, c, s, s) -> (N, T, D), in the calls :meth:`tower_chunks` gives. ``masks`` (N, s, s):
        per-crop pixel masks for a tower that takes them, ``tower(pixels, masks)``, chunked alike.

        Under ZeRO-3 over several ranks (the tower's weights partitioned) each tower call gathers them, a
        collective: every rank makes the most calls any rank makes, its missing ones on one crop of zeros
        (masks of ones) tied in at zero weight; no crops (N = 0) is allowed then, all its calls dummies."""
        tower = self._step("tower")
        chunks = self.tower_chunks(pixels.shape[0])
        if pixels.shape[0] == 0 and in_lockstep(self.tower):
            chunks = []
        inputs = (pixels,) if masks is None else (pixels, masks)
        calls = list(zip(*(x.split(chunks) for x in inputs)))  # per chunk its (pixels[, masks])
        # ZeRO-3: the ranks agree on the count (no collective without it); at least one call gives the shape
        missing = max(call_count(self.tower, len(chunks)), 1) - len(chunks)
        dummies = [tower(*_dummy_crop(inputs)) for _ in range(missing)]
        if not chunks:
            feats = dummies[0][:0]
        elif len(chunks) == 1:
            feats = tower(*inputs)
        elif torch.is_grad_enabled():
            feats = torch.cat([tower(*call) for call in calls])
        else:  # write each chunk into the output: no second copy of all features, as cat would make
            feats, start = None, 0
            for call in calls:
                chunk = call[0]
                part = tower(*call)
                if feats is None:
                    _check_tower_output(part, chunk.shape[0])
                    feats = part.new_empty((pixels.shape[0], *part.shape[1:]))
                feats[start:start + chunk.shape[0]] = part
                start += chunk.shape[0]
        _check_tower_output(feats, pixels.shape[0])
        return tie_unused(feats, dummies) if torch.is_grad_enabled() else feats

    def _step(self, name: str) -> Callable:
        """The tower call or the DEM call, compiled when ``compile`` asks for it."""
        step = {"tower": self.tower, "dem": self.dem}[name]
        if self.compile_options is None:
            return step
        if name not in self._compiled:
            self._compiled[name] = torch.compile(step, **self.compile_options)
        return self._compiled[name]

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_compiled"] = {}  # compiled callables do not pickle; they are rebuilt on first use
        return state


AUTO_CHUNK_TOKENS = 65536
"""Tokens per tower call under ``tower_batch_size=None``; the activation memory of a call grows with
it. Measured (``benchmarks/tower_chunks.py``, ``benchmarks/NOTES.md``): on the 2-core development
machine any size above ~1k tokens costs nothing; on an H200 (bf16, ViT-L/14-336, 152 crops = batch 8
at 3x3, 2026-12-04) calls of <= 32768 tokens (3 x 51 crops) ran 3.9% slower than one call and
<= 16384 (6 x 26) 3.1% slower, while <= 65536 (2 x 76) ran at 0.985 of one call with 60% of its
extra memory: the budget is the smallest that costs no time there."""


def tower_dim(tower: object) -> Optional[int]:
    """The width ``D`` of the tower's tokens when it can be known without running the tower, else
    None: an ``out_dim`` attribute (:class:`dualview.testing.PatchTower` has one; any tower may
    say it so), or, for ``dualview.adapters.towers``' ``HFVisionTower`` and ``TimmTower``, the
    model's width (``config.hidden_size``, timm's ``embed_dim``) times the number of layers they
    concatenate."""
    dim = getattr(tower, "out_dim", None)
    if isinstance(dim, int) and not isinstance(dim, bool) and dim > 0:
        return dim
    model = getattr(tower, "model", None)
    layers = getattr(tower, "layers", None)
    if model is None or not (layers is None or (isinstance(layers, list) and layers)):
        return None
    count = 1 if layers is None else len(layers)
    config = getattr(model, "config", None)
    width = getattr(config, "hidden_size", None) if config is not None else getattr(model, "embed_dim", None)
    patch = getattr(config, "patch_size", None) if config is not None else None
    if config is not None and patch != getattr(tower, "patch_size", None):
        return None  # not the vision config the tower reads (a composite model's): unknown
    if isinstance(width, int) and not isinstance(width, bool) and width > 0:
        return width * count
    return None


def even_chunks(crops: int, tokens_per_crop: int, max_tokens: int) -> list[int]:
    """The fewest calls of at most ``max_tokens`` tokens (one crop per call at least) for
    ``crops`` crops, as equal as can be (sizes differ by one at most: no small tail)."""
    if crops == 0:
        return [0]
    calls = min(crops, math.ceil(crops * tokens_per_crop / max_tokens))
    size, bigger = divmod(crops, calls)
    return [size + 1] * bigger + [size] * (calls - bigger)


def _check_gate(init: str, gate: Optional[DualViewGate], dem: DEM, thumbnail_fusion: str) -> Optional[DualViewGate]:
    """The gate ``init`` asks for: None under "released"; under "identity" ``gate`` (checked) or a new one."""
    check_choice(init, "init", GATE_INITS)
    if init == "released":
        if gate is not None:
            raise ValueError("gate is used only with init='identity'; init='released' fuses as released (no gate)")
        return None
    if thumbnail_fusion != "mean" and dem.out_size is not None:
        raise ValueError(
            f"init='identity' needs a plain counterpart of the DEM's tokens: thumbnail_fusion='mean' (the thumbnail) "
            f"or DEM(out_size=None) (the local tiles' map); got thumbnail_fusion={thumbnail_fusion!r} with "
            f"out_size={dem.out_size}"
        )
    if gate is None:
        ref = dem.ln_fuse.weight
        return DualViewGate(dem.dim, init="identity", device=ref.device, dtype=ref.dtype)
    if not isinstance(gate, DualViewGate):
        raise TypeError(f"gate must be a dualview.gate.DualViewGate, got {type(gate).__name__}")
    if gate.dim != dem.dim:
        raise ValueError(f"gate must have dim={dem.dim} (the DEM's), got dim={gate.dim}")
    return gate


def _check_tower_output(feats: object, crops: int) -> None:
    if not isinstance(feats, torch.Tensor) or feats.ndim != 3 or feats.shape[0] != crops:
        got = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"tower must return (N={crops}, h*w, D) patch tokens, got {got}")


def _dummy_crop(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """One crop of zeros (and a mask of ones) shaped as ``inputs``' (pixels[, masks]): a ZeRO-3 dummy call."""
    return tuple(x.new_full((1, *x.shape[1:]), 1 if i else 0) for i, x in enumerate(inputs))


def dcm_images(crops: DualCrops) -> list[TiledImage]:
    """The DCM as a producer for the engine: per image of ``crops`` (B images of one grid) a
    :class:`~dualview.tiled.TiledImage` of its ``R*C`` local tiles (row-major, ``tiles_at=0``), then its
    thumbnail if any. The DCM's global view is not passed: the engine cuts the same strided crops from
    the tiles' canvas (:func:`dualview.tiled.global_crops`, bit for bit the DCM's ``global_view``)."""
    tiles = crops.local_view  # (B, R*C, c, s, s)
    if crops.thumbnail is not None:
        tiles = torch.cat((tiles, crops.thumbnail[:, None]), dim=1)  # (B, R*C + 1, c, s, s)
    return [TiledImage(patches, crops.grid) for patches in tiles]
