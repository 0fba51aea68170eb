"""Post-training quantization of a pipeline's denoiser: SVDQuant W4A4 with a fused low-rank branch, the baselines
naive W4A4 and W8A8, and FP8 (e4m3 W8A8 with per-token activation scales, or FP8 weights only) (torchao's shape: a
verb plus a config object).

    import velodiff as vd
    pipe = vd.Pipeline.from_pretrained("digits")
    report = vd.quant.quantize(pipe, vd.quant.QuantConfig("svdquant", rank=32))   # in place
    vd.quant.save_quantized(pipe, "digits-w4a4")                                  # a loadable pipeline folder
    pipe = vd.Pipeline.from_pretrained("digits-w4a4")                             # runs the 4-bit kernels

or reversibly, ``vd.optimize(pipe, vd.quant.QuantConfig(...))`` ... ``vd.restore(pipe)``.

Which layers are quantized: the linear layers of the denoiser's transformer blocks (attention projections and
feed-forward), as in SVDQuant / Nunchaku; convolutions, embeddings, adaLN modulation, proj_in/out and the
cross-attention key/value projections (which read the few text tokens) stay 16-bit. ``include`` / ``skip``
(fnmatch patterns over qualified module names) override the per-family defaults in :data:`DEFAULT_LAYERS`.
"""
from __future__ import annotations

import fnmatch
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from velodiff.models.feedforward import GELU
from velodiff.quant.calibrate import TIMESTEP_MODES, calibrate, default_prompts, train_timesteps
from velodiff.quant.conv import QuantizedConv2d, SplitConv2d, conv_is_supported
from velodiff.quant.checkpoint import (FORMAT_VERSION, QuantizedCheckpointError, load_quantized, save_quantized,
                                       is_quantized_folder)
from velodiff.quant.fp8 import FP8_METHODS, Fp8Linear
from velodiff.quant.linear import METHODS as INT_METHODS, QuantizedLinear
from velodiff.quant.lowbit_fp import (LOWBIT_METHODS, FpFormat, LowbitFpLinear, formats_of,
                                      quantize_linear as lowbit_linear, quantize_rows)
from velodiff.quant.lora import add_lora, remove_lora, set_lora_strength
from velodiff.quant.rank_budget import rank_for_budget
from velodiff.quant.svdquant import DEFAULT_ALPHAS, LayerStats, quantize_layer
from velodiff.quant.temporal import temporal_inputs, temporal_layer_names

#: every quantization method: the integer ones (QuantizedLinear), the FP8 ones (Fp8Linear), the low-bit ones
METHODS = INT_METHODS + FP8_METHODS + LOWBIT_METHODS
#: the methods that calibrate on the model's own sampling trajectory
CALIBRATED = ("svdquant",) + LOWBIT_METHODS

_BLOCK_LINEARS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0",
                  "ff.net.0.proj", "ff.net.2")
#: denoiser class -> fnmatch patterns of the linear layers quantized by default
DEFAULT_LAYERS: Dict[str, Tuple[str, ...]] = {
    "UNet2DConditionModel": tuple(f"*transformer_blocks.*.{n}" for n in _BLOCK_LINEARS),
    "DiTTransformer2DModel": tuple(f"transformer_blocks.*.{n}" for n in _BLOCK_LINEARS),
    "PixArtTransformer2DModel": tuple(f"transformer_blocks.*.{n}" for n in _BLOCK_LINEARS),
}
#: ``layers="all"``: also the cross-attention key/value projections, and in a UNet the ResNet convolutions and
#: time projections and the resampling convolutions (QuantizedConv2d), the transformers' proj_in / proj_out (1x1
#: convs applied to tokens: quantized as linear layers); in DiT the adaLN modulation, in PixArt the shared adaLN and
#: the caption projection. conv_in / conv_out, the embeddings and the final layers stay 16-bit.
ALL_LAYERS: Dict[str, Tuple[str, ...]] = {
    "UNet2DConditionModel": ("*transformer_blocks.*.attn*", "*transformer_blocks.*.ff.*", "*resnets.*.conv1",
                             "*resnets.*.conv2", "*resnets.*.conv_shortcut", "*resnets.*.time_emb_proj",
                             "*samplers.*.conv", "*attentions.*.proj_in", "*attentions.*.proj_out"),
    "DiTTransformer2DModel": ("transformer_blocks.*.attn1.*", "transformer_blocks.*.ff.*",
                              "transformer_blocks.*.norm1.linear"),
    "PixArtTransformer2DModel": ("transformer_blocks.*.attn*", "transformer_blocks.*.ff.*", "adaln_single.linear",
                                 "caption_projection.*"),
}
LAYER_PRESETS = {"default": DEFAULT_LAYERS, "all": ALL_LAYERS}


