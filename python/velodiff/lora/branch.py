"""The LoRA branch of one layer: every adapter's factors side by side on one padded rank axis, so that loading,
unloading and re-weighting adapters (hot swap) changes no tensor shape while they fit the capacity (a multiple of
:data:`RANK_BLOCK` ranks, at least the ``capacity`` asked for at load: the largest total rank a swap will need):
nothing recompiles under torch.compile or a captured CUDA graph. The padding costs branch compute in proportion.

For a plain ``nn.Linear`` / ``nn.Conv2d`` (and velodiff's FP8 / low-bit linear layers) the branch is a forward hook
that adds ``up(scales * down(x))`` to the layer's output (for a convolution: ``down`` a convolution of the layer's
geometry, ``up`` a 1x1 one: LyCORIS LoCon), computed in the input's dtype; the module, its parameters and its
state-dict names stay as they are. A quantized :class:`~velodiff.quant.linear.QuantizedLinear` (or convolution)
carries its adapters on the low-rank branch that its GEMM already fuses (:meth:`QuantizedLinear.add_lora`).

Buffers of a plain layer's branch (C = capacity, T = the layer's dtype):
    down    T [C, K] (linear) or [C, Cin, kh, kw] (convolution), rows past the adapters zero
    up      T [N, C] or [Cout, C, 1, 1]
    scales  float32 [C]: strength * alpha / r for each adapter's ranks, 0 elsewhere
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from velodiff.lora.formats import LoraFactors

#: the rank axis grows in blocks of this many ranks (a swap between adapters whose ranks fit needs no new shapes)
RANK_BLOCK = 8


class LoraBranch:
    """The adapters of one plain layer (see the module docstring); attached as ``layer._velodiff_lora``."""

    def __init__(self, layer: nn.Module):
        self.layer = layer
        self.conv = isinstance(layer, nn.Conv2d)
        self.down: Optional[torch.Tensor] = None
        self.up: Optional[torch.Tensor] = None
        self.scales: Optional[torch.Tensor] = None
        #: adapter name -> (first rank, rank, alpha / r)
        self.adapters: Dict[str, Tuple[int, int, float]] = {}
        self.fused_weight: Optional[torch.Tensor] = None  # the layer's own weight while the adapters are fused
        self.handle = layer.register_forward_hook(self._hook)

    @property
    def used(self) -> int:
        return sum(r for _, r, _ in self.adapters.values())

    @property
    def capacity(self) -> int:
        return 0 if self.scales is None else self.scales.shape[0]

    def _weight(self) -> torch.Tensor:
        w = getattr(self.layer, "weight", None)
        if w is None:  # velodiff's FP8 / low-bit layers: codes and scales, the bias gives the dtype
            return torch.empty(0, dtype=self.layer.dtype, device=self.layer.wscales.device)
        return w

    def _grow(self, capacity: int, down: torch.Tensor, up: torch.Tensor) -> None:
        w = self._weight()
        kwargs = dict(dtype=w.dtype, device=w.device)
        new_down = torch.zeros(capacity, *down.shape[1:], **kwargs)
        new_up = torch.zeros(up.shape[0], capacity, *up.shape[2:], **kwargs)
        new_scales = torch.zeros(capacity, dtype=torch.float32, device=w.device)
        if self.scales is not None:
            c = self.capacity
            new_down[:c], new_up[:, :c], new_scales[:c] = self.down, self.up, self.scales
        self.down, self.up, self.scales = new_down, new_up, new_scales

    def add(self, name: str, f: LoraFactors, strength: float, capacity: int = 0) -> None:
        if name in self.adapters:
            raise ValueError(f"a LoRA named {name!r} is already on this layer; unload it first")
        self._check_unfused()
        down = f.down if self.conv else f.down.reshape(f.rank, -1)
        up = f.up.reshape(f.up.shape[0], f.rank, *((1, 1) if self.conv else ()))
        start = self.used
        need = max(start + f.rank, capacity)
        if need > self.capacity:
            self._grow(-(-need // RANK_BLOCK) * RANK_BLOCK, down, up)
        with torch.no_grad():
            self.down[start:start + f.rank] = down.to(self.down.dtype)
            self.up[:, start:start + f.rank] = up.to(self.up.dtype)
            self.scales[start:start + f.rank] = float(strength) * f.factor
        self.adapters[name] = (start, f.rank, f.factor)

    def set_strength(self, name: str, strength: float) -> None:
        start, r, factor = self.adapters[name]
        self._check_unfused()
        self.scales[start:start + r] = float(strength) * factor

    def strength(self, name: str) -> float:
        start, _, factor = self.adapters[name]
        return float(self.scales[start]) / factor if factor else 0.0

    def remove(self, name: str) -> None:
        """Drop an adapter; the later ones move down in place (the same shapes), the freed ranks become zero."""
        self._check_unfused()
        start, r, _ = self.adapters.pop(name)
        end = self.used + r
        with torch.no_grad():
            for t, dim in ((self.down, 0), (self.up, 1), (self.scales, 0)):
                tail = t.narrow(dim, start + r, end - start - r).clone()
                t.narrow(dim, start, end - start - r).copy_(tail)
                t.narrow(dim, end - r, r).zero_()
        self.adapters = {n: (s - r if s > start else s, rr, fac) for n, (s, rr, fac) in self.adapters.items()}

    def delta(self) -> torch.Tensor:
        """The adapters' weight update, float32, the layer's weight shape."""
        d = self.down.float().reshape(self.capacity, -1)
        u = self.up.float().reshape(self.up.shape[0], self.capacity)
        return ((u * self.scales[None, :]) @ d).reshape(self.layer.weight.shape)

    def fuse(self) -> None:
        """Add the update to the layer's weight (keeping the original for an exact :meth:`unfuse`)."""
        w = getattr(self.layer, "weight", None)
        if self.fused_weight is not None or not self.adapters or not isinstance(w, torch.Tensor) \
                or not w.is_floating_point() or w.element_size() < 2:
            return  # nothing to fuse, or a layer without a float weight (FP8 / low-bit codes): the branch stays
        w = self.layer.weight
        self.fused_weight = w.detach().clone()
        with torch.no_grad():
            w.copy_((w.float() + self.delta()).to(w.dtype))

    def unfuse(self) -> None:
        if self.fused_weight is None:
            return
        with torch.no_grad():
            self.layer.weight.copy_(self.fused_weight)
        self.fused_weight = None

    def _check_unfused(self) -> None:
        if self.fused_weight is not None:
            raise RuntimeError("the LoRAs are fused into the weights; unfuse_lora() before changing them")

    def detach(self) -> None:
        self.unfuse()
        self.handle.remove()

    def _hook(self, module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        if not self.adapters or self.fused_weight is not None:
            return output
        x = args[0]
        scales = self.scales.to(x.dtype)
        if self.conv:
            m = self.layer
            h = F.conv2d(x, self.down.to(x.dtype), None, m.stride, m.padding, m.dilation)
            return output + F.conv2d(h * scales[None, :, None, None], self.up.to(x.dtype))
        return output + F.linear(F.linear(x, self.down.to(x.dtype)) * scales, self.up.to(x.dtype))
