"""velodiff: fast, correct diffusion inference on PyTorch."""
from velodiff._version import __version__
from velodiff import ops, sampling
from velodiff.info import info
from velodiff import accel, quant
from velodiff.accel import optimize, restore
from velodiff.pipelines import Pipeline, PipelineOutput

__all__ = ["__version__", "info", "ops", "sampling", "accel", "quant", "optimize", "restore", "Pipeline", "PipelineOutput"]
