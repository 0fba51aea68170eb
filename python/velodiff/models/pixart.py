"""PixArt-alpha / PixArt-sigma (Chen et al. 2023, 2024): text-conditional DiT with cross-attention to T5 features
and adaLN-single, with diffusers' ``PixArtTransformer2DModel`` parameter names.

Key layout (XL-2: D = 1152, 28 blocks): ``pos_embed.proj``; ``adaln_single.emb.timestep_embedder.linear_{1,2}``,
``adaln_single.emb.{resolution,aspect_ratio}_embedder.linear_{1,2}`` (micro-conditions, alpha 1024-MS only),
``adaln_single.linear`` (6D x D); ``caption_projection.linear_{1,2}`` (T5 4096 -> D -> D);
``transformer_blocks.N.{scale_shift_table (6 x D), attn1.*, attn2.*, ff.net.{0.proj,2}}``;
``scale_shift_table`` (2 x D); ``proj_out`` (p*p*out_channels x D).
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from .attention import Attention
from .config import build_from_config, init_config
from .dit_common import BlockStack, PatchEmbed, StackInputs, timestep_batch, unpatchify
from .embeddings import TimestepEmbedding, Timesteps
from .feedforward import FeedForward

# Keys that legacy ``Transformer2DModel`` configs of PixArt checkpoints carry, with the value that leaves PixArt
# as is.
_LEGACY_KEYS = {"num_vector_embeds": None, "use_linear_projection": False, "only_cross_attention": False,
                "double_self_attention": False}


class TimestepSizeEmbedding(nn.Module):
    """Timestep embedding plus, optionally, PixArt-alpha's micro-conditions (section 2.3 / SDXL-style size
    conditioning): each of resolution (h, w) and aspect ratio goes through a 256-d sinusoid and its own MLP to
    D/3 wide, and [res_h, res_w, ar] (D wide together) is added to the timestep embedding.

    timestep [B]; resolution [B, 2], aspect_ratio [B, 1] (any numeric dtype; ignored without micro-conditions)
    -> [B, D] in ``dtype``.
    """

    def __init__(self, embedding_dim: int, use_additional_conditions: bool):
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)
        self.use_additional_conditions = use_additional_conditions
        if use_additional_conditions:
            if embedding_dim % 3:
                raise ValueError(f"micro-conditions need the hidden size (num_attention_heads * attention_head_dim) "
                                 f"to be a multiple of 3, got {embedding_dim}")
            self.additional_condition_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0)
            self.resolution_embedder = TimestepEmbedding(256, embedding_dim // 3)
            self.aspect_ratio_embedder = TimestepEmbedding(256, embedding_dim // 3)

    def forward(self, timestep: torch.Tensor, resolution: Optional[torch.Tensor],
                aspect_ratio: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        emb = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        if not self.use_additional_conditions:
            return emb
        b = timestep.shape[0]
        for name, value, width in (("resolution", resolution, 2), ("aspect_ratio", aspect_ratio, 1)):
            if value is None:
                raise ValueError(f"added_cond_kwargs[{name!r}] is required: this model uses micro-conditions "
                                 f"(use_additional_conditions=True)")
            if value.numel() != b * width:
                raise ValueError(f"added_cond_kwargs[{name!r}] must be [{b}, {width}], got {tuple(value.shape)}")
        res = self.resolution_embedder(self.additional_condition_proj(resolution.flatten()).to(dtype))
        ar = self.aspect_ratio_embedder(self.additional_condition_proj(aspect_ratio.flatten()).to(dtype))
        return emb + torch.cat([res.reshape(b, -1), ar.reshape(b, -1)], dim=1)


class AdaLayerNormSingle(nn.Module):
    """adaLN-single (PixArt-alpha section 2.3): one shared ``linear``(SiLU(emb)) -> [B, 6D] for all blocks, plus
    the embedding itself [B, D] (the final layer's modulation input)."""

    def __init__(self, embedding_dim: int, use_additional_conditions: bool):
        super().__init__()
        self.emb = TimestepSizeEmbedding(embedding_dim, use_additional_conditions)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim)

    def forward(self, timestep: torch.Tensor, resolution: Optional[torch.Tensor],
                aspect_ratio: Optional[torch.Tensor], dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
        emb = self.emb(timestep, resolution, aspect_ratio, dtype)
        return self.linear(self.silu(emb)), emb


class CaptionProjection(nn.Module):
    """T5 features -> model width: ``linear_1`` -> GELU(tanh) -> ``linear_2``. [B, L, C] -> [B, L, D]."""

    def __init__(self, in_features: int, hidden_size: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size)
        self.act_1 = nn.GELU(approximate="tanh")
        self.linear_2 = nn.Linear(hidden_size, hidden_size)

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act_1(self.linear_1(caption)))


