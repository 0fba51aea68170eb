"""Every subcommand reports bad input as one line naming the flag (and the fix), exit code 2, never a traceback;
what can be checked before loading the model is, and Ctrl-C stops a run with exit code 130.

Each case runs through ``velodiff.cli.main`` in this process; cases marked ``before_loading`` run with
``Pipeline.from_pretrained`` replaced by a function that fails the test, so they prove the check comes first.
Library errors (ValueError naming a Python argument) are checked both end to end (real pipelines) and through a
fake pipeline that raises the messages the library uses, so the mapping to flags is tested on its own.
"""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch

import velodiff.pipelines
from velodiff.cli import main
from velodiff.commands import args as cli_args
from velodiff.commands.errors import rename_arguments

from fixtures import run_cli

HAS_CUDA = torch.cuda.is_available()


def assert_one_line(code, err, command, flag, *more):
    assert code == 2, (code, err)
    assert "Traceback" not in err
    assert err.endswith("\n") and err.count("\n") == 1, f"not one line: {err!r}"
    assert err.startswith(f"velodiff {command}: "), err
    for text in (flag,) + more:
        assert text in err, (text, err)


@pytest.fixture
def files(tmp_path):
    """Paths the cases refer to: a pickled checkpoint, a plain file, a folder with a broken model_index.json, a
    single-file name, an existing folder holding a user's file."""
    paths = {}
    paths["ckpt"] = str(tmp_path / "model.ckpt")
    torch.save({"state_dict": {"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)}}, paths["ckpt"])
    paths["file"] = str(tmp_path / "a_file.txt")
    open(paths["file"], "w").write("not a folder")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline", ')
    paths["broken"] = str(broken)
    no_index = tmp_path / "no_index"
    no_index.mkdir()
    paths["no_index"] = str(no_index)
    paths["single"] = str(tmp_path / "model.safetensors")
    open(paths["single"], "wb").write(b"\0" * 16)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "mine.txt").write_text("the user's")
    paths["existing"] = str(existing)
    existing_file = tmp_path / "existing.safetensors"
    existing_file.write_bytes(b"the user's")
    paths["existing_file"] = str(existing_file)
    paths["new"] = str(tmp_path / "new")
    paths["tmp"] = str(tmp_path)
    return paths


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(velodiff.pipelines.Pipeline, "from_pretrained", staticmethod(refuse))


#: (argv with {placeholders} from ``files``, command, the flag the line must name, other text it must hold)
BEFORE_LOADING = [
    (["generate", "--prompt", "a 7", "--steps", "0"], "generate", "--steps", "positive integer"),
    (["generate", "--prompt", "a 7", "--steps", "-3"], "generate", "--steps", "positive integer"),
    (["generate", "--prompt", "a 7", "--sampler", "foo"], "generate", "--sampler", "dpmpp_2m"),
    (["generate", "--prompt", "a 7", "--guidance", "inf"], "generate", "--guidance", "finite"),
    (["generate", "--prompt", "a 7", "--guidance", "nan"], "generate", "--guidance", "finite"),
    (["generate", "--prompt", "a 7", "--guidance", "-1"], "generate", "--guidance", ">= 0"),
    (["generate", "--prompt", "a 7", "--width", "0"], "generate", "--width", "positive integer"),
    (["generate", "--prompt", "a 7", "--height", "-16"], "generate", "--height", "positive integer"),
    (["generate", "--prompt", "a 7", "--num-images", "0"], "generate", "--num-images", "positive integer"),
    (["generate", "--prompt", "a 7", "--model", "{ckpt}"], "generate", "--allow-pickle", "--model"),
    (["generate", "--prompt", "a 7", "--outdir", "{file}"], "generate", "--outdir", "is a file"),
    (["generate", "--prompt", "a 7", "--outdir", "{file}/sub"], "generate", "--outdir", "is a file"),
    (["generate", "--prompt", "a 7", "--model", "{broken}"], "generate", "--model", "not valid JSON"),
    (["generate", "--prompt", "a 7", "--model", "{no_index}"], "generate", "--model", "model_index.json"),
    (["generate", "--prompt", "a 7", "--model", "nope"], "generate", "--model", "not a built-in model"),
    (["generate"], "generate", "--prompt", "text-to-image"),
    (["generate", "--prompt", "a 7", "--class-label", "3"], "generate", "--class-label", "--prompt"),
    (["generate", "--model", "digits-dit", "--prompt", "a 7"], "generate", "--prompt", "--class-label"),
    (["generate", "--model", "digits-dit", "--class-label", "3", "--negative-prompt", "x"], "generate",
     "--negative-prompt", "--class-label"),
    (["generate", "--model", "digits-dit"], "generate", "--class-label", "class-conditional"),
    (["generate", "--prompt", "a 7", "--tokenizer", "digits"], "generate", "--tokenizer", "single-file"),
    (["generate", "--prompt", "a 7", "--model", "{single}", "--configs", "{{bad"], "generate", "--configs",
     "JSON"),
    (["generate", "--prompt", "a 7", "--dtype", "fp8"], "generate", "--dtype", "fp32"),
    (["generate", "--prompt", "a 7", "--bogus"], "generate", "--bogus"),
    (["eval", "--steps", "0"], "eval", "--steps", "positive integer"),
    (["eval", "--per-class", "0"], "eval", "--per-class", "positive integer"),
    (["eval", "--guidance", "nan"], "eval", "--guidance", "finite"),
    (["eval", "--sampler", "foo"], "eval", "--sampler", "dpmpp_2m"),
    (["eval", "--model", "nope"], "eval", "--model", "not a built-in model"),
    (["eval", "--model", "{ckpt}"], "eval", "--model", "velodiff convert"),
    (["eval", "--model", "{single}"], "eval", "--model", "velodiff convert"),
    (["quantize", "--method", "gptq", "--out", "{new}"], "quantize", "--method", "svdquant"),
    (["quantize", "--method", "svdquant", "--rank", "0", "--out", "{new}"], "quantize", "--rank"),
    (["quantize", "--method", "w8a8", "--out", "{existing}"], "quantize", "--out", "--force"),
    (["quantize", "--method", "w8a8", "--model", "nope", "--out", "{new}"], "quantize", "--model"),
    (["quantize", "--method", "w8a8", "--model", "{single}", "--out", "{new}"], "quantize", "--model",
     "velodiff convert"),
    (["quantize", "--method", "w8a8", "--memory-budget", "0.3", "--out", "{new}"], "quantize", "--memory-budget"),
    (["quantize", "--method", "svdquant", "--memory-budget", "-1", "--out", "{new}"], "quantize", "--memory-budget"),
    (["convert", "nope", "{new}.safetensors"], "convert", "SRC", "no such file"),
    (["convert", "{no_index}", "{new}.safetensors"], "convert", "SRC", "model_index.json"),
    (["convert", "digits", "{existing_file}"], "convert", "DST", "--force"),
    (["convert", "digits", "{new}.bin"], "convert", "DST", ".safetensors"),
    (["convert", "digits", "{new}.safetensors", "--tokenizer", "digits"], "convert", "--tokenizer", "only for"),
    (["convert", "{ckpt}", "{new}"], "convert", "--allow-pickle", "SRC"),
    (["convert", "{single}", "{existing}"], "convert", "DST", "--force"),
    (["convert", "digits", "{new}.safetensors", "--family", "sd9"], "convert", "--family", "sd1"),
    (["info", "--bogus"], "info", "--bogus"),
]
if not HAS_CUDA:
    BEFORE_LOADING += [
        (["generate", "--prompt", "a 7", "--device", "cuda"], "generate", "--device", "--device cpu"),
        (["eval", "--device", "cuda"], "eval", "--device", "--device cpu"),
        (["quantize", "--method", "w8a8", "--device", "cuda", "--out", "{new}"], "quantize", "--device"),
    ]


@pytest.mark.parametrize("argv, command, flag, more", [(c[0], c[1], c[2], c[3:]) for c in BEFORE_LOADING],
                         ids=[" ".join(c[0]) for c in BEFORE_LOADING])
def test_bad_input_is_one_line_naming_the_flag_before_loading(argv, command, flag, more, files, no_loading, capsys):
    argv = [a.format(**files) for a in argv]
    code, _, err = run_cli(argv, capsys)
    assert_one_line(code, err, command, flag, *more)
    if command == "generate" and "--outdir" in argv:
        assert os.path.isfile(files["file"])


def test_nothing_was_written_or_deleted_by_refusals(files, no_loading, capsys):
    for argv in (["quantize", "--method", "w8a8", "--out", files["existing"]],
                 ["convert", "digits", files["existing_file"]], ["convert", files["single"], files["existing"]]):
        run_cli(argv, capsys)
    assert os.listdir(files["existing"]) == ["mine.txt"]
    assert open(files["existing_file"], "rb").read() == b"the user's"
    assert not [n for n in os.listdir(files["tmp"]) if n.startswith(".")]  # no temporary leftovers


#: library errors end to end (the model is loaded, then the library refuses)
AFTER_LOADING = [
    (["generate", "--prompt", "a 7", "--steps", "5000"], "generate", "--steps", "at most"),
    (["generate", "--model", "digits-dit", "--class-label", "12", "--steps", "2"], "generate", "--class-label"),
]


@pytest.mark.parametrize("argv, command, flag, more", [(c[0], c[1], c[2], c[3:]) for c in AFTER_LOADING],
                         ids=[" ".join(c[0]) for c in AFTER_LOADING])
def test_library_errors_name_the_flag(argv, command, flag, more, tmp_path, capsys):
    code, _, err = run_cli(argv + ["--outdir", str(tmp_path / "o")], capsys)
    assert_one_line(code, err, command, flag, *more)
    assert not (tmp_path / "o").exists()


class FakePipeline:
    """A pipeline whose call raises ``error`` (the library's own messages, to test their mapping to flags)."""

    def __init__(self, error):
        self.error = error

    def set_progress_bar_config(self, disable=False):
        pass

    def __call__(self, prompt, negative_prompt=None, num_inference_steps=50, guidance_scale=None, height=None,
                 width=None, num_images_per_prompt=1, generator=None, sampler=None):
        raise self.error


#: (library error, the flag the line must name, text it must not keep)
LIBRARY_MESSAGES = [
    (ValueError("num_inference_steps=1000 is too many for sampler 'ddim' on this schedule: at most 999"), "--steps",
     "num_inference_steps"),
    (ValueError("height=100000 is more than the maximum 8192 pixels (pass max_size= to allow more)"), "--height",
     "height="),
    (ValueError("width must be a positive multiple of 8, got 12"), "--width", None),
    (ValueError("guidance_scale must be a finite number >= 0, got inf"), "--guidance", "guidance_scale"),
    (ValueError("prompt: 10000 characters, the tokenizer keeps 77 tokens"), "--prompt", None),
    (ValueError("negative_prompt must be a string or a list of strings"), "--negative-prompt", None),
    (ValueError("num_images_per_prompt must be a positive integer, got 0"), "--num-images", None),
    (TypeError("sampler must be a str, got int"), "--sampler", None),
]


@pytest.mark.parametrize("error, flag, gone", LIBRARY_MESSAGES, ids=[str(m[0])[:30] for m in LIBRARY_MESSAGES])
def test_library_messages_map_to_flags(error, flag, gone, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(velodiff.pipelines.Pipeline, "from_pretrained",
                        staticmethod(lambda *a, **k: FakePipeline(error)))
    code, _, err = run_cli(["generate", "--prompt", "a 7", "--outdir", str(tmp_path / "o")], capsys)
    assert_one_line(code, err, "generate", flag)
    if gone:  # the Python name is gone (only the flag, ``--height=...``, remains)
        assert not re.search(r"(?<![-\w])" + re.escape(gone), err), err


def test_loading_errors_are_attributed_to_model_and_pickle_flag_renamed(monkeypatch, tmp_path, capsys):
    from velodiff.loading import CheckpointError, MissingFileError

    def fail(error):
        def load(*args, **kwargs):
            raise error
        return staticmethod(load)
    monkeypatch.setattr(velodiff.pipelines.Pipeline, "from_pretrained", fail(CheckpointError(
        "'x/unet/diffusion_pytorch_model.bin' is a pickled checkpoint ... pass allow_pickle=True to the loading "
        "call; it is then read with torch.load(weights_only=True)")))
    code, _, err = run_cli(["generate", "--prompt", "a", "--outdir", str(tmp_path / "o")], capsys)
    assert_one_line(code, err, "generate", "--model digits", "pass --allow-pickle;")
    assert "allow_pickle=True" not in err
    monkeypatch.setattr(velodiff.pipelines.Pipeline, "from_pretrained",
                        fail(MissingFileError("'x/vae/config.json' does not exist")))
    code, _, err = run_cli(["generate", "--prompt", "a", "--outdir", str(tmp_path / "o")], capsys)
    assert_one_line(code, err, "generate", "--model digits: 'x/vae/config.json' does not exist")


def test_rename_arguments_leaves_paths_and_quotes_alone():
    assert rename_arguments("'/data/prompt/height.json': bad", "generate") == "'/data/prompt/height.json': bad"
    assert rename_arguments("Pass tokenizer=..., tokenizer_2=... to Pipeline.from_pretrained: a folder",
                            "generate") == "Pass --tokenizer ..., --tokenizer-2 ...: a folder"
    assert rename_arguments("tokenizer_2 must be a folder", "convert") == "--tokenizer-2 must be a folder"


def test_ctrl_c_in_process_is_one_line_and_130(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(velodiff.pipelines.Pipeline, "from_pretrained",
                        staticmethod(lambda *a, **k: FakePipeline(KeyboardInterrupt())))
    capsys.readouterr()
    assert main(["generate", "--prompt", "a 7", "--outdir", str(tmp_path / "o")]) == 130
    err = capsys.readouterr().err
    assert err == "velodiff generate: interrupted (Ctrl-C); stopped cleanly\n"
    assert not (tmp_path / "o").exists()


def test_eval_checks_its_dependencies_first(monkeypatch, no_loading, capsys):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "sklearn" else real(name, *a))
    code, _, err = run_cli(["eval"], capsys)
    assert_one_line(code, err, "eval", "scikit-learn", "pip install 'velodiff[eval]'")
    assert "scipy" not in err


def test_static_lists_match_the_registries():
    """The CLI keeps sampler, family and built-in names as constants so that --help imports no torch; they must
    be the registries' own."""
    import velodiff.accel
    from velodiff.loading import BUILTIN_MODELS, FAMILIES
    from velodiff.sampling import SAMPLERS
    assert set(cli_args.SAMPLER_NAMES) == set(SAMPLERS)
    assert tuple(cli_args.FAMILIES) == tuple(FAMILIES)
    assert {n: cli_args.builtin_folder(n) for n in cli_args.BUILTIN_NAMES} == BUILTIN_MODELS
    assert set(cli_args.TECHNIQUE_NAMES) == set(getattr(velodiff.accel, "TECHNIQUES", {}))


def _python(code: str, timeout=300):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def test_help_is_cheap_and_shows_defaults_and_samplers():
    out = _python("import sys, velodiff.cli as c\n"
                  "try:\n    c.main(['generate', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
                  "print('TORCH', 'torch' in sys.modules)")
    assert out.returncode == 0, out.stderr
    assert "TORCH False" in out.stdout  # parsing and --help import no torch
    text = " ".join(out.stdout.split())
    for needle in ("(default: 20)", "seed of the initial noise (default: 0)", "digits 3, digits-dit 1.5, Stable "
                   "Diffusion 7.5", "dpmpp_2m", "bdia", "flow_euler"):
        assert needle in text, needle
    out = _python("import velodiff.cli as c\ntry:\n    c.main(['eval', '--help'])\nexcept SystemExit:\n    pass")
    assert "(default: 100, so 1000 images)" in " ".join(out.stdout.split())


def test_subprocess_exit_code_2_and_no_traceback(tmp_path):
    (tmp_path / "mine.txt").write_text("the user's")
    for argv, flag in ((["generate", "--prompt", "a 7", "--steps", "0"], "--steps"),
                       (["generate", "--model", "digits-dit", "--class-label", "12", "--steps", "2", "--outdir",
                         str(tmp_path / "o")], "--class-label"),
                       (["quantize", "--method", "w8a8", "--out", str(tmp_path)], "--out")):
        out = subprocess.run([sys.executable, "-m", "velodiff.cli"] + argv, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 2, (argv, out.stderr)
        assert "Traceback" not in out.stderr and out.stderr.count("\n") == 1 and flag in out.stderr, out.stderr


def test_ctrl_c_during_generate_stops_cleanly(tmp_path):
    """SIGINT while a long generation runs: one line, exit code 130, no traceback, nothing written."""
    marker = tmp_path / "started"
    # SIGINT's Python handler, as in a terminal (a shell starts background jobs with SIGINT ignored)
    code = ("import signal, sys\nsignal.signal(signal.SIGINT, signal.default_int_handler)\n"
            "import velodiff.cli as c\n"
            f"open({str(marker)!r}, 'w').close()\n"
            f"sys.exit(c.main(['generate', '--prompt', 'a 7', '--steps', '900', '--sampler', 'ddim', '--num-images', "
            f"'64', '--outdir', {str(tmp_path / 'o')!r}]))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(6)  # inside main: denoising on an idle machine (importing or loading on a busy one)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == \
        "velodiff generate: interrupted (Ctrl-C); stopped cleanly"
    assert not (tmp_path / "o").exists()


def test_generate_guidance_default_is_the_models(monkeypatch, tmp_path, capsys):
    """Without --guidance the CLI passes none, so the pipeline's own (folder's) default applies."""
    seen = {}

    class Recorder(FakePipeline):
        def __call__(self, prompt, **kwargs):
            seen.update(kwargs)
            raise ValueError("stop here")
    monkeypatch.setattr(velodiff.pipelines.Pipeline, "from_pretrained",
                        staticmethod(lambda *a, **k: Recorder(None)))
    run_cli(["generate", "--prompt", "a 7", "--outdir", str(tmp_path / "o")], capsys)
    assert "guidance_scale" not in seen and seen["num_inference_steps"] == 20
    run_cli(["generate", "--prompt", "a 7", "--guidance", "2.5", "--outdir", str(tmp_path / "o")], capsys)
    assert seen["guidance_scale"] == 2.5


def test_configs_file_errors(tmp_path, no_loading, capsys, files):
    bad = tmp_path / "c.json"
    bad.write_text(json.dumps([1, 2]))
    for value in (str(bad), str(tmp_path / "missing.json")):
        code, _, err = run_cli(["generate", "--prompt", "a", "--model", files["single"], "--configs", value], capsys)
        assert_one_line(code, err, "generate", "--configs")


def test_warnings_are_one_line_each(tmp_path, capsys):
    """The library's warnings (here: a word the digits tokenizer does not know) print as one line naming the flag,
    not as Python's two-line file:line format."""
    capsys.readouterr()
    assert main(["generate", "--prompt", "a 7 zebra", "--steps", "2", "--outdir", str(tmp_path / "o")]) == 0
    err = capsys.readouterr().err
    assert err.startswith("velodiff generate: warning: --prompt: ") and "'zebra'" in err, err
    assert err.count("\n") == 1 and ".py:" not in err, err
