"""load_state_dict_into: exact loads, and errors naming the source file, the keys and the shapes."""
import pytest
import torch
from torch import nn

from velodiff.loading import CheckpointError, check_state_dict, load_state_dict_into


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))


def test_exact_load():
    src, dst = _net(), nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    load_state_dict_into(dst, src.state_dict(), source="model.safetensors")
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v)


def test_missing_key():
    sd = _net().state_dict()
    del sd["2.bias"]
    with pytest.raises(CheckpointError, match=r"'model\.safetensors'.*1 missing key\(s\): '2\.bias'"):
        load_state_dict_into(_net(), sd, source="model.safetensors")


def test_unexpected_key():
    sd = {**_net().state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"'ckpt\.safetensors'.*unexpected key\(s\): 'extra\.weight'"):
        load_state_dict_into(_net(), sd, source="ckpt.safetensors")


def test_shape_mismatch_names_expected_and_found():
    sd = _net().state_dict()
    sd["0.weight"] = torch.zeros(8, 5)
    with pytest.raises(CheckpointError, match=r"'a\.safetensors'.*'0\.weight': expected \(8, 4\), found \(8, 5\)"):
        load_state_dict_into(_net(), sd, source="a.safetensors")
    # shapes are checked even when strict=False
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_state_dict_into(_net(), sd, source="a.safetensors", strict=False)


def test_non_strict_allows_missing_and_unexpected():
    sd = _net().state_dict()
    del sd["2.bias"]
    sd["extra"] = torch.zeros(1)
    load_state_dict_into(_net(), sd, source="x.safetensors", strict=False)


def test_long_key_lists_are_capped():
    net = nn.Sequential(*[nn.Linear(2, 2) for _ in range(15)])
    with pytest.raises(CheckpointError) as info:
        check_state_dict(net, {}, source="big.safetensors")
    msg = str(info.value)
    assert "30 missing key(s)" in msg and "(and 20 more)" in msg and msg.count("weight'") + msg.count("bias'") == 10


def test_assign_keeps_the_given_dtype():
    sd = {k: v.half() for k, v in _net().state_dict().items()}
    dst = load_state_dict_into(_net(), sd, source="h.safetensors", assign=True)
    assert all(p.dtype == torch.float16 for p in dst.parameters())
