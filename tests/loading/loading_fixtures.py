"""Tiny offline models, original-layout configs (YAML) and helpers shared by the loading tests."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

_CROSS3 = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
_CROSS3_UP = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3

#: tiny UNet configs shaped like each family (groups of 32 so diffusers' YAML path, which assumes 32, agrees)
UNET = {
    "sd1": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, attention_head_dim=8,
                cross_attention_dim=32, down_block_types=_CROSS3, up_block_types=_CROSS3_UP, sample_size=8),
    "sd2": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=2, attention_head_dim=(1, 2, 2, 2),
                cross_attention_dim=48, use_linear_projection=True, down_block_types=_CROSS3,
                up_block_types=_CROSS3_UP, sample_size=8),
    "sdxl": dict(block_out_channels=(32, 64, 64), layers_per_block=2, attention_head_dim=(1, 2, 2),
                 cross_attention_dim=1280, use_linear_projection=True,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 3), addition_embed_type="text_time",
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=6 * 256 + 32, sample_size=8),
}
VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
           up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, layers_per_block=2, sample_size=16)
CLIP = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=3, hidden_act="gelu", projection_dim=32,
            max_position_embeddings=77)


def seeded(seed: int = 0):
    torch.manual_seed(seed)


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with random values (zero-initialised layers would hide mapping mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return module


def tiny_unet(family: str):
    from diffusers import UNet2DConditionModel
    seeded()
    return randomize(UNet2DConditionModel(**UNET[family])).eval()


def tiny_vae():
    from diffusers import AutoencoderKL
    seeded()
    return randomize(AutoencoderKL(**VAE)).eval()


def tiny_clip(with_projection: bool = False, **overrides):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    seeded()
    cfg = CLIPTextConfig(**{**CLIP, **overrides})
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return randomize(cls(cfg)).eval()


def clip_config_dict(model) -> dict:
    cfg = model.config.to_dict()
    cfg["architectures"] = [type(model).__name__]
    return cfg


def original_yaml(family: str, path: str) -> str:
    """An original LDM/SGM inference YAML describing the tiny ``UNET[family]`` and ``VAE`` (for diffusers'
    ``from_single_file(original_config=...)``, the oracle)."""
    u = UNET[family]
    ch = u["block_out_channels"][0]
    mult = [c // ch for c in u["block_out_channels"]]
    attn_res = [2 ** i for i, t in enumerate(u["down_block_types"]) if t.startswith("CrossAttn")]
    lines = ["model:", "  params:", "    scale_factor: 0.18215"]
    key = "network_config" if family == "sdxl" else "unet_config"
    lines += [f"    {key}:", "      params:", "        in_channels: 4", "        out_channels: 4",
              f"        model_channels: {ch}", f"        channel_mult: {mult}",
              f"        attention_resolutions: {attn_res}", f"        num_res_blocks: {u['layers_per_block']}",
              f"        context_dim: {u['cross_attention_dim']}"]
    depth = u.get("transformer_layers_per_block", 1)
    lines.append(f"        transformer_depth: {list(depth) if isinstance(depth, tuple) else depth}")
    heads = u["attention_head_dim"]
    if u.get("use_linear_projection"):
        lines += ["        use_linear_in_transformer: true", f"        num_head_channels: {ch // heads[0]}"]
    else:
        lines.append(f"        num_heads: {heads}")
    if family == "sdxl":
        lines += ["        num_classes: sequential",
                  f"        adm_in_channels: {u['projection_class_embeddings_input_dim']}"]
    v = VAE
    vch = v["block_out_channels"][0]
    lines += ["    first_stage_config:", "      params:", "        ddconfig:", f"          ch: {vch}",
              f"          ch_mult: {[c // vch for c in v['block_out_channels']]}", "          in_channels: 3",
              "          out_ch: 3", f"          z_channels: {v['latent_channels']}", "          num_res_blocks: 2"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def assert_same_state_dict(a, b):
    assert set(a) == set(b), (f"only in first: {sorted(set(a) - set(b))[:5]}, "
                              f"only in second: {sorted(set(b) - set(a))[:5]}")
    for k in a:
        assert a[k].shape == b[k].shape and a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


_VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>", "low</w>",
          "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]
_MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]


def tiny_tokenizer(folder: str):
    """The offline CLIP tokenizer recipe (transformers' own test vocabulary)."""
    import json
    from transformers import CLIPTokenizer
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(_VOCAB)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("\n".join(_MERGES) + "\n")
    tok = CLIPTokenizer.from_pretrained(folder, unk_token="<unk>", pad_token="<|endoftext|>")
    tok.model_max_length = 77
    return tok


def tiny_pipeline_folder(family: str, folder: str) -> str:
    """Save a tiny SD1/SD2/SDXL-shaped diffusers pipeline (random weights) into ``folder``."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    tok = tiny_tokenizer(os.path.join(folder, "_tok"))
    sched = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                   steps_offset=1)
    unet, vae = tiny_unet(family), tiny_vae()
    if family == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=tiny_clip(), text_encoder_2=tiny_clip(True),
                                         tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)
    else:
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=tiny_clip(), tokenizer=tok, unet=unet, scheduler=sched,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
