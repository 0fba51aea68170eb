"""``tiled_vae``: the pipeline's VAE encodes and decodes in spatial tiles, with the untiled result.

The computation is :mod:`velodiff.models.vae_tiling`: GroupNorm statistics over the whole image (float64,
merged tile by tile), 1-pixel halos per 3x3 conv read from the neighbours with zero padding only at the image
border, crop and stitch without blending, and the mid-block (global self-attention) on the whole latent. The
images equal the untiled VAE's up to float reassociation (no seams, no tone shifts), unlike diffusers'
``enable_tiling``, whose overlapping tiles normalise with per-tile statistics and are blended.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from velodiff.accel.registry import Technique, register


@register("tiled_vae")
@dataclass(frozen=True)
class TiledVAE(Technique):
    """Encode / decode in tiles of ``tile_size`` image pixels on a side (every layer's tiles cover about that many
    image pixels; tiles at the image's right and bottom edges are cut to fit, so any height and width work).

    ``decode`` / ``encode``: which passes are tiled. ``offload``: keep the full activations between GroupNorms in
    host memory when the VAE runs on an accelerator, so that accelerator memory holds one tile's working set plus
    the latent-resolution mid-block (no effect on the CPU). An image no larger than one tile runs untiled.
    ``tile_size`` must be at least 2 * f pixels (f: the VAE's factor, 8 for SD VAEs): each layer reads a 1-pixel
    halo around its tile, so a tile must be at least 2 pixels at the latent resolution."""

    tile_size: int = 512
    decode: bool = True
    encode: bool = True
    offload: bool = False

    def validate(self) -> None:
        size = self.tile_size
        if isinstance(size, bool) or not isinstance(size, int):
            shown = size if not (isinstance(size, float) and math.isnan(size)) else "nan"
            raise ValueError(f"tile_size must be an integer number of pixels, got {shown!r}")
        if size <= 0:
            raise ValueError(f"tile_size must be positive, got {size}")
        for name in ("decode", "encode", "offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not (self.decode or self.encode):
            raise ValueError("decode and encode are both False: tiled_vae would tile nothing; set one of them")

    def check(self, pipe) -> None:
        from velodiff.models.vae import AutoencoderKL
        vae = getattr(pipe, "vae", None)
        if not isinstance(vae, AutoencoderKL):
            raise ValueError(f"tiled_vae needs a pipeline whose vae is velodiff's AutoencoderKL; "
                             f"{type(pipe).__name__}.vae is {type(vae).__name__}")
        if any(name in vars(vae) for name in ("decode", "encode")):
            raise ValueError("tiled_vae: the pipeline's vae.decode / vae.encode are already replaced (another "
                             "tiled_vae?); velodiff.restore(pipe) first")
        f = vae.spatial_compression
        if self.tile_size < 2 * f:
            raise ValueError(f"tile_size={self.tile_size} is smaller than this VAE needs: each layer reads a 1-pixel "
                             f"halo, so a tile must span at least 2 latent pixels = {2 * f} image pixels (factor {f})")

    def apply(self, pipe) -> Callable[[], None]:
        from velodiff.models.vae import _check_image
        from velodiff.models.vae_tiling import tiled_decode, tiled_encode
        vae = pipe.vae
        f, tile = vae.spatial_compression, self.tile_size
        plain_decode, plain_encode = vae.decode, vae.encode

        def store_for(t: torch.Tensor):
            return "cpu" if self.offload and t.device.type != "cpu" else None

        def decode(z: torch.Tensor) -> torch.Tensor:
            _check_image("z", z, vae.config.latent_channels)
            if z.shape[2] * f <= tile and z.shape[3] * f <= tile:
                return plain_decode(z)
            return tiled_decode(vae, z, tile, store_for(z))

        def encode(x: torch.Tensor):
            _check_image("x", x, vae.config.in_channels)
            if x.shape[2] <= tile and x.shape[3] <= tile:
                return plain_encode(x)
            return tiled_encode(vae, x, tile, store_for(x))

        if self.decode:
            vae.decode = decode
        if self.encode:
            vae.encode = encode

        def undo() -> None:
            for name in ("decode", "encode"):
                vars(vae).pop(name, None)
        return undo
