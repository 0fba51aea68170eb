"""From a diffusers ``scheduler_config.json`` to velodiff's noise schedule and sampler options."""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional, Tuple

from velodiff.sampling import NoiseSchedule, SAMPLERS, build_plan
from velodiff.sampling.plan import SamplerPlan

# diffusers scheduler class -> the velodiff sampler that matches its default configuration.
SCHEDULER_TO_SAMPLER = {
    "DDIMScheduler": "ddim",
    "DDPMScheduler": "ddpm",
    "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a",
    "HeunDiscreteScheduler": "heun",
    "DPMSolverMultistepScheduler": "dpmpp_2m",
    "DPMSolverSinglestepScheduler": "dpm_solver_2",
    "UniPCMultistepScheduler": "unipc",
    "LCMScheduler": "lcm",
    "FlowMatchEulerDiscreteScheduler": "flow_euler",
}
DEFAULT_SAMPLER = "dpmpp_2m"


def noise_schedule(config: Dict[str, Any]) -> NoiseSchedule:
    """The training schedule of a diffusers scheduler config (trained betas are not supported)."""
    if config.get("trained_betas") is not None:
        raise ValueError("scheduler config with trained_betas is not supported")
    return NoiseSchedule.from_config(
        beta_schedule=config.get("beta_schedule", "linear"),
        num_train_timesteps=int(config.get("num_train_timesteps", 1000)),
        beta_start=float(config.get("beta_start", 0.0001)), beta_end=float(config.get("beta_end", 0.02)),
        prediction_type=config.get("prediction_type", "epsilon"),
        rescale_betas_zero_snr=bool(config.get("rescale_betas_zero_snr", False)))


def sampler_options(config: Dict[str, Any]) -> Dict[str, Any]:
    """Options implied by a scheduler config, under velodiff's option names (filtered per builder later)."""
    opts: Dict[str, Any] = {}
    if "timestep_spacing" in config:
        opts["spacing"] = config["timestep_spacing"]
    if "steps_offset" in config:
        opts["steps_offset"] = int(config["steps_offset"])
    if "set_alpha_to_one" in config:
        opts["set_alpha_to_one"] = bool(config["set_alpha_to_one"])
    if config.get("use_karras_sigmas"):
        opts["sigma_schedule"] = "karras"
    elif config.get("use_exponential_sigmas"):
        opts["sigma_schedule"] = "exponential"
    if "final_sigmas_type" in config:
        opts["final_sigma"] = config["final_sigmas_type"]
    for key in ("lower_order_final", "euler_at_final", "solver_type", "original_inference_steps",
                "timestep_scaling", "shift", "variance_type"):
        if config.get(key) is not None:  # None means "this scheduler's default" (e.g. DPM's variance_type)
            opts[key] = config[key]
    return opts


# solver_type values each sampler family takes, and what another family's value maps to (as diffusers'
# from_config does: DPM-Solver turns bh1/bh2/logrho into midpoint, UniPC turns midpoint/heun/logrho into bh2).
SOLVER_TYPES = {"unipc": (("bh1", "bh2"), "bh2")}
for _name in ("dpm_solver_1", "dpm_solver_2", "dpm_solver_3", "dpmpp_2m", "dpmpp_3m", "dpmpp_3m_exact",
              "dpmpp_2m_sde"):
    SOLVER_TYPES[_name] = (("midpoint", "heun"), "midpoint")


def accepted(builder, options: Dict[str, Any]) -> Dict[str, Any]:
    """The options ``builder`` takes (its keyword parameters)."""
    params = inspect.signature(builder).parameters
    return {k: v for k, v in options.items() if k in params}


def make_plan(sampler: Optional[str], scheduler_config: Dict[str, Any], num_steps: int,
              overrides: Optional[Dict[str, Any]] = None) -> Tuple[str, SamplerPlan]:
    """(sampler name, plan): ``sampler`` or the folder's scheduler, with the folder's spacing etc. plus the
    caller's ``overrides`` (which must all be accepted by the sampler). A step count the schedule cannot give is a
    ValueError naming ``num_inference_steps`` with the maximum (:func:`velodiff.sampling.build_plan`)."""
    if sampler is not None and not isinstance(sampler, str):
        raise TypeError(f"sampler must be a str (one of {', '.join(sorted(SAMPLERS))}), got "
                        f"{type(sampler).__name__}")
    if overrides is not None and not isinstance(overrides, dict):
        raise TypeError(f"sampler_options must be a dict of the sampler's options, got {type(overrides).__name__}")
    name = sampler or SCHEDULER_TO_SAMPLER.get(scheduler_config.get("_class_name"), DEFAULT_SAMPLER)
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}")
    builder = SAMPLERS[name]
    options = accepted(builder, sampler_options(scheduler_config))
    if "solver_type" in options and name in SOLVER_TYPES:
        allowed, fallback = SOLVER_TYPES[name]
        if options["solver_type"] not in allowed:
            options["solver_type"] = fallback
    for key, value in (overrides or {}).items():
        if key not in inspect.signature(builder).parameters:
            raise ValueError(f"sampler {name!r} has no option {key!r}")
        options[key] = value
    return name, build_plan(name, noise_schedule(scheduler_config), num_steps, **options)
