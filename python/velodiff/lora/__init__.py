"""LoRA adapters: the file formats users have (diffusers / PEFT, kohya, LyCORIS LoCon), hot-swappable branches on
plain and quantized layers, fuse / unfuse. Pipelines expose it as ``pipe.load_lora(...)`` and friends."""
from velodiff.lora.adapters import (apply_pending, fuse_lora, load_lora, load_lora_background, lora_strengths,
                                    read_lora_file, set_lora_strength, unfuse_lora, unload_lora)
from velodiff.lora.branch import RANK_BLOCK, LoraBranch
from velodiff.lora.formats import LoraFactors, LoraFormatError, parse_lora

__all__ = ["RANK_BLOCK", "LoraBranch", "LoraFactors", "LoraFormatError", "apply_pending", "fuse_lora", "load_lora",
           "load_lora_background", "lora_strengths", "parse_lora", "read_lora_file", "set_lora_strength",
           "unfuse_lora", "unload_lora"]
