"""Typed wrapper of ``velodiff::linear_attention``: non-causal linear attention (LinFusion's generalized linear
attention, SANA's ReLU linear attention) in two passes over an fp32 key-value state, with torch SDPA's layout and
any strides.

Semantics: csrc/include/velodiff/linear_attention.h; :func:`velodiff.ops.reference.linear_attention` is the float64
specification. Its cost grows linearly with the token count (per head about 2 (Nk + Nq) D (Dv + 1) multiply-adds,
against 2 Nq Nk (D + Dv) for softmax attention).
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from velodiff.ops._checks import qkv_unsupported
from velodiff.ops._native import native_op

LINEAR_ATTENTION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LINEAR_ATTENTION_KINDS = ("linfusion", "relu")
DEFAULT_EPS = {"linfusion": 1e-4, "relu": 1e-8}  # kLinFusionDefaultEps / kReluDefaultEps in linear_attention_args.h
MAX_HEAD_DIM = 512  # kLinearAttentionMaxHeadDim in csrc/include/velodiff/linear_attention.h
_FLOAT32_MAX = 3.4028234663852886e38


def linear_attention_unsupported(q, k, v, kind="linfusion", eps=None) -> Optional[tuple]:
    """``None`` when the op takes these arguments, else ``(exception class, message naming the argument)``."""
    basic = qkv_unsupported(q, k, v, LINEAR_ATTENTION_DTYPES, ("[B, H, Nq, D]", "[B, H, Nk, D]", "[B, H, Nk, Dv]"))
    if basic is not None:
        return basic
    b, h, nq, d = q.shape
    if not 1 <= d <= MAX_HEAD_DIM:
        return ValueError, f"q's head dim {d} is not supported: the kernel takes any head dim from 1 to {MAX_HEAD_DIM}"
    if nq < 1:
        return ValueError, f"q must have at least one query (Nq >= 1), got shape {list(q.shape)}"
    if (k.shape[0], k.shape[1], k.shape[3]) != (b, h, d):
        return ValueError, f"k must be [B, H, Nk, D] = [{b}, {h}, Nk, {d}] (q's batch, heads and head dim), " \
                           f"got {list(k.shape)}"
    nk = k.shape[2]
    if nk < 1:
        return ValueError, f"k must have at least one key (Nk >= 1), got shape {list(k.shape)}"
    if tuple(v.shape[:3]) != (b, h, nk):
        return ValueError, f"v must be [B, H, Nk, Dv] = [{b}, {h}, {nk}, Dv] (k's batch, heads and keys), " \
                           f"got {list(v.shape)}"
    if not 1 <= v.shape[3] <= MAX_HEAD_DIM:
        return ValueError, f"v's head dim {v.shape[3]} is not supported: the kernel takes any head dim from 1 to " \
                           f"{MAX_HEAD_DIM}"
    if not isinstance(kind, str) or kind not in LINEAR_ATTENTION_KINDS:
        return ValueError, f"kind must be 'linfusion' or 'relu', got {kind!r}"
    if eps is not None:
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) \
                or not 0 < eps < _FLOAT32_MAX or float(torch.tensor(eps, dtype=torch.float32)) == 0.0 \
                or (kind == "linfusion" and not eps * nk < _FLOAT32_MAX):
            return ValueError, f"eps must be a finite number > 0 (in float32 range, Nk * eps too for 'linfusion') " \
                               f"or None, got {eps!r}"
    return None


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, kind: str = "linfusion",
                     eps: Optional[float] = None) -> torch.Tensor:
    """Non-causal linear attention per batch and head: ``out_i = phi(q_i) S / (phi(q_i) . z + eps)``.

    kind "linfusion" (LinFusion, arXiv 2409.02097, ``GeneralizedLinearAttention``): phi(u) = elu(u) + 1,
    S = sum_j phi(k_j) v_j^T / Nk and z = mean_j phi(k_j) (eps is added to the mean-normalised denominator, as
    LinFusion does; its self-attention has Nq = Nk). Default eps 1e-4.
    kind "relu" (SANA's ``LiteLA``, arXiv 2410.10629): phi(u) = max(u, 0), S = sum_j phi(k_j) v_j^T and
    z = sum_j phi(k_j). Default eps 1e-8, the value SANA's ``SanaMSBlock`` passes to ``LiteLA``; ``LiteLA``'s own
    default and diffusers' ``SanaLinearAttnProcessor2_0`` use 1e-15 (pass ``eps=1e-15`` to match those).
    No 1/sqrt(D) scale, no mask.

    Args:
        q: [B, H, Nq, D] float32 | float16 | bfloat16, any strides (e.g. ``x.view(B, N, H, D).transpose(1, 2)``:
            read through its strides, not copied). 1 <= D <= 512, Nq >= 1.
        k: [B, H, Nk, D], q's dtype, any strides; Nk >= 1 (Nk != Nq is allowed).
        v: [B, H, Nk, Dv], q's dtype, any strides; 1 <= Dv <= 512.
        kind: "linfusion" or "relu" (keyword only).
        eps: a finite number > 0, or None for the kind's default (keyword only).
    Returns:
        [B, H, Nq, Dv] in q's dtype on q's device, stored as [B, Nq, H, Dv] (so ``out.transpose(1, 2)`` is
        contiguous). The state S and z are accumulated in float32 for every input dtype (an fp16 state would
        overflow at |v| ~ 1e3 and 16k tokens), and the output is rounded once to q's dtype.
    """
    problem = linear_attention_unsupported(q, k, v, kind, eps)
    if problem is not None:
        raise problem[0](problem[1])
    return native_op("linear_attention")(q, k, v, kind, None if eps is None else float(eps))
