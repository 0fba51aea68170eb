"""TFMQ-DM's separate treatment of the temporal layers (Huang et al., "TFMQ-DM: Temporal Feature Maintenance
Quantization for Diffusion Models", CVPR 2024).

Temporal layers are those whose input depends on the timestep alone: the timestep embedding MLP
(``time_embedding.linear_1/2`` in a UNet, ``*.timestep_embedder.linear_1/2`` in DiT and PixArt) and, in a UNet whose
embedding has nothing else added (no SDXL ``add_embedding``, no LCM ``timestep_cond``), every resnet's
``time_emb_proj`` (its input is SiLU of that embedding). The paper's two parts, as velodiff applies them:

- Finite-set calibration (FSC): the timestep set is finite, so a temporal layer is calibrated on its exact input
  at every training timestep (``num_train_timesteps`` rows, one per t) instead of rows sampled from generated
  trajectories (where a few timesteps dominate and the timestep weightings drop some). The paper also keeps one
  activation range per timestep; velodiff's activation scales are dynamic per token, which is one range per
  timestep by construction.
- Temporal information aware reconstruction (TIAR): the temporal layers are quantized in the order the embedding
  computes them, each on inputs recomputed through the already quantized layers before it, and where a method
  reconstructs (lowbit-fp's format search and learned rounding) its target is the full-precision output, so the
  errors of the embedding MLP are compensated downstream rather than compounded.
"""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn


def _embedders(model: nn.Module) -> List[Tuple[str, nn.Module, nn.Module]]:
    """(qualified name of the TimestepEmbedding, its Timesteps projection, the embedding) of every embedder that
    sees the timestep alone."""
    found = []
    if hasattr(model, "time_embedding") and hasattr(model, "time_proj"):
        found.append(("time_embedding", model.time_proj, model.time_embedding))
    for name, m in model.named_modules():
        if hasattr(m, "time_proj") and hasattr(m, "timestep_embedder"):
            found.append((f"{name}.timestep_embedder", m.time_proj, m.timestep_embedder))
    return found


def _unet_emb_is_temporal(model: nn.Module) -> bool:
    return (hasattr(model, "time_embedding") and getattr(model, "add_embedding", None) is None
            and getattr(model.time_embedding, "cond_proj", None) is None)


def temporal_layer_names(model: nn.Module) -> List[str]:
    """The temporal layers of ``model`` in the order they are computed (see the module docstring)."""
    names = []
    for prefix, _, _ in _embedders(model):
        names += [f"{prefix}.linear_1", f"{prefix}.linear_2"]
    if _unet_emb_is_temporal(model):
        names += [n for n, m in model.named_modules() if n.endswith(".time_emb_proj") and m is not None]
    return names


@torch.no_grad()
def temporal_inputs(model: nn.Module, timesteps: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Input rows [T, K] (float32) of every temporal layer at ``timesteps`` [T], computed through the model's
    current layers (quantized ones included)."""
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    out: Dict[str, torch.Tensor] = {}
    unet_emb = None
    for prefix, time_proj, embedding in _embedders(model):
        device = next(embedding.buffers(), next(embedding.parameters(), torch.empty(0))).device
        x = time_proj(timesteps.to(device)).to(dtype)
        out[f"{prefix}.linear_1"] = x.float()
        h = embedding.act(embedding.linear_1(x))
        out[f"{prefix}.linear_2"] = h.float()
        if prefix == "time_embedding":
            unet_emb = embedding.linear_2(h)
    if unet_emb is not None and _unet_emb_is_temporal(model):
        silu = F.silu(unet_emb).float()
        for n, m in model.named_modules():
            if n.endswith(".time_emb_proj") and m is not None:
                out[n] = silu
    return out
