"""Pure-PyTorch references of every velodiff op.

These are the specifications: the CPU and CUDA kernels must match them (see the tolerances in the blueprint).
They take the same arguments as the wrappers in :mod:`velodiff.ops` and do no argument checking.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

# Coefficient layout of sampler_update; mirrors csrc/include/velodiff/sampler_update.h.
COEF_W, COEF_DELTA, COEF_PX, COEF_PM = 0, 1, 2, 3
COEF_CX, COEF_CA, COEF_CD, COEF_CZ = 4, 5, 6, 7
COEF_EX, COEF_EA, COEF_ED = 8, 9, 10
COEF_HEADER = 11
MAX_HISTORY = 8


def sampler_coef_count(history_slots: int) -> int:
    """Length of one coefficient row for ``history_slots`` ring-buffer slots."""
    return COEF_HEADER + 3 * history_slots


def sampler_update(
    x: torch.Tensor,
    cond: torch.Tensor,
    uncond: Optional[torch.Tensor],
    anchor: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    history: Optional[torch.Tensor],
    coef: torch.Tensor,
    write_slot: int = -1,
    guidance_rescale: float = 0.0,
    want_y: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``velodiff::sampler_update`` (semantics in csrc/include/velodiff/sampler_update.h).

    Shapes: x, anchor, noise [B, ...] fp32; cond, uncond [B, ...] fp16/bf16/fp32; history [K, B, ...] fp32,
    updated in place at ``write_slot``; coef [11 + 3K] fp32. Returns (x_next [B, ...] fp32, y [B, ...] fp32
    or an empty tensor when ``want_y`` is False). ``compute_dtype=torch.float64`` gives the oracle used by the
    tests.
    """
    cd = compute_dtype
    k = 0 if history is None else history.shape[0]
    c = coef.to(cd)
    xf = x.to(cd)
    g = cond.to(cd)
    if uncond is not None:
        u = c[COEF_DELTA] * uncond.to(cd)
        guided = u + c[COEF_W] * (g - u)
        if guidance_rescale > 0:
            b = x.shape[0]
            std_c = g.reshape(b, -1).std(dim=1, unbiased=True)
            std_g = guided.reshape(b, -1).std(dim=1, unbiased=True)
            ratio = (1.0 - guidance_rescale) + guidance_rescale * std_c / std_g
            guided = guided * ratio.reshape((b,) + (1,) * (x.dim() - 1))
        g = guided
    h = history.to(cd) if history is not None else None
    q = c[COEF_HEADER:COEF_HEADER + k]
    ck = c[COEF_HEADER + k:COEF_HEADER + 2 * k]
    ek = c[COEF_HEADER + 2 * k:COEF_HEADER + 3 * k]

    def hist_sum(weights: torch.Tensor) -> torch.Tensor:
        if k == 0:
            return torch.zeros_like(xf)
        return torch.einsum("k,k...->...", weights, h)

    d = c[COEF_PX] * xf + c[COEF_PM] * g + hist_sum(q)
    a = anchor.to(cd) if anchor is not None else torch.zeros_like(xf)
    z = noise.to(cd) if noise is not None else torch.zeros_like(xf)
    x_next = c[COEF_CX] * xf + c[COEF_CA] * a + c[COEF_CD] * d + hist_sum(ck) + c[COEF_CZ] * z
    if want_y:
        y = c[COEF_EX] * xf + c[COEF_EA] * a + c[COEF_ED] * d + hist_sum(ek)
        y = y.to(torch.float32) if cd != torch.float64 else y
    else:
        y = x.new_empty((0,))
    if history is not None and write_slot >= 0:
        history[write_slot].copy_(d.to(history.dtype))
    if cd != torch.float64:
        x_next = x_next.to(torch.float32)
    return x_next, y


# ----------------------------------------------------------------------------------------------------------------
# Quantized GEMM family (format: csrc/include/velodiff/qgemm.h)
# ----------------------------------------------------------------------------------------------------------------

QGROUP = 64
QACTIVATIONS = {"none": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}


def qgemm_padded_k(k: int) -> int:
    """K rounded up to a multiple of the group size 64."""
    return (k + QGROUP - 1) // QGROUP * QGROUP


