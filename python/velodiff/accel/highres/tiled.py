"""Tiled denoising for images of any size: ``multidiffusion`` and ``fstd``.

Both replace the denoiser's forward (the UNet or the DiT / PixArt transformer) during a pipeline's denoising loop:
the latent [N, C, H, W] is cut into tiles of the model's native latent size, the denoiser runs on the tiles
(``batch`` tiles per call, the CFG halves together as the pipeline batches them, or one branch at a time under
``split_cfg``) and the step's model output is the per-pixel weighted average of the tiles' outputs
(:func:`velodiff.accel.highres.tiling.tiled_forward`). The sampler then takes one update on the whole latent.

- ``multidiffusion`` (Bar-Tal et al., "MultiDiffusion: Fusing Diffusion Paths for Controlled Image Generation",
  ICML 2023, arXiv 2302.08113; reference code omerbt/MultiDiffusion): overlapping tiles every ``stride`` latent
  pixels, the last tile aligned to the edge so that every pixel is covered, uniform weights (eq. 5 with W_i = 1:
  the per-pixel mean).
- ``fstd`` (Zheng et al., "Any-Size-Diffusion", AAAI 2024, arXiv 2308.16582, its fast seamless tiled diffusion;
  reference code ProAirVerse/Any-Size-Diffusion ``p_mean_variance_canvas_accelerate``): non-overlapping tiles
  whose grid is shifted by a random offset every step, so the seams move and are denoised away; the tiles at the
  edges are clamped into the latent (as the reference clamps them) and overlap their neighbours there, blended
  with the reference's Gaussian weights. ~ (H / th) (W / tw) tile evaluations per step instead of
  MultiDiffusion's ~ (H / stride) (W / stride).

Averaging the model output (eps, v or x0) instead of MultiDiffusion's per-view sampler outputs x_{t-1} is the same
thing for every sampler that evaluates the model once per step and whose update is affine in the model output with
coefficients shared by the views, given the shared x_t (DDIM, Euler, DPM-Solver++ multistep, UniPC, ...): per view
x'_i = a x_t + b eps_i, so mean_i x'_i = a x_t + b mean_i eps_i (a multistep history term is an earlier step's
model output, averaged the same way over the same views). Classifier-free guidance is affine too, so averaging
the conditional and the unconditional outputs apart is averaging the guided one. tests/accel/test_tiled_diffusion.py
checks the identity for DDIM, Euler and DPM-Solver++ 2M (first-step) updates. Where it is not the same: samplers
with a second evaluation inside a step (Heun, DPM-Solver single-step) evaluate it at the averaged predictor point,
where per-view updates would evaluate each view at its own; stochastic samplers (the per-view form adds independent
noise per view and averages it, shrinking its variance; here the noise is drawn once for the whole latent, as the
sampler expects); and Lin et al.'s guidance rescale (its std is taken over the whole latent, not per view).

``circular`` (both techniques; for 360-degree panoramas): tile columns wrap around the latent's right edge into its
left edge, and the VAE decoder's zero-padded convs pad circularly along x (rows stay zero-padded) for as long as the
technique is applied, so the decoded image's left and right edges continue each other. A latent no wider than the
tile is one tile (the denoiser's own zero padding then makes the edges), but the decode still wraps.

Sizes: ``tile`` (latent pixels; default the model's native latent size, ``sample_size``) is clamped per axis to the
latent, so a latent no larger than the tile is denoised by the plain forward, bit for bit. Transformers need
tiles in whole patches (``tile`` a multiple of ``patch_size``).

Micro-conditions stay those of the whole image (SDXL's ``time_ids``, PixArt-alpha's resolution). ControlNet
residuals are refused (they would need cropping per UNet level). The caches key features on the step and cannot
follow several tile calls per step: ``optimize`` refuses a cache with a tiled technique, in either order.
``circular`` does not combine with ``tiled_vae``'s decode (its tiled decoder pads with zeros itself).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from velodiff.accel.highres import tiling as T
from velodiff.accel.registry import Technique, register

__all__ = ["MultiDiffusion", "FSTD", "native_latent_size"]

GROUP = "tiled_diffusion"
FITS = "UNet pipelines (Stable Diffusion 1.x / 2.x / SDXL, digits) and DiT / PixArt transformer pipelines"
CONTROLNET_KEYS = ("down_block_additional_residuals", "mid_block_additional_residual")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int_field(tech: str, field: str, value, minimum: int, optional: bool, what: str) -> None:
    if optional and value is None:
        return
    if not _is_int(value) or value < minimum:
        extra = " or None" if optional else ""
        raise ValueError(f"{tech}: {field} must be an integer >= {minimum}{extra} ({what}), got {value!r}")


def denoiser_of(pipe) -> Tuple[Optional[nn.Module], str]:
    """(the pipeline's denoiser module, its attribute name): ``unet`` or ``transformer``; (None, "") for neither."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return module, name
    return None, ""


def native_latent_size(denoiser: nn.Module) -> Tuple[int, int]:
    """(height, width) in latent pixels the denoiser was configured for: its ``config.sample_size`` (an int or a
    [height, width] pair)."""
    size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) and s > 0 for s in size):
        return int(size[0]), int(size[1])
    if _is_int(size) and size > 0:
        return int(size), int(size)
    raise ValueError(f"{type(denoiser).__name__}.config.sample_size must be a positive integer or a [height, width] "
                     f"pair (the native latent size that the tiles take by default), got {size!r}; pass tile=")


