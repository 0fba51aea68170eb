"""Exact tiled encode / decode for :class:`velodiff.models.vae.AutoencoderKL`.

The result equals the untiled ``vae.decode(z)`` / ``vae.encode(x)`` up to float reassociation: no seams and no
tone shifts. Three rules make it exact:

1. **Global GroupNorm statistics.** Every GroupNorm of the tiled part is a synchronisation point. The pass that
   writes a GroupNorm's input tile by tile also accumulates, per (batch, group), the count, mean and sum of squared
   deviations of each tile in float64 and merges them with Chan et al.'s parallel update
   (M2 = M2_a + M2_b + delta^2 * n_a * n_b / n), so the next pass normalises every tile with the mean and variance
   of the whole image, as ``nn.GroupNorm`` does.
2. **Halos per layer, zero padding only at the image border.** Between two synchronisation points there is at
   most one 3x3 convolution, so each tile reads its core plus a 1-pixel halo from the stored input of that layer
   (at that layer's resolution; the stride-2 downsampler reads rows 2a .. 2b, the upsampling conv reads the source
   rows under its upsampled halo). GroupNorm and SiLU are applied to the window *before* the zeros are padded, and
   zeros are padded only where the window leaves the image, so every conv sees exactly what the untiled conv sees.
   Tiles are cropped to their cores and stitched without blending.
3. **The mid-block runs on the whole latent.** Its self-attention is global over all latent positions, which no
   tile can compute alone; it runs at 1/f of the image side (f = 8 for SD VAEs), together with the latent-side
   convs (decoder ``conv_in``, ``post_quant_conv``; encoder ``conv_norm_out``, ``conv_out``, ``quant_conv``).
   Only the high-resolution blocks are tiled: the encoder's ``conv_in`` and down blocks, the decoder's up blocks
   and its ``conv_norm_out`` / ``conv_out``.

Memory. Between synchronisation points each layer's full activation is kept in a *store* (the layer input, plus
the first conv's output inside a ResNet block; a ResNet without a channel change writes its output over its input),
so the working set of the convs, the GroupNorm/SiLU temporaries and the upsampled tensors are bounded by the tile
size. With ``store_device="cpu"`` on an accelerator the store lives in host memory and the accelerator holds only
one tile's working set plus the latent-resolution mid-block (the multidiffusion-upscaler "VAE hook" design, with
exact halos instead of a fixed padding).

Shapes: ``tiled_decode(vae, z [B, latent_channels, h, w]) -> [B, out_channels, h*f, w*f]``;
``tiled_encode(vae, x [B, in_channels, H, W]) -> DiagonalGaussian`` over [B, latent_channels, ceil-ish(H/f), ...]
exactly as the untiled encode. Any dtype the VAE runs in (fp32/fp16/bf16: GroupNorm statistics in float64, the
normalisation in fp32, as torch's GroupNorm computes it), any batch, any height/width.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .resnet import Downsample2D, ResnetBlock2D, Upsample2D
from .vae import AutoencoderKL, DiagonalGaussian, _check_image

Device = Union[str, torch.device, None]


# --------------------------------------------------------------------------------------------------------------
# GroupNorm statistics over the whole image, gathered tile by tile
# --------------------------------------------------------------------------------------------------------------

class GroupStats:
    """Running per-(batch, group) count, mean and M2 (sum of squared deviations) in float64.

    ``add(tile [B, C, th, tw])`` merges one tile (Chan, Golub & LeVeque's pairwise update, stable where the
    one-pass sum of squares cancels); ``mean_var()`` returns mean and biased variance [B, G] (float64), the
    statistics ``nn.GroupNorm`` uses."""

    def __init__(self, batch: int, groups: int, device: torch.device):
        self.groups = groups
        self.count = 0
        self.mean = torch.zeros(batch, groups, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(batch, groups, dtype=torch.float64, device=device)

    def add(self, tile: torch.Tensor) -> None:
        b, c = tile.shape[:2]
        values = tile.reshape(b, self.groups, -1).to(torch.float64)
        n = values.shape[-1]
        if n == 0:
            return
        mean = values.mean(dim=-1)
        m2 = (values - mean[..., None]).square().sum(dim=-1)
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total

    def mean_var(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.mean, self.m2 / self.count


def groupnorm_with_stats(norm: nn.GroupNorm, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """``norm(x)`` with the given per-(batch, group) statistics [B, G] instead of x's own:
    y = (x - mean) / sqrt(var + eps) * weight + bias, folded into one fp32 scale and shift per (batch, channel)
    (computed in float64); x [B, C, th, tw] of any float dtype (fp64 stays fp64), the result in x's dtype."""
    b, c = x.shape[:2]
    per_group = c // norm.num_groups
    rstd = torch.rsqrt(var + norm.eps).repeat_interleave(per_group, dim=1)          # [B, C]
    mean_c = mean.repeat_interleave(per_group, dim=1)
    scale, shift = rstd, -mean_c * rstd
    if norm.affine:
        weight = norm.weight.detach().to(torch.float64)
        scale = rstd * weight
        shift = norm.bias.detach().to(torch.float64) - mean_c * scale
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    scale = scale.to(device=x.device, dtype=compute)[:, :, None, None]
    shift = shift.to(device=x.device, dtype=compute)[:, :, None, None]
    return torch.addcmul(shift, x.to(compute), scale).to(x.dtype)


