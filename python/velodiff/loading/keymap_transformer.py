"""DiT and PixArt single-file key maps: original (facebookresearch/DiT, PixArt-alpha) <-> diffusers.

Learned from diffusers' ``scripts/convert_dit_to_diffusers.py`` and ``convert_pixart_alpha_to_diffusers.py``
and the research notes (shared/reference/ecosystem-graphs-style.md sections 1.5 and 1.6). Both originals
fuse self-attention q/k/v into ``attn.qkv`` (q, k, v stacked on dim 0); PixArt fuses cross-attention k/v
into ``cross_attn.kv_linear``. diffusers' DiT copies the timestep and class embedders into every block; the
reverse map checks the copies agree and writes one. The fixed sin-cos ``pos_embed`` of the originals is
recomputed by diffusers, so it is dropped on the way in and not written on the way out; PixArt's learned
null caption ``y_embedder.y_embedding`` is unused by diffusers and dropped too.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Mapping

import torch

from velodiff.loading.errors import CheckpointError, list_keys

DIT_CONFIG = {"_class_name": "DiTTransformer2DModel", "num_attention_heads": 16, "attention_head_dim": 72,
              "in_channels": 4, "out_channels": 8, "num_layers": 28, "patch_size": 2, "sample_size": 32,
              "num_embeds_ada_norm": 1000, "attention_bias": True, "activation_fn": "gelu-approximate",
              "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5}
"""DiT-XL/2 at 256 px (facebookresearch/DiT ``DiT_models['DiT-XL/2']``; diffusers ``facebook/DiT-XL-2-256``)."""

PIXART_CONFIG = {"_class_name": "PixArtTransformer2DModel", "num_attention_heads": 16, "attention_head_dim": 72,
                 "in_channels": 4, "out_channels": 8, "num_layers": 28, "patch_size": 2, "sample_size": 128,
                 "cross_attention_dim": 1152, "caption_channels": 4096, "num_embeds_ada_norm": 1000,
                 "attention_bias": True, "activation_fn": "gelu-approximate", "norm_type": "ada_norm_single",
                 "norm_elementwise_affine": False, "norm_eps": 1e-6, "interpolation_scale": 2,
                 "use_additional_conditions": True}
"""PixArt-XL-2-1024-MS (PixArt-alpha ``PixArtMS_XL_2``; diffusers ``PixArt-alpha/PixArt-XL-2-1024-MS``)."""

#: PixArt's positional-embedding interpolation scale by latent size (PixArt-alpha scripts/inference.py)
PIXART_INTERPOLATION = {32: 0.5, 64: 1, 128: 2, 256: 4}

_DIT_SHARED = {"t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
               "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
               "y_embedder.embedding_table": "norm1.emb.class_embedder.embedding_table"}
_DIT_BLOCK = {"adaLN_modulation.1": "norm1.linear", "attn.proj": "attn1.to_out.0", "mlp.fc1": "ff.net.0.proj",
              "mlp.fc2": "ff.net.2"}
_DIT_TOP = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
            "final_layer.linear": "proj_out_2"}

_PIXART_TOP = {"x_embedder.proj": "pos_embed.proj", "y_embedder.y_proj.fc1": "caption_projection.linear_1",
               "y_embedder.y_proj.fc2": "caption_projection.linear_2",
               "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
               "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
               "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
               "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
               "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
               "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
               "t_block.1": "adaln_single.linear", "final_layer.linear": "proj_out",
               "final_layer.scale_shift_table": "scale_shift_table"}
_PIXART_BLOCK = {"attn.proj": "attn1.to_out.0", "cross_attn.q_linear": "attn2.to_q",
                 "cross_attn.proj": "attn2.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2",
                 "scale_shift_table": "scale_shift_table"}
_DROPPED = ("pos_embed", "y_embedder.y_embedding")
_BLOCK = re.compile(r"blocks\.(\d+)\.(.+)$")


def _split_name(key: str):
    head, _, tail = key.rpartition(".")
    if tail in ("weight", "bias"):
        return head, "." + tail
    return key, ""


def _convert(sd: Mapping[str, torch.Tensor], top: Dict[str, str], block: Dict[str, str], family: str,
             source: str) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    unmapped = []
    shared = {}
    for key, value in sd.items():
        if key in _DROPPED:
            continue
        name, tail = _split_name(key)
        if family == "dit" and name in _DIT_SHARED:
            shared[_DIT_SHARED[name] + tail] = value
            continue
        if name in top:
            out[top[name] + tail] = value
            continue
        m = _BLOCK.match(name)
        if m:
            n, inner = m.groups()
            base = f"transformer_blocks.{n}."
            if inner == "attn.qkv":
                for sub, part in zip(("to_q", "to_k", "to_v"), value.chunk(3, dim=0)):
                    out[f"{base}attn1.{sub}{tail}"] = part.contiguous()
                continue
            if family == "pixart" and inner == "cross_attn.kv_linear":
                for sub, part in zip(("to_k", "to_v"), value.chunk(2, dim=0)):
                    out[f"{base}attn2.{sub}{tail}"] = part.contiguous()
                continue
            if inner in block:
                out[f"{base}{block[inner]}{tail}"] = value
                continue
        unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"{source!r}: {family} original -> diffusers: no mapping for {len(unmapped)} key(s): "
                              f"{list_keys(unmapped)}")
    if family == "dit":
        blocks = sorted({int(k.split(".")[1]) for k in out if k.startswith("transformer_blocks.")})
        for n in blocks:
            for k, v in shared.items():
                out[f"transformer_blocks.{n}.{k}"] = v
    return out


def convert_dit(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>") -> Dict[str, torch.Tensor]:
    """Original DiT weights -> diffusers ``DiTTransformer2DModel`` names (embedders copied into each block)."""
    return _convert(sd, _DIT_TOP, _DIT_BLOCK, "dit", source)


def convert_pixart(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>") -> Dict[str, torch.Tensor]:
    """Original PixArt-alpha / -Sigma weights -> diffusers ``PixArtTransformer2DModel`` names."""
    return _convert(sd, _PIXART_TOP, _PIXART_BLOCK, "pixart", source)


def _to_original(sd: Mapping[str, torch.Tensor], top: Dict[str, str], block: Dict[str, str], family: str,
                 source: str) -> Dict[str, torch.Tensor]:
    rtop = {v: k for k, v in top.items()}
    rblock = {v: k for k, v in block.items()}
    rshared = {v: k for k, v in _DIT_SHARED.items()}
    out: Dict[str, torch.Tensor] = {}
    fused: Dict[str, Dict[str, torch.Tensor]] = {}
    unmapped = []
    for key, value in sd.items():
        name, tail = _split_name(key)
        if name in rtop:
            out[rtop[name] + tail] = value
            continue
        m = re.match(r"transformer_blocks\.(\d+)\.(.+)$", name)
        if m:
            n, inner = m.groups()
            if family == "dit" and inner in rshared:
                orig = rshared[inner] + tail
                if orig in out and value.device.type != "meta" and not torch.equal(out[orig], value):
                    raise CheckpointError(f"{source!r}, key {key!r}: differs from block 0's copy; the original "
                                          "DiT layout has one shared embedder")
                out[orig] = value
                continue
            sub = inner.rsplit(".", 1)[-1]
            if inner in ("attn1.to_q", "attn1.to_k", "attn1.to_v"):
                fused.setdefault(f"blocks.{n}.attn.qkv{tail}", {})[sub] = value
                continue
            if family == "pixart" and inner in ("attn2.to_k", "attn2.to_v"):
                fused.setdefault(f"blocks.{n}.cross_attn.kv_linear{tail}", {})[sub] = value
                continue
            if inner in rblock:
                out[f"blocks.{n}.{rblock[inner]}{tail}"] = value
                continue
        unmapped.append(key)
    if unmapped:
        raise CheckpointError(f"{source!r}: {family} diffusers -> original: no mapping for {len(unmapped)} "
                              f"key(s): {list_keys(unmapped)}")
    for key, parts in fused.items():
        order = ("to_q", "to_k", "to_v") if ".attn.qkv" in key else ("to_k", "to_v")
        if set(parts) != set(order):
            raise CheckpointError(f"{source!r}: {key!r} needs {order}; found {sorted(parts)}")
        out[key] = torch.cat([parts[p] for p in order], dim=0)
    return out


def dit_to_original(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>") -> Dict[str, torch.Tensor]:
    """diffusers DiT weights -> original DiT names (without the recomputable ``pos_embed``)."""
    return _to_original(sd, _DIT_TOP, _DIT_BLOCK, "dit", source)


def pixart_to_original(sd: Mapping[str, torch.Tensor], *, source: str = "<state dict>") -> Dict[str, torch.Tensor]:
    """diffusers PixArt weights -> original PixArt names (without ``pos_embed`` and ``y_embedding``)."""
    return _to_original(sd, _PIXART_TOP, _PIXART_BLOCK, "pixart", source)


def infer_transformer_config(sd: Mapping[str, torch.Tensor], family: str, overrides=None, *,
                             source: str = "<checkpoint>") -> dict:
    """The diffusers config of an original DiT / PixArt file from its shapes (head width 72 assumed, as in
    every released DiT/PixArt model; pass ``overrides`` otherwise)."""
    cfg = dict(DIT_CONFIG if family == "dit" else PIXART_CONFIG)
    try:
        proj = sd["x_embedder.proj.weight"]
        hidden, in_ch, patch = int(proj.shape[0]), int(proj.shape[1]), int(proj.shape[-1])
        final = sd["final_layer.linear.weight"]
        layers = len({int(m.group(1)) for k in sd for m in [_BLOCK.match(k)] if m})
    except KeyError as e:
        raise CheckpointError(f"{source!r}: cannot infer the {family} structure (missing key {e})") from e
    cfg.update(in_channels=in_ch, patch_size=patch, num_layers=layers, out_channels=int(final.shape[0]) // patch ** 2,
               num_attention_heads=max(1, hidden // cfg["attention_head_dim"]))
    if hidden % cfg["attention_head_dim"]:
        cfg.update(num_attention_heads=1, attention_head_dim=hidden)
    if "pos_embed" in sd:
        side = math.isqrt(int(sd["pos_embed"].shape[-2]))
        cfg["sample_size"] = side * patch
    if family == "dit":
        cfg["num_embeds_ada_norm"] = int(sd["y_embedder.embedding_table.weight"].shape[0]) - 1
    else:
        cfg["cross_attention_dim"] = hidden
        cfg["caption_channels"] = int(sd["y_embedder.y_proj.fc1.weight"].shape[1])
        cfg["use_additional_conditions"] = "csize_embedder.mlp.0.weight" in sd
        cfg["interpolation_scale"] = PIXART_INTERPOLATION.get(cfg["sample_size"], max(cfg["sample_size"] // 64, 1))
    if overrides:
        cfg.update(overrides)
    return cfg
