"""LoRA files as users have them, read into one form: per target layer, the factors and the alpha / rank factor.

Formats (a file may hold several components; keys are matched to the pipeline's own module names):

    diffusers / PEFT   ``unet.<module>.lora_A.weight`` [r, K] and ``.lora_B.weight`` [N, r] (``transformer.``,
                       ``text_encoder.``, ``text_encoder_2.`` likewise; no prefix or ``base_model.model.``: the
                       denoiser), optional ``<module>.alpha``; the older diffusers spellings ``<module>.lora.down`` /
                       ``.lora.up`` and attention processors' ``<attn>.processor.to_q_lora.down`` (to_q, to_k, to_v,
                       to_out) are read too
    kohya              ``lora_unet_<module with _ for .>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``;
                       ``lora_te_`` / ``lora_te1_`` (text_encoder) and ``lora_te2_`` (text_encoder_2); UNet modules
                       by their diffusers names or by the original (SGM) UNet's, as kohya's SDXL LoRAs name them
                       (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``, ``..._in_layers_2``)
    LyCORIS LoCon      kohya names on convolutions: down [r, Cin, kh, kw], up [Cout, r, 1, 1]

The update of a layer is strength * (alpha / r) * up @ down (alpha defaults to r). Unknown keys raise an error that
lists them (``strict=False``: a warning, and they are skipped); so do LyCORIS variants that are not low-rank
products (LoHa ``hada_*``, LoKr ``lokr_*``, LoCon's Tucker ``lora_mid``).
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Dict, Mapping, Optional, Tuple

import torch
from torch import nn

#: pipeline components a LoRA can target, with the prefixes of the diffusers / PEFT format
COMPONENT_PREFIXES = (("unet.", "unet"), ("transformer.", "transformer"), ("text_encoder.", "text_encoder"),
                      ("text_encoder_2.", "text_encoder_2"))
KOHYA_PREFIXES = (("lora_unet_", None), ("lora_te1_", "text_encoder"), ("lora_te2_", "text_encoder_2"),
                  ("lora_te_", "text_encoder"), ("lora_transformer_", None))
_UNSUPPORTED = ("hada_", "lokr_", "lora_mid")
_PROCESSOR = re.compile(r"^(?P<attn>.*)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight$")


class LoraFormatError(ValueError):
    """A LoRA file whose keys do not fit the pipeline: unknown keys, missing halves, wrong shapes."""


@dataclass
class LoraFactors:
    """One layer's adapter: ``down`` [r, K] (a linear layer) or [r, Cin, kh, kw] (a convolution), ``up`` [N, r]
    or [Cout, r, 1, 1], ``factor`` = alpha / r."""

    down: torch.Tensor
    up: torch.Tensor
    factor: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _targets(module: nn.Module) -> Dict[str, str]:
    """kohya's flattened names (``.`` -> ``_``) of every module -> its qualified name; for a UNet also the names
    of the original (SGM / LDM) UNet layout, which kohya's SDXL LoRAs use (``input_blocks_4_1_...``)."""
    names = {name.replace(".", "_"): name for name, _ in module.named_modules() if name}
    for original, name in _sgm_names(module).items():
        names.setdefault(original.replace(".", "_"), name)
    return names


def _sgm_names(module: nn.Module) -> Dict[str, str]:
    """original UNet layout name -> diffusers module name, for every module of a UNet (empty for other models)."""
    config = getattr(module, "config", None)
    if not isinstance(config, Mapping) or "down_block_types" not in config or "up_block_types" not in config:
        return {}
    from velodiff.loading.errors import CheckpointError
    from velodiff.loading.keymap_unet import unet_prefix_pairs
    try:
        pairs = unet_prefix_pairs(config)
    except (CheckpointError, KeyError):
        return {}
    out = {}
    for name, _ in module.named_modules():
        hits = [(orig, diff, renames) for orig, diff, renames in pairs if name == diff or name.startswith(diff + ".")]
        if not hits:
            continue
        orig, diff, renames = max(hits, key=lambda hit: len(hit[1]))
        rest = name[len(diff) + 1:]
        for old, new in renames.items():  # e.g. conv1 -> in_layers.2
            if rest == new or rest.startswith(new + "."):
                rest = old + rest[len(new):]
                break
        out[f"{orig}.{rest}" if rest else orig] = name
    return out


def _split_key(key: str) -> Optional[Tuple[str, str]]:
    """(module path with its format prefix, part) for a LoRA factor key, part in down / up / alpha; None otherwise."""
    m = _PROCESSOR.match(key)
    if m:
        proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
        return f"{m['attn']}.{proj}", m["part"]
    for suffix, part in ((".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora_down.weight", "down"),
                         (".lora_up.weight", "up"), (".lora.down.weight", "down"), (".lora.up.weight", "up"),
                         (".alpha", "alpha")):
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return None


