"""Argument checks shared by the op wrappers: every message names the argument."""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch


def dtype_names(dtypes: Sequence[torch.dtype]) -> str:
    return " or ".join(str(d).replace("torch.", "") for d in dtypes)


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
