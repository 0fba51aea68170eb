"""The sampler registry: name -> plan builder.

A builder is a pure function ``builder(schedule, num_steps, **options) -> SamplerPlan`` computing every
coefficient in float64 (see :mod:`velodiff.sampling.plan`). Names are the public ``sampler=`` values of the
blueprint; new ones are added, none renamed.
"""
from __future__ import annotations

from typing import Callable, Dict

from velodiff.sampling.plan import SamplerPlan

SAMPLERS: Dict[str, Callable[..., SamplerPlan]] = {}


def register(name: str):
    def deco(fn):
        if name in SAMPLERS:
            raise ValueError(f"sampler {name!r} registered twice")
        SAMPLERS[name] = fn
        return fn
    return deco


def build_plan(name: str, schedule, num_steps: int, **options) -> SamplerPlan:
    """The plan of sampler ``name`` for ``num_steps`` steps of ``schedule``; options are the builder's."""
    try:
        builder = SAMPLERS[name]
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose one of: {', '.join(sorted(SAMPLERS))}") from None
    return builder(schedule, num_steps, **options)


def _import_all() -> None:
    """Import every module of this package: importing a module registers its samplers."""
    import importlib
    import pkgutil
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")


_import_all()
