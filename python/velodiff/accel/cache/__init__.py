"""Cache gating: techniques that skip part of the denoiser on some steps and reuse what an earlier step computed.

Every cache is a :class:`CacheTechnique` (group ``"cache"``: one cache per pipeline). Decisions are keyed on the
sampler plan's step (``pipe.denoise_context``), per-call state lives in the call's context, and the DiT caches
decide on the device with ``velodiff::cache_gate`` (:mod:`velodiff.ops.cache_gate`).

UNet caches (SD 1.x / 2.x / SDXL, ``digits``): :mod:`.deepcache`, :mod:`.faster_diffusion`, :mod:`.tgate`.
DiT caches (DiT, PixArt, ``digits-dit``): :mod:`.fbcache`, :mod:`.teacache`, :mod:`.dbcache`, :mod:`.taylorseer`.
"""
import importlib as _importlib

from velodiff.accel.cache.base import CacheTechnique, denoiser_kind

__all__ = ["CacheTechnique", "denoiser_kind"]

#: the modules that register cache techniques (imported here so that TECHNIQUES lists them); a module that does
#: not exist yet is skipped
_MODULES = ("deepcache", "faster_diffusion", "tgate", "fbcache", "teacache", "dbcache", "taylorseer")
for _name in _MODULES:
    try:
        _module = _importlib.import_module(f"velodiff.accel.cache.{_name}")
    except ModuleNotFoundError as _e:
        if _e.name != f"velodiff.accel.cache.{_name}":
            raise
        continue
    for _public in getattr(_module, "__all__", ()):
        globals()[_public] = getattr(_module, _public)
        __all__.append(_public)
