"""Shared pieces of the scripts that train LoRAs for the built-in ``digits`` model (distill_lcm.py,
train_style_lora.py): their common flags, PEFT-style initial factors, the trainable tensors of velodiff's LoRA
branches, and the diffusers / PEFT file they are saved to."""
from __future__ import annotations

import os
from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn


def training_parser(description: str, out: str, steps: int, rank: int, lr: float):
    """A parser (one-line errors, exit 2) with the flags every LoRA training script takes: --out, --steps,
    --batch, --rank, --lr, --seed, --threads."""
    from velodiff.commands.args import Parser
    ap = Parser(description=description)
    ap.add_argument("--out", default=out)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=rank)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    return ap


def check_training_args(ap, args, more=()) -> None:
    """Refuse out-of-range common flags (and ``more``: (flag, value, lowest)) with one line, then set the thread
    count and the seed."""
    for flag, value, low in (("--steps", args.steps, 40), ("--batch", args.batch, 1), ("--rank", args.rank, 1),
                             ("--threads", args.threads, 1), ("--seed", args.seed, 0)) + tuple(more):
        if value < low:
            ap.error(f"{flag} must be >= {low}, got {value}")
    if not args.lr > 0:
        ap.error(f"--lr must be > 0, got {args.lr}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)


def initial_lora(unet: nn.Module, rank: int, gen: torch.Generator, targets: Sequence[str]) -> Dict[str, torch.Tensor]:
    """PEFT-style initial factors for every nn.Linear / nn.Conv2d whose name ends with one of ``targets``: A uniform
    in +-1/sqrt(K), B zero (the adapted model starts as the base model)."""
    state = {}
    for name, m in unet.named_modules():
        if not name.endswith(tuple(targets)) or not isinstance(m, (nn.Linear, nn.Conv2d)):
            continue
        if isinstance(m, nn.Linear):
            k, shape_a, shape_b = m.in_features, (rank, m.in_features), (m.out_features, rank)
        else:
            k = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
            shape_a, shape_b = (rank, m.in_channels, *m.kernel_size), (m.out_channels, rank, 1, 1)
        state[f"unet.{name}.lora_A.weight"] = (torch.rand(shape_a, generator=gen) * 2 - 1) / k ** 0.5
        state[f"unet.{name}.lora_B.weight"] = torch.zeros(shape_b)
    return state


def trainable_branches(unet: nn.Module) -> Tuple[List[Tuple[str, object]], List[torch.Tensor]]:
    """(name, LoraBranch) of every layer carrying a LoRA, and their down / up tensors made trainable."""
    branches = [(n, m._velodiff_lora) for n, m in unet.named_modules() if hasattr(m, "_velodiff_lora")]
    params = [t.requires_grad_(True) for _, b in branches for t in (b.down, b.up)]
    return branches, params


def save_lora(branches, rank: int, out: str, metadata: Dict[str, str]) -> int:
    """Write the first ``rank`` ranks of every branch as a diffusers / PEFT LoRA (float16); returns the tensor count."""
    from velodiff.loading.safetensors_io import write_safetensors
    state = {}
    for name, b in branches:
        state[f"unet.{name}.lora_A.weight"] = b.down[:rank].detach().half().contiguous()
        state[f"unet.{name}.lora_B.weight"] = b.up[:, :rank].detach().half().contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_safetensors(state, out, metadata=metadata)
    return len(state)