@dataclass(frozen=True)
class QuantConfig:
    """What to quantize and how.

    method: "svdquant" (smoothing + rank-``rank`` 16-bit branch + int4 residual, W4A4), "naive-w4a4", "w8a8"
    (int8 per group of 64), "fp8" (FP8 weights per output channel and activations per token, FP8 GEMM) or
    "fp8-weight-only" (FP8 weights decoded for a 16-bit GEMM); the FP8 methods take linear layers only.
    "lowbit-fp": weights in a ``w_bits`` float format chosen per layer with its clipping range (and rounding
    learned with ``learn_rounding``, ``rounding_iters`` Adam steps), activations per token in ``a_bits`` (8: e4m3;
    fewer: a format searched per layer; None: not quantized); 4-bit and e4m3 / e5m2 weights with e4m3 / e5m2
    activations run on the FP8 GEMM (W4A8, W8A8), other combinations are fake-quantized (Chen et al. 2024,
    :mod:`velodiff.quant.lowbit_fp`). "lowbit-int": the same with symmetric INT formats, the equal-bits baseline.
    Both calibrate like SVDQuant and take linear layers only.
    rank: the low-rank branch's rank (SVDQuant only; capped at min(N, K) per layer).
    fp8_format: the FP8 methods' code format, "e4m3" (the default, what inference uses) or "e5m2".
    clip_percentile: FP8 methods: each weight row's scale from this percentile of its |w| instead of the maximum
    (values beyond it saturate); None: the maximum.
    fp8_attention: with "fp8", every attention layer of the denoiser also runs in FP8 (the "fp8" attention
    backend: Q, K, P, V in e4m3, fake-quantized until it has a kernel; a checkpoint does not record it: set it
    again after loading with ``velodiff.models.attention.set_attention_backend(unet, "fp8")``).
    memory_budget: SVDQuant only: the whole denoiser's weight bytes (16-bit storage) at most this fraction of its
    fp16 bytes, met with the largest uniform rank <= ``rank`` that fits (:mod:`velodiff.quant.rank_budget`; 0
    means smoothing alone); None: every layer gets ``rank``.
    alphas: the smoothing-strength grid searched per layer; lowrank_iters: refinement iterations of the branch.
    layers: "default" (:data:`DEFAULT_LAYERS`) or "all" (:data:`ALL_LAYERS`, convolutions included).
    include / skip: fnmatch patterns of qualified module names (``include`` overrides ``layers``).
    fuse_activations: compute a feed-forward GELU in the GEMM epilogue of the layer before it.
    calibration: number of images generated for calibration, their steps, guidance and sampler (None: the
    pipeline's defaults), prompts (None: :func:`velodiff.quant.calibrate.default_prompts`), rows kept per layer,
    and which timesteps they come from (``calibration_timesteps``: "all" steps of the trajectory, "qdiffusion"'s
    uniformly spaced half, or "ptq4dm"'s normal weighting; :mod:`velodiff.quant.calibrate`).
    tfmq_temporal: TFMQ-DM's treatment of the temporal layers (the timestep embedding MLP and, in a UNet, the
    resnets' time_emb_proj; added to a ``layers`` preset, and required in an ``include`` selection): calibrated on
    their exact inputs at every training timestep, in order, each through the quantized layers before it,
    reconstructing the full-precision output (:mod:`velodiff.quant.temporal`); calibrated methods only.
    split_shortcut: Q-Diffusion's split quantization of the UNet up blocks' skip concatenation: conv1 and
    conv_shortcut of each up-block resnet (selected with layers="all") become two quantized convolutions, one per
    part of their cat([hidden_states, skip]) input (:class:`velodiff.quant.conv.SplitConv2d`); INT methods only.
    """

    method: str = "svdquant"
    rank: int = 32
    memory_budget: Optional[float] = None
    alphas: Tuple[float, ...] = DEFAULT_ALPHAS
    lowrank_iters: int = 1
    layers: str = "default"
    include: Optional[Tuple[str, ...]] = None
    skip: Tuple[str, ...] = ()
    calibration_images: int = 16
    calibration_steps: int = 20
    calibration_guidance: Optional[float] = None
    calibration_sampler: Optional[str] = None
    calibration_prompts: Optional[Tuple[Any, ...]] = None
    calibration_rows: int = 256
    seed: int = 0
    fuse_activations: bool = True
    fp8_format: str = "e4m3"
    clip_percentile: Optional[float] = None
    fp8_attention: bool = False
    calibration_timesteps: str = "all"
    w_bits: int = 4
    a_bits: Optional[int] = 8
    learn_rounding: bool = False
    rounding_iters: int = 300
    split_shortcut: bool = False
    tfmq_temporal: bool = False

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.fp8_format not in ("e4m3", "e5m2"):
            raise ValueError(f"fp8_format must be 'e4m3' or 'e5m2', got {self.fp8_format!r}")
        if self.fp8_attention and self.method != "fp8":
            raise ValueError(f"fp8_attention goes with method 'fp8', not {self.method!r}")
        if self.clip_percentile is not None:
            if self.method not in FP8_METHODS:
                raise ValueError(f"clip_percentile applies to the FP8 methods only, not {self.method!r}")
            if not isinstance(self.clip_percentile, (int, float)) or not 0 < self.clip_percentile <= 100:
                raise ValueError(f"clip_percentile must be in (0, 100], got {self.clip_percentile!r}")
        if not isinstance(self.rank, int) or self.rank < 0 or (self.method == "svdquant" and self.rank == 0):
            raise ValueError(f"rank must be a positive integer for svdquant, got {self.rank!r}")
        if self.memory_budget is not None:
            if self.method != "svdquant":
                raise ValueError(f"memory_budget applies to svdquant only, not {self.method!r}")
            if not isinstance(self.memory_budget, (int, float)) or not 0 < self.memory_budget:
                raise ValueError(f"memory_budget must be a fraction > 0 of the fp16 bytes, got {self.memory_budget!r}")
        if self.method in LOWBIT_METHODS:
            if self.w_bits not in range(2, 9):
                raise ValueError(f"w_bits must be from 2 to 8, got {self.w_bits!r}")
            if self.a_bits is not None and self.a_bits not in range(2, 9):
                raise ValueError(f"a_bits must be from 2 to 8 or None, got {self.a_bits!r}")
            if self.method == "lowbit-int" and self.learn_rounding:
                raise ValueError("learn_rounding applies to lowbit-fp")
        if self.split_shortcut and self.method not in INT_METHODS:
            raise ValueError(f"split_shortcut applies to the methods that quantize convolutions {INT_METHODS}, not "
                             f"{self.method!r}")
        if self.tfmq_temporal and self.method not in CALIBRATED:
            raise ValueError(f"tfmq_temporal applies to the calibrated methods {CALIBRATED}, not {self.method!r}")
        if self.calibration_timesteps not in TIMESTEP_MODES:
            raise ValueError(f"calibration_timesteps must be one of {TIMESTEP_MODES}, got "
                             f"{self.calibration_timesteps!r}")
        if self.layers not in LAYER_PRESETS:
            raise ValueError(f"layers must be one of {tuple(LAYER_PRESETS)}, got {self.layers!r}")
        if self.calibration_images < 1 or self.calibration_steps < 1:
            raise ValueError("calibration_images and calibration_steps must be >= 1")

    def apply(self, pipe) -> Callable[[], None]:
        """``velodiff.optimize`` hook: quantize in place; the returned function puts the original layers back."""
        from velodiff.models.attention import Attention
        originals: Dict[str, nn.Module] = {}
        denoiser = denoiser_of(pipe)[1]
        backends = {m: m.backend for m in denoiser.modules() if isinstance(m, Attention)}
        quantize(pipe, self, _originals=originals)

        def undo() -> None:
            for name, module in originals.items():
                _set_module(denoiser, name, module)
            for module, backend in backends.items():
                module.backend = backend
            pipe.quantization = None
        return undo