def quantize_groups(v: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-(row, group of 64) quantization of fp32 ``v`` [rows, K] (the rule of qgemm.h).

    Returns (codes int8 [rows, Kp] in [-Q-1, Q], scales float32 [rows, Kp/64]); Q = 7 (4 bits) or 127 (8 bits)."""
    qmax = 7 if bits == 4 else 127
    rows, k = v.shape
    kp = qgemm_padded_k(k)
    v = torch.nn.functional.pad(v.float(), (0, kp - k)).reshape(rows, kp // QGROUP, QGROUP)
    scale = v.abs().amax(-1) / qmax
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.where(scale[..., None] > 0, torch.round(v / safe[..., None]), torch.zeros_like(v))
    return q.clamp(-qmax - 1, qmax).to(torch.int8).reshape(rows, kp), scale


def dequantize_groups(codes: torch.Tensor, scales: torch.Tensor, k: int) -> torch.Tensor:
    """codes [rows, Kp] and scales [rows, Kp/64] -> float32 values [rows, k] (codes * their group's scale, the
    padding dropped): the inverse of :func:`quantize_groups` up to rounding."""
    return (codes.float() * scales.float().repeat_interleave(QGROUP, dim=1))[:, :k]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """int8 codes [rows, Kp] in [-8, 7] -> uint8 [rows, Kp/2]: element 2j in the low nibble of byte j."""
    c = codes.to(torch.int16) & 0xF
    return (c[:, 0::2] | (c[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [rows, Kp/2] -> int8 codes [rows, Kp] (inverse of :func:`pack_int4`)."""
    p = packed.to(torch.int16)
    lo, hi = p & 0xF, (p >> 4) & 0xF
    both = torch.stack([lo, hi], dim=-1).reshape(packed.shape[0], -1)
    return torch.where(both >= 8, both - 16, both).to(torch.int8)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 codes [rows, Kp] -> the packed storage of ``bits`` (uint8 nibbles for 4, int8 as is for 8)."""
    return pack_int4(codes) if bits == 4 else codes.to(torch.int8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_int4(packed) if bits == 4 else packed


def quantize_act(x: torch.Tensor, smooth: Optional[torch.Tensor], lora_down: Optional[torch.Tensor],
                 bits: int = 4) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference of ``velodiff::quantize_act``: x [M, K] -> (qx packed, ascales float32 [M, Kp/64],
    lora_act float32 [M, R] = x @ lora_down in fp32, on the unsmoothed x)."""
    v = x.float()
    if smooth is not None:
        v = v / smooth.float()
    codes, scales = quantize_groups(v, bits)
    if lora_down is None:
        lora_act = torch.zeros(x.shape[0], 0, dtype=torch.float32, device=x.device)
    else:
        lora_act = (x.double() @ lora_down.double()).float()
    return pack_codes(codes, bits), scales, lora_act


def _activation(acc: torch.Tensor, activation: int) -> torch.Tensor:
    if activation == 1:
        return torch.nn.functional.gelu(acc)
    if activation == 2:
        return torch.nn.functional.gelu(acc, approximate="tanh")
    if activation == 3:
        return torch.nn.functional.silu(acc)
    return acc


def qgemm(qx: torch.Tensor, ascales: torch.Tensor, qw: torch.Tensor, wscales: torch.Tensor,
          bias: Optional[torch.Tensor], lora_act: Optional[torch.Tensor], lora_up: Optional[torch.Tensor],
          lora_scales: Optional[torch.Tensor], bits: int = 4, activation: int = 0) -> torch.Tensor:
    """Reference of ``velodiff::qgemm`` (float64 accumulation, exact integer group sums): -> y [M, N] in
    ``wscales``' dtype. See csrc/include/velodiff/qgemm.h for the formula."""
    cx = unpack_codes(qx, bits).double()
    cw = unpack_codes(qw, bits).double()
    m, n, groups = cx.shape[0], cw.shape[0], ascales.shape[1]
    acc = torch.zeros(m, n, dtype=torch.float64, device=qx.device)
    for g in range(groups):
        sl = slice(g * QGROUP, (g + 1) * QGROUP)
        dot = cx[:, sl] @ cw[:, sl].T  # integers below 2^31: exact in float64
        acc += dot * (ascales[:, g].double()[:, None] * wscales[:, g].double()[None, :])
    if bias is not None:
        acc += bias.double()[None, :]
    if lora_act is not None and lora_up is not None and lora_act.shape[1] > 0:
        la = lora_act.double()
        if lora_scales is not None:
            la = la * lora_scales.double()[None, :]
        acc += la @ lora_up.double().T
    return _activation(acc, activation).to(wscales.dtype)


# FP8 formats of velodiff::quantize_fp8 / fp8_gemm; mirrors csrc/include/velodiff/fp8.h.
FP8_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}
FP8_NAN_CODE = {"e4m3": 0x7F, "e5m2": 0x7E}  # the NaN we write (with the input's sign)


