"""DiT (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers"): class-conditional latent transformer
with adaLN-Zero blocks, with diffusers' ``DiTTransformer2DModel`` parameter names.

Key layout (DiT-XL/2: D = 1152, 28 blocks): ``pos_embed.proj``;
``transformer_blocks.N.norm1.emb.{timestep_embedder.linear_1, timestep_embedder.linear_2,
class_embedder.embedding_table}`` (diffusers gives every block its own copy of the embedders);
``transformer_blocks.N.norm1.linear`` (6D x D); ``transformer_blocks.N.attn1.to_{q,k,v,out.0}``;
``transformer_blocks.N.ff.net.{0.proj,2}``; ``proj_out_1`` (2D x D), ``proj_out_2`` (p*p*out_channels x D).
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .attention import Attention
from .config import build_from_config, init_config
from .dit_common import BlockStack, PatchEmbed, StackInputs, timestep_batch, unpatchify
from .embeddings import TimestepEmbedding, Timesteps
from .feedforward import FeedForward

# Keys that legacy ``Transformer2DModel`` configs of DiT checkpoints carry, with the value that leaves DiT as is.
_LEGACY_KEYS = {"cross_attention_dim": None, "num_vector_embeds": None, "use_linear_projection": False,
                "only_cross_attention": False, "double_self_attention": False, "attention_type": "default",
                "caption_channels": None, "interpolation_scale": None, "use_additional_conditions": None}


class LabelEmbedding(nn.Module):
    """Class label -> vector. ``embedding_table`` has ``num_classes + 1`` rows; label ``num_classes`` is the
    learned null class used for classifier-free guidance. [B] integer labels -> [B, hidden_size]."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        if labels.device.type == "cpu" and labels.numel() and (
                int(labels.min()) < 0 or int(labels.max()) > self.num_classes):
            raise ValueError(f"class_labels must lie in [0, {self.num_classes}] ({self.num_classes} = null class), "
                             f"got values in [{int(labels.min())}, {int(labels.max())}]")
        return self.embedding_table(labels)


class TimestepLabelEmbedding(nn.Module):
    """c = MLP(sinusoid_256(t)) + E[y] (DiT section 3.2). [B] timesteps, [B] labels -> [B, D] in ``dtype``."""

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)
        self.timestep_embedder = TimestepEmbedding(256, embedding_dim)
        self.class_embedder = LabelEmbedding(num_classes, embedding_dim)

    def forward(self, timestep: torch.Tensor, class_labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        t = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        return t + self.class_embedder(class_labels)


class AdaLayerNormZero(nn.Module):
    """adaLN-Zero (DiT section 3.2): (shift, scale, gate) x (attention, MLP) = ``linear``(SiLU(c)).chunk(6);
    returns LN(x) * (1 + scale_msa) + shift_msa and the other four, each [B, D]."""

    def __init__(self, embedding_dim: int, num_classes: int):
        super().__init__()
        self.emb = TimestepLabelEmbedding(num_classes, embedding_dim)
        self.silu = nn.SiLU()
        self.linear = nn.Linear(embedding_dim, 6 * embedding_dim)
        self.norm = nn.LayerNorm(embedding_dim, elementwise_affine=False, eps=1e-6)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        mod = self.linear(self.silu(self.emb(timestep, class_labels, x.dtype)))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        return self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None], gate_msa, shift_mlp, scale_mlp, gate_mlp


class DiTBlock(nn.Module):
    """One adaLN-Zero block: x += g1 * Attn(mod1(LN(x))); x += g2 * MLP(mod2(LN(x))). [B, N, D] -> [B, N, D].

    ``norm3`` (before the MLP) uses the config's ``norm_eps`` / ``norm_elementwise_affine``; the attention-side
    norm inside ``norm1`` is always eps 1e-6 without affine, as in diffusers.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, num_classes: int, activation_fn: str,
                 attention_bias: bool, upcast_attention: bool, norm_elementwise_affine: bool, norm_eps: float):
        super().__init__()
        self.norm1 = AdaLayerNormZero(dim, num_classes)
        self.attn1 = Attention(dim, heads=heads, dim_head=head_dim, bias=attention_bias,
                               upcast_attention=upcast_attention)
        self.norm3 = nn.LayerNorm(dim, eps=norm_eps, elementwise_affine=norm_elementwise_affine)
        self.ff = FeedForward(dim, activation_fn=activation_fn)

    def modulated_input(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """The attention's input LN(x) * (1 + scale_msa) + shift_msa: [B, N, D]."""
        return self.norm1(x, timestep, class_labels)[0]

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        h, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1(x, timestep, class_labels)
        x = x + gate_msa[:, None] * self.attn1(h)
        h = self.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return x + gate_mlp[:, None] * self.ff(h)


