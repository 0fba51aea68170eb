"""velodiff.eval.evaluate and ``velodiff eval`` on tiny random-weight stand-in pipelines (chance-level accuracy)."""
import json

import pytest

from fixtures import save_pipeline, tiny_dit_pipeline, tiny_sd_pipeline
from velodiff.cli import main
from velodiff.eval import RESULT_KEYS, class_label_step, evaluate, format_table, generation_step, prompt_step
from velodiff.pipelines import Pipeline

FAST = dict(steps=2, per_class=1, n_boot=50, fd_boot=10, warmup=False)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    return save_pipeline(tiny_sd_pipeline("sd15"), str(tmp_path_factory.mktemp("eval") / "sd"))


@pytest.fixture(scope="module")
def sd(sd_folder):
    return Pipeline.from_pretrained(sd_folder)


def test_evaluate_keys_and_reproducibility(sd):
    a = evaluate(sd, batch_size=3, height=16, width=16, **FAST)
    assert tuple(a) == RESULT_KEYS
    assert a["num_images"] == 10 and a["image_size"] == [16, 16] and a["conditioning"] == "prompt"
    assert a["sampler"] == "dpmpp_2m" and a["model_evaluations_per_image"] == 2 and a["seconds_per_image"] > 0
    assert 0 <= a["conditional_accuracy"] <= 1 and len(a["per_class_accuracy"]) == 10
    assert a["frechet_distance_ci"][0] <= a["frechet_distance"] <= a["frechet_distance_ci"][1]
    assert a["classifier_heldout_accuracy"] > 0.95 and a["classifier_cv_accuracy"] > 0.95
    assert a["frechet_distance_floor"] > 0 and a["frechet_distance_floor_n"] == 10
    assert a["versions"]["torch"] and a["machine"]["device"] == "cpu" and a["pipe_kwargs"] == {"height": 16,
                                                                                                "width": 16}
    # the same seed gives the same images whatever the batch size; another seed gives others
    b = evaluate(sd, batch_size=10, height=16, width=16, **FAST)
    assert b["frechet_distance"] == pytest.approx(a["frechet_distance"], rel=1e-6)
    assert b["conditional_accuracy"] == a["conditional_accuracy"]
    c = evaluate(sd, batch_size=10, seed=1, height=16, width=16, **FAST)
    assert c["frechet_distance"] != pytest.approx(a["frechet_distance"], rel=1e-6)
    text = format_table({"model": "tiny", **a})
    for label in ("conditional accuracy", "Frechet distance", "floor (real digits)", "seconds per image", "tiny"):
        assert label in text


def test_prompts_follow_the_template(sd, monkeypatch):
    seen = []
    original = type(sd).__call__

    def spy(self, prompt, *args, **kwargs):
        seen.extend(prompt)
        return original(self, prompt, *args, **kwargs)

    monkeypatch.setattr(type(sd), "__call__", spy)
    evaluate(sd, prompt_template="the digit {word} ({d})", **FAST)
    assert seen == [f"the digit {w} ({d})" for d, w in enumerate(
        ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])]


def test_dit_gets_class_labels(tmp_path):
    folder = save_pipeline(tiny_dit_pipeline(), str(tmp_path / "dit"))
    pipe = Pipeline.from_pretrained(folder)
    assert generation_step(pipe) is class_label_step
    result = evaluate(pipe, sampler="ddim", guidance=1.0, **FAST)
    assert result["conditioning"] == "class_label" and result["prompt_template"] is None
    assert result["num_images"] == 10 and result["model_evaluations_per_image"] == 2


def test_generation_step_default_is_prompt(sd):
    assert generation_step(sd) is prompt_step


@pytest.mark.parametrize("kwargs, name", [
    (dict(per_class=0), "per_class"), (dict(steps=0), "steps"), (dict(batch_size=0), "batch_size"),
    (dict(seed=-1), "seed"), (dict(guidance=-1.0), "guidance"), (dict(sampler="nope"), "sampler"),
    (dict(prompt_template="a handwritten digit"), "prompt_template"), (dict(prompt_template="{x}"), "prompt_template"),
    (dict(upsample="cubic"), "upsample"), (dict(steps=2.5), "steps")])
def test_evaluate_bad_arguments_name_them(sd, kwargs, name):
    with pytest.raises(ValueError, match=name):
        evaluate(sd, **kwargs)


def test_cli_eval_json(sd_folder, capsys):
    args = ["eval", "--model", sd_folder, "--steps", "2", "--per-class", "1", "--sampler", "euler",
            "--guidance", "3", "--seed", "4"]
    assert main(args + ["--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert tuple(data) == ("model", "optimize") + RESULT_KEYS and data["optimize"] == []
    assert data["model"] == sd_folder and data["sampler"] == "euler" and data["steps"] == 2
    assert data["guidance"] == 3.0 and data["seed"] == 4 and data["num_images"] == 10
    for key in ("conditional_accuracy", "frechet_distance", "frechet_distance_floor", "seconds_per_image",
                "classifier_heldout_accuracy"):
        assert isinstance(data[key], float)


@pytest.mark.parametrize("argv, flag", [
    (["--per-class", "0"], "--per-class"), (["--steps", "x"], "--steps"), (["--sampler", "nope"], "--sampler"),
    (["--guidance", "-1"], "--guidance"), (["--seed", "-3"], "--seed"), (["--upsample", "cubic"], "--upsample")])
def test_cli_eval_bad_arguments_name_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        main(["eval"] + argv)
    assert e.value.code == 2 and flag in capsys.readouterr().err


def test_cli_eval_missing_model(tmp_path, capsys):
    assert main(["eval", "--model", str(tmp_path / "missing"), "--per-class", "1"]) == 2
    assert "--model" in capsys.readouterr().err
