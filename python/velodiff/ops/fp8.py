"""Typed wrappers of ``velodiff::quantize_fp8``, ``velodiff::fp8_gemm`` and ``velodiff::fp8_attention``: argument
checks, then the native ops.

The format (OCP FP8 e4m3 / e5m2 codes stored as torch.float8_e4m3fn / torch.float8_e5m2, one float32 scale per row,
the rounding rule and the GEMM formula) is specified in csrc/include/velodiff/fp8.h; :mod:`velodiff.ops.reference`
holds the pure-PyTorch specification (``reference.encode_fp8``, ``reference.quantize_fp8``, ``reference.fp8_gemm``,
``reference.fp8_attention``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from velodiff.ops import reference
from velodiff.ops._checks import check_rows as _check_rows, check_tensor as _check_tensor, dtype_names as _dtype_names
from velodiff.ops._native import native_op
from velodiff.ops.attention import attention_unsupported

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_DTYPES = tuple(reference.FP8_DTYPES.values())


def check_quantize_fp8_args(x, format) -> None:
    """Raise a TypeError/ValueError naming the offending argument; shared by the wrapper and the tests."""
    _check_rows("x", x, MODEL_DTYPES)
    if not isinstance(format, str):
        raise TypeError(f"format must be a str ('e4m3' or 'e5m2'), got {type(format).__name__}")
    if format not in reference.FP8_DTYPES:
        raise ValueError(f"format must be 'e4m3' or 'e5m2', got {format!r}")


def quantize_fp8(x: torch.Tensor, format: str = "e4m3") -> Tuple[torch.Tensor, torch.Tensor]:
    """Dynamic FP8 quantization with one scale per row (per token for activations, per output channel for weights).

    Args:
        x: [M, K] float32 | float16 | bfloat16, contiguous.
        format: "e4m3" (largest 448; what inference uses) or "e5m2" (largest 57344).
    Returns:
        (codes, scales): codes [M, K] torch.float8_e4m3fn | torch.float8_e5m2; scales float32 [M] with
        x ~= codes.float() * scales[:, None]; scales[m] = max |x[m]| / largest code. Bit-exact with
        :func:`velodiff.ops.reference.quantize_fp8` on every backend (round to nearest even, saturation, NaN and
        inf as csrc/include/velodiff/fp8.h states).
    """
    check_quantize_fp8_args(x, format)
    return native_op("quantize_fp8")(x, format)


def check_fp8_gemm_args(a, ascales, w, wscales, bias, out_dtype, activation, w_table=None) -> None:
    """Raise a TypeError/ValueError naming the offending argument; shared by the wrapper and the tests."""
    if not isinstance(activation, str):
        raise TypeError(f"activation must be a str (one of {sorted(reference.QACTIVATIONS)}), "
                        f"got {type(activation).__name__}")
    if activation not in reference.QACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(reference.QACTIVATIONS)}, got {activation!r}")
    if out_dtype not in MODEL_DTYPES:
        raise TypeError(f"out_dtype must be {_dtype_names(MODEL_DTYPES)}, got {out_dtype}")
    w_dtypes = (torch.uint8,) if w_table is not None else FP8_DTYPES
    for name, t, dtypes in (("a", a, FP8_DTYPES), ("w", w, w_dtypes)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in dtypes:
            what = "4-bit indices, as w_table is given" if w_table is not None else "FP8 codes from quantize_fp8"
            raise TypeError(f"{name} must be {_dtype_names(dtypes)} ({what}), got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [{'M' if name == 'a' else 'N'}, K], got shape {list(t.shape)}")
    m, k = a.shape
    wk = (k + 1) // 2 if w_table is not None else k
    if w.shape[1] != wk:
        detail = "two 4-bit indices per byte, K = a.shape[1]" if w_table is not None else "K = a.shape[1]"
        raise ValueError(f"w must have shape [N, {wk}] ({detail}), got {list(w.shape)}")
    device = a.device
    _check_tensor("a", a, FP8_DTYPES, None, None)
    _check_tensor("w", w, w_dtypes, None, device)
    _check_tensor("w_table", w_table, (torch.float8_e4m3fn,), (16,), device, optional=True)
    _check_tensor("ascales", ascales, (torch.float32,), (m,), device)
    _check_tensor("wscales", wscales, (torch.float32,), (w.shape[0],), device)
    _check_tensor("bias", bias, (out_dtype,), (w.shape[0],), device, optional=True)


def fp8_gemm(a: torch.Tensor, ascales: torch.Tensor, w: torch.Tensor, wscales: torch.Tensor,
             bias: Optional[torch.Tensor] = None, out_dtype: torch.dtype = torch.float32,
             activation: str = "none", w_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """FP8 GEMM with fp32 accumulation and a fused epilogue (csrc/include/velodiff/fp8.h); W4A8 with ``w_table``.

    y = act((a @ w^T) * (ascales[:, None] * wscales[None, :]) + bias), every product exact.

    Args:
        a: [M, K] FP8 codes (torch.float8_e4m3fn or torch.float8_e5m2), from :func:`quantize_fp8`.
        ascales: float32 [M].
        w: [N, K] FP8 codes (either format), e.g. quantize_fp8 of a linear layer's weight; with ``w_table``,
            uint8 [N, ceil(K / 2)] 4-bit indices (element 2j in the low nibble of byte j) into the table.
        wscales: float32 [N].
        bias: None or out_dtype [N].
        out_dtype: torch.float32 | torch.float16 | torch.bfloat16, the dtype of y.
        activation: "none", "gelu" (erf), "gelu_tanh" or "silu".
        w_table: None, or float8_e4m3fn [16]: the values of a 4-bit weight format (e2m1, e3m0, int4, ...; see
            :func:`velodiff.quant.lowbit_fp.format_table`).
    All tensors contiguous and on one device.
    Returns:
        y: out_dtype [M, N].
    """
    check_fp8_gemm_args(a, ascales, w, wscales, bias, out_dtype, activation, w_table)
    return native_op("fp8_gemm")(a, ascales, w, wscales, bias, out_dtype, reference.QACTIVATIONS[activation],
                                 w_table)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None) -> torch.Tensor:
    """FP8 attention: Q and K per token, P with the fixed scale 1/448 (before normalisation) and V per channel in
    e4m3, fp32 accumulation (csrc/include/velodiff/fp8.h; :func:`velodiff.ops.reference.fp8_attention`).

    Arguments and result as :func:`velodiff.ops.attention.attention`: q [B, H, Lq, D], k [B, H, Lk, D],
    v [B, H, Lk, Dv] float32 | float16 | bfloat16 (one dtype), any strides, 1 <= D, Dv <= 512; key_padding_mask
    bool [B, Lk] (True = attend) or None; scale > 0 or None (1 / sqrt(D)). Returns [B, H, Lq, Dv] in q's dtype
    (stored as [B, Lq, H, Dv]); a query whose keys are all masked gives zeros.
    """
    problem = attention_unsupported(q, k, v, key_padding_mask, scale)
    if problem is not None:
        raise problem[0](problem[1])
    return native_op("fp8_attention")(q, k, v, key_padding_mask, None if scale is None else float(scale))
