"""Single-file original checkpoints (CompVis LDM SD1/SD2, Stability SGM SDXL, DiT) <-> diffusers components.

:func:`split_single_file` turns one original state dict into diffusers-named state dicts and configs per
component; :func:`convert_single_file_to_diffusers` writes them as a diffusers pipeline folder and
:func:`convert_diffusers_to_single_file` goes back.

The original layout records weights only, so a file written by velodiff also records, in its safetensors
metadata, what the weights cannot tell: every component's config (``velodiff_configs``: ``{component:
config.json dict, "scheduler": scheduler_config.json dict}``) and the model index's settings
(``velodiff_pipeline``: its entries that are not components, e.g. ``_velodiff_defaults``). Reading such a file
takes those first (then ``configs=`` overrides), so folder -> file -> folder is lossless; files from elsewhere
carry none and get the family defaults.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import torch

from velodiff.loading import configs as _defaults
from velodiff.loading.builtin import resolve_model_path
from velodiff.loading.detect import CONTEXT_DIMS, detect_family
from velodiff.loading.errors import CheckpointError
from velodiff.loading.folders import pipeline_components, read_component, read_config, read_model_index
from velodiff.loading.infer import infer_text_encoder_config, infer_unet_config, infer_vae_config
from velodiff.loading.keymap_transformer import (convert_dit, convert_pixart, dit_to_original,
                                                 infer_transformer_config)
from velodiff.loading.keymap_text import TEXT_ENCODER_PREFIXES, convert_text_encoder, text_encoder_to_original
from velodiff.loading.keymap_unet import UNET_PREFIX, convert_unet, ema_unet_weights, unet_to_original
from velodiff.loading.keymap_vae import VAE_PREFIXES, convert_vae, find_vae_prefix, vae_to_original
from velodiff.loading.output import check_destination, output_file, output_folder
from velodiff.loading.pickle_guard import is_pickle_path, read_checkpoint
from velodiff.loading.registry import folder_loader_for
from velodiff.loading.safetensors_io import read_safetensors_header, write_safetensors
from velodiff.loading.tokenizers import load_tokenizer, tokenizer_name, tokenizer_sources

SD_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
TRANSFORMER_FAMILIES = ("dit", "pixart")
#: families a diffusers folder can be written to one file as (PixArt's T5 text encoder has no single-file layout)
FOLDER_TO_FILE_FAMILIES = SD_FAMILIES + ("dit",)
_CLASSES = {"unet": ("diffusers", "UNet2DConditionModel"), "vae": ("diffusers", "AutoencoderKL"),
            "transformer": ("diffusers", None)}
#: safetensors metadata keys of a velodiff-written single file (see the module docstring)
METADATA_CONFIGS = "velodiff_configs"
METADATA_PIPELINE = "velodiff_pipeline"
#: model-index keys that describe the file itself, not the model (not carried into the metadata)
_INDEX_OWN_KEYS = ("_class_name", "_diffusers_version")
#: the VAE config family of a DiT file's VAE (DiT uses Stable Diffusion's VAE)
_VAE_FAMILY = {"dit": "sd1"}


class Component(NamedTuple):
    """One converted component: its diffusers/transformers config dict and diffusers-named weights."""

    config: dict
    state_dict: Dict[str, torch.Tensor]


def stored_pipeline_info(path) -> Tuple[Dict[str, dict], Dict[str, Any]]:
    """``(configs, settings)`` recorded in the metadata of a single file written by velodiff (see the module
    docstring); ``({}, {})`` for a file from elsewhere or a pickled one."""
    path = os.fspath(path)
    if is_pickle_path(path):
        return {}, {}
    _, metadata, _ = read_safetensors_header(path)
    metadata = metadata or {}
    out = []
    for key in (METADATA_CONFIGS, METADATA_PIPELINE):
        text = metadata.get(key)
        try:
            value = json.loads(text) if text is not None else {}
        except ValueError as e:
            raise CheckpointError(f"{path!r}: metadata {key!r} is not valid JSON ({e})") from None
        if not isinstance(value, dict) or (key == METADATA_CONFIGS and
                                           not all(isinstance(v, dict) for v in value.values())):
            raise CheckpointError(f"{path!r}: metadata {key!r} is not a JSON object of the expected form")
        out.append(value)
    return out[0], out[1]


def merge_configs(stored: Mapping[str, Mapping], given: Optional[Mapping[str, Mapping]]) -> Dict[str, dict]:
    """Per component, the stored config then the caller's overrides on top."""
    out = {name: dict(cfg) for name, cfg in stored.items()}
    for name, cfg in (given or {}).items():
        out[name] = {**out.get(name, {}), **dict(cfg)}
    return out


