"""Pipelines with diffusers' call signatures over velodiff's models and samplers.

``Pipeline.from_pretrained(path, dtype=..., device=...)`` loads a built-in model, a diffusers pipeline folder (or
an SD1 / SD2 / SDXL single-file checkpoint) through :func:`velodiff.loading.load_pipeline_components` and returns
the matching pipeline; ``velodiff.optimize`` / ``velodiff.restore`` apply and undo techniques on it.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Union

import torch

from velodiff.loading import BUILTIN_MODELS, load_pipeline_components
from velodiff.models.conv_prepack import fastest_cpu_layout
from velodiff.pipelines.base import BasePipeline, PipelineOutput
from velodiff.pipelines.dit import DiTPipeline
from velodiff.pipelines.pixart import PixArtPipeline, PixArtSigmaPipeline
from velodiff.pipelines.stable_diffusion import StableDiffusionPipeline, StableDiffusionXLPipeline

PIPELINES = {
    "StableDiffusionPipeline": StableDiffusionPipeline,
    "StableDiffusionXLPipeline": StableDiffusionXLPipeline,
    "DiTPipeline": DiTPipeline,
    "PixArtAlphaPipeline": PixArtPipeline,
    "PixArtSigmaPipeline": PixArtSigmaPipeline,
}


class Pipeline:
    """Entry point: ``Pipeline.from_pretrained(path)`` returns the pipeline class the folder (or single file)
    declares."""

    @staticmethod
    def from_pretrained(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device] = "cpu", variant: Optional[str] = None,
                        torch_dtype: Optional[torch.dtype] = None, *, tokenizer=None, tokenizer_2=None,
                        configs: Optional[Dict[str, Dict[str, Any]]] = None, family: Optional[str] = None,
                        prediction_type: Optional[str] = None, allow_pickle: bool = False,
                        cpu_fast: bool = True) -> BasePipeline:
        """Load a built-in model by name (:data:`BUILTIN_MODELS`, e.g. ``"digits"``; the name wins over a local
        folder of that name, which ``"./digits"`` reaches), a local diffusers pipeline folder (safetensors only) or
        an SD1 / SD2 / SDXL single-file checkpoint. ``torch_dtype`` is accepted as diffusers' older name for
        ``dtype``; giving both is an error.

        Single files (``.safetensors``; ``.ckpt`` / ``.pt`` / ``.pth`` / ``.bin`` only with ``allow_pickle=True``,
        read with ``torch.load(weights_only=True)``): the family is detected from the keys (``family=`` to
        override: "sd1", "sd2", "sdxl", "sdxl_refiner"), the models are built in memory from the converted
        weights with the family's default configs plus what the weights tell, and ``configs={"unet": {...},
        "vae": {...}, "text_encoder": {...}, "text_encoder_2": {...}, "scheduler": {...}}`` overrides config
        fields (see :func:`velodiff.loading.load_single_file_components` for which fields come from the
        weights). The scheduler is the family default (epsilon prediction); SD 2.x 768-v files need
        ``prediction_type="v_prediction"``, which the weights do not reveal. A single file holds no tokenizer:
        pass ``tokenizer=`` (and ``tokenizer_2=`` for SDXL) as a tokenizer object, a tokenizer folder, or a
        local diffusers pipeline folder of the same family (its ``tokenizer/`` and ``tokenizer_2/`` are used).
        The single-file options are errors with a folder, which carries all of that itself.

        ``cpu_fast`` (default on): on the CPU in fp32 or bf16, the UNet comes in its fastest layout, channels-last
        with its conv weights packed once for oneDNN (:func:`velodiff.models.conv_prepack.prepack_convs`; SD 1.5
        at 256 px: 1.36x the plain layout in fp32, 1.18x in bf16, ``bench/results/cpu_engines.md``), in bf16 its
        linear weights too (:func:`~velodiff.models.conv_prepack.prepack_linears`, bit-identical, 4.7 %), outputs
        within float rounding of the plain layout's. ``cpu_fast=False`` loads the plain layout (for debugging).
        """
        if dtype is not None and torch_dtype is not None:
            raise ValueError("pass dtype or torch_dtype, not both")
        if not isinstance(cpu_fast, bool):
            raise TypeError(f"cpu_fast must be True or False, got {cpu_fast!r}")
        dtype = dtype or torch_dtype or torch.float32
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        components = load_pipeline_components(path, dtype, device, variant=variant, tokenizer=tokenizer,
                                               tokenizer_2=tokenizer_2, configs=configs, family=family,
                                               prediction_type=prediction_type, allow_pickle=allow_pickle)
        path = components["_path"]
        class_name = components["_class_name"]
        try:
            cls = PIPELINES[class_name]
        except KeyError:
            raise ValueError(f"{path}: pipeline {class_name!r} is not supported; supported: "
                             f"{', '.join(sorted(PIPELINES))}") from None
        pipe = cls(components, dtype, torch.device(device))
        pipe.name_or_path = path  # the folder or file it came from (built-in names resolved)
        if cpu_fast and torch.device(device).type == "cpu" and dtype in (torch.float32, torch.bfloat16):
            unet = getattr(pipe, "unet", None)
            if isinstance(unet, torch.nn.Module):
                fastest_cpu_layout(unet, dtype)
        return pipe
