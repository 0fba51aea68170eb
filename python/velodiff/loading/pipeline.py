"""The one entry for loading a whole pipeline's components: a built-in model name, a diffusers pipeline folder
(plain or with components that a registered loader reads, e.g. quantized) or a single-file checkpoint.

:func:`load_pipeline_components` returns ``{name: module | tokenizer | scheduler config dict}`` plus
``_class_name`` (the pipeline class), ``_model_index`` (the folder's model_index.json, or the one a single file
implies) and ``_path`` (the folder or file read, built-in names resolved); :mod:`velodiff.pipelines` picks the
pipeline class from ``_class_name``.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional

import torch

from velodiff.loading.builtin import resolve_model_path
from velodiff.loading.folders import read_config, read_model_index
from velodiff.loading.modules import load_diffusers_model, load_transformers_component
from velodiff.loading.single_file_pipeline import load_single_file_components


def check_device(device) -> torch.device:
    """``device`` as a torch.device, checked before anything is loaded: a ValueError naming ``device`` for a
    string torch cannot parse, or a CUDA device when this torch has none."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ValueError(f"device={device!r} is not a device torch knows ({e}); use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise ValueError(f"device={device!r}: {why} (torch {torch.__version__}); use device='cpu'")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"device={device!r}: there are {torch.cuda.device_count()} CUDA devices")
    return dev


def load_folder_components(root: str, dtype: torch.dtype, device, variant: Optional[str] = None,
                           allow_pickle: bool = False) -> Dict[str, Any]:
    """Every component of a diffusers pipeline folder: {name: module | tokenizer | scheduler config dict}.
    Pickled component weights (``*.bin``) are read only with ``allow_pickle=True``."""
    index = read_model_index(root)
    components: Dict[str, Any] = {"_class_name": index.get("_class_name"), "_model_index": index}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library, class_name = spec
        folder = os.path.join(root, name)
        if name == "scheduler":
            components[name] = read_config(folder, "scheduler_config.json")
        elif library == "diffusers":
            components[name] = load_diffusers_model(folder, class_name, dtype, device, variant, allow_pickle)
        elif library == "transformers":
            components[name] = load_transformers_component(folder, class_name, dtype, device, allow_pickle, variant)
        else:
            raise ValueError(f"{root}: component {name!r} comes from {library!r}, which velodiff does not load")
    return components


def load_pipeline_components(path, dtype: torch.dtype, device, *, variant: Optional[str] = None, tokenizer=None,
                             tokenizer_2=None, configs: Optional[Dict[str, Dict[str, Any]]] = None,
                             family: Optional[str] = None, prediction_type: Optional[str] = None,
                             allow_pickle: bool = False) -> Dict[str, Any]:
    """The components of the pipeline at ``path`` (see the module docstring). The single-file options
    (``tokenizer``, ``tokenizer_2``, ``configs``, ``family``, ``prediction_type``; see
    :func:`velodiff.loading.single_file_pipeline.load_single_file_components`) are errors with a folder, which
    carries all of that itself; ``variant`` is an error with a file. ``allow_pickle=True`` lets pickled weights
    (a ``.ckpt`` file, ``.bin`` files in a folder) be read with ``torch.load(weights_only=True)``. ``device`` is
    checked first (:func:`check_device`)."""
    check_device(device)
    path = resolve_model_path(path)
    single = dict(tokenizer=tokenizer, tokenizer_2=tokenizer_2, configs=configs, family=family,
                  prediction_type=prediction_type)
    if os.path.isfile(path):
        if variant is not None:
            raise ValueError(f"variant={variant!r} selects weight files inside a folder; {path} is a file")
        components = load_single_file_components(path, dtype, device, allow_pickle=allow_pickle, **single)
    elif os.path.isdir(path):
        given = [name for name, value in single.items() if value is not None]
        if given:
            raise ValueError(f"{', '.join(given)}: only for single-file checkpoints; {path} is a diffusers "
                             "folder, which carries its own tokenizers, configs and scheduler")
        components = load_folder_components(path, dtype, device, variant, allow_pickle)
    else:
        raise FileNotFoundError(f"{path} is neither a folder nor a file; velodiff loads diffusers pipeline "
                                "folders (model_index.json plus component subfolders) and SD1/SD2/SDXL "
                                "single-file checkpoints (.safetensors)")
    components["_path"] = path
    return components