def split_single_file(sd: Mapping[str, torch.Tensor], *, family: Optional[str] = None,
                      configs: Optional[Mapping[str, Mapping]] = None, use_ema: bool = False,
                      source: str = "<checkpoint>") -> Dict[str, Component]:
    """An original SD1/SD2/SDXL/DiT/PixArt state dict -> ``{component name: Component}`` in diffusers names.

    ``family`` is detected from the keys when not given. ``configs`` overrides fields of the inferred
    config per component (``{"unet": {"attention_head_dim": 8}, "text_encoder": {...}}``). ``use_ema``
    takes the UNet's ``model_ema.*`` copies of an LDM training checkpoint instead of the raw weights. Components
    absent from the file (a UNet-only file has no VAE) are left out. DiT and PixArt files hold the transformer
    (``{"transformer": ...}``), and a DiT file written by velodiff its VAE too (under ``first_stage_model.``).
    """
    family = family or detect_family(sd, source=source)
    configs = dict(configs or {})
    if family in TRANSFORMER_FAMILIES:
        vae_prefix = find_vae_prefix(sd) if family == "dit" else ""
        own = {k: v for k, v in sd.items() if not (vae_prefix and k.startswith(vae_prefix))}
        cfg = infer_transformer_config(own, family, configs.get("transformer"), source=source)
        convert = convert_dit if family == "dit" else convert_pixart
        out = {"transformer": Component(cfg, convert(own, source=source))}
        if vae_prefix:
            vae_sd = {k: v for k, v in sd.items() if k.startswith(vae_prefix)}
            cfg = infer_vae_config(vae_sd, _VAE_FAMILY[family], configs.get("vae"), source=source)
            out["vae"] = Component(cfg, convert_vae(vae_sd, cfg, source=source))
        return out
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


def _write_component(folder: str, name: str, comp: Component) -> list:
    """``folder/name/config.json`` and its weights; returns the model-index entry [library, class]."""
    sub = os.path.join(folder, name)
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
    return [lib, cls]


def _write_json(path: str, value: Mapping) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(value, f, indent=2)