# --------------------------------------------------------------------------------------------------------------
# tile geometry: which input rows (columns) an output range needs, and the zero padding at the image border
# --------------------------------------------------------------------------------------------------------------

def _same_conv_rows(a: int, b: int, n: int) -> Tuple[int, int, int, int]:
    """3x3 conv, stride 1, padding 1: output rows [a, b) of an n-row input read rows [a-1, b+1); returns the
    in-image part [lo, hi) and the zero rows (before, after) the untiled conv's padding puts outside it."""
    lo, hi = max(a - 1, 0), min(b + 1, n)
    return lo, hi, lo - (a - 1), (b + 1) - hi


def _down_conv_rows(a: int, b: int, n: int) -> Tuple[int, int, int, int]:
    """The VAE downsampler (pad 0 before / 1 after, 3x3 conv, stride 2): output rows [a, b) read input rows
    [2a, 2b+1); rows at or beyond n are the zero padding."""
    lo, hi = 2 * a, min(2 * b + 1, n)
    return lo, hi, 0, (2 * b + 1) - hi


def _tiles(h: int, w: int, tile: int) -> Iterator[Tuple[int, int, int, int]]:
    """Row-major non-overlapping tiles (r0, r1, c0, c1) of side ``tile`` covering an h x w grid (the last row /
    column of tiles is cut to fit)."""
    for r0 in range(0, h, tile):
        for c0 in range(0, w, tile):
            yield r0, min(r0 + tile, h), c0, min(c0 + tile, w)


