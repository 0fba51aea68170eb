"""Reading and writing safetensors files without going through pickle.

The reader parses and checks the whole header before any tensor is read, and refuses everything the
safetensors format forbids (https://github.com/huggingface/safetensors, README "Format"; the reference
implementation's checks are mirrored, see below): a header length beyond the file or above 100,000,000
bytes, a header that is not UTF-8 or not strict JSON, a name listed twice, a ``__metadata__`` that is not a
map of strings to strings, an unknown dtype, a shape that is not a list of non-negative integers, a byte
range that does not hold exactly the shape's bytes, and byte ranges that overlap, leave gaps, run past
the file or leave bytes after the last tensor (the tensors must tile the data section from offset 0).
Every refusal is a :class:`CheckpointError` naming the file and the tensor or field at fault.

Where the reference implementation (the ``safetensors`` package, 0.8) accepts something the format
does not describe, this reader refuses it, on purpose: a name repeated inside one JSON object (the
reference keeps the last one silently), a dtype written as a JSON map (``{"F32": null}``, an artefact of
its JSON library) and the packed sub-byte dtypes ``F4``/``F6_*``, which velodiff does not load.
``tests/loading/test_safetensors_fuzz.py`` checks the reader against the reference on mutated files.

Tensors are then converted one at a time into the requested dtype and device, so peak host memory stays
near the size of the result.
"""
from __future__ import annotations

import json
import math
import os
import re
import struct
import sys
from typing import Any, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from velodiff.loading.errors import CheckpointError, list_keys

PathLike = Union[str, "os.PathLike[str]"]

#: safetensors dtype names -> torch dtypes (those this torch build knows)
SAFETENSORS_DTYPES: Dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
                     ("F8_E5M2FNUZ", "float8_e5m2fnuz"), ("F8_E8M0", "float8_e8m0fnu"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)

#: dtypes the format defines but this reader does not load: packed sub-byte floats (several per byte)
UNSUPPORTED_DTYPES = frozenset({"F4", "F6_E2M3", "F6_E3M2"})

#: the format's cap on the JSON header, in bytes (the reference implementation's MAX_HEADER_SIZE)
MAX_HEADER_BYTES = 100_000_000
#: deepest nesting of JSON arrays/objects the reference implementation's JSON parser accepts
MAX_JSON_DEPTH = 127
_U64_END = 2 ** 64  # sizes and offsets are unsigned 64-bit integers in the reference implementation


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


# ---------------------------------------------------------------------------------------------------
# header: bytes -> strict JSON
# ---------------------------------------------------------------------------------------------------

def _short(value: Any, limit: int = 80) -> str:
    """``repr(value)``, cut to ``limit`` characters (a corrupt header can hold anything)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class _DuplicateName(ValueError):
    """A JSON object lists one name twice."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _unique_object(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    """json object hook: a dict, refusing a name listed twice (plain ``json`` keeps the last silently)."""
    out: Dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateName(key)
        out[key] = value
    return out


def _strict_int(text: str) -> Union[int, float]:
    """json int hook, numbers as the reference's parser types them: integers outside [-2**63, 2**64) and
    ``-0`` are floats there (so never a valid size or offset), beyond the float range an error."""
    value = int(text)
    if -2 ** 63 <= value < _U64_END and text != "-0":
        return value
    try:
        return float(value) if value else -0.0
    except OverflowError:
        raise ValueError(f"number out of range: {text[:20]}...") from None


def _strict_float(text: str) -> float:
    """json float hook: a number too large for a double is an error, not ``inf``."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number out of range: {text[:40]}")
    return value


def _no_constant(text: str) -> None:
    """json constant hook: ``NaN`` / ``Infinity`` are not JSON."""
    raise ValueError(f"{text} is not valid JSON")


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # a \uD800-\uDFFF escape somewhere in the text