def SVDQuant(rank: int = 32, **kwargs) -> QuantConfig:
    return QuantConfig("svdquant", rank=rank, **kwargs)


def NaiveW4A4(**kwargs) -> QuantConfig:
    return QuantConfig("naive-w4a4", rank=0, **kwargs)


def W8A8(**kwargs) -> QuantConfig:
    return QuantConfig("w8a8", rank=0, **kwargs)


def FP8(weight_only: bool = False, **kwargs) -> QuantConfig:
    return QuantConfig("fp8-weight-only" if weight_only else "fp8", rank=0, **kwargs)


def LowbitFP(w_bits: int = 4, a_bits: Optional[int] = 8, learn_rounding: bool = False, **kwargs) -> QuantConfig:
    return QuantConfig("lowbit-fp", rank=0, w_bits=w_bits, a_bits=a_bits, learn_rounding=learn_rounding, **kwargs)


def LowbitINT(w_bits: int = 4, a_bits: Optional[int] = 8, **kwargs) -> QuantConfig:
    return QuantConfig("lowbit-int", rank=0, w_bits=w_bits, a_bits=a_bits, **kwargs)


def _activation_format(config: QuantConfig, sample: Optional[torch.Tensor]) -> Optional[FpFormat]:
    """The per-token activation format of a low-bit layer: None (a_bits None), INT for lowbit-int, e4m3 at 8 bits,
    else the a_bits float format with the least error on the layer's calibration rows."""
    if config.a_bits is None:
        return None
    if config.method == "lowbit-int":
        return FpFormat(0, config.a_bits - 1)
    if config.a_bits == 8:
        return FpFormat(4, 3)
    return min(formats_of(config.a_bits), key=lambda f: float((quantize_rows(sample, f)[0] - sample).square().sum()))


