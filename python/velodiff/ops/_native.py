"""Loads the native module ``velodiff._C`` (which registers the ``velodiff::*`` ops) and the fake kernels.

Setting ``VELODIFF_REFERENCE_OPS=1`` makes :func:`native_op` return the pure-PyTorch references instead:
a debugging aid for comparing a whole pipeline against the specification, never the default.
"""
from __future__ import annotations

import os
from typing import Callable

import torch

_LOAD_ERROR = None
try:
    from velodiff import _C  # noqa: F401  (importing registers the ops with torch)
except ImportError as exc:  # pragma: no cover - exercised only on broken installs
    _C = None
    _LOAD_ERROR = exc


def native_available() -> bool:
    return _C is not None


def use_reference() -> bool:
    return os.environ.get("VELODIFF_REFERENCE_OPS", "0") not in ("", "0")


def native_op(name: str) -> Callable:
    """The callable for ``velodiff::<name>``; a clear error when the extension did not build."""
    if use_reference():
        from velodiff.ops import reference
        return getattr(reference, name)
    if _C is None:
        raise RuntimeError(
            f"velodiff's native extension is not importable ({_LOAD_ERROR}); reinstall with "
            "`pip install --no-build-isolation .` and check `velodiff info`, or set VELODIFF_REFERENCE_OPS=1 "
            "to run the pure-PyTorch references")
    return getattr(torch.ops.velodiff, name)


if _C is not None:
    @torch.library.register_fake("velodiff::sampler_update")
    def _sampler_update_fake(x, cond, uncond, anchor, noise, history, coef, write_slot, guidance_rescale,
                             want_y):
        y = torch.empty_like(x) if want_y else x.new_empty((0,))
        return torch.empty_like(x), y

    @torch.library.register_fake("velodiff::quantize_act")
    def _quantize_act_fake(x, smooth, lora_down, bits):
        m, k = x.shape
        kp = (k + 63) // 64 * 64
        if bits == 4:
            qx = x.new_empty((m, kp // 2), dtype=torch.uint8)
        else:
            qx = x.new_empty((m, kp), dtype=torch.int8)
        r = 0 if lora_down is None else lora_down.shape[1]
        return qx, x.new_empty((m, kp // 64), dtype=torch.float32), x.new_empty((m, r), dtype=torch.float32)

    @torch.library.register_fake("velodiff::qgemm")
    def _qgemm_fake(qx, ascales, qw, wscales, bias, lora_act, lora_up, lora_scales, bits, activation, packed=None):
        return wscales.new_empty((qx.shape[0], qw.shape[0]))

    @torch.library.register_fake("velodiff::quantize_fp8")
    def _quantize_fp8_fake(x, format="e4m3"):
        dtype = torch.float8_e4m3fn if format == "e4m3" else torch.float8_e5m2
        return x.new_empty(x.shape, dtype=dtype), x.new_empty((x.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("velodiff::fp8_gemm")
    def _fp8_gemm_fake(a, ascales, w, wscales, bias, out_dtype, activation=0, w_table=None):
        return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)

    @torch.library.register_fake("velodiff::cache_gate")
    def _cache_gate_fake(probe, stored, state, threshold, coefficients, flags):
        return probe.new_empty((1,), dtype=torch.int32)

    @torch.library.register_fake("velodiff::attention")
    def _attention_fake(q, k, v, key_padding_mask=None, scale=None):
        b, h, lq, _ = q.shape
        # [B, H, Lq, Dv] stored as [B, Lq, H, Dv], as the kernels allocate it
        return q.new_empty((b, lq, h, v.shape[3])).permute(0, 2, 1, 3)

    torch.library.register_fake("velodiff::fp8_attention")(_attention_fake)  # the same arguments and output

    @torch.library.register_fake("velodiff::linear_attention")
    def _linear_attention_fake(q, k, v, kind="linfusion", eps=None):
        b, h, nq, _ = q.shape
        # [B, H, Nq, Dv] stored as [B, Nq, H, Dv], as the kernels allocate it
        return q.new_empty((b, nq, h, v.shape[3])).permute(0, 2, 1, 3)

    @torch.library.register_fake("velodiff::window_attention")
    def _window_attention_fake(q, k, v, size, window, shift=(0, 0), scale=None):
        b, h, n, _ = q.shape
        # [B, H, L, Dv] stored as [B, L, H, Dv], as the kernels allocate it
        return q.new_empty((b, n, h, v.shape[3])).permute(0, 2, 1, 3)
