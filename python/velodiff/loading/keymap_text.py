"""Text-encoder key maps: single-file CLIP-L and OpenCLIP (ViT-H, ViT-bigG) -> transformers CLIP names.

Learned from diffusers' ``convert_ldm_clip_checkpoint`` and ``convert_open_clip_checkpoint``
(loaders/single_file_utils.py). CLIP-L in SD1 / SDXL files is already in transformers' layout and only
loses its prefix. OpenCLIP stores attention as one fused ``in_proj`` (q, k, v stacked on dim 0) and the
projection as ``x @ text_projection``, i.e. transposed relative to a Linear weight.

The diffusers-side names produced here are transformers' classic ones (``text_model.*`` plus
``text_projection.weight``); :func:`fit_clip_keys` adapts them to a model whose state dict is flattened
(``CLIPTextModel`` in transformers >= 5.6).
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

import torch
from torch import nn

from velodiff.loading.errors import CheckpointError, list_keys
from velodiff.loading.keymap_unet import strip_prefix

#: where each family's text encoders sit in an original single file: (prefix, kind)
TEXT_ENCODER_PREFIXES = {
    "sd1": {"text_encoder": ("cond_stage_model.transformer.", "clip")},
    "sd2": {"text_encoder": ("cond_stage_model.model.", "open_clip")},
    "sdxl": {"text_encoder": ("conditioner.embedders.0.transformer.", "clip"),
             "text_encoder_2": ("conditioner.embedders.1.model.", "open_clip")},
    "sdxl_refiner": {"text_encoder_2": ("conditioner.embedders.0.model.", "open_clip")},
}

_OPEN_CLIP_TOP = {"token_embedding.weight": "text_model.embeddings.token_embedding.weight",
                  "positional_embedding": "text_model.embeddings.position_embedding.weight",
                  "ln_final.weight": "text_model.final_layer_norm.weight",
                  "ln_final.bias": "text_model.final_layer_norm.bias"}
_OPEN_CLIP_LAYER = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
                    "attn.out_proj": "self_attn.out_proj"}
_IGNORED = ("logit_scale", "attn_mask")
_BLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)$")


def _has_projection(config: Mapping) -> bool:
    return "CLIPTextModelWithProjection" in (config.get("architectures") or [])


def convert_text_encoder(sd: Mapping[str, torch.Tensor], config: Mapping, *, prefix: str, kind: str,
                         source: str = "<state dict>") -> Dict[str, torch.Tensor]:
    """One text encoder of a single file -> transformers CLIP names.

    ``prefix`` is where it sits (see :data:`TEXT_ENCODER_PREFIXES`), ``kind`` is ``"clip"`` (transformers
    layout: prefix strip only) or ``"open_clip"`` (fused qkv split, projection transposed). ``config`` is the
    transformers CLIPTextConfig as a dict: layers at or past ``num_hidden_layers`` are dropped (SD2 keeps 23
    of OpenCLIP-H's 24) and ``text_projection`` is kept only for ``CLIPTextModelWithProjection``.
    """
    part = strip_prefix(sd, prefix)
    if not part:
        raise CheckpointError(f"{source!r}: no text-encoder weights under {prefix!r}")
    layers = int(config["num_hidden_layers"])
    proj = _has_projection(config)
    out: Dict[str, torch.Tensor] = {}
    if kind == "clip":
        for k, v in part.items():
            if k.endswith("position_ids"):
                continue  # a non-persistent buffer in transformers
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.", k)
            if m and int(m.group(1)) >= layers:
                continue
            if k.startswith("text_projection") and not proj:
                continue
            out[k] = v
        return out
    if kind != "open_clip":
        raise ValueError(f"convert_text_encoder: kind must be 'clip' or 'open_clip', not {kind!r}")
    unmapped = []
    for k, v in part.items():
        if k in _IGNORED:
            continue
        if k in _OPEN_CLIP_TOP:
            out[_OPEN_CLIP_TOP[k]] = v
            continue
        if k == "text_projection":
            if proj:
                out["text_projection.weight"] = v.t().contiguous()
            continue
        m = _BLOCK.match(k)
        if not m:
            unmapped.append(prefix + k)
            continue
        idx, rest = int(m.group(1)), m.group(2)
        if idx >= layers:
            continue
        base = f"text_model.encoder.layers.{idx}."
        if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
            kind_ = "weight" if rest.endswith("weight") else "bias"
            q, kk, vv = v.chunk(3, dim=0)
            for name, t in (("q_proj", q), ("k_proj", kk), ("v_proj", vv)):
                out[f"{base}self_attn.{name}.{kind_}"] = t.contiguous()
            continue
        head, _, tail = rest.rpartition(".")
        if head not in _OPEN_CLIP_LAYER:
            unmapped.append(prefix + k)
            continue
        out[f"{base}{_OPEN_CLIP_LAYER[head]}.{tail}"] = v
    if unmapped:
        raise CheckpointError(f"{source!r}: OpenCLIP text encoder: no mapping for {len(unmapped)} key(s): "
                              f"{list_keys(unmapped)}")
    return out


def text_encoder_to_original(sd: Mapping[str, torch.Tensor], *, prefix: str, kind: str,
                             source: str = "<state dict>") -> Dict[str, torch.Tensor]:
    """transformers CLIP weights (classic or flattened names) -> the single-file layout under ``prefix``."""
    sd = {("text_model." + k if not k.startswith(("text_model.", "text_projection")) else k): v
          for k, v in sd.items() if not k.endswith("position_ids")}
    if kind == "clip":
        return {prefix + k: v for k, v in sd.items()}
    if kind != "open_clip":
        raise ValueError(f"text_encoder_to_original: kind must be 'clip' or 'open_clip', not {kind!r}")
    top = {v: k for k, v in _OPEN_CLIP_TOP.items()}
    layer = {v: k for k, v in _OPEN_CLIP_LAYER.items()}
    out: Dict[str, torch.Tensor] = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    unmapped = []
    for k, v in sd.items():
        if k in top:
            out[prefix + top[k]] = v
        elif k == "text_projection.weight":
            out[prefix + "text_projection"] = v.t().contiguous()
        else:
            m = re.match(r"text_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$", k)
            if not m:
                unmapped.append(k)
                continue
            idx, head, tail = m.groups()
            base = f"{prefix}transformer.resblocks.{idx}."
            if head in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                qkv.setdefault(f"{base}attn.in_proj_{tail}", {})[head[-6]] = v
            elif head in layer:
                out[f"{base}{layer[head]}.{tail}"] = v
            else:
                unmapped.append(k)
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"{source!r}: {key!r} needs q, k and v projections; found {sorted(parts)}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    if unmapped:
        raise CheckpointError(f"{source!r}: CLIP -> OpenCLIP: no mapping for {len(unmapped)} key(s): "
                              f"{list_keys(unmapped)}")
    return out


def fit_clip_keys(sd: Mapping[str, torch.Tensor], module: nn.Module) -> Dict[str, torch.Tensor]:
    """Add or drop the ``text_model.`` prefix so ``sd`` matches ``module``'s state-dict names."""
    target = module.state_dict().keys()
    wrapped = any(k.startswith("text_model.") for k in target)
    out = {}
    for k, v in sd.items():
        if k.startswith("text_model.") and not wrapped:
            k = k[len("text_model."):]
        elif wrapped and not k.startswith(("text_model.", "text_projection")):
            k = "text_model." + k
        out[k] = v
    return out