def convert_single_file_to_diffusers(path, out_folder, family: Optional[str] = None, *,
                                     configs: Optional[Mapping[str, Mapping]] = None,
                                     allow_pickle: bool = False, use_ema: bool = False,
                                     dtype: Optional[torch.dtype] = None, prediction_type: Optional[str] = None,
                                     tokenizer=None, tokenizer_2=None, force: bool = False) -> Dict[str, object]:
    """Write an original single-file checkpoint as a diffusers pipeline folder; returns its model index.

    Each present component gets ``<name>/config.json`` and its weights
    (``diffusion_pytorch_model.safetensors`` for UNet/VAE, ``model.safetensors`` for text encoders), plus
    ``scheduler/scheduler_config.json`` (the recorded one or the family default, then ``configs["scheduler"]``,
    then ``prediction_type``: see :func:`velodiff.loading.configs.single_file_scheduler_config`) and
    ``model_index.json`` (with the recorded settings). Configs: the ones recorded in the file's metadata, else
    inferred (see :func:`split_single_file`), then ``configs``. Single files hold no tokenizer: ``tokenizer`` /
    ``tokenizer_2`` (a tokenizer object, a tokenizer folder or a diffusers pipeline folder, as for
    ``Pipeline.from_pretrained``) are saved as ``tokenizer/`` / ``tokenizer_2/``; without them none is written
    (the index then lacks them). A DiT or PixArt file from elsewhere gives ``transformer/`` only (its VAE and
    text encoder live elsewhere) and no model index; the return value then lists just the transformer; a DiT
    file written by velodiff gives the whole pipeline. ``dtype`` casts floating weights on the way; ``use_ema``
    is as in :func:`split_single_file`. ``out_folder`` is written as :mod:`velodiff.loading.output` describes:
    an existing one is refused unless ``force=True``.
    """
    path = os.fspath(path)
    if prediction_type is not None and prediction_type not in _defaults.PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {_defaults.PREDICTION_TYPES}, got {prediction_type!r}")
    check_destination(out_folder, folder=True, force=force)
    stored, settings = stored_pipeline_info(path) if os.path.isfile(path) else ({}, {})
    configs = merge_configs(stored, configs)
    sd = read_checkpoint(path, dtype=dtype, allow_pickle=allow_pickle)
    family = family or detect_family(sd, source=path)
    parts = split_single_file(sd, family=family, configs=configs, use_ema=use_ema, source=path)
    del sd
    whole_dit = family == "dit" and "vae" in parts and "scheduler" in stored
    with output_folder(out_folder, force=force) as tmp:
        index: Dict[str, object] = {"_class_name": _defaults.PIPELINE_CLASSES.get(family, ""),
                                    "_diffusers_version": "0.42.0"}
        for name, comp in parts.items():
            index[name] = _write_component(tmp, name, comp)
        if family in TRANSFORMER_FAMILIES and not whole_dit:
            # the file holds only the transformer (and maybe a VAE): no pipeline to describe
            return {k: v for k, v in index.items() if not k.startswith("_")}
        encoders = [name for name in TEXT_ENCODER_PREFIXES.get(family, {}) if name in parts]
        sources = tokenizer_sources([tokenizer_name(n) for n in encoders],
                                    {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2})
        for name, value in sources.items():
            if value is not None:
                tok = load_tokenizer(value, name)
                tok.save_pretrained(os.path.join(tmp, name))
                index[name] = ["transformers", type(tok).__name__]
        sched = _defaults.single_file_scheduler_config(family, configs.get("scheduler"), prediction_type,
                                                       base=stored.get("scheduler"))
        _write_json(os.path.join(tmp, "scheduler", "scheduler_config.json"), sched)
        index["scheduler"] = ["diffusers", sched["_class_name"]]
        if encoders and index["_class_name"] == "StableDiffusionPipeline":  # what diffusers writes without them
            index.update(safety_checker=[None, None], feature_extractor=[None, None], requires_safety_checker=False)
        index.update({k: v for k, v in settings.items() if k not in _INDEX_OWN_KEYS})
        _write_json(os.path.join(tmp, "model_index.json"), index)
    return index


def family_of_diffusers_folder(folder) -> str:
    """sd1 / sd2 / sdxl / sdxl_refiner / dit / pixart from a diffusers pipeline folder's model index and configs."""
    folder = os.fspath(folder)
    index = read_model_index(folder)
    comps = pipeline_components(index)
    pipeline_class = str(index.get("_class_name") or "")
    if pipeline_class == "DiTPipeline":
        return "dit"
    if pipeline_class.startswith("PixArt"):
        return "pixart"
    if "unet" not in comps:
        raise CheckpointError(f"{folder!r}: a {pipeline_class or 'pipeline'} without a unet; single files hold "
                              "SD1/SD2/SDXL pipelines (and DiT)")
    unet = read_config(os.path.join(folder, "unet"))
    if unet.get("addition_embed_type") == "text_time":
        return "sdxl" if "text_encoder" in comps else "sdxl_refiner"
    ctx = unet.get("cross_attention_dim")
    if isinstance(ctx, int) and CONTEXT_DIMS.get(ctx) in ("sd1", "sd2"):
        return CONTEXT_DIMS[ctx]
    return "sd2" if unet.get("use_linear_projection") else "sd1"


def _check_plain_component(folder: str, name: str) -> str:
    sub = os.path.join(folder, name)
    loader = folder_loader_for(sub)
    if loader is not None:
        raise CheckpointError(f"{sub!r} is a {loader.name} component, which has no single-file layout; convert the "
                              "unquantized model instead")
    return sub


