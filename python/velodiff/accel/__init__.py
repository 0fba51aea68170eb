"""Techniques applied to a pipeline with ``velodiff.optimize(pipe, *configs)`` and undone with
``velodiff.restore(pipe)``.

Each technique is a frozen dataclass config (torchao's verb-plus-config shape): ``check(pipe)`` says whether it
fits the pipeline, ``apply(pipe)`` changes the pipeline and returns a function that undoes exactly that change.
Configs are registered by name in :data:`TECHNIQUES`, so that the command line can take them as
``--optimize NAME[:key=value,...]`` (:func:`parse_technique`).
"""
from velodiff.accel.registry import (TECHNIQUES, Technique, applied, optimize, parse_technique, register, restore,
                                     technique_help)
from velodiff.accel.basic import AttentionBackend, CPUConvPrepack, SplitCFG
from velodiff.accel import cache  # noqa: E402,F401  (registers the cache techniques)
from velodiff.accel.highres.hidiffusion import HiDiffusion  # noqa: E402  (registers hidiffusion)
from velodiff.accel.tiled_vae import TiledVAE  # noqa: E402
from velodiff.accel.highres.tiled import FSTD, MultiDiffusion  # noqa: E402,F401  (registers multidiffusion, fstd)
from velodiff.accel.highres.linfusion import LinFusion  # noqa: E402,F401  (registers linfusion)

__all__ = ["TECHNIQUES", "Technique", "applied", "register", "parse_technique", "technique_help", "optimize", "restore",
           "AttentionBackend", "CPUConvPrepack", "SplitCFG", "HiDiffusion", "TiledVAE"]
