"""``velodiff quantize`` writes a folder that ``velodiff generate`` and ``velodiff eval`` load like any model."""
import json

import pytest

from velodiff.cli import main


@pytest.mark.parametrize("method", ["svdquant", "naive-w4a4", "w8a8"])
def test_quantize_then_generate_and_eval(method, tmp_path, capsys):
    out = str(tmp_path / method)
    args = ["quantize", "--model", "digits", "--method", method, "--out", out, "--calibration-images", "2",
            "--calibration-steps", "3"]
    if method == "svdquant":
        args += ["--rank", "8"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"quantized 32 layers of the unet with {method}" in printed and out in printed
    assert main(["generate", "--model", out, "--prompt", "a handwritten 5", "--steps", "4", "--num-images", "2",
                 "--guidance", "3", "--outdir", str(tmp_path / "img")]) == 0
    assert (tmp_path / "img" / "001.png").is_file() and (tmp_path / "img" / "grid.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--model", out, "--steps", "4", "--per-class", "2", "--guidance", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == out and result["num_images"] == 20 and result["conditional_accuracy"] > 0.5


def test_quantize_errors(tmp_path, capsys):
    assert main(["quantize", "--model", str(tmp_path / "nothing"), "--method", "w8a8", "--out",
                 str(tmp_path / "o")]) == 2
    assert "velodiff quantize:" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["quantize", "--method", "gptq", "--out", str(tmp_path / "o")])


def test_quantize_memory_budget(tmp_path, capsys):
    out = str(tmp_path / "budget")
    assert main(["quantize", "--model", "digits", "--method", "svdquant", "--rank", "8", "--layers", "all",
                 "--memory-budget", "0.45", "--out", out, "--calibration-images", "2", "--calibration-steps", "2"]) == 0
    printed = capsys.readouterr().out
    rank = int(printed.split("(rank ")[1].split(")")[0])
    assert 0 < rank < 8, printed
    ratio = float(printed.split("(denoiser ")[1].split("x fp16")[0])
    assert ratio <= 0.45
    assert main(["quantize", "--model", "digits", "--method", "svdquant", "--memory-budget", "0.1", "--out",
                 str(tmp_path / "o")]) == 2
    assert "--memory-budget=0.1 cannot be met" in capsys.readouterr().err


def test_quantized_folder_keeps_the_models_default_guidance(tmp_path, capsys):
    """Defaults travel with the folder: generate from a quantized digits folder without --guidance uses digits'
    own 3 (not Stable Diffusion's 7.5), because quantize copies model_index.json's settings."""
    out = str(tmp_path / "q")
    assert main(["quantize", "--model", "digits", "--method", "w8a8", "--out", out, "--calibration-images", "1",
                 "--calibration-steps", "2"]) == 0
    assert json.load(open(tmp_path / "q" / "model_index.json"))["_velodiff_defaults"]["guidance_scale"] == 3.0
    common = ["generate", "--model", out, "--prompt", "a handwritten 5", "--steps", "3", "--seed", "2"]
    for name, extra in (("default", []), ("g3", ["--guidance", "3"]), ("g75", ["--guidance", "7.5"])):
        assert main(common + extra + ["--outdir", str(tmp_path / name)]) == 0
    image = {n: (tmp_path / n / "000.png").read_bytes() for n in ("default", "g3", "g75")}
    assert image["default"] == image["g3"] != image["g75"]
    # an existing --out is refused unless --force, and --force keeps the files quantize does not write
    (tmp_path / "q" / "notes.txt").write_text("the user's")
    assert main(["quantize", "--method", "w8a8", "--out", out, "--calibration-images", "1"]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["quantize", "--method", "w8a8", "--out", out, "--calibration-images", "1", "--calibration-steps",
                 "2", "--force"]) == 0
    assert (tmp_path / "q" / "notes.txt").read_text() == "the user's"
