"""A diffusers pipeline object -> the velodiff pipeline over the same weights (no copy).

:func:`from_diffusers` assembles the components dict that :func:`velodiff.loading.load_pipeline_components` would
read from the pipeline's folder, but from the live objects: velodiff's models (:mod:`velodiff.models.registry`)
built on the meta device and given the diffusers modules' tensors (:mod:`velodiff.interop.sharing`), velodiff's
CLIP text encoders over transformers' tensors, the tokenizers and any other text encoder (T5) as they are, and the
scheduler's config.
"""
from __future__ import annotations

from typing import Any, Dict

from velodiff.interop.scheduler_config import schedule_config_of
from velodiff.interop.sharing import PIPELINE_DTYPES, check_devices, placement, unwrap
from velodiff.loading.modules import CLIP_CLASSES, model_from_state_dict, text_encoder_from_state_dict
from velodiff.models.registry import model_class_for
from velodiff.pipelines import PIPELINES
from velodiff.pipelines.base import BasePipeline

#: diffusers pipeline class -> the components velodiff's pipeline of that name reads
COMPONENTS = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": ("unet", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2",
                                  "scheduler"),
    "DiTPipeline": ("transformer", "vae", "scheduler"),
    "PixArtAlphaPipeline": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
    "PixArtSigmaPipeline": ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"),
}
MODELS = ("unet", "transformer", "vae")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def pipeline_kind(diffusers_pipe) -> str:
    """The key of :data:`COMPONENTS` for ``diffusers_pipe`` (its diffusers class, or the diffusers class it
    derives from); TypeError naming what is supported otherwise."""
    for cls in type(diffusers_pipe).__mro__:
        if cls.__name__ in COMPONENTS and cls.__module__.split(".")[0] == "diffusers":
            return cls.__name__
    if isinstance(diffusers_pipe, BasePipeline):
        raise TypeError(f"from_diffusers: {type(diffusers_pipe).__name__} is a velodiff pipeline already")
    raise TypeError(f"from_diffusers: {type(diffusers_pipe).__module__}.{type(diffusers_pipe).__name__} is not "
                    f"supported; supported diffusers pipelines: {', '.join(COMPONENTS)}")


def share_model(module, name: str):
    """velodiff's implementation of the diffusers model ``module`` (component ``name``) over its tensors."""
    class_name = type(module).__name__
    config = dict(module.config)
    try:
        cls = model_class_for(class_name, config)
    except ValueError as e:
        raise TypeError(f"{name}: {e}") from None
    return model_from_state_dict(cls, config, dict(module.state_dict()), source=f"diffusers {name} ({class_name})")


def share_text_encoder(module, name: str):
    """velodiff's CLIP text encoder over the tensors of transformers' ``module`` where velodiff implements that
    class and config; otherwise ``module`` itself (velodiff's pipelines call a transformers text encoder the same
    way, and load T5 encoders with transformers)."""
    class_name = type(module).__name__
    to_dict = getattr(getattr(module, "config", None), "to_dict", None)
    if class_name not in CLIP_CLASSES or to_dict is None:
        return module
    try:
        return text_encoder_from_state_dict(to_dict(), dict(module.state_dict()), class_name=class_name,
                                            source=f"transformers {name} ({class_name})")
    except ValueError:
        return module  # a config velodiff's CLIP does not implement: transformers' module runs as is


def model_index(diffusers_pipe) -> Dict[str, Any]:
    """The pipeline's config as a ``model_index.json`` dict (tuples as lists)."""
    config = dict(getattr(diffusers_pipe, "config", None) or {})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()}


def from_diffusers(diffusers_pipe) -> BasePipeline:
    """The velodiff pipeline for the diffusers pipeline ``diffusers_pipe`` (StableDiffusionPipeline,
    StableDiffusionXLPipeline, DiTPipeline, PixArtAlphaPipeline or PixArtSigmaPipeline), the class
    ``velodiff.Pipeline.from_pretrained`` returns for that kind, sharing the diffusers modules' weight storage
    (every parameter's ``data_ptr()`` is the diffusers one's: nothing is copied, and an in-place change of a weight
    shows on both sides).

    dtype and device are the denoiser's (``unet`` / ``transformer``, fp32, fp16 or bf16); every module must be
    on that device. The UNet keeps diffusers' plain layout (``vd.optimize(pipe, vd.accel.CPUConvPrepack())`` gives
    the CPU-fast one, with copies of the conv weights). The scheduler's config becomes the pipeline's
    ``scheduler_config`` (the default sampler follows it, as for a folder; for a :class:`DiffusersScheduler` its
    underlying schedule: pass ``sampler=`` per call). A safety checker, feature extractor or image encoder is not
    carried over (velodiff runs none).

    Raises TypeError for a pipeline or component class velodiff does not implement, ValueError for a missing
    component, a dtype velodiff does not run, or modules on several devices, and velodiff's CheckpointError (a
    ValueError naming the keys) for a model whose weights no longer fit its class (e.g. LoRA layers that PEFT
    injected: fuse or unload them first)."""
    kind = pipeline_kind(diffusers_pipe)
    names = COMPONENTS[kind]
    parts = {name: getattr(diffusers_pipe, name, None) for name in names}
    missing = [name for name, value in parts.items() if value is None]
    if missing:
        raise ValueError(f"from_diffusers: the {kind} has no {', '.join(missing)}")
    parts = {name: unwrap(value) for name, value in parts.items()}
    denoiser = "unet" if "unet" in parts else "transformer"
    dtype, device = placement(parts[denoiser], denoiser)
    if dtype not in PIPELINE_DTYPES:
        raise ValueError(f"from_diffusers: the {denoiser} is in {dtype}; velodiff's pipelines run in "
                         f"{', '.join(str(d) for d in PIPELINE_DTYPES)} (pipe.to(torch.float32) first)")
    check_devices({n: m for n, m in parts.items() if n in MODELS + TEXT_ENCODERS}, device, denoiser)
    components: Dict[str, Any] = {"_class_name": kind, "_model_index": model_index(diffusers_pipe)}
    for name, value in parts.items():
        if name in MODELS:
            components[name] = share_model(value, name)
        elif name in TEXT_ENCODERS:
            components[name] = share_text_encoder(value, name)
        elif name == "scheduler":
            components[name] = schedule_config_of(value)
        else:
            components[name] = value  # tokenizers: velodiff's pipelines call transformers' as they are
    pipe = PIPELINES[kind](components, dtype, device)
    pipe.name_or_path = getattr(diffusers_pipe, "name_or_path", None)
    return pipe
