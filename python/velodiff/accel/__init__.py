"""Techniques applied to a pipeline with ``velodiff.optimize(pipe, *configs)`` and undone with
``velodiff.restore(pipe)``. Each is a config object whose ``apply(pipe)`` changes the pipeline and returns a
function that undoes exactly that change (torchao's verb-plus-config shape)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional

from torch import nn

from velodiff.models.attention import BACKENDS, Attention


@dataclass(frozen=True)
class AttentionBackend:
    """Route the attention layers of every model of the pipeline (or those whose qualified name contains
    ``only``) to the named backend of :mod:`velodiff.models.attention`."""

    name: str
    only: Optional[str] = None

    def apply(self, pipe) -> Callable[[], None]:
        if self.name not in BACKENDS:
            raise ValueError(f"unknown attention backend {self.name!r}; registered: {', '.join(sorted(BACKENDS))}")
        previous: Dict[Attention, str] = {}
        for component in vars(pipe).values():
            if not isinstance(component, nn.Module):
                continue
            for qualified, module in component.named_modules():
                if isinstance(module, Attention) and (self.only is None or self.only in qualified):
                    previous[module] = module.backend
                    module.backend = self.name

        def undo() -> None:
            for module, backend in previous.items():
                module.backend = backend
        return undo


@dataclass(frozen=True)
class CPUConvPrepack:
    """CPU inference speed-up for conv models (UNet, VAE): channels-last layout plus oneDNN weights packed once
    (:mod:`velodiff.models.conv_prepack`). SD 1.5 UNet at 512x512 on 2 EPYC threads: 1.15x diffusers, output
    within 3e-6 relative. Uses torch's private oneDNN ops; ``apply`` raises when the build lacks them."""

    components: tuple = ("unet", "vae")

    def apply(self, pipe) -> Callable[[], None]:
        from velodiff.models.conv_prepack import prepack_convs, unprepack_convs
        import torch
        changed = []
        for name in self.components:
            module = getattr(pipe, name, None)
            if isinstance(module, nn.Module):
                module.to(memory_format=torch.channels_last)
                prepack_convs(module)
                changed.append(module)

        def undo() -> None:
            for module in changed:
                unprepack_convs(module)
                module.to(memory_format=torch.contiguous_format)
        return undo


def optimize(pipe, *configs):
    """Apply each config to ``pipe`` in order; returns ``pipe``. Undo all of them with :func:`restore`."""
    for config in configs:
        if not hasattr(config, "apply"):
            raise TypeError(f"{type(config).__name__} is not a velodiff technique config (it has no apply())")
        pipe._restore_hooks.append(config.apply(pipe))
    return pipe


def restore(pipe):
    """Undo every technique applied with :func:`optimize`, newest first; returns ``pipe``."""
    while pipe._restore_hooks:
        pipe._restore_hooks.pop()()
    return pipe