def _check_json_tree(header: Dict[str, Any], text: str, path: str) -> None:
    """Refuse nesting deeper than the reference parser allows and strings holding a lone UTF-16
    surrogate (``"\\ud800"``, which is not a Unicode string; only a surrogate escape can produce one)."""
    check_strings = _SURROGATE_ESCAPE.search(text) is not None
    stack: List[Tuple[Any, int]] = [(header, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise CheckpointError(f"{path!r}: corrupt safetensors header (JSON nested deeper than "
                                  f"{MAX_JSON_DEPTH} levels)")
        values = node.values() if isinstance(node, dict) else node
        if check_strings:
            for text_value in (*node, *values) if isinstance(node, dict) else values:
                if isinstance(text_value, str):
                    try:
                        text_value.encode("utf-8")
                    except UnicodeEncodeError:
                        raise CheckpointError(f"{path!r}: corrupt safetensors header (the string "
                                              f"{_short(text_value)} holds a lone UTF-16 surrogate escape)") from None
        stack.extend((v, depth + 1) for v in values if isinstance(v, (dict, list)))


def _parse_header_json(raw: bytes, path: str) -> Dict[str, Any]:
    """Decode the header bytes as UTF-8 strict JSON (one object, unique names, finite numbers)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path!r}: corrupt safetensors header (not valid UTF-8: {e})") from e
    try:
        header = json.loads(text, object_pairs_hook=_unique_object, parse_int=_strict_int,
                            parse_float=_strict_float, parse_constant=_no_constant)
    except _DuplicateName as e:
        raise CheckpointError(f"{path!r}: corrupt safetensors header (the name {_short(e.name)} appears twice "
                              "in one JSON object: a tensor or a field listed twice)") from None
    except RecursionError:
        raise CheckpointError(f"{path!r}: corrupt safetensors header (JSON nested too deeply)") from None
    except ValueError as e:  # json.JSONDecodeError and the hooks' errors
        raise CheckpointError(f"{path!r}: corrupt safetensors header (not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path!r}: corrupt safetensors header (a JSON object was expected, "
                              f"got {type(header).__name__})")
    _check_json_tree(header, text, path)
    return header


# ---------------------------------------------------------------------------------------------------
# header: JSON -> checked entries
# ---------------------------------------------------------------------------------------------------

def _check_metadata(value: Any, path: str) -> Dict[str, str]:
    """``__metadata__``: absent or null, or a map of strings to strings."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{path!r}: corrupt safetensors header: '__metadata__' must be a map of strings "
                              f"to strings, got {type(value).__name__} {_short(value)}")
    for key, text in value.items():
        if not isinstance(text, str):
            raise CheckpointError(f"{path!r}: corrupt safetensors header: '__metadata__' key {key!r} holds "
                                  f"{type(text).__name__} {_short(text)}; only strings are allowed")
    return dict(value)


def _is_u64(value: Any) -> bool:
    """An unsigned 64-bit JSON integer (``True`` is a bool, not a number)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _U64_END


def _check_torch_can_hold(dtype: torch.dtype, shape: List[int], where: str) -> None:
    """A contiguous torch tensor of this shape must exist: sizes and strides are signed 64-bit in torch, so
    an empty tensor such as [0, 2**32, 2**32] F32 passes the format's checks but not torch's (checked on
    the meta device: no memory is allocated)."""
    try:
        torch.empty(shape, dtype=dtype, device="meta")
    except (RuntimeError, TypeError, ValueError, OverflowError) as e:
        raise CheckpointError(f"{where}: shape {_short(shape)}: torch cannot hold a tensor of this shape "
                              f"({str(e).splitlines()[0][:120]})") from None


def _check_entry(name: str, entry: Any, path: str) -> TensorInfo:
    """One tensor's entry: its fields' types, its dtype, and a byte range that holds its shape exactly."""
    where = f"{path!r}, key {name!r}"
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where}: corrupt header entry {_short(entry)} (a map with dtype, shape and "
                              "data_offsets was expected)")
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in entry]
    if missing:
        raise CheckpointError(f"{where}: corrupt header entry {_short(entry)}: missing {', '.join(missing)}")
    dtype_name, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype_name, str):
        raise CheckpointError(f"{where}: corrupt dtype {_short(dtype_name)} (a string such as \"F16\" "
                              "was expected)")
    if dtype_name in UNSUPPORTED_DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {dtype_name!r}: velodiff does not load packed "
                              "sub-byte formats (F4, F6_E2M3, F6_E3M2)")
    dtype = SAFETENSORS_DTYPES.get(dtype_name)
    if dtype is None:
        raise CheckpointError(f"{where}: unknown dtype {_short(dtype_name)} (known: "
                              f"{', '.join(sorted(SAFETENSORS_DTYPES))})")
    if not isinstance(shape, list) or not all(_is_u64(d) for d in shape):
        raise CheckpointError(f"{where}: corrupt shape {_short(shape)} (a list of non-negative integers "
                              "was expected)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_u64(o) for o in offsets):
        raise CheckpointError(f"{where}: corrupt data_offsets {_short(offsets)} (two non-negative integers "
                              "[begin, end] were expected)")
    numel = 1
    for d in shape:  # in order, as the reference does: an overflow before a zero still overflows
        numel *= d
        if numel >= _U64_END:
            raise CheckpointError(f"{where}: corrupt shape {_short(shape)}: its element count overflows 64 bits")
    nbytes = numel * dtype.itemsize
    if nbytes >= _U64_END:
        raise CheckpointError(f"{where}: corrupt shape {_short(shape)}: its byte count overflows 64 bits")
    if numel == 0 or nbytes >= 2 ** 62:  # else every size and stride is at most numel < 2**62: torch holds it
        _check_torch_can_hold(dtype, shape, where)
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{where}: data_offsets [{begin}, {end}] are reversed (end before begin)")
    if end - begin != nbytes:
        raise CheckpointError(f"{where}: byte range [{begin}, {end}) does not hold {nbytes} bytes of "
                              f"{dtype_name} {tuple(shape)} (it holds {end - begin})")
    return TensorInfo(name, dtype, shape, begin, end)


def _check_layout(tensors: Mapping[str, TensorInfo], data_size: int, path: str) -> None:
    """The byte ranges tile the data section: back to back from offset 0, no overlap, no gap, nothing past
    the end of the file and nothing after the last tensor."""
    in_order = sorted(tensors.values(), key=lambda t: (t.begin, t.end))
    for info in in_order:  # first, so that a truncated file is reported as one, not as a gap
        if info.end > data_size:
            raise CheckpointError(f"{path!r}, key {info.name!r}: truncated file or corrupt data_offsets: the "
                                  f"tensor's bytes [{info.begin}, {info.end}) end past the data section "
                                  f"({data_size} bytes)")
    cursor, previous = 0, None
    for info in in_order:
        where = f"{path!r}, key {info.name!r}"
        if info.begin < cursor:
            raise CheckpointError(f"{where}: byte range [{info.begin}, {info.end}) overlaps tensor "
                                  f"{previous!r}, which ends at {cursor}")
        if info.begin > cursor:
            after = f"tensor {previous!r}, which ends at {cursor}" if previous is not None else "offset 0"
            raise CheckpointError(f"{where}: byte range [{info.begin}, {info.end}) leaves a gap of "
                                  f"{info.begin - cursor} bytes after {after} (tensors must be packed back to back)")
        cursor, previous = info.end, info.name
    if cursor != data_size:
        last = f"tensor {previous!r}" if previous is not None else "the header (no tensor)"
        raise CheckpointError(f"{path!r}: corrupt safetensors file: {data_size - cursor} stray byte(s) after "
                              f"{last}: the data section has {data_size} bytes, the tensors cover {cursor}")


def _read_raw_header(path: str) -> Tuple[bytes, int]:
    """The header's bytes and the file size, after checking the 8-byte length field against both."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path!r}: not a safetensors file: {size} bytes, shorter than the "
                                      "8-byte header length (truncated or empty file)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path!r}: corrupt safetensors file: the header claims {n} bytes, above "
                                      f"the format's limit of {MAX_HEADER_BYTES}")
            if 8 + n > size:
                raise CheckpointError(f"{path!r}: corrupt or truncated safetensors file: the header claims "
                                      f"{n} bytes but the file has {size - 8} after the length field")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path!r}: cannot read the file: {e}") from e
    if len(raw) != n:
        raise CheckpointError(f"{path!r}: truncated file (short read of the header)")
    return raw, size


