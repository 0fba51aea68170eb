"""LinFusion (Liu et al., "LinFusion: 1 GPU, 1 Minute, 16K Image", arXiv 2409.02097; reference code
Huage001/LinFusion, ``src/linfusion/attention.py`` and ``linfusion.py``): every self-attention (``attn1``) of a UNet
replaced by a generalised linear attention, whose cost grows linearly with the token count.

The layer (the paper's normalization-aware generalized linear attention with non-linear projections), on x [B, N, C]:

    q = W_q (x + MLP_q(x)),   k = W_k (x + MLP_k(x)),   v = W_v x
    MLP = Linear -> LayerNorm -> LeakyReLU(0.01) -> Linear
    phi(u) = elu(u) + 1                                                   (positive features)
    o_i = phi(q_i) [phi(K)^T V / N] / (phi(q_i) . mean_j phi(k_j) + 1e-4)  per head; then ``to_out``

No 1/sqrt(d), no mask, no positional term. The mean normaliser and its eps 1e-4 are the reference's exactly (in
the equivalent sum form the eps is N * 1e-4, so it matters for weight parity at every resolution).

Weights: LinFusion's published checkpoints (``Yuanshi/LinFusion-1-5`` and friends: a folder with ``config.json`` and
``diffusion_pytorch_model.safetensors``) hold one module per ``attn1`` layer, keyed ``"{i}.{name}"``: ``i`` counts the
UNet's ``attn1`` layers in diffusers' module order (down blocks, then up blocks, then the mid block; the folder's
``config.json`` ``modules_list`` names them and wins when present), ``name`` is ``to_q_.{0,1,3}.{weight,bias}`` /
``to_k_.{0,1,3}.{weight,bias}`` (the MLPs: Linear, LayerNorm, Linear) and ``to_q.weight``, ``to_k.weight``,
``to_v.weight``, ``to_out.0.weight``, ``to_out.0.bias``. Those published checkpoints carry their own to_q / to_k /
to_v / to_out: LinFusion's distillation trains them from a fresh initialisation together with the MLPs, and its
``mount_to`` swaps whole modules in, so the base model's attn1 projections (and any fine-tune or LoRA of them) are
not used. This technique does the same: **the file's to_q / to_k / to_v / to_out are loaded** when the file has them
(they are what its MLPs were trained with). Only with ``strict=False`` may a file leave a layer's projections out;
that layer then keeps the UNet's own to_q / to_k / to_v / to_out (shared, not copied) plus the file's MLPs. The
built-in ``digits`` model's weights (``scripts/distill_linfusion.py``) were distilled starting from the UNet's own
projections and are stored in the full layout.

With ``hidiffusion``: LinFusion layers are never windowed, in either order. hidiffusion's MSW-MSA windows the
softmax :class:`~velodiff.models.attention.Attention` layers it finds; applied after ``linfusion`` it finds
:class:`LinFusionAttention` there and leaves it; applied before, its windowed forward sits on the attention module
that ``linfusion`` swaps out. RAU-Net (hidiffusion's other half) works as without LinFusion.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from velodiff.accel.registry import Technique, register

__all__ = ["LinFusion", "LinFusionAttention", "residual_mlp", "linfusion_layer_names", "read_linfusion_weights",
           "linfusion_state_dict", "fresh_plans", "plan_layers", "install_linfusion", "WEIGHTS_NAME", "SHIPPED_FOLDER",
           "EPS"]

#: the reference's eps on the mean normaliser
EPS = 1e-4
#: the weights file of a LinFusion folder (diffusers' ModelMixin name)
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
#: a model folder's own LinFusion weights live in this subfolder (the built-in digits: data/digits/linfusion)
SHIPPED_FOLDER = "linfusion"
#: the per-layer parameter names of an MLP (nn.Sequential: 0 Linear, 1 LayerNorm, 2 LeakyReLU, 3 Linear)
MLP_PARAMS = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")
#: diffusers registers a UNet's children in this order (down_blocks, up_blocks, mid_block): LinFusion's indices
DIFFUSERS_ORDER = ("down_blocks", "up_blocks", "mid_block")


# ----------------------------------------------------------------------------------------------------------------
# the math
# ----------------------------------------------------------------------------------------------------------------

def _linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kind: str = "linfusion",
                      eps: float = EPS) -> torch.Tensor:
    """LinFusion's generalised linear attention, non-causal. q [B, H, Nq, D], k [B, H, Nk, D], v [B, H, Nk, Dv]
    -> [B, H, Nq, Dv] in q's dtype.

    out_i = phi(q_i) S / (phi(q_i) . m + eps) with phi = elu + 1, S = phi(K)^T V / Nk [B, H, D, Dv] and
    m = mean_j phi(k_j) [B, H, D]; the state S, m and the products are computed in float32 (float64 inputs stay
    float64), so half-precision inputs cannot overflow the sum over tokens. A stand-in with the signature and
    semantics of ``velodiff.ops.linear_attention``, used where the kernel does not run (float64, eps 0)."""
    if kind != "linfusion":
        raise ValueError(f"kind must be 'linfusion', got {kind!r}")
    if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k and v must be [B, H, N, D] tensors, got shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if q.shape[:2] != k.shape[:2] or k.shape[:3] != v.shape[:3] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q [B, H, Nq, D], k [B, H, Nk, D] and v [B, H, Nk, Dv] must agree, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    acc = torch.promote_types(q.dtype, torch.float32)
    phi_q = F.elu(q.to(acc)) + 1.0
    phi_k = F.elu(k.to(acc)) + 1.0
    n = k.shape[2]
    state = torch.matmul(phi_k.transpose(-1, -2), v.to(acc)) / n            # S = phi(K)^T V / N
    mean_k = phi_k.mean(dim=-2).unsqueeze(-1)                                  # m = mean_j phi(k_j), [B, H, D, 1]
    z = torch.matmul(phi_q, mean_k) + eps                                     # phi(q_i) . m + eps
    return (torch.matmul(phi_q, state) / z).to(q.dtype)


def residual_mlp(dim: int, mid: int) -> nn.Sequential:
    """LinFusion's non-linear projection: Linear(dim, mid) -> LayerNorm(mid) -> LeakyReLU(0.01) -> Linear(mid, dim),
    [..., dim] -> [..., dim]; added to its input before W_q / W_k."""
    return nn.Sequential(nn.Linear(dim, mid), nn.LayerNorm(mid), nn.LeakyReLU(), nn.Linear(mid, dim))


#: the dtypes velodiff::linear_attention runs
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class LinFusionAttention(nn.Module):
    """A LinFusion self-attention layer (the reference's ``GeneralizedLinearAttention``), with its parameter names.

    ``to_q`` / ``to_k`` / ``to_v``: Linear(C, H*D); ``to_out``: [Linear(H*D, C), Dropout]; ``to_q_`` / ``to_k_``:
    :func:`residual_mlp` (or Identity: the reference's ``projection_mid_dim=-1``). forward(hidden_states [B, N, C],
    encoder_hidden_states [B, Nk, C] or None (self-attention), attention_mask None) -> [B, N, C] in the input's
    dtype: the module docstring's formula; the linear attention by ``velodiff.ops.linear_attention`` (fp32 / fp16 /
    bf16) or :func:`_linear_attention` (float64, eps 0, and when gradients are needed: the kernel is forward-only)."""

    def __init__(self, to_q: nn.Module, to_k: nn.Module, to_v: nn.Module, to_out: nn.ModuleList, heads: int,
                 to_q_: nn.Module, to_k_: nn.Module, eps: float = EPS):
        super().__init__()
        self.heads = heads
        self.eps = eps
        self.to_q, self.to_k, self.to_v, self.to_out = to_q, to_k, to_v, to_out
        self.to_q_, self.to_k_ = to_q_, to_k_

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, inner = t.shape
        return t.view(b, n, self.heads, inner // self.heads).transpose(1, 2)

    def forward(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if attention_mask is not None:
            raise ValueError("attention_mask: LinFusion's linear attention takes no mask (it replaces self-attention)")
        if hidden_states.dim() != 3:
            raise ValueError(f"hidden_states must be [B, N, C] tokens, got shape {tuple(hidden_states.shape)}")
        x = hidden_states
        ctx = x if encoder_hidden_states is None else encoder_hidden_states
        q = self._split(self.to_q(x + self.to_q_(x)))          # q = W_q (x + MLP_q(x))
        k = self._split(self.to_k(ctx + self.to_k_(ctx)))      # k = W_k (x + MLP_k(x))
        v = self._split(self.to_v(ctx))                        # v = W_v x
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
        if q.dtype in KERNEL_DTYPES and self.eps > 0 and not training:  # the velodiff::linear_attention kernel
            from velodiff.ops import linear_attention
            out = linear_attention(q, k, v, kind="linfusion", eps=self.eps)
        else:  # float64 (tests), eps = 0 (the kernel refuses it), and training (the kernel has no backward)
            out = _linear_attention(q, k, v, eps=self.eps)
        out = out.transpose(1, 2).reshape(x.shape[0], x.shape[1], -1)
        return self.to_out[1](self.to_out[0](out))


# ----------------------------------------------------------------------------------------------------------------
# layers, key layout, loading
# ----------------------------------------------------------------------------------------------------------------

def linfusion_layer_names(unet: nn.Module) -> List[str]:
    """The names of ``unet``'s ``attn1`` modules in LinFusion's index order: diffusers' module order, down blocks,
    then up blocks, then the mid block (velodiff's UNet registers the mid block before the up blocks)."""
    names = [name for name, _ in unet.named_modules() if name.split(".")[-1] == "attn1"]
    rank = {top: i for i, top in enumerate(DIFFUSERS_ORDER)}
    return sorted(names, key=lambda n: rank.get(n.split(".")[0], len(rank)))  # stable: keeps the order within


def _layer_dims(attn: nn.Module) -> Tuple[int, int]:
    """(C, H*D) of an attention layer: its query width and inner width."""
    return int(attn.to_q.weight.shape[1]), int(attn.to_q.weight.shape[0])


def _projection_keys(attn: nn.Module) -> Dict[str, Tuple[int, ...]]:
    """{name: shape} of the projections a LinFusion module of this layer has (biases where the layer has them)."""
    c, inner = _layer_dims(attn)
    keys: Dict[str, Tuple[int, ...]] = {}
    for name, module, shape in (("to_q", attn.to_q, (inner, c)), ("to_k", attn.to_k, (inner, c)),
                                ("to_v", attn.to_v, (inner, c)), ("to_out.0", attn.to_out[0], (c, inner))):
        keys[f"{name}.weight"] = shape
        if getattr(module, "bias", None) is not None:
            keys[f"{name}.bias"] = (shape[0],)
    return keys


def _mlp_keys(prefix: str, c: int, mid: int) -> Dict[str, Tuple[int, ...]]:
    shapes = ((mid, c), (mid,), (mid,), (mid,), (c, mid), (c,))
    return {f"{prefix}.{p}": s for p, s in zip(MLP_PARAMS, shapes)}


def resolve_weights(weights: str) -> Tuple[str, Optional[str]]:
    """(safetensors file, config.json or None) of ``weights``: a LinFusion folder or a .safetensors file (a
    ``config.json`` beside the file is read when it has a ``modules_list``). ValueError naming ``weights``."""
    path = os.path.abspath(os.fspath(weights))
    if os.path.isdir(path):
        file = os.path.join(path, WEIGHTS_NAME)
        if not os.path.isfile(file):
            raise ValueError(f"linfusion: weights={weights!r} is a folder without {WEIGHTS_NAME} (LinFusion's "
                             "published layout: config.json + diffusion_pytorch_model.safetensors)")
    elif os.path.isfile(path):
        file = path
    else:
        raise ValueError(f"linfusion: weights={weights!r} does not exist (give a LinFusion folder or a .safetensors "
                         "file in LinFusion's key layout)")
    config = os.path.join(os.path.dirname(file), "config.json")
    if os.path.isfile(config):
        try:
            with open(config) as f:
                if isinstance(json.load(f).get("modules_list"), list):
                    return file, config
        except (OSError, ValueError, AttributeError):
            pass
    return file, None


def _config_names(config: Optional[str]) -> Optional[List[Tuple[str, Optional[int]]]]:
    """[(module_name, projection_mid_dim)] from a LinFusion config.json, or None."""
    if config is None:
        return None
    with open(config) as f:
        modules = json.load(f)["modules_list"]
    try:
        return [(str(m["module_name"]), m.get("projection_mid_dim")) for m in modules]
    except (TypeError, KeyError) as e:
        raise ValueError(f"linfusion: {config}: modules_list entries need a module_name ({e})") from None


@dataclass(frozen=True)
class LayerPlan:
    """How one attn1 layer becomes a LinFusion module: its name, its file index, the MLP widths (None: identity),
    and whether the file carries its projections."""

    name: str
    index: int
    mid_q: Optional[int]
    mid_k: Optional[int]
    file_projections: bool


def _listing(items: List[str], most: int = 16) -> str:
    shown = ", ".join(items[:most])
    return f"[{shown}{f', ... ({len(items) - most} more)' if len(items) > most else ''}] ({len(items)})"


def fresh_plans(unet: nn.Module, mid: Optional[int] = None) -> List[LayerPlan]:
    """Plans for new LinFusion modules on every attn1 of ``unet`` (for distillation): the layer's own projections,
    MLPs of width ``mid`` (None: the layer's width C, as LinFusion-1-5)."""
    modules = dict(unet.named_modules())
    plans = []
    for i, name in enumerate(linfusion_layer_names(unet)):
        width = mid or _layer_dims(modules[name])[0]
        plans.append(LayerPlan(name, i, width, width, False))
    return plans


def plan_layers(unet: nn.Module, file: str, config: Optional[str], strict: bool) -> List[LayerPlan]:
    """Match the file's keys (read from its header, no tensors) to ``unet``'s attn1 layers. ValueError listing the
    missing, unexpected and mis-shaped keys when they do not match (see :class:`LinFusion` for ``strict``)."""
    from velodiff.loading.safetensors_io import read_safetensors_header
    try:  # the project's checked reader: a file that is not safetensors is a ValueError naming it
        header, _, _ = read_safetensors_header(file)
    except ValueError as e:
        raise ValueError(f"linfusion: weights: {e}") from None
    shapes = {key: info[2] for key, info in header.items()}
    names = linfusion_layer_names(unet)
    mids: List[Optional[int]] = [None] * len(names)
    declared = _config_names(config)
    if declared is not None:
        if sorted(n for n, _ in declared) != sorted(names):
            raise ValueError(f"linfusion: weights: {config} names the layers {[n for n, _ in declared]}, this UNet's "
                             f"attn1 layers are {names}")
        names = [n for n, _ in declared]
        mids = [m for _, m in declared]
    modules = dict(unet.named_modules())
    expected: Dict[str, Tuple[int, ...]] = {}
    plans, missing = [], []
    for i, name in enumerate(names):
        attn = modules[name]
        c, _ = _layer_dims(attn)
        widths: List[Optional[int]] = []
        for side in ("to_q_", "to_k_"):
            if mids[i] == -1:  # the reference's identity projection (projection_mid_dim = -1)
                widths.append(None)
                continue
            first = shapes.get(f"{i}.{side}.0.weight")
            widths.append(int(first[0]) if first is not None and len(first) == 2 else (mids[i] or c))
            mlp = _mlp_keys(f"{i}.{side}", c, widths[-1])
            expected.update(mlp)
            missing += [k for k in mlp if k not in shapes]
        proj = {f"{i}.{k}": s for k, s in _projection_keys(attn).items()}
        expected.update(proj)
        present = [k for k in proj if k in shapes]
        if present or strict:  # all or (strict=False only) none of a layer's projections
            missing += [k for k in proj if k not in shapes]
        plans.append(LayerPlan(name, i, widths[0], widths[1], len(present) == len(proj)))
    unexpected = [k for k in shapes if k not in expected]
    wrong = [f"{k} {list(shapes[k])} (expected {list(s)})" for k, s in expected.items()
             if k in shapes and shapes[k] != s]
    problems = []
    if missing:
        problems.append(f"missing keys {_listing(missing)}")
    if unexpected and strict:
        problems.append(f"unexpected keys {_listing(unexpected)}")
    if wrong:
        problems.append(f"mis-shaped keys {_listing(wrong)}")
    if problems:
        raise ValueError(f"linfusion: weights {file} do not match this UNet's {len(names)} attn1 layers in LinFusion's "
                         f"key layout ('{{i}}.to_q_.0.weight', '{{i}}.to_q.weight', ...; i in diffusers' order "
                         f"{names}): " + "; ".join(problems))
    return plans


def read_linfusion_weights(file: str) -> Dict[str, torch.Tensor]:
    """All tensors of a LinFusion safetensors file (CPU)."""
    from velodiff.loading.safetensors_io import read_safetensors
    return read_safetensors(file)


def build_layer(attn: nn.Module, mid_q: Optional[int], mid_k: Optional[int], file_projections: bool,
                eps: float = EPS) -> LinFusionAttention:
    """A LinFusion module for the softmax layer ``attn`` (parameters uninitialised where they come from a file):
    its own projections shared when ``file_projections`` is False, fresh ones (same shapes and biases) when True;
    MLPs of widths ``mid_q`` / ``mid_k`` (None: identity), on ``attn``'s device and dtype."""
    weight = attn.to_q.weight
    device, dtype = weight.device, weight.dtype
    c, inner = _layer_dims(attn)

    def mlp(mid):
        return nn.Identity() if mid is None else residual_mlp(c, mid).to(device=device, dtype=dtype)
    if file_projections:
        def lin(m, shape):
            return nn.Linear(shape[1], shape[0], bias=getattr(m, "bias", None) is not None, device=device,
                             dtype=dtype)
        to_q, to_k, to_v = (lin(m, (inner, c)) for m in (attn.to_q, attn.to_k, attn.to_v))
        to_out = nn.ModuleList([lin(attn.to_out[0], (c, inner)), nn.Dropout(0.0)])
    else:
        to_q, to_k, to_v, to_out = attn.to_q, attn.to_k, attn.to_v, attn.to_out
    return LinFusionAttention(to_q, to_k, to_v, to_out, attn.heads, mlp(mid_q), mlp(mid_k), eps)


def linfusion_state_dict(unet: nn.Module) -> Dict[str, torch.Tensor]:
    """The LinFusion modules of ``unet`` in LinFusion's key layout (``"{i}.{name}"``, i in diffusers' order)."""
    modules = dict(unet.named_modules())
    out: Dict[str, torch.Tensor] = {}
    for i, name in enumerate(linfusion_layer_names(unet)):
        layer = modules[name]
        if not isinstance(layer, LinFusionAttention):
            raise ValueError(f"{name} is {type(layer).__name__}, not a LinFusion layer")
        out.update({f"{i}.{k}": v.detach().contiguous() for k, v in layer.state_dict().items()})
    return out


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, attr, module)


