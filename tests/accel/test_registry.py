"""The technique registry: names, NAME:key=value specs, compatibility checks in optimize, restore."""
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest

import velodiff as vd
from velodiff.accel import TECHNIQUES, Technique, optimize, parse_technique, register, restore, technique_help
from velodiff.accel import registry as reg


@pytest.fixture
def scratch(monkeypatch):
    """A registry to register test techniques in, restored afterwards."""
    monkeypatch.setattr(reg, "TECHNIQUES", dict(TECHNIQUES))
    return reg.TECHNIQUES


class FakePipe:
    def __init__(self):
        self._restore_hooks, self._applied, self.log = [], [], []


def _toy(scratch, name, group=None, fits=True):
    @register(name)
    @dataclass(frozen=True)
    class Toy(Technique):
        level: int = 1
        ratio: float = 0.5
        on: bool = True
        label: Optional[str] = None
        ids: Tuple[int, ...] = (1, 2)

        def validate(self):
            if self.level < 0:
                raise ValueError(f"level must be >= 0, got {self.level}")

        def check(self, pipe):
            if not fits:
                raise ValueError(f"{name} does not fit this pipeline; use the other one")

        def apply(self, pipe):
            pipe.log.append(("apply", name))
            return lambda: pipe.log.append(("undo", name))
    Toy.group = group
    return Toy


def test_specs_parse_to_the_field_types(scratch):
    toy = _toy(scratch, "toy")
    assert parse_technique("toy") == toy()
    got = parse_technique("toy:level=3, ratio=0.25,on=false,label=x,ids=4/5/6")
    assert got == toy(level=3, ratio=0.25, on=False, label="x", ids=(4, 5, 6))
    assert parse_technique("toy:label=none").label is None
    assert technique_help("toy") == "toy:level=1,ratio=0.5,on=True,label=None,ids=1/2"


@pytest.mark.parametrize("spec, message", [
    ("nope", "unknown technique 'nope'; registered: .*toy"),
    ("toy:depth=2", "has no option 'depth'; its options: level, ratio, on, label, ids"),
    ("toy:level=two", r"level='two' is not a valid int"),
    ("toy:ratio=nan", r"ratio='nan' is not a valid float"),
    ("toy:on=maybe", r"on='maybe' is not a valid bool"),
    ("toy:level", "is not key=value"),
    ("toy:level=1,level=2", "level is given twice"),
    ("toy:level=-1", "level must be >= 0"),
    ("", "NAME"),
])
def test_bad_specs_say_what_is_wrong(scratch, spec, message):
    _toy(scratch, "toy")
    with pytest.raises(ValueError, match=message):
        parse_technique(spec)


def test_optimize_checks_fit_and_groups_before_applying(scratch):
    a, b = _toy(scratch, "cache_a", group="cache"), _toy(scratch, "cache_b", group="cache")
    misfit, other = _toy(scratch, "misfit", fits=False), _toy(scratch, "other")
    pipe = FakePipe()
    with pytest.raises(ValueError, match="cache_b and cache_a are both cache techniques"):
        optimize(pipe, a(), b())
    with pytest.raises(ValueError, match="does not fit this pipeline; use the other one"):
        optimize(pipe, other(), misfit())
    assert pipe.log == [] and pipe._applied == []  # nothing applied when any config is refused
    optimize(pipe, a(), other())
    with pytest.raises(ValueError, match="cache_b and cache_a"):
        optimize(pipe, b())
    restore(pipe)
    assert pipe.log == [("apply", "cache_a"), ("apply", "other"), ("undo", "other"), ("undo", "cache_a")]
    assert pipe._applied == []
    optimize(pipe, b())  # after restore the group is free
    assert pipe._applied == [b()]


def test_optimize_asks_both_configs_of_a_pair_whether_they_conflict(scratch):
    """conflicts_with is asked in both directions, within one optimize call and against what is applied."""
    picky, plain = _toy(scratch, "picky"), _toy(scratch, "plain_one")
    picky.conflicts_with = lambda self, other: "they fight" if getattr(other, "name", "") == "plain_one" else None
    pipe = FakePipe()
    for first, second in ((picky(), plain()), (plain(), picky())):
        pipe.log.clear()
        with pytest.raises(ValueError, match=f"{second.name} and {first.name} cannot be applied together: they fight"):
            optimize(pipe, first, second)
        assert pipe.log == [] and pipe._applied == []
        optimize(pipe, first)
        with pytest.raises(ValueError, match="cannot be applied together: they fight"):
            optimize(pipe, second)
        restore(pipe)
    optimize(pipe, picky(), _toy(scratch, "third")())  # no conflict: applied
    assert [c.name for c in pipe._applied] == ["picky", "third"]


def test_register_refuses_a_taken_name_and_non_dataclasses(scratch):
    _toy(scratch, "toy")
    with pytest.raises(ValueError, match="taken"):
        _toy(scratch, "toy")
    with pytest.raises(TypeError, match="dataclass"):
        register("plain")(type("Plain", (Technique,), {}))


def test_optimize_refuses_objects_without_apply():
    with pytest.raises(TypeError, match="no apply"):
        optimize(FakePipe(), object())


def test_builtin_techniques_are_registered_and_round_trip():
    assert {"attention_backend", "cpu_conv_prepack"} <= set(TECHNIQUES)
    assert parse_technique("attention_backend:backend=math") == vd.accel.AttentionBackend("math")
    assert parse_technique("cpu_conv_prepack:components=unet") == vd.accel.CPUConvPrepack(("unet",))
    with pytest.raises(ValueError, match="unknown attention backend"):
        vd.accel.AttentionBackend("nope")


def test_cli_optimize_flag(tmp_path, capsys):
    from velodiff.cli import main
    assert main(["generate", "--prompt", "a 3", "--steps", "2", "--outdir", str(tmp_path),
                 "--optimize", "attention_backend:backend=math"]) == 0
    assert main(["generate", "--prompt", "a 3", "--outdir", str(tmp_path), "--optimize", "nope"]) == 2
    err = capsys.readouterr().err
    assert "--optimize nope: unknown technique 'nope'" in err and "Traceback" not in err
