"""velodiff ops: typed wrappers over the native kernels (``torch.ops.velodiff.*``).

Each wrapper checks its arguments (a TypeError/ValueError naming the argument) and calls the CPU or CUDA
kernel. :mod:`velodiff.ops.reference` holds the pure-PyTorch specification of every op.
"""
from velodiff.ops._native import native_available
from velodiff.ops.attention import attention
from velodiff.ops.cache_gate import CacheGate, cache_gate
from velodiff.ops.fp8 import fp8_attention, fp8_gemm, quantize_fp8
from velodiff.ops.linear_attention import linear_attention
from velodiff.ops.qgemm import qgemm, qgemm_pack, quantize_act
from velodiff.ops.sampler_update import sampler_update
from velodiff.ops.window_attention import window_attention

__all__ = ["native_available", "attention", "cache_gate", "CacheGate", "fp8_attention", "fp8_gemm", "qgemm", "qgemm_pack", "quantize_act",
           "quantize_fp8", "sampler_update", "linear_attention", "window_attention"]
