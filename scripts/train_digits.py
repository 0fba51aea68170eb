#!/usr/bin/env python3
"""Train velodiff's built-in ``digits`` model: Stable Diffusion in miniature on scikit-learn's handwritten digits.

    python scripts/train_digits.py                      # train, save python/velodiff/data/digits, quick check
    python scripts/train_digits.py --eval-only          # only the quality check of the saved folder

Data: ``sklearn.datasets.load_digits`` (1797 real 8x8 images, values 0..16; the UCI "Optical Recognition of
Handwritten Digits" test set, shipped inside scikit-learn). Each image is scaled to [-1, 1], upsampled
bilinearly to 16x16 and replicated to 3 channels (RGB). The split is fixed: ``train_test_split(indices,
test_size=0.25, stratify=labels, random_state=0)``; the generator only ever sees the 75% training part, and the
indices of both parts are written to ``split.json`` in the model folder so that evaluation can use the held-out
quarter.

Models (all diffusers classes and parameter names, so the folder loads through ``Pipeline.from_pretrained``):
  1. AutoencoderKL, 16x16x3 <-> 8x8x4 (downsampling factor 2), trained with MSE reconstruction + a small KL;
     ``scaling_factor`` = 1 / std of the training latents.
  2. CLIPTextModel (hidden 64, 2 layers) over a word-level CLIPTokenizer (whole words and numerals are single
     tokens), trained jointly with
  3. UNet2DConditionModel (CrossAttnDownBlock2D + DownBlock2D, cross-attention mid block, UpBlock2D +
     CrossAttnUpBlock2D, cross_attention_dim 64), epsilon prediction on SD's scaled_linear schedule, prompts drawn
     from random templates per sample ("a handwritten 7", "the digit seven", ...), the prompt replaced by the
     empty prompt 12% of the time (classifier-free guidance). EMA weights are saved.

Everything is seeded (torch.manual_seed, numpy RandomState, 2 CPU threads, deterministic ops): a rerun gives the
same weights up to floating-point non-associativity of the CPU kernels. About 13 minutes on 2 idle CPU cores (VAE
2 min, UNet 0.2 s/step); 25 minutes when the cores were shared. Weights are stored in float16 (velodiff
loads them into the requested dtype).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "..", "python", "velodiff", "data", "digits")

SEED = 0
IMAGE_SIZE = 16
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten {n}", "a handwritten {w}", "the digit {w}", "the digit {n}", "a {n}", "a {w}",
             "number {w}", "number {n}", "digit {n}", "digit {w}", "the number {n}", "the number {w}", "{n}", "{w}",
             "a picture of a {n}", "an image of the digit {w}", "a handwritten digit {n}", "handwritten {w}"]
EXTRA_WORDS = ["a", "an", "the", "handwritten", "digit", "number", "of", "picture", "image", "drawing", "written",
               "hand"]
MAX_LENGTH = 16
DROP_PROMPT = 0.12

T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------------------------

def load_data():
    """(images [N, 3, 16, 16] in [-1, 1], labels [N], train indices, test indices)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32) / 16.0  # [N, 8, 8] in [0, 1]
    labels = torch.tensor(digits.target, dtype=torch.long)
    idx = np.arange(len(labels))
    train_idx, test_idx = train_test_split(idx, test_size=0.25, stratify=digits.target, random_state=0)
    images = upsample(x)
    return images, labels, np.sort(train_idx), np.sort(test_idx)


