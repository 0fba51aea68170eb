"""Interop with diffusers: velodiff pipelines over diffusers' modules and back, sharing the weights (no copy),
and any velodiff sampler as a diffusers scheduler.

- :func:`from_diffusers` (a diffusers SD / SDXL / DiT / PixArt pipeline -> the velodiff pipeline over the same
  weight storage),
- :func:`to_diffusers` (a velodiff SD 1.x / 2.x / SDXL pipeline -> a diffusers pipeline over the same storage),
- :class:`DiffusersScheduler` (a velodiff sampler behind diffusers' scheduler interface).

Nothing here imports diffusers except :func:`to_diffusers`, which builds diffusers objects.
"""
from velodiff.interop.from_diffusers import from_diffusers
from velodiff.interop.scheduler import DiffusersScheduler, SchedulerStepOutput
from velodiff.interop.to_diffusers import to_diffusers

__all__ = ["from_diffusers", "to_diffusers", "DiffusersScheduler", "SchedulerStepOutput"]