class PixArtBlock(nn.Module):
    """Self-attention, cross-attention, MLP; the self-attention and MLP are modulated by the shared adaLN-single
    output plus this block's ``scale_shift_table`` (6 x D); the cross-attention has no norm and no gate.

    x [B, N, D], mod [B, 6D], context [B, L, cross_attention_dim], context_bias [B, 1, 1, L] additive or None.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention_dim: int, activation_fn: str,
                 attention_bias: bool, upcast_attention: bool, norm_elementwise_affine: bool, norm_eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, bias=attention_bias,
                               upcast_attention=upcast_attention)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.attn2 = Attention(dim, cross_attention_dim=cross_attention_dim, heads=heads, dim_head=head_dim,
                               bias=attention_bias, upcast_attention=upcast_attention)
        self.ff = FeedForward(dim, activation_fn=activation_fn)
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim ** 0.5)

    def modulated_input(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor,
                        context_bias: Optional[torch.Tensor]) -> torch.Tensor:
        """The self-attention's input LN(x) * (1 + scale_msa) + shift_msa: [B, N, D]."""
        b, d = x.shape[0], x.shape[-1]
        shift_msa, scale_msa = (self.scale_shift_table[None, :2] + mod.reshape(b, 6, d)[:, :2]).chunk(2, dim=1)
        return self.norm1(x) * (1 + scale_msa) + shift_msa

    def forward(self, x: torch.Tensor, mod: torch.Tensor, context: torch.Tensor,
                context_bias: Optional[torch.Tensor]) -> torch.Tensor:
        b, d = x.shape[0], x.shape[-1]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
            self.scale_shift_table[None] + mod.reshape(b, 6, d)).chunk(6, dim=1)  # each [B, 1, D]
        x = x + gate_msa * self.attn1(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.attn2(x, context, attention_mask=context_bias)
        return x + gate_mlp * self.ff(self.norm2(x) * (1 + scale_mlp) + shift_mlp)


class PixArtTransformer2DModel(BlockStack, nn.Module):
    """PixArt-alpha / -sigma transformer, diffusers' ``PixArtTransformer2DModel`` config keys and parameter names.

    forward(hidden_states [B, in_channels, H, W] (H, W multiples of patch_size; any aspect ratio),
    encoder_hidden_states [B, L, caption_channels] (T5 features; [B, L, cross_attention_dim] when
    ``caption_channels`` is None), timestep scalar / [1] / [B], added_cond_kwargs {"resolution": [B, 2],
    "aspect_ratio": [B, 1]} (required when ``use_additional_conditions``; else ignored and may be None),
    encoder_attention_mask [B, L] (1 keep / 0 drop; or an additive bias [B, 1, L]) or None)
    -> [B, out_channels, H, W] in the input's dtype.

    ``use_additional_conditions=None`` means "micro-conditions iff sample_size == 128" (PixArt-alpha 1024-MS),
    as in diffusers; PixArt-sigma configs set it to False. ``interpolation_scale=None`` means
    max(sample_size // 64, 1). Dropped caption tokens get a -10000 bias in the cross-attention logits (diffusers'
    convention, so a row with every token dropped attends uniformly instead of producing NaN).
    ``dropout`` and ``norm_num_groups`` are accepted and ignored (inference only; unused by diffusers too).
    The block stack's extension points (:meth:`prepare`, :meth:`run_blocks`, :meth:`finish`, ...) are
    :class:`velodiff.models.dit_common.BlockStack`'s.
    """

    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 72, in_channels: int = 4,
                 out_channels: Optional[int] = 8, num_layers: int = 28, dropout: float = 0.0,
                 norm_num_groups: int = 32, cross_attention_dim: Optional[int] = 1152, attention_bias: bool = True,
                 sample_size: int = 128, patch_size: int = 2, activation_fn: str = "gelu-approximate",
                 num_embeds_ada_norm: Optional[int] = 1000, upcast_attention: bool = False,
                 norm_type: str = "ada_norm_single", norm_elementwise_affine: bool = False, norm_eps: float = 1e-6,
                 interpolation_scale: Optional[float] = None, use_additional_conditions: Optional[bool] = None,
                 caption_channels: Optional[int] = None, attention_type: Optional[str] = "default"):
        config = init_config(locals())
        super().__init__()
        self.config = config
        if norm_type != "ada_norm_single":
            raise ValueError(f"norm_type must be 'ada_norm_single' for PixArt, got {norm_type!r}")
        if num_embeds_ada_norm is None:
            raise ValueError("num_embeds_ada_norm must not be None with norm_type 'ada_norm_single' (as in diffusers)")
        if attention_type != "default":
            raise ValueError(f"attention_type must be 'default', got {attention_type!r}")
        if cross_attention_dim is None:
            raise ValueError("cross_attention_dim must be set: PixArt blocks cross-attend to the caption")
        dim = num_attention_heads * attention_head_dim
        if caption_channels is not None and cross_attention_dim != dim:
            # The caption projection outputs the model width, which the cross-attention keys/values then read.
            raise ValueError(f"with caption_channels set, cross_attention_dim must equal the hidden size "
                             f"num_attention_heads * attention_head_dim = {dim}, got {cross_attention_dim}")
        if use_additional_conditions is None:
            use_additional_conditions = sample_size == 128
        self.use_additional_conditions = bool(use_additional_conditions)
        self.inner_dim = dim
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        scale = interpolation_scale if interpolation_scale is not None else max(sample_size // 64, 1)
        self.pos_embed = PatchEmbed(sample_size, patch_size, in_channels, dim, interpolation_scale=scale)
        self.transformer_blocks = nn.ModuleList([
            PixArtBlock(dim, num_attention_heads, attention_head_dim, cross_attention_dim, activation_fn,
                        attention_bias, upcast_attention, norm_elementwise_affine, norm_eps)
            for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim ** 0.5)
        self.proj_out = nn.Linear(dim, patch_size * patch_size * self.out_channels)
        self.adaln_single = AdaLayerNormSingle(dim, self.use_additional_conditions)
        self.caption_projection = CaptionProjection(caption_channels, dim) if caption_channels is not None else None

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "PixArtTransformer2DModel":
        """Build from a diffusers ``transformer/config.json`` dict (also legacy ``Transformer2DModel`` ones)."""
        return build_from_config(cls, config, _LEGACY_KEYS)

    @staticmethod
    def _context_bias(mask: Optional[torch.Tensor], batch: int, length: int, dtype: torch.dtype
                      ) -> Optional[torch.Tensor]:
        """[B, L] keep-mask (1 / 0, bool or numeric) -> additive bias [B, 1, 1, L] (0 keep, -10000 drop); a
        [B, 1, L] tensor is taken as an additive bias already."""
        if mask is None:
            return None
        if mask.dim() == 2:
            if mask.shape != (batch, length):
                raise ValueError(f"encoder_attention_mask must be [{batch}, {length}], got {tuple(mask.shape)}")
            return ((1 - mask.to(dtype)) * -10000.0)[:, None, None, :]
        if mask.dim() == 3 and mask.shape[0] == batch and mask.shape[1] == 1 and mask.shape[2] == length:
            return mask.to(dtype)[:, None]
        raise ValueError(f"encoder_attention_mask must be a [{batch}, {length}] keep-mask or a [{batch}, 1, {length}] "
                         f"bias, got shape {tuple(mask.shape)}")

    def prepare(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep: Union[torch.Tensor, float, int],
                added_cond_kwargs: Optional[Dict[str, Optional[torch.Tensor]]] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, StackInputs]:
        """Check the arguments and embed: (tokens [B, N, D], the stack's inputs)."""
        b = hidden_states.shape[0]
        height, width = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        if self.use_additional_conditions and added_cond_kwargs is None:
            raise ValueError("added_cond_kwargs {'resolution': [B, 2], 'aspect_ratio': [B, 1]} is required: "
                             "this model uses micro-conditions (use_additional_conditions=True)")
        c = self.config.caption_channels or self.config.cross_attention_dim
        if (encoder_hidden_states is None or encoder_hidden_states.dim() != 3
                or encoder_hidden_states.shape[0] != b or encoder_hidden_states.shape[2] != c):
            shape = None if encoder_hidden_states is None else tuple(encoder_hidden_states.shape)
            raise ValueError(f"encoder_hidden_states must be [{b}, L, {c}], got {shape}")
        x = self.pos_embed(hidden_states)
        t = timestep_batch(timestep, b, x.device)
        cond = added_cond_kwargs or {}
        mod, emb = self.adaln_single(t, cond.get("resolution"), cond.get("aspect_ratio"), x.dtype)
        context = encoder_hidden_states
        if self.caption_projection is not None:
            context = self.caption_projection(context)
        bias = self._context_bias(encoder_attention_mask, b, context.shape[1], x.dtype)
        return x, StackInputs((mod, context, bias), height, width, final=emb)

    def finish(self, x: torch.Tensor, inputs: StackInputs) -> torch.Tensor:
        """The final layer on the stack's output tokens -> [B, out_channels, H, W]."""
        shift, scale = (self.scale_shift_table[None] + inputs.final[:, None]).chunk(2, dim=1)  # each [B, 1, D]
        x = self.proj_out(self.norm_out(x) * (1 + scale) + shift)
        return unpatchify(x, inputs.height, inputs.width, self.patch_size, self.out_channels)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep: Union[torch.Tensor, float, int],
                added_cond_kwargs: Optional[Dict[str, Optional[torch.Tensor]]] = None,
                encoder_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x, inputs = self.prepare(hidden_states, encoder_hidden_states, timestep, added_cond_kwargs,
                                 encoder_attention_mask)
        return self.finish(self.run_stack(x, inputs), inputs)
