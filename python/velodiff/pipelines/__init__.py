"""Pipelines with diffusers' call signatures over velodiff's models and samplers.

``Pipeline.from_pretrained(path, dtype=..., device=...)`` reads a diffusers pipeline folder and returns the
matching pipeline; ``velodiff.optimize`` / ``velodiff.restore`` apply and undo techniques on it.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch

from velodiff.pipelines.base import BasePipeline, PipelineOutput
from velodiff.pipelines.components import load_components
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
    """Entry point: ``Pipeline.from_pretrained(path)`` returns the pipeline class the folder declares."""

    @staticmethod
    def from_pretrained(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None,
                        device: Union[str, torch.device] = "cpu", variant: Optional[str] = None,
                        torch_dtype: Optional[torch.dtype] = None) -> BasePipeline:
        """Load a local diffusers pipeline folder (safetensors only). ``torch_dtype`` is accepted as diffusers'
        older name for ``dtype``; giving both is an error."""
        if dtype is not None and torch_dtype is not None:
            raise ValueError("pass dtype or torch_dtype, not both")
        dtype = dtype or torch_dtype or torch.float32
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}")
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is not a folder; velodiff loads diffusers pipeline folders "
                                    "(model_index.json plus component subfolders)")
        components = load_components(path, dtype, device, variant)
        class_name = components["_class_name"]
        try:
            cls = PIPELINES[class_name]
        except KeyError:
            raise ValueError(f"{path}: pipeline {class_name!r} is not supported; supported: "
                             f"{', '.join(sorted(PIPELINES))}") from None
        return cls(components, dtype, torch.device(device))


__all__ = ["Pipeline", "PipelineOutput", "PIPELINES", "DiTPipeline", "StableDiffusionPipeline",
           "StableDiffusionXLPipeline"]