def upsample(x8: torch.Tensor) -> torch.Tensor:
    """[N, 8, 8] in [0, 1] -> [N, 3, 16, 16] in [-1, 1] (bilinear)."""
    x = F.interpolate(x8[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return (x * 2 - 1).clamp(-1, 1).repeat(1, 3, 1, 1)


def to_8x8_features(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [0, 1] (a generated or upsampled image) -> [N, 64] in 0..16, as load_digits' data."""
    gray = images.float().mean(1, keepdim=True)
    small = F.adaptive_avg_pool2d(gray, 8)
    return (small.reshape(len(images), 64) * 16).clamp(0, 16).numpy()


def fit_classifier(images: torch.Tensor, labels: torch.Tensor, idx: np.ndarray):
    """An SVC on the real digits ``idx`` (upsampled and pooled back to 8x8, the path generated images take)."""
    from sklearn.svm import SVC
    feats = to_8x8_features((images[idx] + 1) / 2)
    return SVC(C=10, gamma="scale").fit(feats, labels[idx].numpy())


# ----------------------------------------------------------------------------------------------------------------
# tokenizer: a CLIP BPE whose merges build every vocabulary word into one token
# ----------------------------------------------------------------------------------------------------------------

def build_tokenizer(folder: str):
    from transformers import CLIPTokenizer
    words = sorted(set(WORDS + EXTRA_WORDS))
    vocab = ["<|startoftext|>", "<|endoftext|>", "<unk>"]
    chars = sorted({c for w in words for c in w} | set("0123456789") | set("abcdefghijklmnopqrstuvwxyz"))
    vocab += chars + [c + "</w>" for c in chars]
    merges = []
    for w in words:
        parts = list(w[:-1]) + [w[-1] + "</w>"]
        while len(parts) > 1:
            merge = f"{parts[0]} {parts[1]}"
            if merge not in merges:
                merges.append(merge)
            parts = [parts[0] + parts[1]] + parts[2:]
            if parts[0] not in vocab:
                vocab.append(parts[0])
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(vocab)}, f)
    with open(os.path.join(folder, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), unk_token="<unk>",
                        bos_token="<|startoftext|>", eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                        model_max_length=MAX_LENGTH)
    for w in words + [str(d) for d in range(10)]:
        n = len(tok(w).input_ids) - 2
        if n != 1:
            log(f"warning: {w!r} is {n} tokens")
    return tok


def prompt_table(tok):
    """ids [10, T, L] of every template for every digit, and ids [L] of the empty prompt."""
    ids = [[tok(t.format(n=d, w=WORDS[d]), padding="max_length", max_length=MAX_LENGTH, truncation=True).input_ids
            for t in TEMPLATES] for d in range(10)]
    empty = tok("", padding="max_length", max_length=MAX_LENGTH).input_ids
    return torch.tensor(ids), torch.tensor(empty)


# ----------------------------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------------------------

def train_vae(images: torch.Tensor, steps: int, batch: int = 64):
    from diffusers import AutoencoderKL
    torch.manual_seed(SEED)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[16, 32],
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE)
    log(f"VAE: {sum(p.numel() for p in vae.parameters()):,} parameters, {steps} steps of batch {batch}")
    opt = torch.optim.AdamW(vae.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    gen = torch.Generator().manual_seed(SEED + 1)
    vae.train()
    for step in range(steps):
        x = images[torch.randint(0, len(images), (batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        mse = F.mse_loss(rec, x)
        kl = 0.5 * (post.mean.pow(2) + post.var - 1.0 - post.logvar).mean()
        loss = mse + 1e-3 * kl + 0.1 * (rec - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 250 == 0 or step == steps - 1:
            log(f"  vae step {step:5d}  mse {mse.item():.5f}  kl {kl.item():.3f}")
    return vae.eval()


def train_unet(latents_mean, latents_std, labels, tok, steps: int, batch: int = 128):
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel
    torch.manual_seed(SEED + 2)
    vocab = tok.get_vocab()
    cfg = CLIPTextConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=MAX_LENGTH, hidden_act="quick_gelu",
                         bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                         pad_token_id=vocab["<|endoftext|>"], projection_dim=64)
    text = CLIPTextModel(cfg)
    unet = UNet2DConditionModel(sample_size=IMAGE_SIZE // 2, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
                                attention_head_dim=4, norm_num_groups=16)
    log(f"UNet: {sum(p.numel() for p in unet.parameters()):,} parameters; text encoder: "
        f"{sum(p.numel() for p in text.parameters()):,}; {steps} steps of batch {batch}")
    noise_sched = DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                                beta_end=0.012)
    alphas = noise_sched.alphas_cumprod.float()
    ids, empty = prompt_table(tok)
    params = list(unet.parameters()) + list(text.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=steps, pct_start=0.05,
                                                final_div_factor=20)
    ema = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(SEED + 3)
    unet.train(), text.train()
    t_last, running = time.time(), 0.0
    for step in range(steps):
        j = torch.randint(0, len(labels), (batch,), generator=gen)
        z0 = latents_mean[j] + latents_std[j] * torch.randn(latents_mean[j].shape, generator=gen)
        tmpl = torch.randint(0, ids.shape[1], (batch,), generator=gen)
        tokens = ids[labels[j], tmpl]
        drop = torch.rand(batch, generator=gen) < DROP_PROMPT
        tokens = torch.where(drop[:, None], empty[None], tokens)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn(z0.shape, generator=gen)
        a = alphas[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        emb = text(tokens)[0]
        pred = unet(zt, t, emb).sample
        loss = F.mse_loss(pred, noise)
        train_step(loss, opt, sched, params, ema, step)
        running = 0.98 * running + 0.02 * loss.item() if step else loss.item()
        if step % 200 == 0 or step == steps - 1:
            now = time.time()
            log(f"  unet step {step:5d}  loss {running:.4f}  lr {sched.get_last_lr()[0]:.2e}  "
                f"({(now - t_last) / (200 if step else 1):.3f} s/step)")
            t_last = now
    with torch.no_grad():
        for e, p in zip(ema, params):
            p.copy_(e)
    return unet.eval(), text.eval()


def train_step(loss, opt, sched, params, ema, step: int) -> None:
    """Backward, gradient clipping at 1, optimizer and LR-schedule step, then the EMA of ``params`` in ``ema``
    (decay min(0.999, (1 + step) / (10 + step))). Shared with scripts/train_digits_dit.py."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    sched.step()
    decay = min(0.999, (1 + step) / (10 + step))
    with torch.no_grad():
        for e, p in zip(ema, params):
            e.lerp_(p.detach(), 1 - decay)


# ----------------------------------------------------------------------------------------------------------------
# saving and checking
# ----------------------------------------------------------------------------------------------------------------

def save(out: str, vae, unet, text, tok, train_idx, test_idx, info):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    scheduler = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear",
                                            beta_start=0.00085, beta_end=0.012, prediction_type="epsilon",
                                            steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae.half(), text_encoder=text.half(), tokenizer=tok, unet=unet.half(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    write_folder(pipe, out, train_idx, test_idx, info)


def write_folder(pipe, out: str, train_idx, test_idx, info) -> None:
    """Save a diffusers pipeline as the model folder ``out`` (keeping its hand-written README.md), with the data
    split (split.json) and the training record (training.json). Shared with scripts/train_digits_dit.py."""
    readme = os.path.join(out, "README.md")
    keep = open(readme).read() if os.path.isfile(readme) else None
    if os.path.isdir(out):
        shutil.rmtree(out)
    pipe.save_pretrained(out, safe_serialization=True)
    if keep is not None:
        with open(readme, "w") as f:
            f.write(keep)
    with open(os.path.join(out, "split.json"), "w") as f:
        json.dump({"source": "sklearn.datasets.load_digits",
                   "split": "train_test_split(range(1797), test_size=0.25, stratify=target, random_state=0)",
                   "train": [int(i) for i in train_idx], "test": [int(i) for i in test_idx]}, f)
    with open(os.path.join(out, "training.json"), "w") as f:
        json.dump(info, f, indent=2)
    size = sum(os.path.getsize(os.path.join(d, n)) for d, _, files in os.walk(out) for n in files)
    log(f"saved {out} ({size / 2 ** 20:.2f} MiB)")


def draw_prompt(pipe, digit: int, count: int, **kwargs):
    """``count`` images of ``digit`` from the text-to-image pipeline ([count, 3, H, W] in [0, 1])."""
    return pipe(f"a handwritten {digit}", num_images_per_prompt=count, output_type="pt", **kwargs).images


def quality_check(out: str, guidances, per_digit: int, steps: int, seed: int = 1234, draw=draw_prompt):
    """Conditional accuracy of the saved folder through velodiff's own pipeline; ``draw(pipe, digit, count,
    **sampling options)`` makes the images (a prompt here, a class label for scripts/train_digits_dit.py)."""
    from velodiff.pipelines import Pipeline
    images, labels, train_idx, test_idx = load_data()
    clf = fit_classifier(images, labels, test_idx)
    own = clf.score(to_8x8_features((images[train_idx] + 1) / 2), labels[train_idx].numpy())
    log(f"classifier (SVC on the {len(test_idx)} held-out digits): accuracy on the {len(train_idx)} training "
        f"digits {own:.4f}")
    pipe = Pipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    results = {}
    for g in guidances:
        correct, t0 = np.zeros(10), time.time()
        for d in range(10):
            gen = torch.Generator().manual_seed(seed + d)
            images = draw(pipe, d, per_digit, num_inference_steps=steps, guidance_scale=g, sampler="dpmpp_2m",
                          generator=gen)
            correct[d] = (clf.predict(to_8x8_features(images)) == d).mean()
        results[g] = float(correct.mean())
        log(f"guidance {g}: conditional accuracy {correct.mean():.4f} ({per_digit} per digit, {steps} steps "
            f"dpmpp_2m; per digit {np.round(correct, 3).tolist()}; {time.time() - t0:.1f} s)")
    return results


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--vae-steps", type=int, default=1500)
    ap.add_argument("--unet-steps", type=int, default=3000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--eval-only", action="store_true")
    ap.add_argument("--eval-per-digit", type=int, default=200)
    ap.add_argument("--eval-steps", type=int, default=20)
    ap.add_argument("--guidance", type=float, nargs="*", default=[2.0, 3.0, 4.0, 6.0])
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    out = os.path.abspath(args.out)
    if not args.eval_only:
        images, labels, train_idx, test_idx = load_data()
        log(f"data: {len(labels)} digits, {len(train_idx)} train / {len(test_idx)} held out")
        x_train, y_train = images[train_idx], labels[train_idx]
        t_vae = time.time()
        vae = train_vae(x_train, args.vae_steps)
        with torch.no_grad():
            post = vae.encode(x_train).latent_dist
            mean, std = post.mean, post.std
            z = mean + std * torch.randn(mean.shape, generator=torch.Generator().manual_seed(SEED + 4))
            scaling = float(1.0 / z.std())
            rec = vae.decode(mean).sample
            log(f"VAE: reconstruction mse {F.mse_loss(rec, x_train).item():.5f}, latent std {z.std().item():.4f} "
                f"-> scaling_factor {scaling:.4f}")
        vae.register_to_config(scaling_factor=scaling)
        t_vae = time.time() - t_vae
        tok = build_tokenizer(os.path.join(out + ".tok-build"))
        t_unet = time.time()
        unet, text = train_unet(mean * scaling, std * scaling, y_train, tok, args.unet_steps)
        t_unet = time.time() - t_unet
        info = {"seed": SEED, "command": "python scripts/train_digits.py", "vae_steps": args.vae_steps,
                "unet_steps": args.unet_steps, "threads": args.threads, "vae_seconds": round(t_vae, 1),
                "unet_seconds": round(t_unet, 1), "scaling_factor": scaling, "torch": torch.__version__}
        save(out, vae, unet, text, tok, train_idx, test_idx, info)
        shutil.rmtree(out + ".tok-build", ignore_errors=True)
    if args.eval_per_digit > 0:
        quality_check(out, args.guidance, args.eval_per_digit, args.eval_steps)
    log("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