class _Runner:
    """Runs the tiled layers of one VAE call. ``image_side`` (H, W) of the image in pixels, ``tile_size`` in
    image pixels: at a layer of resolution H/s a tile is max(1, tile_size // s) layer pixels on a side, so every
    layer's tiles cover about the same image area. ``device``: where the convs run (the VAE's); ``store``: where
    the full activations between synchronisation points are kept."""

    def __init__(self, image_side: Tuple[int, int], tile_size: int, device: torch.device, store: torch.device):
        self.image_h, self.image_w = image_side
        self.tile_size = tile_size
        self.device = device
        self.store = store

    def tile_side(self, h: int) -> int:
        scale = max(1, round(self.image_h / h))
        return max(1, self.tile_size // scale)

    def _window(self, x: torch.Tensor, rows, cols) -> torch.Tensor:
        (r_lo, r_hi, _, _), (c_lo, c_hi, _, _) = rows, cols
        return x[:, :, r_lo:r_hi, c_lo:c_hi].to(self.device, non_blocking=True)

    @staticmethod
    def _pad(t: torch.Tensor, rows, cols) -> torch.Tensor:
        pads = (cols[2], cols[3], rows[2], rows[3])
        return F.pad(t, pads) if any(pads) else t

    def conv_pass(self, x: torch.Tensor, out_hw: Tuple[int, int], out_channels: int,
                  geometry: Callable[[int, int, int], Tuple[int, int, int, int]],
                  compute: Callable[..., torch.Tensor],
                  stats: Optional[GroupStats], out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """One pass over the output tiles: ``compute(window, tile, rows, cols)`` gets the in-image input window
        of the output ``tile`` (r0, r1, c0, c1), already on ``device``, and the row / column geometry
        (lo, hi, zeros before, zeros after); it applies its pointwise ops, then :meth:`_pad`, and returns the output
        tile, which is written into ``out`` (a new store tensor unless given) and merged into ``stats``."""
        b = x.shape[0]
        h, w = out_hw
        if out is None:
            out = torch.empty(b, out_channels, h, w, dtype=x.dtype, device=self.store)
        for r0, r1, c0, c1 in _tiles(h, w, self.tile_side(h)):
            rows, cols = geometry(r0, r1, x.shape[2]), geometry(c0, c1, x.shape[3])
            y = compute(self._window(x, rows, cols), (r0, r1, c0, c1), rows, cols)
            if stats is not None:
                stats.add(y)
            out[:, :, r0:r1, c0:c1] = y.to(self.store, non_blocking=True)
        return out

    def stats_of(self, x: torch.Tensor, groups: int) -> GroupStats:
        stats = GroupStats(x.shape[0], groups, self.device)
        for r0, r1, c0, c1 in _tiles(x.shape[2], x.shape[3], self.tile_side(x.shape[2])):
            stats.add(x[:, :, r0:r1, c0:c1].to(self.device))
        return stats

    # layers ---------------------------------------------------------------------------------------------------

    def conv(self, conv: nn.Conv2d, x: torch.Tensor, stats_groups: Optional[int]) -> Tuple[torch.Tensor, GroupStats]:
        """A plain 3x3 stride-1 conv (the encoder's ``conv_in``)."""
        def compute(window, tile, rows, cols):
            return F.conv2d(self._pad(window, rows, cols), conv.weight, conv.bias)
        stats = GroupStats(x.shape[0], stats_groups, self.device) if stats_groups else None
        return self.conv_pass(x, x.shape[2:], conv.out_channels, _same_conv_rows, compute, stats), stats

    def norm_silu_conv(self, norm: nn.GroupNorm, x_stats: GroupStats, conv: nn.Conv2d, x: torch.Tensor,
                       stats_groups: Optional[int]) -> Tuple[torch.Tensor, Optional[GroupStats]]:
        """conv(silu(norm(x))) with whole-image statistics (the decoder's ``conv_norm_out`` -> ``conv_out``)."""
        mean, var = x_stats.mean_var()

        def compute(window, tile, rows, cols):
            h = F.silu(groupnorm_with_stats(norm, window, mean, var))
            return F.conv2d(self._pad(h, rows, cols), conv.weight, conv.bias)
        stats = GroupStats(x.shape[0], stats_groups, self.device) if stats_groups else None
        return self.conv_pass(x, x.shape[2:], conv.out_channels, _same_conv_rows, compute, stats), stats

    def resnet(self, block: ResnetBlock2D, x: torch.Tensor, x_stats: GroupStats,
               next_groups: int) -> Tuple[torch.Tensor, GroupStats]:
        """``block(x)`` (no time embedding) in two passes: h = conv1(silu(norm1(x))), then
        out = shortcut(x) + conv2(silu(norm2(h))); returns out and its statistics for ``next_groups`` groups."""
        h, h_stats = self.norm_silu_conv(block.norm1, x_stats, block.conv1, x, block.norm2.num_groups)
        mean, var = h_stats.mean_var()
        shortcut = block.conv_shortcut
        scale = block.output_scale_factor

        def compute(window, tile, rows, cols):
            r0, r1, c0, c1 = tile
            y = F.silu(groupnorm_with_stats(block.norm2, window, mean, var))
            y = F.conv2d(self._pad(y, rows, cols), block.conv2.weight, block.conv2.bias)
            skip = x[:, :, r0:r1, c0:c1].to(self.device)
            out = (shortcut(skip) if shortcut is not None else skip) + y
            return out / scale if scale != 1.0 else out
        stats = GroupStats(x.shape[0], next_groups, self.device)
        # out[tile] only reads x[tile] (the shortcut), so without a channel change out overwrites x in place
        out = x if shortcut is None and x.dtype == h.dtype else None
        out = self.conv_pass(h, h.shape[2:], block.conv2.out_channels, _same_conv_rows, compute, stats, out=out)
        return out, stats

    def downsample(self, down: Downsample2D, x: torch.Tensor, next_groups: int) -> Tuple[torch.Tensor, GroupStats]:
        """The VAE's stride-2 downsampler (pad (0, 1, 0, 1), 3x3 conv, stride 2)."""
        if down.padding != 0:
            raise ValueError("tiled encode supports the VAE downsampler (padding 0 then an asymmetric pad) only")
        conv = down.conv

        def compute(window, tile, rows, cols):
            return F.conv2d(self._pad(window, rows, cols), conv.weight, conv.bias, stride=2)
        h, w = (x.shape[2] + 1 - 3) // 2 + 1, (x.shape[3] + 1 - 3) // 2 + 1
        stats = GroupStats(x.shape[0], next_groups, self.device)
        return self.conv_pass(x, (h, w), conv.out_channels, _down_conv_rows, compute, stats), stats

    def upsample(self, up: Upsample2D, x: torch.Tensor, next_groups: int) -> Tuple[torch.Tensor, GroupStats]:
        """Nearest 2x upsampling then a 3x3 conv: an output tile reads the source rows under its upsampled
        window, repeats them (nearest 2x is an exact copy) and cuts the window out of the repeated rows."""
        conv = up.conv
        n_rows, n_cols = 2 * x.shape[2], 2 * x.shape[3]

        def source(a, b, n_up):  # upsampled rows [lo, hi) needed, and the source rows that hold them
            lo, hi, before, after = _same_conv_rows(a, b, n_up)
            return lo // 2, (hi - 1) // 2 + 1, (lo, hi, before, after)

        def geometry(a, b, n_src):
            s_lo, s_hi, _ = source(a, b, 2 * n_src)
            return s_lo, s_hi, 0, 0

        def compute(window, tile, rows, cols):
            r0, r1, c0, c1 = tile
            s_r, _, up_rows = source(r0, r1, n_rows)
            s_c, _, up_cols = source(c0, c1, n_cols)
            big = window.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
            big = big[:, :, up_rows[0] - 2 * s_r:up_rows[1] - 2 * s_r, up_cols[0] - 2 * s_c:up_cols[1] - 2 * s_c]
            return F.conv2d(self._pad(big, up_rows, up_cols), conv.weight, conv.bias)
        stats = GroupStats(x.shape[0], next_groups, self.device)
        return self.conv_pass(x, (n_rows, n_cols), conv.out_channels, geometry, compute, stats), stats


def _resolve_store(store_device: Device, device: torch.device) -> torch.device:
    return device if store_device is None else torch.device(store_device)


@torch.no_grad()
def tiled_decode(vae: AutoencoderKL, z: torch.Tensor, tile_size: int, store_device: Device = None) -> torch.Tensor:
    """``vae.decode(z)`` computed in tiles of ``tile_size`` image pixels (see the module docstring).

    z: raw latents [B, latent_channels, h, w] in the VAE's dtype and on its device. Returns
    [B, out_channels, h*f, w*f] on z's device. ``store_device``: where the full-resolution activations between
    GroupNorms are kept (None: z's device; "cpu" bounds accelerator memory by the tile)."""
    _check_image("z", z, vae.config.latent_channels)
    dec, groups = vae.decoder, vae.config.norm_num_groups
    f = vae.spatial_compression
    runner = _Runner((z.shape[2] * f, z.shape[3] * f), tile_size, z.device, _resolve_store(store_device, z.device))
    # latent resolution, whole: post_quant_conv, conv_in and the mid-block (global attention)
    if vae.post_quant_conv is not None:
        z = vae.post_quant_conv(z)
    x = dec.mid_block(dec.conv_in(z)).to(runner.store)
    stats = runner.stats_of(x, groups)
    for block in dec.up_blocks:
        for resnet in block.resnets:
            x, stats = runner.resnet(resnet, x, stats, groups)
        if block.upsamplers is not None:
            x, stats = runner.upsample(block.upsamplers[0], x, groups)
    out, _ = runner.norm_silu_conv(dec.conv_norm_out, stats, dec.conv_out, x, None)
    return out.to(z.device)


@torch.no_grad()
def tiled_encode(vae: AutoencoderKL, x: torch.Tensor, tile_size: int,
                 store_device: Device = None) -> DiagonalGaussian:
    """``vae.encode(x)`` computed in tiles of ``tile_size`` image pixels (see the module docstring).

    x: image [B, in_channels, H, W] in [-1, 1], the VAE's dtype and device. Returns the posterior over raw latents
    (as the untiled encode). ``store_device`` as in :func:`tiled_decode`."""
    _check_image("x", x, vae.config.in_channels)
    enc, groups = vae.encoder, vae.config.norm_num_groups
    runner = _Runner((x.shape[2], x.shape[3]), tile_size, x.device, _resolve_store(store_device, x.device))
    h, stats = runner.conv(enc.conv_in, x.to(runner.store), groups)
    for block in enc.down_blocks:
        for resnet in block.resnets:
            h, stats = runner.resnet(resnet, h, stats, groups)
        if block.downsamplers is not None:
            h, stats = runner.downsample(block.downsamplers[0], h, groups)
    # latent resolution, whole: mid-block (global attention), conv_norm_out, conv_out, quant_conv
    h = enc.mid_block(h.to(x.device))
    moments = enc.conv_out(F.silu(enc.conv_norm_out(h)))
    if vae.quant_conv is not None:
        moments = vae.quant_conv(moments)
    return DiagonalGaussian(moments)
