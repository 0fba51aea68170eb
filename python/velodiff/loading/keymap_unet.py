"""UNet key map between original CompVis LDM / Stability SGM names and diffusers names.

Learned from diffusers' ``convert_ldm_unet_checkpoint`` (loaders/single_file_utils.py) and the
``convert_diffusers_to_original_{stable_diffusion,sdxl}.py`` scripts; written here as one prefix table
built from the diffusers UNet config, used in both directions. The LDM layout numbers blocks flatly:
``input_blocks.K`` holds, per level, ``layers_per_block`` (resnet, attention) pairs and then a downsampler;
``output_blocks.K`` holds ``layers_per_block + 1`` (resnet, attention) pairs per level, the last one also
the upsampler (slot 1 without attention, slot 2 with it). Attention blocks keep their inner names; resnets
rename their layers (``in_layers.0`` -> ``norm1`` ...).
"""
from __future__ import annotations

from typing import Dict, List, Mapping, Tuple

import torch

from velodiff.loading.errors import CheckpointError, list_keys

UNET_PREFIX = "model.diffusion_model."

#: LDM ResBlock layer names -> diffusers ResnetBlock2D names
RESNET_RENAMES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                  "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}

Pair = Tuple[str, str, Dict[str, str]]  # (original prefix, diffusers prefix, inner renames)


def _layers_per_block(config: Mapping) -> int:
    n = config.get("layers_per_block", 2)
    if isinstance(n, (list, tuple)):
        if len(set(n)) != 1:
            raise CheckpointError(f"UNet config: per-level layers_per_block {n} has no LDM layout")
        n = n[0]
    return int(n)


def unet_prefix_pairs(config: Mapping) -> List[Pair]:
    """The (original prefix, diffusers prefix, inner renames) table for a diffusers UNet config."""
    n = _layers_per_block(config)
    down = list(config["down_block_types"])
    up = list(config["up_block_types"])
    levels = len(down)
    pairs: List[Pair] = [("time_embed.0", "time_embedding.linear_1", {}),
                         ("time_embed.2", "time_embedding.linear_2", {}),
                         ("input_blocks.0.0", "conv_in", {}),
                         ("out.0", "conv_norm_out", {}),
                         ("out.2", "conv_out", {})]
    if config.get("addition_embed_type") == "text_time":
        pairs += [("label_emb.0.0", "add_embedding.linear_1", {}), ("label_emb.0.2", "add_embedding.linear_2", {})]
    elif config.get("class_embed_type") in ("timestep", "projection"):
        pairs += [("label_emb.0.0", "class_embedding.linear_1", {}),
                  ("label_emb.0.2", "class_embedding.linear_2", {})]
    elif config.get("num_class_embeds") is not None:
        pairs.append(("label_emb", "class_embedding", {}))
    k = 1
    for i in range(levels):
        attn = down[i].startswith("CrossAttn")
        for j in range(n):
            pairs.append((f"input_blocks.{k}.0", f"down_blocks.{i}.resnets.{j}", RESNET_RENAMES))
            if attn:
                pairs.append((f"input_blocks.{k}.1", f"down_blocks.{i}.attentions.{j}", {}))
            k += 1
        if i < levels - 1:
            pairs.append((f"input_blocks.{k}.0.op", f"down_blocks.{i}.downsamplers.0.conv", {}))
            k += 1
    pairs += [("middle_block.0", "mid_block.resnets.0", RESNET_RENAMES),
              ("middle_block.1", "mid_block.attentions.0", {}),
              ("middle_block.2", "mid_block.resnets.1", RESNET_RENAMES)]
    k = 0
    for i in range(levels):
        attn = up[i].startswith("CrossAttn")
        for j in range(n + 1):
            pairs.append((f"output_blocks.{k}.0", f"up_blocks.{i}.resnets.{j}", RESNET_RENAMES))
            if attn:
                pairs.append((f"output_blocks.{k}.1", f"up_blocks.{i}.attentions.{j}", {}))
            if j == n and i < levels - 1:
                pairs.append((f"output_blocks.{k}.{2 if attn else 1}.conv", f"up_blocks.{i}.upsamplers.0.conv", {}))
            k += 1
    return pairs


