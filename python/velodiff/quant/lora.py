"""LoRA on a quantized denoiser without re-quantization: each adapter's factors are appended to the rank axis of
the layers' low-rank branch (:meth:`QuantizedLinear.add_lora`), with a per-adapter strength; removing the adapter
restores the layers bit for bit.

State-dict keys understood (``prefix`` such as ``unet.`` is stripped):
    <module>.lora_A.weight [r, K] / <module>.lora_B.weight [N, r]                 (peft, diffusers >= 0.22)
    <module>.lora_down.weight / <module>.lora_up.weight  (+ optional <module>.alpha)  (older diffusers / kohya-style
    names on diffusers module paths)
The effective update is strength * (alpha / r) * B A, alpha defaulting to r.
"""
from __future__ import annotations

from typing import Dict, Mapping, Tuple

import torch
from torch import nn

from velodiff.quant.linear import QuantizedLinear

_PAIRS = ((".lora_A.weight", ".lora_B.weight"), (".lora_down.weight", ".lora_up.weight"))


def _factors(state: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, Tuple[torch.Tensor, torch.Tensor, float]]:
    out: Dict[str, Tuple[torch.Tensor, torch.Tensor, float]] = {}
    used = set()
    for key in state:
        for down_suffix, up_suffix in _PAIRS:
            if key.endswith(down_suffix):
                module = key[: -len(down_suffix)]
                up_key = module + up_suffix
                if up_key not in state:
                    raise KeyError(f"LoRA key {key!r} has no matching {up_key!r}")
                down, up = state[key], state[up_key]
                alpha_key = module + ".alpha"
                r = down.shape[0]
                alpha = float(state[alpha_key]) if alpha_key in state else float(r)
                name = module[len(prefix):] if prefix and module.startswith(prefix) else module
                out[name] = (down, up, alpha / r)
                used.update({key, up_key, alpha_key})
    unknown = [k for k in state if k not in used]
    if unknown:
        raise KeyError(f"unrecognised LoRA keys (expected *.lora_A/.lora_B or *.lora_down/.lora_up weights): "
                       f"{unknown[:5]}")
    if not out:
        raise KeyError("the state dict holds no LoRA factors")
    return out


def add_lora(model: nn.Module, state: Mapping[str, torch.Tensor], name: str, strength: float = 1.0,
             prefix: str = "") -> int:
    """Attach the LoRA ``state`` to the quantized layers of ``model`` under ``name``; returns the number of layers.
    Every targeted module must be a :class:`QuantizedLinear` (an error lists the others)."""
    factors = _factors(state, prefix)
    targets = {}
    missing, not_quantized = [], []
    for module_name in factors:
        try:
            m = model.get_submodule(module_name)
        except AttributeError:
            missing.append(module_name)
            continue
        if not isinstance(m, QuantizedLinear):
            not_quantized.append(module_name)
        targets[module_name] = m
    if missing:
        raise KeyError(f"LoRA {name!r} targets modules that {type(model).__name__} lacks: {missing[:5]} (wrong "
                       f"prefix? pass prefix='unet.' or similar)")
    if not_quantized:
        raise ValueError(f"LoRA {name!r} targets layers that are not quantized: {not_quantized[:5]}; quantize them "
                         "too (QuantConfig(include=...)) or merge the LoRA before quantizing")
    done = []
    try:
        for module_name, (down, up, scale) in factors.items():
            targets[module_name].add_lora(name, down, up, strength, scale=scale)
            done.append(module_name)
    except Exception:
        for module_name in done:
            targets[module_name].remove_lora(name)
        raise
    return len(done)


def _carrying(model: nn.Module, name: str):
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear) and name in m.loras]
    if not layers:
        raise KeyError(f"no layer carries a LoRA named {name!r}")
    return layers


def set_lora_strength(model: nn.Module, name: str, strength: float) -> None:
    """Change the strength of LoRA ``name`` on every layer that carries it (keeps its alpha / r factor)."""
    for m in _carrying(model, name):
        m.set_lora_strength(name, strength)


def remove_lora(model: nn.Module, name: str) -> int:
    """Remove LoRA ``name`` from every layer; returns the number of layers it was on."""
    layers = _carrying(model, name)
    for m in layers:
        m.remove_lora(name)
    return len(layers)
