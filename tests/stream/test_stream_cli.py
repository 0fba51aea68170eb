"""``velodiff stream``: one output PNG per input frame, aligned with its input (the stream's lag undone), skipped
frames repeating the previous output, fps printed; bad input as one line naming the flag, exit code 2."""
import os
import re

import numpy as np
import pytest
from PIL import Image

from fixtures import quiet_pipeline, run_cli
from velodiff.stream import StreamPipeline


def write_frames(folder, count, size=16, repeat=1, seed=0):
    """``count`` random frames (each repeated ``repeat`` times in a row) as f000.png, f001.png, ..."""
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    arrays = []
    for _ in range(count):
        a = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
        arrays += [a] * repeat
    for k, a in enumerate(arrays):
        Image.fromarray(a).save(os.path.join(folder, f"f{k:03d}.png"))
    return arrays


def read(folder, name):
    return np.asarray(Image.open(os.path.join(folder, name)), dtype=np.int16)


def test_each_output_is_its_own_frames_result(tmp_path, capsys):
    arrays = write_frames(tmp_path / "in", 5)
    code, out, err = run_cli(["stream", "--input", str(tmp_path / "in"), "--outdir", str(tmp_path / "out"),
                              "--prompt", "a 3", "--t-index", "20,35,45"], capsys)
    assert code == 0, err
    assert sorted(os.listdir(tmp_path / "out")) == [f"f{k:03d}.png" for k in range(5)]
    assert "5 frames in" in out and "fps" in out and "stream batch of 3" in out
    alone = StreamPipeline(quiet_pipeline("digits"), [20, 35, 45], prompt="a 3", use_denoising_batch=False)
    for k, a in enumerate(arrays):
        want = np.asarray(alone(Image.fromarray(a)), dtype=np.int16)
        # batched vs one frame at a time: ~1e-6 apart before 8-bit rounding, so at most one level
        assert np.abs(read(tmp_path / "out", f"f{k:03d}.png") - want).max() <= 1


def test_skipped_frames_repeat_the_previous_output(tmp_path, capsys):
    write_frames(tmp_path / "in", 2, repeat=4)  # two distinct frames, each held for 4 frames
    code, out, err = run_cli(["stream", "--input", str(tmp_path / "in"), "--outdir", str(tmp_path / "out"),
                              "--similarity", "0.98"], capsys)
    assert code == 0, err
    assert "6 frames skipped" in out  # identical frames: cosine 1, skip probability 1
    outs = [read(tmp_path / "out", f"f{k:03d}.png") for k in range(8)]
    assert all(np.array_equal(outs[k], outs[0]) for k in range(4))
    assert all(np.array_equal(outs[k], outs[4]) for k in range(4, 8))
    assert not np.array_equal(outs[0], outs[4])


@pytest.mark.parametrize("setup,argv,message", [
    ("empty", [], "--input .* has no frames"),
    ("mixed", [], "--input .*: frame f001.png is 32x32 but f000.png is 16x16"),
    ("odd", [], "--input .*multiples of 2"),
    ("ok", ["--t-index", "32,50"], r"--t-index 32,50: \[50\] outside the schedule of --steps 50"),
    ("ok", ["--t-index", "45,32"], "--t-index 45,32: must be strictly increasing"),
    ("ok", ["--t-index", "3,a"], "--t-index: must be comma-separated step indices"),
    ("ok", ["--similarity", "1.5"], r"--similarity 1.5: must be a threshold in \[0, 1\]"),
    ("ok", ["--cfg-type", "half"], "--cfg-type: invalid choice"),
    ("ok", ["--tiny-vae", "nowhere"], "--tiny-vae 'nowhere' is not a folder"),
    ("missing", [], "--input .* is not a folder"),
])
def test_bad_input_is_one_line_naming_the_flag(tmp_path, capsys, setup, argv, message):
    folder = tmp_path / "in"
    if setup != "missing":
        folder.mkdir()
    if setup in ("ok", "mixed"):
        write_frames(folder, 1)
    if setup == "mixed":
        Image.new("RGB", (32, 32)).save(folder / "f001.png")
    if setup == "odd":
        Image.new("RGB", (15, 15)).save(folder / "f000.png")
    code, out, err = run_cli(["stream", "--input", str(folder), "--outdir", str(tmp_path / "out")] + argv, capsys)
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err


def test_tiny_vae_folder(tmp_path, capsys):
    """A diffusers AutoencoderTiny folder (factor 2, as digits' VAE) given with --tiny-vae encodes and decodes."""
    import torch
    from diffusers import AutoencoderTiny
    torch.manual_seed(0)
    tiny = AutoencoderTiny(encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
                           num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1))
    tiny.save_pretrained(str(tmp_path / "taesd"), safe_serialization=True)
    write_frames(tmp_path / "in", 3)
    code, out, err = run_cli(["stream", "--input", str(tmp_path / "in"), "--outdir", str(tmp_path / "out"),
                              "--tiny-vae", str(tmp_path / "taesd"), "--cfg-type", "none"], capsys)
    assert code == 0, err
    assert len(os.listdir(tmp_path / "out")) == 3