@dataclass(frozen=True)
class _Tiled(Technique):
    """The fields and machinery that ``multidiffusion`` and ``fstd`` share (see the module docstring)."""

    group = GROUP

    tile: Optional[int] = None
    batch: int = 8
    circular: bool = False
    weights: str = "uniform"

    # -- fields ----------------------------------------------------------------------------------------------

    def validate(self) -> None:
        _int_field(self.name, "tile", self.tile, 1, True, "the tile side in latent pixels; None: the model's native")
        _int_field(self.name, "batch", self.batch, 1, False, "tiles per denoiser call")
        if not isinstance(self.circular, bool):
            raise ValueError(f"{self.name}: circular must be True or False, got {self.circular!r}")
        if self.weights not in T.WEIGHTS:
            raise ValueError(f"{self.name}: weights must be one of {', '.join(T.WEIGHTS)}, got {self.weights!r}")

    def tile_size(self, denoiser: nn.Module) -> Tuple[int, int]:
        """(th, tw): ``tile`` on both axes, else the denoiser's native latent size."""
        return (self.tile, self.tile) if self.tile is not None else native_latent_size(denoiser)

    def check_tile(self, tile: Tuple[int, int]) -> None:
        """Checks of the fields against the resolved tile (subclasses)."""

    # -- fitting -----------------------------------------------------------------------------------------------

    def check(self, pipe) -> None:
        denoiser, _ = denoiser_of(pipe)
        if denoiser is None or not hasattr(pipe, "denoise_context"):
            raise ValueError(f"{self.name} fits velodiff's {FITS}; {type(pipe).__name__} has no UNet or transformer "
                             "denoiser with a denoising context")
        tile = self.tile_size(denoiser)
        patch = getattr(getattr(denoiser, "config", None), "patch_size", None)
        if _is_int(patch) and patch > 1 and any(t % patch for t in tile):
            raise ValueError(f"{self.name}: tile={tile[0] if tile[0] == tile[1] else tile} must be a multiple of the "
                             f"transformer's patch size {patch} (tiles are whole patches)")
        self.check_tile(tile)
        if self.circular:
            if not _decoder_convs(pipe):
                raise ValueError(f"{self.name}: circular=True pads the VAE decoder's convs circularly; "
                                 f"{type(pipe).__name__} has no vae.decoder with zero-padded Conv2d layers")

    def conflicts_with(self, other) -> Optional[str]:
        """The techniques that cannot follow tiled evaluations: the caches (they key features on the step, and a
        tiled step calls the denoiser once per tile batch); with ``circular``, tiled_vae's decode."""
        if getattr(other, "group", None) == "cache":
            return (f"the cache keys its features on the step, and {self.name} calls the denoiser once per tile batch "
                    "in each step")
        if self.circular and getattr(other, "name", "") == "tiled_vae" and getattr(other, "decode", True):
            return ("tiled_vae's decoder pads the image edges with zeros itself, so the circular panorama would not "
                    "wrap (drop circular, or tiled_vae's decode)")
        return None

    # -- per evaluation --------------------------------------------------------------------------------------

    def tiling_for(self, size: Tuple[int, int], tile: Tuple[int, int], context) -> T.Tiling:  # pragma: no cover
        raise NotImplementedError

    def apply(self, pipe) -> Callable[[], None]:
        from velodiff.accel.cache.unet_hooks import replace_forward
        denoiser, _ = denoiser_of(pipe)
        tile = self.tile_size(denoiser)
        undos = []

        def make(plain):
            def forward(*args, **kwargs):
                context = pipe.denoise_context
                if context is None or context.call_index < 0:
                    return plain(*args, **kwargs)
                if args:
                    key, sample, rest = "", args[0], args[1:]
                else:
                    key = next((k for k in ("sample", "hidden_states", "x") if k in kwargs), "")
                    if not key:
                        return plain(*args, **kwargs)
                    kwargs = dict(kwargs)
                    sample, rest = kwargs.pop(key), ()
                if not torch.is_tensor(sample) or sample.dim() != 4:
                    return plain(*args, **kwargs) if not key else plain(**{key: sample}, **kwargs)
                size = (int(sample.shape[-2]), int(sample.shape[-1]))
                clamped = (min(tile[0], size[0]), min(tile[1], size[1]))
                tiling = self.tiling_for(size, clamped, context)
                if tiling.single:
                    return plain(*args, **kwargs) if not key else plain(**{key: sample}, **kwargs)
                if any(kwargs.get(k) is not None for k in CONTROLNET_KEYS):
                    raise ValueError(f"{self.name} does not tile ControlNet residuals (they would need cropping at "
                                     "every UNet level); drop the ControlNet or the technique")
                return T.tiled_forward(plain, sample, rest, kwargs, tiling, self.weights, self.batch, key)
            return forward

        undos.append(replace_forward(denoiser, make))
        if self.circular:
            undos.extend(replace_forward(conv, T.circular_x_conv(conv)) for conv in _decoder_convs(pipe))

        def undo() -> None:
            for u in reversed(undos):
                u()
        return undo


