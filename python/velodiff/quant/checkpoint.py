"""Quantized checkpoints: a diffusers pipeline folder whose denoiser folder (``unet/`` or ``transformer/``) holds
``config.json`` and ``velodiff_quantized.safetensors`` instead of ``diffusion_pytorch_model.safetensors``.

The safetensors file holds the whole denoiser state dict, with every quantized layer's buffers (``qweight``,
``wscales``, ``smooth``, ``lora_down``, ``lora_up``, ``lora_scales``, ``bias``; see
:mod:`velodiff.quant.linear`) in place of its ``weight`` and ``bias``. Its metadata:

    velodiff_quant_format   "1" (:data:`FORMAT_VERSION`); another value is refused with a clear message
    method                  "svdquant" | "naive-w4a4" | "w8a8" | "fp8" | "fp8-weight-only" | "lowbit-fp" | "lowbit-int"
    model_class             the diffusers class of the denoiser, e.g. "UNet2DConditionModel"
    model_config            JSON of the denoiser's config (a checkpoint only loads into an identical model)
    layers                  JSON {qualified name: {"in", "out", "bits", "rank", "smooth", "bias", "method",
                            "fused_activation", for a convolution "conv": its geometry, and "token_conv" for a
                            1x1 convolution that the model applies to tokens, quantized as a linear layer};
                            FP8 layers (:mod:`velodiff.quant.fp8`): {"in", "out", "bias", "method", "format",
                            "fused_activation"[, "token_conv"]}, their codes stored as F8_E4M3 / F8_E5M2 and
                            their scales in float32 whatever the model dtype; low-bit layers
                            (:mod:`velodiff.quant.lowbit_fp`, methods "lowbit-fp" / "lowbit-int", weight formats with
                            a packed form only): {"in", "out", "bias", "method", "w_format", "a_format" (a format name
                            or null), "learned_rounding", "fused_activation"[, "token_conv"]}, their ``qweight``
                            (uint8 4-bit indices or FP8 codes), ``w_table`` (F8_E4M3 [16], 4-bit formats) and
                            float32 ``wscales``}; the two parts of a split convolution (``split_shortcut``) are
                            layers ``<conv>.first`` / ``<conv>.second`` with "split_of": the channel they split at

``Pipeline.from_pretrained`` loads such a folder like any other: importing this module registers
:func:`load_quantized_model` with :mod:`velodiff.loading.registry` (which imports this module by name on its first
lookup, so loading never imports quant); :func:`load_quantized` puts a quantized file into an existing,
unquantized model of the same architecture.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Dict

import torch
from torch import nn

from velodiff.loading.folders import read_config
from velodiff.loading.output import output_folder
from velodiff.loading.registry import register_folder_loader
from velodiff.loading.safetensors_io import read_safetensors, read_safetensors_header, write_safetensors
from velodiff.loading.state_dict import load_state_dict_into
from velodiff.models.registry import model_class_for
from velodiff.quant.conv import QuantizedConv2d, SplitConv2d, conv_geometry
from velodiff.quant.fp8 import FP8_METHODS, Fp8Linear
from velodiff.quant.linear import QuantizedLinear
from velodiff.quant.lowbit_fp import LOWBIT_METHODS, FpFormat, LowbitFpLinear

#: the layer classes a quantized checkpoint holds
QUANTIZED_LAYERS = (QuantizedLinear, Fp8Linear, LowbitFpLinear)

FORMAT_VERSION = "1"
QUANTIZED_FILE = "velodiff_quantized.safetensors"
#: buffers kept in float32 whatever the model dtype
FLOAT32_BUFFERS = ("smooth", "lora_scales")


class QuantizedCheckpointError(ValueError):
    """A quantized checkpoint that does not fit: unknown format version, another model, missing keys."""


def is_quantized_folder(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, QUANTIZED_FILE))


def _config_dict(model: nn.Module) -> Dict[str, Any]:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def _jsonable(config: Dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True, default=lambda v: list(v) if isinstance(v, tuple) else str(v))


def _layer_spec(module: nn.Module) -> Dict[str, Any]:
    spec = {"conv": module.geometry} if isinstance(module, QuantizedConv2d) else {}
    if getattr(module, "token_conv", False):
        spec["token_conv"] = True  # a 1x1 conv of the unquantized model, applied to tokens as this linear layer
    if isinstance(module, Fp8Linear):
        return {**spec, "in": module.in_features, "out": module.out_features, "bias": module.bias is not None,
                "method": module.method, "format": module.format, "fused_activation": module.fused_activation}
    if isinstance(module, LowbitFpLinear):
        return {**spec, "in": module.in_features, "out": module.out_features, "bias": module.bias is not None,
                "method": module.method, "w_format": module.w_format.name,
                "a_format": module.a_format.name if module.a_format else None,
                "learned_rounding": module.learned_rounding, "fused_activation": module.fused_activation}
    return {**spec, "in": module.in_features, "out": module.out_features, "bits": module.bits,
            "rank": 0 if module.lora_down is None else module.lora_down.shape[1],
            "smooth": module.smooth is not None, "bias": module.bias is not None, "method": module.method,
            "fused_activation": module.fused_activation}


def save_quantized_model(model: nn.Module, path: str, method: str, dtype: torch.dtype = None) -> None:
    """Write ``model`` (a denoiser with QuantizedLinear layers) to the safetensors file ``path``, floating tensors
    cast to ``dtype`` (default: as they are) except the float32 :data:`FLOAT32_BUFFERS`."""
    layers = {name: m for name, m in model.named_modules() if isinstance(m, QUANTIZED_LAYERS)}
    if not layers:
        raise ValueError("the model has no quantized layers; run velodiff.quant.quantize first")
    fake = [f"{name} ({m.w_format.name})" for name, m in layers.items()
            if isinstance(m, LowbitFpLinear) and m.qweight is None]
    if fake:
        raise ValueError(f"{len(fake)} low-bit layers have weight formats without a packed form (only 4-bit formats, "
                         f"e4m3 and e5m2 have one), e.g. {fake[0]}; they are fake-quantized and have no checkpoint: "
                         "quantize the model after loading it instead")
    with_lora = [name for name, m in layers.items() if getattr(m, "loras", None)]
    if with_lora:
        raise ValueError(f"remove the LoRAs from {with_lora[:3]} before saving (a checkpoint stores the quantizer's "
                         "branch only)")
    specs = {name: _layer_spec(m) for name, m in layers.items()}
    for name, m in model.named_modules():
        if isinstance(m, SplitConv2d):  # its two parts are listed as layers `name.first` and `name.second`
            for part in ("first", "second"):
                specs[f"{name}.{part}"]["split_of"] = m.split
    metadata = {"velodiff_quant_format": FORMAT_VERSION, "method": method, "model_class": type(model).__name__,
                "model_config": _jsonable(_config_dict(model)), "layers": json.dumps(specs)}
    state = model.state_dict()
    if dtype is not None:
        keep = _fixed_dtype_keys(layers)
        state = {k: v.to(dtype) if _model_dtype_tensor(k, v, keep) else v for k, v in state.items()}
    write_safetensors(state, path, metadata=metadata)


def _fixed_dtype_keys(layers: Dict[str, Any]) -> set:
    """State-dict keys of quantized layers that keep their dtype whatever the model's: FP8 and low-bit layers'
    float32 scales (their codes and tables are FP8 or uint8, never cast); ``layers`` maps names to modules or to
    checkpoint specs."""
    def per_channel(m):
        return isinstance(m, (Fp8Linear, LowbitFpLinear)) or (
            isinstance(m, dict) and m.get("method") in FP8_METHODS + LOWBIT_METHODS)
    return {f"{name}.wscales" for name, m in layers.items() if per_channel(m)}


def _model_dtype_tensor(key: str, t: torch.Tensor, keep: set) -> bool:
    """Whether a checkpoint tensor follows the model dtype: floating, not FP8 codes, not a float32 buffer."""
    return (t.is_floating_point() and t.element_size() > 1 and key not in keep
            and key.rsplit(".", 1)[-1] not in FLOAT32_BUFFERS)


def save_quantized(pipe, out: str, dtype: torch.dtype = torch.float16, force: bool = False) -> str:
    """Write a quantized pipeline as a folder: the source folder's other files copied (its model_index.json with
    its settings, e.g. ``_velodiff_defaults``, included), the denoiser as ``config.json`` + :data:`QUANTIZED_FILE`
    with floating parts in ``dtype``. The pipeline must come from a folder (convert single files first with
    ``velodiff convert``). ``out`` is written as :mod:`velodiff.loading.output` describes: an existing folder
    is refused unless ``force=True``, and even then only the files written here are replaced; the folder is
    complete or untouched. Returns ``out``."""
    from velodiff.quant import denoiser_of
    quant = getattr(pipe, "quantization", None)
    if not quant:
        raise ValueError("the pipeline is not quantized; run velodiff.quant.quantize(pipe, config) first")
    source = getattr(pipe, "name_or_path", None)
    if not source or not os.path.isfile(os.path.join(source, "model_index.json")):
        raise ValueError(f"save_quantized copies the unquantized components from the pipeline's folder, and this "
                         f"pipeline has none ({source!r}); convert a single file with `velodiff convert` first")
    component, model = denoiser_of(pipe)
    if os.path.abspath(out) == os.path.abspath(source):
        raise ValueError(f"out must differ from the source folder {source}")
    with output_folder(out, force=force) as tmp:
        shutil.copytree(source, tmp, ignore=shutil.ignore_patterns(component), dirs_exist_ok=True)
        target = os.path.join(tmp, component)
        os.makedirs(target)
        shutil.copy(os.path.join(source, component, "config.json"), os.path.join(target, "config.json"))
        save_quantized_model(model, os.path.join(target, QUANTIZED_FILE), quant["method"], dtype)
    return out


def _read_metadata(path: str) -> Dict[str, Any]:
    _, meta, _ = read_safetensors_header(path)
    meta = meta or {}
    version = meta.get("velodiff_quant_format")
    if version is None:
        raise QuantizedCheckpointError(f"{path}: not a velodiff quantized checkpoint (no velodiff_quant_format in "
                                       "its metadata)")
    if version != FORMAT_VERSION:
        raise QuantizedCheckpointError(f"{path}: quantized format version {version!r} is unknown to this velodiff "
                                       f"(it reads version {FORMAT_VERSION}); re-quantize with `velodiff quantize` "
                                       "or upgrade velodiff")
    try:
        return {"method": meta["method"], "model_class": meta["model_class"],
                "model_config": json.loads(meta["model_config"]), "layers": json.loads(meta["layers"])}
    except (KeyError, json.JSONDecodeError) as exc:
        raise QuantizedCheckpointError(f"{path}: damaged quantized-checkpoint metadata ({exc})") from None


def _install_shells(model: nn.Module, layers: Dict[str, Dict[str, Any]], dtype: torch.dtype, path: str) -> None:
    from velodiff.quant import _set_module
    for name, spec in layers.items():
        if "split_of" in spec:
            _install_split_part(model, name, spec, dtype, path)
            continue
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise QuantizedCheckpointError(f"{path}: quantized layer {name!r} does not exist in this "
                                           f"{type(model).__name__}") from None
        conv = spec.get("conv")
        if conv is not None:
            fits = isinstance(old, nn.Conv2d) and conv_geometry(old) == conv and old.out_channels == spec["out"]
        elif spec.get("token_conv"):
            fits = (isinstance(old, nn.Conv2d) and tuple(old.kernel_size) == (1, 1)
                    and (old.in_channels, old.out_channels) == (spec["in"], spec["out"]))
        else:
            fits = isinstance(old, nn.Linear) and (old.in_features, old.out_features) == (spec["in"], spec["out"])
        if not fits:
            raise QuantizedCheckpointError(
                f"{path}: layer {name!r} is a {'conv' if conv else 'linear'} [{spec['out']}, {spec['in']}] in the "
                f"checkpoint but {type(old).__name__}{tuple(getattr(old, 'weight', torch.empty(0)).shape)} here")
        if spec.get("method") in FP8_METHODS + LOWBIT_METHODS:
            with torch.device("meta"):
                shell = _per_channel_shell(spec, dtype, path)
            shell.token_conv = bool(spec.get("token_conv", False))
            _set_module(model, name, shell)
            continue
        shell = _int_shell(spec, dtype)
        shell.token_conv = bool(spec.get("token_conv", False))
        _set_module(model, name, shell)


def _install_split_part(model: nn.Module, name: str, spec: Dict[str, Any], dtype: torch.dtype, path: str) -> None:
    """Install one part (``conv.first`` / ``conv.second``) of a split convolution: the unquantized conv becomes a
    SplitConv2d on its first part, then each part gets its QuantizedConv2d shell."""
    from velodiff.quant import _set_module
    conv_name, _, part = name.rpartition(".")
    try:
        conv = model.get_submodule(conv_name)
    except AttributeError:
        raise QuantizedCheckpointError(f"{path}: split layer {conv_name!r} does not exist in this "
                                       f"{type(model).__name__}") from None
    if not isinstance(conv, SplitConv2d):
        if not (isinstance(conv, nn.Conv2d) and conv.out_channels == spec["out"] and part in ("first", "second")
                and 0 < spec["split_of"] < conv.in_channels):
            raise QuantizedCheckpointError(f"{path}: layer {name!r} is part of a split convolution in the checkpoint "
                                           f"but {conv_name!r} is a {type(conv).__name__} here")
        conv = SplitConv2d(None, None, spec["split_of"])
        _set_module(model, conv_name, conv)
    setattr(conv, part, _int_shell(spec, dtype))


def _int_shell(spec: Dict[str, Any], dtype: torch.dtype) -> QuantizedLinear:
    """An empty QuantizedLinear or QuantizedConv2d (on the meta device) for a checkpoint's layer spec."""
    options = dict(bits=spec["bits"], rank=spec["rank"], smooth=spec["smooth"], bias=spec["bias"], dtype=dtype,
                   method=spec["method"], fused_activation=spec.get("fused_activation", "none"))
    g = spec.get("conv")
    with torch.device("meta"):
        if g is not None:
            return QuantizedConv2d(g["in_channels"], spec["out"], g["kernel_size"], g["stride"], g["padding"],
                                   g["dilation"], **options)
        return QuantizedLinear(spec["in"], spec["out"], **options)


