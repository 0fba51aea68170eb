"""``velodiff convert`` and ``velodiff generate`` on tiny offline pipelines, through ``velodiff.cli.main``."""
import json
import os

import numpy as np
import pytest
import torch

from fixtures import save_pipeline, tiny_sd_pipeline
from velodiff.cli import main
from velodiff.loading import read_safetensors_header

#: what the tiny SD1 fixture needs beyond the weights (see tests/pipelines/test_single_file_pipeline.py)
TINY_CONFIGS = {"unet": {"attention_head_dim": 4, "norm_num_groups": 8, "sample_size": 16},
                "vae": {"norm_num_groups": 2, "sample_size": 32},
                "text_encoder": {"num_attention_heads": 4, "hidden_act": "gelu"}}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pipe = tiny_sd_pipeline("sd15")
    return pipe, save_pipeline(pipe, str(tmp_path_factory.mktemp("cli") / "pipe"))


def _state(module):
    return {k: v for k, v in module.state_dict().items()}


def test_convert_round_trip_loads_in_diffusers(tiny, tmp_path, capsys):
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    theirs, folder = tiny
    single = str(tmp_path / "model.safetensors")
    assert main(["convert", folder, single]) == 0
    assert f"wrote {single} (sd1 single file" in capsys.readouterr().out
    configs = tmp_path / "configs.json"
    configs.write_text(json.dumps(TINY_CONFIGS))
    out = str(tmp_path / "out")
    assert main(["convert", single, out, "--configs", str(configs), "--tokenizer", folder]) == 0
    printed = capsys.readouterr().out
    assert f"wrote {out} (" in printed and "tokenizer" in printed and "note:" not in printed
    back = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    back.set_progress_bar_config(disable=True)
    for name in ("unet", "vae", "text_encoder"):
        a, b = _state(getattr(back, name)), _state(getattr(theirs, name))
        assert a.keys() == b.keys(), name
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert back.tokenizer("lower newer").input_ids == theirs.tokenizer("lower newer").input_ids
    kw = dict(prompt="lower newer", num_inference_steps=2, height=32, width=32, output_type="np")
    # the folder's own scheduler, recorded in the single file's metadata (a foreign file gets the family default)
    assert type(back.scheduler).__name__ == type(theirs.scheduler).__name__ == "DDIMScheduler"
    back.scheduler = theirs.scheduler = EulerDiscreteScheduler.from_config(back.scheduler.config)
    expect = theirs(generator=torch.Generator().manual_seed(0), **kw).images
    got = back(generator=torch.Generator().manual_seed(0), **kw).images
    assert np.abs(got - expect).max() <= 1e-5


def test_convert_options_and_messages(tiny, tmp_path, capsys):
    _, folder = tiny
    half = str(tmp_path / "half.safetensors")
    assert main(["convert", folder, half, "--dtype", "fp16"]) == 0
    tensors, metadata, _ = read_safetensors_header(half)
    assert {t.dtype for t in tensors.values()} == {torch.float16} and metadata["velodiff_family"] == "sd1"
    # no tokenizer given: written without one, and the message says how to add it
    out = str(tmp_path / "out")
    assert main(["convert", half, out, "--family", "sd1", "--prediction-type", "v_prediction",
                 "--configs", json.dumps(TINY_CONFIGS)]) == 0
    assert "note: a single file holds no tokenizer" in capsys.readouterr().out
    assert json.load(open(os.path.join(out, "scheduler", "scheduler_config.json")))["prediction_type"] == "v_prediction"
    assert json.load(open(os.path.join(out, "unet", "config.json")))["attention_head_dim"] == 4
    assert not os.path.exists(os.path.join(out, "tokenizer"))
    # refusals, each with a message naming what is wrong
    cases = [(["convert", half, out], "exists; nothing was written (pass --force"),
             (["convert", folder, str(tmp_path / "x.ckpt")], "name it *.safetensors"),
             (["convert", str(tmp_path / "nope"), out], "no such file or folder"),
             (["convert", folder, str(tmp_path / "y.safetensors"), "--tokenizer", folder], "--tokenizer: only for"),
             (["convert", str(tmp_path), str(tmp_path / "z.safetensors")], "not a diffusers pipeline folder")]
    ckpt = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, ckpt)
    cases.append((["convert", ckpt, str(tmp_path / "o2")], "--allow-pickle"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("velodiff convert: ") and message in err, (argv, err)
        assert err.count("\n") == 1, err  # one line


def test_generate_writes_images_grid_and_is_deterministic(tiny, tmp_path, capsys):
    import velodiff as vd
    from PIL import Image
    _, folder = tiny
    argv = ["generate", "--model", folder, "--prompt", "lower newer", "--num-images", "3", "--steps", "2",
            "--height", "32", "--width", "32", "--seed", "1"]
    first, second = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(argv + ["--outdir", first]) == 0
    assert main(argv + ["--outdir", second]) == 0
    assert "wrote 3 images and grid.png" in capsys.readouterr().out
    names = ["000.png", "001.png", "002.png", "grid.png"]
    assert sorted(os.listdir(first)) == names
    for name in names:  # same seed, byte-identical files
        assert open(os.path.join(first, name), "rb").read() == open(os.path.join(second, name), "rb").read()
    pipe = vd.Pipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    want = pipe("lower newer", num_inference_steps=2, num_images_per_prompt=3, height=32, width=32,
                generator=torch.Generator().manual_seed(1)).images
    got = [np.asarray(Image.open(os.path.join(first, f"{i:03d}.png"))) for i in range(3)]
    for g, w in zip(got, want):
        assert np.array_equal(g, np.asarray(w))
    assert not np.array_equal(got[0], got[1])  # three different samples, not one repeated
    grid = np.asarray(Image.open(os.path.join(first, "grid.png")))
    assert grid.shape == (64, 64, 3)  # 2 x 2 tiles of 32 x 32, row-major, the fourth empty
    assert np.array_equal(grid[:32, :32], got[0]) and np.array_equal(grid[:32, 32:], got[1])
    assert np.array_equal(grid[32:, :32], got[2]) and not grid[32:, 32:].any()


def test_generate_from_single_file(tiny, tmp_path):
    """--model may be a single file: --tokenizer and --configs make it load as the folder does."""
    _, folder = tiny
    single = str(tmp_path / "model.safetensors")
    assert main(["convert", folder, single]) == 0
    common = ["generate", "--prompt", "wider", "--steps", "2", "--height", "32", "--width", "32", "--seed", "2",
              "--sampler", "euler"]
    assert main(common + ["--model", folder, "--outdir", str(tmp_path / "f")]) == 0
    assert main(common + ["--model", single, "--tokenizer", folder, "--configs", json.dumps(TINY_CONFIGS),
                          "--outdir", str(tmp_path / "s")]) == 0
    from PIL import Image
    a = np.asarray(Image.open(tmp_path / "f" / "000.png")).astype(int)
    b = np.asarray(Image.open(tmp_path / "s" / "000.png")).astype(int)
    assert np.abs(a - b).max() <= 1
