"""The pickle rule: .ckpt/.bin/.pt/.pth are refused unless allow_pickle=True, then read weights-only."""
import os
import pickle

import pytest
import torch

from velodiff.loading import CheckpointError, find_weights, read_checkpoint, read_component, refuse_pickle


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".CKPT"])
def test_refused_by_default(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError) as info:
        read_checkpoint(path)
    msg = str(info.value)
    assert f"model{suffix}" in msg and "arbitrary code" in msg and "allow_pickle=True" in msg


def test_refuse_pickle_message():
    with pytest.raises(CheckpointError, match=r"'x\.ckpt'.*pickled.*allow_pickle=True.*weights_only=True"):
        refuse_pickle("x.ckpt")


def test_opt_in_reads_wrapped_ldm_checkpoint(tmp_path):
    path = tmp_path / "sd.ckpt"
    sd = {"model.diffusion_model.a": torch.randn(3, 3), "cond.ids": torch.arange(4)}
    torch.save({"state_dict": sd, "global_step": 470000}, path)
    out = read_checkpoint(path, allow_pickle=True, dtype=torch.float16)
    assert set(out) == set(sd)
    assert out["model.diffusion_model.a"].dtype == torch.float16
    assert torch.equal(out["model.diffusion_model.a"], sd["model.diffusion_model.a"].half())
    assert torch.equal(out["cond.ids"], sd["cond.ids"])


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_opt_in_still_refuses_code(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(CheckpointError, match=r"evil\.pt.*weights_only=True"):
        read_checkpoint(path, allow_pickle=True)


def test_component_folder_with_only_bin(tmp_path):
    torch.save({"w": torch.ones(2)}, tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin.*allow_pickle=True"):
        find_weights(tmp_path)
    assert torch.equal(read_component(tmp_path, allow_pickle=True)["w"], torch.ones(2))
