"""TaylorSeer (Liu et al., arXiv 2503.06923; Shenyi-Z/TaylorSeer, cache-dit's TaylorSeer calibrator) for DiT /
PixArt: on cached steps the block stack's residual is forecast by a Taylor series instead of reused as it was.

Schedule (static, in sampler steps): the first ``warmup_steps`` steps compute, then every ``interval``-th step
computes and the ``interval - 1`` steps before it forecast (``interval`` 1: every step computes, bit-identical to no
cache). On a computed step ``s`` the stack's residual ``R(s) = out - in`` becomes the 0th factor and the higher
ones are finite differences against the factors of the previous computed step ``s'``, divided by the step
distance: ``F_{i+1}(s) = (F_i(s) - F_i(s')) / (s - s')`` for ``i < order`` (as many orders as computed steps
allow). A forecast step ``k`` takes ``R = sum_i F_i(s) (k - s)^i / i!`` and adds it to its own input tokens. The
factors are kept in float32.

Samplers that evaluate the model more than once per step (Heun, DPM-Solver-2/3) keep one series per evaluation
position within the step, each a function of the step index: Heun's corrector is forecast from earlier correctors.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from velodiff.accel.cache.dit_hooks import DiTCache, TaylorSeries, call_position, check_int
from velodiff.accel.registry import register

__all__ = ["TaylorSeer"]


@register("taylorseer")
@dataclass(frozen=True)
class TaylorSeer(DiTCache):
    """TaylorSeer on a DiT / PixArt pipeline. ``order``: the Taylor order (0 reuses the last residual as it is, 1
    extrapolates linearly, ...); ``interval``: one computed step in every ``interval`` after the warm-up;
    ``warmup_steps``: the first steps always compute (the reference code's ``first_enhance`` 2)."""

    order: int = 1
    interval: int = 3
    warmup_steps: int = 2

    def validate(self) -> None:
        check_int("order", self.order, 0)
        check_int("interval", self.interval, 1)
        check_int("warmup_steps", self.warmup_steps, 0)

    def computes(self, step: int) -> bool:
        """Whether ``step`` (0-based in this call) runs the stack."""
        return step < self.warmup_steps or (step - self.warmup_steps + 1) % self.interval == 0

    def run_stack(self, model, x, inputs, ctx, state):
        series = state.setdefault(("series", call_position(ctx)), TaylorSeries(self.order))
        step, n = ctx.step, model.num_blocks
        if self.computes(step) or not series.usable_for(x):
            out = model.run_blocks(x, inputs)
            series.update(step, out - x)
            return out, True, math.nan, n
        return x + series.forecast(step, x.dtype), False, math.nan, 0