def install_linfusion(unet: nn.Module, plans: List[LayerPlan], tensors: Optional[Dict[str, torch.Tensor]],
                      eps: float = EPS) -> Callable[[], None]:
    """Swap each planned attn1 of ``unet`` for a LinFusion module, loading ``tensors`` (LinFusion's layout) into it
    (None: leave the fresh MLPs as initialised, for distillation). Returns the undo, which puts the original modules
    back."""
    modules = dict(unet.named_modules())
    originals: List[Tuple[str, nn.Module]] = []
    try:
        for plan in plans:
            attn = modules[plan.name]
            layer = build_layer(attn, plan.mid_q, plan.mid_k, plan.file_projections, eps)
            if tensors is not None:
                prefix = f"{plan.index}."
                own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
                with torch.no_grad():
                    for key, param in layer.state_dict(keep_vars=True).items():
                        if key in own and (plan.file_projections or key.startswith(("to_q_.", "to_k_."))):
                            param.copy_(own[key])
            _set_module(unet, plan.name, layer)
            originals.append((plan.name, attn))
    except BaseException:
        for name, attn in reversed(originals):
            _set_module(unet, name, attn)
        raise

    def undo() -> None:
        for name, attn in reversed(originals):
            _set_module(unet, name, attn)
    return undo


