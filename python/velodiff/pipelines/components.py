"""Loading the components of a diffusers pipeline folder into velodiff's own models.

``model_index.json`` names each component's library and class; diffusers classes map to velodiff modules with
the same parameter names (loaded from safetensors by :mod:`velodiff.loading`), transformers classes (text
encoders, tokenizers) load with transformers from the local folder, never from a hub.

:func:`load_single_file_components` gives the same components from an SD1 / SD2 / SDXL single-file checkpoint,
converted in memory component by component (tokenizers come from the caller: single files hold none).
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
    from velodiff.quant.checkpoint import is_quantized_folder, load_quantized_model

    if is_quantized_folder(folder):  # written by velodiff quantize (velodiff/quant/checkpoint.py)
        return load_quantized_model(folder, class_name, dtype, device)
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


# --------------------------------------------------------------------------------------------------------------
# Single-file checkpoints (original CompVis LDM / Stability SGM layout)
# --------------------------------------------------------------------------------------------------------------

#: families whose single files hold a whole pipeline (UNet, VAE, text encoders)
SINGLE_FILE_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
#: the keys ``configs=`` accepts
CONFIG_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
#: number of micro-conditioning values in the SDXL ``time_ids`` (base: sizes + crop; refiner: + aesthetic score)
_TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}
_CLIP_CLASSES = ("CLIPTextModel", "CLIPTextModelWithProjection")


class CheckpointSource:
    """The keys and shapes of one single-file checkpoint, and reads of parts of it.

    safetensors: only the header is read up front; :meth:`read` reads the requested tensors one at a time
    straight into ``dtype`` / ``device``. Pickled files (only with ``allow_pickle=True``): read once through
    ``torch.load(weights_only=True, mmap=True)``; :meth:`read` hands entries over and forgets them.
    """

    def __init__(self, path: str, dtype: torch.dtype, device, allow_pickle: bool = False):
        from velodiff.loading import is_pickle_path, read_checkpoint, read_safetensors_header

        self.path, self.dtype, self.device = path, dtype, device
        self._tensors: Optional[Dict[str, torch.Tensor]] = None
        if is_pickle_path(path):
            self._tensors = read_checkpoint(path, dtype=dtype, device=device, allow_pickle=allow_pickle)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            header, _, _ = read_safetensors_header(path)
            self.shapes = {k: info.shape for k, info in header.items()}

    def keys_under(self, prefix: str):
        return [k for k in self.shapes if k.startswith(prefix)]

    def read(self, keys) -> Dict[str, torch.Tensor]:
        from velodiff.loading import read_safetensors

        if self._tensors is not None:
            return {k: self._tensors.pop(k) for k in keys}
        return read_safetensors(self.path, dtype=self.dtype, device=self.device, keys=keys)


def text_encoder_from_state_dict(config: Dict[str, Any], state: Dict[str, torch.Tensor], *, source: str):
    """A transformers CLIP text encoder built from a CLIPTextConfig dict on the meta device, taking
    ``state``'s tensors (transformers' classic or flattened names) without a copy."""
    import transformers

    from velodiff.loading import CheckpointError, fit_clip_keys, load_state_dict_into

    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    if arch not in _CLIP_CLASSES:
        raise ValueError(f"{source}: text encoder architecture {arch!r} is not supported here; "
                         f"supported: {_CLIP_CLASSES}")
    cfg = transformers.CLIPTextConfig.from_dict({k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = getattr(transformers, arch)(cfg)
    load_state_dict_into(model, fit_clip_keys(state, model), source=source, strict=True, assign=True)
    device = next(iter(state.values())).device
    # Non-persistent buffers are in no state dict: CLIP's only one is the position-id row.
    for name, buf in list(model.named_buffers()):
        if not buf.is_meta:
            continue
        owner_name, _, attr = name.rpartition(".")
        if attr != "position_ids":
            raise CheckpointError(f"{source}: {arch} buffer {name!r} is not in the weights and velodiff does not "
                                  "know how to rebuild it")
        owner = model.get_submodule(owner_name)
        setattr(owner, attr, torch.arange(buf.shape[-1], device=device).expand(tuple(buf.shape)))
    return model.eval().requires_grad_(False)


def load_tokenizer(value, name: str):
    """``value`` is a tokenizer object (returned as is) or a folder: a tokenizer folder, or a diffusers pipeline
    folder whose ``name`` subfolder (``tokenizer`` / ``tokenizer_2``) is taken. Loaded locally, never downloaded."""
    import transformers

    if not isinstance(value, (str, os.PathLike)):
        if not callable(value):
            raise TypeError(f"{name} must be a tokenizer object or a folder path, got {type(value).__name__}")
        return value
    folder = os.fspath(value)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{name}={folder!r} is not a folder (pass a tokenizer folder, a diffusers "
                                "pipeline folder, or a tokenizer object)")
    if os.path.isfile(os.path.join(folder, "model_index.json")):
        sub = os.path.join(folder, name)
        if not os.path.isdir(sub):
            raise FileNotFoundError(f"{name}={folder!r} is a diffusers pipeline folder without a {name}/ subfolder")
        folder = sub
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{name}={folder!r}: no tokenizer could be loaded from this folder: {e}") from e


def _resolve_tokenizers(needed, given: Dict[str, Any], path: str, family: str) -> Dict[str, Any]:
    """Tokenizers for the text encoders present; a pipeline folder given as ``tokenizer`` also supplies
    ``tokenizer_2``. Raises a ValueError explaining what to pass when one is missing."""
    root = given.get("tokenizer")
    pipeline_root = (isinstance(root, (str, os.PathLike)) and
                     os.path.isfile(os.path.join(os.fspath(root), "model_index.json")))
    out, missing = {}, []
    for name in needed:
        value = given.get(name)
        if value is None and pipeline_root and os.path.isdir(os.path.join(os.fspath(root), name)):
            value = root
        if value is None:
            missing.append(name)
        else:
            out[name] = load_tokenizer(value, name)
    if missing:
        args = ", ".join(f"{n}=..." for n in missing)
        raise ValueError(
            f"{path!r} is a single-file {family} checkpoint: it holds weights but no tokenizer, and velodiff "
            f"downloads nothing. Pass {args} to Pipeline.from_pretrained: a tokenizer object, a tokenizer "
            f"folder, or a diffusers {family} pipeline folder (its {'/ and '.join(needed)}/ subfolders are "
            "used), for example the tokenizer/ folder of any local diffusers SD pipeline of this family.")
    return out


def _check_configs(configs) -> Dict[str, Dict[str, Any]]:
    if configs is None:
        return {}
    if not isinstance(configs, dict):
        raise TypeError(f"configs must be a dict {{component: {{key: value}}}}, got {type(configs).__name__}")
    out = {}
    for name, value in configs.items():
        if name not in CONFIG_NAMES:
            raise ValueError(f"configs: unknown component {name!r}; known: {', '.join(CONFIG_NAMES)}")
        if not isinstance(value, dict):
            raise TypeError(f"configs[{name!r}] must be a dict of config overrides, got {type(value).__name__}")
        out[name] = dict(value)
    return out


def load_single_file_components(path: str, dtype: torch.dtype, device, *, family: Optional[str] = None,
                                configs: Optional[Dict[str, Dict[str, Any]]] = None,
                                prediction_type: Optional[str] = None, tokenizer=None, tokenizer_2=None,
                                allow_pickle: bool = False) -> Dict[str, Any]:
    """Every component of an SD1 / SD2 / SDXL single-file checkpoint, as :func:`load_components` returns them.

    Component by component, only that component's tensors are read (into ``dtype`` / ``device``), renamed to
    diffusers / transformers names and handed to a model built on the meta device, so peak memory stays near
    the size of the loaded pipeline. No temporary folder is written.

    Configs: the family default (:mod:`velodiff.loading.configs`), with the structure read from the weights —
    UNet channels, levels, block types, layers per block, transformer depth, cross-attention width, linear vs
    conv projections, in/out channels, SDXL add-embedding width and (from it and ``text_encoder_2``'s
    projection width) ``addition_time_embed_dim``; VAE channels, levels and latent channels; text-encoder
    width, depth, MLP width, vocabulary, positions, projection width. Not in the weights, so from the family
    default unless ``configs`` says otherwise: UNet ``attention_head_dim``, ``norm_num_groups``,
    ``upcast_attention``, ``sample_size``; VAE ``norm_num_groups``, ``scaling_factor``, ``force_upcast``;
    text-encoder ``num_attention_heads`` (width / 64 when the width is not the family's), ``hidden_act``,
    ``layer_norm_eps``; the whole scheduler config, including ``prediction_type`` (SD 2.x 768-v files need
    ``prediction_type="v_prediction"``). ``configs`` = ``{"unet" | "vae" | "text_encoder" | "text_encoder_2"
    | "scheduler": {key: value}}`` overrides fields of those configs.
    """
    from velodiff.loading import (TEXT_ENCODER_PREFIXES, CheckpointError, convert_text_encoder, convert_unet,
                                  convert_vae, default_scheduler_config, detect_family, infer_text_encoder_config,
                                  infer_unet_config, infer_vae_config)
    from velodiff.loading.configs import PIPELINE_CLASSES
    from velodiff.loading.keymap_unet import UNET_PREFIX
    from velodiff.loading.keymap_vae import VAE_PREFIXES

    configs = _check_configs(configs)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    source = CheckpointSource(path, dtype, device, allow_pickle)
    family = family or detect_family(source.shapes, source=path)
    if family not in SINGLE_FILE_FAMILIES:
        raise CheckpointError(f"{path!r}: a {family!r} single file holds only its denoiser, not a pipeline; "
                              f"Pipeline.from_pretrained builds pipelines from {SINGLE_FILE_FAMILIES} single files")
    encoders = {name: spec for name, spec in TEXT_ENCODER_PREFIXES[family].items() if source.keys_under(spec[0])}
    unet_keys = source.keys_under(UNET_PREFIX)
    vae_prefix = next((p for p in VAE_PREFIXES if source.keys_under(p)), None)
    missing = [n for n, ok in (("unet", unet_keys), ("vae", vae_prefix)) if not ok]
    missing += [n for n in TEXT_ENCODER_PREFIXES[family] if n not in encoders]
    if missing:
        raise CheckpointError(f"{path!r}: this {family} single file has no {', '.join(missing)} weights, so it is "
                              "not a whole pipeline; load the parts it has with velodiff.loading instead")
    tokenizers = _resolve_tokenizers(["tokenizer" + n[len("text_encoder"):] for n in encoders],
                                     {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}, path, family)

    index: Dict[str, Any] = {"_class_name": PIPELINE_CLASSES[family]}
    components: Dict[str, Any] = {"_class_name": index["_class_name"], "_model_index": index,
                                  "_single_file": path, "_family": family}
    for name, (prefix, kind) in encoders.items():
        sd = source.read(source.keys_under(prefix))
        cfg = infer_text_encoder_config(sd, family, name, prefix, kind, configs.get(name), source=path)
        state = convert_text_encoder(sd, cfg, prefix=prefix, kind=kind, source=path)
        del sd
        components[name] = text_encoder_from_state_dict(cfg, state, source=f"{path} [{name}]")
        del state
        tok_name = "tokenizer" + name[len("text_encoder"):]
        components[tok_name] = tokenizers[tok_name]
        index[name] = ["transformers", cfg["architectures"][0]]
        index[tok_name] = ["transformers", type(tokenizers[tok_name]).__name__]

    sd = source.read(unet_keys)
    unet_overrides = dict(configs.get("unet") or {})
    label = sd.get(UNET_PREFIX + "label_emb.0.0.weight")
    if (family in _TIME_IDS and label is not None and "text_encoder_2" in components
            and "addition_time_embed_dim" not in unet_overrides):
        # add-embedding input = pooled text embedding + n_time_ids * addition_time_embed_dim
        extra = int(label.shape[1]) - int(components["text_encoder_2"].config.projection_dim)
        if extra > 0 and extra % _TIME_IDS[family] == 0:
            unet_overrides["addition_time_embed_dim"] = extra // _TIME_IDS[family]
    cfg = infer_unet_config(sd, family, unet_overrides, source=path)
    state = convert_unet(sd, cfg, source=path)
    del sd, label
    components["unet"] = model_from_state_dict(_import(VELODIFF_MODELS["UNet2DConditionModel"]), cfg, state,
                                               source=f"{path} [unet]")
    del state
    index["unet"] = ["diffusers", "UNet2DConditionModel"]

    sd = source.read(source.keys_under(vae_prefix))
    cfg = infer_vae_config(sd, family, configs.get("vae"), source=path)
    state = convert_vae(sd, cfg, source=path)
    del sd
    components["vae"] = model_from_state_dict(_import(VELODIFF_MODELS["AutoencoderKL"]), cfg, state,
                                              source=f"{path} [vae]")
    del state
    index["vae"] = ["diffusers", "AutoencoderKL"]

    sched = default_scheduler_config(family)
    sched.update(configs.get("scheduler") or {})
    if prediction_type is not None:
        sched["prediction_type"] = prediction_type
    components["scheduler"] = sched
    index["scheduler"] = ["diffusers", sched["_class_name"]]
    return components