def _per_channel_shell(spec: Dict[str, Any], dtype: torch.dtype, path: str) -> nn.Module:
    """An empty Fp8Linear or LowbitFpLinear for a checkpoint's layer spec."""
    fused = spec.get("fused_activation", "none")
    if spec["method"] in FP8_METHODS:
        return Fp8Linear(spec["in"], spec["out"], bias=spec["bias"], dtype=dtype, method=spec["method"],
                         format=spec["format"], fused_activation=fused)
    try:
        w_format = FpFormat.parse(spec["w_format"])
        a_format = FpFormat.parse(spec["a_format"]) if spec.get("a_format") else None
    except (KeyError, ValueError) as exc:
        raise QuantizedCheckpointError(f"{path}: damaged low-bit layer spec {spec} ({exc})") from None
    return LowbitFpLinear(spec["in"], spec["out"], w_format, a_format, bias=spec["bias"], dtype=dtype,
                          learned_rounding=bool(spec.get("learned_rounding")), method=spec["method"],
                          fused_activation=fused)


def _read_state(path: str, dtype: torch.dtype, device, layers: Dict[str, Dict[str, Any]]) -> Dict[str, torch.Tensor]:
    state = read_safetensors(path, device=device)
    keep = _fixed_dtype_keys(layers)
    for key, t in state.items():
        if _model_dtype_tensor(key, t, keep):
            state[key] = t.to(dtype)
        elif t.is_floating_point() and t.element_size() > 1:
            state[key] = t.float()
    return state