class DiTTransformer2DModel(BlockStack, nn.Module):
    """Class-conditional DiT over latents, diffusers' ``DiTTransformer2DModel`` config keys and parameter names.

    forward(hidden_states [B, in_channels, H, W] (H, W multiples of patch_size; any aspect ratio), timestep
    scalar / [1] / [B] (int or float), class_labels [B] int64 in [0, num_embeds_ada_norm], where
    ``num_embeds_ada_norm`` is the null class) -> [B, out_channels, H, W] in the input's dtype. With learned sigma
    (DiT-XL/2: out_channels = 2 * in_channels) the first ``in_channels`` are the noise prediction.

    ``dropout`` and ``norm_num_groups`` are accepted and ignored (inference only; unused by diffusers too).
    The block stack's extension points (:meth:`prepare`, :meth:`run_blocks`, :meth:`finish`, ...) are
    :class:`velodiff.models.dit_common.BlockStack`'s.
    """

    def __init__(self, num_attention_heads: int = 16, attention_head_dim: int = 72, in_channels: int = 4,
                 out_channels: Optional[int] = None, num_layers: int = 28, dropout: float = 0.0,
                 norm_num_groups: int = 32, attention_bias: bool = True, sample_size: int = 32, patch_size: int = 2,
                 activation_fn: str = "gelu-approximate", num_embeds_ada_norm: Optional[int] = 1000,
                 upcast_attention: bool = False, norm_type: str = "ada_norm_zero",
                 norm_elementwise_affine: bool = False, norm_eps: float = 1e-5):
        config = init_config(locals())
        super().__init__()
        self.config = config
        if norm_type != "ada_norm_zero":
            raise ValueError(f"norm_type must be 'ada_norm_zero' for DiT, got {norm_type!r}")
        if num_embeds_ada_norm is None or num_embeds_ada_norm < 1:
            raise ValueError(f"num_embeds_ada_norm (the number of classes) must be >= 1, got {num_embeds_ada_norm!r}")
        dim = num_attention_heads * attention_head_dim
        self.inner_dim = dim
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        self.pos_embed = PatchEmbed(sample_size, patch_size, in_channels, dim)
        self.transformer_blocks = nn.ModuleList([
            DiTBlock(dim, num_attention_heads, attention_head_dim, num_embeds_ada_norm, activation_fn,
                     attention_bias, upcast_attention, norm_elementwise_affine, norm_eps)
            for _ in range(num_layers)])
        self.norm_out = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.proj_out_1 = nn.Linear(dim, 2 * dim)
        self.proj_out_2 = nn.Linear(dim, patch_size * patch_size * self.out_channels)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "DiTTransformer2DModel":
        """Build from a diffusers ``transformer/config.json`` dict (also legacy ``Transformer2DModel`` ones)."""
        return build_from_config(cls, config, _LEGACY_KEYS)

    def prepare(self, hidden_states: torch.Tensor, timestep: Union[torch.Tensor, float, int],
                class_labels: torch.Tensor) -> Tuple[torch.Tensor, StackInputs]:
        """Check the arguments and embed: (tokens [B, N, D], the stack's inputs)."""
        b = hidden_states.shape[0]
        height, width = hidden_states.shape[-2] // self.patch_size, hidden_states.shape[-1] // self.patch_size
        x = self.pos_embed(hidden_states)
        t = timestep_batch(timestep, b, x.device)
        if class_labels is None:
            raise ValueError("class_labels is required (use num_embeds_ada_norm for the null class)")
        if class_labels.dtype.is_floating_point or class_labels.dtype.is_complex or class_labels.dtype == torch.bool:
            raise ValueError(f"class_labels must be an integer tensor, got {class_labels.dtype}")
        if class_labels.shape != (b,):
            raise ValueError(f"class_labels must be [{b}] (the batch), got shape {tuple(class_labels.shape)}")
        return x, StackInputs((t, class_labels), height, width)

    def finish(self, x: torch.Tensor, inputs: StackInputs) -> torch.Tensor:
        """The final layer on the stack's output tokens -> [B, out_channels, H, W]."""
        t, class_labels = inputs.block_args
        # The final layer is conditioned on the first block's embedders, as in diffusers.
        c = self.transformer_blocks[0].norm1.emb(t, class_labels, x.dtype)
        shift, scale = self.proj_out_1(F.silu(c)).chunk(2, dim=1)
        x = self.norm_out(x) * (1 + scale[:, None]) + shift[:, None]
        x = self.proj_out_2(x)
        return unpatchify(x, inputs.height, inputs.width, self.patch_size, self.out_channels)

    def forward(self, hidden_states: torch.Tensor, timestep: Union[torch.Tensor, float, int],
                class_labels: torch.Tensor) -> torch.Tensor:
        x, inputs = self.prepare(hidden_states, timestep, class_labels)
        return self.finish(self.run_stack(x, inputs), inputs)
