"""read_safetensors: exact round trips, dtype/device handling, and clear errors on damaged files."""
import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file

from velodiff.loading import CheckpointError, read_safetensors, read_safetensors_header, write_safetensors


def _sample():
    g = torch.Generator().manual_seed(0)
    return {"w32": torch.randn(4, 6, generator=g), "w16": torch.randn(3, 5, generator=g).half(),
            "wbf": torch.randn(7, generator=g).bfloat16(), "ids": torch.arange(10, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5), "empty": torch.zeros(0, 3)}


@pytest.fixture
def sample_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file(_sample(), str(path))
    return path


def test_round_trip_exact(sample_file):
    out = read_safetensors(sample_file)
    ref = _sample()
    assert list(out) == list(ref) or set(out) == set(ref)
    for k, v in ref.items():
        assert out[k].dtype == v.dtype and out[k].shape == v.shape and torch.equal(out[k], v), k


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtype_casts_only_floating(sample_file, dtype):
    out = read_safetensors(sample_file, dtype=dtype)
    ref = _sample()
    for k, v in ref.items():
        if v.is_floating_point():
            assert out[k].dtype == dtype and torch.equal(out[k], v.to(dtype)), k
        else:
            assert out[k].dtype == v.dtype and torch.equal(out[k], v), k


def test_keys_subset_and_missing_key(sample_file):
    out = read_safetensors(sample_file, keys=["ids", "w16"])
    assert list(out) == ["ids", "w16"]
    with pytest.raises(CheckpointError, match=r"weights\.safetensors.*'nope'"):
        read_safetensors(sample_file, keys=["w16", "nope"])


def test_write_and_read_back_with_shared_storage(tmp_path):
    base = torch.randn(4, 4)
    sd = {"a": base, "b": base, "c": base[1:], "d": base.t()}
    path = tmp_path / "shared.safetensors"
    write_safetensors(sd, path, metadata={"format": "pt"})
    out = read_safetensors(path)
    for k in sd:
        assert torch.equal(out[k], sd[k]), k
    assert read_safetensors_header(path)[1] == {"format": "pt"}


@pytest.mark.parametrize("bad", [torch.int32, "float16", torch.bool, 16])
def test_wrong_dtype_request(sample_file, bad):
    with pytest.raises(TypeError, match=r"weights\.safetensors.*dtype"):
        read_safetensors(sample_file, dtype=bad)


def test_empty_and_tiny_files(tmp_path):
    for n in (0, 5):
        p = tmp_path / f"short{n}.safetensors"
        p.write_bytes(b"\x00" * n)
        with pytest.raises(CheckpointError, match=rf"short{n}\.safetensors.*truncated"):
            read_safetensors(p)


def test_header_length_past_end(sample_file):
    data = bytearray(sample_file.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 4)
    sample_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weights\.safetensors.*header claims"):
        read_safetensors(sample_file)


def test_corrupt_header_json(sample_file):
    data = bytearray(sample_file.read_bytes())
    data[8] = ord("#")
    sample_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"weights\.safetensors.*not valid JSON"):
        read_safetensors(sample_file)


def _rewrite_header(path, edit):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["w32"].update(dtype="F7"), "unsupported dtype"),
    (lambda h: h["w32"].update(shape=[4, 7]), "does not hold"),
    (lambda h: h["w32"].update(shape=[4, -6]), "corrupt shape"),
    (lambda h: h["w32"].update(data_offsets=[10 ** 9, 10 ** 9 + 96]), "end past the data section"),
    (lambda h: h.update(w32=[1, 2]), "corrupt header entry"),
])
def test_corrupt_entries_name_the_key(sample_file, edit, message):
    _rewrite_header(sample_file, edit)
    with pytest.raises(CheckpointError, match=rf"weights\.safetensors.*'w32'.*{message}"):
        read_safetensors(sample_file)


def test_truncated_data_names_the_key(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"first": torch.ones(10), "last": torch.ones(1000)}, str(path))
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*'last'.*truncated"):
        read_safetensors(path)


@settings(max_examples=25, deadline=None)
@given(cut=st.integers(min_value=0, max_value=10_000))
def test_any_truncation_is_a_checkpoint_error(tmp_path_factory, cut):
    path = tmp_path_factory.mktemp("t") / "w.safetensors"
    save_file({"a": torch.arange(300, dtype=torch.float32), "b": torch.ones(2, 3).half()}, str(path))
    full = path.read_bytes()
    cut = cut % len(full)
    path.write_bytes(full[:cut])
    with pytest.raises(CheckpointError, match=r"w\.safetensors"):
        read_safetensors(path)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="nothere"):
        read_safetensors(tmp_path / "nothere.safetensors")


@pytest.mark.parametrize("src, dst", [(torch.float32, torch.float16), (torch.bfloat16, torch.float32)])
def test_cast_larger_than_the_staging_buffer(tmp_path, src, dst):
    g = torch.Generator().manual_seed(1)
    big = torch.randn(4_500_001, generator=g).to(src)  # > 16 MB in fp32, odd length: a partial last chunk
    path = tmp_path / "big.safetensors"
    save_file({"big": big, "small": big[:7].clone()}, str(path))
    out = read_safetensors(path, dtype=dst, device="cpu")
    assert torch.equal(out["big"], big.to(dst)) and torch.equal(out["small"], big[:7].to(dst))
