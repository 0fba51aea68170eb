"""AutoencoderTiny: TAESD (madebyollin/taesd, MIT), the distilled conv-only VAE, with diffusers' names.

The model ships no weights: load a user-supplied diffusers-format ``AutoencoderTiny`` state dict (e.g. the
``diffusion_pytorch_model.safetensors`` of a ``madebyollin/taesd*`` folder) with ``load_state_dict``, or the
original ``taesd_encoder`` / ``taesd_decoder`` state dicts through :func:`convert_original_taesd_state_dict`.

Parameter layout (defaults: 4 stages of 64 channels)::

    encoder.layers: [conv(3->64), Block] + 3 x [conv(64->64, stride 2, no bias), Block x 3] + [conv(64->latent)]
    decoder.layers: [conv(latent->64), ReLU] + 3 x [Block x 3, Upsample x2, conv(64->64, no bias)]
                    + [Block, conv(64->3)]
    Block = conv.{0,2,4} (3x3 convs with the activation between), skip (1x1 no bias, or Identity), fuse (ReLU)

Conventions, as diffusers applies them:

* ``encode`` takes images in [-1, 1] (maps them to TAESD's native [0, 1] first) and returns *raw* latents;
  ``decode`` soft-clamps latents to (-3, 3) with ``3 * tanh(z / 3)`` and returns images in [-1, 1].
* Raw TAESD latents live in the same space as the matching full VAE's raw latents, so pipelines convert with
  :meth:`AutoencoderTiny.vae_to_latents` / :meth:`AutoencoderTiny.latents_to_vae`, ``(z - shift_factor) *
  scaling_factor`` and back (defaults 1.0 and 0.0, i.e. identity, as diffusers' ``AutoencoderTiny``).
* ``scale_latents`` / ``unscale_latents`` map raw latents to [0, 1] (``z / (2 * latent_magnitude) +
  latent_shift``) for 8-bit storage; ``forward`` round-trips through that uint8 quantisation as diffusers does.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, kwargs_from_config
from .vae import _check_image

_ACTIVATIONS = {"relu": nn.ReLU, "silu": nn.SiLU, "swish": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU}
_UPSAMPLE_MODES = ("nearest", "nearest-exact", "bilinear", "bicubic")


def _activation(act_fn: str) -> nn.Module:
    try:
        return _ACTIVATIONS[act_fn]()
    except KeyError:
        raise ValueError(f"act_fn={act_fn!r} is not supported; use one of {sorted(_ACTIVATIONS)}") from None


class TinyBlock(nn.Module):
    """relu(conv(act(conv(act(conv(x))))) + skip(x)); [B, Cin, H, W] -> [B, Cout, H, W]. Parameters
    ``conv.{0,2,4}`` and ``skip`` (1x1, no bias, only when Cin != Cout)."""

    def __init__(self, in_channels: int, out_channels: int, act_fn: str):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, out_channels, 3, padding=1), _activation(act_fn),
                                  nn.Conv2d(out_channels, out_channels, 3, padding=1), _activation(act_fn),
                                  nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False) if in_channels != out_channels \
            else nn.Identity()
        self.fuse = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.conv(x) + self.skip(x))


class Upsample(nn.Module):
    """Parameter-free ``scale``x upsampling with an interpolation ``mode``; [B, C, H, W] -> [B, C, sH, sW]."""

    def __init__(self, scale: int, mode: str):
        super().__init__()
        self.scale, self.mode = scale, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=self.scale, mode=self.mode)


class EncoderTiny(nn.Module):
    """Images [B, Cin, H, W] in [-1, 1] -> raw latents [B, latent, H / 2^(n-1), W / 2^(n-1)] (stride-2 convs
    with padding 1, so odd sizes round up)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: Sequence[int],
                 block_out_channels: Sequence[int], act_fn: str):
        super().__init__()
        layers = []
        for i, (count, ch) in enumerate(zip(num_blocks, block_out_channels)):
            layers.append(nn.Conv2d(in_channels, ch, 3, padding=1) if i == 0 else
                          nn.Conv2d(ch, ch, 3, padding=1, stride=2, bias=False))
            layers.extend(TinyBlock(ch, ch, act_fn) for _ in range(count))
        layers.append(nn.Conv2d(block_out_channels[-1], out_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x.add(1).div(2))


class DecoderTiny(nn.Module):
    """Raw latents [B, latent, h, w] -> images [B, Cout, h * s^(n-1), w * s^(n-1)] in [-1, 1]."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: Sequence[int],
                 block_out_channels: Sequence[int], upsampling_scaling_factor: int, act_fn: str, upsample_fn: str):
        super().__init__()
        layers = [nn.Conv2d(in_channels, block_out_channels[0], 3, padding=1), _activation(act_fn)]
        last = len(num_blocks) - 1
        for i, (count, ch) in enumerate(zip(num_blocks, block_out_channels)):
            layers.extend(TinyBlock(ch, ch, act_fn) for _ in range(count))
            if i < last:
                layers.append(Upsample(upsampling_scaling_factor, upsample_fn))
            layers.append(nn.Conv2d(ch, out_channels if i == last else ch, 3, padding=1, bias=i == last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(torch.tanh(z / 3) * 3).mul(2).sub(1)


class AutoencoderTiny(nn.Module):
    """TAESD with diffusers' ``AutoencoderTiny`` config keys and parameter names.

    ``encode(x [B, in_channels, H, W] in [-1, 1]) -> raw latents [B, latent_channels, H / 8, W / 8]`` (defaults),
    ``decode(z raw) -> [B, out_channels, 8h, 8w]`` in [-1, 1]; dtype follows the parameters. Tiling and slicing
    are not implemented. Every stage must have the same channel count (diffusers builds unequal stages but cannot
    run them).
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 encoder_block_out_channels: Sequence[int] = (64, 64, 64, 64),
                 decoder_block_out_channels: Sequence[int] = (64, 64, 64, 64), act_fn: str = "relu",
                 upsample_fn: str = "nearest", latent_channels: int = 4, upsampling_scaling_factor: int = 2,
                 num_encoder_blocks: Sequence[int] = (1, 3, 3, 3), num_decoder_blocks: Sequence[int] = (3, 3, 3, 1),
                 latent_magnitude: float = 3, latent_shift: float = 0.5, force_upcast: bool = False,
                 scaling_factor: float = 1.0, shift_factor: float = 0.0):
        super().__init__()
        for name, chans, blocks, blocks_name in (
                ("encoder_block_out_channels", encoder_block_out_channels, num_encoder_blocks, "num_encoder_blocks"),
                ("decoder_block_out_channels", decoder_block_out_channels, num_decoder_blocks, "num_decoder_blocks")):
            if len(chans) == 0 or len(chans) != len(blocks):
                raise ValueError(f"{name} ({list(chans)}) and {blocks_name} ({list(blocks)}) must be non-empty and "
                                 f"of the same length")
            if len(set(chans)) != 1:
                raise ValueError(f"{name} must repeat one channel count, got {list(chans)}")
        _activation(act_fn)
        if upsample_fn not in _UPSAMPLE_MODES:
            raise ValueError(f"upsample_fn={upsample_fn!r} is not supported; use one of {list(_UPSAMPLE_MODES)}")
        if scaling_factor is None or not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be a positive number, got {scaling_factor!r}")
        self.config = ModelConfig(
            in_channels=in_channels, out_channels=out_channels,
            encoder_block_out_channels=tuple(encoder_block_out_channels),
            decoder_block_out_channels=tuple(decoder_block_out_channels), act_fn=act_fn, upsample_fn=upsample_fn,
            latent_channels=latent_channels, upsampling_scaling_factor=upsampling_scaling_factor,
            num_encoder_blocks=tuple(num_encoder_blocks), num_decoder_blocks=tuple(num_decoder_blocks),
            latent_magnitude=latent_magnitude, latent_shift=latent_shift, force_upcast=force_upcast,
            scaling_factor=scaling_factor, shift_factor=shift_factor,
            block_out_channels=tuple(decoder_block_out_channels))
        self.encoder = EncoderTiny(in_channels, latent_channels, num_encoder_blocks, encoder_block_out_channels,
                                   act_fn)
        self.decoder = DecoderTiny(latent_channels, out_channels, num_decoder_blocks, decoder_block_out_channels,
                                   upsampling_scaling_factor, act_fn, upsample_fn)

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "AutoencoderTiny":
        """Build from a diffusers ``AutoencoderTiny`` config dict. diffusers also saves ``block_out_channels``
        (a copy of ``decoder_block_out_channels``); it is checked, not used."""
        derived = {"block_out_channels": lambda kw: kw.get("decoder_block_out_channels", (64, 64, 64, 64))}
        return cls(**kwargs_from_config(cls, config, foreign=derived))

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.layers[0].weight.dtype

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Images [B, in_channels, H, W] in [-1, 1] -> raw latents [B, latent_channels, h, w]."""
        _check_image("x", x, self.config.in_channels)
        return self.encoder(x)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, latent_channels, h, w] -> images [B, out_channels, H, W] in [-1, 1]."""
        _check_image("z", z, self.config.latent_channels)
        return self.decoder(z)

    def scale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> [0, 1]: clamp(z / (2 * latent_magnitude) + latent_shift, 0, 1)."""
        return z.div(2 * self.config.latent_magnitude).add(self.config.latent_shift).clamp(0, 1)

    def unscale_latents(self, z: torch.Tensor) -> torch.Tensor:
        """[0, 1] -> raw latents: (z - latent_shift) * 2 * latent_magnitude."""
        return z.sub(self.config.latent_shift).mul(2 * self.config.latent_magnitude)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction through 8-bit latents, as diffusers: decode(unscale(round(255 * scale(encode(x))) / 255))."""
        q = self.scale_latents(self.encode(x)).mul(255).round().byte()
        return self.decode(self.unscale_latents(q / 255.0))

    def vae_to_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents -> the diffusion model's latents: (z - shift_factor) * scaling_factor."""
        _check_image("z", z, self.config.latent_channels)
        return (z - (self.config.shift_factor or 0.0)) * self.config.scaling_factor

    def latents_to_vae(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents -> raw latents: z / scaling_factor + shift_factor."""
        _check_image("z", z, self.config.latent_channels)
        return z / self.config.scaling_factor + (self.config.shift_factor or 0.0)


def convert_original_taesd_state_dict(encoder: Optional[Mapping[str, torch.Tensor]] = None,
                                      decoder: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Original madebyollin/taesd ``taesd_encoder`` / ``taesd_decoder`` state dicts (keys ``"<index>.<rest>"`` of
    their ``nn.Sequential``) -> :class:`AutoencoderTiny` keys.

    The encoder's indices are kept (``encoder.layers.<i>``); the original decoder starts with a parameter-free
    Clamp module that diffusers folds into ``forward``, so decoder index ``i`` becomes ``decoder.layers.<i-1>``.
    Either half may be omitted (load the result with ``strict=False`` then).
    """
    out: Dict[str, torch.Tensor] = {}
    for prefix, sd, offset in (("encoder", encoder, 0), ("decoder", decoder, 1)):
        for key, value in (sd or {}).items():
            head, _, rest = key.partition(".")
            if not head.isdigit() or not rest:
                raise ValueError(f"{prefix}: key {key!r} is not an original TAESD key ('<index>.<parameter>')")
            index = int(head) - offset
            if index < 0:
                raise ValueError(f"{prefix}: key {key!r} has no counterpart (index 0 of the original decoder is a "
                                 f"parameter-free clamp)")
            out[f"{prefix}.layers.{index}.{rest}"] = value
    return out
