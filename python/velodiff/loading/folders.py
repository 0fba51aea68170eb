"""diffusers folder conventions: where a component's weights live, and the pipeline's model_index.json."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Union

import torch

from velodiff.loading.errors import CheckpointError, MissingFileError, list_keys
from velodiff.loading.pickle_guard import read_checkpoint, refuse_pickle

#: weight file stems diffusers (models) and transformers (text encoders) write, in order of preference
WEIGHT_STEMS = ("diffusion_pytorch_model", "model")
PICKLE_NAMES = ("diffusion_pytorch_model.bin", "pytorch_model.bin")


def _with_variant(name: str, variant: Optional[str]) -> str:
    """diffusers' variant naming: the variant goes before the last suffix (``x.fp16.safetensors``,
    ``x.safetensors.index.fp16.json``)."""
    if not variant:
        return name
    stem, ext = name.rsplit(".", 1)
    return f"{stem}.{variant}.{ext}"


def _index_files(index_path: str) -> List[str]:
    try:
        with open(index_path) as f:
            index = json.load(f)
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path!r}: not a valid shard index ({e})") from e
    folder = os.path.dirname(index_path)
    files = []
    for shard in dict.fromkeys(weight_map.values()):
        p = os.path.join(folder, shard)
        if not os.path.isfile(p):
            keys = [k for k, v in weight_map.items() if v == shard]
            raise CheckpointError(f"{index_path!r}: shard {shard!r} (holding {list_keys(keys)}) is missing")
        files.append(p)
    return files


def find_weights(folder: Union[str, os.PathLike], *, variant: Optional[str] = None,
                 allow_pickle: bool = False) -> List[str]:
    """The weight files of one diffusers/transformers component folder (e.g. ``pipe/unet``).

    Looks for ``diffusion_pytorch_model[.variant].safetensors``, ``model[.variant].safetensors`` and their
    sharded forms (``*.safetensors.index[.variant].json``, all shards returned). Pickled ``*.bin`` files are
    returned only with ``allow_pickle=True``; otherwise their presence gives the pickle refusal message.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder!r}: not a folder")
    for stem in WEIGHT_STEMS:
        single = os.path.join(folder, _with_variant(f"{stem}.safetensors", variant))
        if os.path.isfile(single):
            return [single]
        index = os.path.join(folder, _with_variant(f"{stem}.safetensors.index.json", variant))
        if os.path.isfile(index):
            return _index_files(index)
    for name in PICKLE_NAMES:
        p = os.path.join(folder, _with_variant(name, variant))
        if os.path.isfile(p):
            if not allow_pickle:
                refuse_pickle(p)
            return [p]
    present = sorted(os.listdir(folder))
    hint = ""
    if variant is None and any(".fp16." in f or ".bf16." in f for f in present):
        hint = " (a variant is present: pass variant='fp16' or 'bf16')"
    raise CheckpointError(
        f"{folder!r}: no weights found; looked for "
        f"{', '.join(_with_variant(s + '.safetensors', variant) for s in WEIGHT_STEMS)} and their sharded "
        f"'.safetensors.index.json' forms; the folder holds {present[:10]}{hint}")


def read_component(folder: Union[str, os.PathLike], *, dtype: Optional[torch.dtype] = None,
                   device: Union[str, torch.device] = "cpu", variant: Optional[str] = None,
                   allow_pickle: bool = False) -> Dict[str, torch.Tensor]:
    """All weights of one component folder, merged across shards (a key in two shards is an error)."""
    out: Dict[str, torch.Tensor] = {}
    for path in find_weights(folder, variant=variant, allow_pickle=allow_pickle):
        part = read_checkpoint(path, dtype=dtype, device=device, allow_pickle=allow_pickle)
        dup = out.keys() & part.keys()
        if dup:
            raise CheckpointError(f"{path!r}: key(s) already read from another shard: {list_keys(dup)}")
        out.update(part)
    return out


def read_config(folder: Union[str, os.PathLike], name: str = "config.json") -> dict:
    """A component's ``config.json`` (or ``scheduler_config.json``) as a dict."""
    path = os.path.join(os.fspath(folder), name)
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise MissingFileError(f"{path!r} does not exist") from None
    except OSError as e:
        raise CheckpointError(f"{path!r}: cannot read the component config ({e})") from e
    except ValueError as e:
        raise CheckpointError(f"{path!r}: not valid JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path!r}: a JSON object was expected")
    return cfg


def read_model_index(folder: Union[str, os.PathLike]) -> Dict[str, object]:
    """A diffusers pipeline folder's ``model_index.json``.

    Returns the whole dict: ``_class_name`` (the pipeline class), ``_diffusers_version``, and one entry
    per component, ``name -> [library, class name]`` (``[null, null]`` for an absent optional component),
    and any pipeline settings saved beside them (``requires_safety_checker``, ...).
    """
    folder = os.fspath(folder)
    path = os.path.join(folder, "model_index.json")
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder!r}: not a folder (a diffusers pipeline folder was expected)")
    if not os.path.isfile(path):
        raise MissingFileError(
            f"{folder!r}: not a diffusers pipeline folder (no model_index.json). A pipeline folder holds "
            "model_index.json plus one subfolder per component (unet/, vae/, text_encoder/, ...); for a "
            "single-file checkpoint pass the file itself.")
    idx = read_config(folder, "model_index.json")
    for name, value in idx.items():
        if name.startswith("_"):
            continue
        if not isinstance(value, list):
            continue  # a pipeline setting (requires_safety_checker, force_zeros_for_empty_prompt, ...)
        if not (len(value) == 2 and all(v is None or isinstance(v, str) for v in value)):
            raise CheckpointError(f"{path!r}, key {name!r}: expected [library, class name], found {value!r}")
    return idx


def pipeline_components(index: Dict[str, object]) -> Dict[str, List[str]]:
    """The present components of a model index: ``name -> [library, class name]`` (skips null entries)."""
    return {k: v for k, v in index.items()
            if not k.startswith("_") and isinstance(v, list) and v[0] is not None and v[1] is not None}