def denoiser_of(pipe) -> Tuple[str, nn.Module]:
    """(component name, module) of the pipeline's denoiser: ``unet`` or ``transformer``."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return name, module
    raise ValueError(f"{type(pipe).__name__} has no unet or transformer to quantize")


def select_layers(model: nn.Module, include: Optional[Sequence[str]] = None, skip: Sequence[str] = (),
                  layers: str = "default") -> Dict[str, nn.Module]:
    """Qualified name -> nn.Linear (or plain nn.Conv2d) of the layers to quantize in ``model``: those matching
    ``include`` (default: the ``layers`` preset of the model's class) and no ``skip`` pattern."""
    cls = type(model).__name__
    if include is None:
        preset = LAYER_PRESETS[layers]
        if cls not in preset:
            raise ValueError(f"no {layers!r} layer selection for {cls}; pass include=(fnmatch patterns, ...)")
        include = preset[cls]
    chosen = {name: m for name, m in model.named_modules()
              if (isinstance(m, nn.Linear) or conv_is_supported(m)) and not isinstance(m, QuantizedLinear)
              and any(fnmatch.fnmatchcase(name, p) for p in include)
              and not any(fnmatch.fnmatchcase(name, p) for p in skip)}
    if not chosen:
        raise ValueError(f"no nn.Linear / nn.Conv2d of {cls} matches include={tuple(include)} "
                         f"(skip={tuple(skip)})")
    return chosen


def _is_token_conv(model: nn.Module, name: str, module: nn.Module) -> bool:
    """A 1x1 Conv2d that its parent applies to tokens as a linear layer (a UNet transformer's proj_in / proj_out
    in SD 1.x): quantized as a QuantizedLinear."""
    return (isinstance(module, nn.Conv2d) and tuple(module.kernel_size) == (1, 1)
            and hasattr(_parent(model, name), "_token_linear") and name.rpartition(".")[2] in ("proj_in", "proj_out"))


def _linear_view(conv: nn.Conv2d) -> nn.Linear:
    """An nn.Linear sharing a 1x1 conv's weight and bias (so calibration hooks see its token inputs)."""
    with torch.device("meta"):
        linear = nn.Linear(conv.in_channels, conv.out_channels, bias=conv.bias is not None)
    linear.weight = nn.Parameter(conv.weight.detach().view(conv.out_channels, conv.in_channels), requires_grad=False)
    if conv.bias is not None:
        linear.bias = nn.Parameter(conv.bias.detach(), requires_grad=False)
    return linear


def _parent(root: nn.Module, name: str) -> nn.Module:
    parent = name.rpartition(".")[0]
    return root.get_submodule(parent) if parent else root


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    setattr(_parent(root, name), name.rpartition(".")[2], module)


def install_layer(model: nn.Module, name: str, layer: QuantizedLinear, fuse_activation: bool = True) -> None:
    """Put the quantized ``layer`` at ``name`` in ``model``; with ``fuse_activation``, a feed-forward GELU that
    follows it (its parent is a GELU module: DiT and PixArt MLPs) is computed in the GEMM epilogue instead."""
    parent = _parent(model, name)
    if fuse_activation and isinstance(parent, GELU) and name.endswith(".proj"):
        layer.fused_activation = parent.activation_name
    _set_module(model, name, layer)


def _int_layer(weight: torch.Tensor, bias: Optional[torch.Tensor], stats: Optional[LayerStats], config: QuantConfig,
               rank: int) -> QuantizedLinear:
    return quantize_layer(weight, bias, config.method, stats, rank=rank, alphas=config.alphas,
                          lowrank_iters=config.lowrank_iters, dtype=weight.dtype)


def _concat_split(model: nn.Module, name: str, module: nn.Module) -> Optional[int]:
    """The channel where a UNet up-block resnet's conv1 / conv_shortcut input switches from the hidden states to the
    skip (None for any other layer)."""
    if not isinstance(module, nn.Conv2d) or name.rpartition(".")[2] not in ("conv1", "conv_shortcut"):
        return None
    return getattr(_parent(model, name), "concat_split", None)


def _split_conv(conv: nn.Conv2d, split: int, stats: Optional[LayerStats], config: QuantConfig,
                rank: int) -> SplitConv2d:
    """``conv`` quantized as two convolutions over input channels [0, split) and [split, Cin), each calibrated on
    its own part of the input (im2col rows are channel major: a part is a contiguous column range)."""
    kh, kw = conv.kernel_size
    cut = split * kh * kw
    w = conv.weight.reshape(conv.out_channels, -1)
    parts = []
    for cols, bias, channels in ((slice(0, cut), conv.bias, split), (slice(cut, None), None, conv.in_channels - split)):
        part_stats = None if stats is None else LayerStats(absmax=stats.absmax[cols], sample=stats.sample[:, cols])
        q = _int_layer(w[:, cols], bias, part_stats, config, rank)
        with torch.device("meta"):
            shape = nn.Conv2d(channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                              conv.dilation, bias=False)
        parts.append(QuantizedConv2d.from_linear(q, shape))
    return SplitConv2d(parts[0], parts[1], split)


@torch.no_grad()
def quantize(pipe, config: QuantConfig = QuantConfig(), progress: bool = True,
             _originals: Optional[Dict[str, nn.Module]] = None) -> Dict[str, Any]:
    """Quantize ``pipe``'s denoiser in place per ``config``; returns a report (layers, seconds, and the bytes of the
    quantized layers before and after, both counted as a 16-bit checkpoint stores them)."""
    if not isinstance(config, QuantConfig):
        raise TypeError(f"config must be a velodiff.quant.QuantConfig, got {type(config).__name__}")
    t0 = time.time()
    component, model = denoiser_of(pipe)
    layers = select_layers(model, config.include, config.skip, config.layers)
    fp8 = config.method in FP8_METHODS
    if fp8 or config.method in LOWBIT_METHODS:
        convs = [name for name, m in layers.items() if isinstance(m, nn.Conv2d) and not _is_token_conv(model, name, m)]
        if convs:
            raise ValueError(f"method {config.method!r} quantizes linear layers only; the selection holds "
                             f"{len(convs)} convolutions (e.g. {convs[0]!r}): use layers='default' or skip them")
    if config.tfmq_temporal and config.include is None:  # a preset: the temporal layers join it
        layers.update({n: model.get_submodule(n) for n in temporal_layer_names(model)
                       if isinstance(model.get_submodule(n), nn.Linear)
                       and not any(fnmatch.fnmatchcase(n, p) for p in config.skip)})
    names = [n for n in temporal_layer_names(model) if n in layers] if config.tfmq_temporal else []
    if config.tfmq_temporal and not names:
        raise ValueError("tfmq_temporal: no temporal layer is selected (the timestep embedding's linear_1 / linear_2, "
                         "a UNet's time_emb_proj); add them with include=(..., '*time_emb_proj', "
                         "'*time_embedding.linear_*', '*timestep_embedder.linear_*')")
    token_convs = set()
    for name, module in list(layers.items()):
        if _is_token_conv(model, name, module):  # a 1x1 conv that its parent applies to tokens: a linear layer
            linear = _linear_view(module)
            _set_module(model, name, linear)
            if _originals is not None:
                _originals[name] = module
            layers[name] = linear
            token_convs.add(name)
    # sizes as 16-bit checkpoints store them (the quantized side: codes + 16-bit scales/branch/bias)
    before = sum(2 * (m.weight.numel() + (m.bias.numel() if m.bias is not None else 0)) for m in layers.values())
    model_fp16 = 2 * sum(p.numel() for p in model.parameters())
    rank = config.rank
    if config.memory_budget is not None:  # decided before the calibration runs: the bytes are known up front
        rank = rank_for_budget(layers, config.rank, config.memory_budget, model_fp16, before)
    stats: Dict[str, Optional[LayerStats]] = {name: None for name in layers}
    if config.method in CALIBRATED:
        prompts = config.calibration_prompts or default_prompts(pipe)
        stats = calibrate(pipe, layers, prompts, images=config.calibration_images,
                          steps=config.calibration_steps, guidance=config.calibration_guidance,
                          sampler=config.calibration_sampler, rows=config.calibration_rows, seed=config.seed,
                          timesteps=config.calibration_timesteps)
    t_cal = time.time() - t0

    temporal: Dict[str, torch.Tensor] = {}  # TFMQ-DM: temporal layer -> full-precision inputs over every timestep
    if config.tfmq_temporal:
        finite_set = torch.arange(train_timesteps(pipe))
        fp_inputs = temporal_inputs(model, finite_set)
        temporal = {n: fp_inputs[n] for n in names}
        layers = {**{n: layers[n] for n in names}, **{n: m for n, m in layers.items() if n not in temporal}}

    iterator = layers.items()
    if progress:
        from tqdm.auto import tqdm
        iterator = tqdm(list(iterator), desc=f"quantize ({config.method})", leave=False)
    after = 0
    ranks = {}
    for name, linear in iterator:
        target = None
        if name in temporal:  # inputs through the temporal layers quantized so far; target: the fp32 output
            rows = temporal_inputs(model, finite_set)[name].to(linear.weight.device)
            stats[name] = LayerStats(absmax=rows.abs().amax(dim=0), sample=rows)
            target = temporal[name].to(rows.device) @ linear.weight.detach().float().T
        if fp8:
            q = Fp8Linear.from_linear(linear, config.method, config.fp8_format, config.clip_percentile)
        elif config.method in LOWBIT_METHODS:
            sample = stats[name].sample
            q = lowbit_linear(linear, config.w_bits, _activation_format(config, sample), sample,
                              learn=config.learn_rounding, iters=config.rounding_iters,
                              int_weights=config.method == "lowbit-int", target=target)
        elif config.split_shortcut and _concat_split(model, name, linear) is not None:
            q = _split_conv(linear, _concat_split(model, name, linear), stats[name], config, rank)
        else:
            q = _int_layer(linear.weight.reshape(linear.weight.shape[0], -1), linear.bias, stats[name], config, rank)
        if isinstance(linear, nn.Conv2d) and not isinstance(q, SplitConv2d):
            q = QuantizedConv2d.from_linear(q, linear)
        q.token_conv = name in token_convs
        if _originals is not None:
            _originals.setdefault(name, linear)
        install_layer(model, name, q, config.fuse_activations)
        after += q.weight_bytes(float_bytes=2)
        ranks[name] = 0 if getattr(q, "lora_down", None) is None else q.lora_down.shape[1]
    pipe.quantization = {"format_version": FORMAT_VERSION, "method": config.method, "rank": rank,
                         "memory_budget": config.memory_budget, "component": component, "layers": sorted(layers)}
    if fp8:
        pipe.quantization.update(fp8_format=config.fp8_format, clip_percentile=config.clip_percentile,
                                 fp8_attention=config.fp8_attention)
    if config.fp8_attention:
        from velodiff.models.attention import set_attention_backend
        set_attention_backend(model, "fp8")
    return {"method": config.method, "rank": rank, "component": component, "layers": len(layers),
            "calibration_seconds": round(t_cal, 2), "seconds": round(time.time() - t0, 2),
            "layer_bytes_before": before, "layer_bytes_after": after,
            "model_ratio": round((model_fp16 - before + after) / model_fp16, 4),
            "ranks": {"min": min(ranks.values(), default=0), "max": max(ranks.values(), default=0),
                      "mean": round(sum(ranks.values()) / max(1, len(ranks)), 2)}}


__all__ = ["ALL_LAYERS", "DEFAULT_LAYERS", "LAYER_PRESETS", "FORMAT_VERSION", "FP8", "Fp8Linear", "FpFormat",
           "LowbitFP", "LowbitFpLinear", "LowbitINT", "METHODS", "NaiveW4A4", "QuantConfig", "QuantizedCheckpointError",
           "QuantizedConv2d", "QuantizedLinear", "SVDQuant", "W8A8", "add_lora", "denoiser_of", "install_layer", "is_quantized_folder", "load_quantized",
           "quantize", "remove_lora", "save_quantized", "select_layers", "set_lora_strength"]
