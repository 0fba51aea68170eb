"""velodiff: fast, correct diffusion inference on PyTorch.

``import velodiff`` is cheap (no torch): the subpackages (``ops``, ``sampling``, ``accel``, ``quant``,
``pipelines``, ``loading``, ``models``, ``eval``, ``lora``, ``stream``, ``serve``, ``interop``) and the names below
load on first use (PEP 562), so that ``velodiff --help`` answers at once. The native ops (``torch.ops.velodiff.*``) are registered when
:mod:`velodiff.ops` is imported, which every velodiff module that runs them does; code that calls
``torch.ops.velodiff.*`` directly imports ``velodiff.ops`` first.
"""
import importlib as _importlib

from velodiff._version import __version__
from velodiff.info import info

#: public name -> the module that defines it, imported on first access
_LAZY_NAMES = {"optimize": "velodiff.accel", "restore": "velodiff.accel", "Pipeline": "velodiff.pipelines",
               "PipelineOutput": "velodiff.pipelines", "from_diffusers": "velodiff.interop",
               "to_diffusers": "velodiff.interop"}
_SUBPACKAGES = ("ops", "sampling", "accel", "quant", "pipelines", "loading", "models", "eval", "lora", "stream",
                "serve", "interop")


def __getattr__(name):
    if name in _SUBPACKAGES:
        return _importlib.import_module(f"velodiff.{name}")
    if name in _LAZY_NAMES:
        value = getattr(_importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'velodiff' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_NAMES) | set(_SUBPACKAGES))


__all__ = ["__version__", "info", "ops", "sampling", "accel", "quant", "lora", "stream", "serve", "interop",
           "optimize", "restore", "Pipeline", "PipelineOutput", "from_diffusers", "to_diffusers"]
