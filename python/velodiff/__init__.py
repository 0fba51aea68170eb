"""velodiff: fast, correct diffusion inference on PyTorch."""
from velodiff._version import __version__
from velodiff import ops, sampling
from velodiff.info import info

__all__ = ["__version__", "info", "ops", "sampling"]
