"""The configuration side of :class:`velodiff.interop.DiffusersScheduler`: which noise schedule and sampler it runs,
as a diffusers-style config (a dict readable as attributes, ``scheduler.config.num_train_timesteps``).

A DiffusersScheduler keeps two things apart: the *schedule config*, the diffusers scheduler config it was given
(``beta_schedule``, ``timestep_spacing``, ``steps_offset``, ``prediction_type``, ... and that scheduler's
``_class_name``), which is handed unchanged to :func:`velodiff.pipelines.scheduling.make_plan` exactly as a velodiff
pipeline hands its folder's ``scheduler_config.json``; and its own *config*, that schedule config plus
``sampler``, ``sampler_options`` and ``schedule_class_name`` (the given ``_class_name``), under
``_class_name = "DiffusersScheduler"``, from which :meth:`DiffusersScheduler.from_config` rebuilds it.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Mapping, Optional, Tuple

from velodiff.models.config import ModelConfig
from velodiff.pipelines.scheduling import DEFAULT_SAMPLER, SCHEDULER_TO_SAMPLER, noise_schedule
from velodiff.sampling import SAMPLERS

CLASS_NAME = "DiffusersScheduler"
#: the schedule of Stable Diffusion 1.x / 2.x / XL (velodiff's ``NoiseSchedule.sd()``), used when no config is given
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
#: keys of a DiffusersScheduler config that are not part of the schedule config
OWN_KEYS = ("_class_name", "sampler", "sampler_options", "schedule_class_name")
#: bookkeeping keys of diffusers' in-memory configs that a saved config does not have
DROPPED_KEYS = ("_use_default_values",)


#: a dict whose keys read as attributes too (``config.num_train_timesteps``), as diffusers' ``FrozenDict``
SchedulerConfig = ModelConfig


def schedule_config_of(scheduler_config) -> Dict[str, Any]:
    """The schedule config (a plain dict) of ``scheduler_config``: None (Stable Diffusion's schedule,
    :data:`SD_SCHEDULE`), a diffusers scheduler config (a dict or diffusers' ``FrozenDict``), a DiffusersScheduler
    config, or a scheduler object with a ``.config`` (a diffusers scheduler or a DiffusersScheduler). TypeError
    naming ``scheduler_config`` for anything else; ValueError for a schedule velodiff cannot build (trained betas,
    an unknown ``beta_schedule`` or ``prediction_type``)."""
    if scheduler_config is None:
        return dict(SD_SCHEDULE)
    schedule = getattr(scheduler_config, "schedule_config", None)  # a DiffusersScheduler
    if isinstance(schedule, Mapping):
        return dict(schedule)
    class_name = None
    if not isinstance(scheduler_config, Mapping) and isinstance(getattr(scheduler_config, "config", None), Mapping):
        class_name = type(scheduler_config).__name__  # a diffusers scheduler object: its config may lack the name
        scheduler_config = scheduler_config.config
    if not isinstance(scheduler_config, Mapping):
        raise TypeError(f"scheduler_config must be a diffusers scheduler config (a dict), a scheduler with a "
                        f".config, or None, got {type(scheduler_config).__name__}")
    config = {k: v for k, v in scheduler_config.items() if k not in DROPPED_KEYS}
    if class_name is not None:
        config.setdefault("_class_name", class_name)
    if config.get("_class_name") == CLASS_NAME:  # a DiffusersScheduler's own config: take its schedule back out
        source = config.get("schedule_class_name")
        config = {k: v for k, v in config.items() if k not in OWN_KEYS}
        if source is not None:
            config["_class_name"] = source
    try:
        noise_schedule(config)
    except (TypeError, ValueError) as e:
        raise ValueError(f"scheduler_config: {e}") from None
    return config


def resolve_sampler(sampler: Optional[str], schedule_config: Mapping[str, Any]) -> str:
    """The sampler name: ``sampler``, or for None the one a velodiff pipeline picks for this config (the sampler
    matching its ``_class_name``, else velodiff's default). ValueError naming ``sampler`` for an unknown name."""
    if sampler is None:
        sampler = SCHEDULER_TO_SAMPLER.get(schedule_config.get("_class_name"), DEFAULT_SAMPLER)
    if not isinstance(sampler, str) or sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is not a velodiff sampler; choose one of: "
                         f"{', '.join(sorted(SAMPLERS))}")
    return sampler


def check_sampler_options(sampler: str, options: Mapping[str, Any]) -> Dict[str, Any]:
    """``options`` as a dict, each one a keyword option of the sampler's plan builder. ValueError naming the option
    otherwise, for ``begin`` (a diffusers pipeline sets the starting point through ``set_begin_index``) and for
    ``warm_start=True`` (it needs a history of earlier predictions, which a diffusers loop does not have)."""
    params = inspect.signature(SAMPLERS[sampler]).parameters
    known = [k for k, p in params.items() if p.kind == p.KEYWORD_ONLY and k != "begin"]
    for key, value in options.items():
        if key == "begin":
            raise ValueError("sampler option 'begin' cannot be given: diffusers' image-to-image pipelines set the "
                             "starting point through scheduler.set_begin_index")
        if key == "warm_start" and value:
            raise ValueError("sampler option warm_start=True needs the predictions before the start point "
                             "(run_plan's initial_history), which a diffusers loop does not provide")
        if key not in known:
            raise ValueError(f"sampler {sampler!r} has no option {key!r}; its options: {', '.join(known)}")
    return dict(options)


def own_config(sampler: str, options: Mapping[str, Any], schedule_config: Mapping[str, Any]) -> SchedulerConfig:
    """A DiffusersScheduler's config: the schedule config's keys (``num_train_timesteps`` etc., which diffusers'
    pipelines read) plus ``sampler``, ``sampler_options`` and ``schedule_class_name``."""
    config = {k: v for k, v in schedule_config.items() if not k.startswith("_")}
    config.setdefault("num_train_timesteps", int(noise_schedule(dict(schedule_config)).num_train_timesteps))
    config.update(_class_name=CLASS_NAME, sampler=sampler, sampler_options=dict(options),
                  schedule_class_name=schedule_config.get("_class_name"))
    return SchedulerConfig(config)


def split_config(config: Mapping[str, Any], overrides: Mapping[str, Any]) -> Tuple[Optional[str], Dict[str, Any]]:
    """(sampler, sampler options) that :meth:`DiffusersScheduler.from_config` takes from ``config`` (a
    DiffusersScheduler config, else none) and ``overrides`` (its keyword arguments, which win; the config's options
    are kept only for the config's own sampler)."""
    overrides = dict(overrides)
    own = isinstance(config, Mapping) and config.get("_class_name") == CLASS_NAME
    stored = config.get("sampler") if own else None
    sampler = overrides.pop("sampler", stored)
    options = dict(config.get("sampler_options") or {}) if own and sampler == stored else {}
    options.update(overrides)
    return sampler, options
