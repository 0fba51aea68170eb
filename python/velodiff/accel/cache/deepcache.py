"""DeepCache (Ma, Fang and Wang, CVPR 2024, arXiv 2312.00858; reference code horseee/DeepCache).

A UNet's deep features change little from one step to the next. On a *full* step the whole UNet runs and one
tensor is kept: the up-path state entering the up layer that consumes skip branch ``b`` (the mirror of branch ``b``).
On the steps between, only the shallow part runs: ``conv_in`` and the down path as far as branch ``b``, then the up
layers from the mirror of ``b`` on, fed by the kept tensor and the fresh skips; the deeper down layers, the mid
block and the up layers before the mirror are skipped. This is the memory-lean form of the paper's code (one tensor
per call, the CFG batch included), not its helper's, which keeps every module's output.

Branches are numbered as in DeepCache: 0 is ``conv_in``'s output, then every down-block layer and downsampler in
order (SD 1.5: 0..11, SDXL: 0..8, ``digits``: 0..3). Branch 0 (the default) runs the least: ``conv_in``, the last up
layer and ``conv_out``.

Which steps are full is decided on the sampler plan's step index within the run (``pipe.denoise_context.step``),
never on counted calls or timestep look-ups (the DeepCache helper's ``timesteps.index(t)`` returns the first match
when a sampler repeats a timestep):

- ``uniform``: steps 0, N, 2N, ... (``interval`` N).
- ``quadratic``: the paper's non-uniform schedule, ``ceil(T / N)`` full steps for a run of T steps, denser around
  step ``center``: with the points l_k spaced evenly from (-center)^(1/p) to (T - center)^(1/p) (k = 0..n), the
  full steps are step 0 and the distinct integer parts of l_k^p + center between the first and the last point; p
  starts at ``power`` and is lowered by 0.02 until there are exactly n. As in the paper's code, the root of the
  negative number is the complex principal root and the integer part is taken of the real part of l_k^p (for
  T = 50, N = 5, center 15, power 1.4: [0, 5, 9, 13, 17, 21, 26, 31, 37, 43], the paper's SD 1.5 setting).

Image-to-image: the schedule is laid over the steps the run makes (``begin`` is not counted), so a run's first
step is always full, as in DeepCache's own img2img pipeline and its helper (which subtracts the first step index it
sees). Samplers with several evaluations per step (Heun; the plan labels them with one step): every
evaluation of a full step runs the whole UNet and refreshes the kept tensor, and every evaluation of the steps
between uses the tensor from the last full evaluation. ``interval=1`` never skips and is bit-identical to no cache.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List

import numpy as np

from velodiff.accel.cache.base import CacheTechnique
from velodiff.accel.cache.unet_hooks import check_int, check_real, check_unet_parts, install_unet_dispatcher
from velodiff.accel.registry import register

__all__ = ["DeepCache", "deepcache_full_steps", "quadratic_full_steps"]

SCHEDULES = ("uniform", "quadratic")


def quadratic_full_steps(num_steps: int, interval: int, center: int, power: float) -> List[int]:
    """The full steps of DeepCache's non-uniform schedule for a run of ``num_steps`` (see the module docstring).
    ValueError when no power in (1, ``power``] gives ``ceil(num_steps / interval)`` distinct steps."""
    n = -(-num_steps // interval)
    if n >= num_steps:
        return list(range(num_steps))
    p = float(power)
    while p > 1:
        start, end = complex(-center) ** (1 / p), complex(num_steps - center) ** (1 / p)
        points = np.linspace(start, end, n + 1)
        values = np.unique((points ** p).real.astype(np.int32))
        steps = [0] + [int(v) + center for v in values[1:-1]]
        if len(steps) == n:
            return steps
        p -= 0.02
    raise ValueError(f"deepcache: schedule='quadratic' cannot place {n} full steps in a run of {num_steps} steps "
                     f"with center={center} and power <= {power:g}; change center or power, or use "
                     f"schedule='uniform'")


def deepcache_full_steps(num_steps: int, interval: int, schedule: str = "uniform", center: int = 15,
                         power: float = 1.4) -> List[int]:
    """The full steps (0-based, within the run) of a run of ``num_steps``."""
    if interval == 1:
        return list(range(num_steps))
    if schedule == "uniform":
        return list(range(0, num_steps, interval))
    return quadratic_full_steps(num_steps, interval, center, power)


@register("deepcache")
@dataclass(frozen=True)
class DeepCache(CacheTechnique):
    """DeepCache on a UNet pipeline: a full UNet every ``interval`` steps, the shallow part around skip ``branch``
    in between (see :mod:`velodiff.accel.cache.deepcache`).

    interval: N >= 1 (1: never cache). branch: the skip branch (0 .. ``pipe.unet.num_branches - 1``).
    schedule: ``uniform`` or ``quadratic`` (the paper's non-uniform schedule around ``center`` with ``power``; the
    paper's SD 1.5 setting is interval 5, center 15, power 1.4)."""

    interval: int = 3
    branch: int = 0
    schedule: str = "uniform"
    center: int = 15
    power: float = 1.4

    def validate(self) -> None:
        check_int("deepcache", "interval", self.interval, 1)
        check_int("deepcache", "branch", self.branch, 0)
        if self.schedule not in SCHEDULES:
            raise ValueError(f"deepcache: schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        check_int("deepcache", "center", self.center, 0)
        check_real("deepcache", "power", self.power, above=1.0)

    def check(self, pipe) -> None:
        super().check(pipe)
        check_unet_parts(pipe, "deepcache")
        n = pipe.unet.num_branches
        if self.branch >= n:
            raise ValueError(f"deepcache: branch {self.branch} does not exist: this UNet has branches 0..{n - 1}")

    def full_steps(self, num_steps: int) -> List[int]:
        return deepcache_full_steps(num_steps, self.interval, self.schedule, self.center, self.power)

    def apply(self, pipe) -> Callable[[], None]:
        unet, branch = pipe.unet, self.branch

        def handler(context, state, args, plain):
            if "full" not in state:
                full = self.full_steps(context.num_steps)
                cached = [s for s in range(context.num_steps) if s not in set(full)]
                state["full"], state["last_cached"] = frozenset(full), max(cached, default=-1)
            step = context.step
            kept = state.get("kept")
            if step in state["full"] or kept is None or kept.shape[0] != args.batch:
                call = args.prepare(unet)
                x, skips = unet.encode(call)
                x = unet.mid(call, x)
                record = branch if step < state["last_cached"] else None  # keep nothing no later step reads
                out, state["kept"] = unet.decode(call, x, skips, record_branch=record)
                return out
            call = args.prepare(unet)
            _, skips = unet.encode(call, until_branch=branch)
            return unet.decode(call, kept, skips, start_branch=branch)[0]

        return install_unet_dispatcher(pipe, self, handler)

