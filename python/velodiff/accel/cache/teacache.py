"""TeaCache (Liu et al., CVPR 2025; ali-vilab/TeaCache) for DiT / PixArt.

The probe is block 0's timestep-modulated input ``LN(x) * (1 + scale) + shift``, which costs a LayerNorm and the
modulation. Its relative L1 change against the previous model evaluation (per sample, the largest over the batch)
is rescaled by a polynomial fitted on the model's own trajectories (``velodiff calibrate-cache``), so that it
estimates the change of the model output, and accumulated over the evaluations that reused. While the sum stays
below ``threshold`` the whole block stack is skipped and the residual it added on the last computed evaluation is
added to the input instead; reaching the threshold computes and clears the sum. The first and the last step always
compute. The reference probe is the previous evaluation's, computed or not (``velodiff::cache_gate`` with
ACCUMULATE | STORE_ALWAYS).

A distance larger than any the calibration saw (its ``x_range``) computes too: the fitted polynomial is
meaningless there, and ``digits-dit``'s (negative leading coefficient) turns strongly negative, which held the
accumulator below the threshold for the rest of the run on euler_a (fresh noise every step: distances 0.4-0.9
against a fitted range of 0.016-0.15) and left the image 46x the uncached one's size in error.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Tuple

from velodiff.accel.cache.calibrate import builtin_calibration, check_identity, read_calibration
from velodiff.accel.cache.dit_hooks import DiTCache
from velodiff.accel.registry import register
from velodiff.ops.cache_gate import CacheGate, check_coefficients, check_threshold
from velodiff.ops.reference import GATE_ACCUMULATOR

__all__ = ["TeaCache"]


@register("teacache")
@dataclass(frozen=True)
class TeaCache(DiTCache):
    """TeaCache on a DiT / PixArt pipeline.

    ``threshold``: the accumulated rescaled distance at which the stack is computed again (0: always compute,
    bit-identical to no cache). ``coefficients``: the rescale polynomial, highest degree first (``(1, 0)`` is no
    rescale); empty means the model's fitted ones: those of ``calibration`` (a JSON file from
    ``velodiff calibrate-cache``, refused for another model) or, without it, those a built-in model ships
    (``digits-dit``); other models have none and need one of the two. The default threshold 0.1 is the measured
    one for ``digits-dit`` (FLUX's published settings are 0.25-0.8 with its own polynomial: thresholds mean
    different things under different polynomials)."""

    threshold: float = 0.1
    coefficients: Tuple[float, ...] = ()
    calibration: Optional[str] = None

    def validate(self) -> None:
        check_threshold("threshold", self.threshold)
        try:
            coefficients = check_coefficients(self.coefficients)
        except ValueError as e:
            raise ValueError(str(e).replace("coefficients must", "coefficients (TeaCache's rescale polynomial) must")
                             ) from None
        object.__setattr__(self, "coefficients", coefficients)
        if self.calibration is not None:
            if coefficients:
                raise ValueError("give coefficients or calibration, not both (calibration is a file of fitted "
                                 "coefficients)")
            if not isinstance(self.calibration, (str, os.PathLike)):
                raise ValueError(f"calibration must be a path to a JSON file, got {self.calibration!r}")
            read_calibration(os.fspath(self.calibration), "teacache")

    def resolved_coefficients(self, model) -> Tuple[float, ...]:
        """The polynomial used on ``model``: ``coefficients``, else the ``calibration`` file's (its model must be
        ``model``), else the built-in one for ``model``; a ValueError saying how to get one otherwise."""
        return self.setup(model)["coefficients"]

    def setup(self, model):
        """{"coefficients", "max_distance"}: the polynomial (see :meth:`resolved_coefficients`) and the largest
        distance its fit saw (None for coefficients given by hand)."""
        if self.coefficients:
            return {"coefficients": self.coefficients, "max_distance": None}
        data = None
        if self.calibration is not None:
            path = os.fspath(self.calibration)
            data = read_calibration(path, "teacache")
            check_identity(data, model, path)
        else:
            data = builtin_calibration(model, "teacache")
        if data is not None:
            x_range = (data.get("fit") or {}).get("x_range") or [None, None]
            top = x_range[1] if isinstance(x_range, list) and len(x_range) == 2 else None
            return {"coefficients": tuple(float(c) for c in data["coefficients"]),
                    "max_distance": float(top) if isinstance(top, (int, float)) and math.isfinite(top) else None}
        raise ValueError(f"coefficients: TeaCache has no fitted coefficients for this {type(model).__name__} "
                         f"({model.num_blocks} blocks); fit them with velodiff calibrate-cache --model M --method "
                         f"teacache --out F.json and pass calibration=F.json (or coefficients=..., highest degree "
                         f"first; 1/0 means no rescale)")

    def check_model(self, model) -> None:
        self.setup(model)

    def run_stack(self, model, x, inputs, ctx, state):
        probe = model.modulated_input(x, inputs)
        residual = state.get("residual")
        force = ctx.step == 0 or ctx.is_last_step or self.threshold == 0 or residual is None or \
            residual.shape != x.shape or residual.dtype != x.dtype
        gate = state.setdefault("gate", CacheGate())
        params = state["params"]
        compute = gate.step(probe, self.threshold, params["coefficients"], accumulate=True, store_always=True,
                            force=force)
        distance = gate.last_distance
        if not compute and params["max_distance"] is not None and not distance <= params["max_distance"]:
            # beyond the calibrated range the fitted polynomial means nothing (a degree-4 fit can turn large and
            # negative there and hold the accumulator below the threshold for good): compute, and start over
            compute = True
            gate.state[GATE_ACCUMULATOR] = 0.0
        n = model.num_blocks
        if compute:
            out = model.run_blocks(x, inputs)
            state["residual"] = out - x
            return out, True, distance, n
        return x + residual, False, distance, 0