def fp8_format(dtype: torch.dtype) -> str:
    """"e4m3" or "e5m2" for torch.float8_e4m3fn / torch.float8_e5m2."""
    return {v: k for k, v in FP8_DTYPES.items()}[dtype]


def encode_fp8(v: torch.Tensor, fmt: str) -> torch.Tensor:
    """float32 -> FP8 codes by velodiff/fp8.h's rule: round to nearest even (torch's conversion), finite values
    beyond the largest code saturate to it, NaN -> NaN (S.1111.111 e4m3, S.11111.10 e5m2), +-inf -> +-inf (e5m2)
    or NaN (e4m3). Returns a tensor of dtype FP8_DTYPES[fmt]."""
    v = v.float()
    fmax = FP8_MAX[fmt]
    inf = torch.isinf(v)
    finite = v.clamp(-fmax, fmax)
    codes = torch.where(inf, v, finite).to(FP8_DTYPES[fmt]).view(torch.uint8)
    sign = (torch.signbit(v).to(torch.uint8) << 7)
    nan = torch.isnan(v) | (inf & (fmt == "e4m3"))
    codes = torch.where(nan, sign | FP8_NAN_CODE[fmt], codes)
    return codes.view(FP8_DTYPES[fmt])


def quantize_fp8(x: torch.Tensor, fmt: str = "e4m3", amax: Optional[torch.Tensor] = None
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference of ``velodiff::quantize_fp8``: x [M, K] -> (codes [M, K] FP8_DTYPES[fmt], scales float32 [M]),
    scales[m] = max_k |x[m, k]| / FP8_MAX (NaN if the row holds one), codes = encode(x / scale) (0 where scale = 0).
    ``amax`` [M]: the row maxima to scale by instead (a clipping range; values beyond it saturate)."""
    xf = x.float()
    if amax is None:
        amax = xf.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
    scales = amax.float() / FP8_MAX[fmt]
    zero = scales == 0
    safe = torch.where(zero, torch.ones_like(scales), scales)
    codes = encode_fp8(torch.where(zero[:, None], torch.zeros_like(xf), xf / safe[:, None]), fmt)
    return codes, scales


def unpack_nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [rows, ceil(k / 2)] -> int64 indices [rows, k] in [0, 15]: element 2j in the low nibble of byte j."""
    p = packed.to(torch.int64)
    return torch.stack([p & 0xF, p >> 4], dim=-1).reshape(packed.shape[0], -1)[:, :k]


def pack_nibbles(indices: torch.Tensor) -> torch.Tensor:
    """Indices [rows, k] in [0, 15] -> uint8 [rows, ceil(k / 2)] (inverse of :func:`unpack_nibbles`; an odd k's last
    high nibble is 0)."""
    i = indices.to(torch.int16)
    if i.shape[1] % 2:
        i = torch.cat([i, i.new_zeros(i.shape[0], 1)], dim=1)
    return (i[:, 0::2] | (i[:, 1::2] << 4)).to(torch.uint8)


def fp8_gemm(a: torch.Tensor, ascales: torch.Tensor, w: torch.Tensor, wscales: torch.Tensor,
             bias: Optional[torch.Tensor], out_dtype: torch.dtype, activation: int = 0,
             w_table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference of ``velodiff::fp8_gemm`` (float64 accumulation of the exactly decoded codes):
    y = act((a @ w^T) * (ascales[m] * wscales[n]) + bias) -> [M, N] in ``out_dtype``. With ``w_table``
    (float8_e4m3fn [16]), w is uint8 [N, ceil(K / 2)] of 4-bit indices into it (W4A8)."""
    if w_table is not None:
        w = w_table.float()[unpack_nibbles(w, a.shape[1])]
    acc = (a.double() @ w.double().T) * (ascales.double()[:, None] * wscales.double()[None, :])
    if bias is not None:
        acc = acc + bias.double()[None, :]
    return _activation(acc, activation).to(out_dtype)


def fp8_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
                  scale: Optional[float] = None) -> torch.Tensor:
    """Reference of ``velodiff::fp8_attention`` (csrc/include/velodiff/fp8.h), logits and softmax in float64.

    q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv]; mask broadcastable to [B, H, Lq, Lk] (bool: True = keep;
    float: added) or None -> [B, H, Lq, Dv] in q's dtype. Q and K are quantized per token (one e4m3 scale per row
    of each head, max |row| / 448), V per channel (per head and value dimension, over all keys); the logits are
    the products of the decoded codes times both scales and ``scale`` (default D^-1/2); p = exp(logit - row max)
    is quantized with the fixed scale 1 / 448 before the normalisation by l = sum p; a query with every key masked
    gives zeros (the op's rule)."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def per_row(t):  # [..., L, D] -> decoded codes [..., L, D] float64, row scales [..., L, 1] float64
        flat = t.float().reshape(-1, t.shape[-1])
        codes, s = quantize_fp8(flat, "e4m3")
        return codes.double().reshape(t.shape), s.double().reshape(*t.shape[:-1], 1)

    (qc, qs), (kc, ks) = per_row(q), per_row(k)
    vc, vs = per_row(v.transpose(-1, -2))  # per channel: rows of V^T
    logits = torch.matmul(qc, kc.transpose(-1, -2)) * (qs * ks.transpose(-1, -2)) * scale
    if mask is not None:
        logits = logits.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else logits + mask.double()
    m = logits.amax(dim=-1, keepdim=True)
    p = torch.exp(logits - torch.where(torch.isinf(m), torch.zeros_like(m), m))  # masked keys: exp(-inf) = 0
    l = p.sum(dim=-1, keepdim=True)
    pc = encode_fp8(p * FP8_MAX["e4m3"], "e4m3").double()
    out = torch.matmul(pc, vc.transpose(-1, -2)) * (vs.transpose(-1, -2) / (FP8_MAX["e4m3"] * l))
    return torch.where(l > 0, out, torch.zeros_like(out)).to(dtype)


# Flags and state layout of cache_gate; mirrors csrc/include/velodiff/cache_gate.h.
CACHE_GATE_ACCUMULATE, CACHE_GATE_STORE_ALWAYS, CACHE_GATE_FORCE_COMPUTE = 1, 2, 4
CACHE_GATE_MAX_COEFFICIENTS = 8
GATE_ACCUMULATOR, GATE_DISTANCE, GATE_VALID, GATE_DECISION = 0, 1, 2, 3


def cache_gate(probe: torch.Tensor, stored: torch.Tensor, state: torch.Tensor, threshold: float,
               coefficients=(), flags: int = 0) -> torch.Tensor:
    """Reference of ``velodiff::cache_gate`` (semantics in csrc/include/velodiff/cache_gate.h), in float64.

    probe [B, ...] fp32/fp16/bf16; stored [2, B, ...] of probe's dtype and state [4] fp32 are updated in place;
    coefficients: a polynomial, highest degree first. Returns the decision as int32 [1] (1 compute, 0 reuse)."""
    b = probe.shape[0]
    v = float(state[GATE_VALID].item())
    v = int(v) if v in (0.0, 1.0) else -1  # exactly 0 or 1 is a buffer index; anything else (NaN too) is none
    if v in (0, 1):
        p = probe.reshape(b, -1).double()
        ref = stored[v].reshape(b, -1).double()
        num = (p - ref).abs().sum(dim=1)
        den = ref.abs().sum(dim=1)
        d_b = torch.where(den > 0, num / den.clamp_min(1e-300),
                          torch.where(num == 0, torch.zeros_like(num), torch.full_like(num, float("inf"))))
        d = float(d_b.max())
    else:
        d = float("inf")
    r = d
    if len(coefficients):
        r = 0.0
        for c in coefficients:
            r = r * d + float(c)
    accumulate = bool(flags & CACHE_GATE_ACCUMULATE)
    a = float(state[GATE_ACCUMULATOR].item()) + r if accumulate else r
    compute = not (a < threshold) or bool(flags & CACHE_GATE_FORCE_COMPUTE) or v not in (0, 1)
    w = 1 - v if v in (0, 1) else 0
    stored[w].copy_(probe)
    state[GATE_ACCUMULATOR] = a if accumulate and not compute else 0.0
    state[GATE_DISTANCE] = d
    state[GATE_VALID] = w if (compute or flags & CACHE_GATE_STORE_ALWAYS) else v
    state[GATE_DECISION] = 1.0 if compute else 0.0
    return torch.tensor([1 if compute else 0], dtype=torch.int32, device=probe.device)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
              scale: Optional[float] = None) -> torch.Tensor:
    """Reference of ``velodiff::attention`` (semantics in csrc/include/velodiff/attention.h), in float64.

    q [B, H, Lq, D], k [B, H, Lk, D], v [B, H, Lk, Dv] (one float dtype), key_padding_mask bool [B, Lk] or None
    (True = attend), scale > 0 or None (1 / sqrt(D)). Returns softmax(scale * q k^T) v as [B, H, Lq, Dv] in q's
    dtype; a query whose keys are all masked gives zeros. Pass float64 tensors for the float64 result."""
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    logits = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    if key_padding_mask is not None:
        logits = logits.masked_fill(~key_padding_mask.bool()[:, None, None, :], float("-inf"))
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))  # fully masked rows
    weights = torch.exp(logits - row_max)  # masked keys: exp(-inf) = 0
    total = weights.sum(dim=-1, keepdim=True)
    out = torch.matmul(weights, v.double()) / torch.where(total > 0, total, torch.ones_like(total))
    return out.to(q.dtype)


