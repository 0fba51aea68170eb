"""Pieces shared by the patch transformers (DiT, PixArt): patch embedding over a fixed 2-D
sin-cos position table, unpatchify, timestep normalisation, and the block-stack extension points the DiT caches
use (:class:`BlockStack`).

Parameter names follow diffusers (``pos_embed.proj``), so diffusers state dicts load unchanged. The sin-cos table
is a non-persistent buffer, as in diffusers: it is never part of a state dict.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Tuple, Union

import torch
from torch import nn


def sincos_1d(embed_dim: int, positions: torch.Tensor) -> torch.Tensor:
    """[M] positions -> [M, embed_dim] float64: [sin(p w_k), cos(p w_k)], w_k = 10000^(-k / (embed_dim/2))
    (Vaswani et al. 2017, section 3.5)."""
    if embed_dim % 2:
        raise ValueError(f"embed_dim must be even, got {embed_dim}")
    half = embed_dim // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64, device=positions.device) / half)
    angles = positions.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_2d_pos_embed(embed_dim: int, height: int, width: int, base_size: int,
                        interpolation_scale: float = 1.0, device: Optional[torch.device] = None) -> torch.Tensor:
    """Fixed 2-D sin-cos table (MAE / DiT) for a ``height`` x ``width`` token grid -> [height*width, embed_dim] fp32.

    Token ``r*width + c`` gets [sincos(x_c), sincos(y_r)] (column coordinate first, each half embed_dim/2 wide).
    Each axis is stretched to ``base_size`` (the training grid side) and divided by ``interpolation_scale``:
    y_r = r * base_size / height / interpolation_scale (PixArt, section 2.3), the positions computed in fp32 and
    the sines in fp64, as diffusers' ``PatchEmbed`` does.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be a multiple of 4 for a 2-D sin-cos table, got {embed_dim}")
    ys = torch.arange(height, dtype=torch.float32, device=device) / (height / base_size) / interpolation_scale
    xs = torch.arange(width, dtype=torch.float32, device=device) / (width / base_size) / interpolation_scale
    emb_x = sincos_1d(embed_dim // 2, xs)  # [W, D/2]
    emb_y = sincos_1d(embed_dim // 2, ys)  # [H, D/2]
    table = torch.cat([emb_x[None, :, :].expand(height, -1, -1), emb_y[:, None, :].expand(-1, width, -1)], dim=-1)
    return table.reshape(height * width, embed_dim).float()


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches -> tokens, plus the fixed sin-cos position table.

    ``proj``: Conv2d(in_channels, embed_dim, k = s = patch_size). Input [B, C, H, W] (H, W multiples of
    ``patch_size``) -> [B, (H/p)*(W/p), embed_dim] in the input's dtype. The table for the training grid
    (``sample_size / patch_size`` square) is cached; other grids are computed per call, stretched to the training
    grid (``base_size``) as diffusers does.
    """

    def __init__(self, sample_size: int, patch_size: int, in_channels: int, embed_dim: int,
                 interpolation_scale: float = 1.0):
        super().__init__()
        if patch_size < 1 or sample_size < patch_size:
            raise ValueError(f"patch_size must be in [1, sample_size={sample_size}], got {patch_size}")
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.base_size = sample_size // patch_size
        self.interpolation_scale = interpolation_scale
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        table = sincos_2d_pos_embed(embed_dim, self.base_size, self.base_size, self.base_size, interpolation_scale)
        self.register_buffer("pos_embed", table[None], persistent=False)
        self.register_load_state_dict_post_hook(PatchEmbed._rebuild_meta_table)

    @staticmethod
    def _rebuild_meta_table(module: "PatchEmbed", incompatible_keys) -> None:
        # A model built on the meta device and loaded with load_state_dict(assign=True) gets real weights but
        # keeps a meta table (it is not in the state dict): rebuild it where the weights now live.
        if module.pos_embed.is_meta and not module.proj.weight.is_meta:
            table = sincos_2d_pos_embed(module.pos_embed.shape[-1], module.base_size, module.base_size,
                                        module.base_size, module.interpolation_scale, device=module.proj.weight.device)
            module.pos_embed = table[None]

    def pos_table(self, height: int, width: int, device: torch.device) -> torch.Tensor:
        """[1, height*width, D] fp32 table for a token grid of ``height`` x ``width``."""
        if height == width == self.base_size:
            return self.pos_embed
        return sincos_2d_pos_embed(self.pos_embed.shape[-1], height, width, self.base_size,
                                   self.interpolation_scale, device=device)[None]

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        if latent.dim() != 4 or latent.shape[1] != self.in_channels:
            raise ValueError(f"hidden_states must be [B, {self.in_channels}, H, W], got {tuple(latent.shape)}")
        p = self.patch_size
        if latent.shape[-2] % p or latent.shape[-1] % p:
            raise ValueError(f"hidden_states height and width must be multiples of patch_size={p}, "
                             f"got {tuple(latent.shape[-2:])}")
        height, width = latent.shape[-2] // p, latent.shape[-1] // p
        tokens = self.proj(latent).flatten(2).transpose(1, 2)
        return (tokens + self.pos_table(height, width, latent.device)).to(tokens.dtype)


def unpatchify(tokens: torch.Tensor, height: int, width: int, patch_size: int, channels: int) -> torch.Tensor:
    """[B, height*width, p*p*channels] (per token: p rows x p columns x channels) -> [B, channels, height*p,
    width*p]."""
    b = tokens.shape[0]
    x = tokens.reshape(b, height, width, patch_size, patch_size, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, h, p, w, p]
    return x.reshape(b, channels, height * patch_size, width * patch_size)


def timestep_batch(timestep: Union[torch.Tensor, float, int], batch: int, device: torch.device) -> torch.Tensor:
    """A scalar, [1] or [batch] timestep -> [batch] tensor on ``device`` (integer or float dtype kept)."""
    if timestep is None:
        raise ValueError("timestep is required")
    t = torch.as_tensor(timestep, device=device)
    if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
        return t.reshape(1).expand(batch)
    if t.dim() != 1 or t.shape[0] != batch:
        raise ValueError(f"timestep must be a scalar, [1] or [{batch}] (the batch), got shape {tuple(t.shape)}")
    return t


@dataclass
class StackInputs:
    """What the block stack of one forward call needs besides the tokens: ``block_args``, passed to every block
    after the tokens (DiT: timesteps and labels; PixArt: modulation, caption and its mask bias), the token grid
    (``height`` x ``width``) and ``final``, what the model's final layer needs."""

    block_args: Tuple[Any, ...]
    height: int
    width: int
    final: Any = None


class BlockStack:
    """The extension points of a patch transformer's block stack (mixed into DiT and PixArt).

    ``forward`` is ``finish(run_stack(*prepare(...)))``: :meth:`prepare` embeds the input into tokens [B, N, D] and
    the :class:`StackInputs`, :meth:`run_blocks` runs blocks ``[start, stop)``, :meth:`modulated_input` gives block
    0's timestep-modulated input (TeaCache's probe) and :meth:`finish` applies the final layer. A technique may set
    :attr:`block_stack_hook`, a callable ``(model, tokens, inputs) -> tokens`` run in place of the whole stack
    (``run_blocks(tokens, inputs)``); it must leave the result the model would give when it decides to compute.

    Blocks never write their input tensor (each returns a fresh tensor), so the residual of a block range,
    ``run_blocks(x, ..) - x``, is the range's contribution.
    """

    #: None, or ``hook(model, tokens, inputs) -> tokens`` run in place of the whole block stack
    block_stack_hook: Optional[Callable[..., torch.Tensor]] = None

    @property
    def num_blocks(self) -> int:
        return len(self.transformer_blocks)

    def run_blocks(self, x: torch.Tensor, inputs: StackInputs, start: int = 0, stop: Optional[int] = None
                   ) -> torch.Tensor:
        """Blocks ``start`` .. ``stop - 1`` (``stop`` None: to the end) on tokens [B, N, D] -> [B, N, D]."""
        blocks = self.transformer_blocks
        stop = len(blocks) if stop is None else stop
        for i in range(start, stop):
            x = blocks[i](x, *inputs.block_args)
        return x

    def modulated_input(self, x: torch.Tensor, inputs: StackInputs) -> torch.Tensor:
        """Block 0's input to its self-attention, LN(x) * (1 + scale) + shift with this call's timestep modulation:
        [B, N, D] (a fresh tensor)."""
        return self.transformer_blocks[0].modulated_input(x, *inputs.block_args)

    def run_stack(self, x: torch.Tensor, inputs: StackInputs) -> torch.Tensor:
        """The whole stack, through :attr:`block_stack_hook` when one is set."""
        hook = self.block_stack_hook
        if hook is None:
            return self.run_blocks(x, inputs)
        return hook(self, x, inputs)
