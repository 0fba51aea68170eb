"""VAE (AutoencoderKL) key map between original LDM ``first_stage_model.*`` names and diffusers names.

Learned from diffusers' ``convert_ldm_vae_checkpoint`` (loaders/single_file_utils.py). The decoder's
``up.K`` levels run in the opposite order of diffusers' ``up_blocks``; the mid-block attention's 1x1 convs
(``q``, ``k``, ``v``, ``proj_out``) become Linear layers, so their weights lose the trailing 1x1 dims.
"""
from __future__ import annotations

from typing import Dict, Mapping

import torch

from velodiff.loading.errors import CheckpointError
from velodiff.loading.keymap_unet import _apply, strip_prefix

VAE_PREFIXES = ("first_stage_model.", "vae.")
RESNET_RENAMES = {"nin_shortcut": "conv_shortcut"}
ATTN_RENAMES = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_LINEAR_ATTN = ("to_q.weight", "to_k.weight", "to_v.weight", "to_out.0.weight")


def vae_prefix_pairs(config: Mapping):
    """(original prefix, diffusers prefix, inner renames) for a diffusers AutoencoderKL config."""
    levels = len(config["down_block_types"])
    n = int(config.get("layers_per_block", 2))
    pairs = [("quant_conv", "quant_conv", {}), ("post_quant_conv", "post_quant_conv", {})]
    for side in ("encoder", "decoder"):
        pairs += [(f"{side}.conv_in", f"{side}.conv_in", {}), (f"{side}.conv_out", f"{side}.conv_out", {}),
                  (f"{side}.norm_out", f"{side}.conv_norm_out", {}),
                  (f"{side}.mid.block_1", f"{side}.mid_block.resnets.0", RESNET_RENAMES),
                  (f"{side}.mid.block_2", f"{side}.mid_block.resnets.1", RESNET_RENAMES),
                  (f"{side}.mid.attn_1", f"{side}.mid_block.attentions.0", ATTN_RENAMES)]
    for i in range(levels):
        for j in range(n):
            pairs.append((f"encoder.down.{i}.block.{j}", f"encoder.down_blocks.{i}.resnets.{j}", RESNET_RENAMES))
        if i < levels - 1:
            pairs.append((f"encoder.down.{i}.downsample.conv", f"encoder.down_blocks.{i}.downsamplers.0.conv", {}))
        o = levels - 1 - i
        for j in range(n + 1):
            pairs.append((f"decoder.up.{o}.block.{j}", f"decoder.up_blocks.{i}.resnets.{j}", RESNET_RENAMES))
        if i < levels - 1:
            pairs.append((f"decoder.up.{o}.upsample.conv", f"decoder.up_blocks.{i}.upsamplers.0.conv", {}))
    return pairs


def find_vae_prefix(sd: Mapping[str, torch.Tensor]) -> str:
    """The prefix under which a single-file checkpoint keeps its VAE ('' if it is a bare VAE file)."""
    for p in VAE_PREFIXES:
        if any(k.startswith(p) for k in sd):
            return p
    return ""


def convert_vae(sd: Mapping[str, torch.Tensor], config: Mapping, *,
                source: str = "<state dict>") -> Dict[str, torch.Tensor]:
    """Original LDM VAE weights -> diffusers ``AutoencoderKL`` names.

    ``sd`` may be a whole single-file checkpoint (keys under ``first_stage_model.`` or ``vae.`` are taken)
    or a bare VAE file. ``config`` is the diffusers VAE config dict.
    """
    prefix = find_vae_prefix(sd)
    if prefix:
        sd = strip_prefix(sd, prefix)
    if not any(k.startswith("decoder.") for k in sd):
        raise CheckpointError(f"{source!r}: no VAE weights (no key under {' or '.join(map(repr, VAE_PREFIXES))})")
    table = {o: (d, inner) for o, d, inner in vae_prefix_pairs(config)}
    out = _apply(sd, table, source, "VAE original -> diffusers")
    for k, v in out.items():
        if "mid_block.attentions.0." in k and k.endswith(_LINEAR_ATTN) and v.dim() > 2:
            out[k] = v.reshape(v.shape[0], v.shape[1])
    return out


def vae_to_original(sd: Mapping[str, torch.Tensor], config: Mapping, *, prefix: str = "first_stage_model.",
                    source: str = "<state dict>") -> Dict[str, torch.Tensor]:
    """diffusers VAE weights -> original LDM names (1x1 conv attention weights), with ``prefix``."""
    table = {d: (o, {v: k for k, v in inner.items()}) for o, d, inner in vae_prefix_pairs(config)}
    out = _apply(sd, table, source, "VAE diffusers -> original")
    for k, v in out.items():
        if ".mid.attn_1." in k and k.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) \
                and v.dim() == 2:
            out[k] = v.reshape(*v.shape, 1, 1)
    return {prefix + k: v for k, v in out.items()}
