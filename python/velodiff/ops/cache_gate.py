"""Typed wrapper of ``velodiff::cache_gate`` and :class:`CacheGate`, the buffers one cache keeps for one call.

The decision rule (relative L1 distance of a probe to a stored probe, optional polynomial rescale and
accumulation, decision and new state written on the device in one pass) is specified in
csrc/include/velodiff/cache_gate.h; :func:`velodiff.ops.reference.cache_gate` is the pure-PyTorch specification.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from velodiff.ops import reference
from velodiff.ops._native import native_op

PROBE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACCUMULATE = reference.CACHE_GATE_ACCUMULATE
STORE_ALWAYS = reference.CACHE_GATE_STORE_ALWAYS
FORCE_COMPUTE = reference.CACHE_GATE_FORCE_COMPUTE
_ALL_FLAGS = ACCUMULATE | STORE_ALWAYS | FORCE_COMPUTE


def check_threshold(name: str, value) -> float:
    """A finite number >= 0 as float; ValueError naming ``name`` otherwise (NaN, inf, negative, not a number)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def check_coefficients(coefficients) -> tuple:
    """A polynomial as a tuple of finite floats (highest degree first, at most 8)."""
    try:
        values = tuple(float(c) for c in coefficients)
    except (TypeError, ValueError):
        raise ValueError(f"coefficients must be a sequence of numbers, got {coefficients!r}") from None
    if len(values) > reference.CACHE_GATE_MAX_COEFFICIENTS or not all(math.isfinite(c) for c in values):
        raise ValueError(f"coefficients must be at most {reference.CACHE_GATE_MAX_COEFFICIENTS} finite numbers "
                         f"(highest degree first), got {coefficients!r}")
    return values


def check_cache_gate_args(probe, stored, state, threshold, coefficients, flags) -> None:
    """Raise a TypeError/ValueError naming the offending argument; shared by the wrapper and the tests."""
    if not isinstance(probe, torch.Tensor):
        raise TypeError(f"probe must be a torch.Tensor, got {type(probe).__name__}")
    if probe.dtype not in PROBE_DTYPES:
        raise TypeError(f"probe must be float32, float16 or bfloat16, got {probe.dtype}")
    if probe.dim() < 1 or probe.shape[0] < 1 or probe.numel() == 0:
        raise ValueError(f"probe must be [B, ...] with B >= 1 and elements, got shape {list(probe.shape)}")
    if not probe.is_contiguous():
        raise ValueError("probe must be contiguous (call .contiguous())")
    if not isinstance(stored, torch.Tensor) or stored.dtype != probe.dtype or \
            tuple(stored.shape) != (2,) + tuple(probe.shape) or stored.device != probe.device or \
            not stored.is_contiguous():
        raise ValueError(f"stored must be a contiguous [2, {', '.join(map(str, probe.shape))}] {probe.dtype} tensor on "
                         f"{probe.device} (CacheGate allocates it)")
    if not isinstance(state, torch.Tensor) or state.dtype != torch.float32 or tuple(state.shape) != (4,) or \
            state.device != probe.device or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 [4] tensor on {probe.device} (CacheGate allocates it)")
    check_threshold("threshold", threshold)
    check_coefficients(coefficients)
    if isinstance(flags, bool) or not isinstance(flags, int) or flags & ~_ALL_FLAGS:
        raise ValueError(f"flags must be an int made of ACCUMULATE (1), STORE_ALWAYS (2), FORCE_COMPUTE (4), "
                         f"got {flags!r}")


def cache_gate(probe: torch.Tensor, stored: torch.Tensor, state: torch.Tensor, threshold: float,
               coefficients: Sequence[float] = (), flags: int = 0) -> torch.Tensor:
    """Decide on the device whether this step computes (1) or reuses (0), and update the gate's buffers.

    Args:
        probe: [B, ...] float32 | float16 | bfloat16, contiguous: this step's probe.
        stored: [2, B, ...] of probe's dtype (read and written): the two probe buffers.
        state: float32 [4] on probe's device (read and written): accumulator, distance, valid buffer, decision.
        threshold: a finite number >= 0; 0 computes every step.
        coefficients: a rescale polynomial, highest degree first (at most 8; empty: none).
        flags: ACCUMULATE | STORE_ALWAYS | FORCE_COMPUTE.
    Returns:
        int32 [1] on probe's device: 1 compute, 0 reuse. See csrc/include/velodiff/cache_gate.h.
    """
    check_cache_gate_args(probe, stored, state, threshold, coefficients, flags)
    return native_op("cache_gate")(probe, stored, state, float(threshold), list(check_coefficients(coefficients)),
                                   int(flags))


class CacheGate:
    """The buffers of one cache for one pipeline call: two probe buffers and the device state, allocated from
    the first probe. ``step(probe, threshold, ...)`` returns the decision as a Python bool (the one host read of
    the step) and keeps :attr:`last_distance` for logs and tests."""

    def __init__(self):
        self.stored: Optional[torch.Tensor] = None
        self.state: Optional[torch.Tensor] = None

    def reset(self) -> None:
        self.stored = self.state = None

    def step(self, probe: torch.Tensor, threshold: float, coefficients: Sequence[float] = (),
             accumulate: bool = False, store_always: bool = False, force: bool = False) -> bool:
        probe = probe.contiguous()
        if self.stored is None or self.stored.shape[1:] != probe.shape or self.stored.dtype != probe.dtype \
                or self.stored.device != probe.device:
            self.stored = probe.new_empty((2,) + tuple(probe.shape))
            self.state = torch.tensor([0.0, 0.0, -1.0, 0.0], dtype=torch.float32, device=probe.device)
        flags = (ACCUMULATE if accumulate else 0) | (STORE_ALWAYS if store_always else 0) | \
            (FORCE_COMPUTE if force else 0)
        return bool(cache_gate(probe, self.stored, self.state, threshold, coefficients, flags).item())

    @property
    def last_distance(self) -> float:
        """The distance of the last step (max over samples; inf when it had nothing to compare with)."""
        return float("nan") if self.state is None else float(self.state[reference.GATE_DISTANCE])
