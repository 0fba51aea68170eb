"""The issue's two commands, ``velodiff eval --optimize deepcache:interval=3 --json`` and ``velodiff eval --model
digits-dit --optimize teacache --json`` (here on 20 images, 8 steps): the command line's numbers are the Python
API's with the same technique applied, the technique is recorded, and it changed the images (the judged numbers
differ from the uncached run's)."""
import json

import pytest

import velodiff as vd
from velodiff.accel import optimize, parse_technique
from velodiff.cli import main
from velodiff.eval.harness import evaluate

SMALL = dict(per_class=2, steps=8)
NUMBERS = ("conditional_accuracy", "per_class_accuracy", "frechet_distance", "model_evaluations_per_image")


@pytest.mark.parametrize("model,spec", [("digits", "deepcache:interval=3"), ("digits-dit", "teacache")])
def test_eval_optimize_json_matches_the_api(model, spec, capsys):
    code = main(["eval", "--model", model, "--optimize", spec, "--per-class", str(SMALL["per_class"]),
                 "--steps", str(SMALL["steps"]), "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = json.loads(captured.out)
    assert result["optimize"] == [spec] and result["num_images"] == 20 and result["steps"] == SMALL["steps"]

    pipe = vd.Pipeline.from_pretrained(model)
    uncached = evaluate(pipe, **SMALL)
    optimize(pipe, parse_technique(spec))
    api = evaluate(pipe, **SMALL)
    for key in NUMBERS:
        assert result[key] == api[key], key
    # the cache ran: the images, hence the Frechet distance, moved (bit-identical images would give equal FDs)
    assert api["frechet_distance"] != uncached["frechet_distance"]
