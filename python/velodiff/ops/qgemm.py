"""Typed wrappers of ``velodiff::quantize_act`` and ``velodiff::qgemm``: argument checks, then the native ops.

The packed format (int4 nibbles / int8 codes, per-(row, group of 64) scales, the quantization rule and the GEMM
formula) is specified in csrc/include/velodiff/qgemm.h; :mod:`velodiff.ops.reference` holds the pure-PyTorch
specification (``reference.quantize_act``, ``reference.qgemm``, ``reference.pack_int4``, ...).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from velodiff.ops import reference
from velodiff.ops._checks import check_rows as _check_rows, check_tensor as _check_tensor, dtype_names as _dtype_names
from velodiff.ops._native import native_op

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BITS = (4, 8)




def _check_bits(bits) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if bits not in BITS:
        raise ValueError(f"bits must be 4 or 8, got {bits}")


def code_dtype(bits: int) -> torch.dtype:
    """The storage dtype of packed codes: uint8 (two int4 codes a byte) for 4 bits, int8 for 8 bits."""
    return torch.uint8 if bits == 4 else torch.int8


def check_quantize_act_args(x, smooth, lora_down, bits) -> None:
    """Raise a TypeError/ValueError naming the offending argument; shared by the wrapper and the tests."""
    _check_rows("x", x, MODEL_DTYPES)
    _check_bits(bits)
    k = x.shape[1]
    _check_tensor("smooth", smooth, (torch.float32,), (k,), x.device, optional=True)
    if lora_down is not None:
        if isinstance(lora_down, torch.Tensor) and (lora_down.dim() != 2 or lora_down.shape[0] != k):
            raise ValueError(f"lora_down must have shape [{k}, R] (K = x.shape[1]), got {list(lora_down.shape)}")
        _check_tensor("lora_down", lora_down, (x.dtype,), None, x.device)


def quantize_act(x: torch.Tensor, smooth: Optional[torch.Tensor] = None, lora_down: Optional[torch.Tensor] = None,
                 bits: int = 4) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize activations per (row, group of 64) and run the low-rank down projection (one pass over x).

    With K = x.shape[1], Kp = K rounded up to a multiple of 64 and R = lora_down.shape[1] (0 without it):

    Args:
        x: [M, K] float32 | float16 | bfloat16, contiguous (2-D: flatten leading dimensions first).
        smooth: None or float32 [K], the SVDQuant smoothing factor; the codes quantize ``x / smooth``.
        lora_down: None or [K, R] of x's dtype, multiplied with the *unsmoothed* x.
        bits: 4 or 8.
    Returns:
        (qx, ascales, lora_act):
        qx: bits 4: uint8 [M, Kp/2] (element 2j in the low nibble of byte j); bits 8: int8 [M, Kp];
        ascales: float32 [M, Kp/64]; lora_act: float32 [M, R] = x @ lora_down (shape [M, 0] without lora_down).
    The codes and scales are bit-exact with :func:`velodiff.ops.reference.quantize_act` on every backend.
    """
    check_quantize_act_args(x, smooth, lora_down, bits)
    return native_op("quantize_act")(x, smooth, lora_down, bits)


def check_qgemm_args(qx, ascales, qw, wscales, bias, lora_act, lora_up, lora_scales, bits, activation) -> None:
    """Raise a TypeError/ValueError naming the offending argument; shared by the wrapper and the tests."""
    _check_bits(bits)
    code = code_dtype(bits)
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str (one of {sorted(reference.QACTIVATIONS)}), "
                        f"got {type(activation).__name__}")
    if activation not in reference.QACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(reference.QACTIVATIONS)}, got {activation!r}")
    if not isinstance(qx, torch.Tensor):
        raise TypeError(f"qx must be a torch.Tensor, got {type(qx).__name__}")
    if qx.dtype != code:
        raise TypeError(f"qx must be {_dtype_names((code,))} for bits={bits}, got {qx.dtype}")
    if qx.dim() != 2:
        raise ValueError(f"qx must be 2-D [M, {'Kp/2' if bits == 4 else 'Kp'}], got shape {list(qx.shape)}")
    m, width = qx.shape
    kp = 2 * width if bits == 4 else width
    if kp % reference.QGROUP:
        raise ValueError(f"qx must hold whole groups of 64 codes per row ({'32' if bits == 4 else '64'} columns "
                         f"each), got {width} columns")
    ng = kp // reference.QGROUP
    device = qx.device
    _check_tensor("qx", qx, (code,), None, None)
    _check_tensor("ascales", ascales, (torch.float32,), (m, ng), device)
    if isinstance(qw, torch.Tensor) and qw.dtype == code and (qw.dim() != 2 or qw.shape[1] != width):
        raise ValueError(f"qw must have shape [N, {width}] (qx's packed width), got {list(qw.shape)}")
    _check_tensor("qw", qw, (code,), None, device)
    n = qw.shape[0]
    _check_tensor("wscales", wscales, MODEL_DTYPES, (n, ng), device)
    dtype = wscales.dtype
    _check_tensor("bias", bias, (dtype,), (n,), device, optional=True)
    if (lora_act is None) != (lora_up is None):
        raise ValueError(f"lora_act and lora_up must be given together (got lora_act "
                         f"{'None' if lora_act is None else 'set'}, lora_up {'None' if lora_up is None else 'set'})")
    r = 0
    if lora_act is not None:
        if isinstance(lora_act, torch.Tensor) and (lora_act.dim() != 2 or lora_act.shape[0] != m):
            raise ValueError(f"lora_act must have shape [{m}, R], got {list(lora_act.shape)}")
        _check_tensor("lora_act", lora_act, (torch.float32,), None, device)
        r = lora_act.shape[1]
        _check_tensor("lora_up", lora_up, (dtype,), (n, r), device)
    if lora_scales is not None:
        if lora_act is None:
            raise ValueError("lora_scales needs lora_act and lora_up")
        _check_tensor("lora_scales", lora_scales, (torch.float32,), (r,), device)