def _resolve(path: str, components: Mapping[str, nn.Module], denoiser: str,
             kohya_maps: Dict[str, Dict[str, str]]) -> Optional[Tuple[str, str]]:
    """(component, module name) of a factor's module path in any of the formats, or None."""
    for prefix, component in KOHYA_PREFIXES:
        if path.startswith(prefix):
            component = component or denoiser
            if component not in components:
                return None
            if component not in kohya_maps:
                kohya_maps[component] = _targets(components[component])
            name = kohya_maps[component].get(path[len(prefix):])
            return (component, name) if name is not None else None
    for prefix, component in COMPONENT_PREFIXES + (("base_model.model.", denoiser),):
        if path.startswith(prefix):
            return (component, path[len(prefix):]) if component in components else None
    return (denoiser, path)


def parse_lora(state: Mapping[str, torch.Tensor], components: Mapping[str, nn.Module], denoiser: str,
               strict: bool = True) -> Dict[Tuple[str, str], LoraFactors]:
    """The adapters of a LoRA state dict: (component, module name) -> :class:`LoraFactors`, for a pipeline whose
    targetable ``components`` are given by name (``denoiser``: the name of its unet / transformer). Raises
    :class:`LoraFormatError` on keys that fit no format or no module (``strict=False``: warns and skips them)."""
    parts: Dict[Tuple[str, str], Dict[str, torch.Tensor]] = {}
    unknown, unsupported = [], []
    kohya_maps: Dict[str, Dict[str, str]] = {}
    for key, tensor in state.items():
        if any(u in key for u in _UNSUPPORTED):
            unsupported.append(key)
            continue
        split = _split_key(key)
        target = _resolve(split[0], components, denoiser, kohya_maps) if split else None
        if target is None:
            unknown.append(key)
            continue
        parts.setdefault(target, {})[split[1]] = tensor
    if unsupported:
        raise LoraFormatError(f"{len(unsupported)} keys of LyCORIS variants that are not low-rank products (LoHa, "
                              f"LoKr, LoCon's Tucker lora_mid) are not supported, e.g. {unsupported[:3]}")
    out: Dict[Tuple[str, str], LoraFactors] = {}
    for (component, name), found in parts.items():
        try:
            module = components[component].get_submodule(name)
        except AttributeError:
            unknown += [f"{component}.{name}"]
            continue
        if "down" not in found or "up" not in found:
            raise LoraFormatError(f"LoRA for {component}.{name} has only its {sorted(found)} factor(s)")
        down, up = found["down"], found["up"]
        r = down.shape[0]
        _check_shapes(component, name, module, down, up)
        alpha = float(found["alpha"]) if "alpha" in found else float(r)
        out[(component, name)] = LoraFactors(down, up, alpha / r)
    if unknown:
        message = (f"{len(unknown)} LoRA keys match no layer of this pipeline ({', '.join(components)}), e.g. "
                   f"{unknown[:4]}")
        if strict:
            raise LoraFormatError(message + "; pass strict=False to skip them")
        warnings.warn(message + "; skipped", stacklevel=3)
    if not out:
        raise LoraFormatError("the file holds no LoRA factors for this pipeline")
    return out


def _check_shapes(component: str, name: str, module: nn.Module, down: torch.Tensor, up: torch.Tensor) -> None:
    where = f"LoRA for {component}.{name}"
    in_f, out_f = _io_features(module)
    r = down.shape[0]
    if isinstance(module, nn.Conv2d) or getattr(module, "geometry", None) is not None:
        kh, kw = module.kernel_size if isinstance(module, nn.Conv2d) else module.geometry["kernel_size"]
        cin = module.in_channels if isinstance(module, nn.Conv2d) else module.geometry["in_channels"]
        ok_down = tuple(down.shape) in ((r, cin, kh, kw), (r, cin * kh * kw))
    else:
        ok_down = down.dim() == 2 or (down.dim() == 4 and tuple(down.shape[2:]) == (1, 1))
        ok_down = ok_down and down.reshape(r, -1).shape[1] == in_f
    if not ok_down or up.reshape(up.shape[0], -1).shape != (out_f, r):
        raise LoraFormatError(f"{where}: down {tuple(down.shape)} / up {tuple(up.shape)} do not fit a "
                              f"{type(module).__name__} of {in_f} -> {out_f} features")


def _io_features(module: nn.Module) -> Tuple[int, int]:
    if isinstance(module, nn.Conv2d):
        return module.in_channels * module.kernel_size[0] * module.kernel_size[1], module.out_channels
    return module.in_features, module.out_features


def lora_components(pipe) -> Tuple[Dict[str, nn.Module], str]:
    """(targetable components by name, the denoiser's name) of a pipeline."""
    comps = {n: getattr(pipe, n) for n in ("unet", "transformer", "text_encoder", "text_encoder_2")
             if isinstance(getattr(pipe, n, None), nn.Module)}
    denoiser = "unet" if "unet" in comps else "transformer"
    if denoiser not in comps:
        raise ValueError(f"{type(pipe).__name__} has no unet or transformer for a LoRA")
    return comps, denoiser


