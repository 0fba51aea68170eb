"""Argument checks shared by the op wrappers: every message names the argument."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, t, dtypes: Sequence[torch.dtype], shape: Optional[Tuple[int, ...]], device,
                  optional: bool = False) -> None:
    """``t`` must be a contiguous tensor with a dtype in ``dtypes``, shape ``shape`` (None: not checked) on
    ``device`` (None: not checked); None is accepted when ``optional``."""
    if t is None and optional:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, got {type(t).__name__}")
    if t.dtype not in dtypes:
        raise TypeError(f"{name} must be {dtype_names(dtypes)}, got {t.dtype}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(t.shape)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but must be on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous())")
