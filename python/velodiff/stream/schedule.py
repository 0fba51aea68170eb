"""The denoising schedule of a stream: which timesteps the slots of the stream batch sit at, and the per-slot
coefficients of the LCM update (StreamDiffusion, Kodaira et al. 2023, section 3.1).

``t_index_list`` indexes the ``num_inference_steps``-point LCM discretisation (for 50 points: timesteps 999, 979,
..., 19), ascending index = descending timestep, so ``[32, 45]`` denoises from t = 359 to t = 99. Slot ``s`` of the
batch holds a frame at timestep ``timesteps[s]``; the update of slot s is call s of velodiff's ``lcm`` plan over
exactly those timesteps, which is what image-to-image with that sampler and ``strength=1`` runs one frame at a time.
"""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import List, Sequence

import torch

from velodiff.pipelines.scheduling import make_plan, noise_schedule
from velodiff.sampling import SamplerPlan
from velodiff.sampling.samplers.lcm import lcm_timesteps

CFG_TYPES = ("none", "full", "self", "initialize")


def check_t_index_list(t_index_list, num_inference_steps: int) -> List[int]:
    """The indices as ints: a non-empty, strictly increasing sequence in [0, num_inference_steps); ValueError
    naming ``t_index_list`` otherwise."""
    if isinstance(t_index_list, (str, bytes)) or not isinstance(t_index_list, Sequence) or not t_index_list:
        raise ValueError(f"t_index_list must be a non-empty list of step indices, got {t_index_list!r}")
    if any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in t_index_list):
        raise ValueError(f"t_index_list must hold integers, got {list(t_index_list)!r}")
    indices = [int(i) for i in t_index_list]
    outside = [i for i in indices if not 0 <= i < num_inference_steps]
    if outside:
        raise ValueError(f"t_index_list {indices} has {outside} outside the schedule: indices must lie in "
                         f"[0, {num_inference_steps - 1}] for num_inference_steps={num_inference_steps}")
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise ValueError(f"t_index_list must be strictly increasing (noisiest step first), got {indices}")
    return indices


def check_cfg(cfg_type: str, guidance_scale, delta) -> None:
    if cfg_type not in CFG_TYPES:
        raise ValueError(f"cfg_type must be one of {CFG_TYPES}, got {cfg_type!r}")
    for name, value in (("guidance_scale", guidance_scale), ("delta", delta)):
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) < 1e4:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


@dataclass
class StreamSchedule:
    """The slots' timesteps and update coefficients.

    Attributes:
        timesteps: the n timesteps, descending (slot 0 first).
        plan: the ``lcm`` plan over ``timesteps`` (call s updates slot s; its noise re-noises to slot s + 1).
        table: [n, 11] float32 coefficient rows of the plan for this guidance (``SamplerPlan.coefficient_table``).
        alpha, sigma: per slot, sqrt(alphas_cumprod[t]) and sqrt(1 - alphas_cumprod[t]).
        p_x, p_m: per slot, the data prediction ``x0 = p_x x + p_m m`` of the model's output m.
        to_epsilon: residual guidance on a model that does not predict epsilon: the guidance is formed on noise
            predictions (the paper's space, where it is not equivalent for delta != 1), so the conditional output is
            converted and ``table`` is the epsilon-prediction plan's.
        start: ``plan.info["start"]``: how a clean latent is noised to slot 0.
    """

    timesteps: List[int]
    plan: SamplerPlan
    table: torch.Tensor
    alpha: List[float]
    sigma: List[float]
    p_x: List[float]
    p_m: List[float]
    to_epsilon: bool
    start: dict

    @property
    def slots(self) -> int:
        return len(self.timesteps)


def stream_schedule(scheduler_config: dict, t_index_list: Sequence[int], num_inference_steps: int,
                    guidance_scale: float, delta: float, residual: bool, device) -> StreamSchedule:
    """The schedule for a pipeline's ``scheduler_config`` (training schedule and prediction type) at the checked
    ``t_index_list`` of the ``num_inference_steps``-point LCM discretisation (original grid of 50 points, as
    StreamDiffusion's LCMScheduler; more points than 50 make a grid of that many). ``residual``: RCFG guidance
    (``delta`` then applies; otherwise the table's delta is 1)."""
    noise = noise_schedule(scheduler_config)
    train = noise.num_train_timesteps
    grid = lcm_timesteps(num_inference_steps, train, original_inference_steps=max(50, num_inference_steps))
    timesteps = [int(grid[i]) for i in t_index_list]
    options = {"timesteps": timesteps}
    _, plan = make_plan("lcm", scheduler_config, len(timesteps), options)
    to_epsilon = residual and noise.prediction_type != "epsilon"
    guided_plan = make_plan("lcm", dict(scheduler_config, prediction_type="epsilon"), len(timesteps), options)[1] \
        if to_epsilon else plan
    table = guided_plan.coefficient_table(guidance_scale, delta if residual else 1.0, device=device)
    ab = [float(noise.alphas_cumprod[t]) for t in timesteps]
    return StreamSchedule(timesteps=timesteps, plan=plan, table=table, alpha=[math.sqrt(a) for a in ab],
                          sigma=[math.sqrt(1.0 - a) for a in ab], p_x=[c.p_x for c in plan.calls],
                          p_m=[c.p_m for c in plan.calls], to_epsilon=to_epsilon, start=dict(plan.info["start"]))