def read_safetensors_header(path: PathLike) -> Tuple[Dict[str, TensorInfo], Dict[str, str], int]:
    """Parse and validate a safetensors header.

    Returns ``(tensors, metadata, data_start)``: header entries by name (in header order), the
    ``__metadata__`` strings and the file offset where the data section begins. Raises
    :class:`CheckpointError` naming the file (and the key or field) for anything the format forbids: see
    the module docstring.
    """
    path = os.fspath(path)
    raw, size = _read_raw_header(path)
    header = _parse_header_json(raw, path)
    metadata = _check_metadata(header.pop("__metadata__", None), path)
    tensors = {name: _check_entry(name, entry, path) for name, entry in header.items()}
    data_start = 8 + len(raw)
    _check_layout(tensors, size - data_start, path)
    return tensors, metadata, data_start


# ---------------------------------------------------------------------------------------------------
# reading tensors
# ---------------------------------------------------------------------------------------------------

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

    Only floating tensors are cast to ``dtype``; integer, bool and complex tensors keep their dtype.
    Tensors are read one at a time straight into their result tensor (a cast goes through a 16 MB staging
    buffer), so peak host memory is the size of the result plus 16 MB; with a GPU ``device``, one tensor at
    a time. ``keys`` restricts the read to those names (each must exist). A truncated, corrupt or malformed
    file raises :class:`CheckpointError` naming the file and the key (see the module docstring).
    """
    path = os.fspath(path)
    _check_dtype(dtype, path)
    device = torch.device(device)
    if isinstance(keys, (str, bytes)):
        raise TypeError(f"read_safetensors({path!r}, keys={keys!r}): keys must be a list of tensor names, "
                        "not one string")
    if sys.byteorder != "little":
        raise CheckpointError(f"{path!r}: safetensors data is little-endian; big-endian hosts are not supported")
    tensors, _, data_start = read_safetensors_header(path)
    if keys is not None:
        keys = list(keys)
        missing = [k for k in keys if k not in tensors]
        if missing:
            raise CheckpointError(f"{path!r}: requested key(s) not in the file: {list_keys(missing)}")
        wanted = [tensors[k] for k in dict.fromkeys(keys)]
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


# ---------------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------------

def _check_metadata_arg(metadata: Optional[Mapping[str, str]], path: str) -> Optional[Dict[str, str]]:
    """``write_safetensors``'s ``metadata=``: None or a map of strings to strings."""
    if not metadata:
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"write_safetensors({path!r}): metadata must be a mapping of str to str or None, "
                            f"got {type(metadata).__name__}")
        return None
    if not isinstance(metadata, Mapping):
        raise TypeError(f"write_safetensors({path!r}): metadata must be a mapping of str to str or None, "
                        f"got {type(metadata).__name__}")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"write_safetensors({path!r}): metadata key {k!r} -> {_short(v)}: keys and values "
                            "must be str")
    return dict(metadata)


