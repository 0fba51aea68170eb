"""The built-in ``digits`` model (python/velodiff/data/digits, trained by scripts/train_digits.py): it ships,
loads by name, fits the size budget, drives ``velodiff generate`` with no --model, and is conditioned by its
prompt."""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from velodiff.pipelines import BUILTIN_MODELS, Pipeline

FOLDER = BUILTIN_MODELS["digits"]
#: the issue allows 10 MB for digits + digits-dit together; digits takes at most half
SIZE_BUDGET = 5 * 10 ** 6


@pytest.fixture(scope="module")
def pipe():
    p = Pipeline.from_pretrained("digits")
    p.set_progress_bar_config(disable=True)
    return p


def test_folder_ships_with_the_package():
    assert os.path.isdir(FOLDER), FOLDER
    assert FOLDER.startswith(os.path.dirname(os.path.dirname(os.path.abspath(
        __import__("velodiff").__file__))))
    for name in ("model_index.json", "README.md", "split.json", "unet/config.json",
                 "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                 "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                 "text_encoder/model.safetensors", "scheduler/scheduler_config.json"):
        assert os.path.isfile(os.path.join(FOLDER, name)), name
    assert os.listdir(os.path.join(FOLDER, "tokenizer"))


def test_size_under_budget():
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(FOLDER) for f in files)
    assert size < SIZE_BUDGET, f"{size / 1e6:.2f} MB"


def test_split_is_recorded():
    with open(os.path.join(FOLDER, "split.json")) as f:
        split = json.load(f)
    train, test = set(split["train"]), set(split["test"])
    assert not train & test and len(train | test) == 1797 and len(test) > 300


def test_components(pipe):
    from velodiff.models.unet import UNet2DConditionModel
    from velodiff.models.vae import AutoencoderKL
    from velodiff.pipelines import StableDiffusionPipeline
    assert isinstance(pipe, StableDiffusionPipeline)
    assert isinstance(pipe.unet, UNet2DConditionModel) and isinstance(pipe.vae, AutoencoderKL)
    assert type(pipe.text_encoder).__name__ == "CLIPTextModel"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size
    assert pipe.vae.config.latent_channels == 4 and pipe.vae_scale_factor == 2
    assert pipe.scheduler_config["_class_name"] == "DPMSolverMultistepScheduler"
    for prompt in ("a handwritten 7", "the digit seven", "number seven", "digit 7", "a 7"):
        ids = pipe.tokenizer(prompt).input_ids
        assert pipe.tokenizer.unk_token_id not in ids, prompt
    out = pipe("a handwritten 7", num_inference_steps=2, output_type="np")
    assert out.images.shape == (1, 16, 16, 3)  # native size by default


def test_generate_cli_default_model(tmp_path):
    from velodiff.cli import main
    assert main(["generate", "--prompt", "a handwritten 7", "--num-images", "4", "--outdir", str(tmp_path)]) == 0
    for name in ("000.png", "003.png", "grid.png"):
        assert (tmp_path / name).is_file(), name
    from PIL import Image
    assert Image.open(tmp_path / "000.png").size == (16, 16)
    assert Image.open(tmp_path / "grid.png").size == (32, 32)


def _features(images: torch.Tensor) -> np.ndarray:
    """[N, 3, 16, 16] in [0, 1] -> load_digits' [N, 64] in 0..16."""
    small = F.adaptive_avg_pool2d(images.float().mean(1, keepdim=True), 8)
    return (small.reshape(len(images), 64) * 16).clamp(0, 16).numpy()


def test_prompt_conditions_the_digit(pipe):
    sklearn = pytest.importorskip("sklearn")  # noqa: F841
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC
    with open(os.path.join(FOLDER, "split.json")) as f:
        test_idx = np.array(json.load(f)["test"])
    digits = load_digits()
    real = torch.tensor(digits.images[test_idx], dtype=torch.float32)[:, None] / 16
    real = F.interpolate(real, size=(16, 16), mode="bilinear", align_corners=False).repeat(1, 3, 1, 1)
    clf = SVC(C=10, gamma="scale").fit(_features(real), digits.target[test_idx])
    correct = 0
    cases = [(3, "a handwritten 3"), (7, "the digit seven"), (0, "number zero")]
    for digit, prompt in cases:
        out = pipe(prompt, num_inference_steps=10, num_images_per_prompt=10, output_type="pt",
                   generator=torch.Generator().manual_seed(digit))
        correct += int((clf.predict(_features(out.images)) == digit).sum())
    assert correct >= 18, f"{correct}/30 generated digits classified as asked"


def test_every_sampler_builds_from_the_digits_scheduler_config():
    """A folder's scheduler config (here DPMSolverMultistepScheduler's, with its None-valued keys) must be usable
    by every sampler a user may pick."""
    from velodiff.pipelines.scheduling import make_plan
    from velodiff.sampling import SAMPLERS
    pipe = Pipeline.from_pretrained("digits")
    for name in sorted(SAMPLERS):
        if name == "flow_euler":
            continue  # flow matching: not an epsilon model's sampler
        sampler, plan = make_plan(name, pipe.scheduler_config, 7)
        assert sampler == name and len(plan.calls) >= 7
