"""CPU conv weight prepacking (oneDNN), opt-in and reversible.

``torch.nn.functional.conv2d`` on CPU hands oneDNN a plain weight that oneDNN reorders to its blocked layout on
every call; for the UNet's wide, low-resolution convs (1280 channels at 8x8) that reorder costs more than the
convolution itself. :func:`prepack_convs` reorders each ``nn.Conv2d`` weight once and runs the same oneDNN
convolution on the packed copy (bit-identical results on the inputs tested). The packed copy is rebuilt when the
weight changes (``load_state_dict``, in-place edits), and it is used only for CPU fp32/bf16 inference; anything
else (autograd, CUDA, other dtypes) takes the ordinary path. Memory: one extra copy of the conv weights.
Packed convs return channels-last tensors, so use them on a channels-last model
(``model.to(memory_format=torch.channels_last)``). The ops are torch's private oneDNN ops (those inductor's CPU
backend uses); :func:`prepack_convs` raises when a build lacks them.

    prepack_convs(unet)   # -> number of convs packed
    unprepack_convs(unet) # back to plain nn.Conv2d

The same for ``nn.Linear`` (:func:`prepack_linears`, :class:`PackedLinear`): oneDNN's GEMM on a weight reordered
once. In bf16 it gives ``nn.Linear``'s bits on contiguous inputs (SD 1.5 UNet step at 256 px 4.7 % faster). In fp32
it sums in another order than ``F.linear`` (MKL's sgemm), so the results differ within fp32 rounding, and it is
1.4-2.1x faster than MKL at the UNet's linear shapes on an AMD Zen 4 CPU (measured: 2048x320x320 to 512x640x5120),
where MKL's sgemm lags (OpenVINO's fp32 layers run MLAS for the same reason; MKL's own packed GEMM gained under 1 %).
"""
from __future__ import annotations

import functools

import torch
from torch import nn


@functools.lru_cache(maxsize=None)  # the torch build does not change: looked up once, not per call
def _available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_convolution_weight"))


def _weight_key(w: torch.Tensor, *extra) -> tuple:
    """What the packed copy of ``w`` depends on. Inference tensors (made under ``torch.inference_mode``, e.g. a
    model loaded there) carry no version counter: for them a new tensor or storage repacks, but an in-place edit
    made inside inference mode is not seen (call :func:`unprepack_convs` / :func:`prepack_convs` after one)."""
    return (w.data_ptr(), None if w.is_inference() else w._version, w.dtype, *extra)


#: attributes holding packed copies (and their keys): never copied or pickled, rebuilt on the next call
_PACK_ATTRS = ("_packed", "_pack_key", "_packed_key", "_token_packed", "_token_packed_key")


class _DropsPacks:
    """copy.deepcopy / pickle of a packed module leave its packed copies behind (oneDNN's opaque tensors cannot
    be copied; the copy packs again on its first call)."""

    def __getstate__(self):
        state = super().__getstate__()
        return {k: v for k, v in state.items() if k not in _PACK_ATTRS}


