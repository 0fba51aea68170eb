"""Single-file original checkpoints (CompVis LDM SD1/SD2, Stability SGM SDXL) <-> diffusers components.

:func:`split_single_file` turns one original state dict into diffusers-named state dicts and configs per
component; :func:`convert_single_file_to_diffusers` writes them as a diffusers pipeline folder and
:func:`convert_diffusers_to_single_file` goes back.
"""
from __future__ import annotations

import json
import os
from typing import Dict, Mapping, NamedTuple, Optional

import torch

from velodiff.loading import configs as _defaults
from velodiff.loading.detect import CONTEXT_DIMS, detect_family
from velodiff.loading.errors import CheckpointError
from velodiff.loading.folders import pipeline_components, read_component, read_config, read_model_index
from velodiff.loading.infer import infer_text_encoder_config, infer_unet_config, infer_vae_config
from velodiff.loading.keymap_transformer import convert_dit, convert_pixart, infer_transformer_config
from velodiff.loading.keymap_text import TEXT_ENCODER_PREFIXES, convert_text_encoder, text_encoder_to_original
from velodiff.loading.keymap_unet import UNET_PREFIX, convert_unet, ema_unet_weights, unet_to_original
from velodiff.loading.keymap_vae import convert_vae, find_vae_prefix, vae_to_original
from velodiff.loading.pickle_guard import read_checkpoint
from velodiff.loading.safetensors_io import write_safetensors
from velodiff.loading.tokenizers import load_tokenizer, tokenizer_name, tokenizer_sources

SD_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
TRANSFORMER_FAMILIES = ("dit", "pixart")
_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
            "transformer": ("diffusers", None)}


class Component(NamedTuple):
    """One converted component: its diffusers/transformers config dict and diffusers-named weights."""

    config: dict
    state_dict: Dict[str, torch.Tensor]


def split_single_file(sd: Mapping[str, torch.Tensor], *, family: Optional[str] = None,
                      configs: Optional[Mapping[str, Mapping]] = None, use_ema: bool = False,
                      source: str = "<checkpoint>") -> Dict[str, Component]:
    """An original SD1/SD2/SDXL/DiT/PixArt state dict -> ``{component name: Component}`` in diffusers names.

    ``family`` is detected from the keys when not given. ``configs`` overrides fields of the inferred
    config per component (``{"unet": {"attention_head_dim": 8}, "text_encoder": {...}}``). ``use_ema``
    takes the UNet's ``model_ema.*`` copies of an LDM training checkpoint instead of the raw weights. Components
    absent from the file (a UNet-only file has no VAE) are left out. DiT and PixArt files hold only the
    transformer (``{"transformer": ...}``).
    """
    family = family or detect_family(sd, source=source)
    configs = dict(configs or {})
    if family in TRANSFORMER_FAMILIES:
        cfg = infer_transformer_config(sd, family, configs.get("transformer"), source=source)
        convert = convert_dit if family == "dit" else convert_pixart
        return {"transformer": Component(cfg, convert(sd, source=source))}
    if family not in SD_FAMILIES:
        raise CheckpointError(f"{source!r}: single-file conversion supports {SD_FAMILIES + TRANSFORMER_FAMILIES}; "
                              f"this file is {family!r}")
    out: Dict[str, Component] = {}
    if any(k.startswith(UNET_PREFIX) for k in sd):
        unet_sd = ema_unet_weights(sd, source=source) if use_ema else strip_unet(sd)
        cfg = infer_unet_config(unet_sd, family, configs.get("unet"), source=source)
        out["unet"] = Component(cfg, convert_unet(unet_sd, cfg, source=source))
    if find_vae_prefix(sd):
        cfg = infer_vae_config(sd, family, configs.get("vae"), source=source)
        out["vae"] = Component(cfg, convert_vae(sd, cfg, source=source))
    for name, (prefix, kind) in TEXT_ENCODER_PREFIXES[family].items():
        if any(k.startswith(prefix) for k in sd):
            cfg = infer_text_encoder_config(sd, family, name, prefix, kind, configs.get(name), source=source)
            out[name] = Component(cfg, convert_text_encoder(sd, cfg, prefix=prefix, kind=kind, source=source))
    if not out:
        raise CheckpointError(f"{source!r}: no UNet, VAE or text encoder found for family {family!r}")
    return out


