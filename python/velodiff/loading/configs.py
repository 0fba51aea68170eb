"""Default diffusers / transformers configs of each single-file family, so a single file builds offline.

Sources: the ``config.json`` files of the diffusers-format releases on the Hugging Face hub
(``stable-diffusion-v1-5/stable-diffusion-v1-5``, ``stabilityai/stable-diffusion-2-1``,
``stabilityai/stable-diffusion-xl-base-1.0``, ``stabilityai/stable-diffusion-xl-refiner-1.0``), which
diffusers' ``from_single_file`` fetches for these families (``DIFFUSERS_DEFAULT_PIPELINE_PATHS`` in
diffusers/loaders/single_file_utils.py), cross-checked with
``create_{unet,vae}_diffusers_config_from_ldm`` on the original YAMLs (v1-inference.yaml,
v2-inference-v.yaml, sd_xl_base.yaml, sd_xl_refiner.yaml) and with velodiff's research notes
(shared/reference/ecosystem-graphs-style.md section 1.1). Only fields that change the model are kept; the
rest take the library defaults. Every accessor returns a fresh copy.
"""
from __future__ import annotations

import copy
from typing import Dict, Mapping, Optional

_CROSS3 = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
_CROSS3_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]

_UNET_COMMON = {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "center_input_sample": False,
                "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4,
                "out_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-5,
                "norm_num_groups": 32, "transformer_layers_per_block": 1,
                "use_linear_projection": False}

UNET_CONFIGS: Dict[str, dict] = {
    "sd1": {**_UNET_COMMON, "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 768, "down_block_types": _CROSS3, "up_block_types": _CROSS3_UP,
            "sample_size": 64},
    "sd2": {**_UNET_COMMON, "attention_head_dim": [5, 10, 20, 20], "block_out_channels": [320, 640, 1280, 1280],
            "cross_attention_dim": 1024, "down_block_types": _CROSS3, "up_block_types": _CROSS3_UP,
            "use_linear_projection": True, "upcast_attention": True, "sample_size": 96},
    "sdxl": {**_UNET_COMMON, "attention_head_dim": [5, 10, 20], "block_out_channels": [320, 640, 1280],
             "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816, "sample_size": 128},
    "sdxl_refiner": {**_UNET_COMMON, "attention_head_dim": [6, 12, 24, 24],
                     "block_out_channels": [384, 768, 1536, 1536], "cross_attention_dim": 1280,
                     "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                          "DownBlock2D"],
                     "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                     "transformer_layers_per_block": 4, "use_linear_projection": True,
                     "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
                     "projection_class_embeddings_input_dim": 2560, "sample_size": 128},
}

_VAE = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "norm_num_groups": 32, "scaling_factor": 0.18215}

VAE_CONFIGS: Dict[str, dict] = {
    "sd1": {**_VAE, "sample_size": 512},
    "sd2": {**_VAE, "sample_size": 768},
    "sdxl": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
    "sdxl_refiner": {**_VAE, "sample_size": 1024, "scaling_factor": 0.13025, "force_upcast": True},
}

_CLIP_L = {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model", "hidden_size": 768,
           "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
           "max_position_embeddings": 77, "vocab_size": 49408, "hidden_act": "quick_gelu",
           "layer_norm_eps": 1e-5, "projection_dim": 768, "bos_token_id": 0, "eos_token_id": 2,
           "pad_token_id": 1}
_OPEN_CLIP_H = {**_CLIP_L, "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                "num_hidden_layers": 23, "hidden_act": "gelu", "projection_dim": 512}
_OPEN_CLIP_BIGG = {**_CLIP_L, "architectures": ["CLIPTextModelWithProjection"], "hidden_size": 1280,
                   "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                   "hidden_act": "gelu", "projection_dim": 1280}

TEXT_ENCODER_CONFIGS: Dict[str, Dict[str, dict]] = {
    "sd1": {"text_encoder": _CLIP_L},
    "sd2": {"text_encoder": _OPEN_CLIP_H},
    "sdxl": {"text_encoder": _CLIP_L, "text_encoder_2": _OPEN_CLIP_BIGG},
    "sdxl_refiner": {"text_encoder_2": _OPEN_CLIP_BIGG},
}

#: diffusers' scheduler defaults for these families (SCHEDULER_DEFAULT_CONFIG in single_file_utils.py;
#: the hub releases use PNDM for SD1/SD2 and Euler for SDXL). The prediction type is not in the weights:
#: SD 2.x 768-v checkpoints need prediction_type="v_prediction".
_SCHED = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012, "num_train_timesteps": 1000,
          "prediction_type": "epsilon", "steps_offset": 1, "timestep_spacing": "leading"}
SCHEDULER_CONFIGS: Dict[str, dict] = {
    "sd1": {"_class_name": "PNDMScheduler", **_SCHED, "skip_prk_steps": True, "set_alpha_to_one": False},
    "sd2": {"_class_name": "PNDMScheduler", **_SCHED, "skip_prk_steps": True, "set_alpha_to_one": False},
    "sdxl": {"_class_name": "EulerDiscreteScheduler", **_SCHED, "interpolation_type": "linear"},
    "sdxl_refiner": {"_class_name": "EulerDiscreteScheduler", **_SCHED, "interpolation_type": "linear"},
}

PIPELINE_CLASSES = {"dit": "DiTPipeline", "sd1": "StableDiffusionPipeline", "sd2": "StableDiffusionPipeline",
                    "sdxl": "StableDiffusionXLPipeline", "sdxl_refiner": "StableDiffusionXLImg2ImgPipeline"}


def _family(table: dict, family: str, what: str):
    if family not in table:
        raise ValueError(f"no default {what} config for family {family!r}; known: {sorted(table)}")
    return copy.deepcopy(table[family])


def default_unet_config(family: str) -> dict:
    """The diffusers UNet2DConditionModel config of ``family`` ('sd1', 'sd2', 'sdxl', 'sdxl_refiner')."""
    return _family(UNET_CONFIGS, family, "UNet")


def default_vae_config(family: str) -> dict:
    """The diffusers AutoencoderKL config of ``family``."""
    return _family(VAE_CONFIGS, family, "VAE")


def default_text_encoder_configs(family: str) -> Dict[str, dict]:
    """``{component name: transformers CLIPTextConfig dict}`` of ``family``."""
    return _family(TEXT_ENCODER_CONFIGS, family, "text-encoder")


def default_scheduler_config(family: str) -> dict:
    """The diffusers scheduler config (with ``_class_name``) of ``family``."""
    return _family(SCHEDULER_CONFIGS, family, "scheduler")


#: the scheduler prediction types a single file's scheduler may be given (not in the weights)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def single_file_scheduler_config(family: str, overrides: Optional[Mapping] = None,
                                 prediction_type: Optional[str] = None, base: Optional[Mapping] = None) -> dict:
    """The scheduler config of a pipeline built from a ``family`` single file: ``base`` (the config the file
    recorded, if any) or the family default, then ``overrides``, then ``prediction_type`` (one of
    :data:`PREDICTION_TYPES`; the weights do not tell it)."""
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    sched = copy.deepcopy(dict(base)) if base else default_scheduler_config(family)
    sched.update(overrides or {})
    if prediction_type is not None:
        sched["prediction_type"] = prediction_type
    return sched
