"""Which model family a single-file checkpoint holds, from its key names (and one shape where needed)."""
from __future__ import annotations

from typing import Iterable, Mapping, Optional, Sequence, Union

from velodiff.loading.errors import CheckpointError, list_keys

FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner", "dit", "pixart")

#: cross-attention context width of each SD family's UNet (the text embedding width)
CONTEXT_DIMS = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl_refiner"}


def _shape(value) -> Optional[Sequence[int]]:
    if value is None:
        return None
    return tuple(value.shape) if hasattr(value, "shape") else tuple(value)


def detect_family(state_dict_keys: Union[Mapping, Iterable[str]], *, source: str = "<checkpoint>") -> str:
    """The family of an original (CompVis LDM / Stability SGM / DiT / PixArt) single-file checkpoint.

    ``state_dict_keys`` is a state dict, a mapping of key -> shape, or just the keys. Returns one of
    :data:`FAMILIES`. The text-encoder prefixes decide first (``cond_stage_model.transformer`` = SD1 CLIP-L,
    ``cond_stage_model.model`` = SD2 OpenCLIP-H, ``conditioner.embedders.1.model`` = SDXL bigG,
    ``conditioner.embedders.0.model`` alone = the SDXL refiner); for a UNet-only file, the width of
    ``attn2.to_k`` (768 / 1024 / 2048 / 1280) does. Raises :class:`CheckpointError` naming the file when
    nothing fits (including a diffusers-format state dict, which needs no conversion).
    """
    shapes = state_dict_keys if isinstance(state_dict_keys, Mapping) else None
    keys = list(state_dict_keys.keys() if shapes is not None else state_dict_keys)
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    if has("model.diffusion_model."):
        if has("conditioner.embedders.1.model."):
            return "sdxl"
        if has("conditioner.embedders.0.model."):
            return "sdxl_refiner"
        if has("cond_stage_model.model."):
            return "sd2"
        if has("cond_stage_model.transformer."):
            return "sd1"
        if shapes is not None:
            for k in keys:
                if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight"):
                    s = _shape(shapes[k])
                    if s and s[-1] in CONTEXT_DIMS:
                        return CONTEXT_DIMS[s[-1]]
                    break
        if has("model.diffusion_model.label_emb."):
            return "sdxl"
        if has("model.diffusion_model.input_blocks."):
            return "sd1"  # diffusers' own default for an LDM UNet it cannot place
    if has("t_block.") and has("blocks.0.scale_shift_table"):
        return "pixart"
    if has("y_embedder.embedding_table") and has("blocks.0.adaLN_modulation."):
        return "dit"
    if has("down_blocks.") or has("transformer_blocks.") or has("unet."):
        raise CheckpointError(f"{source!r}: this is a diffusers-format state dict (keys like "
                              f"{list_keys([k for k in keys if '_blocks.' in k], 2)}); load it as a diffusers "
                              "component, no conversion needed")
    raise CheckpointError(f"{source!r}: not a recognised SD1/SD2/SDXL/DiT/PixArt single-file checkpoint; "
                          f"its keys start {list_keys(keys[:5], 5)}")
