"""The arithmetic of tiled denoising (:mod:`.tiled`): where the tiles go, how their outputs are weighted, one
denoiser evaluation as a weighted per-pixel average of tile evaluations, and the horizontally circular conv of
panorama decoding.

Conventions: a latent is [N, C, H, W]; a tile is (y0, x0) with a fixed side (th, tw) in latent pixels. Rows never
wrap (a tile's rows are ``y0 .. y0 + th - 1``, inside the latent); columns wrap when the tiling is ``circular``
(column ``(x0 + j) mod W``), so that a panorama's right edge continues into its left edge.

The averaged quantity (MultiDiffusion, Bar-Tal et al. 2023, eq. 5 with per-view weights W_i):

    F(x)[p] = sum_i W_i[p] * f(crop_i(x))[p] / sum_i W_i[p]        over the tiles i that cover pixel p

with W_i = 1 (MultiDiffusion's uniform weights: the per-pixel mean) or a separable Gaussian over the tile
(Mixture of Diffusers, Jimenez 2023: sigma^2 = 0.01 of the tile side squared, centred on the tile).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["WEIGHTS", "Tiling", "multidiffusion_starts", "fstd_starts", "fstd_offset", "tile_weights",
           "tiled_forward", "circular_x_conv"]

#: per-tile weightings: "uniform" (MultiDiffusion: the per-pixel mean) and "gaussian" (Mixture of Diffusers)
WEIGHTS = ("uniform", "gaussian")
#: the variance of the Gaussian weights, in units of the tile side squared (Mixture of Diffusers' var = 0.01)
GAUSSIAN_VAR = 0.01


# ----------------------------------------------------------------------------------------------------------------
# where the tiles go
# ----------------------------------------------------------------------------------------------------------------

def multidiffusion_starts(length: int, tile: int, stride: int, circular: bool = False) -> List[int]:
    """The first index of each tile along one axis of ``length`` pixels (MultiDiffusion's views).

    Not circular: 0, stride, 2 * stride, ... up to ``length - tile``, plus a last tile at ``length - tile`` when the
    stride does not land there (the reference code leaves that strip uncovered). Circular: 0, stride, ... below
    ``length`` (tiles past the end wrap). A tile no smaller than ``length`` is one tile at 0 (the caller clamps the
    tile to the axis). ``stride`` <= ``tile`` covers every pixel."""
    if tile >= length:
        return [0]
    if circular:
        return list(range(0, length, stride))
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] != length - tile:
        starts.append(length - tile)
    return starts


def fstd_starts(length: int, tile: int, offset: int, circular: bool = False) -> List[int]:
    """The first index of each tile along one axis for FSTD's shifted grid (Any-Size-Diffusion, Zheng et al. 2023):
    non-overlapping tiles on a grid shifted by ``offset`` (0 <= offset < tile).

    Circular: ceil(length / tile) tiles starting at ``offset + floor(k * length / n)`` mod length (an exact
    partition when ``tile`` divides ``length``, small overlaps otherwise). Not circular: the grid's cells
    ``k * tile - offset`` clamped into [0, length - tile] as the reference clamps them, so the first and last tiles
    overlap their neighbours; unlike the reference, the grid gets one more cell where the shift would leave a strip at
    the far edge uncovered (the reference fills that strip with the previous step's prediction)."""
    if tile >= length:
        return [0]
    if circular:
        n = math.ceil(length / tile)
        return sorted({(offset + (k * length) // n) % length for k in range(n)})
    n = math.ceil((length + offset) / tile)
    return sorted({min(max(k * tile - offset, 0), length - tile) for k in range(n)})


def fstd_offset(seed: int, step: int, tile: Tuple[int, int]) -> Tuple[int, int]:
    """FSTD's grid shift (rows, columns) for ``step``: uniform in [0, th) x [0, tw), one draw per (seed, step) from a
    generator seeded with both (numpy's SeedSequence: the same on every platform and call, independent of draws
    anywhere else)."""
    rng = np.random.default_rng([int(seed), int(step)])
    return int(rng.integers(0, tile[0])), int(rng.integers(0, tile[1]))


@dataclass(frozen=True)
class Tiling:
    """The tiles of one evaluation: ``size`` (H, W) of the latent, ``tile`` (th, tw) with th <= H and tw <= W,
    the row and column starts, and whether columns wrap."""

    size: Tuple[int, int]
    tile: Tuple[int, int]
    rows: Tuple[int, ...]
    cols: Tuple[int, ...]
    circular: bool = False

    @property
    def tiles(self) -> List[Tuple[int, int]]:
        """(y0, x0) of every tile, row-major."""
        return [(y, x) for y in self.rows for x in self.cols]

    @property
    def single(self) -> bool:
        """One tile covering the whole latent: the evaluation is the plain one."""
        return len(self.rows) == 1 and len(self.cols) == 1 and self.tile == self.size

    def columns(self, x0: int, device=None) -> Union[slice, torch.Tensor]:
        """The latent columns of a tile starting at ``x0``: a slice, or a [tw] int64 index when it wraps."""
        w, tw = self.size[1], self.tile[1]
        if x0 + tw <= w:
            return slice(x0, x0 + tw)
        return (torch.arange(x0, x0 + tw, device=device) % w)

    def weight_sum(self, weights: torch.Tensor) -> torch.Tensor:
        """[H, W] sum over the tiles of ``weights`` ([th, tw]) placed at each tile: the denominator of eq. 5."""
        total = weights.new_zeros(self.size)
        for y0, x0 in self.tiles:
            _add(total, weights, y0, self.tile[0], self.columns(x0, weights.device))
        return total


def _add(target: torch.Tensor, value: torch.Tensor, y0: int, th: int, cols) -> None:
    """target[..., y0:y0+th, cols] += value (cols a slice or a wrapping index without repeats)."""
    band = target[..., y0:y0 + th, :]
    if isinstance(cols, slice):
        band[..., cols] += value
    else:
        band.index_add_(band.dim() - 1, cols, value)


def _crop(x: torch.Tensor, y0: int, th: int, cols) -> torch.Tensor:
    band = x[..., y0:y0 + th, :]
    return band[..., cols] if isinstance(cols, slice) else band.index_select(band.dim() - 1, cols)


def tile_weights(kind: str, tile: Tuple[int, int], dtype=torch.float32, device=None) -> torch.Tensor:
    """[th, tw] per-pixel weight of a tile's output: ones ("uniform"), or the separable Gaussian of Mixture of
    Diffusers, exp(-(i - (t - 1) / 2)^2 / (2 * 0.01 * t^2)) per axis (computed in float64; its smallest value,
    at a corner, is about exp(-25) ~ 1.4e-11, a normal fp32 number)."""
    if kind not in WEIGHTS:
        raise ValueError(f"weights must be one of {', '.join(WEIGHTS)}, got {kind!r}")
    if kind == "uniform":
        return torch.ones(tile, dtype=dtype, device=device)
    axes = []
    for t in tile:
        i = torch.arange(t, dtype=torch.float64)
        axes.append(torch.exp(-(i - (t - 1) / 2) ** 2 / (2 * GAUSSIAN_VAR * t * t)))
    return torch.outer(axes[0], axes[1]).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------------------
# one tiled evaluation
# ----------------------------------------------------------------------------------------------------------------

def _repeat_rows(value: Any, n: int, k: int) -> Any:
    """``value`` for ``k`` tiles stacked tile-major (rows j*n .. (j+1)*n are tile j): every tensor whose first
    dimension is the batch ``n`` is repeated k times (recursively through dicts, lists and tuples); 0-d tensors,
    numbers and None pass unchanged."""
    if torch.is_tensor(value):
        return torch.cat([value] * k) if value.dim() >= 1 and value.shape[0] == n and k > 1 else value
    if isinstance(value, dict):
        return {key: _repeat_rows(v, n, k) for key, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_repeat_rows(v, n, k) for v in value)
    return value


def tiled_forward(forward: Callable[..., torch.Tensor], sample: torch.Tensor, args: Sequence[Any],
                  kwargs: Dict[str, Any], tiling: Tiling, weights: str = "uniform", batch: int = 8,
                  sample_key: str = "") -> torch.Tensor:
    """``forward`` (a denoiser: sample [N, C, H, W] first, then ``args`` / ``kwargs``) evaluated tile by tile on
    ``sample``, ``batch`` tiles per call (the call's batch is batch x N rows, tile-major; every argument with a
    leading batch dimension N is repeated to match), the outputs combined per pixel by eq. 5 (module docstring)
    in float32 (float64 for a float64 output) and returned in the output's dtype, [N, C_out, H, W].

    ``sample_key``: the keyword the sample goes under (empty: the first positional argument)."""
    n = sample.shape[0]
    tiles = tiling.tiles
    th = tiling.tile[0]
    acc = None
    w_tile = None
    out_dtype = None
    for start in range(0, len(tiles), batch):
        chunk = tiles[start:start + batch]
        cols = [tiling.columns(x0, sample.device) for _, x0 in chunk]
        x = torch.cat([_crop(sample, y0, th, c) for (y0, _), c in zip(chunk, cols)])
        a = _repeat_rows(tuple(args), n, len(chunk))
        kw = _repeat_rows(dict(kwargs), n, len(chunk))
        out = forward(*a, **{sample_key: x}, **kw) if sample_key else forward(x, *a, **kw)
        if acc is None:
            out_dtype = out.dtype
            acc_dtype = torch.promote_types(out.dtype, torch.float32)
            acc = torch.zeros((n, out.shape[1]) + tuple(tiling.size), dtype=acc_dtype, device=out.device)
            w_tile = tile_weights(weights, tiling.tile, acc_dtype, out.device)
        for j, ((y0, _), c) in enumerate(zip(chunk, cols)):
            part = out[j * n:(j + 1) * n].to(acc.dtype)
            _add(acc, part if weights == "uniform" else part * w_tile, y0, th, c)
    return (acc / tiling.weight_sum(w_tile)).to(out_dtype)


# ----------------------------------------------------------------------------------------------------------------
# circular decode
# ----------------------------------------------------------------------------------------------------------------

def circular_x_conv(conv: nn.Conv2d) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A forward replacement for ``conv`` (a zero-padded ``nn.Conv2d``, padding (ph, pw)): the input is padded
    circularly by pw columns on each side (the right edge continues into the left), zero-padded by ph rows as
    before, then convolved: the same weights, stride, dilation and groups. For
    :func:`velodiff.accel.cache.unet_hooks.replace_forward`."""
    ph, pw = conv.padding

    def make(plain):
        def forward(x: torch.Tensor) -> torch.Tensor:
            if pw > x.shape[-1]:  # narrower than the padding: circular padding is undefined
                return plain(x)
            x = F.pad(x, (pw, pw, 0, 0), mode="circular")
            return F.conv2d(x, conv.weight, conv.bias, conv.stride, (ph, 0), conv.dilation, conv.groups)
        return forward
    return make
