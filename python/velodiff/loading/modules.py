"""Building one pipeline component as a module: velodiff's models from a diffusers config plus weights, CLIP text
encoders (velodiff's) and tokenizers from local files only (never from a hub); T5 encoders with transformers."""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Mapping, Optional

import torch

from velodiff.loading.errors import CheckpointError
from velodiff.loading.folders import find_weights, read_config
from velodiff.loading.keymap_text import fit_clip_keys
from velodiff.loading.registry import folder_loader_for
from velodiff.loading.pickle_guard import read_checkpoint
from velodiff.loading.state_dict import load_state_dict_into
from velodiff.models.clip_text import clip_text_config
from velodiff.models.registry import model_class_for, text_encoder_class_for

#: transformers text-encoder classes a pipeline folder may declare
TEXT_ENCODERS = ("CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel")
#: the text encoders :func:`text_encoder_from_state_dict` builds from converted single-file weights
CLIP_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


def model_from_state_dict(cls: type, config: Mapping[str, Any], state: Dict[str, torch.Tensor], *, source: str):
    """Build velodiff's ``cls`` from a diffusers ``config`` on the meta device and give it ``state``'s tensors
    (no copy: the model takes them with their dtype and device). Errors name ``source`` and the keys."""
    with torch.device("meta"):
        model = cls.from_config(dict(config))
    load_state_dict_into(model, state, source=source, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_diffusers_model(folder: str, class_name: str, dtype: torch.dtype, device,
                         variant: Optional[str] = None, allow_pickle: bool = False):
    """velodiff's model for the diffusers component folder ``folder`` (``config.json`` plus safetensors
    weights; pickled ``.bin`` weights only with ``allow_pickle=True``), whose pipeline declares it as
    ``class_name``. A folder that a registered loader recognises (:mod:`velodiff.loading.registry`, e.g. a
    quantized denoiser written by ``velodiff quantize``) is built by that loader instead."""
    loader = folder_loader_for(folder)
    if loader is not None:
        return loader.load(folder, class_name, dtype, device)
    config = read_config(folder)
    cls = model_class_for(class_name, config)
    state: Dict[str, torch.Tensor] = {}
    files = find_weights(folder, variant=variant, allow_pickle=allow_pickle)
    for path in files:
        state.update(read_checkpoint(path, dtype=dtype, device=device, allow_pickle=allow_pickle))
    return model_from_state_dict(cls, config, state, source=files[0] if len(files) == 1 else folder)


@contextlib.contextmanager
def no_transformers_progress_bar():
    """transformers' per-load progress bar ("Loading weights ...") off while the block runs, then as it was;
    its warnings and errors still show."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def load_transformers_component(folder: str, class_name: str, dtype: torch.dtype, device,
                                allow_pickle: bool = False, variant: Optional[str] = None):
    """A text encoder or tokenizer that a pipeline folder declares as ``["transformers", class_name]``, from the
    local folder only. CLIP text encoders are velodiff's own (:mod:`velodiff.models.clip_text`, see
    :func:`load_native_text_encoder`); T5 encoders are transformers'. Tokenizers: velodiff's CLIP tokenizer where it
    is exactly transformers', else transformers' AutoTokenizer (:func:`velodiff.loading.tokenizers.
    tokenizer_from_folder`). Weights are read from safetensors; a pickled ``.bin`` is refused unless
    ``allow_pickle=True``."""
    if "Tokenizer" in class_name:
        from velodiff.loading.tokenizers import tokenizer_from_folder

        return tokenizer_from_folder(folder)
    if class_name not in TEXT_ENCODERS:
        raise ValueError(f"unsupported transformers component {class_name}; supported: {TEXT_ENCODERS} and "
                         "tokenizers")
    if text_encoder_class_for(class_name) is not None:
        return load_native_text_encoder(folder, class_name, dtype, device, variant=variant,
                                        allow_pickle=allow_pickle)
    import transformers

    if not allow_pickle:
        find_weights(folder)  # the pickle refusal, in velodiff's words, when the folder has only a .bin
    with no_transformers_progress_bar():
        model = getattr(transformers, class_name).from_pretrained(folder, local_files_only=True, dtype=dtype,
                                                                  use_safetensors=None if allow_pickle else True)
    return model.to(device).eval().requires_grad_(False)


def load_native_text_encoder(folder: str, class_name: str, dtype: torch.dtype, device, *,
                             variant: Optional[str] = None, allow_pickle: bool = False):
    """velodiff's CLIP text encoder for a transformers text-encoder folder (``config.json`` plus
    ``model[.variant].safetensors`` or its shards; a folder without the variant's file gives its plain weights,
    as transformers, which ignores variants, did), weights read straight into ``dtype`` / ``device``."""
    config_path = os.path.join(folder, "config.json")
    config = read_config(folder)
    try:
        files = find_weights(folder, variant=variant, allow_pickle=allow_pickle)
    except CheckpointError:
        if variant is None:
            raise
        files = find_weights(folder, allow_pickle=allow_pickle)
    clip_text_config(config, projection=class_name == "CLIPTextModelWithProjection", source=config_path)
    state: Dict[str, torch.Tensor] = {}
    for path in files:
        state.update(read_checkpoint(path, dtype=dtype, device=device, allow_pickle=allow_pickle))
    return text_encoder_from_state_dict(config, state, source=files[0] if len(files) == 1 else folder,
                                        class_name=class_name)


def text_encoder_from_state_dict(config: Mapping[str, Any], state: Dict[str, torch.Tensor], *, source: str,
                                 class_name: Optional[str] = None):
    """velodiff's CLIP text encoder (``class_name``, default: the config's ``architectures[0]``) built from a
    CLIPTextConfig dict on the meta device, taking ``state``'s tensors (transformers' classic ``text_model.*`` or
    flattened names; a stored ``position_ids`` buffer is dropped) without a copy."""
    arch = class_name or (config.get("architectures") or ["CLIPTextModel"])[0]
    if arch not in CLIP_CLASSES:
        raise ValueError(f"{source}: text encoder architecture {arch!r} is not supported here; "
                         f"supported: {CLIP_CLASSES}")
    cls = text_encoder_class_for(arch)
    with torch.device("meta"):
        model = cls.from_config(config)
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    load_state_dict_into(model, fit_clip_keys(state, model), source=source, strict=True, assign=True)
    return model.eval().requires_grad_(False)
