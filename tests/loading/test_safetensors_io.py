"""read_safetensors: exact round trips, dtype/device handling, and clear errors on damaged files."""
import json
import os
import struct

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors.torch import save_file

from velodiff.loading import CheckpointError, read_safetensors, read_safetensors_header, write_safetensors
from velodiff.loading.safetensors_io import MAX_HEADER_BYTES


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


def _swap_offsets(h, a, b):
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]


@pytest.mark.parametrize("key, edit, message", [
    ("w32", lambda h: h["w32"].update(dtype="F7"), "unknown dtype 'F7'"),
    ("w32", lambda h: h["w32"].update(dtype="F4", shape=[192]), "unsupported dtype 'F4'"),
    ("w32", lambda h: h["w32"].update(dtype={"F32": None}), "corrupt dtype"),
    ("w32", lambda h: h["w32"].update(shape=[4, 7]), "does not hold 112 bytes"),
    ("w32", lambda h: h["w32"].update(shape=[4, -6]), "corrupt shape"),
    ("w32", lambda h: h["w32"].update(shape=[4, True]), "corrupt shape"),
    ("w32", lambda h: h["w32"].update(shape=[2 ** 32, 2 ** 32, 0]), "overflows 64 bits"),
    ("w32", lambda h: h["w32"].update(shape=[0, 2 ** 32, 2 ** 32]), "torch cannot hold"),
    ("w32", lambda h: h["w32"].update(data_offsets=[10 ** 9, 10 ** 9 + 96]), "end past the data section"),
    ("w32", lambda h: h["w32"].update(data_offsets=h["w32"]["data_offsets"][::-1]), "reversed"),
    ("w32", lambda h: h["w32"].update(data_offsets=[0, 96, 96]), "corrupt data_offsets"),
    ("w32", lambda h: h["w32"].pop("data_offsets"), "missing data_offsets"),
    ("w32", lambda h: h.update(w32=[1, 2]), "corrupt header entry"),
    # the writer stores ids at [0, 80), an empty tensor and a 4-byte scalar at 80, then w32 at [84, 180)
    ("w32", lambda h: h["w32"].update(data_offsets=[40, 136]), "overlaps tensor 'ids', which ends at 80"),
    ("w32", lambda h: h["w32"].update(data_offsets=[88, 184]), "leaves a gap of 4 bytes after tensor 'scalar'"),
    ("ids", lambda h: _swap_offsets(h, "w32", "ids"), "does not hold 80 bytes"),
])
def test_corrupt_entries_name_the_key(sample_file, key, edit, message):
    _rewrite_header(sample_file, edit)
    with pytest.raises(CheckpointError, match=rf"weights\.safetensors', key '{key}': .*{message}"):
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


# ---------------------------------------------------------------------------------------------------
# header-level refusals: each names the file and the field at fault
# ---------------------------------------------------------------------------------------------------

_A = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'


def _raw_file(path, header: bytes, body: bytes = bytes(8), length=None):
    path.write_bytes(struct.pack("<Q", len(header) if length is None else length) + header + body)
    return path


@pytest.mark.parametrize("header, body, message", [
    ("{" + _A + "," + _A + "}", bytes(8), r"the name 'a' appears twice"),
    ('{"__metadata__":{"k":1},' + _A + "}", bytes(8), r"'__metadata__' key 'k' holds int"),
    ('{"__metadata__":["k"],' + _A + "}", bytes(8), r"'__metadata__' must be a map of strings to strings"),
    ('{"__metadata__":{"k":"1","k":"2"},' + _A + "}", bytes(8), r"the name 'k' appears twice"),
    ("{" + _A + "}", bytes(9), r"1 stray byte\(s\) after tensor 'a'"),
    ("{}", b"x", r"1 stray byte\(s\) after the header \(no tensor\)"),
    ("[]", b"", r"a JSON object was expected, got list"),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', bytes(8), r"not valid JSON: NaN"),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1e400}}', bytes(8), r"number out of range"),
    ('{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', bytes(8), r"lone UTF-16 surrogate"),
    ('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "[" * 200 + "]" * 200 + "}}", bytes(8),
     r"nested deeper than 127"),
    ('{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b"", r"key 'a': corrupt shape \[-0.0\]"),
])
def test_header_refusals_name_the_field(tmp_path, header, body, message):
    path = _raw_file(tmp_path / "h.safetensors", header.encode(), body)
    with pytest.raises(CheckpointError, match=rf"h\.safetensors.*{message}"):
        read_safetensors_header(path)


