"""Tiny diffusers pipelines built offline (random weights, local tokenizer vocabularies) for parity tests.

``tiny_sd_pipeline(kind)`` returns a diffusers pipeline object; ``save_pipeline(pipe, folder)`` writes it in
diffusers' folder layout with safetensors. Nothing is downloaded.
"""
from __future__ import annotations

import json
import math
import os
import tempfile

import torch

# The CLIP BPE test vocabulary of transformers' own tests (23 tokens) and its merges.
CLIP_VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>", "t</w>",
              "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<unk>", "<|startoftext|>", "<|endoftext|>"]
CLIP_MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]


def clip_tokenizer(max_length: int = 77):
    from transformers import CLIPTokenizer
    folder = tempfile.mkdtemp(prefix="velodiff-clip-tok-")
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(CLIP_VOCAB)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("\n".join(CLIP_MERGES) + "\n")
    tok = CLIPTokenizer.from_pretrained(folder, unk_token="<unk>", pad_token="<|endoftext|>")
    tok.model_max_length = max_length
    return tok


def clip_text_encoder(hidden: int = 32, projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection
    cfg = CLIPTextConfig(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, hidden_size=hidden,
                         intermediate_size=37, num_attention_heads=4, num_hidden_layers=5, hidden_act="gelu",
                         projection_dim=32)
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval()


SCHED = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def tiny_sd_pipeline(kind: str = "sd15", seed: int = 0):
    """A random-weight diffusers text-to-image pipeline: kind = sd15 | sd2 (linear projections, v-prediction) |
    sdxl (two text encoders, text_time embedding)."""
    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    torch.manual_seed(seed)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=2, sample_size=32)
    common = dict(block_out_channels=(32, 64), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    if kind == "sd15":
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=4)
        sched = DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip_text_encoder(), tokenizer=clip_tokenizer(),
                                       unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif kind == "sd2":
        unet = UNet2DConditionModel(**common, cross_attention_dim=32, attention_head_dim=(2, 4),
                                    use_linear_projection=True, upcast_attention=True)
        sched = DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              prediction_type="v_prediction")
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=clip_text_encoder(), tokenizer=clip_tokenizer(),
                                       unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    elif kind == "sdxl":
        unet = UNet2DConditionModel(**common, cross_attention_dim=64, attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time",
                                    addition_time_embed_dim=8, transformer_layers_per_block=(1, 2),
                                    projection_class_embeddings_input_dim=80)
        sched = DDIMScheduler(**SCHED, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
        pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=clip_text_encoder(seed=1),
                                         text_encoder_2=clip_text_encoder(projection=True, seed=2),
                                         tokenizer=clip_tokenizer(), tokenizer_2=clip_tokenizer(), unet=unet,
                                         scheduler=sched)
    else:
        raise ValueError(f"kind must be sd15 | sd2 | sdxl, got {kind!r}")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe, folder: str) -> str:
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


def saved_and_loaded(theirs, folder: str):
    """(diffusers' pipeline, velodiff's pipeline loaded from ``folder`` where it was saved (progress bar off),
    folder)."""
    import velodiff as vd
    save_pipeline(theirs, folder)
    ours = vd.Pipeline.from_pretrained(folder)
    ours.set_progress_bar_config(disable=True)
    return theirs, ours, folder


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=2, sample_size=32)


def tiny_dit_pipeline(seed: int = 0):
    """DiT with 1000 classes (diffusers' DiTPipeline hard-codes the null class 1000), learned sigma, 8x8 latents."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=1000)
    sched = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    # eval(): a freshly built DiT is in training mode, where its label embedder drops labels at random
    pipe = DiTPipeline(transformer=transformer.eval(), vae=tiny_vae(seed).eval(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


T5_VOCAB = ["<pad>", "</s>", "<unk>", "a", "red", "fox", "low", "newer", "wider", "cat", "the", "digit", "seven"]


def t5_tokenizer(folder: str = None):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(T5_VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def t5_encoder(seed: int = 0):
    from transformers import T5Config, T5EncoderModel
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                   relative_attention_num_buckets=8)
    return T5EncoderModel(cfg).eval()


def tiny_pixart_pipeline(sigma: bool = False, seed: int = 0):
    from diffusers import DDIMScheduler, PixArtAlphaPipeline, PixArtSigmaPipeline, PixArtTransformer2DModel
    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                           num_attention_heads=2, in_channels=4, out_channels=8,
                                           cross_attention_dim=16, caption_channels=32, norm_type="ada_norm_single",
                                           num_embeds_ada_norm=1000)
    sched = DDIMScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02, clip_sample=False)
    cls = PixArtSigmaPipeline if sigma else PixArtAlphaPipeline
    pipe = cls(tokenizer=t5_tokenizer(), text_encoder=t5_encoder(seed), transformer=transformer.eval(),
               vae=tiny_vae(seed).eval(), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def digits_unet_inputs(timesteps=(500.0, 500.0), seed: int = 0):
    """(sample [2, 4, 8, 8], timesteps [2], encoder_hidden_states [2, 16, 64]): random inputs for the built-in
    digits UNet, drawn from one seeded generator (sample first)."""
    import torch
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(2, 4, 8, 8, generator=g), torch.tensor(list(timesteps)),
            torch.randn(2, 16, 64, generator=g))


def run_cli(argv, capsys):
    """(exit code, stdout, stderr) of ``velodiff argv`` run in this process (argparse's SystemExit included)."""
    from velodiff.cli import main
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def quiet_pipeline(name_or_folder):
    """``vd.Pipeline.from_pretrained(name_or_folder)`` with its progress bar off (the tests' module fixtures)."""
    import velodiff as vd
    pipe = vd.Pipeline.from_pretrained(name_or_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# FP8 formats (csrc/include/velodiff/fp8.h): exponent bits, mantissa bits, bias
FP8_SPEC = {"e4m3": (4, 3, 7), "e5m2": (5, 2, 15)}


def fp8_finite_values(fmt):
    """{code: float64 value} of every finite non-negative code of the format, from its bit fields."""
    e_bits, m_bits, bias = FP8_SPEC[fmt]
    out = {}
    for code in range(128):
        e, m = code >> m_bits, code & ((1 << m_bits) - 1)
        if fmt == "e4m3" and e == 15 and m == 7:
            continue  # NaN
        if fmt == "e5m2" and e == 31:
            continue  # inf / NaN
        out[code] = (m / 2 ** m_bits) * 2.0 ** (1 - bias) if e == 0 else (1 + m / 2 ** m_bits) * 2.0 ** (e - bias)
    return out


def fp8_special_inputs(fmt):
    """float32 values: every finite value, every midpoint between neighbours (exact ties) and its neighbours one
    float32 ulp away, the boundaries below the smallest subnormal, beyond the largest value, zeros, inf, NaN."""
    vals = sorted(fp8_finite_values(fmt).values())
    mids = [(a + b) / 2 for a, b in zip(vals, vals[1:])]
    mids.append(vals[-1] + (vals[-1] - vals[-2]) / 2)
    pts = torch.tensor(vals + mids, dtype=torch.float32)
    near = torch.cat([pts, torch.nextafter(pts, torch.tensor(math.inf)), torch.nextafter(pts, torch.tensor(0.0))])
    tiny = vals[1] / 2  # half the smallest subnormal: a tie between 0 and it, which goes to 0 (even)
    extra = torch.tensor([0.0, tiny, tiny * 1.0001, tiny * 0.9999, 1e-30, 1e30, 3.4e38, math.inf, math.nan],
                         dtype=torch.float32)
    allv = torch.cat([near, extra])
    return torch.cat([allv, -allv])


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for a test server)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
