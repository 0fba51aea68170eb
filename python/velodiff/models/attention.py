"""Attention: one module (diffusers' parameter names) over one backend interface.

Every attention layer of every model calls :func:`attention` with its own ``backend`` name, so faster
backends (linear attention, windowed attention, ...) plug in per layer without touching the models. A backend
declares what it supports; the dispatcher's error says why a backend refused an input (xformers' style).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class AttentionBackend:
    """``fn(q, k, v, mask, scale) -> out`` with q [B, H, Lq, D], k/v [B, H, Lk, D] (Dv may differ), mask
    broadcastable to [B, H, Lq, Lk] (bool: True = keep; float: added) or None. ``why_not(q, k, v, mask)`` returns
    None when the backend supports the input, else a short reason."""

    name: str
    fn: Callable[..., torch.Tensor]
    why_not: Callable[..., Optional[str]] = lambda q, k, v, mask: None
    description: str = ""


BACKENDS: Dict[str, AttentionBackend] = {}


def register_backend(backend: AttentionBackend) -> AttentionBackend:
    if backend.name in BACKENDS:
        raise ValueError(f"attention backend {backend.name!r} is already registered")
    BACKENDS[backend.name] = backend
    return backend


def _sdpa(q, k, v, mask, scale):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


def _math(q, k, v, mask, scale):
    """Plain softmax(q k^T * scale) v, accumulated in fp32: the reference every backend is tested against."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.float()
    return torch.matmul(logits.softmax(dim=-1), v.float()).to(dtype)


# An additive bias at or below this is a dropped key: exp(-1e4) is 0 in every float format (diffusers and our
# PixArt give padded text tokens -10000).
_DROP_BIAS = -1e4


def _key_padding_mask(mask: Optional[torch.Tensor], batch: int, kv_len: int):
    """``(key_padding_mask [B, Lk] bool or None, None)`` for a mask the ``velodiff`` op takes, else ``(None,
    reason)``. Taken: a mask that varies only over batch and keys ([B, Lk], [B, 1, 1, Lk], batch or keys of size 1
    broadcast), either bool (True = keep) or an additive bias whose every value is 0 (keep) or <= -1e4 (drop;
    reading it as a drop changes nothing, exp(-1e4) being 0, except for a query whose every key is dropped: the op
    gives zeros, an additive -1e4 the mean of all values). Checking a bias's values reads it on the host."""
    if mask is None:
        return None, None
    shape = tuple(mask.shape)
    if mask.dim() == 4 and shape[1:3] == (1, 1) and shape[0] in (1, batch) and shape[3] in (1, kv_len):
        mask = mask[:, 0, 0, :]
    elif not (mask.dim() == 2 and shape[0] in (1, batch) and shape[1] in (1, kv_len)):
        return None, f"a mask of shape {list(shape)} is not a key-padding mask ([B, Lk] or [B, 1, 1, Lk] = " \
                     f"[{batch}, 1, 1, {kv_len}]); it varies over heads or queries"
    if mask.dtype != torch.bool:
        if not mask.is_floating_point() or not bool(((mask == 0) | (mask <= _DROP_BIAS)).all()):
            return None, f"a {mask.dtype} mask with values other than 0 (keep) and <= -1e4 (drop) is an additive " \
                         f"bias, not a key-padding mask"
        mask = mask == 0
    return mask.expand(batch, kv_len), None


def _velodiff(q, k, v, mask, scale):
    from velodiff.ops.attention import attention as velodiff_attention
    key_padding_mask, _ = _key_padding_mask(mask, q.shape[0], k.shape[2])
    return velodiff_attention(q, k, v, key_padding_mask, scale)


def _velodiff_why_not(q, k, v, mask) -> Optional[str]:
    from velodiff.ops.attention import attention_unsupported
    problem = attention_unsupported(q, k, v)
    if problem is not None:
        return problem[1]
    return _key_padding_mask(mask, q.shape[0], k.shape[2])[1]


register_backend(AttentionBackend("sdpa", _sdpa, description="torch.nn.functional.scaled_dot_product_attention"))
register_backend(AttentionBackend("math", _math, description="reference softmax attention in fp32"))
register_backend(AttentionBackend(
    "velodiff", _velodiff, _velodiff_why_not,
    description="velodiff::attention: exact flash-style attention, head dims 1..512 natively, bool key-padding "
                "masks (a fully masked query gives zeros)"))


def _fp8(q, k, v, mask, scale):
    """velodiff::fp8_attention where the op takes the input (a key-padding mask or none), else its reference."""
    from velodiff.ops._native import native_available
    from velodiff.ops.attention import attention_unsupported
    key_padding_mask, problem = _key_padding_mask(mask, q.shape[0], k.shape[2])
    if problem is None and attention_unsupported(q, k, v) is None and native_available():
        from velodiff.ops.fp8 import fp8_attention
        return fp8_attention(q, k, v, key_padding_mask, scale)
    from velodiff.ops.reference import fp8_attention
    return fp8_attention(q, k, v, mask, scale)


register_backend(AttentionBackend(
    "fp8", _fp8,
    description="FP8 attention: Q, K per token, P (scale 1/448, before normalisation) and V per channel in e4m3, "
                "fp32 accumulation (velodiff::fp8_attention; other masks: velodiff.ops.reference.fp8_attention)"))


