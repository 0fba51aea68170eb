"""What the DiT caches (FBCache, TeaCache, DBCache, TaylorSeer) share: the hook on the transformer's block stack,
the per-call state, the residual cache of a block range, and a trace of the decisions for tests and benchmarks.

A DiT cache installs one hook (:attr:`velodiff.models.dit_common.BlockStack.block_stack_hook`) on
``pipe.transformer``. The hook runs the cache only inside a pipeline call: outside one (``pipe.denoise_context``
is None: a direct transformer call, another pipeline sharing the transformer, another thread) the stack runs
whole and no state is read or written. Inside a call, decisions are keyed on the plan's step
(``ctx.step``; Heun's two evaluations share one), state lives in ``ctx.state_for(config)`` (one per CFG branch
under split CFG) and dies with the call, and every threshold decision is made by the device gate (:class:`velodiff.ops.cache_gate.CacheGate`).
A second transformer call within one model evaluation of the loop (e.g. from a callback) also runs uncached.
"""
from __future__ import annotations

import contextlib
import math
import weakref
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Optional

import torch

from velodiff.accel.cache.base import TRANSFORMER, CacheTechnique
from velodiff.ops.cache_gate import CacheGate


def check_int(name: str, value, minimum: int, optional: bool = False) -> None:
    """``value`` is an int >= ``minimum`` (or None when ``optional``); ValueError naming ``name``."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        what = f"an integer >= {minimum}" + (" or None (no limit)" if optional else "")
        raise ValueError(f"{name} must be {what}, got {value!r}")


def block_stack(pipe):
    """``pipe.transformer`` when it offers the block-stack extension points (velodiff's DiT and PixArt), else a
    ValueError saying so."""
    model = getattr(pipe, "transformer", None)
    if model is None or not all(hasattr(model, a) for a in ("run_blocks", "run_stack", "modulated_input")):
        raise ValueError(f"the DiT caches need velodiff's DiT or PixArt transformer (with run_blocks / "
                         f"block_stack_hook); {type(model).__name__} has none")
    return model


def call_position(ctx) -> int:
    """The position of the current evaluation within its step: 0 for the first (every single-call sampler),
    1 for Heun's corrector or DPM-Solver-2's second evaluation, ..."""
    i, steps = ctx.call_index, ctx.call_steps
    pos = 0
    while i - pos > 0 and steps[i - pos - 1] == steps[i]:
        pos += 1
    return pos


@dataclass
class TraceEntry:
    """One model evaluation of a traced pipeline call: its call index and step, whether the cached part was
    computed, the gate's distance (nan when no gate ran), how many transformer blocks ran, and the CFG branch
    under split CFG (None otherwise)."""

    call_index: int
    step: int
    computed: bool
    distance: float
    blocks_run: int
    branch: Optional[str] = None


class _Hook:
    """The callable installed as ``block_stack_hook``: finds the pipeline's open context and hands the stack to
    the cache, or runs it whole outside a pipeline call."""

    def __init__(self, pipe, cache: "DiTCache", params: Dict[str, Any]):
        self.pipe = weakref.ref(pipe)
        self.cache = cache
        self.params = params
        self.trace: Optional[List[TraceEntry]] = None

    def __call__(self, model, x: torch.Tensor, inputs) -> torch.Tensor:
        pipe = self.pipe()
        ctx = pipe.denoise_context if pipe is not None else None
        if ctx is None or ctx.call_index < 0:
            return model.run_blocks(x, inputs)
        state = ctx.state_for(self.cache)
        if state.get("_last_call") == ctx.call_index:  # not the loop's evaluation: leave the cache alone
            return model.run_blocks(x, inputs)
        state["_last_call"] = ctx.call_index
        state.setdefault("params", self.params)
        out, computed, distance, blocks = self.cache.run_stack(model, x, inputs, ctx, state)
        if self.trace is not None:
            self.trace.append(TraceEntry(ctx.call_index, ctx.step, computed, distance, blocks, ctx.cfg_branch))
        return out


@contextlib.contextmanager
def trace(pipe) -> Iterator[List[TraceEntry]]:
    """Record every cache decision of the pipeline calls made inside the block: ``with trace(pipe) as log:
    pipe(...)``; ``log`` is a list of :class:`TraceEntry`. ValueError when no DiT cache is applied."""
    hook = getattr(getattr(pipe, "transformer", None), "block_stack_hook", None)
    if not isinstance(hook, _Hook):
        raise ValueError("no DiT cache is applied to this pipeline (velodiff.optimize(pipe, FBCache(...)) first)")
    log: List[TraceEntry] = []
    previous, hook.trace = hook.trace, log
    try:
        yield log
    finally:
        hook.trace = previous


def _check_free(model) -> None:
    if "block_stack_hook" in vars(model):
        raise ValueError(f"this {type(model).__name__} already has a block-stack hook (a cache applied through another "
                         f"pipeline that shares the transformer?); velodiff.restore that pipeline first")


class DiTCache(CacheTechnique):
    """Base of the DiT caches: fits pipelines whose denoiser is velodiff's DiT / PixArt transformer, installs the
    block-stack hook on ``apply`` and removes it on undo. Subclasses implement :meth:`run_stack`."""

    denoiser: ClassVar[str] = TRANSFORMER

    def check(self, pipe) -> None:
        super().check(pipe)
        model = block_stack(pipe)
        _check_free(model)
        self.check_model(model)

    def check_model(self, model) -> None:
        """Raise a ValueError naming the field when the config does not fit ``model`` (e.g. too many blocks)."""

    def setup(self, model) -> Dict[str, Any]:
        """What the cache resolves once when applied to ``model`` (e.g. TeaCache's coefficients); every call's
        state gets it as ``state["params"]``."""
        return {}

    def apply(self, pipe) -> Callable[[], None]:
        model = block_stack(pipe)
        _check_free(model)
        model.block_stack_hook = _Hook(pipe, self, self.setup(model))

        def undo() -> None:
            vars(model).pop("block_stack_hook", None)
        return undo

    def run_stack(self, model, x: torch.Tensor, inputs, ctx, state: Dict[str, Any]):
        """Run (or skip) the block stack for one model evaluation inside a pipeline call. Returns (tokens after the
        stack, whether the cached part was computed, the gate's distance or nan, blocks run)."""
        raise NotImplementedError


class TaylorSeries:
    """A tensor forecast by a Taylor series over the sampler's steps (TaylorSeer; cache-dit's TaylorSeer
    calibrator). ``update(step, value)`` on a computed step makes ``value`` the 0th factor and the finite
    differences against the previous computed step's factors, divided by the step distance, the higher ones
    (``F_{i+1} = (F_i - F_i') / (step - step')``, up to ``order``, as many as computed steps allow);
    ``forecast(step)`` is ``sum_i F_i (step - last)^i / i!``. Factors are kept in float32."""

    def __init__(self, order: int):
        self.order = order
        self.step: Optional[int] = None
        self.factors: List[torch.Tensor] = []

    def usable_for(self, like: torch.Tensor) -> bool:
        return bool(self.factors) and self.factors[0].shape == like.shape

    def update(self, step: int, value: torch.Tensor) -> None:
        new = [value.float()]
        old = self.factors
        if old and self.step is not None and step > self.step and old[0].shape == new[0].shape:
            gap = float(step - self.step)
            for i in range(min(self.order, len(old))):
                new.append((new[i] - old[i]) / gap)
        self.step, self.factors = step, new

    def forecast(self, step: int, dtype: torch.dtype) -> torch.Tensor:
        k = float(step - self.step)
        out = self.factors[0].clone()
        for i in range(1, len(self.factors)):
            out.add_(self.factors[i], alpha=k ** i / math.factorial(i))
        return out.to(dtype)


def run_residual_cache(model, x: torch.Tensor, inputs, state: Dict[str, Any], threshold: float, front: int,
                       back: int, force: bool, ctx=None, taylor_order: int = 0):
    """The residual cache of FBCache (``front`` 1, ``back`` 0) and DBCache: blocks [0, front) always run and their
    residual ``r = h_front - x`` is the gate's probe, compared with the probe of the last computed evaluation
    (the gate's default mode). Compute: blocks [front, L - back) run and their residual is stored; reuse: the
    stored residual is added to ``h_front`` instead. Blocks [L - back, L) always run. ``force``: compute whatever
    the distance (the probe becomes the reference). ``taylor_order`` > 0 (with ``ctx``): a reusing evaluation
    adds the middle residual forecast by a :class:`TaylorSeries` of that order over the computed steps (one series
    per evaluation position within a step) instead of the stored one.

    Returns (tokens, computed, distance, blocks run). The probe is a fresh tensor: should a block write its input
    in place (so that ``h_front`` is ``x``'s storage and the residual would be identically zero, the FBCache bug
    that silently never caches), this evaluation computes without a gate decision and later evaluations keep a copy
    of the input first."""
    n = model.num_blocks
    keep = x.clone() if state.get("copy_input") else x
    h = model.run_blocks(x, inputs, 0, front)
    if h.data_ptr() == keep.data_ptr():  # the front blocks wrote their input in place: no residual this time
        state["copy_input"] = True
        return model.run_blocks(h, inputs, front, n), True, math.nan, n
    probe = h - keep
    stored = state.get("residual")
    if stored is None or stored.shape != h.shape or stored.dtype != h.dtype:
        force = True
    gate = state.setdefault("gate", CacheGate())
    compute = gate.step(probe, threshold, force=force or threshold == 0)
    distance = gate.last_distance
    series = None
    if taylor_order > 0 and ctx is not None:
        series = state.setdefault(("series", call_position(ctx)), TaylorSeries(taylor_order))
    if compute:
        mid = model.run_blocks(h, inputs, front, n - back)
        state["residual"] = mid - h
        if series is not None:
            series.update(ctx.step, state["residual"])
        h = mid
        blocks = n
    else:
        if series is not None and series.usable_for(h):
            h = h + series.forecast(ctx.step, h.dtype)
        else:
            h = h + stored
        blocks = front + back
    if back:
        h = model.run_blocks(h, inputs, n - back, n)
    return h, compute, distance, blocks
