"""The Stable Diffusion UNet: one class for SD 1.x, SD 2.x and SDXL, with diffusers' config keys and
parameter names, so ``unet/config.json`` builds it and ``diffusion_pytorch_model.safetensors`` loads into it with
a plain ``load_state_dict``.

The six knobs that separate the families: ``block_out_channels``, the block types, ``attention_head_dim``
(diffusers' name; it is the number of heads per block), ``cross_attention_dim``, ``use_linear_projection`` and
``transformer_layers_per_block``, plus ``addition_embed_type="text_time"`` (SDXL's pooled-text + size
micro-conditioning) and ``upcast_attention`` (SD 2.1).

Partial forwards (for the UNet caches): ``forward`` is :meth:`UNet2DConditionModel.prepare` (checks, time
embedding), :meth:`~UNet2DConditionModel.encode` (``conv_in`` and the down blocks: the skip branches),
:meth:`~UNet2DConditionModel.mid` and :meth:`~UNet2DConditionModel.decode` (the up blocks and ``conv_out``), and a
cache calls these parts itself: the encoder up to one skip branch, the decoder from the up layer that consumes a
given branch, or the decoder alone on stored features. Branches are numbered as DeepCache numbers them: branch 0 is
``conv_in``'s output, then every down-block layer and downsampler in order (SD 1.5: 12 branches, 0..11); up layer
``k`` (counted from the first up block's first resnet) consumes branch ``num_branches - 1 - k``, its mirror.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import TimestepEmbedding, Timesteps
from .config import ModelConfig, kwargs_from_config
from .unet_blocks import (DOWN_BLOCK_TYPES, MID_BLOCK_TYPES, UP_BLOCK_TYPES, CrossAttnDownBlock2D,
                          CrossAttnUpBlock2D, DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D)


# diffusers keys we do not implement, with the (default) value we require.
_UNSUPPORTED_DEFAULTS = {
    "dual_cross_attention": False,
    "class_embed_type": None,
    "num_class_embeds": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "num_attention_heads": None,
    "resnet_time_scale_shift": "default",
    "resnet_skip_time_act": False,
    "time_embedding_type": "positional",
    "time_embedding_act_fn": None,
    "timestep_post_act": None,
    "attention_type": "default",
    "class_embeddings_concat": False,
    "cross_attention_norm": None,
}


@dataclass
class UNetCall:
    """What every part of one UNet forward shares, from :meth:`UNet2DConditionModel.prepare`.

    sample: [B, in_channels, H, W] in the UNet's dtype and memory format (centred when the config says so);
    emb: [B, time_embed_dim] time (and SDXL added) embedding; context: encoder_hidden_states in the UNet's dtype;
    mask: the additive cross-attention bias or None; in_dtype: the caller's sample dtype (the output's);
    forward_size: the sample's H, W are not multiples of 2**num_upsamplers (upsamplers then resize to the skips)."""

    sample: torch.Tensor
    emb: torch.Tensor
    context: torch.Tensor
    mask: Optional[torch.Tensor]
    in_dtype: torch.dtype
    forward_size: bool


def _tuple(value, n: int, name: str) -> tuple:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must have one entry per block ({n}), got {list(value)}")
        return tuple(value)
    return (value,) * n


