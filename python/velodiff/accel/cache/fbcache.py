"""First Block Cache (FBCache; chengzeyi/ParaAttention, diffusers' ``FirstBlockCacheConfig``) for DiT / PixArt.

Every model evaluation runs the first block; its residual ``r1 = h1 - h0`` is compared with the ``r1`` of the last
evaluation that ran the whole stack (relative L1 per sample, the largest over the batch; ``velodiff::cache_gate``
in its default mode). Below ``threshold`` the other blocks are skipped and ``h1 + R`` is used, ``R`` being the
residual of blocks 1..L stored by that last full evaluation; otherwise they run and ``R`` is stored again. The
reference drifts with every skipped step, so a long run of skips ends by itself.
"""
from __future__ import annotations

from dataclasses import dataclass

from velodiff.accel.cache.dit_hooks import DiTCache, run_residual_cache
from velodiff.accel.registry import register
from velodiff.ops.cache_gate import check_threshold

__all__ = ["FBCache"]


@register("fbcache")
@dataclass(frozen=True)
class FBCache(DiTCache):
    """FBCache on a DiT / PixArt pipeline. ``threshold``: the relative L1 change of the first block's residual
    below which the rest of the stack is reused (0: never reuse, bit-identical to no cache). ParaAttention uses
    0.08 on FLUX, diffusers 0.05; on ``digits-dit`` (dpmpp_2m, 20 steps) see bench/results/cache_dit_digits.md."""

    threshold: float = 0.08

    def validate(self) -> None:
        check_threshold("threshold", self.threshold)

    def run_stack(self, model, x, inputs, ctx, state):
        return run_residual_cache(model, x, inputs, state, self.threshold, front=1, back=0, force=False)
