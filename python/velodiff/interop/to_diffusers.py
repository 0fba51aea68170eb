"""A velodiff Stable Diffusion pipeline -> a diffusers pipeline over the same weights (no copy).

The UNet and VAE become diffusers' classes of the same name, velodiff's CLIP text encoders transformers' (all
built on the meta device and given velodiff's tensors, :mod:`velodiff.interop.sharing`); velodiff's own CLIP
tokenizer, which is exactly transformers' ``CLIPTokenizer`` on the same files, is replaced by transformers' read
from the same folder; the scheduler is the diffusers class the scheduler config names.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

from velodiff.interop.scheduler import DiffusersScheduler
from velodiff.interop.sharing import placement, take_tensors
from velodiff.loading.keymap_text import fit_clip_keys
from velodiff.loading.modules import CLIP_CLASSES
from velodiff.models.registry import MODEL_CLASSES
from velodiff.pipelines.stable_diffusion import StableDiffusionPipeline, StableDiffusionXLPipeline

#: velodiff pipeline class -> the diffusers pipeline class it maps to
MAPPED = {"StableDiffusionXLPipeline": StableDiffusionXLPipeline, "StableDiffusionPipeline": StableDiffusionPipeline}


def pipeline_kind(pipe) -> str:
    """The key of :data:`MAPPED` for velodiff's ``pipe``; TypeError saying what maps otherwise."""
    for name, cls in MAPPED.items():  # the SDXL class derives from the SD one: it is tried first
        if isinstance(pipe, cls):
            return name
    raise TypeError(f"to_diffusers maps velodiff's StableDiffusionPipeline (SD 1.x / 2.x) and "
                    f"StableDiffusionXLPipeline onto diffusers' classes of the same name; got "
                    f"{type(pipe).__module__}.{type(pipe).__name__}")


def diffusers_model(module, name: str):
    """diffusers' class of the velodiff model ``module`` (component ``name``) over its tensors; a diffusers module
    is returned as is. TypeError when the model is not one of velodiff's diffusers re-implementations or no
    longer maps (LoRA branches, quantized layers)."""
    import diffusers
    import torch

    cls = type(module)
    if cls.__module__.split(".")[0] == "diffusers":
        return module
    if MODEL_CLASSES.get(cls.__name__) != f"{cls.__module__}:{cls.__name__}" or not hasattr(diffusers, cls.__name__):
        raise TypeError(f"{name}: {cls.__module__}.{cls.__name__} has no diffusers counterpart; mapped: velodiff's "
                        f"{', '.join(sorted(MODEL_CLASSES))}")
    _, device = placement(module, name)
    config = {k: v for k, v in dict(module.config).items() if not k.startswith("_")}
    with torch.device("meta"):
        target = getattr(diffusers, cls.__name__).from_config(config)
    return take_tensors(target, dict(module.state_dict()), source=f"velodiff {name} ({cls.__name__})", device=device)


def transformers_text_encoder(module, name: str):
    """transformers' CLIP text encoder over the tensors of velodiff's ``module``; a transformers model is returned
    as is. TypeError for anything else."""
    import torch
    import transformers

    if isinstance(module, transformers.PreTrainedModel):
        return module
    class_name = type(module).__name__
    if class_name not in CLIP_CLASSES or not type(module).__module__.startswith("velodiff."):
        raise TypeError(f"{name}: {type(module).__module__}.{class_name} has no transformers counterpart; mapped: "
                        f"velodiff's {', '.join(CLIP_CLASSES)} and transformers models")
    _, device = placement(module, name)
    config = transformers.CLIPTextConfig.from_dict({k: v for k, v in dict(module.config).items()
                                                    if not k.startswith("_")})
    with torch.device("meta"):
        target = getattr(transformers, class_name)(config)
    state = fit_clip_keys(dict(module.state_dict()), target)
    return take_tensors(target, state, source=f"velodiff {name} ({class_name})", device=device)


def transformers_tokenizer(tokenizer, name: str):
    """transformers' tokenizer for ``tokenizer``: itself when it is transformers', else (velodiff's CLIP tokenizer)
    transformers' read from the folder it was read from. TypeError when there is none."""
    import transformers

    if isinstance(tokenizer, transformers.PreTrainedTokenizerBase):
        return tokenizer
    folder = getattr(tokenizer, "name_or_path", None)
    if not isinstance(folder, str) or not os.path.isdir(folder):
        raise TypeError(f"{name}: {type(tokenizer).__name__} is not a transformers tokenizer and names no folder "
                        "to read one from")
    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def diffusers_scheduler(config: Dict[str, Any]):
    """The diffusers scheduler that ``config`` names (``_class_name``) built from it, else a
    :class:`DiffusersScheduler` with the sampler a velodiff pipeline picks for it."""
    import diffusers

    name = config.get("_class_name")
    cls = getattr(diffusers, name, None) if isinstance(name, str) and name.endswith("Scheduler") else None
    if cls is not None and hasattr(cls, "from_config"):
        return cls.from_config(config)
    return DiffusersScheduler(None, config)


def to_diffusers(pipe, scheduler: Optional[Any] = None):
    """diffusers' ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` for velodiff's pipeline of that
    name, sharing its weight storage (every parameter's ``data_ptr()`` is velodiff's; dtype, device and memory
    format are the tensors' own, e.g. the channels-last conv weights of a UNet loaded on the CPU). ``scheduler``:
    the scheduler to use (a diffusers one
    or a :class:`DiffusersScheduler`); default: the diffusers class of the pipeline's scheduler config. No safety
    checker, no watermarker. The diffusers modules are in eval mode without gradients.

    Raises TypeError for any other pipeline, and for models that no longer map onto diffusers' classes (LoRA
    branches, quantized layers: unload / fuse LoRAs first). Needs diffusers."""
    kind = pipeline_kind(pipe)
    import diffusers

    parts = dict(unet=diffusers_model(pipe.unet, "unet"), vae=diffusers_model(pipe.vae, "vae"),
                 text_encoder=transformers_text_encoder(pipe.text_encoder, "text_encoder"),
                 tokenizer=transformers_tokenizer(pipe.tokenizer, "tokenizer"),
                 scheduler=scheduler if scheduler is not None else diffusers_scheduler(pipe.scheduler_config))
    if kind == "StableDiffusionXLPipeline":
        parts.update(text_encoder_2=transformers_text_encoder(pipe.text_encoder_2, "text_encoder_2"),
                     tokenizer_2=transformers_tokenizer(pipe.tokenizer_2, "tokenizer_2"))
        return diffusers.StableDiffusionXLPipeline(**parts, add_watermarker=False,
                                                   force_zeros_for_empty_prompt=pipe.force_zeros_for_empty_prompt)
    return diffusers.StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)
