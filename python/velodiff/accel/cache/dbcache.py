"""DBCache ("dual block cache", vipshop/cache-dit) for DiT / PixArt: FBCache with ``fn_compute_blocks`` front
blocks as the probe, ``bn_compute_blocks`` back blocks that always run after the cached middle, warm-up steps and
caps on cached steps.

Per model evaluation: blocks [0, Fn) run and their residual is the gate's probe (compared with the probe of the
last evaluation that computed); the middle blocks [Fn, L - Bn) are computed, or replaced by their stored
residual; the last Bn blocks always run, so they can correct what the reused middle got wrong. A step computes
whatever the distance while ``step < warmup_steps``, once ``max_cached_steps`` steps of this call have reused, and
when the previous ``max_continuous_cached_steps`` steps all reused. Steps are the sampler plan's steps (Heun's
two evaluations are one step); a step counts as cached when one of its evaluations reused. ``Fn=1, Bn=0`` without
warm-up, caps or forecast is exactly FBCache. With ``taylorseer_order`` the reused middle residual is forecast
from the computed steps (:class:`velodiff.accel.cache.dit_hooks.TaylorSeries`) rather than reused as it was.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from velodiff.accel.cache.dit_hooks import DiTCache, check_int, run_residual_cache
from velodiff.accel.registry import register
from velodiff.ops.cache_gate import check_threshold

__all__ = ["DBCache"]


@register("dbcache")
@dataclass(frozen=True)
class DBCache(DiTCache):
    """DBCache on a DiT / PixArt pipeline.

    ``threshold``: relative L1 change of the front blocks' residual below which the middle is reused (0: never);
    ``fn_compute_blocks`` >= 1 and ``bn_compute_blocks`` >= 0 blocks always run before / after the middle, which
    must keep at least one block (Fn + Bn < the number of blocks); ``warmup_steps``: the first steps always compute;
    ``max_cached_steps`` / ``max_continuous_cached_steps``: at most that many reusing steps per call / in a row
    (None: no limit); ``taylorseer_order`` > 0: a reusing step adds the middle residual forecast by a Taylor
    series of that order over the computed steps (cache-dit's TaylorSeer calibrator) instead of the stored one
    (0: plain reuse). cache-dit's defaults (Fn 8, threshold 0.08, warm-up 8 steps, no caps) are for 28-57-block
    models and fail on ``digits-dit``'s 6 blocks; these are the best measured there (dpmpp_2m, 100 images in
    batches of 10: 20 steps 44.3 dB PSNR to uncached with 58 % of the block work, 50 steps 53.4 dB with 47 %;
    without the forecast 36.6 dB and 42.4 dB; FBCache 0.08: 35.6 dB / 62 % and 33.2 dB / 43 %):
    bench/results/cache_dit_digits.md."""

    threshold: float = 0.12
    fn_compute_blocks: int = 1
    bn_compute_blocks: int = 0
    warmup_steps: int = 0
    max_cached_steps: Optional[int] = None
    max_continuous_cached_steps: Optional[int] = 2
    taylorseer_order: int = 1

    def validate(self) -> None:
        check_threshold("threshold", self.threshold)
        check_int("fn_compute_blocks", self.fn_compute_blocks, 1)
        check_int("bn_compute_blocks", self.bn_compute_blocks, 0)
        check_int("warmup_steps", self.warmup_steps, 0)
        check_int("max_cached_steps", self.max_cached_steps, 0, optional=True)
        check_int("max_continuous_cached_steps", self.max_continuous_cached_steps, 0, optional=True)
        check_int("taylorseer_order", self.taylorseer_order, 0)

    def check_model(self, model) -> None:
        n = model.num_blocks
        if self.fn_compute_blocks + self.bn_compute_blocks >= n:
            raise ValueError(f"fn_compute_blocks + bn_compute_blocks must be less than the transformer's {n} blocks "
                             f"(at least one middle block to cache), got {self.fn_compute_blocks} + "
                             f"{self.bn_compute_blocks}")

    def run_stack(self, model, x, inputs, ctx, state):
        step = ctx.step
        cached = state.setdefault("cached_steps", set())  # steps in which an evaluation reused
        run = state.setdefault("run", [])                  # the reusing steps in a row up to now
        force = step < self.warmup_steps
        if self.max_cached_steps is not None and step not in cached and len(cached) >= self.max_cached_steps:
            force = True
        if self.max_continuous_cached_steps is not None and step not in run and \
                len(run) >= self.max_continuous_cached_steps:
            force = True
        out, computed, distance, blocks = run_residual_cache(
            model, x, inputs, state, self.threshold, self.fn_compute_blocks, self.bn_compute_blocks, force, ctx,
            self.taylorseer_order)
        if computed:
            run.clear()
        else:
            cached.add(step)
            if step not in run:
                run.append(step)
        return out, computed, distance, blocks
