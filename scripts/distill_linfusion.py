#!/usr/bin/env python3
"""Distil LinFusion modules for the built-in ``digits`` model (velodiff's ``linfusion`` technique).

    nice -n 19 python scripts/distill_linfusion.py            # seed 0, 2 CPU threads; writes the shipped weights
    python scripts/distill_linfusion.py --steps 50 --out /tmp/lf   # a quick try elsewhere

LinFusion's recipe (Huage001/LinFusion ``src/train/distill.py``), scaled down to a 16x16 model on two CPU cores:

- teacher: the digits UNet, frozen; student: a copy whose every self-attention (``attn1``, 4 layers) is a LinFusion
  module (velodiff.accel.highres.linfusion). Trained: only the LinFusion modules' new parameters, the residual MLPs
  of q and k (width C, as LinFusion-1-5); with ``--train-projections`` also their to_q / to_k / to_v / to_out.
- loss (LinFusion's weights): MSE(eps_student, noise) + 0.5 MSE(eps_student, eps_teacher) + 0.5 * mean over the
  layers of MSE(attn1_student, attn1_teacher), the attn1 outputs captured by forward hooks (each network's own
  attn1 inputs, as in the reference).
- data: what digits was trained on (scripts/train_digits.py): the 1347 training digits of ``split.json`` rendered at
  16x16, VAE-encoded (a fresh posterior sample per use), noised at uniform random timesteps of SD's scaled_linear
  schedule; a random prompt template per sample ("a handwritten 7", "the digit seven", ...), replaced by the empty
  prompt 12% of the time. The text encoder is frozen, so the prompt embeddings are computed once.
- optimiser: AdamW (weight decay 0), one-cycle learning rate peaking at ``--lr``, gradient clipping at 1.

Where it differs from the reference, and why: the student starts from the teacher's own to_q / to_k / to_v / to_out
with the MLPs' last Linear zero-initialised (so q = W_q x at step 0) instead of a fresh random module: a warm start
that a few hundred CPU steps need; batch 32 instead of 96 (6 x 8 GPUs x 2); 400 steps; a higher learning rate
(1e-3) with a one-cycle schedule.

Output (``--out``, default python/velodiff/data/digits/linfusion): ``diffusion_pytorch_model.safetensors`` in
LinFusion's published key layout (all 68 keys: MLPs and projections, float16 like the rest of the model folder),
``config.json`` (LinFusion's ``modules_list``) and ``distillation.json`` (command, seed, steps, losses, time).
Seeded (torch generators, fixed thread count): a rerun on the same machine gives the same weights.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import sys
import time

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from train_digits import DROP_PROMPT, TEMPLATES, WORDS, load_data  # noqa: E402

DEFAULT_OUT = os.path.join(HERE, "..", "python", "velodiff", "data", "digits", "linfusion")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


def alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SD's scaled_linear schedule (the digits scheduler's): prod(1 - beta), beta = linspace(sqrt b0, sqrt b1)^2."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0).float()


def prompt_embeddings(pipe):
    """([10, T, L, D] embeddings of every template for every digit, [L, D] of the empty prompt)."""
    texts = [t.format(n=d, w=WORDS[d]) for d in range(10) for t in TEMPLATES]
    with torch.no_grad():
        emb = pipe._encode(texts).float()
        empty = pipe._encode([""]).float()[0]
    return emb.view(10, len(TEMPLATES), *emb.shape[1:]), empty


def encode_training_digits(pipe):
    """(posterior mean [N, 4, 8, 8], posterior std, labels [N]) of the training digits, in raw VAE latents."""
    images, labels, train_idx, _ = load_data()
    with torch.no_grad():
        post = pipe.vae.encode(images[train_idx])
    return post.mean.float(), post.std.float(), labels[train_idx]


def noised_batch(pipe, mean, std, labels, emb, empty, alphas, batch: int, gen: torch.Generator):
    """(z_t, t, prompt embeddings, noise) of ``batch`` training digits: a fresh posterior sample each, a random
    prompt template (the empty prompt DROP_PROMPT of the time), a uniform random timestep of ``alphas``."""
    j = torch.randint(0, len(labels), (batch,), generator=gen)
    z0 = pipe.vae.vae_to_latents(mean[j] + std[j] * torch.randn(mean[j].shape, generator=gen))
    tmpl = torch.randint(0, emb.shape[1], (batch,), generator=gen)
    drop = torch.rand(batch, generator=gen) < DROP_PROMPT
    ctx = torch.where(drop[:, None, None], empty[None], emb[labels[j], tmpl])
    t = torch.randint(0, len(alphas), (batch,), generator=gen)
    noise = torch.randn(z0.shape, generator=gen)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * z0 + (1 - a).sqrt() * noise, t, ctx, noise


def attn1_outputs(unet, names):
    """Forward hooks appending each named layer's output to a list; returns (list, handles)."""
    outs, handles = [], []
    modules = dict(unet.named_modules())
    for name in names:
        handles.append(modules[name].register_forward_hook(lambda m, a, out: outs.append(out)))
    return outs, handles