def test_non_utf8_header(tmp_path):
    path = _raw_file(tmp_path / "u.safetensors", b'{"\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}')
    with pytest.raises(CheckpointError, match=r"u\.safetensors.*not valid UTF-8"):
        read_safetensors(path)


def test_oversized_header_length_is_refused_before_reading(tmp_path):
    path = _raw_file(tmp_path / "big.safetensors", b"{}", b"", length=MAX_HEADER_BYTES + 1)
    with pytest.raises(CheckpointError, match=r"big\.safetensors.*claims 100000001 bytes, above the format's limit"):
        read_safetensors(path)


def test_valid_unusual_layouts_read(tmp_path):
    """What the format allows and a strict reader must not refuse: entries out of offset order, padding
    around the JSON, empty tensors sharing an offset, extra fields, null metadata."""
    header = ('  {"__metadata__":null,"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8],"note":[1,{"x":null}]},'
              '"e":{"dtype":"I8","shape":[0,3],"data_offsets":[4,4]},'
              '"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}\n\t ')
    body = struct.pack("<ff", 1.5, -2.0)
    path = _raw_file(tmp_path / "odd.safetensors", header.encode(), body)
    out = read_safetensors(path)
    assert list(out) == ["b", "e", "a"]
    assert out["a"].item() == 1.5 and out["b"].item() == -2.0 and out["e"].shape == (0, 3)
    assert read_safetensors_header(path)[1] == {}


def test_keys_must_be_a_list_not_a_string(sample_file):
    with pytest.raises(TypeError, match=r"weights\.safetensors.*keys must be a list"):
        read_safetensors(sample_file, keys="w16")


def test_more_dtypes_read_and_cast(tmp_path):
    """complex64 and the fp8 variants read as stored; a cast request converts only the floating ones."""
    g = torch.Generator().manual_seed(3)
    sd = {"c": torch.randn(3, dtype=torch.complex64, generator=g),
          "e4fnuz": torch.randn(5, generator=g).to(torch.float8_e4m3fnuz),
          "e8m0": torch.rand(4, generator=g).add(0.5).to(torch.float8_e8m0fnu),
          "u16": torch.arange(6, dtype=torch.int32).to(torch.uint16)}
    path = tmp_path / "more.safetensors"
    save_file(sd, str(path))
    out = read_safetensors(path)
    for k, v in sd.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k].view(torch.uint8), v.view(torch.uint8)), k
    cast = read_safetensors(path, dtype=torch.float32)
    assert cast["c"].dtype == torch.complex64 and cast["u16"].dtype == torch.uint16
    assert torch.equal(cast["e4fnuz"], sd["e4fnuz"].float()) and torch.equal(cast["e8m0"], sd["e8m0"].float())


# ---------------------------------------------------------------------------------------------------
# the writer: files the official library reads identically
# ---------------------------------------------------------------------------------------------------

_WRITE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
                 torch.int16, torch.int8, torch.uint8, torch.bool, torch.complex64, torch.float8_e4m3fn,
                 torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64]


