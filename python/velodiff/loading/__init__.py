"""Checkpoint loading: safetensors reading, diffusers folders, single-file key maps, the pickle rule.

Everything raises :class:`CheckpointError` (a ValueError) naming the file and, where one is at fault, the
key. Nothing here downloads.
"""
from velodiff.loading.configs import (default_scheduler_config, default_text_encoder_configs,
                                      default_unet_config, default_vae_config)
from velodiff.loading.detect import FAMILIES, detect_family
from velodiff.loading.errors import CheckpointError
from velodiff.loading.folders import (find_weights, pipeline_components, read_component, read_config,
                                      read_model_index)
from velodiff.loading.infer import infer_text_encoder_config, infer_unet_config, infer_vae_config
from velodiff.loading.keymap_text import (TEXT_ENCODER_PREFIXES, convert_text_encoder, fit_clip_keys,
                                          text_encoder_to_original)
from velodiff.loading.keymap_transformer import (DIT_CONFIG, PIXART_CONFIG, convert_dit, convert_pixart,
                                                 dit_to_original, infer_transformer_config, pixart_to_original)
from velodiff.loading.keymap_unet import convert_unet, ema_unet_weights, unet_to_original
from velodiff.loading.keymap_vae import convert_vae, vae_to_original
from velodiff.loading.pickle_guard import is_pickle_path, read_checkpoint, refuse_pickle
from velodiff.loading.safetensors_io import read_safetensors, read_safetensors_header, write_safetensors
from velodiff.loading.single_file import (convert_diffusers_to_single_file, convert_single_file_to_diffusers,
                                          diffusers_folder_to_state_dict, family_of_diffusers_folder,
                                          split_single_file)
from velodiff.loading.state_dict import check_state_dict, load_state_dict_into

__all__ = [
    "CheckpointError", "DIT_CONFIG", "FAMILIES", "PIXART_CONFIG", "convert_dit", "convert_pixart",
    "dit_to_original", "ema_unet_weights", "infer_transformer_config", "pixart_to_original", "TEXT_ENCODER_PREFIXES", "check_state_dict", "convert_diffusers_to_single_file",
    "convert_single_file_to_diffusers", "convert_text_encoder", "convert_unet", "convert_vae",
    "default_scheduler_config", "default_text_encoder_configs", "default_unet_config", "default_vae_config",
    "detect_family", "diffusers_folder_to_state_dict", "family_of_diffusers_folder", "find_weights",
    "fit_clip_keys", "infer_text_encoder_config", "infer_unet_config", "infer_vae_config", "is_pickle_path",
    "load_state_dict_into", "pipeline_components", "read_checkpoint", "read_component", "read_config",
    "read_model_index", "read_safetensors", "read_safetensors_header", "refuse_pickle", "split_single_file",
    "text_encoder_to_original", "unet_to_original", "vae_to_original", "write_safetensors",
]
