"""Reading and writing safetensors files without going through pickle.

The reader parses the header itself so that a truncated or corrupt file is caught before any tensor is
read (the header length, its JSON, every tensor's dtype, shape and byte range), and it converts tensor by
tensor into the requested dtype and device, so peak host memory stays near the size of the result.
"""
from __future__ import annotations

import json
import os
import struct
import sys
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

from velodiff.loading.errors import CheckpointError, list_keys

PathLike = Union[str, "os.PathLike[str]"]

#: safetensors dtype names -> torch dtypes (those this torch build knows)
SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format caps the header at 100 MB


class TensorInfo(Tuple[str, torch.dtype, Tuple[int, ...], int, int]):
    """(name, dtype, shape, begin, end): one header entry; begin/end are offsets into the data section."""

    __slots__ = ()

    def __new__(cls, name, dtype, shape, begin, end):
        return super().__new__(cls, (name, dtype, tuple(shape), begin, end))

    name = property(lambda self: self[0])
    dtype = property(lambda self: self[1])
    shape = property(lambda self: self[2])
    begin = property(lambda self: self[3])
    end = property(lambda self: self[4])


def read_safetensors_header(path: PathLike) -> Tuple[Dict[str, TensorInfo], Dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns ``(tensors, metadata, data_start)``: header entries by name, the ``__metadata__`` strings and
    the file offset where the data section begins. Raises :class:`CheckpointError` naming the file (and
    the key) if the header length, the JSON, a dtype, a shape or a byte range is wrong.
    """
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path!r}: not a safetensors file: {size} bytes, shorter than the "
                                      "8-byte header length (truncated or empty file)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(f"{path!r}: corrupt or truncated safetensors file: the header claims "
                                      f"{n} bytes but the file has {size - 8} after the length field")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path!r}: cannot read the file: {e}") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path!r}: corrupt safetensors header (not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path!r}: corrupt safetensors header (a JSON object was expected)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + n
    data_size = size - data_start
    tensors: Dict[str, TensorInfo] = {}
    for name, entry in header.items():
        where = f"{path!r}, key {name!r}"
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
            raise CheckpointError(f"{where}: corrupt header entry {entry!r}")
        dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
        if dtype is None:
            raise CheckpointError(f"{where}: unsupported dtype {entry['dtype']!r}")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if (not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape)
                or not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) for o in offsets)):
            raise CheckpointError(f"{where}: corrupt shape {shape!r} or data_offsets {offsets!r}")
        begin, end = offsets
        numel = 1
        for d in shape:
            numel *= d
        expected = numel * torch.empty((), dtype=dtype).element_size()
        if not 0 <= begin <= end or end - begin != expected:
            raise CheckpointError(f"{where}: byte range [{begin}, {end}) does not hold {expected} bytes of "
                                  f"{entry['dtype']} {tuple(shape)}")
        if end > data_size:
            raise CheckpointError(f"{where}: truncated file: the tensor's bytes [{begin}, {end}) end past the "
                                  f"data section ({data_size} bytes)")
        tensors[name] = TensorInfo(name, dtype, shape, begin, end)
    return tensors, dict(metadata), data_start


_CHUNK_BYTES = 16 * 2 ** 20  # staging buffer of a casting read


def _read_exact(f, dst: torch.Tensor, path: str, key: str) -> None:
    """Fill the uint8 tensor ``dst`` from ``f``; a short read is a truncated file."""
    n = dst.numel()
    if n and f.readinto(memoryview(dst.numpy())) != n:
        raise CheckpointError(f"{path!r}, key {key!r}: truncated file (short read)")


def _check_dtype(dtype: Optional[torch.dtype], path: str) -> None:
    if dtype is None:
        return
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"read_safetensors({path!r}, dtype={dtype!r}): dtype must be a floating torch.dtype "
                        "(torch.float32, torch.float16, torch.bfloat16, ...) or None to keep the stored dtypes")


def read_safetensors(path: PathLike, *, dtype: Optional[torch.dtype] = None, device: Union[str, torch.device] = "cpu",
                     keys: Optional[Iterable[str]] = None) -> Dict[str, torch.Tensor]:
    """Read a safetensors file into a dict of tensors, straight into ``dtype`` and ``device``.

    Only floating tensors are cast to ``dtype``; integer and bool tensors keep their dtype. Tensors are
    read one at a time straight into their result tensor (a cast goes through a 16 MB staging buffer), so
    peak host memory is the size of the result plus 16 MB; with a GPU ``device``, one tensor at a time.
    ``keys`` restricts the read to those names (each must exist). A truncated or corrupt file raises
    :class:`CheckpointError` naming the file and the key.
    """
    path = os.fspath(path)
    _check_dtype(dtype, path)
    device = torch.device(device)
    if sys.byteorder != "little":
        raise CheckpointError(f"{path!r}: safetensors data is little-endian; big-endian hosts are not supported")
    tensors, _, data_start = read_safetensors_header(path)
    if keys is not None:
        keys = list(keys)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CheckpointError(f"{path!r}: requested key(s) not in the file: {list_keys(missing)}")
        wanted = [tensors[k] for k in keys]
    else:
        wanted = list(tensors.values())
    wanted.sort(key=lambda t: t.begin)  # sequential reads
    out: Dict[str, torch.Tensor] = {}
    staging = None
    with open(path, "rb") as f:
        for info in wanted:
            target = dtype if (dtype is not None and info.dtype.is_floating_point) else info.dtype
            t = torch.empty(info.shape, dtype=target)
            f.seek(data_start + info.begin)
            if target == info.dtype:  # straight into the result
                _read_exact(f, t.reshape(-1).view(torch.uint8), path, info.name)
            else:  # through a small staging buffer, so no full-size copy in the stored dtype exists
                if staging is None:
                    staging = torch.empty(_CHUNK_BYTES, dtype=torch.uint8)
                flat, size = t.reshape(-1), info.dtype.itemsize
                per = _CHUNK_BYTES // size
                for lo in range(0, flat.numel(), per):
                    n = min(per, flat.numel() - lo)
                    chunk = staging[: n * size]
                    _read_exact(f, chunk, path, info.name)
                    flat[lo:lo + n].copy_(chunk.view(info.dtype))
            out[info.name] = t if device.type == "cpu" else t.to(device)
    return {k: out[k] for k in (keys if keys is not None else tensors)}


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``state_dict`` as a safetensors file (contiguous CPU copies; shared storage is duplicated)."""
    from safetensors.torch import save_file

    path = os.fspath(path)
    clean = {}
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path!r}, key {k!r}: not a tensor ({type(v).__name__})")
        clean[k] = v.detach().to("cpu").contiguous().clone() if v.device.type != "cpu" or not v.is_contiguous() \
            else v.detach()
    # safetensors refuses tensors sharing storage; break any sharing
    seen = set()
    for k, v in clean.items():
        ptr = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if ptr in seen or (v.numel() and v.untyped_storage().nbytes() != v.numel() * v.element_size()):
            clean[k] = v.clone()
        elif ptr is not None:
            seen.add(ptr)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file(clean, path, metadata=dict(metadata) if metadata else None)
