"""``velodiff calibrate-cache`` and the DiT caches on the command line: a calibration that TeaCache takes, bad input
as one line naming the flag (exit 2) before anything loads, ``--help`` without torch, and
``velodiff eval --optimize`` with a cache that does not fit."""
import json
import subprocess
import sys

import pytest

import velodiff as vd
import velodiff.pipelines
from velodiff.accel.cache import TeaCache
from velodiff.accel.cache.calibrate import model_identity
from velodiff.cli import main

from fixtures import run_cli, saved_and_loaded, tiny_pixart_pipeline




def one_line(code, err, *needles):
    assert code == 2, (code, err)
    assert "Traceback" not in err and err.count("\n") == 1 and err.startswith("velodiff calibrate-cache: "), err
    for needle in needles:
        assert needle in err, (needle, err)


def test_calibrate_writes_a_file_teacache_takes(tmp_path, capsys):
    out = str(tmp_path / "t.json")
    argv = ["calibrate-cache", "--model", "digits-dit", "--method", "teacache", "--out", out, "--num-samples", "3",
            "--steps", "4", "5", "--batch-size", "2", "--seed", "1"]
    code, stdout, err = run_cli(argv, capsys)
    assert code == 0, err
    assert "fitted teacache on" in stdout and out in stdout
    data = json.load(open(out))
    pipe = vd.Pipeline.from_pretrained("digits-dit")
    assert {k: data["model"][k] for k in ("class", "num_blocks", "config_sha256")} == model_identity(pipe.transformer)
    assert data["fit"]["steps"] == [4, 5] and data["fit"]["num_samples"] == 3 and len(data["coefficients"]) == 5
    # 3 labels x (cond, uncond) x (3 + 4) transitions
    assert data["fit"]["points"] == 3 * 2 * 7
    assert "--num-samples 3 --steps 4 5" in data["made_with"]["command"]
    assert TeaCache(calibration=out).resolved_coefficients(pipe.transformer) == tuple(data["coefficients"])
    # an existing --out is refused without --force, replaced with it
    code, _, err = run_cli(argv, capsys)
    one_line(code, err, "--out", "--force")
    code, _, err = run_cli(argv + ["--force"], capsys)
    assert code == 0, err


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(velodiff.pipelines.Pipeline, "from_pretrained", staticmethod(refuse))


@pytest.mark.parametrize("extra, flag, more", [
    (["--model", "digits"], "--model", "StableDiffusionPipeline"),
    (["--model", "/nonexistent/folder"], "--model", "no such file"),
    (["--model", "digits-dit", "--prompt", "a 7"], "--prompt", "class-conditional"),
    (["--model", "digits-dit", "--degree", "8"], "--degree", "at most 7"),
    (["--model", "digits-dit", "--steps", "1"], "--steps", "at least 2"),
    (["--model", "digits-dit", "--steps", "0"], "--steps", "positive integer"),
    (["--model", "digits-dit", "--num-samples", "-2"], "--num-samples", "positive integer"),
    (["--model", "digits-dit", "--guidance", "nan"], "--guidance", "finite"),
    (["--model", "digits-dit", "--sampler", "nope"], "--sampler", "dpmpp_2m"),
    (["--model", "digits-dit", "--method", "fbcache"], "--method", "teacache"),
])
def test_bad_input_is_one_line_before_loading(extra, flag, more, tmp_path, no_loading, capsys):
    argv = ["calibrate-cache", "--method", "teacache", "--out", str(tmp_path / "t.json")] + extra
    code, _, err = run_cli(argv, capsys)
    assert code == 2 and "Traceback" not in err and err.count("\n") == 1, err
    assert flag in err and more in err, err


def test_out_is_checked_before_loading(tmp_path, no_loading, capsys):
    base = ["calibrate-cache", "--model", "digits-dit", "--method", "teacache", "--out"]
    code, _, err = run_cli(base + [str(tmp_path)], capsys)
    one_line(code, err, "--out", "is a folder")
    code, _, err = run_cli(base + [str(tmp_path / "missing" / "t.json")], capsys)
    one_line(code, err, "--out", "does not exist")
    (tmp_path / "t.json").write_text("{}")
    code, _, err = run_cli(base + [str(tmp_path / "t.json")], capsys)
    one_line(code, err, "--out", "exists")
    assert (tmp_path / "t.json").read_text() == "{}"


def test_text_models_need_prompts(tmp_path, capsys):
    folder = str(tmp_path / "pixart")
    saved_and_loaded(tiny_pixart_pipeline(), folder)
    out = str(tmp_path / "p.json")
    code, _, err = run_cli(["calibrate-cache", "--model", folder, "--method", "teacache", "--out", out], capsys)
    one_line(code, err, "--prompt", "text-conditioned")
    code, _, err = run_cli(["calibrate-cache", "--model", folder, "--method", "teacache", "--out", out, "--prompt",
                            "a red fox", "--prompt", "the digit seven", "--num-samples", "2", "--steps", "3"], capsys)
    assert code == 0, err
    assert json.load(open(out))["model"]["class"] == "PixArtTransformer2DModel"


def test_help_imports_no_torch():
    out = subprocess.run([sys.executable, "-c", "import sys, velodiff.cli as c\ntry:\n    c.main(['calibrate-cache', "
                          "'--help'])\nexcept SystemExit as e:\n    assert e.code == 0\nprint('TORCH', 'torch' in "
                          "sys.modules)"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "TORCH False" in out.stdout and "(default: 64)" in out.stdout and "--num-samples" in out.stdout


def test_eval_with_a_dit_cache_that_does_not_fit(capsys):
    # (a fitting one: tests/accel/test_cache_eval_cli.py) a config that does not fit the model is one line naming
    # --optimize
    code = main(["eval", "--model", "digits-dit", "--optimize", "dbcache:fn_compute_blocks=6", "--per-class", "1"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "fn_compute_blocks + bn_compute_blocks" in err, err
