"""bench/bench_highres.py's command line: bad flags give one line naming the flag and exit code 2; technique specs
that do not parse are skipped with a message, the others become configs."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import bench_highres  # noqa: E402


@pytest.mark.parametrize("argv, flag", [(["--sizes", "20"], "--sizes"), (["--sizes", "8"], "--sizes"),
                                        (["--per-class", "0"], "--per-class"), (["--batch-size", "0"], "--batch-size"),
                                        (["--seed", "-1"], "--seed")])
def test_bad_flags_exit_2_naming_the_flag(argv, flag, capsys):
    with pytest.raises(SystemExit) as e:
        bench_highres.parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and flag in err


def test_defaults_are_the_issue_table():
    args = bench_highres.parse_args([])
    assert args.sizes == [32, 48, 64] and args.per_class == 50 and args.methods == [] and not args.no_peer


def test_unknown_specs_are_skipped_with_a_message(capsys):
    configs = bench_highres.parse_methods(["deepcache:interval=3", "no_such_technique", "deepcache:bogus=1"])
    assert list(configs) == ["deepcache:interval=3"] and configs["deepcache:interval=3"][0].interval == 3
    err = capsys.readouterr().err
    assert "skipping method 'no_such_technique'" in err and "skipping method 'deepcache:bogus=1'" in err


def test_two_techniques_joined_by_plus():
    configs = bench_highres.parse_methods(["hidiffusion:fraction=0.5+split_cfg"])
    first, second = configs["hidiffusion:fraction=0.5+split_cfg"]
    assert first.fraction == 0.5 and type(second).__name__ == "SplitCFG"
