"""LoRA on a quantized model without re-quantization: each adapter's factors are appended to the rank axis of the
layers' low-rank branch (:meth:`QuantizedLinear.add_lora`), with a per-adapter strength; removing the adapter
restores the layers bit for bit. The keys are those :mod:`velodiff.lora.formats` reads (diffusers / PEFT, kohya);
the effective update is strength * (alpha / r) * B A, alpha defaulting to r. On a pipeline, ``pipe.load_lora``
(:mod:`velodiff.lora`) covers plain and quantized layers alike.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from velodiff.lora.formats import parse_lora
from velodiff.quant.linear import QuantizedLinear


def add_lora(model: nn.Module, state: Mapping[str, torch.Tensor], name: str, strength: float = 1.0,
             prefix: str = "") -> int:
    """Attach the LoRA ``state`` to the quantized layers of ``model`` under ``name``; returns the number of layers.
    Keys are read by :func:`velodiff.lora.formats.parse_lora` after ``prefix`` is stripped (keys that match no
    module raise :class:`~velodiff.lora.formats.LoraFormatError`: a wrong ``prefix``?). Every targeted module must be
    a :class:`QuantizedLinear` (an error lists the others). Pipelines: ``pipe.load_lora`` does this and more."""
    stripped = {k[len(prefix):] if prefix and k.startswith(prefix) else k: v for k, v in state.items()}
    factors = {module: (f.down.reshape(f.rank, -1), f.up.reshape(f.up.shape[0], f.rank), f.factor)
               for (_, module), f in parse_lora(stripped, {"model": model}, "model").items()}
    targets = {module_name: model.get_submodule(module_name) for module_name in factors}
    not_quantized = [n for n, m in targets.items() if not isinstance(m, QuantizedLinear)]
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