def qgemm(qx: torch.Tensor, ascales: torch.Tensor, qw: torch.Tensor, wscales: torch.Tensor,
          bias: Optional[torch.Tensor] = None, lora_act: Optional[torch.Tensor] = None,
          lora_up: Optional[torch.Tensor] = None, lora_scales: Optional[torch.Tensor] = None, bits: int = 4,
          activation: str = "none", packed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantized GEMM with fused low-rank branch, bias and activation (SVDQuant W4A4; W8A8 with ``bits=8``).

    y = act(sum_g ascales[:, g] * wscales[:, g] * (qx_g @ qw_g^T) + bias + (lora_act * lora_scales) @ lora_up^T),
    with exact integer products per group of 64 and fp32 accumulation (csrc/include/velodiff/qgemm.h).

    With Kp = 64 * ng (the padded K) and T the model dtype (wscales' dtype):

    Args:
        qx: packed activations from :func:`quantize_act`: bits 4: uint8 [M, Kp/2]; bits 8: int8 [M, Kp].
        ascales: float32 [M, ng].
        qw: packed weights, the same packing: bits 4: uint8 [N, Kp/2]; bits 8: int8 [N, Kp].
        wscales: [N, ng] float32 | float16 | bfloat16 (= T).
        bias: None or T [N].
        lora_act: None or float32 [M, R] (from :func:`quantize_act`); given together with ``lora_up``.
        lora_up: None or T [N, R].
        lora_scales: None (all ones) or float32 [R], per-rank strength; only with ``lora_act``.
        bits: 4 or 8.
        activation: "none", "gelu" (erf), "gelu_tanh" or "silu".
        packed: None, or :func:`qgemm_pack` of these qw, wscales, bias and lora_up (CPU only): the call then skips
            repacking the weights (a pack made on another code path is ignored; one made for other shapes is an
            error). The result is the same.
    All tensors contiguous and on one device.
    Returns:
        y: T [M, N].

    On CUDA the environment variable ``VELODIFF_QGEMM_TC`` picks the tensor-core instruction of 4-bit GEMMs
    (the results are the same): ``auto`` (default: int4 MMA below sm_90, int8 from sm_90 on), ``s4``
    (sm_80-89), ``s8`` (4-bit storage unpacked to int8), ``e4m3`` (unpacked to FP8, sm_89 and later), or
    ``wgmma-s8`` / ``wgmma-e4m3`` (the same unpackings on Hopper's warpgroup MMA; sm_90 with a 90a build; CTAs
    of 64 rows, or 128 with the suffix ``-128``).
    """
    check_qgemm_args(qx, ascales, qw, wscales, bias, lora_act, lora_up, lora_scales, bits, activation)
    if packed is not None:
        _check_tensor("packed", packed, (torch.uint8,), None, qx.device)
        if packed.dim() != 1:
            raise ValueError(f"packed must be 1-D (from qgemm_pack), got shape {list(packed.shape)}")
    return native_op("qgemm")(qx, ascales, qw, wscales, bias, lora_act, lora_up, lora_scales, bits,
                              reference.QACTIVATIONS[activation], packed)


def qgemm_pack(qw: torch.Tensor, wscales: torch.Tensor, bias: Optional[torch.Tensor] = None,
               lora_up: Optional[torch.Tensor] = None, bits: int = 4) -> torch.Tensor:
    """The weights of :func:`qgemm` (same arguments and shapes) in the CPU kernel's internal panel layout for the
    code path chosen now (AVX-512VNNI or AVX2), as uint8 [bytes] (empty on the portable path, which needs none).
    Pass it to qgemm as ``packed`` to skip the per-call repacking. CPU tensors only."""
    _check_bits(bits)
    code = code_dtype(bits)
    _check_tensor("qw", qw, (code,), None, None)
    if qw.device.type != "cpu":
        raise ValueError(f"qgemm_pack: qw is on {qw.device}; packed weights are a CPU format")
    if qw.dim() != 2:
        raise ValueError(f"qw must be 2-D [N, {'Kp/2' if bits == 4 else 'Kp'}], got shape {list(qw.shape)}")
    return native_op("qgemm_pack")(qw, wscales, bias, lora_up, bits)