def shipped_weights(pipe) -> Optional[str]:
    """The model folder's own LinFusion folder (``<model>/linfusion``), None when the pipeline has no folder."""
    root = getattr(pipe, "components", {}).get("_path")
    if not root or not os.path.isdir(root):
        return None
    return os.path.join(root, SHIPPED_FOLDER)


# ----------------------------------------------------------------------------------------------------------------
# the technique
# ----------------------------------------------------------------------------------------------------------------

@register("linfusion")
@dataclass(frozen=True)
class LinFusion(Technique):
    """LinFusion on a UNet pipeline: every ``attn1`` becomes a :class:`LinFusionAttention` (see the module docstring
    for the formula, the key layout and which projections are loaded).

    weights: a LinFusion folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, as published) or a
    safetensors file in LinFusion's key layout; None: the model folder's own ``linfusion/`` (the built-in
    ``digits`` ships one). strict: the file must hold exactly this UNet's keys, projections included (else a
    ValueError lists the missing / unexpected / mis-shaped keys); False: unexpected keys are ignored and a layer
    whose projections the file leaves out keeps the UNet's own (its MLP keys are required either way)."""

    weights: Optional[str] = None
    strict: bool = True

    def validate(self) -> None:
        if self.weights is not None:
            if not isinstance(self.weights, (str, os.PathLike)) or not os.fspath(self.weights):
                raise ValueError(f"linfusion: weights must be a path (a LinFusion folder or .safetensors file) or "
                                 f"None, got {self.weights!r}")
            resolve_weights(self.weights)
        if not isinstance(self.strict, bool):
            raise ValueError(f"linfusion: strict must be True or False, got {self.strict!r}")

    def _files(self, pipe) -> Tuple[str, Optional[str]]:
        if self.weights is not None:
            return resolve_weights(self.weights)
        folder = shipped_weights(pipe)
        if folder is None or not os.path.isfile(os.path.join(folder, WEIGHTS_NAME)):
            where = f"{folder} has none" if folder else "this pipeline was not loaded from a folder"
            raise ValueError(f"linfusion: weights=None means the model's own LinFusion weights, and {where}; pass "
                             "weights=<a LinFusion folder or .safetensors file> (the built-in digits ships its own)")
        return resolve_weights(folder)

    def check(self, pipe) -> None:
        from velodiff.models.attention import Attention
        unet = getattr(pipe, "unet", None)
        fits = "UNet pipelines (Stable Diffusion 1.x / 2.x, SDXL, the built-in digits)"
        if unet is None or not hasattr(unet, "down_blocks"):
            what = "a transformer (DiT / PixArt)" if getattr(pipe, "transformer", None) is not None else "no UNet"
            raise ValueError(f"linfusion fits {fits}; {type(pipe).__name__} denoises with {what}")
        modules = dict(unet.named_modules())
        names = linfusion_layer_names(unet)
        if not names:
            raise ValueError(f"linfusion fits {fits}; this UNet has no self-attention (attn1) layer")
        for name in names:
            layer = modules[name]
            if isinstance(layer, LinFusionAttention):
                raise ValueError("linfusion is already applied to this pipeline (velodiff.restore(pipe) removes it)")
            if not isinstance(layer, Attention) or not isinstance(layer.to_out[0], nn.Linear):
                raise ValueError(f"linfusion: {name} is {type(layer).__name__}; it replaces velodiff's softmax "
                                 "Attention layers (apply it before quantizing the attention projections)")
            if layer.is_cross_attention or layer.group_norm is not None or layer.norm_q is not None:
                raise ValueError(f"linfusion: {name} is not a plain self-attention (cross-attention, group norm or "
                                 "qk-norm); LinFusion replaces self-attention only")
        file, config = self._files(pipe)
        plan_layers(unet, file, config, self.strict)

    def apply(self, pipe) -> Callable[[], None]:
        file, config = self._files(pipe)
        plans = plan_layers(pipe.unet, file, config, self.strict)
        return install_linfusion(pipe.unet, plans, read_linfusion_weights(file))
