"""``QuantizedLinear``: an ``nn.Linear`` replacement running as ``velodiff::quantize_act`` + ``velodiff::qgemm``.

Buffers (format: csrc/include/velodiff/qgemm.h; N = out_features, K = in_features, Kp = K rounded up to 64,
R = rank of the low-rank branch including appended LoRAs, T = the model dtype):

    qweight      bits 4: uint8 [N, Kp/2] (two int4 codes a byte); bits 8: int8 [N, Kp]
    wscales      T [N, Kp/64]            per (output channel, group of 64) scale of the residual weight
    smooth       float32 [K] or None     SVDQuant smoothing factor lambda (activations are divided by it)
    lora_down    T [K, R] or None        low-rank down-projection, stored unsmoothed: L1 / lambda
    lora_up      T [N, R] or None        low-rank up-projection L2
    lora_scales  float32 [R] or None     per-rank strength (1 for the SVD branch, a LoRA's strength after it)
    bias         T [N] or None

forward(x [..., K] in T) -> [..., N] in T:
    y = act( Q(x / lambda) Q(R)^T  +  (x L1/lambda) diag(lora_scales) L2^T  +  bias )   (SVDQuant, Li et al. 2025,
    eq. 5; act is ``fused_activation``, identity unless the quantizer fused the following GELU)
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from velodiff.ops import reference
from velodiff.ops._native import native_op

METHODS = ("svdquant", "naive-w4a4", "w8a8")


class QuantizedLinear(nn.Module):
    """A linear layer with quantized weights (see the module docstring for the buffers and the math)."""

    def __init__(self, in_features: int, out_features: int, bits: int = 4, rank: int = 0, smooth: bool = False,
                 bias: bool = True, dtype: torch.dtype = torch.float32, device=None, method: str = "svdquant",
                 fused_activation: str = "none"):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits!r}")
        if fused_activation not in reference.QACTIVATIONS:
            raise ValueError(f"fused_activation must be one of {tuple(reference.QACTIVATIONS)}, got "
                             f"{fused_activation!r}")
        #: activation computed in the GEMM epilogue (the module after this one then skips its own)
        self.fused_activation = fused_activation
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.in_features, self.out_features, self.bits, self.method = in_features, out_features, bits, method
        kp = reference.qgemm_padded_k(in_features)
        width = kp // 2 if bits == 4 else kp
        self.register_buffer("qweight", torch.zeros(out_features, width, dtype=torch.uint8 if bits == 4 else
                                                    torch.int8, device=device))
        self.register_buffer("wscales", torch.zeros(out_features, kp // reference.QGROUP, dtype=dtype, device=device))
        self.register_buffer("smooth", torch.ones(in_features, dtype=torch.float32, device=device) if smooth else None)
        self.register_buffer("lora_down", torch.zeros(in_features, rank, dtype=dtype, device=device) if rank else None)
        self.register_buffer("lora_up", torch.zeros(out_features, rank, dtype=dtype, device=device) if rank else None)
        self.register_buffer("lora_scales", torch.ones(rank, dtype=torch.float32, device=device) if rank else None)
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)
        #: rank of the branch made by the quantizer; appended LoRAs come after it
        self.base_rank = rank
        #: LoRA name -> (first rank index, rank); see :meth:`add_lora`
        self.loras: Dict[str, Tuple[int, int]] = {}
        #: LoRA name -> its alpha / r factor
        self.lora_factors: Dict[str, float] = {}

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, method={self.method}, "
                f"bits={self.bits}, rank={self.base_rank}, fused_activation={self.fused_activation}, "
                f"loras={list(self.loras)}")

    @property
    def dtype(self) -> torch.dtype:
        return self.wscales.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"QuantizedLinear expects [..., {self.in_features}] inputs, got {tuple(x.shape)}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features).to(self.dtype).contiguous()
        qx, ascales, lora_act = native_op("quantize_act")(x2, self.smooth, self.lora_down, self.bits)
        y = native_op("qgemm")(qx, ascales, self.qweight, self.wscales, self.bias,
                               lora_act if self.lora_down is not None else None, self.lora_up, self.lora_scales,
                               self.bits, reference.QACTIVATIONS[self.fused_activation], self._packed_weights(x2))
        return y.reshape(*lead, self.out_features)

    def _packed_weights(self, x: torch.Tensor):
        """The weights in the CPU GEMM's panel layout (``velodiff::qgemm_pack``), made once and kept until a weight
        tensor changes (a new tensor or an in-place edit; inference tensors carry no version counter, so for them
        only a new tensor counts), so calls skip the repacking; None on CUDA and while torch.compile traces."""
        if x.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        parts = (self.qweight, self.wscales, self.bias, self.lora_up)
        key = tuple(None if t is None else (t.data_ptr(), None if t.is_inference() else t._version, t.dtype)
                    for t in parts) + (self.bits,)
        if self.__dict__.get("_pack_key") != key:
            self._packed = native_op("qgemm_pack")(self.qweight, self.wscales, self.bias, self.lora_up, self.bits)
            self._pack_key = key
        return self._packed

    # ------------------------------------------------------------------------------------------------------------
    # LoRA on the low-rank branch: appended on the rank axis, no re-quantization (the down-projection reads the
    # unsmoothed x, so a LoRA's A matrix is used as is)
    # ------------------------------------------------------------------------------------------------------------

    def add_lora(self, name: str, down: torch.Tensor, up: torch.Tensor, strength: float = 1.0,
                 scale: float = 1.0) -> None:
        """Append a LoRA: ``down`` [r, K] (peft's ``lora_A.weight``), ``up`` [N, r] (``lora_B.weight``); the layer
        then computes y + strength * scale * x down^T up^T (``scale``: the adapter's alpha / r, kept when the
        strength changes)."""
        if name in self.loras:
            raise ValueError(f"a LoRA named {name!r} is already on this layer; remove_lora it first")
        if down.dim() != 2 or down.shape[1] != self.in_features:
            raise ValueError(f"LoRA {name!r}: down must be [r, {self.in_features}], got {tuple(down.shape)}")
        r = down.shape[0]
        if up.shape != (self.out_features, r):
            raise ValueError(f"LoRA {name!r}: up must be [{self.out_features}, {r}], got {tuple(up.shape)}")
        device = self.wscales.device
        down_t = down.detach().to(device=device, dtype=self.dtype).T
        up_t = up.detach().to(device=device, dtype=self.dtype)
        scales = torch.full((r,), float(strength) * float(scale), dtype=torch.float32, device=device)
        start = 0 if self.lora_down is None else self.lora_down.shape[1]
        self.lora_down = down_t.contiguous() if self.lora_down is None else torch.cat([self.lora_down, down_t], 1)
        self.lora_up = up_t.contiguous() if self.lora_up is None else torch.cat([self.lora_up, up_t], 1)
        self.lora_scales = scales if self.lora_scales is None else torch.cat([self.lora_scales, scales])
        self.loras[name] = (start, r)
        self.lora_factors[name] = float(scale)

    def set_lora_strength(self, name: str, strength: float) -> None:
        start, r = self._lora(name)
        self.lora_scales[start:start + r] = float(strength) * self.lora_factors[name]

    def remove_lora(self, name: str) -> None:
        """Drop a LoRA's ranks; the remaining branch is bit-identical to what it was before :meth:`add_lora`."""
        start, r = self._lora(name)
        keep = torch.cat([torch.arange(0, start), torch.arange(start + r, self.lora_down.shape[1])])
        if keep.numel() == 0:
            self.lora_down = self.lora_up = self.lora_scales = None
        else:
            keep = keep.to(self.lora_down.device)
            self.lora_down = self.lora_down.index_select(1, keep).contiguous()
            self.lora_up = self.lora_up.index_select(1, keep).contiguous()
            self.lora_scales = self.lora_scales.index_select(0, keep).contiguous()
        del self.loras[name], self.lora_factors[name]
        self.loras = {n: (s - r if s > start else s, k) for n, (s, k) in self.loras.items()}

    def _lora(self, name: str) -> Tuple[int, int]:
        if name not in self.loras:
            raise KeyError(f"no LoRA named {name!r} on this layer; present: {sorted(self.loras) or 'none'}")
        return self.loras[name]

    # ------------------------------------------------------------------------------------------------------------

    def weight_bytes(self, float_bytes: int = None) -> int:
        """Bytes of every buffer (what the layer stores instead of its weight and bias). ``float_bytes``: count the
        model-dtype buffers (scales, branch, bias) at that width, e.g. 2 for a 16-bit checkpoint of an fp32 model;
        the integer codes and the float32 smoothing / strength vectors keep theirs."""
        total = 0
        for name, b in self.named_buffers():
            width = b.element_size()
            if float_bytes is not None and b.is_floating_point() and name not in ("smooth", "lora_scales"):
                width = float_bytes
            total += b.numel() * width
        return total

    def dequantized_weight(self) -> torch.Tensor:
        """The effective float32 weight [N, K] (for tests and error analysis; the layer never builds it)."""
        w = reference.dequantize_groups(reference.unpack_codes(self.qweight, self.bits), self.wscales,
                                        self.in_features)
        if self.smooth is not None:
            w = w / self.smooth[None, :]
        if self.lora_down is not None:
            w = w + (self.lora_up.float() * self.lora_scales[None, :]) @ self.lora_down.float().T
        return w
