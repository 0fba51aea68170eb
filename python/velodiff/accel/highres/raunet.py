"""RAU-Net: HiDiffusion's resolution-aware UNet (Zhang et al., arXiv 2311.17528, section 3.2; reference code
megvii-research/HiDiffusion, ``hidiffusion.py``).

For the first steps of sampling (the noisy ones, where the layout is decided) the feature maps below the first
attention level are shrunk to the size the model was trained on, so the deep levels see one object, not a tiling of
several; the matching up path brings them back to the skip connections' size. Two variants, as the reference applies
them per model family, at the first down level with attention (level ``a``; SD 1.x / 2.x and ``digits``: 0,
SDXL: 1):

- ``conv`` (RD / RU; reference for SD 1.x / 2.x): level ``a``'s downsampler conv (3x3, stride 2, padding 1) runs
  with stride 4, padding 2, dilation 2 and the same weights (H -> ceil(H / 4)), and every upsampler resizes to its
  skip's size (nearest), so the mirrored upsampler brings ceil(H / 4) back to H.
- ``pool`` (reference for SDXL): a 2x2 average pool (ceil mode) after level ``a``'s first layer, and a bicubic resize
  back to the saved size after the mirrored up block's second-to-last layer (the last one that consumes a pooled
  skip). The reference's SDXL "aggressive" schedule runs the ``conv`` variant before the pool (its first 8 of 50
  steps).

Schedule (:func:`raunet_phase`): with n the steps of this run and T1 = floor(``fraction`` * n), the switch is on for
steps < T1 (the reference's ``T1 = int(n * T1_ratio)``); keyed on the plan's step (:class:`DenoiseContext`), so
Heun's two evaluations of a step, split CFG's two calls and img2img (which runs the last steps of its
discretisation: n is the steps it runs, as the reference's ``_num_timesteps``) all see the same switch.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CONV", "POOL", "DILATED", "POOLED", "raunet_phase", "first_attention_level", "resolve_mode",
           "install_raunet", "replace_attr", "full_resolution_convs", "redilation_factor", "install_redilation"]

CONV, POOL = "conv", "pool"
#: the conv variant's downsampler: the reference's dilated stride-4 conv, or a 2x2 average pool and the native conv
DILATED, POOLED = "dilated", "pooled"


def raunet_phase(step: int, num_steps: int, fraction: float, mode: str, aggressive_fraction: float = 0.0,
                 has_conv: bool = True) -> Optional[str]:
    """The variant active at ``step`` (0-based) of a run of ``num_steps``: :data:`CONV`, :data:`POOL` or None.

    ``mode`` conv: conv for step < floor(fraction * n). ``mode`` pool: conv for step < floor(aggressive_fraction *
    n) (when level ``a`` has a downsampler, ``has_conv``), then pool for step < floor(fraction * n)."""
    t1 = int(num_steps * fraction)
    if mode == CONV:
        return CONV if step < t1 else None
    if has_conv and step < int(num_steps * aggressive_fraction):
        return CONV
    return POOL if step < t1 else None


def first_attention_level(unet) -> Optional[int]:
    """The index of the first down block with attentions (SD 1.x / 2.x, ``digits``: 0; SDXL: 1), None if none."""
    for i, block in enumerate(unet.down_blocks):
        if getattr(block, "attentions", None) is not None:
            return i
    return None


def resolve_mode(unet, mode: str) -> str:
    """``auto`` -> conv when level 0 has attention and a downsampler (SD 1.x / 2.x, ``digits``), else pool (SDXL)."""
    if mode != "auto":
        return mode
    level = first_attention_level(unet)
    return CONV if level == 0 and unet.down_blocks[0].downsamplers is not None else POOL


def replace_attr(obj, name: str, make: Callable[[Callable], Callable]) -> Callable[[], None]:
    """Set ``obj.<name>`` (an instance attribute) to ``make(current)``; the undo puts back exactly what was there."""
    had = name in vars(obj)
    previous = vars(obj).get(name)
    setattr(obj, name, make(getattr(obj, name)))

    def undo() -> None:
        if had:
            setattr(obj, name, previous)
        else:
            vars(obj).pop(name, None)
    return undo


def install_raunet(unet, level: int, mode: str, phase: Callable[[], Optional[str]],
                   state: Callable[[], dict], downsample: str = DILATED) -> Callable[[], None]:
    """Install the RAU-Net switch on ``unet`` at down level ``level`` (``mode`` conv or pool). ``phase()`` says which
    variant is active for the UNet call running now (None: the plain UNet), ``state()`` gives the call's scratch
    dict. ``downsample``: the conv variant's downsampler, :data:`DILATED` (the reference's RD) or :data:`POOLED` (a
    2x2 average pool, ceil mode, then the native stride-2 conv: every position of the map reaches the levels
    below, where the dilated conv reads only the even rows and columns). Returns the undo."""
    n = len(unet.down_blocks)
    down, up = unet.down_blocks[level], unet.up_blocks[n - 1 - level]
    undos: List[Callable[[], None]] = []

    def prepare(plain):
        def wrapped(*args, **kwargs):
            call = plain(*args, **kwargs)
            # a switched level changes the sizes below it: every upsampler resizes to its skip's size
            return dataclasses.replace(call, forward_size=True) if phase() is not None else call
        return wrapped
    undos.append(replace_attr(unet, "prepare", prepare))

    if down.downsamplers is not None:
        downsampler = down.downsamplers[0]

        def switched_downsampler(plain):
            def forward(x):
                if phase() != CONV:
                    return plain(x)
                conv = downsampler.conv
                if downsample == POOLED:  # ceil(H / 2) -> the native conv's ceil(H / 4)
                    return plain(F.avg_pool2d(x, kernel_size=2, ceil_mode=True))
                # RD: same weights, stride 4, dilation 2, padding 2 -> ceil(H / 4)
                return F.conv2d(x, conv.weight, conv.bias, stride=4, padding=2, dilation=2)
            return forward
        undos.append(replace_attr(downsampler, "forward", switched_downsampler))

    if mode == POOL:
        pooled_layer = 0
        resized_layer = len(down.resnets) - 1  # the up layer that consumes the first (pooled) layer's skip

        def down_layer(plain):
            def layer(i, hidden_states, *args, **kwargs):
                out = plain(i, hidden_states, *args, **kwargs)
                if i == pooled_layer and phase() == POOL:
                    state()["pool_size"] = tuple(out.shape[-2:])
                    out = F.avg_pool2d(out, kernel_size=2, ceil_mode=True)
                return out
            return layer

        def up_layer(plain):
            def layer(i, hidden_states, *args, **kwargs):
                out = plain(i, hidden_states, *args, **kwargs)
                if i == resized_layer and phase() == POOL:
                    out = F.interpolate(out, size=state()["pool_size"], mode="bicubic")
                return out
            return layer
        undos.append(replace_attr(down, "layer", down_layer))
        undos.append(replace_attr(up, "layer", up_layer))

    def undo() -> None:
        for u in reversed(undos):
            u()
    return undo


# ----------------------------------------------------------------------------------------------------------------
# re-dilation of the full-resolution convs (ScaleCrafter, He et al., ICLR 2024, arXiv 2310.07702, section 3.2)
# ----------------------------------------------------------------------------------------------------------------

def full_resolution_convs(unet, level: int) -> List[nn.Conv2d]:
    """The 3x3 stride-1 convs that run at the sample's full resolution while RAU-Net switches level ``level``:
    ``conv_in``, the resnets of down blocks 0..level, the resnets of their mirrored up blocks, the upsampler that
    brings the switched levels back to full resolution, and ``conv_out``."""
    n = len(unet.down_blocks)
    blocks = list(unet.down_blocks[:level + 1]) + list(unet.up_blocks[n - 1 - level:])
    convs = [unet.conv_in]
    for block in blocks:
        for resnet in block.resnets:
            convs += [resnet.conv1, resnet.conv2]
    mirror = unet.up_blocks[n - 2 - level] if n - 2 - level >= 0 else None
    if mirror is not None and getattr(mirror, "upsamplers", None) is not None:
        convs.append(mirror.upsamplers[0].conv)
    convs.append(unet.conv_out)
    return [c for c in convs if isinstance(c, nn.Conv2d) and c.kernel_size == (3, 3) and c.stride == (1, 1)
            and c.dilation == (1, 1) and c.padding == (1, 1)]


def redilation_factor(size, native) -> int:
    """The dilation for a latent of ``size`` (h, w) over a model trained at ``native`` (h, w): the smaller side
    ratio, rounded, at least 1 (2 at twice the trained size)."""
    return max(1, int(round(min(size[0] / native[0], size[1] / native[1]))))


def install_redilation(convs: List[nn.Conv2d], dilation: Callable[[torch.Tensor], int]) -> Callable[[], None]:
    """Run each conv of ``convs`` with dilation (and padding) ``dilation(input)`` when it is above 1, same weights:
    the kernel covers the share of the image it covered at the trained size. Returns the undo."""
    undos = []
    for conv in convs:
        def make(plain, conv=conv):
            def forward(x):
                d = dilation(x)
                if d <= 1:
                    return plain(x)
                return F.conv2d(x, conv.weight, conv.bias, stride=1, padding=d, dilation=d)
            return forward
        undos.append(replace_attr(conv, "forward", make))

    def undo() -> None:
        for u in reversed(undos):
            u()
    return undo