LINEAR_ATTENTION_DEFAULT_EPS = {"linfusion": 1e-4, "relu": 1e-8}


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str = "linfusion",
                     eps: Optional[float] = None) -> torch.Tensor:
    """Reference of ``velodiff::linear_attention`` (semantics in csrc/include/velodiff/linear_attention.h), in
    float64.

    q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv] (one float dtype). kind "linfusion": phi = elu + 1,
    out_i = phi(q_i) S / (phi(q_i) . mean_j phi(k_j) + eps), S = sum_j phi(k_j) v_j^T / Nk (LinFusion's
    GeneralizedLinearAttention; eps default 1e-4); kind "relu": phi = relu, out_i = phi(q_i) S / (phi(q_i) .
    sum_j phi(k_j) + eps), S = sum_j phi(k_j) v_j^T (SANA's LiteLA; eps default 1e-8). Returns [B, H, Nq, Dv] in
    q's dtype. Pass float64 tensors for the float64 result."""
    if eps is None:
        eps = LINEAR_ATTENTION_DEFAULT_EPS[kind]
    qd, kd, vd = q.double(), k.double(), v.double()
    if kind == "linfusion":
        fq, fk = torch.nn.functional.elu(qd) + 1.0, torch.nn.functional.elu(kd) + 1.0
        state = torch.matmul(fk.transpose(-1, -2), vd) / k.shape[2]  # [B, H, D, Dv]
        z = fk.mean(dim=2)  # [B, H, D]
    elif kind == "relu":
        fq, fk = torch.relu(qd), torch.relu(kd)
        state = torch.matmul(fk.transpose(-1, -2), vd)
        z = fk.sum(dim=2)
    else:
        raise ValueError(f"kind must be 'linfusion' or 'relu', got {kind!r}")
    den = torch.matmul(fq, z.unsqueeze(-1)) + eps  # [B, H, Nq, 1]
    return (torch.matmul(fq, state) / den).to(q.dtype)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, size, window, shift=(0, 0),
                     scale: Optional[float] = None) -> torch.Tensor:
    """Reference of ``velodiff::window_attention`` (semantics in csrc/include/velodiff/window_attention.h), in
    float64: an explicit loop over the windows.

    q, k [B, H, L, D], v [B, H, L, Dv] (one float dtype) over an h x w map (``size``, L = h * w, row-major);
    ``window`` = (Wh, Ww), ``shift`` = (sy, sx) (taken mod h, w), scale > 0 or None (1 / sqrt(D)). Window (wy, wx)
    is rows wy*Wh .. min((wy+1)*Wh, h) - 1 and columns wx*Ww .. min((wx+1)*Ww, w) - 1 of the map rolled by -shift
    (map row (r + sy) mod h, column (c + sx) mod w), so the windows at the bottom and right edges are cut short;
    each window's tokens attend to each other only. Returns [B, H, L, Dv] in q's dtype."""
    h, w = int(size[0]), int(size[1])
    wh, ww = int(window[0]), int(window[1])
    sy, sx = int(shift[0]) % h, int(shift[1]) % w
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    qd, kd, vd = q.double(), k.double(), v.double()
    out = torch.zeros(*q.shape[:3], v.shape[3], dtype=torch.float64, device=q.device)
    for top in range(0, h, wh):
        rows = torch.arange(top, min(top + wh, h), device=q.device)
        for left in range(0, w, ww):
            cols = torch.arange(left, min(left + ww, w), device=q.device)
            tokens = (((rows + sy) % h)[:, None] * w + ((cols + sx) % w)[None, :]).reshape(-1)
            logits = torch.matmul(qd[:, :, tokens], kd[:, :, tokens].transpose(-1, -2)) * scale
            weights = torch.exp(logits - logits.amax(dim=-1, keepdim=True))  # float64 softmax of the window
            out[:, :, tokens] = torch.matmul(weights, vd[:, :, tokens]) / weights.sum(dim=-1, keepdim=True)
    return out.to(q.dtype)