def diffusers_folder_to_state_dict(folder, family: Optional[str] = None, *, dtype: Optional[torch.dtype] = None,
                                   variant: Optional[str] = None) -> Dict[str, torch.Tensor]:
    """A diffusers SD1/SD2/SDXL (or DiT) pipeline folder -> one state dict in the original single-file layout
    (a DiT's VAE under ``first_stage_model.``)."""
    folder = resolve_model_path(folder)
    family = family or family_of_diffusers_folder(folder)
    if family not in FOLDER_TO_FILE_FAMILIES:
        raise CheckpointError(f"{folder!r}: single-file conversion supports {FOLDER_TO_FILE_FAMILIES}, not "
                              f"{family!r}" + (" (a PixArt pipeline's T5 text encoder has no single-file layout)"
                                               if family == "pixart" else ""))
    comps = pipeline_components(read_model_index(folder))
    out: Dict[str, torch.Tensor] = {}
    if family == "dit" and "transformer" in comps:
        sub = _check_plain_component(folder, "transformer")
        try:
            out.update(dit_to_original(read_component(sub, dtype=dtype, variant=variant), source=sub))
        except CheckpointError as e:
            raise CheckpointError(f"{folder!r} cannot be written as one original-layout DiT file: {e}; keep it as "
                                  "a folder") from None
    if "unet" in comps and family in SD_FAMILIES:
        sub = _check_plain_component(folder, "unet")
        out.update(unet_to_original(read_component(sub, dtype=dtype, variant=variant), read_config(sub), source=sub))
    if "vae" in comps:
        sub = _check_plain_component(folder, "vae")
        out.update(vae_to_original(read_component(sub, dtype=dtype, variant=variant), read_config(sub), source=sub))
    for name, (prefix, kind) in TEXT_ENCODER_PREFIXES.get(family, {}).items():
        if name in comps:
            sub = os.path.join(folder, name)
            out.update(text_encoder_to_original(read_component(sub, dtype=dtype, variant=variant),
                                                prefix=prefix, kind=kind, source=sub))
    if not out:
        raise CheckpointError(f"{folder!r}: no unet, transformer, vae or text encoder in model_index.json")
    return out


def folder_pipeline_info(folder) -> Tuple[Dict[str, dict], Dict[str, Any]]:
    """What a single file cannot hold of a diffusers pipeline folder: ``(configs, settings)``, the configs of
    its components and scheduler, and its model index's entries that are not components."""
    folder = resolve_model_path(folder)
    index = read_model_index(folder)
    comps = pipeline_components(index)
    configs: Dict[str, dict] = {}
    for name in comps:
        if name == "scheduler":
            configs[name] = read_config(os.path.join(folder, name), "scheduler_config.json")
        elif not name.startswith("tokenizer"):
            configs[name] = read_config(os.path.join(folder, name))
    settings = {k: v for k, v in index.items() if k not in comps and k not in _INDEX_OWN_KEYS
                and not (isinstance(v, list) and len(v) == 2 and v[0] is None)}
    return configs, settings


def convert_diffusers_to_single_file(folder, out_path, family: Optional[str] = None, *,
                                     dtype: Optional[torch.dtype] = None, variant: Optional[str] = None,
                                     force: bool = False) -> str:
    """Write a diffusers SD1/SD2/SDXL or DiT pipeline folder (or a built-in model's name) as one original-layout
    ``.safetensors`` file, with the configs and model-index settings in its metadata (see the module
    docstring), so that converting it back gives the same folder (tokenizers aside: single files hold none).

    Returns ``out_path``. The family is read from the folder's configs when not given. SD2's text encoder
    is written with the layers diffusers keeps (23 for OpenCLIP-H); diffusers and velodiff read it back.
    ``out_path`` is written as :mod:`velodiff.loading.output` describes: an existing file is refused unless
    ``force=True``.
    """
    out_path = os.fspath(out_path)
    if not out_path.endswith(".safetensors"):
        raise CheckpointError(f"{out_path!r}: single files are written as .safetensors only")
    folder = resolve_model_path(folder)
    check_destination(out_path, folder=False, force=force)
    family = family or family_of_diffusers_folder(folder)
    sd = diffusers_folder_to_state_dict(folder, family, dtype=dtype, variant=variant)
    configs, settings = folder_pipeline_info(folder)
    metadata = {"format": "pt", "velodiff_family": family, METADATA_CONFIGS: json.dumps(configs),
                METADATA_PIPELINE: json.dumps(settings)}
    with output_file(out_path, force=force) as tmp:
        write_safetensors(sd, tmp, metadata=metadata)
    return out_path
