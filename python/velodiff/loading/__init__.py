"""Checkpoint loading: safetensors reading, diffusers folders, single-file key maps, the pickle rule, and the one
entry that loads a whole pipeline's components (:func:`load_pipeline_components`: built-in names, diffusers
folders, single files, and folders that a registered loader reads, such as quantized ones).

Everything raises :class:`CheckpointError` (a ValueError) naming the file and, where one is at fault, the
key. Nothing here downloads.
"""
from velodiff.loading.builtin import BUILTIN_MODELS, resolve_model_path
from velodiff.loading.configs import (PREDICTION_TYPES, default_scheduler_config, default_text_encoder_configs,
                                      default_unet_config, default_vae_config, single_file_scheduler_config)
from velodiff.loading.detect import FAMILIES, detect_family
from velodiff.loading.errors import CheckpointError, MissingFileError
from velodiff.loading.folders import (find_weights, pipeline_components, read_component, read_config,
                                      read_model_index)
from velodiff.loading.infer import infer_text_encoder_config, infer_unet_config, infer_vae_config
from velodiff.loading.keymap_text import (TEXT_ENCODER_PREFIXES, convert_text_encoder, fit_clip_keys,
                                          text_encoder_to_original)
from velodiff.loading.keymap_transformer import (DIT_CONFIG, PIXART_CONFIG, convert_dit, convert_pixart,
                                                 dit_to_original, infer_transformer_config, pixart_to_original)
from velodiff.loading.keymap_unet import convert_unet, ema_unet_weights, unet_to_original
from velodiff.loading.keymap_vae import convert_vae, vae_to_original
from velodiff.loading.modules import (load_diffusers_model, load_transformers_component, model_from_state_dict,
                                      no_transformers_progress_bar, text_encoder_from_state_dict)
from velodiff.loading.pickle_guard import is_pickle_path, read_checkpoint, refuse_pickle
from velodiff.loading.pipeline import check_device, load_folder_components, load_pipeline_components
from velodiff.loading.registry import FolderLoader, folder_loader_for, register_folder_loader
from velodiff.loading.safetensors_io import read_safetensors, read_safetensors_header, write_safetensors
from velodiff.loading.single_file import (convert_diffusers_to_single_file, convert_single_file_to_diffusers,
                                          diffusers_folder_to_state_dict, family_of_diffusers_folder,
                                          split_single_file)
from velodiff.loading.single_file_pipeline import SINGLE_FILE_FAMILIES, load_single_file_components
from velodiff.loading.state_dict import check_state_dict, load_state_dict_into
from velodiff.loading.tokenizers import load_tokenizer, resolve_tokenizers

__all__ = [
    "BUILTIN_MODELS", "CheckpointError", "DIT_CONFIG", "check_device", "FAMILIES", "FolderLoader", "MissingFileError",
    "PIXART_CONFIG", "PREDICTION_TYPES", "SINGLE_FILE_FAMILIES", "TEXT_ENCODER_PREFIXES", "check_state_dict",
    "convert_diffusers_to_single_file", "convert_dit", "convert_pixart", "convert_single_file_to_diffusers",
    "convert_text_encoder", "convert_unet", "convert_vae", "default_scheduler_config",
    "default_text_encoder_configs", "default_unet_config", "default_vae_config", "detect_family",
    "diffusers_folder_to_state_dict", "dit_to_original", "ema_unet_weights", "family_of_diffusers_folder",
    "find_weights", "fit_clip_keys", "folder_loader_for", "infer_text_encoder_config", "infer_transformer_config",
    "infer_unet_config", "infer_vae_config", "is_pickle_path", "load_diffusers_model", "load_folder_components",
    "load_pipeline_components", "load_single_file_components", "load_state_dict_into", "load_tokenizer",
    "load_transformers_component", "model_from_state_dict", "no_transformers_progress_bar", "pipeline_components",
    "pixart_to_original", "read_checkpoint", "read_component", "read_config", "read_model_index",
    "read_safetensors", "read_safetensors_header", "refuse_pickle", "register_folder_loader",
    "resolve_model_path", "resolve_tokenizers", "single_file_scheduler_config", "split_single_file",
    "text_encoder_from_state_dict", "text_encoder_to_original", "unet_to_original", "vae_to_original",
    "write_safetensors",
]
