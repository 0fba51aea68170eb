"""The one map from a diffusers model class name to velodiff's implementation of it, and from the transformers
text-encoder classes velodiff implements (CLIP) to its own.

Every loader (diffusers folders, single files, quantized folders) asks :func:`model_class_for` (or, for a
component a pipeline folder declares as ``["transformers", name]``, :func:`text_encoder_class_for`); nothing else
keeps a copy of these tables. Values are ``"module:Class"`` strings so that reading the table imports no model
code (and no torch) until a class is actually needed.
"""
from __future__ import annotations

import importlib
from typing import Any, Dict, Mapping, Optional

#: diffusers class name -> "module:Class" of velodiff's implementation (same parameter names as diffusers')
MODEL_CLASSES: Dict[str, str] = {
    "UNet2DConditionModel": "velodiff.models.unet:UNet2DConditionModel",
    "AutoencoderKL": "velodiff.models.vae:AutoencoderKL",
    "AutoencoderTiny": "velodiff.models.taesd:AutoencoderTiny",
    "DiTTransformer2DModel": "velodiff.models.dit:DiTTransformer2DModel",
    "PixArtTransformer2DModel": "velodiff.models.pixart:PixArtTransformer2DModel",
}
#: transformers class name -> "module:Class" of velodiff's implementation (transformers' parameter names); text
#: encoders not listed here (T5EncoderModel) load with transformers
TEXT_ENCODER_CLASSES: Dict[str, str] = {
    "CLIPTextModel": "velodiff.models.clip_text:CLIPTextModel",
    "CLIPTextModelWithProjection": "velodiff.models.clip_text:CLIPTextModelWithProjection",
}
#: older DiT / PixArt folders declare the generic ``Transformer2DModel``; its ``norm_type`` tells which it is
TRANSFORMER_2D_NORM_TYPES: Dict[str, str] = {"ada_norm_zero": "DiTTransformer2DModel",
                                             "ada_norm_single": "PixArtTransformer2DModel"}


def diffusers_class_name(class_name: str, config: Optional[Mapping[str, Any]] = None) -> str:
    """The key of :data:`MODEL_CLASSES` for a folder that declares ``class_name`` with ``config`` (only the
    generic ``Transformer2DModel`` needs the config). Raises ValueError naming what is supported."""
    if class_name == "Transformer2DModel":
        norm = (config or {}).get("norm_type")
        if norm not in TRANSFORMER_2D_NORM_TYPES:
            raise ValueError(f"Transformer2DModel with norm_type {norm!r} is not supported (DiT uses "
                             "'ada_norm_zero', PixArt 'ada_norm_single')")
        return TRANSFORMER_2D_NORM_TYPES[norm]
    if class_name not in MODEL_CLASSES:
        raise ValueError(f"velodiff has no implementation of diffusers' {class_name}; supported: "
                         f"{', '.join(sorted(MODEL_CLASSES))}")
    return class_name


def model_class_for(class_name: str, config: Optional[Mapping[str, Any]] = None) -> type:
    """velodiff's ``nn.Module`` class for the diffusers class ``class_name`` (see :func:`diffusers_class_name`)."""
    module, _, name = MODEL_CLASSES[diffusers_class_name(class_name, config)].partition(":")
    return getattr(importlib.import_module(module), name)


def text_encoder_class_for(class_name: str) -> Optional[type]:
    """velodiff's ``nn.Module`` class for the transformers text encoder ``class_name``, or None when velodiff
    leaves that class to transformers."""
    if class_name not in TEXT_ENCODER_CLASSES:
        return None
    module, _, name = TEXT_ENCODER_CLASSES[class_name].partition(":")
    return getattr(importlib.import_module(module), name)