def _linear_usable(x: torch.Tensor, weight: torch.Tensor, in_features: int) -> bool:
    """Whether oneDNN's packed linear can run ``x`` [..., in_features]: CPU fp32 / bf16 inference, x in the weight's
    dtype, at least one row."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.dtype == weight.dtype
            and x.dim() >= 2 and x.shape[-1] == in_features and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)))


def _packed_linear(module: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias, slot: str) -> torch.Tensor:
    """x [..., K] @ weight [N, K]^T + bias through oneDNN on a copy of ``weight`` reordered once per row count
    (kept on ``module`` under the attribute names ``slot`` and ``slot + '_key'``)."""
    in_features, out_features = weight.shape[1], weight.shape[0]
    rows = x.numel() // in_features
    key = _weight_key(weight, rows)  # oneDNN picks the packed layout for the row count
    if module.__dict__.get(slot + "_key") != key:
        module.__dict__[slot] = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), rows)
        module.__dict__[slot + "_key"] = key
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(rows, in_features), module.__dict__[slot], bias, "none", [], "")
    return y.reshape(*x.shape[:-1], out_features)


class PackedConv2d(_DropsPacks, nn.Conv2d):
    """An ``nn.Conv2d`` (same parameters and state-dict names) that runs CPU inference on a prepacked weight.
    Input [B, Cin, H, W] -> [B, Cout, H', W'], as ``nn.Conv2d``. A 1x1 convolution applied to tokens (a UNet
    transformer's proj_in / proj_out) runs as a packed linear layer through :meth:`token_linear`."""

    def token_linear(self, tokens: torch.Tensor) -> torch.Tensor:
        """This 1x1 convolution as a linear layer on tokens [..., Cin] -> [..., Cout] (oneDNN's GEMM on a weight
        packed once, as :class:`PackedLinear`; F.linear where that cannot run)."""
        weight = self.weight.view(self.out_channels, self.in_channels)
        if not _linear_usable(tokens, weight, self.in_channels) or not _linear_available():
            return nn.functional.linear(tokens, weight, self.bias)
        return _packed_linear(self, tokens, weight, self.bias, "_token_packed")

    def _packed_weight(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        # oneDNN may choose the packed layout by input shape, so a new input shape repacks too
        key = _weight_key(w, tuple(x.shape))
        if getattr(self, "_pack_key", None) != key:
            self._packed = torch.ops.mkldnn._reorder_convolution_weight(
                w.detach(), list(self.padding), list(self.stride), list(self.dilation), self.groups, list(x.shape))
            self._pack_key = key
        return self._packed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        usable = (x.device.type == "cpu" and x.dim() == 4 and x.dtype == self.weight.dtype
                  and x.dtype in (torch.float32, torch.bfloat16) and self.padding_mode == "zeros"
                  and not isinstance(self.padding, str)
                  and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)))
        if not usable:
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed_weight(x), self.bias, list(self.padding), list(self.stride), list(self.dilation),
            self.groups, "none", [], "")


@functools.lru_cache(maxsize=None)
def _linear_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear(_DropsPacks, nn.Linear):
    """An ``nn.Linear`` (same parameters and state-dict names) that runs fp32 and bf16 CPU inference on a weight
    reordered once for oneDNN. Input [..., in_features] -> [..., out_features], as ``nn.Linear``; any other input
    (fp16, CUDA, autograd, no rows, a dtype other than the weight's) takes the ordinary path."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _linear_usable(x, self.weight, self.in_features):
            return super().forward(x)
        return _packed_linear(self, x, self.weight, self.bias, "_packed")


def _switch_class(model: nn.Module, old: type, new: type) -> int:
    """Every module of exactly class ``old`` becomes class ``new`` (parameters untouched; packed copies dropped);
    returns how many."""
    n = 0
    for module in model.modules():
        if type(module) is old:
            module.__class__ = new
            for attr in _PACK_ATTRS:
                module.__dict__.pop(attr, None)
            n += 1
    return n


def prepack_linears(model: nn.Module) -> int:
    """Switch every plain ``nn.Linear`` in ``model`` to :class:`PackedLinear` (parameters untouched; packed on the
    first bf16 call); returns how many were switched. Raises RuntimeError when this torch build lacks the ops."""
    if not _linear_available():
        raise RuntimeError("prepack_linears needs torch built with oneDNN (torch.ops.mkldnn._linear_pointwise)")
    return _switch_class(model, nn.Linear, PackedLinear)


def unprepack_linears(model: nn.Module) -> int:
    """Undo :func:`prepack_linears`; returns how many linears were restored."""
    return _switch_class(model, PackedLinear, nn.Linear)


def prepack_convs(model: nn.Module) -> int:
    """Switch every plain ``nn.Conv2d`` in ``model`` to :class:`PackedConv2d` (parameters untouched); returns how
    many were switched. Raises RuntimeError when this torch build lacks the oneDNN ops."""
    if not _available():
        raise RuntimeError("prepack_convs needs torch built with oneDNN (torch.ops.mkldnn._convolution_pointwise)")
    return _switch_class(model, nn.Conv2d, PackedConv2d)


def unprepack_convs(model: nn.Module) -> int:
    """Undo :func:`prepack_convs` (drops the packed copies); returns how many convs were restored."""
    return _switch_class(model, PackedConv2d, nn.Conv2d)


def fastest_cpu_layout(model: nn.Module, dtype: torch.dtype) -> None:
    """What ``Pipeline.from_pretrained`` does to a CPU UNet (``cpu_fast``): channels-last with its convs and linears
    packed (fp32 and bf16); nothing where this torch build lacks the oneDNN ops."""
    if _available():
        model.to(memory_format=torch.channels_last)
        prepack_convs(model)
    if dtype in (torch.float32, torch.bfloat16) and _linear_available():
        prepack_linears(model)
