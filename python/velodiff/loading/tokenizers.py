"""Tokenizers for single-file checkpoints, which hold none: given by the caller as a tokenizer object, a
tokenizer folder or a diffusers pipeline folder (its ``tokenizer/`` and ``tokenizer_2/``). Loaded locally, never
downloaded: CLIP tokenizers through the ``tokenizers`` library when that reproduces transformers' tokenizer exactly
(:mod:`velodiff.loading.fast_tokenizer`), anything else with transformers. One resolution for loading a single file
and for converting one to a folder."""
from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Sequence

from velodiff.loading.builtin import resolve_model_path
from velodiff.loading.fast_tokenizer import NotReproducible, load_clip_tokenizer


def tokenizer_from_folder(folder: str):
    """The tokenizer of a local tokenizer folder: velodiff's :class:`~velodiff.loading.fast_tokenizer.CLIPTokenizer`
    where it is exactly transformers' ``CLIPTokenizer`` (no transformers import), otherwise transformers'
    ``AutoTokenizer`` from the folder's own files."""
    try:
        return load_clip_tokenizer(folder)
    except NotReproducible:
        pass
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)


def load_tokenizer(value, name: str):
    """``value`` is a tokenizer object (returned as is) or a folder: a tokenizer folder, or a diffusers pipeline
    folder (or a built-in model's name) whose ``name`` subfolder (``tokenizer`` / ``tokenizer_2``) is taken."""
    if not isinstance(value, (str, os.PathLike)):
        if not callable(value):
            raise TypeError(f"{name} must be a tokenizer object or a folder path, got {type(value).__name__}")
        return value
    folder = resolve_model_path(value)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{name}={folder!r} is not a folder (pass a tokenizer folder, a diffusers "
                                "pipeline folder, or a tokenizer object)")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"{name}={folder!r} is a diffusers pipeline folder without a {name}/ subfolder")
        folder = sub
    try:
        return tokenizer_from_folder(folder)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}={folder!r}: no tokenizer could be loaded from this folder: {e}") from e


def tokenizer_name(text_encoder: str) -> str:
    """The tokenizer component that goes with a text encoder: ``text_encoder_2`` -> ``tokenizer_2``."""
    return "tokenizer" + text_encoder[len("text_encoder"):]


def tokenizer_sources(needed: Sequence[str], given: Mapping[str, Any]) -> Dict[str, Any]:
    """``{tokenizer name: what the caller gave for it}`` for the ``needed`` names, None where nothing was given;
    a pipeline folder given as ``tokenizer`` also supplies ``tokenizer_2`` when it has that subfolder."""
    root = given.get("tokenizer")
    if isinstance(root, (str, os.PathLike)):
        root = resolve_model_path(root)
    pipeline_root = isinstance(root, str) and os.path.isfile(os.path.join(root, "model_index.json"))
    out = {}
    for name in needed:
        value = given.get(name)
        if value is None and pipeline_root and os.path.isdir(os.path.join(root, name)):
            value = root
        out[name] = value
    return out


def resolve_tokenizers(needed: Sequence[str], given: Mapping[str, Any], path: str, family: str) -> Dict[str, Any]:
    """The loaded tokenizers ``needed`` by the text encoders of the single file ``path`` (see
    :func:`tokenizer_sources`). Raises a ValueError explaining what to pass when one is missing."""
    sources = tokenizer_sources(needed, given)
    missing = [name for name, value in sources.items() if value is None]
    if missing:
        args = ", ".join(f"{n}=..." for n in missing)
        raise ValueError(
            f"{path!r} is a single-file {family} checkpoint: it holds weights but no tokenizer, and velodiff "
            f"downloads nothing. Pass {args} to Pipeline.from_pretrained: a tokenizer object, a tokenizer "
            f"folder, or a diffusers {family} pipeline folder (its {'/ and '.join(needed)}/ subfolders are "
            "used), for example the tokenizer/ folder of any local diffusers SD pipeline of this family.")
    return {name: load_tokenizer(value, name) for name, value in sources.items()}