def build_student(teacher, train_projections: bool):
    """A copy of ``teacher`` with LinFusion attn1 layers (MLP last Linear zeroed); returns (student, params)."""
    from velodiff.accel.highres.linfusion import LinFusionAttention, fresh_plans, install_linfusion
    student = copy.deepcopy(teacher)
    install_linfusion(student, fresh_plans(student), None)
    student.requires_grad_(False)
    params = []
    for module in student.modules():
        if isinstance(module, LinFusionAttention):
            for mlp in (module.to_q_, module.to_k_):
                torch.nn.init.zeros_(mlp[3].weight)
                torch.nn.init.zeros_(mlp[3].bias)
                params += list(mlp.parameters())
            if train_projections:
                params += [p for m in (module.to_q, module.to_k, module.to_v, module.to_out)
                           for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    return student, params


def save(out: str, student, record: dict) -> None:
    from safetensors.torch import save_file

    from velodiff.accel.highres.linfusion import WEIGHTS_NAME, linfusion_layer_names, linfusion_state_dict
    os.makedirs(out, exist_ok=True)
    tensors = {k: v.half().contiguous() for k, v in linfusion_state_dict(student).items()}
    save_file(tensors, os.path.join(out, WEIGHTS_NAME), metadata={"format": "pt"})
    modules = dict(student.named_modules())
    config = {"_class_name": "LinFusion", "modules_list": [
        {"module_name": name, "dim_n": int(modules[name].to_q.weight.shape[1]), "heads": int(modules[name].heads),
         "projection_mid_dim": None} for name in linfusion_layer_names(student)]}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out, "distillation.json"), "w") as f:
        json.dump(record, f, indent=2)
    log(f"saved {out} ({len(tensors)} tensors)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--train-projections", action="store_true", help="also train to_q / to_k / to_v / to_out")
    ap.add_argument("--log-every", type=int, default=50)
    args = ap.parse_args(argv)
    for flag, value, low in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--threads", args.threads, 1),
                             ("--seed", args.seed, 0), ("--log-every", args.log_every, 1)):
        if value < low:
            ap.error(f"{flag} must be >= {low}, got {value}")
    if not args.lr > 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    import velodiff as vd
    from velodiff.accel.highres.linfusion import linfusion_layer_names
    pipe = vd.Pipeline.from_pretrained("digits")
    teacher = pipe.unet.eval().requires_grad_(False)
    names = linfusion_layer_names(teacher)
    emb, empty = prompt_embeddings(pipe)
    mean, std, labels = encode_training_digits(pipe)
    alphas = alphas_cumprod()
    student, params = build_student(teacher, args.train_projections)
    student.train()
    log(f"teacher: digits UNet; student: {len(names)} LinFusion layers, {sum(p.numel() for p in params):,} trained "
        f"parameters{' (MLPs and projections)' if args.train_projections else ' (MLPs)'}; {len(labels)} training "
        f"digits; {args.steps} steps of batch {args.batch}, AdamW one-cycle peak lr {args.lr:g}, seed {args.seed}")
    t_out, t_hooks = attn1_outputs(teacher, names)
    s_out, s_hooks = attn1_outputs(student, names)
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.05,
                                                final_div_factor=20)
    gen = torch.Generator().manual_seed(args.seed + 1)
    first = running = None
    t_start, t_last = time.time(), time.time()
    for step in range(args.steps):
        zt, t, ctx, noise = noised_batch(pipe, mean, std, labels, emb, empty, alphas, args.batch, gen)
        t_out.clear(), s_out.clear()
        with torch.no_grad():
            eps_teacher = teacher(zt, t, ctx)
        eps = student(zt, t, ctx)
        loss_noise = F.mse_loss(eps, noise)
        loss_kd = F.mse_loss(eps, eps_teacher)
        loss_feat = sum(F.mse_loss(s, te) for s, te in zip(s_out, t_out)) / len(names)
        loss = loss_noise + 0.5 * loss_kd + 0.5 * loss_feat
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        parts = torch.stack([loss, loss_noise, loss_kd, loss_feat]).detach()
        if running is None:
            first = running = parts
        else:
            running = 0.98 * running + 0.02 * parts
        if step % args.log_every == 0 or step == args.steps - 1:
            now = time.time()
            per = (now - t_last) / (args.log_every if step else 1)
            log(f"step {step:5d}  loss {running[0]:.5f} (noise {running[1]:.5f}, kd {running[2]:.6f}, attn1 "
                f"{running[3]:.6f})  lr {sched.get_last_lr()[0]:.2e}  {per:.3f} s/step")
            t_last = now
    for h in t_hooks + s_hooks:
        h.remove()
    seconds = time.time() - t_start
    given = argv if argv is not None else sys.argv[1:]
    record = {"command": " ".join(["python scripts/distill_linfusion.py"] + [shlex.quote(a) for a in given]),
              "seed": args.seed, "steps": args.steps, "batch": args.batch, "lr": args.lr, "threads": args.threads,
              "trained": "MLPs and projections" if args.train_projections else "MLPs",
              "loss": "MSE(eps, noise) + 0.5 MSE(eps, eps_teacher) + 0.5 mean_layers MSE(attn1, attn1_teacher)",
              "first_loss": {k: round(float(v), 6) for k, v in zip(("total", "noise", "kd", "attn1"), first)},
              "final_running_loss": {k: round(float(v), 6) for k, v in
                                     zip(("total", "noise", "kd", "attn1"), running)},
              "seconds": round(seconds, 1), "torch": torch.__version__}
    log(f"done: {args.steps} steps in {seconds:.0f} s; final running loss {record['final_running_loss']}")
    save(os.path.abspath(args.out), student.eval(), record)
    return 0


if __name__ == "__main__":
    sys.exit(main())