def _rename(key: str, table: Dict[str, Tuple[str, Dict[str, str]]], what: str) -> str:
    """Map ``key`` through the longest matching prefix of ``table``; None if no prefix matches."""
    parts = key.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        head = ".".join(parts[:cut])
        hit = table.get(head)
        if hit is not None:
            new_head, inner = hit
            rest = ".".join(parts[cut:])
            for old, new in inner.items():
                if rest == old or rest.startswith(old + "."):
                    rest = new + rest[len(old):]
                    break
            return f"{new_head}.{rest}"
    return None


def _apply(sd: Mapping[str, torch.Tensor], table, source: str, what: str) -> Dict[str, torch.Tensor]:
    out, unmapped = {}, []
    for key, value in sd.items():
        new = _rename(key, table, what)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise CheckpointError(f"{source!r}: {what}: no mapping for {len(unmapped)} key(s): {list_keys(unmapped)} "
                              "(does the UNet config match the checkpoint?)")
    return out


def strip_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries of ``sd`` under ``prefix``, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}


def ema_unet_weights(sd: Mapping[str, torch.Tensor], *, source: str = "<checkpoint>") -> Dict[str, torch.Tensor]:
    """The UNet of an LDM training checkpoint with its EMA weights in place of the raw ones.

    LDM files such as ``v1-5-pruned.ckpt`` keep EMA copies under ``model_ema.`` with the dots of the UNet
    key removed (``model.diffusion_model.input_blocks.0.0.weight`` ->
    ``model_ema.diffusion_modelinput_blocks00weight``). Returns the ``model.diffusion_model.*`` entries
    with EMA values; a missing EMA copy is an error naming the key.
    """
    out, missing = {}, []
    for key, value in sd.items():
        if not key.startswith(UNET_PREFIX):
            continue
        ema = "model_ema." + "".join(key.split(".")[1:])
        if ema in sd:
            out[key] = sd[ema]
        else:
            missing.append(ema)
    if missing:
        raise CheckpointError(f"{source!r}: no EMA copy for {len(missing)} UNet key(s): {list_keys(missing)}")
    return out


def convert_unet(sd: Mapping[str, torch.Tensor], config: Mapping, *,
                 source: str = "<state dict>") -> Dict[str, torch.Tensor]:
    """Original (LDM/SGM) UNet weights -> diffusers ``UNet2DConditionModel`` names.

    ``sd`` may be a whole single-file checkpoint (only keys under ``model.diffusion_model.`` are taken)
    or the UNet's own keys. ``config`` is the diffusers UNet config dict. Tensors are not copied.
    """
    if any(k.startswith(UNET_PREFIX) for k in sd):
        sd = strip_prefix(sd, UNET_PREFIX)
    if "input_blocks.0.0.weight" not in sd:
        raise CheckpointError(f"{source!r}: no UNet weights (no {UNET_PREFIX + 'input_blocks.0.0.weight'!r}, "
                              "nor a bare 'input_blocks.0.0.weight')")
    table = {o: (d, inner) for o, d, inner in unet_prefix_pairs(config)}
    return _apply(sd, table, source, "UNet original -> diffusers")


def unet_to_original(sd: Mapping[str, torch.Tensor], config: Mapping, *, prefix: str = UNET_PREFIX,
                     source: str = "<state dict>") -> Dict[str, torch.Tensor]:
    """diffusers UNet weights -> original LDM/SGM names (with ``prefix``, by default ``model.diffusion_model.``)."""
    table = {d: (o, {v: k for k, v in inner.items()}) for o, d, inner in unet_prefix_pairs(config)}
    out = _apply(sd, table, source, "UNet diffusers -> original")
    return {prefix + k: v for k, v in out.items()}
