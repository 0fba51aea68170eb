"""Giving a module of one library the tensors of another's (no copy), and where a set of modules lives.

velodiff's models use diffusers' parameter names and its CLIP text encoders transformers' (up to the
``text_model.`` prefix), so a model of the other library is built on the meta device and takes the source's
tensors with ``load_state_dict(strict=True, assign=True)``: both then hold the same storage (``data_ptr()``
equal), dtype and device.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

from velodiff.loading.errors import CheckpointError
from velodiff.loading.state_dict import load_state_dict_into

#: the dtypes velodiff's pipelines run in
PIPELINE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unwrap(module):
    """The module under a ``torch.compile`` wrapper (``_orig_mod``), else ``module`` itself."""
    return getattr(module, "_orig_mod", module)


def placement(module: nn.Module, name: str) -> Tuple[torch.dtype, torch.device]:
    """(dtype, device) of ``module``'s first floating-point parameter; ValueError naming ``name`` when it has none
    or its parameters are on the meta device (weights not loaded, e.g. an offloaded model)."""
    for p in module.parameters():
        if p.is_floating_point():
            if p.device.type == "meta":
                raise ValueError(f"{name}: its weights are on the meta device (not loaded, or offloaded by "
                                 "accelerate); load it onto a real device first")
            return p.dtype, p.device
    raise ValueError(f"{name}: {type(module).__name__} has no floating-point parameters")


def check_devices(modules: Mapping[str, Optional[nn.Module]], device: torch.device, denoiser: str) -> None:
    """Every module of ``modules`` on ``device`` (where ``denoiser`` is): a velodiff pipeline runs on one device.
    ValueError naming the component otherwise."""
    for name, module in modules.items():
        if isinstance(module, nn.Module):
            _, where = placement(module, name)
            if where != device:
                raise ValueError(f"{name} is on {where} but {denoiser} on {device}; move the whole pipeline to one "
                                 "device first (pipe.to(device))")


def _fill_meta_buffers(module: nn.Module, device: torch.device) -> None:
    """Non-persistent buffers left on the meta device (not in a state dict) made real: transformers' CLIP
    ``position_ids`` ([1, L] arange); any other one is a TypeError naming it."""
    for owner_name, owner in module.named_modules():
        for key, buf in list(owner._buffers.items()):
            if buf is None or buf.device.type != "meta":
                continue
            if key == "position_ids":
                owner._buffers[key] = torch.arange(buf.shape[-1], device=device).expand(buf.shape)
            else:
                raise TypeError(f"{type(module).__name__}: buffer {owner_name + '.' if owner_name else ''}{key} is "
                                "not part of the state dict, so it cannot be shared")


def take_tensors(target: nn.Module, state: Dict[str, torch.Tensor], *, source: str,
                 device: torch.device) -> nn.Module:
    """``target`` (built on the meta device) given ``state``'s tensors themselves (strict: every key, no other;
    shapes equal), in eval mode without gradients. TypeError naming ``source`` and the keys when they differ (a
    model changed by LoRA branches or quantization no longer maps onto the other library's class)."""
    try:
        load_state_dict_into(target, state, source=source, strict=True, assign=True)
    except (CheckpointError, RuntimeError) as e:
        raise TypeError(f"{source} does not map onto {type(target).__name__} ({e}); only plain models map (unload "
                        "or fuse LoRAs, and do not quantize, before converting)") from None
    _fill_meta_buffers(target, device)
    return target.eval().requires_grad_(False)
