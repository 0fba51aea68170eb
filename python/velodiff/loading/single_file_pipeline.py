"""A whole pipeline's components from an SD1 / SD2 / SDXL single-file checkpoint, converted in memory component
by component (no temporary folder). Tokenizers come from the caller: single files hold none."""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch

from velodiff.loading.configs import PIPELINE_CLASSES, PREDICTION_TYPES, single_file_scheduler_config
from velodiff.loading.detect import detect_family
from velodiff.loading.errors import CheckpointError
from velodiff.loading.infer import infer_text_encoder_config, infer_unet_config, infer_vae_config
from velodiff.loading.keymap_text import TEXT_ENCODER_PREFIXES, convert_text_encoder
from velodiff.loading.keymap_unet import UNET_PREFIX, convert_unet
from velodiff.loading.keymap_vae import VAE_PREFIXES, convert_vae
from velodiff.loading.modules import model_from_state_dict, text_encoder_from_state_dict
from velodiff.loading.pickle_guard import is_pickle_path, read_checkpoint
from velodiff.loading.safetensors_io import read_safetensors, read_safetensors_header
from velodiff.loading.single_file import merge_configs, stored_pipeline_info
from velodiff.loading.tokenizers import resolve_tokenizers, tokenizer_name
from velodiff.models.registry import model_class_for

#: families whose single files hold a whole pipeline (UNet, VAE, text encoders)
SINGLE_FILE_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl_refiner")
#: the keys ``configs=`` accepts
CONFIG_NAMES = ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler")
#: number of micro-conditioning values in the SDXL ``time_ids`` (base: sizes + crop; refiner: + aesthetic score)
_TIME_IDS = {"sdxl": 6, "sdxl_refiner": 5}


class CheckpointSource:
    """The keys and shapes of one single-file checkpoint, and reads of parts of it.

    safetensors: only the header is read up front; :meth:`read` reads the requested tensors one at a time
    straight into ``dtype`` / ``device``. Pickled files (only with ``allow_pickle=True``): read once through
    ``torch.load(weights_only=True, mmap=True)``; :meth:`read` hands entries over and forgets them.
    """

    def __init__(self, path: str, dtype: torch.dtype, device, allow_pickle: bool = False):
        self.path, self.dtype, self.device = path, dtype, device
        self._tensors: Optional[Dict[str, torch.Tensor]] = None
        self.metadata: Dict[str, str] = {}
        if is_pickle_path(path):
            self._tensors = read_checkpoint(path, dtype=dtype, device=device, allow_pickle=allow_pickle)
            self.shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            header, metadata, _ = read_safetensors_header(path)
            self.shapes = {k: info.shape for k, info in header.items()}
            self.metadata = dict(metadata or {})

    def keys_under(self, prefix: str):
        return [k for k in self.shapes if k.startswith(prefix)]

    def read(self, keys) -> Dict[str, torch.Tensor]:
        if self._tensors is not None:
            return {k: self._tensors.pop(k) for k in keys}
        return read_safetensors(self.path, dtype=self.dtype, device=self.device, keys=keys)


def check_configs(configs) -> Dict[str, Dict[str, Any]]:
    """``configs=`` checked: ``{component in CONFIG_NAMES: {config key: value}}`` (None: no overrides)."""
    if configs is None:
        return {}
    if not isinstance(configs, Mapping):
        raise TypeError(f"configs must be a dict {{component: {{key: value}}}}, got {type(configs).__name__}")
    out = {}
    for name, value in configs.items():
        if name not in CONFIG_NAMES:
            raise ValueError(f"configs: unknown component {name!r}; known: {', '.join(CONFIG_NAMES)}")
        if not isinstance(value, Mapping):
            raise TypeError(f"configs[{name!r}] must be a dict of config overrides, got {type(value).__name__}")
        out[name] = dict(value)
    return out


