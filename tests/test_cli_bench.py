"""``velodiff bench generate``: a technique timed against the same model without it, interleaved, with PSNR."""
import json

import pytest

from velodiff.cli import main


def test_bench_generate_json(capsys):
    assert main(["bench", "generate", "--optimize", "attention_backend:backend=math", "--steps", "2",
                 "--num-images", "2", "--rounds", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["area"] == "generate" and out["optimize"] == ["attention_backend:backend=math"]
    assert out["model_evaluations"] == {"plain": 2, "optimized": 2} and out["rounds"] == 2
    assert out["seconds_plain"]["median"] > 0 and out["speedup"]["min"] <= out["speedup"]["median"]
    assert out["psnr_db"]["min"] > 100  # the math backend equals SDPA up to rounding


def test_bench_generate_dit_text(capsys):
    assert main(["bench", "generate", "--model", "digits-dit", "--optimize", "attention_backend:backend=math",
                 "--steps", "2", "--num-images", "1", "--rounds", "1"]) == 0
    text = capsys.readouterr().out
    assert "speed-up" in text and "digits-dit" in text


@pytest.mark.parametrize("argv, flag", [
    (["bench", "generate"], "--optimize"),
    (["bench", "generate", "--optimize", "nope"], "--optimize nope"),
    (["bench", "generate", "--optimize", "attention_backend:backend=math", "--model", "digits-dit", "--prompt", "a"],
     "--prompt"),
])
def test_bench_bad_input_names_the_flag(capsys, argv, flag):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bench_unknown_area(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "sampler", "--optimize", "x"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err