@st.composite
def _state_dicts(draw):
    names = draw(st.lists(st.text(max_size=6).filter(lambda s: s != "__metadata__"), max_size=5, unique=True))
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(_WRITE_DTYPES))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        layout = draw(st.sampled_from(["plain", "strided", "transposed", "shared"]))
        if layout == "shared" and out:  # a view of an earlier tensor's storage
            base = out[draw(st.sampled_from(sorted(out)))]
            out[name] = base if draw(st.booleans()) else base.reshape(-1)[: max(base.numel() - 1, 0)]
            continue
        full = list(shape)
        if layout == "strided" and full:
            full[-1] *= 2
        numel = 1
        for d in full:
            numel *= d
        g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31)))
        raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
        t = (raw % 2 if dtype == torch.bool else raw).view(dtype).reshape(full)
        if layout == "strided" and full:
            t = t[..., ::2]
        elif layout == "transposed" and t.dim() >= 2:
            t = t.transpose(0, 1)
        out[name] = t
    metadata = draw(st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=3))
    return out, metadata


def _bytes_of(t):
    """A tensor's bytes as a flat uint8 tensor (an empty tensor's strides can be anything, and ``contiguous()``
    keeps a size-1 dimension's stride, e.g. 2, which ``view`` refuses: copy into fresh row-major storage)."""
    if not t.numel():
        return torch.empty(0, dtype=torch.uint8)
    return torch.empty_like(t, memory_format=torch.contiguous_format).copy_(t).reshape(-1).view(torch.uint8)


@settings(max_examples=40, deadline=None)
@given(case=_state_dicts())
def test_writer_output_reads_identically_everywhere(tmp_path_factory, case):
    from safetensors import safe_open
    from safetensors.torch import load

    sd, metadata = case
    path = tmp_path_factory.mktemp("w") / "w.safetensors"
    write_safetensors(sd, path, metadata=metadata)
    with safe_open(str(path), framework="pt") as f:
        official = {k: f.get_tensor(k) for k in f.keys()}
        official_meta = f.metadata() or {}
    loaded = load(path.read_bytes())
    ours = read_safetensors(path)
    assert set(official) == set(loaded) == set(ours) == set(sd)
    for k, v in sd.items():
        for who, got in (("safe_open", official[k]), ("load", loaded[k]), ("velodiff", ours[k])):
            assert got.dtype == v.dtype and got.shape == v.shape, (who, k)
            assert torch.equal(_bytes_of(got), _bytes_of(v)), (who, k)
    assert official_meta == read_safetensors_header(path)[1] == (metadata or {})


@pytest.mark.parametrize("sd, error, message", [
    ({"__metadata__": torch.ones(2)}, CheckpointError, r"'__metadata__': the name is reserved"),
    ({1: torch.ones(2)}, CheckpointError, r"key 1: tensor names must be str"),
    ({"x": [1.0]}, CheckpointError, r"'x': not a tensor"),
    ({"x": torch.ones(2, dtype=torch.complex128)}, CheckpointError, r"'x': dtype torch.complex128"),
    ({"x": torch.eye(2).to_sparse()}, CheckpointError, r"'x': a torch.sparse_coo tensor"),
])
def test_writer_refusals_name_the_key(tmp_path, sd, error, message):
    with pytest.raises(error, match=rf"bad\.safetensors.*{message}"):
        write_safetensors(sd, tmp_path / "bad.safetensors")
    assert not (tmp_path / "bad.safetensors").exists()


@pytest.mark.parametrize("metadata", [{"k": 1}, {2: "v"}, ["k", "v"]])
def test_writer_metadata_must_map_str_to_str(tmp_path, metadata):
    with pytest.raises(TypeError, match=r"m\.safetensors.*metadata"):
        write_safetensors({"x": torch.ones(1)}, tmp_path / "m.safetensors", metadata=metadata)


def test_written_file_mode_follows_the_umask(tmp_path):
    """safetensors' save_file leaves mode 0600; files velodiff writes get 0666 less the umask like any other."""
    import os
    import stat
    old = os.umask(0o027)
    try:
        write_safetensors({"x": torch.ones(2)}, tmp_path / "a.safetensors")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.safetensors").st_mode) == 0o640