def load_single_file_components(path: str, dtype: torch.dtype, device, *, family: Optional[str] = None,
                                configs: Optional[Dict[str, Dict[str, Any]]] = None,
                                prediction_type: Optional[str] = None, tokenizer=None, tokenizer_2=None,
                                allow_pickle: bool = False) -> Dict[str, Any]:
    """Every component of an SD1 / SD2 / SDXL single-file checkpoint, as
    :func:`velodiff.loading.pipeline.load_folder_components` returns them for a folder.

    Component by component, only that component's tensors are read (into ``dtype`` / ``device``), renamed to
    diffusers / transformers names and handed to a model built on the meta device, so peak memory stays near
    the size of the loaded pipeline. No temporary folder is written.

    Configs: those recorded in the file's metadata by velodiff (see :mod:`velodiff.loading.single_file`), else the
    family default (:mod:`velodiff.loading.configs`) with the structure read from the weights —
    UNet channels, levels, block types, layers per block, transformer depth, cross-attention width, linear vs
    conv projections, in/out channels, SDXL add-embedding width and (from it and ``text_encoder_2``'s
    projection width) ``addition_time_embed_dim``; VAE channels, levels and latent channels; text-encoder
    width, depth, MLP width, vocabulary, positions, projection width. Not in the weights, so from the family
    default unless ``configs`` says otherwise: UNet ``attention_head_dim``, ``norm_num_groups``,
    ``upcast_attention``, ``sample_size``; VAE ``norm_num_groups``, ``scaling_factor``, ``force_upcast``;
    text-encoder ``num_attention_heads`` (width / 64 when the width is not the family's), ``hidden_act``,
    ``layer_norm_eps``; the whole scheduler config, including ``prediction_type`` (SD 2.x 768-v files need
    ``prediction_type="v_prediction"``). ``configs`` = ``{"unet" | "vae" | "text_encoder" | "text_encoder_2"
    | "scheduler": {key: value}}`` overrides fields of those configs. The model index gets the settings the file
    recorded (e.g. ``_velodiff_defaults``).
    """
    configs = check_configs(configs)
    stored, settings = stored_pipeline_info(path)
    configs = merge_configs(stored, configs)
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    source = CheckpointSource(path, dtype, device, allow_pickle)
    family = family or detect_family(source.shapes, source=path)
    if family not in SINGLE_FILE_FAMILIES:
        raise CheckpointError(f"{path!r}: Pipeline.from_pretrained builds pipelines from {SINGLE_FILE_FAMILIES} "
                              f"single files, and this is a {family!r} one; write it as a pipeline folder with "
                              "velodiff.loading.convert_single_file_to_diffusers (velodiff convert FILE FOLDER) and "
                              "load that")
    sched = single_file_scheduler_config(family, configs.get("scheduler"), prediction_type,
                                         base=stored.get("scheduler"))
    encoders = {name: spec for name, spec in TEXT_ENCODER_PREFIXES[family].items() if source.keys_under(spec[0])}
    unet_keys = source.keys_under(UNET_PREFIX)
    vae_prefix = next((p for p in VAE_PREFIXES if source.keys_under(p)), None)
    missing = [n for n, ok in (("unet", unet_keys), ("vae", vae_prefix)) if not ok]
    missing += [n for n in TEXT_ENCODER_PREFIXES[family] if n not in encoders]
    if missing:
        raise CheckpointError(f"{path!r}: this {family} single file has no {', '.join(missing)} weights, so it is "
                              "not a whole pipeline; load the parts it has with velodiff.loading instead")
    tokenizers = resolve_tokenizers([tokenizer_name(n) for n in encoders],
                                    {"tokenizer": tokenizer, "tokenizer_2": tokenizer_2}, path, family)

    index: Dict[str, Any] = {"_class_name": PIPELINE_CLASSES[family], **settings}
    components: Dict[str, Any] = {"_class_name": index["_class_name"], "_model_index": index,
                                  "_single_file": path, "_family": family}
    for name, (prefix, kind) in encoders.items():
        sd = source.read(source.keys_under(prefix))
        cfg = infer_text_encoder_config(sd, family, name, prefix, kind, configs.get(name), source=path)
        state = convert_text_encoder(sd, cfg, prefix=prefix, kind=kind, source=path)
        del sd
        components[name] = text_encoder_from_state_dict(cfg, state, source=f"{path} [{name}]")
        del state
        tok_name = tokenizer_name(name)
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
    components["unet"] = model_from_state_dict(model_class_for("UNet2DConditionModel"), cfg, state,
                                               source=f"{path} [unet]")
    del state
    index["unet"] = ["diffusers", "UNet2DConditionModel"]

    sd = source.read(source.keys_under(vae_prefix))
    cfg = infer_vae_config(sd, family, configs.get("vae"), source=path)
    state = convert_vae(sd, cfg, source=path)
    del sd
    components["vae"] = model_from_state_dict(model_class_for("AutoencoderKL"), cfg, state, source=f"{path} [vae]")
    del state
    index["vae"] = ["diffusers", "AutoencoderKL"]

    components["scheduler"] = sched
    index["scheduler"] = ["diffusers", sched["_class_name"]]
    return components
