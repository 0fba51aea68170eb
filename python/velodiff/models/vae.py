"""AutoencoderKL: the KL-regularised VAE of SD 1.x / 2.x / SDXL / DiT / PixArt / SD3 / FLUX, with diffusers' names.

A diffusers ``vae/`` folder loads with ``AutoencoderKL.from_config(config_json)`` and a plain
``load_state_dict``. Parameter layout::

    encoder.conv_in, encoder.down_blocks.N.{resnets.N, downsamplers.0.conv}, encoder.mid_block.{resnets.0,
    attentions.0, resnets.1}, encoder.conv_norm_out, encoder.conv_out, quant_conv (optional),
    post_quant_conv (optional), decoder.conv_in, decoder.mid_block.*, decoder.up_blocks.N.{resnets.N (layers+1),
    upsamplers.0.conv}, decoder.conv_norm_out, decoder.conv_out

Latent convention. The diffusion model never sees raw VAE latents; pipelines call :meth:`AutoencoderKL.
vae_to_latents` after encoding and :meth:`AutoencoderKL.latents_to_vae` before decoding, which apply::

    z_model = (z_vae - shift) * scale          z_vae = z_model / scale + shift

with ``scale = scaling_factor`` and ``shift = shift_factor or 0``; when the config carries per-channel
``latents_mean`` / ``latents_std`` (Playground v2.5-style SDXL VAEs), ``shift = latents_mean`` and
``scale = scaling_factor / latents_std``, as diffusers' SDXL pipelines do. Per-family values::

    family                         scaling_factor      shift_factor  where the value was checked
    SD 1.x / 2.x, DiT, PixArt-α    0.18215             None          diffusers utils/remote_utils.py docstring and
                                                                     loaders/single_file_utils.py
                                                                     (LDM_VAE_DEFAULT_SCALING_FACTOR); DiT/PixArt-α:
                                                                     reference notes §2
    SDXL, PixArt-Σ                 0.13025             None          utils/remote_utils.py docstring (SDXL);
                                                                     PixArt-Σ: reference notes §2 only
    Playground v2.5 (SDXL arch)    0.5 + latents_mean  None          loaders/single_file_utils.py
                                   / latents_std                     (PLAYGROUND_VAE_SCALING_FACTOR, edm_mean/edm_std)
    SD3 (16 ch, no quant convs)    1.5305              0.0609        reference notes §2 only (no SD3 config offline)
    FLUX.1 (16 ch, no quant convs) 0.3611              0.1159        utils/remote_utils.py docstring

The values always come from the checkpoint's config; the table is for reading, not for code.

``force_upcast`` (True for the SD/SDXL VAEs: the SDXL VAE overflows in fp16) is kept in ``config`` for pipelines
to decide whether to run the VAE in fp32; the model itself runs in whatever dtype its parameters have.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .resnet import Downsample2D, ResnetBlock2D, Upsample2D

from .config import ModelConfig, kwargs_from_config

GeneratorArg = Union[None, torch.Generator, Sequence[torch.Generator]]


# --------------------------------------------------------------------------------------------------------------
# config handling shared by velodiff's VAE classes
# --------------------------------------------------------------------------------------------------------------

def randn_like_diffusers(shape: Tuple[int, ...], generator: GeneratorArg, device: torch.device,
                         dtype: torch.dtype) -> torch.Tensor:
    """N(0, I) noise of ``shape`` drawn exactly as diffusers' ``randn_tensor``: on the generator's device when
    it is a CPU generator, then moved to ``device``; a list of generators draws one batch row from each."""
    if generator is not None and not isinstance(generator, torch.Generator):
        generator = list(generator)
        if len(generator) == 1:
            generator = generator[0]
        elif len(generator) != shape[0]:
            raise ValueError(f"generator: got a list of {len(generator)} generators for a batch of {shape[0]}")
    first = generator if isinstance(generator, torch.Generator) or generator is None else generator[0]
    rand_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"generator: cannot draw a {device} tensor from a {first.device} generator")
        rand_device = torch.device("cpu")
    if isinstance(generator, list):
        rows = [torch.randn((1,) + tuple(shape[1:]), generator=g, device=rand_device, dtype=dtype) for g in generator]
        return torch.cat(rows, dim=0).to(device)
    return torch.randn(tuple(shape), generator=generator, device=rand_device, dtype=dtype).to(device)


def _check_image(name: str, x: torch.Tensor, channels: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != channels:
        raise ValueError(f"{name} must have shape [B, {channels}, H, W], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


# --------------------------------------------------------------------------------------------------------------
# posterior
# --------------------------------------------------------------------------------------------------------------

class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)), per latent element.

    ``moments`` [B, 2C, h, w] is split into ``mean`` and ``logvar`` [B, C, h, w] (same dtype and device);
    ``logvar`` is clamped to [-30, 20]. ``std = exp(logvar / 2)``, ``var = exp(logvar)``.
    """

    def __init__(self, moments: torch.Tensor):
        if moments.dim() != 4 or moments.shape[1] % 2:
            raise ValueError(f"moments must have shape [B, 2C, h, w], got {tuple(moments.shape)}")
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def mode(self) -> torch.Tensor:
        """The mean [B, C, h, w]."""
        return self.mean

    def sample(self, generator: GeneratorArg = None, eps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """mean + std * eps, eps drawn like diffusers (same generator -> same sample), or the given ``eps`` (of the
        mean's shape, drawn that way earlier: a stream keeps one); [B, C, h, w]."""
        if eps is None:
            eps = randn_like_diffusers(tuple(self.mean.shape), generator, self.mean.device, self.mean.dtype)
        return self.mean + self.std * eps


# --------------------------------------------------------------------------------------------------------------
# blocks
# --------------------------------------------------------------------------------------------------------------

class MidBlock2D(nn.Module):
    """ResNet, optional single-head spatial self-attention (GroupNorm, residual), ResNet; [B, C, h, w] -> same.
    Parameters ``resnets.{0,1}`` and ``attentions.0`` (when ``add_attention``)."""

    def __init__(self, channels: int, groups: int, add_attention: bool = True, eps: float = 1e-6):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, temb_channels=None, groups=groups, eps=eps)
                                      for _ in range(2)])
        self.attentions = nn.ModuleList(
            [Attention(channels, heads=1, dim_head=channels, bias=True, norm_num_groups=groups, eps=eps,
                       residual_connection=True)] if add_attention else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if len(self.attentions):
            x = self.attentions[0](x)
        return self.resnets[1](x)


class DownEncoderBlock2D(nn.Module):
    """``num_layers`` ResNets then (optionally) a stride-2 conv with the VAE's (0,1,0,1) padding;
    [B, Cin, H, W] -> [B, Cout, ceil((H-1)/2), ...] or [B, Cout, H, W] without the downsampler."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                          eps=1e-6) for i in range(num_layers)])
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpDecoderBlock2D(nn.Module):
    """``num_layers`` ResNets then (optionally) nearest 2x upsampling and a conv; [B, Cin, h, w] -> [B, Cout, 2h, 2w]
    (or [B, Cout, h, w] without the upsampler)."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, groups: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList([
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, temb_channels=None, groups=groups,
                          eps=1e-6) for i in range(num_layers)])
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class Encoder(nn.Module):
    """Image [B, Cin, H, W] -> moments [B, 2 * latent_channels, H / 2^(n-1), W / 2^(n-1)] (n = number of blocks)."""

    def __init__(self, in_channels: int, latent_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: int, groups: int, mid_block_add_attention: bool):
        super().__init__()
        chans = list(block_out_channels)
        self.conv_in = nn.Conv2d(in_channels, chans[0], 3, padding=1)
        self.down_blocks = nn.ModuleList([
            DownEncoderBlock2D(chans[max(i - 1, 0)], c, layers_per_block, groups, add_downsample=i < len(chans) - 1)
            for i, c in enumerate(chans)])
        self.mid_block = MidBlock2D(chans[-1], groups, mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, chans[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chans[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latent [B, latent_channels, h, w] -> image [B, Cout, h * 2^(n-1), w * 2^(n-1)]."""

    def __init__(self, latent_channels: int, out_channels: int, block_out_channels: Sequence[int],
                 layers_per_block: int, groups: int, mid_block_add_attention: bool):
        super().__init__()
        rev = list(reversed(block_out_channels))
        self.conv_in = nn.Conv2d(latent_channels, rev[0], 3, padding=1)
        self.mid_block = MidBlock2D(rev[0], groups, mid_block_add_attention)
        self.up_blocks = nn.ModuleList([
            UpDecoderBlock2D(rev[max(i - 1, 0)], c, layers_per_block + 1, groups, add_upsample=i < len(rev) - 1)
            for i, c in enumerate(rev)])
        self.conv_norm_out = nn.GroupNorm(groups, rev[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(rev[-1], out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


# --------------------------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------------------------

class AutoencoderKL(nn.Module):
    """The SD-family VAE (diffusers' ``AutoencoderKL`` config keys and parameter names).

    ``encode(x [B, in_channels, H, W] in [-1, 1]) -> DiagonalGaussian`` over raw latents
    [B, latent_channels, H / f, W / f] with f = 2^(len(block_out_channels) - 1) (8 for every released VAE);
    ``decode(z raw [B, latent_channels, h, w]) -> [B, out_channels, h * f, w * f]`` roughly in [-1, 1]. Use
    :meth:`vae_to_latents` / :meth:`latents_to_vae` to move between raw latents and the diffusion model's latents.
    All tensors keep the parameters' dtype; nothing is upcast here (see ``config.force_upcast``).

    Supported: ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks, ``act_fn="silu"``, optional quant convs and
    mid-block attention. Tiling and slicing are not implemented.
    """

    def __init__(self, in_channels: int = 3, out_channels: int = 3,
                 down_block_types: Sequence[str] = ("DownEncoderBlock2D",),
                 up_block_types: Sequence[str] = ("UpDecoderBlock2D",),
                 block_out_channels: Sequence[int] = (64,), layers_per_block: int = 1, act_fn: str = "silu",
                 latent_channels: int = 4, norm_num_groups: int = 32, sample_size: Union[int, Sequence[int]] = 32,
                 scaling_factor: float = 0.18215, shift_factor: Optional[float] = None,
                 latents_mean: Optional[Sequence[float]] = None, latents_std: Optional[Sequence[float]] = None,
                 force_upcast: bool = True, use_quant_conv: bool = True, use_post_quant_conv: bool = True,
                 mid_block_add_attention: bool = True):
        super().__init__()
        block_out_channels = tuple(block_out_channels)
        n = len(block_out_channels)
        if n == 0:
            raise ValueError("block_out_channels must not be empty")
        if tuple(down_block_types) != ("DownEncoderBlock2D",) * n:
            raise ValueError(f"down_block_types must be {n} x 'DownEncoderBlock2D' (one per block_out_channels "
                             f"entry), got {list(down_block_types)}")
        if tuple(up_block_types) != ("UpDecoderBlock2D",) * n:
            raise ValueError(f"up_block_types must be {n} x 'UpDecoderBlock2D' (one per block_out_channels "
                             f"entry), got {list(up_block_types)}")
        if act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn={act_fn!r} is not supported (only 'silu')")
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(f"norm_num_groups={norm_num_groups} must divide every block_out_channels entry "
                             f"(not {bad})")
        if scaling_factor is None or not scaling_factor > 0:
            raise ValueError(f"scaling_factor must be a positive number, got {scaling_factor!r}")
        for name, stats in (("latents_mean", latents_mean), ("latents_std", latents_std)):
            if stats is not None and len(stats) != latent_channels:
                raise ValueError(f"{name} must have latent_channels={latent_channels} entries, got {len(stats)}")
        self.config = ModelConfig(
            in_channels=in_channels, out_channels=out_channels, down_block_types=tuple(down_block_types),
            up_block_types=tuple(up_block_types), block_out_channels=block_out_channels,
            layers_per_block=layers_per_block, act_fn=act_fn, latent_channels=latent_channels,
            norm_num_groups=norm_num_groups, sample_size=sample_size, scaling_factor=scaling_factor,
            shift_factor=shift_factor, latents_mean=None if latents_mean is None else tuple(latents_mean),
            latents_std=None if latents_std is None else tuple(latents_std), force_upcast=force_upcast,
            use_quant_conv=use_quant_conv, use_post_quant_conv=use_post_quant_conv,
            mid_block_add_attention=mid_block_add_attention)
        self.encoder = Encoder(in_channels, latent_channels, block_out_channels, layers_per_block, norm_num_groups,
                               mid_block_add_attention)
        self.decoder = Decoder(latent_channels, out_channels, block_out_channels, layers_per_block, norm_num_groups,
                               mid_block_add_attention)
        self.quant_conv = nn.Conv2d(2 * latent_channels, 2 * latent_channels, 1) if use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(latent_channels, latent_channels, 1) if use_post_quant_conv else None

    @classmethod
    def from_config(cls, config: Dict[str, Any]) -> "AutoencoderKL":
        """Build from a diffusers ``vae/config.json`` dict (``_``-prefixed keys are ignored)."""
        return cls(**kwargs_from_config(cls, config, foreign={}))

    @property
    def spatial_compression(self) -> int:
        """Image pixels per latent pixel along each axis (8 for every released SD-family VAE)."""
        return 2 ** (len(self.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return self.encoder.conv_in.weight.dtype

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """Image [B, in_channels, H, W] in [-1, 1] -> posterior over raw latents [B, latent_channels, h, w]."""
        _check_image("x", x, self.config.in_channels)
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        return DiagonalGaussian(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Raw latents [B, latent_channels, h, w] -> image [B, out_channels, h * f, w * f]."""
        _check_image("z", z, self.config.latent_channels)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def forward(self, x: torch.Tensor, sample_posterior: bool = False,
                generator: GeneratorArg = None) -> torch.Tensor:
        """Reconstruction: decode(encode(x).sample(generator) if sample_posterior else encode(x).mode())."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    # latent normalisation --------------------------------------------------------------------------------------

    def _shift_scale(self, like: torch.Tensor) -> Tuple[Union[float, torch.Tensor], Union[float, torch.Tensor]]:
        cfg = self.config
        scale, shift = cfg.scaling_factor, cfg.shift_factor or 0.0
        has_mean, has_std = cfg.latents_mean is not None, cfg.latents_std is not None
        if has_mean != has_std:
            raise ValueError("config has only one of latents_mean / latents_std; both or neither are needed")
        if has_mean:
            if shift:
                raise ValueError("config sets both shift_factor and latents_mean/latents_std; which normalisation "
                                 "applies is ambiguous")
            view = (1, -1, 1, 1)
            shift = torch.tensor(cfg.latents_mean, device=like.device, dtype=like.dtype).view(view)
            std = torch.tensor(cfg.latents_std, device=like.device, dtype=like.dtype).view(view)
            scale = scale / std
        return shift, scale

    def vae_to_latents(self, z: torch.Tensor) -> torch.Tensor:
        """Raw VAE latents -> the diffusion model's latents: (z - shift) * scale. [B, C, h, w], dtype kept."""
        _check_image("z", z, self.config.latent_channels)
        shift, scale = self._shift_scale(z)
        return (z - shift) * scale

    def latents_to_vae(self, z: torch.Tensor) -> torch.Tensor:
        """The diffusion model's latents -> raw VAE latents: z / scale + shift. [B, C, h, w], dtype kept."""
        _check_image("z", z, self.config.latent_channels)
        shift, scale = self._shift_scale(z)
        return z / scale + shift
