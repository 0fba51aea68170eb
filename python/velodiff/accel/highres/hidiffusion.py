"""HiDiffusion (Zhang et al., "HiDiffusion: Unlocking Higher-Resolution Creativity and Efficiency in Pretrained
Diffusion Models", ECCV 2024, arXiv 2311.17528; reference code megvii-research/HiDiffusion): a UNet sampled above
its training size without duplicated objects, by two changes to the UNet:

- RAU-Net (:mod:`.raunet`): for the first ``fraction`` of the steps, the levels below the first attention level run
  at the size the model was trained for (a strided-dilated downsampler or a pooled level, per model family).
- MSW-MSA (:mod:`.msw_msa`): the self-attention (``attn1``) of the first attention level's transformer blocks, down
  and up, runs in a ``window_grid`` of windows (2 x 2: each window about the training-time token count) with a
  cyclic shift of k/4 of the window, k drawn uniformly from 0..3 per layer and step.

Where it differs from the reference: the schedule is the plan's step (the reference counts UNet forward calls,
which breaks on Heun, split CFG and repeated calls); the shifts come from a generator seeded with ``seed`` at the
start of every pipeline call (the reference draws from torch's global generator on every block call), one per
(step, layer), shared by the CFG halves and Heun's two evaluations, so images reproduce; sizes the grid does not
divide are padded with masked keys instead of resampled bicubically.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from velodiff.accel.highres.msw_msa import NUM_SHIFTS, shift_for, windowed_self_attention
from velodiff.accel.highres.raunet import CONV, DILATED, POOL, POOLED, first_attention_level, \
    full_resolution_convs, install_raunet, install_redilation, raunet_phase, redilation_factor, \
    resolve_mode
from velodiff.accel.registry import Technique, register

__all__ = ["HiDiffusion"]


MODES = ("auto", CONV, POOL)
DOWNSAMPLES = (DILATED, POOLED)
#: the reference's settings, used for every field a call and the model folder leave unset (None)
REFERENCE = {"fraction": 0.4, "downsample": DILATED, "redilate": False}


def _fraction(field: str, value) -> None:
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1
    if not ok:
        raise ValueError(f"hidiffusion: {field} must be a number in [0, 1], got {value!r}")


@register("hidiffusion")
@dataclass(frozen=True)
class HiDiffusion(Technique):
    """HiDiffusion on a UNet pipeline (SD 1.x / 2.x / SDXL, ``digits``).

    Fields left None take the model folder's measured setting (``model_index.json`` ``_velodiff_defaults``
    ``"hidiffusion"``: the built-in ``digits`` sets fraction 1.0, downsample pooled, redilate on), else the
    reference's (:data:`REFERENCE`).

    fraction: RAU-Net is on for steps < floor(fraction * steps) (the reference's T1_ratio, 0.4 below 2048 px;
    0: off). raunet: ``auto`` (SD 1.x / 2.x / digits: ``conv``; SDXL: ``pool``), ``conv`` or ``pool``.
    aggressive_fraction: with ``pool``, the conv variant first, for steps < floor(aggressive_fraction * steps) (the
    reference's SDXL default 8/50 = 0.16; 0: off). msw_msa: windowed self-attention on the first attention level.
    window_grid: (rows, columns) of windows. seed: seeds the window shifts of every call.
    downsample: the conv variant's downsampler, ``dilated`` (the reference's stride-4 dilated conv) or ``pooled``
    (2x2 average pool, then the native conv). redilate: while RAU-Net is on, the 3x3 convs that stay at full
    resolution (conv_in, the switched level's resnets down and up, the upsampler back to it, conv_out) run dilated
    by the size ratio (ScaleCrafter's re-dilation, arXiv 2310.07702), so they cover the share of the image they
    were trained on. Not in the reference: needed where the full-resolution level carries the object's shape, as
    in ``digits`` (README, "High resolution")."""

    def resolved(self, pipe) -> Dict[str, Any]:
        """fraction, downsample and redilate for ``pipe``: this config's value, else the folder's, else the
        reference's. ValueError when the folder's value is invalid."""
        folder = dict(getattr(pipe, "defaults", {}).get("hidiffusion", {}) or {})
        unknown = sorted(set(folder) - set(REFERENCE))
        if unknown:
            raise ValueError(f"model_index.json: _velodiff_defaults.hidiffusion has unknown keys {unknown}; "
                             f"it may set {sorted(REFERENCE)}")
        out = {}
        for key, reference in REFERENCE.items():
            mine = getattr(self, key)
            out[key] = mine if mine is not None else folder.get(key, reference)
        try:
            dataclasses.replace(self, **out)  # validates the folder's values
        except ValueError as e:
            raise ValueError(f"model_index.json: _velodiff_defaults: {e}") from None
        return out

    fraction: Optional[float] = None
    raunet: str = "auto"
    aggressive_fraction: float = 0.16
    msw_msa: bool = True
    window_grid: Tuple[int, ...] = (2, 2)
    seed: int = 0
    downsample: Optional[str] = None
    redilate: Optional[bool] = None

    def validate(self) -> None:
        if self.fraction is not None:
            _fraction("fraction", self.fraction)
        if self.downsample is not None and self.downsample not in DOWNSAMPLES:
            raise ValueError(f"hidiffusion: downsample must be one of {', '.join(DOWNSAMPLES)}, "
                             f"got {self.downsample!r}")
        if self.redilate is not None and not isinstance(self.redilate, bool):
            raise ValueError(f"hidiffusion: redilate must be True or False, got {self.redilate!r}")
        _fraction("aggressive_fraction", self.aggressive_fraction)
        if self.raunet not in MODES:
            raise ValueError(f"hidiffusion: raunet must be one of {', '.join(MODES)}, got {self.raunet!r}")
        if not isinstance(self.msw_msa, bool):
            raise ValueError(f"hidiffusion: msw_msa must be True or False, got {self.msw_msa!r}")
        grid = self.window_grid
        if (not isinstance(grid, tuple) or len(grid) != 2
                or any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid)):
            raise ValueError(f"hidiffusion: window_grid must be two integers >= 1 (rows, columns), got {grid!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"hidiffusion: seed must be an integer >= 0, got {self.seed!r}")

    def check(self, pipe) -> None:
        unet = getattr(pipe, "unet", None)
        fits = "UNet pipelines: Stable Diffusion 1.x / 2.x, SDXL and the built-in digits"
        if unet is None or not hasattr(unet, "down_blocks") or not hasattr(unet, "prepare"):
            what = "a transformer (DiT / PixArt)" if getattr(pipe, "transformer", None) is not None else \
                f"{type(unet).__name__ if unet is not None else 'no UNet'}"
            raise ValueError(f"hidiffusion fits {fits}; {type(pipe).__name__} denoises with {what}")
        level = first_attention_level(unet)
        if level is None:
            raise ValueError(f"hidiffusion fits {fits}; this UNet has no down block with attention")
        self.resolved(pipe)
        mode = resolve_mode(unet, self.raunet)
        if mode == CONV and unet.down_blocks[level].downsamplers is None:
            raise ValueError(f"hidiffusion: raunet='conv' needs a downsampler on down block {level} (the first with "
                             "attention); this UNet has none there: use raunet='pool' or 'auto'")
        conv = unet.down_blocks[level].downsamplers[0].conv if unet.down_blocks[level].downsamplers else None
        if conv is not None and not isinstance(conv, torch.nn.Conv2d) and (mode == CONV or self.aggressive_fraction):
            raise ValueError(f"hidiffusion: the conv variant of RAU-Net needs a plain Conv2d downsampler, "
                             f"got {type(conv).__name__}; use raunet='pool' with aggressive_fraction=0")

    def apply(self, pipe) -> Callable[[], None]:
        from velodiff.models.transformer_2d import Transformer2DModel
        from velodiff.models.attention import Attention

        unet = pipe.unet
        level = first_attention_level(unet)
        mode = resolve_mode(unet, self.raunet)
        settings = self.resolved(pipe)
        fraction = settings["fraction"]
        has_conv = unet.down_blocks[level].downsamplers is not None
        n = len(unet.down_blocks)

        def context():
            c = pipe.denoise_context
            return c if c is not None and c.call_index >= 0 else None

        def state() -> dict:
            return context().state_for(self, per_branch=False)

        def phase():
            c = context()
            if c is None:
                return None
            return raunet_phase(c.step, c.num_steps, fraction, mode, self.aggressive_fraction, has_conv)

        undos: List[Callable[[], None]] = [install_raunet(unet, level, mode, phase, state, settings["downsample"])]
        if settings["redilate"]:
            native = unet.config.sample_size
            native = (native, native) if isinstance(native, int) else tuple(native)

            def dilation(x) -> int:  # every full-resolution conv reads a map of the latent's size
                return 1 if phase() is None else redilation_factor(tuple(x.shape[-2:]), native)
            undos.append(install_redilation(full_resolution_convs(unet, level), dilation))
        if self.msw_msa:
            undos.extend(self._install_msw_msa(unet.down_blocks[level].attentions + unet.up_blocks[n - 1 - level]
                                               .attentions, context, state, Transformer2DModel, Attention))

        def undo() -> None:
            for u in reversed(undos):
                u()
        return undo

    def _install_msw_msa(self, transformers, context, state, transformer_cls, attention_cls):
        """Windowed attn1 in every transformer block of ``transformers``: the Transformer2DModel records its map's
        (h, w), its blocks' attn1 reads it. Returns the undos."""
        from velodiff.accel.cache.unet_hooks import replace_forward
        grid = tuple(self.window_grid)
        layers = [block.attn1 for t in transformers for block in t.transformer_blocks]
        layer_index = {id(a): i for i, a in enumerate(layers)}

        def shift_index(attn) -> int:
            c, s = context(), state()
            table = s.get("shifts")
            if table is None:  # one draw per (step, layer), from a generator seeded per call
                g = torch.Generator().manual_seed(self.seed)
                table = s["shifts"] = torch.randint(0, NUM_SHIFTS, (c.num_steps, len(layers)), generator=g).tolist()
            return table[c.step][layer_index[id(attn)]]

        def record_size(plain):
            def forward(hidden_states, *args, **kwargs):
                if context() is not None:
                    state()["size"] = tuple(hidden_states.shape[-2:])
                return plain(hidden_states, *args, **kwargs)
            return forward

        def windowed(attn):
            def make(plain):
                def forward(hidden_states, encoder_hidden_states=None, attention_mask=None):
                    if (context() is None or encoder_hidden_states is not None or attention_mask is not None
                            or hidden_states.dim() != 3):
                        return plain(hidden_states, encoder_hidden_states, attention_mask)
                    size = state()["size"]
                    shift = shift_for(shift_index(attn), size, grid)
                    return windowed_self_attention(attn, hidden_states, size, grid, shift)
                return forward
            return make

        undos = [replace_forward(t, record_size) for t in transformers]
        undos += [replace_forward(a, windowed(a)) for a in layers if isinstance(a, attention_cls)]
        return undos
