"""The sampler registry: name -> plan builder.

A builder is a pure function ``builder(schedule, num_steps, **options) -> SamplerPlan`` computing every
coefficient in float64 (see :mod:`velodiff.sampling.plan`). Names are the public ``sampler=`` values of the
blueprint; new ones are added, none renamed.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Optional, Tuple

from velodiff.sampling import schedules as sch
from velodiff.sampling.plan import SamplerPlan

SAMPLERS: Dict[str, Callable[..., SamplerPlan]] = {}

#: Where each sampler's timesteps come from, which sets how many steps it can take (:func:`max_num_steps`):
#: ``ddim`` / ``multistep`` / ``euler``: the spacings of :func:`velodiff.sampling.schedules.spaced_steps_limit`;
#: ``lcm``: the distillation grid; ``continuous``: only :data:`~velodiff.sampling.schedules.MAX_NUM_STEPS`.
#: Multistep samplers with Karras / exponential sigmas are continuous too. Every registered sampler has an entry
#: (tests/sampling/test_step_limits.py checks it).
TIMESTEP_SOURCE = {
    "ddim": "ddim", "bdia": "ddim", "ghvb": "ddim", "ddpm": "ddim",
    "dpm_solver_1": "multistep", "dpm_solver_2": "multistep", "dpm_solver_3": "multistep",
    "dpmpp_2m": "multistep", "dpmpp_3m": "multistep", "dpmpp_3m_exact": "multistep", "dpmpp_2m_sde": "multistep",
    "unipc": "multistep",
    "euler": "euler", "euler_a": "euler", "heun": "euler",
    "lcm": "lcm",
    "flow_euler": "continuous",
}


def register(name: str):
    def deco(fn):
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} registered twice")
        SAMPLERS[name] = fn
        return fn
    return deco


def _builder(name: str) -> Callable[..., SamplerPlan]:
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}") from None


def steps_limit(name: str, schedule, **options) -> Optional[Tuple[int, str]]:
    """(the most steps sampler ``name`` can take on ``schedule`` with ``options``, why); None when explicit
    ``sigmas`` / ``timesteps`` fix the count. See :func:`max_num_steps`."""
    builder = _builder(name)
    params = inspect.signature(builder).parameters
    opts: Dict[str, Any] = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    opts.update(options)
    if opts.get("sigmas") is not None or opts.get("timesteps") is not None:
        return None
    cap = (sch.MAX_NUM_STEPS, f"velodiff.sampling.schedules.MAX_NUM_STEPS = {sch.MAX_NUM_STEPS}")
    source = TIMESTEP_SOURCE.get(name, "continuous")
    if source == "multistep" and opts.get("sigma_schedule", "default") != "default":
        source = "continuous"  # Karras / exponential sigmas: any count, timesteps interpolated
    if source == "continuous":
        return cap
    if source == "lcm":
        grid = int(opts["original_inference_steps"] * opts["strength"])
        return min((grid, f"LCM samples from its distillation grid of original_inference_steps x strength = "
                          f"{opts['original_inference_steps']} x {opts['strength']} = {grid} timesteps"), cap)
    return sch.spaced_steps_limit(source, schedule.num_train_timesteps, opts["spacing"],
                                  int(opts.get("steps_offset", 0)))


def max_num_steps(name: str, schedule, **options) -> Optional[int]:
    """The largest ``num_steps`` that :func:`build_plan` accepts for sampler ``name`` on ``schedule`` with these
    builder ``options`` (every count from 1 up to it works); None when explicit ``sigmas`` / ``timesteps`` fix
    the count. Discrete spacings are limited by the distinct timesteps they give (e.g. 999 for ``dpmpp_2m`` with
    ``linspace`` spacing on a 1000-step schedule: it needs N + 1 grid points), everything by
    :data:`velodiff.sampling.schedules.MAX_NUM_STEPS`."""
    limit = steps_limit(name, schedule, **options)
    return None if limit is None else limit[0]


def build_plan(name: str, schedule, num_steps: int, **options) -> SamplerPlan:
    """The plan of sampler ``name`` for ``num_steps`` steps of ``schedule``; options are the builder's.

    A ValueError naming ``num_inference_steps`` (with the maximum and why) when ``num_steps`` is not a positive
    integer or is more than the sampler can take on this schedule (:func:`max_num_steps`), before anything is
    computed."""
    builder = _builder(name)
    if num_steps is not None:
        sch.check_num_steps(num_steps)
        limit = steps_limit(name, schedule, **options)
        if limit is not None:
            sch.check_steps_limit(int(num_steps), limit, f"sampler {name!r} on this schedule")
    plan = builder(schedule, num_steps, **options)
    plan.info.setdefault("begin", int(options.get("begin", 0) or 0))  # where this run starts in the N steps
    return plan


def _import_all() -> None:
    """Import every module of this package: importing a module registers its samplers."""
    import importlib
    import pkgutil
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


_import_all()