def load_quantized_model(folder: str, class_name: str, dtype: torch.dtype, device) -> nn.Module:
    """Build the denoiser of a quantized folder (used by ``Pipeline.from_pretrained``)."""
    path = os.path.join(folder, QUANTIZED_FILE)
    meta = _read_metadata(path)
    if meta["model_class"] != class_name:
        raise QuantizedCheckpointError(f"{path}: made for a {meta['model_class']}, but the pipeline declares a "
                                       f"{class_name} here")
    config = read_config(folder)
    cls = model_class_for(class_name, config)
    with torch.device("meta"):
        model = cls.from_config(config)
    _check_config(model, meta, path)
    _install_shells(model, meta["layers"], dtype, path)
    load_state_dict_into(model, _read_state(path, dtype, device, meta["layers"]), source=path, strict=True,
                         assign=True)
    return model.eval().requires_grad_(False)


def _check_config(model: nn.Module, meta: Dict[str, Any], path: str) -> None:
    if type(model).__name__ != meta["model_class"]:
        raise QuantizedCheckpointError(f"{path}: made for a {meta['model_class']}, not a {type(model).__name__}")
    mine = json.loads(_jsonable(_config_dict(model)))
    theirs = meta["model_config"]
    diff = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if diff:
        detail = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs model {mine.get(k)!r}" for k in diff[:4])
        raise QuantizedCheckpointError(f"{path}: made for another {meta['model_class']} ({detail})")


def load_quantized(model: nn.Module, path: str) -> nn.Module:
    """Put the quantized checkpoint ``path`` into ``model`` (an unquantized denoiser of the same class and config),
    replacing the listed linear layers in place. Returns ``model``."""
    meta = _read_metadata(path)
    _check_config(model, meta, path)
    param = next(model.parameters())
    _install_shells(model, meta["layers"], param.dtype, path)
    load_state_dict_into(model, _read_state(path, param.dtype, param.device, meta["layers"]), source=path,
                         strict=True, assign=True)
    return model.eval().requires_grad_(False)


register_folder_loader("velodiff-quantized", is_quantized_folder, load_quantized_model)