def strip_unet(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The ``model.diffusion_model.*`` entries of a single file (prefix kept)."""
    return {k: v for k, v in sd.items() if k.startswith(UNET_PREFIX)}


def _clean_config(cfg: Mapping) -> dict:
    return {k: v for k, v in cfg.items() if k != "_class_name"}


def convert_single_file_to_diffusers(path, out_folder, family: Optional[str] = None, *,
                                     configs: Optional[Mapping[str, Mapping]] = None,
                                     allow_pickle: bool = False, use_ema: bool = False,
                                     dtype: Optional[torch.dtype] = None, prediction_type: Optional[str] = None,
                                     tokenizer=None, tokenizer_2=None) -> Dict[str, object]:
    """Write an original single-file checkpoint as a diffusers pipeline folder; returns its model index.

    Each present component gets ``<name>/config.json`` and its weights
    (``diffusion_pytorch_model.safetensors`` for UNet/VAE, ``model.safetensors`` for text encoders), plus
    ``scheduler/scheduler_config.json`` (the family default, then ``configs["scheduler"]``, then
    ``prediction_type``: see :func:`velodiff.loading.configs.single_file_scheduler_config`) and
    ``model_index.json``. Single files hold no tokenizer: ``tokenizer`` / ``tokenizer_2`` (a tokenizer object,
    a tokenizer folder or a diffusers pipeline folder, as for ``Pipeline.from_pretrained``) are saved as
    ``tokenizer/`` / ``tokenizer_2/``; without them none is written (the index then lacks them). A DiT or PixArt
    file gives ``transformer/`` only (its VAE and text encoder live elsewhere) and no model index; the return
    value then lists just the transformer. ``dtype`` casts floating weights on the way; ``use_ema`` is as in
    :func:`split_single_file`.
    """
    path = os.fspath(path)
    if prediction_type is not None and prediction_type not in _defaults.PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_defaults.PREDICTION_TYPES}, got {prediction_type!r}")
    sd = read_checkpoint(path, dtype=dtype, allow_pickle=allow_pickle)
    family = family or detect_family(sd, source=path)
    parts = split_single_file(sd, family=family, configs=configs, use_ema=use_ema, source=path)
    del sd
    os.makedirs(out_folder, exist_ok=True)
    index: Dict[str, object] = {"_class_name": _defaults.PIPELINE_CLASSES.get(family, ""),
                                "_diffusers_version": "0.42.0"}
    for name, comp in parts.items():
        sub = os.path.join(out_folder, name)
        os.makedirs(sub, exist_ok=True)
        if name in _CLASSES:
            lib, cls = _CLASSES[name]
            cls = cls or comp.config["_class_name"]
            cfg = {"_class_name": cls, **_clean_config(comp.config)}
            weights = "diffusion_pytorch_model.safetensors"
        else:
            lib, cls = "transformers", comp.config["architectures"][0]
            cfg = dict(comp.config)
            weights = "model.safetensors"
        with open(os.path.join(sub, "config.json"), "w") as f:
            json.dump(cfg, f, indent=2)
        write_safetensors(comp.state_dict, os.path.join(sub, weights), metadata={"format": "pt"})
        index[name] = [lib, cls]
    if family in TRANSFORMER_FAMILIES:  # the file holds only the transformer: no pipeline to describe
        return {k: v for k, v in index.items() if not k.startswith("_")}
    encoders = [name for name in TEXT_ENCODER_PREFIXES[family] if name in parts]
    sources = tokenizer_sources([tokenizer_name(n) for n in encoders],
                                {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2})
    for name, value in sources.items():
        if value is not None:
            tok = load_tokenizer(value, name)
            tok.save_pretrained(os.path.join(out_folder, name))
            index[name] = ["transformers", type(tok).__name__]
    sched = _defaults.single_file_scheduler_config(family, (configs or {}).get("scheduler"), prediction_type)
    os.makedirs(os.path.join(out_folder, "scheduler"), exist_ok=True)
    with open(os.path.join(out_folder, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(sched, f, indent=2)
    index["scheduler"] = ["diffusers", sched["_class_name"]]
    if encoders and index["_class_name"] == "StableDiffusionPipeline":  # what diffusers writes without them
        index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
    with open(os.path.join(out_folder, "model_index.json"), "w") as f:
        json.dump(index, f, indent=2)
    return index


def family_of_diffusers_folder(folder) -> str:
    """sd1 / sd2 / sdxl / sdxl_refiner from a diffusers pipeline folder's model index and UNet config."""
    comps = pipeline_components(read_model_index(folder))
    unet = read_config(os.path.join(os.fspath(folder), "unet"))
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl" if "text_encoder" in comps else "sdxl_refiner"
    ctx = unet.get("cross_attention_dim")
    if isinstance(ctx, int) and CONTEXT_DIMS.get(ctx) in ("sd1", "sd2"):
        return CONTEXT_DIMS[ctx]
    return "sd2" if unet.get("use_linear_projection") else "sd1"


def diffusers_folder_to_state_dict(folder, family: Optional[str] = None, *, dtype: Optional[torch.dtype] = None,
                                   variant: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A diffusers SD1/SD2/SDXL pipeline folder -> one state dict in the original single-file layout."""
    folder = os.fspath(folder)
    family = family or family_of_diffusers_folder(folder)
    if family not in SD_FAMILIES:
        raise CheckpointError(f"{folder!r}: single-file conversion supports {SD_FAMILIES}, not {family!r}")
    comps = pipeline_components(read_model_index(folder))
    out: Dict[str, torch.Tensor] = {}
    if "unet" in comps:
        sub = os.path.join(folder, "unet")
        out.update(unet_to_original(read_component(sub, dtype=dtype, variant=variant), read_config(sub), source=sub))
    if "vae" in comps:
        sub = os.path.join(folder, "vae")
        out.update(vae_to_original(read_component(sub, dtype=dtype, variant=variant), read_config(sub), source=sub))
    for name, (prefix, kind) in TEXT_ENCODER_PREFIXES[family].items():
        if name in comps:
            sub = os.path.join(folder, name)
            out.update(text_encoder_to_original(read_component(sub, dtype=dtype, variant=variant),
                                                prefix=prefix, kind=kind, source=sub))
    if not out:
        raise CheckpointError(f"{folder!r}: no unet, vae or text encoder in model_index.json")
    return out


def convert_diffusers_to_single_file(folder, out_path, family: Optional[str] = None, *,
                                     dtype: Optional[torch.dtype] = None, variant: Optional[str] = None) -> str:
    """Write a diffusers SD1/SD2/SDXL pipeline folder as one original-layout ``.safetensors`` file.

    Returns ``out_path``. The family is read from the folder's configs when not given. SD2's text encoder
    is written with the layers diffusers keeps (23 for OpenCLIP-H); diffusers and velodiff read it back.
    """
    out_path = os.fspath(out_path)
    if not out_path.endswith(".safetensors"):
        raise CheckpointError(f"{out_path!r}: single files are written as .safetensors only")
    family = family or family_of_diffusers_folder(folder)
    sd = diffusers_folder_to_state_dict(folder, family, dtype=dtype, variant=variant)
    write_safetensors(sd, out_path, metadata={"format": "pt", "velodiff_family": family})
    return out_path