def _decoder_convs(pipe) -> List[nn.Conv2d]:
    """The zero-padded Conv2d layers with horizontal padding in ``pipe.vae.decoder``."""
    decoder = getattr(getattr(pipe, "vae", None), "decoder", None)
    if not isinstance(decoder, nn.Module):
        return []
    return [m for m in decoder.modules() if isinstance(m, nn.Conv2d) and m.padding_mode == "zeros"
            and isinstance(m.padding, tuple) and m.padding[1] > 0]


@register("multidiffusion")
@dataclass(frozen=True)
class MultiDiffusion(_Tiled):
    """MultiDiffusion: overlapping tiles of ``tile`` latent pixels (default: the model's native latent size; clamped
    to the latent per axis) every ``stride`` pixels (default tile // 8, at least 1), or give ``overlap`` (stride =
    tile - overlap) instead; the last tile of each row and column aligned to the edge. ``batch`` tiles per
    denoiser call. ``weights``: "uniform" (the paper: the per-pixel mean) or "gaussian" (Mixture of Diffusers'
    weighting, e.g. with overlap = tile / 2). ``circular``: the latent and the decode wrap horizontally."""

    stride: Optional[int] = None
    overlap: Optional[int] = None

    def validate(self) -> None:
        super().validate()
        _int_field(self.name, "stride", self.stride, 1, True, "latent pixels between tiles; None: tile // 8")
        _int_field(self.name, "overlap", self.overlap, 0, True, "latent pixels two neighbouring tiles share")
        if self.stride is not None and self.overlap is not None:
            raise ValueError(f"{self.name}: give stride or overlap, not both (stride = tile - overlap); got "
                             f"stride={self.stride}, overlap={self.overlap}")
        if self.tile is not None:
            self.check_tile((self.tile, self.tile))

    def check_tile(self, tile: Tuple[int, int]) -> None:
        side = min(tile)
        if self.stride is not None and self.stride > side:
            raise ValueError(f"{self.name}: stride={self.stride} is larger than tile={side}: the tiles would leave "
                             f"gaps; use stride <= tile")
        if self.overlap is not None and self.overlap >= side:
            raise ValueError(f"{self.name}: tile={side} is smaller than the overlap (overlap={self.overlap}); the "
                             f"tile must be larger than the overlap (stride = tile - overlap >= 1)")

    def strides(self, tile: Tuple[int, int]) -> Tuple[int, int]:
        """The stride per axis for the (unclamped) tile."""
        if self.stride is not None:
            return self.stride, self.stride
        if self.overlap is not None:
            return tile[0] - self.overlap, tile[1] - self.overlap
        return max(tile[0] // 8, 1), max(tile[1] // 8, 1)

    def tiling_for(self, size, tile, context) -> T.Tiling:
        strides = self.strides(tile)
        # a clamped axis has one tile, whatever its stride; an unclamped one keeps the configured tile
        rows = T.multidiffusion_starts(size[0], tile[0], min(strides[0], tile[0]))
        cols = T.multidiffusion_starts(size[1], tile[1], min(strides[1], tile[1]), self.circular)
        return T.Tiling(size, tile, tuple(rows), tuple(cols), self.circular)


@register("fstd")
@dataclass(frozen=True)
class FSTD(_Tiled):
    """Any-Size-Diffusion's fast seamless tiled diffusion: non-overlapping tiles of ``tile`` latent pixels (default:
    the model's native latent size; clamped to the latent per axis) on a grid shifted every step by an offset drawn
    uniformly from [0, tile) per axis, one draw per step from ``seed`` and the plan's step
    (:func:`velodiff.accel.highres.tiling.fstd_offset`): the CFG halves, split CFG's two calls and Heun's two
    evaluations of a step share it, and images reproduce. The edge tiles are clamped into the latent and blended
    with ``weights`` ("gaussian", the reference's, by default); where the shift would leave a strip at the far edge
    uncovered, the grid gets one more (clamped) tile, where the reference reuses the previous step's prediction.
    ``circular``: the grid wraps horizontally (and the decode too)."""

    weights: str = "gaussian"
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        _int_field(self.name, "seed", self.seed, 0, False, "seeds the grid shifts")

    def tiling_for(self, size, tile, context) -> T.Tiling:
        oy, ox = T.fstd_offset(self.seed, context.step, tile)
        rows = T.fstd_starts(size[0], tile[0], oy)
        cols = T.fstd_starts(size[1], tile[1], ox, self.circular)
        return T.Tiling(size, tile, tuple(rows), tuple(cols), self.circular)

