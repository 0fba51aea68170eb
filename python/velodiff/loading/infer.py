"""Configs inferred from a single file's weights, on top of the family defaults.

Shapes and key counts give the structure (levels, channels, layers, transformer depth, projection kind,
context width, in/out channels, vocabulary, ...). What weights cannot tell (attention head counts, group
norm groups, the SDXL time-embedding width) comes from the family default; pass ``overrides`` for a
checkpoint that differs there.
"""
from __future__ import annotations

import re
from typing import Mapping, Optional

import torch

from velodiff.loading import configs as _defaults
from velodiff.loading.errors import CheckpointError
from velodiff.loading.keymap_unet import UNET_PREFIX, strip_prefix
from velodiff.loading.keymap_vae import find_vae_prefix


def _indices(keys, pattern: str):
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys for m in [rx.match(k)] if m})


def infer_unet_config(sd: Mapping[str, torch.Tensor], family: str, overrides: Optional[Mapping] = None,
                      *, source: str = "<checkpoint>") -> dict:
    """The diffusers UNet config of an original UNet (keys with or without ``model.diffusion_model.``)."""
    cfg = _defaults.default_unet_config(family)
    u = strip_prefix(sd, UNET_PREFIX) if any(k.startswith(UNET_PREFIX) for k in sd) else dict(sd)
    try:
        conv_in = u["input_blocks.0.0.weight"]
        inputs = _indices(u, r"input_blocks\.(\d+)\.")
        downs = [i for i in inputs if f"input_blocks.{i}.0.op.weight" in u]
        levels = len(downs) + 1
        per = (len(inputs) - 1 - len(downs)) // levels
        blocks, down_types, up_types, depth = [], [], [], []
        k = 1
        for lvl in range(levels):
            blocks.append(int(u[f"input_blocks.{k}.0.out_layers.3.weight"].shape[0]))
            attn = f"input_blocks.{k}.1.proj_in.weight" in u
            down_types.append("CrossAttnDownBlock2D" if attn else "DownBlock2D")
            depth.append(len(_indices(u, rf"input_blocks\.{k}\.1\.transformer_blocks\.(\d+)\.")) if attn else 1)
            k += per + 1
        k = 0
        for lvl in range(levels):
            up_types.append("CrossAttnUpBlock2D" if f"output_blocks.{k}.1.proj_in.weight" in u else "UpBlock2D")
            k += per + 1
        to_k = next(v for kk, v in u.items() if kk.endswith("attn2.to_k.weight"))
        proj_in = next(v for kk, v in u.items() if kk.endswith(".proj_in.weight"))
    except (KeyError, StopIteration) as e:
        raise CheckpointError(f"{source!r}: cannot infer the UNet structure (missing {e})") from e
    same_shape = blocks == cfg["block_out_channels"]
    cfg.update(in_channels=int(conv_in.shape[1]), out_channels=int(u["out.2.weight"].shape[0]),
               block_out_channels=blocks, layers_per_block=per, down_block_types=down_types,
               up_block_types=up_types, cross_attention_dim=int(to_k.shape[-1]),
               use_linear_projection=proj_in.dim() == 2)
    mid = len(_indices(u, r"middle_block\.1\.transformer_blocks\.(\d+)\.")) or 1
    depth = [d if t.startswith("CrossAttn") else 1 for d, t in zip(depth, down_types)]
    depth[-1] = mid if not down_types[-1].startswith("CrossAttn") else depth[-1]
    if depth[-1] != mid:
        raise CheckpointError(f"{source!r}: mid-block transformer depth {mid} differs from the last level's "
                              f"{depth[-1]}; diffusers' UNet config cannot express that")
    attn_depths = {d for d, t in zip(depth, down_types) if t.startswith("CrossAttn")} | {mid}
    cfg["transformer_layers_per_block"] = mid if len(attn_depths) == 1 else depth
    if "label_emb.0.0.weight" in u:
        cfg["addition_embed_type"] = "text_time"
        cfg["projection_class_embeddings_input_dim"] = int(u["label_emb.0.0.weight"].shape[1])
    if not same_shape:  # head counts are not in the weights: SD1 uses 8 heads, SD2/SDXL 64-wide heads
        cfg["attention_head_dim"] = 8 if family == "sd1" else [max(1, c // 64) for c in blocks]
    if overrides:
        cfg.update(overrides)
    return cfg


def infer_vae_config(sd: Mapping[str, torch.Tensor], family: str, overrides: Optional[Mapping] = None,
                     *, source: str = "<checkpoint>") -> dict:
    """The diffusers AutoencoderKL config of an original VAE (whole single file or bare VAE file)."""
    cfg = _defaults.default_vae_config(family)
    prefix = find_vae_prefix(sd)
    v = strip_prefix(sd, prefix) if prefix else dict(sd)
    try:
        levels = len(_indices(v, r"encoder\.down\.(\d+)\."))
        per = len(_indices(v, r"encoder\.down\.0\.block\.(\d+)\."))
        blocks = [int(v[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in range(levels)]
        cfg.update(in_channels=int(v["encoder.conv_in.weight"].shape[1]),
                   out_channels=int(v["decoder.conv_out.weight"].shape[0]),
                   latent_channels=int(v["decoder.conv_in.weight"].shape[1]), block_out_channels=blocks,
                   layers_per_block=per, down_block_types=["DownEncoderBlock2D"] * levels,
                   up_block_types=["UpDecoderBlock2D"] * levels)
    except KeyError as e:
        raise CheckpointError(f"{source!r}: cannot infer the VAE structure (missing key {e})") from e
    if overrides:
        cfg.update(overrides)
    return cfg


def infer_text_encoder_config(sd: Mapping[str, torch.Tensor], family: str, name: str, prefix: str, kind: str,
                              overrides: Optional[Mapping] = None, *, source: str = "<checkpoint>") -> dict:
    """The transformers CLIPTextConfig dict of one text encoder of a single file."""
    cfg = _defaults.default_text_encoder_configs(family)[name]
    t = strip_prefix(sd, prefix)
    try:
        if kind == "clip":
            tok = t["text_model.embeddings.token_embedding.weight"]
            pos = t["text_model.embeddings.position_embedding.weight"]
            layers = len(_indices(t, r"text_model\.encoder\.layers\.(\d+)\."))
            inter = t["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0]
            proj = t.get("text_projection.weight")
            proj_dim = None if proj is None else proj.shape[0]
        else:
            tok, pos = t["token_embedding.weight"], t["positional_embedding"]
            layers = len(_indices(t, r"transformer\.resblocks\.(\d+)\."))
            inter = t["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
            proj = t.get("text_projection")
            proj_dim = None if proj is None else proj.shape[1]
    except KeyError as e:
        raise CheckpointError(f"{source!r}: cannot infer the text encoder under {prefix!r} (missing {e})") from e
    hidden = int(tok.shape[1])
    if family == "sd2" and kind == "open_clip" and hidden == cfg["hidden_size"] and layers == 24:
        layers = 23  # SD2 conditions on the penultimate layer; diffusers keeps 23 of OpenCLIP-H's 24
    if hidden != cfg["hidden_size"]:
        cfg["num_attention_heads"] = max(1, hidden // 64)
    cfg.update(hidden_size=hidden, vocab_size=int(tok.shape[0]), max_position_embeddings=int(pos.shape[0]),
               num_hidden_layers=layers, intermediate_size=int(inter))
    if proj_dim is not None and "CLIPTextModelWithProjection" in cfg.get("architectures", []):
        cfg["projection_dim"] = int(proj_dim)
    if overrides:
        cfg.update(overrides)
    return cfg
