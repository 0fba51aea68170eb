"""The pickle rule: .ckpt / .bin / .pt / .pth files are refused unless the caller opts in.

Unpickling can run arbitrary code, so velodiff reads pickled checkpoints only when the loading call says
``allow_pickle=True``, and then through ``torch.load(weights_only=True)``, which refuses anything but
tensors and plain containers.
"""
from __future__ import annotations

import os
from typing import Dict, Optional, Union

import torch

from velodiff.loading.errors import CheckpointError
from velodiff.loading.safetensors_io import read_safetensors

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
SAFETENSORS_SUFFIXES = (".safetensors", ".sft")


def is_pickle_path(path) -> bool:
    """True if ``path`` has a pickled-checkpoint suffix (.ckpt, .bin, .pt, .pth)."""
    return os.fspath(path).lower().endswith(PICKLE_SUFFIXES)


def refuse_pickle(path) -> None:
    """Raise :class:`CheckpointError` explaining why ``path`` (a pickled checkpoint) is not read by default."""
    path = os.fspath(path)
    raise CheckpointError(
        f"{path!r} is a pickled checkpoint: unpickling can run arbitrary code, so velodiff does not read it "
        "by default. Prefer a .safetensors file (`velodiff convert` can write one). If you trust this file, "
        "pass allow_pickle=True to the loading call; it is then read with torch.load(weights_only=True), "
        "which accepts only tensors and plain containers.")


def _unwrap(obj, path: str) -> Dict[str, torch.Tensor]:
    # original LDM/SGM .ckpt files wrap the weights: {"state_dict": {...}, "global_step": ...}
    while isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path!r}: expected a dict of tensors, found {type(obj).__name__}")
    out = {}
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out[str(k)] = v
    if not out:
        raise CheckpointError(f"{path!r}: holds no tensors")
    return out


def read_pickle_checkpoint(path, *, dtype: Optional[torch.dtype] = None,
                           device: Union[str, torch.device] = "cpu") -> Dict[str, torch.Tensor]:
    """Read a pickled checkpoint with ``torch.load(weights_only=True)`` (the caller has opted in).

    Non-tensor entries (step counters, ...) are dropped; floating tensors are cast to ``dtype``.
    """
    path = os.fspath(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # old (non-zip) serialization cannot be memory-mapped
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{path!r}: cannot be read with torch.load(weights_only=True): {e}") from e
    except Exception as e:
        raise CheckpointError(f"{path!r}: cannot be read with torch.load(weights_only=True): {e}") from e
    sd = _unwrap(obj, path)
    out = {}
    for k in list(sd):
        t = sd.pop(k)
        target = dtype if (dtype is not None and t.is_floating_point()) else t.dtype
        out[k] = t.to(device=device, dtype=target)
    return out


def read_checkpoint(path, *, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                    allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """Read any single checkpoint file: safetensors always, pickled formats only with ``allow_pickle=True``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path!r}: no such file")
    if is_pickle_path(path):
        if not allow_pickle:
            refuse_pickle(path)
        return read_pickle_checkpoint(path, dtype=dtype, device=device)
    return read_safetensors(path, dtype=dtype, device=device)