_WRITABLE_DTYPES = frozenset(SAFETENSORS_DTYPES.values())


def write_safetensors(state_dict: Mapping[str, torch.Tensor], path: PathLike,
                      metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write ``state_dict`` as a safetensors file (contiguous CPU copies; shared storage is duplicated).

    Names must be strings other than the format's reserved ``__metadata__``; tensors dense, in a dtype
    :func:`read_safetensors` reads back (see ``SAFETENSORS_DTYPES``); ``metadata`` maps str to str.
    Anything else raises :class:`CheckpointError` (or TypeError for ``metadata``) naming the key.
    """
    from safetensors.torch import save_file

    path = os.fspath(path)
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"write_safetensors({path!r}): state_dict must be a mapping of names to tensors, "
                        f"got {type(state_dict).__name__}")
    meta = _check_metadata_arg(metadata, path)
    clean = {}
    for k, v in state_dict.items():
        if not isinstance(k, str):
            raise CheckpointError(f"{path!r}, key {k!r}: tensor names must be str, got {type(k).__name__}")
        if k == "__metadata__":
            raise CheckpointError(f"{path!r}, key {k!r}: the name is reserved by the safetensors format")
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path!r}, key {k!r}: not a tensor ({type(v).__name__})")
        if v.layout != torch.strided:
            raise CheckpointError(f"{path!r}, key {k!r}: a {v.layout} tensor; only dense tensors can be written "
                                  "(call .to_dense() first)")
        if v.dtype not in _WRITABLE_DTYPES:
            raise CheckpointError(f"{path!r}, key {k!r}: dtype {v.dtype} has no safetensors name velodiff reads")
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
    save_file(clean, path, metadata=meta)
    # safetensors writes through a private temporary file (mode 0600): give the file the mode any other new file
    # of the user gets, 0666 less the umask
    from velodiff.loading.output import current_umask
    os.chmod(path, 0o666 & ~current_umask())
