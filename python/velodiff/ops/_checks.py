"""Argument checks shared by the op wrappers: every message names the argument."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def qkv_unsupported(q, k, v, dtypes: Sequence[torch.dtype], dims: Sequence[str]) -> Optional[tuple]:
    """The checks every attention op starts with: q, k, v tensors of one dtype out of ``dtypes``, each 4-D (its
    layout, e.g. ``"[B, H, Lq, D]"``, from ``dims`` for the message) and on q's device. None when they pass, else
    ``(exception class, message naming the argument)``."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}"
    if q.dtype not in dtypes:
        return TypeError, f"q must be {dtype_names(dtypes)}, got {q.dtype}"
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            return TypeError, f"{name} must have q's dtype {q.dtype}, got {t.dtype} (q, k and v: one dtype)"
    for name, t, layout in zip(("q", "k", "v"), (q, k, v), dims):
        if t.dim() != 4:
            return ValueError, f"{name} must be {layout}, got shape {list(t.shape)}"
        if t.device != q.device:
            return ValueError, f"{name} is on {t.device} but q is on {q.device}"
    return None


def check_tensor(name: str, t, dtypes: Sequence[torch.dtype], shape: Optional[Tuple[int, ...]], device,
                 optional: bool = False, like: Optional[str] = None) -> None:
    """``t`` must be a contiguous tensor with a dtype in ``dtypes``, shape ``shape`` (None: not checked) on
    ``device`` (None: not checked); None is accepted when ``optional``. ``like``: the name of the argument that
    ``shape`` and ``device`` come from, so the messages say "the shape of x" / "x is on ..."."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_names(dtypes)}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        what = f"the shape of {like} {tuple(shape)}" if like else f"shape {list(shape)}"
        raise ValueError(f"{name} must have {what}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but {f'{like} is on' if like else 'must be on'} {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")


def check_rows(name: str, t, dtypes: Sequence[torch.dtype]) -> None:
    """``t`` must be a contiguous 2-D [M, K] tensor of a dtype in ``dtypes`` (the activations a quantizer takes)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_names(dtypes)}, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D [M, K] (flatten leading dimensions), got shape {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")