def auto_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor]) -> str:
    """The backend ``"auto"`` runs: ``"velodiff"`` for CPU inputs that it takes (fp32 / fp16 / bf16, no mask or a
    bool key-padding mask) and that need no gradient (the op has no autograd), else ``"sdpa"``. On this project's
    CPU the op is 0.95-1.9x SDPA at the SD 1.5 / SDXL / PixArt shapes, 1.2x at SD 1.5's 4096-token self-attention
    (bench/results/attention_cpu.md); on CUDA SDPA stays until the GPU benchmark has run."""
    if q.device.type != "cpu" or (mask is not None and mask.dtype != torch.bool):
        return "sdpa"
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return "sdpa"
    return "velodiff" if _velodiff_why_not(q, k, v, mask) is None else "sdpa"


def _auto(q, k, v, mask, scale):
    return BACKENDS[auto_backend(q, k, v, mask)].fn(q, k, v, mask, scale)


register_backend(AttentionBackend("auto", _auto, description="velodiff on the CPU where it applies, else sdpa"))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None, backend: str = "auto") -> torch.Tensor:
    """Multi-head attention. q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] -> [B, H, Lq, Dv]. ``backend``: a
    registered name, or ``"auto"`` (the default; :func:`auto_backend`)."""
    try:
        impl = BACKENDS[backend]
    except KeyError:
        raise ValueError(f"unknown attention backend {backend!r}; registered: auto, {', '.join(sorted(BACKENDS))}") \
            from None
    reason = impl.why_not(q, k, v, mask)
    if reason is not None:
        usable = [n for n, b in BACKENDS.items() if b.why_not(q, k, v, mask) is None]
        raise ValueError(f"attention backend {backend!r} does not support this input: {reason} "
                         f"(backends that do: {', '.join(usable) or 'none'})")
    return impl.fn(q, k, v, mask, scale)


class Attention(nn.Module):
    """Self- or cross-attention with diffusers' ``Attention`` parameter names.

    Parameters: ``to_q``, ``to_k``, ``to_v`` (Linear), ``to_out.0`` (Linear), optional ``group_norm`` (VAE
    mid-block) and ``norm_q`` / ``norm_k`` (qk-norm). Input [B, L, C] (or [B, C, H, W] with ``group_norm`` /
    spatial input, as the VAE uses), optional ``encoder_hidden_states`` [B, Lk, Ck] for cross-attention.
    ``upcast_attention`` computes the attention in fp32 (SD 2.1). ``backend`` selects the kernel per layer.
    """

    def __init__(self, query_dim: int, cross_attention_dim: Optional[int] = None, heads: int = 8,
                 dim_head: int = 64, bias: bool = False, out_bias: bool = True, upcast_attention: bool = False,
                 norm_num_groups: Optional[int] = None, eps: float = 1e-5, residual_connection: bool = False,
                 rescale_output_factor: float = 1.0, qk_norm: Optional[str] = None, out_dim: Optional[int] = None):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.dim_head = dim_head
        self.is_cross_attention = cross_attention_dim is not None
        kv_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.upcast_attention = upcast_attention
        self.residual_connection = residual_connection
        self.rescale_output_factor = rescale_output_factor
        self.backend = "auto"
        self.group_norm = (nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True)
                           if norm_num_groups is not None else None)
        if qk_norm is None:
            self.norm_q = self.norm_k = None
        elif qk_norm == "layer_norm":
            self.norm_q = nn.LayerNorm(dim_head, eps=eps)
            self.norm_k = nn.LayerNorm(dim_head, eps=eps)
        elif qk_norm == "rms_norm":
            self.norm_q = nn.RMSNorm(dim_head, eps=eps)
            self.norm_k = nn.RMSNorm(dim_head, eps=eps)
        else:
            raise ValueError(f"qk_norm must be None, 'layer_norm' or 'rms_norm', got {qk_norm!r}")
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(kv_dim, inner, bias=bias)
        self.to_v = nn.Linear(kv_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, out_dim or query_dim, bias=out_bias), nn.Dropout(0.0)])

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, self.dim_head).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = hidden_states
        spatial = hidden_states.dim() == 4
        if spatial:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if self.group_norm is not None:
            hidden_states = self.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q = self._heads(self.to_q(hidden_states))
        k = self._heads(self.to_k(context))
        v = self._heads(self.to_v(context))
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        mask = attention_mask
        if mask is not None and mask.dim() == 2:  # [B, Lk] keep-mask (e.g. T5 padding) -> broadcast
            mask = mask[:, None, None, :].bool() if mask.dtype != torch.bool else mask[:, None, None, :]
        if self.upcast_attention and q.dtype in (torch.float16, torch.bfloat16):
            out = attention(q.float(), k.float(), v.float(), mask=mask, backend=self.backend).to(q.dtype)
        else:
            out = attention(q, k, v, mask=mask, backend=self.backend)
        out = out.transpose(1, 2).reshape(out.shape[0], -1, self.heads * self.dim_head)
        out = self.to_out[1](self.to_out[0](out))
        if spatial:
            out = out.transpose(1, 2).reshape(b, c, h, w)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor if self.rescale_output_factor != 1.0 else out


def set_attention_backend(model: nn.Module, backend: str,
                          where: Optional[Callable[[str, Attention], bool]] = None) -> int:
    """Select ``backend`` for every :class:`Attention` in ``model`` (or those where ``where(name, module)``);
    returns how many layers changed."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; registered: {', '.join(sorted(BACKENDS))}")
    n = 0
    for name, module in model.named_modules():
        if isinstance(module, Attention) and (where is None or where(name, module)):
            module.backend = backend
            n += 1
    return n