class UNet2DConditionModel(nn.Module):
    """Text-conditioned UNet (SD 1.x / 2.x / XL) with diffusers' config keys and parameter names.

    forward(sample [B, in_channels, H, W], timestep (number, 0-d or [B] tensor), encoder_hidden_states
    [B, L, cross_attention_dim], added_cond_kwargs={"text_embeds": [B, Dp], "time_ids": [B, 6]} for SDXL)
    -> [B, out_channels, H, W] in ``sample``'s dtype. Any H, W work: when they are not multiples of
    2**num_upsamplers the upsamplers resize to the matching skip's size, as diffusers does.

    On CPU, ``unet.to(memory_format=torch.channels_last)`` is the fast layout (see :attr:`channels_last`); the
    output is always returned contiguous.
    """

    def __init__(self, sample_size: Optional[int] = None, in_channels: int = 4, out_channels: int = 4,
                 center_input_sample: bool = False, flip_sin_to_cos: bool = True, freq_shift: int = 0,
                 down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                                    "CrossAttnDownBlock2D", "DownBlock2D"),
                 mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn",
                 up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                                  "CrossAttnUpBlock2D"),
                 only_cross_attention: Union[bool, Sequence[bool]] = False,
                 block_out_channels: Sequence[int] = (320, 640, 1280, 1280),
                 layers_per_block: Union[int, Sequence[int]] = 2, downsample_padding: int = 1,
                 mid_block_scale_factor: float = 1, dropout: float = 0.0, act_fn: str = "silu",
                 norm_num_groups: Optional[int] = 32, norm_eps: float = 1e-5,
                 cross_attention_dim: Union[int, Sequence[int]] = 1280,
                 transformer_layers_per_block: Union[int, Sequence[int], Sequence[Sequence[int]]] = 1,
                 reverse_transformer_layers_per_block: Optional[Sequence[Sequence[int]]] = None,
                 attention_head_dim: Union[int, Sequence[int]] = 8, use_linear_projection: bool = False,
                 addition_embed_type: Optional[str] = None, addition_time_embed_dim: Optional[int] = None,
                 upcast_attention: bool = False, resnet_out_scale_factor: float = 1.0,
                 time_embedding_dim: Optional[int] = None, time_cond_proj_dim: Optional[int] = None,
                 conv_in_kernel: int = 3, conv_out_kernel: int = 3,
                 projection_class_embeddings_input_dim: Optional[int] = None,
                 mid_block_only_cross_attention: Optional[bool] = None, addition_embed_type_num_heads: int = 64):
        config = ModelConfig({k: v for k, v in locals().items() if k not in ("self", "__class__")})
        super().__init__()
        n = len(down_block_types)
        if len(up_block_types) != n or len(block_out_channels) != n:
            raise ValueError(f"down_block_types ({n}), up_block_types ({len(up_block_types)}) and "
                             f"block_out_channels ({len(block_out_channels)}) must have the same length")
        for name, types, allowed in (("down_block_types", down_block_types, DOWN_BLOCK_TYPES),
                                     ("up_block_types", up_block_types, UP_BLOCK_TYPES)):
            bad = [t for t in types if t not in allowed]
            if bad:
                raise ValueError(f"{name}: unsupported block type(s) {bad}; supported: {list(allowed)}")
        if mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"mid_block_type must be one of {list(MID_BLOCK_TYPES)}, got {mid_block_type!r}")
        if act_fn not in ("silu", "swish"):
            raise ValueError(f"act_fn must be 'silu' (or its alias 'swish'), got {act_fn!r}")
        if norm_num_groups is None:
            raise ValueError("norm_num_groups=None (no output GroupNorm) is not supported")
        if addition_embed_type not in (None, "text_time"):
            raise ValueError(f"addition_embed_type must be None or 'text_time', got {addition_embed_type!r}")
        for name, k in (("conv_in_kernel", conv_in_kernel), ("conv_out_kernel", conv_out_kernel)):
            if k % 2 != 1:
                raise ValueError(f"{name} must be odd, got {k}")

        heads = _tuple(attention_head_dim, n, "attention_head_dim")
        cross = _tuple(cross_attention_dim, n, "cross_attention_dim")
        layers = _tuple(layers_per_block, n, "layers_per_block")
        only_cross = _tuple(only_cross_attention, n, "only_cross_attention")
        down_tlayers = _tuple(transformer_layers_per_block, n, "transformer_layers_per_block")
        if reverse_transformer_layers_per_block is None:
            if any(isinstance(t, (list, tuple)) for t in down_tlayers):
                raise ValueError("reverse_transformer_layers_per_block is required when transformer_layers_per_block "
                                 "has per-layer lists (an asymmetric UNet)")
            up_tlayers = tuple(reversed(down_tlayers))
        else:
            up_tlayers = _tuple(reverse_transformer_layers_per_block, n, "reverse_transformer_layers_per_block")

        # time
        time_embed_dim = time_embedding_dim or block_out_channels[0] * 4
        self.conv_in = nn.Conv2d(in_channels, block_out_channels[0], conv_in_kernel, padding=conv_in_kernel // 2)
        self.time_proj = Timesteps(block_out_channels[0], flip_sin_to_cos, freq_shift)
        self.time_embedding = TimestepEmbedding(block_out_channels[0], time_embed_dim, cond_proj_dim=time_cond_proj_dim)
        if addition_embed_type == "text_time":
            if addition_time_embed_dim is None or projection_class_embeddings_input_dim is None:
                raise ValueError("addition_embed_type='text_time' needs addition_time_embed_dim and "
                                 "projection_class_embeddings_input_dim")
            self.add_time_proj = Timesteps(addition_time_embed_dim, flip_sin_to_cos, freq_shift)
            self.add_embedding = TimestepEmbedding(projection_class_embeddings_input_dim, time_embed_dim)
        else:
            self.add_time_proj = self.add_embedding = None

        # resnet_out_scale_factor only reaches block types we do not build (diffusers ignores it for these four)
        common = dict(temb_channels=time_embed_dim, resnet_eps=norm_eps, resnet_groups=norm_num_groups)
        attn_common = dict(use_linear_projection=use_linear_projection, upcast_attention=upcast_attention)

        self.down_blocks = nn.ModuleList()
        out_ch = block_out_channels[0]
        for i, kind in enumerate(down_block_types):
            in_ch, out_ch = out_ch, block_out_channels[i]
            last = i == n - 1
            if kind == "CrossAttnDownBlock2D":
                block = CrossAttnDownBlock2D(in_ch, out_ch, num_layers=layers[i],
                                             transformer_layers_per_block=down_tlayers[i],
                                             num_attention_heads=heads[i], cross_attention_dim=cross[i],
                                             downsample_padding=downsample_padding, add_downsample=not last,
                                             only_cross_attention=only_cross[i], **common, **attn_common)
            else:
                block = DownBlock2D(in_ch, out_ch, num_layers=layers[i], add_downsample=not last,
                                    downsample_padding=downsample_padding, **common)
            self.down_blocks.append(block)

        if mid_block_type is None:
            self.mid_block = None
        else:
            mid_tlayers = down_tlayers[-1]
            self.mid_block = UNetMidBlock2DCrossAttn(
                block_out_channels[-1], time_embed_dim, transformer_layers_per_block=mid_tlayers,
                resnet_eps=norm_eps, resnet_groups=norm_num_groups, num_attention_heads=heads[-1],
                output_scale_factor=mid_block_scale_factor, cross_attention_dim=cross[-1], **attn_common)
            # diffusers' UNetMidBlock2DCrossAttn ignores (mid_block_)only_cross_attention; so do we

        self.up_blocks = nn.ModuleList()
        rev_ch = list(reversed(block_out_channels))
        rev_heads, rev_cross = list(reversed(heads)), list(reversed(cross))
        rev_layers, rev_only = list(reversed(layers)), list(reversed(only_cross))
        self.num_upsamplers = 0
        out_ch = rev_ch[0]
        for i, kind in enumerate(up_block_types):
            last = i == n - 1
            prev_ch, out_ch = out_ch, rev_ch[i]
            in_ch = rev_ch[min(i + 1, n - 1)]
            self.num_upsamplers += 0 if last else 1
            if kind == "CrossAttnUpBlock2D":
                block = CrossAttnUpBlock2D(in_ch, out_ch, prev_ch, num_layers=rev_layers[i] + 1,
                                           transformer_layers_per_block=up_tlayers[i],
                                           num_attention_heads=rev_heads[i], cross_attention_dim=rev_cross[i],
                                           add_upsample=not last, only_cross_attention=rev_only[i],
                                           **common, **attn_common)
            else:
                block = UpBlock2D(in_ch, prev_ch, out_ch, num_layers=rev_layers[i] + 1, add_upsample=not last,
                                  **common)
            self.up_blocks.append(block)

        self.conv_norm_out = nn.GroupNorm(norm_num_groups, block_out_channels[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(block_out_channels[0], out_channels, conv_out_kernel, padding=conv_out_kernel // 2)
        self.center_input_sample = center_input_sample
        self.config = config

    @classmethod
    def from_config(cls, config: Dict) -> "UNet2DConditionModel":
        """Build from a diffusers ``unet/config.json`` dict. Keys starting with "_" are dropped; a key we do not
        implement raises ValueError naming it unless it holds the default we implement."""
        kwargs = kwargs_from_config(cls, config, _UNSUPPORTED_DEFAULTS)
        model = cls(**kwargs)
        model.config = ModelConfig({k: v for k, v in config.items() if not k.startswith("_")})
        return model

    @property
    def channels_last(self) -> bool:
        """True after ``unet.to(memory_format=torch.channels_last)``: inputs are then converted to channels-last
        too, so every conv runs NHWC without per-call weight reorders and the transformers need no layout copies
        (the faster layout on CPU)."""
        # a 3x3 conv, so the two layouts are distinguishable (conv_in when conv1 is a quantized layer)
        conv1 = self.down_blocks[0].resnets[0].conv1
        w = conv1.weight if isinstance(conv1, nn.Conv2d) else self.conv_in.weight
        return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def _time_embedding(self, timestep, batch: int, device: torch.device, dtype: torch.dtype,
                        timestep_cond: Optional[torch.Tensor]) -> torch.Tensor:
        """timestep (number, 0-d or [B] / [1] tensor) -> [B, time_embed_dim] in ``dtype``."""
        if not torch.is_tensor(timestep):
            timestep = torch.tensor([timestep], dtype=torch.float64 if isinstance(timestep, float) else torch.int64,
                                    device=device)
        elif timestep.dim() == 0:
            timestep = timestep[None].to(device)
        elif timestep.dim() != 1 or timestep.shape[0] not in (1, batch):
            raise ValueError(f"timestep must be a number, a 0-d tensor or a [B]={batch} tensor, "
                             f"got shape {tuple(timestep.shape)}")
        t_emb = self.time_proj(timestep.to(device).expand(batch)).to(dtype)
        if timestep_cond is not None:
            timestep_cond = timestep_cond.to(dtype)
        return self.time_embedding(t_emb, timestep_cond)

    def _added_embedding(self, added_cond_kwargs: Optional[Dict[str, torch.Tensor]], batch: int,
                         dtype: torch.dtype) -> torch.Tensor:
        """SDXL: [text_embeds, sinusoids(time_ids)] -> add_embedding -> [B, time_embed_dim]."""
        if added_cond_kwargs is None or "text_embeds" not in added_cond_kwargs or "time_ids" not in added_cond_kwargs:
            raise ValueError("added_cond_kwargs must hold 'text_embeds' [B, D] and 'time_ids' [B, 6] for a UNet with "
                             "addition_embed_type='text_time' (SDXL)")
        text_embeds, time_ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        if text_embeds.dim() != 2 or text_embeds.shape[0] != batch:
            raise ValueError(f"added_cond_kwargs['text_embeds'] must be [B={batch}, D], got {tuple(text_embeds.shape)}")
        if time_ids.shape[0] != batch:
            raise ValueError(f"added_cond_kwargs['time_ids'] must be [B={batch}, N], got {tuple(time_ids.shape)}")
        time_embeds = self.add_time_proj(time_ids.flatten()).reshape(batch, -1)
        add = torch.cat([text_embeds, time_embeds.to(text_embeds.dtype)], dim=-1).to(dtype)
        if add.shape[1] != self.add_embedding.linear_1.in_features:
            raise ValueError(f"text_embeds width + time_ids sinusoids = {add.shape[1]} but the UNet expects "
                             f"projection_class_embeddings_input_dim={self.add_embedding.linear_1.in_features}")
        return self.add_embedding(add)

    @property
    def num_branches(self) -> int:
        """The number of skip branches (``conv_in`` plus every down-block layer and downsampler): SD 1.5 12,
        SDXL 9, ``digits`` 4. Branch ids for the caches run 0 .. num_branches - 1."""
        return 1 + sum(block.num_skips for block in self.down_blocks)

    def prepare(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int],
                encoder_hidden_states: torch.Tensor, added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
                timestep_cond: Optional[torch.Tensor] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> UNetCall:
        """Check the inputs of a forward and compute what its parts share (the time embedding); see
        :meth:`forward` for the arguments."""
        if sample.dim() != 4 or sample.shape[1] != self.conv_in.in_channels:
            raise ValueError(f"sample must be [B, {self.conv_in.in_channels}, H, W], got {tuple(sample.shape)}")
        if encoder_hidden_states.dim() != 3 or encoder_hidden_states.shape[0] != sample.shape[0]:
            raise ValueError(f"encoder_hidden_states must be [B={sample.shape[0]}, L, D], "
                             f"got {tuple(encoder_hidden_states.shape)}")
        in_dtype, dtype = sample.dtype, self.dtype
        batch = sample.shape[0]
        x = sample.to(dtype)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        ctx = encoder_hidden_states.to(dtype)
        if self.center_input_sample:
            x = 2 * x - 1.0
        mask = None
        if encoder_attention_mask is not None:  # keep-mask [B, L] -> additive bias [B, 1, 1, L], as diffusers does
            mask = ((1 - encoder_attention_mask.to(dtype)) * -10000.0)[:, None, None, :]

        emb = self._time_embedding(timestep, batch, x.device, dtype, timestep_cond)
        if self.add_embedding is not None:
            emb = emb + self._added_embedding(added_cond_kwargs, batch, dtype)

        up_factor = 2 ** self.num_upsamplers
        forward_size = any(s % up_factor for s in x.shape[-2:])
        return UNetCall(x, emb, ctx, mask, in_dtype, forward_size)

    def encode(self, call: UNetCall, down_block_additional_residuals: Optional[Sequence[torch.Tensor]] = None,
               until_branch: Optional[int] = None) -> Tuple[Optional[torch.Tensor], List[torch.Tensor]]:
        """``conv_in`` and the down blocks: (the last down block's output, the skips [branch 0, 1, ...]).

        ``until_branch=b``: stop as soon as branch ``b`` exists; returns (None, skips 0..b), and the layers after it
        do not run. ControlNet residuals are added to the skips computed (all of them when the encoder runs whole)."""
        if until_branch is not None and not 0 <= until_branch < self.num_branches:
            raise ValueError(f"until_branch must be in [0, {self.num_branches - 1}], got {until_branch}")
        x = self.conv_in(call.sample)
        skips = [x]
        stopped = until_branch == 0
        for block in self.down_blocks:
            if stopped:
                break
            if until_branch is None or len(skips) + block.num_skips <= until_branch + 1:
                x, res = block(x, call.emb, call.context, call.mask)
                skips.extend(res)
                stopped = until_branch is not None and len(skips) == until_branch + 1
                continue
            for i in range(len(block.resnets)):  # the branch lies inside this block: run it layer by layer
                x = block.layer(i, x, call.emb, call.context, call.mask)
                skips.append(x)
                if len(skips) == until_branch + 1:
                    break
            stopped = True
        if down_block_additional_residuals is not None:
            if len(down_block_additional_residuals) != self.num_branches:
                raise ValueError(f"down_block_additional_residuals needs {self.num_branches} tensors, "
                                 f"got {len(down_block_additional_residuals)}")
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals)]
        return (None if until_branch is not None else x), skips

    def mid(self, call: UNetCall, x: torch.Tensor,
            mid_block_additional_residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The mid block (and a ControlNet mid residual) on the last down block's output."""
        if self.mid_block is not None:
            x = self.mid_block(x, call.emb, call.context, call.mask)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        return x

    def decode(self, call: UNetCall, x: torch.Tensor, skips: Sequence[torch.Tensor],
               start_branch: Optional[int] = None,
               record_branch: Optional[int] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The up blocks and ``conv_out``: (the UNet output [B, out_channels, H, W] in ``call.in_dtype``, recorded).

        Whole (``start_branch=None``): ``x`` is the mid block's output and ``skips`` all branches. From the mirror of
        branch ``b`` (``start_branch=b``): ``x`` is the up-path state entering the up layer that consumes branch
        ``b`` and ``skips`` holds branches 0..b; the layers before it do not run. ``record_branch=r``: also return
        the up-path state entering the up layer that consumes branch ``r`` (else None)."""
        n_branches = self.num_branches
        start_k = 0 if start_branch is None else n_branches - 1 - start_branch
        if len(skips) != n_branches - start_k:
            raise ValueError(f"decode from up layer {start_k} needs {n_branches - start_k} skips, got {len(skips)}")
        record_k = None if record_branch is None else n_branches - 1 - record_branch
        skips = list(skips)
        recorded = None
        k0 = 0  # the up-layer index of the current block's first layer
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            if k0 + n <= start_k:
                k0 += n
                continue
            first = max(0, start_k - k0)
            res, skips = skips[len(skips) - (n - first):], skips[:len(skips) - (n - first)]
            size = tuple(skips[-1].shape[2:]) if call.forward_size and i < len(self.up_blocks) - 1 else None
            if first == 0 and not (record_k is not None and k0 < record_k < k0 + n):
                if record_k == k0:
                    recorded = x
                x = block(x, res, call.emb, call.context, call.mask, upsample_size=size)
            else:  # the block is entered or recorded part-way: run it layer by layer
                for j in range(first, n):
                    if k0 + j == record_k:
                        recorded = x
                    x = block.layer(j, x, res.pop(), call.emb, call.context, call.mask)
                if block.upsamplers is not None:
                    x = block.upsample(x, size)
            k0 += n
        x = self.conv_out(F.silu(self.conv_norm_out(x)))
        return x.to(dtype=call.in_dtype, memory_format=torch.contiguous_format), recorded

    def forward(self, sample: torch.Tensor, timestep: Union[torch.Tensor, float, int],
                encoder_hidden_states: torch.Tensor, added_cond_kwargs: Optional[Dict[str, torch.Tensor]] = None,
                timestep_cond: Optional[torch.Tensor] = None, encoder_attention_mask: Optional[torch.Tensor] = None,
                down_block_additional_residuals: Optional[Sequence[torch.Tensor]] = None,
                mid_block_additional_residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sample [B, C, H, W]; timestep number / 0-d / [B]; encoder_hidden_states [B, L, D];
        added_cond_kwargs (SDXL) {"text_embeds": [B, Dp], "time_ids": [B, 6]}; timestep_cond [B, time_cond_proj_dim]
        (LCM guidance embedding); encoder_attention_mask [B, L] (1 keep, 0 drop); ControlNet residuals
        ``down_block_additional_residuals`` (one per skip) and ``mid_block_additional_residual``.
        Returns [B, out_channels, H, W] in sample's dtype."""
        call = self.prepare(sample, timestep, encoder_hidden_states, added_cond_kwargs, timestep_cond,
                            encoder_attention_mask)
        x, skips = self.encode(call, down_block_additional_residuals)
        x = self.mid(call, x, mid_block_additional_residual)
        return self.decode(call, x, skips)[0]
