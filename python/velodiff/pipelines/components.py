"""Loading the components of a diffusers pipeline folder into velodiff's own models.

``model_index.json`` names each component's library and class; diffusers classes map to velodiff modules with
the same parameter names (loaded from safetensors by :mod:`velodiff.loading`), transformers classes (text
encoders, tokenizers) load with transformers from the local folder, never from a hub.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Any, Dict, Optional

import torch

# diffusers class name -> "module:Class" of velodiff's implementation.
VELODIFF_MODELS = {
    "UNet2DConditionModel": "velodiff.models.unet:UNet2DConditionModel",
    "AutoencoderKL": "velodiff.models.vae:AutoencoderKL",
    "AutoencoderTiny": "velodiff.models.taesd:AutoencoderTiny",
    "DiTTransformer2DModel": "velodiff.models.dit:DiTTransformer2DModel",
    "PixArtTransformer2DModel": "velodiff.models.pixart:PixArtTransformer2DModel",
}
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")


def _import(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def read_json(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None


def model_class_for(class_name: str, config: Dict[str, Any]):
    """velodiff's class for a diffusers class name; the generic ``Transformer2DModel`` of older DiT / PixArt
    folders is told apart by its ``norm_type``."""
    if class_name == "Transformer2DModel":
        norm = config.get("norm_type")
        class_name = {"ada_norm_zero": "DiTTransformer2DModel",
                      "ada_norm_single": "PixArtTransformer2DModel"}.get(norm)
        if class_name is None:
            raise ValueError(f"Transformer2DModel with norm_type {norm!r} is not supported (DiT uses "
                             "'ada_norm_zero', PixArt 'ada_norm_single')")
    try:
        return _import(VELODIFF_MODELS[class_name])
    except KeyError:
        raise ValueError(f"velodiff has no implementation of diffusers' {class_name}; supported: "
                         f"{', '.join(sorted(VELODIFF_MODELS))}") from None


def load_model(folder: str, class_name: str, dtype: torch.dtype, device, variant: Optional[str] = None):
    """Build velodiff's model from ``folder/config.json`` and load its safetensors weights into it."""
    from velodiff.loading import find_weights, read_safetensors

    config = read_json(os.path.join(folder, "config.json"))
    cls = model_class_for(class_name, config)
    state: Dict[str, torch.Tensor] = {}
    files = find_weights(folder, variant=variant)
    for path in files:
        state.update(read_safetensors(path, dtype=dtype, device=device))
    return model_from_state_dict(cls, config, state, source=files[0] if len(files) == 1 else folder)


def model_from_state_dict(cls, config: Dict[str, Any], state: Dict[str, torch.Tensor], *, source: str):
    """Build velodiff's ``cls`` from a diffusers ``config`` on the meta device and give it ``state``'s tensors
    (no copy: the model takes them with their dtype and device). Errors name ``source`` and the keys."""
    from velodiff.loading import load_state_dict_into

    with torch.device("meta"):
        model = cls.from_config(config)
    load_state_dict_into(model, state, source=source, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_transformers(folder: str, class_name: str, dtype: torch.dtype, device):
    """A text encoder or tokenizer with transformers, from the local folder only (tokenizers of any class
    through AutoTokenizer, which reads the folder's own tokenizer files)."""
    import transformers
    if "Tokenizer" in class_name:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    if class_name not in TEXT_ENCODERS:
        raise ValueError(f"unsupported transformers component {class_name}; supported: {TEXT_ENCODERS} and "
                         "tokenizers")
    model = getattr(transformers, class_name).from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                              use_safetensors=True)
    return model.to(device).eval().requires_grad_(False)


def load_components(root: str, dtype: torch.dtype, device, variant: Optional[str] = None) -> Dict[str, Any]:
    """Every component of a diffusers pipeline folder: {name: module | tokenizer | scheduler config dict}."""
    index = read_json(os.path.join(root, "model_index.json"))
    components: Dict[str, Any] = {"_class_name": index.get("_class_name"), "_model_index": index}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library, class_name = spec
        folder = os.path.join(root, name)
        if name == "scheduler":
            components[name] = read_json(os.path.join(folder, "scheduler_config.json"))
        elif library == "diffusers":
            components[name] = load_model(folder, class_name, dtype, device, variant)
        elif library == "transformers":
            components[name] = load_transformers(folder, class_name, dtype, device)
        else:
            raise ValueError(f"{root}: component {name!r} comes from {library!r}, which velodiff does not load")
    return components
