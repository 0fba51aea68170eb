"""Differential fuzz test: velodiff's safetensors reader against the official safetensors library.

Small valid files (written by ``safetensors.torch.save_file``, seeded) are mutated, seeded and
deterministically, in their header (offsets swapped, shifted, overlapping, reversed, gaps, dtypes, shapes,
fields, metadata, names, duplicate keys in the raw JSON, padding, invalid UTF-8, escapes, odd numbers, deep
nesting, cut JSON) and in their bytes (truncated, extended, length field changed, bytes flipped), and each
result is read by ``safetensors.safe_open``, ``safetensors.torch.load`` and velodiff
(``safetensors_oracle.compare_with_official``): whatever the official library rejects we reject, whatever
it accepts we read to identical tensors; the few documented deviations are listed in safetensors_oracle.
A hand-written corpus pins the edge cases found while probing the official library (safetensors 0.8).
"""
from __future__ import annotations

import json
import random
import struct
from collections import Counter
from typing import Callable, Dict, List, Tuple

import pytest
import torch
from safetensors.torch import save_file

from safetensors_oracle import compare_with_official
from velodiff.loading.safetensors_io import MAX_HEADER_BYTES, MAX_JSON_DEPTH

CASES_PER_KIND = 20

BASE_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool,
               torch.float8_e4m3fn, torch.float64, torch.int8]
ALL_DTYPE_NAMES = ["BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
                   "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64"]
BOGUS_DTYPES = ["f32", "F7", "", "FP32", "float32", " F32", {"F32": None}, {"F32": []}, 5, None, ["F32"], True]
NAMES = ["w", "layer.0.weight", "é", "名前", "a b", "x" * 40, "0", "emoji😀", "tab\tname", "__meta__"]


# ---------------------------------------------------------------------------------------------------
# base files
# ---------------------------------------------------------------------------------------------------

def _random_state_dict(rng: random.Random) -> Dict[str, torch.Tensor]:
    out = {}
    for name in rng.sample(NAMES, rng.randint(1, 4)):
        dtype = rng.choice(BASE_DTYPES)
        shape = [rng.randint(0, 4) if rng.random() < 0.15 else rng.randint(1, 4) for _ in range(rng.randint(0, 3))]
        numel = 1
        for d in shape:
            numel *= d
        g = torch.Generator().manual_seed(rng.getrandbits(31))
        raw = torch.randint(0, 256, (numel * dtype.itemsize,), dtype=torch.uint8, generator=g)
        if dtype == torch.bool:
            raw = raw % 2
        out[name] = raw.view(dtype).reshape(shape)
    return out


def _base_file(rng: random.Random, tmp_path) -> Tuple[dict, bytes]:
    """A valid file from the official writer: (its header as an ordered dict, its data section)."""
    metadata = {"format": "pt", "note": rng.choice(["", "ü", "x" * 20])} if rng.random() < 0.5 else None
    path = tmp_path / "base.safetensors"
    save_file(_random_state_dict(rng), str(path), metadata=metadata)
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    if "__metadata__" in header:  # the writer's metadata order varies from process to process
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    return header, data[8 + n:]


def _pack(header_text, body: bytes) -> bytes:
    raw = header_text.encode("utf-8") if isinstance(header_text, str) else header_text
    return struct.pack("<Q", len(raw)) + raw + body


def _dump(header: dict) -> str:
    return json.dumps(header, separators=(",", ":"), ensure_ascii=False)


def _tensors(header: dict) -> List[str]:
    """Tensor names, in data order."""
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: tuple(header[k]["data_offsets"]))


# ---------------------------------------------------------------------------------------------------
# mutations: (rng, header, body) -> file bytes
# ---------------------------------------------------------------------------------------------------

def m_swap_offsets(rng, h, body):
    names = _tensors(h)
    if len(names) >= 2:
        a, b = rng.sample(names, 2)
        h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    else:
        h[names[0]]["data_offsets"] = [0, 0]
    return _pack(_dump(h), body)


def m_shift_offset(rng, h, body):
    e = h[rng.choice(_tensors(h))]
    delta = rng.choice([-9, -4, -2, -1, 1, 2, 4, 8, 9])
    which = rng.choice(["begin", "end", "both"])
    b, e2 = e["data_offsets"]
    e["data_offsets"] = [b + delta if which != "end" else b, e2 + delta if which != "begin" else e2]
    return _pack(_dump(h), body)


def m_overlap(rng, h, body):
    names = _tensors(h)
    a = rng.choice(names)
    b = rng.choice(names)
    ab, ae = h[a]["data_offsets"]
    bb, be = h[b]["data_offsets"]
    start = rng.randint(ab, max(ab, ae - 1))
    h[b]["data_offsets"] = [start, start + (be - bb)]
    return _pack(_dump(h), body)


def m_gap(rng, h, body):
    names = _tensors(h)
    k = rng.randint(1, 9)
    at = rng.choice([h[n]["data_offsets"][0] for n in names] + [len(body)])
    for n in names:
        b, e = h[n]["data_offsets"]
        if b >= at and not (b == e == at and rng.random() < 0.5):
            h[n]["data_offsets"] = [b + k, e + k]
    return _pack(_dump(h), body[:at] + bytes(rng.getrandbits(8) for _ in range(k)) + body[at:])


def m_reverse(rng, h, body):
    e = h[rng.choice(_tensors(h))]
    b, end = e["data_offsets"]
    e["data_offsets"] = [end, b] if end != b else [b + 1, b]
    return _pack(_dump(h), body)


def m_dtype(rng, h, body):
    e = h[rng.choice(_tensors(h))]
    e["dtype"] = rng.choice(ALL_DTYPE_NAMES + BOGUS_DTYPES)
    return _pack(_dump(h), body)


def m_shape(rng, h, body):
    e = h[rng.choice(_tensors(h))]
    s = list(e["shape"])
    op = rng.randrange(12)
    if op == 0:
        s.append(1)  # same bytes: valid
    elif op == 1:
        s.insert(rng.randint(0, len(s)), rng.randint(2, 3))
    elif op == 2 and s:
        s.pop(rng.randrange(len(s)))
    elif op == 3 and s:
        i = rng.randrange(len(s))
        s[i] = s[i] + rng.choice([-1, 1])
    elif op == 4:
        s.append(-rng.randint(0, 2))
    elif op == 5:
        s.append(rng.choice([1.0, 2.5, True, False, "2", None, [1]]))
    elif op == 6:
        s = s + [0, 2 ** 64]
    elif op == 7:
        s = [2 ** 32, 2 ** 32, 0] if rng.random() < 0.5 else [0, 2 ** 32, 2 ** 32]
    elif op == 8:
        s = [2 ** 63, 0] if rng.random() < 0.5 else [0, 2 ** 63 - 1]
    elif op == 9:
        s = rng.choice([{"0": 1}, "2", 2, None])
    elif op == 10 and len(s) >= 2:
        rng.shuffle(s)
    else:
        s = [d * 2 for d in s]
    e["shape"] = s
    return _pack(_dump(h), body)


def m_offsets_type(rng, h, body):
    e = h[rng.choice(_tensors(h))]
    b, end = e["data_offsets"]
    e["data_offsets"] = rng.choice([[float(b), end], [b, float(end)], [str(b), end], [b, end, end], [b], [],
                                    {"0": b, "1": end}, [b - end - 1, end], [b, 2 ** 64 + end], [True, end],
                                    [b, None], None, f"{b},{end}", [b, 2 ** 64 - 1]])
    return _pack(_dump(h), body)


def m_fields(rng, h, body):
    e = h[rng.choice(_tensors(h))]
    op = rng.randrange(4)
    if op == 0:
        del e[rng.choice(["dtype", "shape", "data_offsets"])]
    elif op == 1:
        e[rng.choice(["extra", "DTYPE", "offsets", "__metadata__"])] = rng.choice(
            [1, "x", None, [1, 2], {"a": "b"}, -5, 1.5, 2 ** 70, True])
    elif op == 2:
        key = rng.choice(["dtype", "shape", "data_offsets"])
        e[key.upper()] = e.pop(key)
    else:
        h[rng.choice(_tensors(h))] = dict(reversed(list(e.items())))
    return _pack(_dump(h), body)


def m_metadata(rng, h, body):
    h["__metadata__"] = rng.choice([None, {}, {"k": "v"}, {"k": 1}, {"k": None}, {"k": ["v"]}, {"k": {"z": "v"}},
                                    "s", [], 5, {"": ""}, {"ü": "名前"}, {"k": "v\u0000"}, {"a": "1", "b": True}])
    if rng.random() < 0.3:
        items = list(h.items())
        rng.shuffle(items)
        h = dict(items)
    return _pack(_dump(h), body)


def m_names(rng, h, body):
    old = rng.choice(_tensors(h))
    new = rng.choice(NAMES + ["", "__metadata__", "\u0000", "a\nb", " ", "\\", '"'])
    h = {(new if k == old else k): v for k, v in h.items()}
    return _pack(_dump(h), body)


def m_reorder(rng, h, body):
    items = list(h.items())
    rng.shuffle(items)
    return _pack(_dump(dict(items)), body)


def m_entry_type(rng, h, body):
    h[rng.choice(_tensors(h))] = rng.choice([[], [1, 2], 1, None, "F32", {}, True, {"dtype": "F32"}])
    return _pack(_dump(h), body)


def m_drop_or_add(rng, h, body):
    names = _tensors(h)
    if rng.random() < 0.5:
        del h[rng.choice(names)]
    else:
        at = rng.randint(0, len(body))
        if rng.random() < 0.6:  # at a tensor boundary
            at = rng.choice([h[n]["data_offsets"][rng.randrange(2)] for n in names])
        h["added"] = {"dtype": rng.choice(["F32", "U8", "BOOL"]), "shape": rng.choice([[0], [2, 0], [0, 0]]),
                      "data_offsets": [at, at]}
    return _pack(_dump(h), body)


def _entry_text(name, entry) -> str:
    return json.dumps(name, ensure_ascii=False) + ":" + json.dumps(entry, separators=(",", ":"))


def _with_raw_entry(h: dict, name: str, entry_text: str) -> str:
    """The header's JSON with ``name``'s entry replaced by ``entry_text`` (raw JSON, moved to the end)."""
    rest = _dump({k: v for k, v in h.items() if k != name})
    return rest[:-1] + ("," if len(h) > 1 else "") + json.dumps(name, ensure_ascii=False) + ":" + entry_text + "}"


def m_duplicate_key(rng, h, body):
    text = _dump(h)
    names = _tensors(h)
    op = rng.randrange(5)
    if op == 0:  # an identical copy of one entry
        n = rng.choice(names)
        return _pack(text[:-1] + "," + _entry_text(n, h[n]) + "}", body)
    if op == 1:  # a second, different entry under the same name
        n = rng.choice(names)
        other = dict(h[n], dtype=rng.choice(["U8", "I8", "F32", "I32"]))
        return _pack(text[:-1] + "," + _entry_text(n, other) + "}", body)
    if op == 2:  # a field listed twice inside one entry
        n = rng.choice(names)
        field = rng.choice(["dtype", "shape", "data_offsets"])
        inner = json.dumps(h[n], separators=(",", ":"))[:-1] + "," + json.dumps(field) + ":" + \
            json.dumps(h[n][field]) + "}"
        return _pack(_with_raw_entry(h, n, inner), body)
    if op == 3:  # __metadata__ twice
        return _pack('{"__metadata__":{"a":"1"},' + text[1:-1].replace('"__metadata__"', '"__m"') +
                     ',"__metadata__":{"b":"2"}}', body)
    meta = '{"k":"1","k":"2"}'  # a key repeated inside __metadata__
    rest = _dump({k: v for k, v in h.items() if k != "__metadata__"})
    return _pack('{"__metadata__":' + meta + "," + rest[1:], body)


def m_padding(rng, h, body):
    text = _dump(h)
    pad = "".join(rng.choice(" \t\n\r") for _ in range(rng.randint(1, 9)))
    op = rng.randrange(4)
    if op == 0:
        return _pack(text + pad, body)
    if op == 1:
        return _pack(pad + text, body)
    if op == 2:
        return _pack(text.replace(",", pad + "," + pad, 1).replace(":", ":" + pad, 1), body)
    bad = rng.choice(["\u0000", "\u000b", "\u000c", "\u00a0", "\ufeff", "\u2028", "x"])
    return _pack(text + bad if rng.random() < 0.5 else bad + text, body)


def m_bad_utf8(rng, h, body):
    raw = _dump(h).encode("utf-8")
    bad = rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\x80", b"\xf8\x88\x80\x80\x80",
                      b"\xf4\x90\x80\x80", b"\xc3"])
    quotes = [i for i, c in enumerate(raw) if c == ord('"')]
    at = rng.choice(quotes) + 1
    return _pack(raw[:at] + bad + raw[at:], body)


def m_escapes(rng, h, body):
    old = rng.choice(_tensors(h))
    esc = rng.choice(["\\ud800", "\\udfff", "\\ud83d\\ude00", "\\ud800\\u0041", "\\u0000", "\\/", "\\u00e9",
                      "\\x41", "\\U0041", "\\'", "\\ud83d"])
    text = _dump({("@@" if k == old else k): v for k, v in h.items()})
    return _pack(text.replace('"@@"', '"' + old.replace("\\", "\\\\").replace('"', '\\"')
                              .replace("\t", "\\t").replace("\n", "\\n") + esc + '"'), body)


def m_numbers(rng, h, body):
    n = rng.choice(_tensors(h))
    value = rng.choice(["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0", "-0.0", "1.5",
                        "9" * 30, "-" + "9" * 30, "9" * 400, "1E2", "0x10", "01", ".5", "+1", "1.", "18446744073709551616"])
    where = rng.randrange(3)
    entry = json.dumps(h[n], separators=(",", ":"))
    if where == 0:  # an ignored extra field
        entry = entry[:-1] + ',"extra":' + value + "}"
    elif where == 1:  # a dimension
        entry = entry.replace('"shape":[', '"shape":[' + value + ",", 1)
    else:  # the end offset
        e0, e1 = h[n]["data_offsets"]
        entry = entry.replace(f'"data_offsets":[{e0},{e1}]', f'"data_offsets":[{e0},{value}]')
    return _pack(_with_raw_entry(h, n, entry), body)


def m_nesting(rng, h, body):
    n = rng.choice(_tensors(h))
    depth = rng.randint(MAX_JSON_DEPTH - 4, MAX_JSON_DEPTH + 2) - 2  # the entry itself is at depth 2
    value = "[" * depth + "]" * depth if rng.random() < 0.5 else '{"k":' * depth + "1" + "}" * depth
    entry = json.dumps(h[n], separators=(",", ":"))[:-1] + ',"deep":' + value + "}"
    return _pack(_with_raw_entry(h, n, entry), body)


def m_json_cut(rng, h, body):
    raw = _dump(h).encode("utf-8")
    return _pack(raw[:rng.randrange(len(raw))], body)


def m_header_char(rng, h, body):
    raw = bytearray(_dump(h).encode("utf-8"))
    i = rng.randrange(len(raw))
    raw[i] = ord(rng.choice('{}[],:"0123456789 -eE.tfn\\x'))
    return _pack(bytes(raw), body)


def m_truncate(rng, h, body):
    data = _pack(_dump(h), body)
    return data[:rng.randrange(len(data))]


def m_extend(rng, h, body):
    return _pack(_dump(h), body) + bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))


def m_length_field(rng, h, body):
    raw = _dump(h).encode("utf-8") + b" " * rng.randint(0, 7)
    data = struct.pack("<Q", len(raw)) + raw + body
    n = rng.choice([len(raw) + rng.choice([-3, -1, 1, 2, 5]), 0, len(data) - 8, len(data), MAX_HEADER_BYTES,
                    MAX_HEADER_BYTES + 1, 2 ** 63, 2 ** 64 - 1, 2 ** 32 + len(raw)])
    return struct.pack("<Q", max(n, 0)) + data[8:]


def m_byte_flip(rng, h, body):
    data = bytearray(_pack(_dump(h), body))
    for _ in range(rng.randint(1, 3)):
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    return bytes(data)


def m_body_flip(rng, h, body):
    data = bytearray(body)
    for _ in range(rng.randint(0, 4) if data else 0):
        data[rng.randrange(len(data))] = rng.getrandbits(8)
    return _pack(_dump(h), bytes(data))


#: kind -> (mutation, what the official library must say on its cases: "accepted" (every one), "rejected"
#: (every one, documented deviations included), "mixed" (at least one of each, so that the kind cannot pass
#: vacuously) or "any" (a random byte or character: no rule))
MUTATIONS: Dict[str, Tuple[Callable, str]] = {
    "swap_offsets": (m_swap_offsets, "mixed"), "shift_offset": (m_shift_offset, "rejected"),
    "overlap": (m_overlap, "mixed"), "gap": (m_gap, "rejected"), "reverse": (m_reverse, "rejected"),
    "dtype": (m_dtype, "mixed"), "shape": (m_shape, "mixed"), "offsets_type": (m_offsets_type, "rejected"),
    "fields": (m_fields, "mixed"), "metadata": (m_metadata, "mixed"), "names": (m_names, "mixed"),
    "reorder": (m_reorder, "accepted"), "entry_type": (m_entry_type, "rejected"),
    "drop_or_add": (m_drop_or_add, "mixed"), "duplicate_key": (m_duplicate_key, "rejected"),
    "padding": (m_padding, "mixed"), "bad_utf8": (m_bad_utf8, "rejected"), "escapes": (m_escapes, "mixed"),
    "numbers": (m_numbers, "mixed"), "nesting": (m_nesting, "mixed"), "json_cut": (m_json_cut, "rejected"),
    "header_char": (m_header_char, "any"), "truncate": (m_truncate, "rejected"),
    "extend": (m_extend, "rejected"), "length_field": (m_length_field, "rejected"),
    "byte_flip": (m_byte_flip, "any"), "body_flip": (m_body_flip, "accepted"),
}


@pytest.mark.parametrize("kind", sorted(MUTATIONS))
def test_mutated_files_agree_with_the_official_library(kind, tmp_path):
    mutate, expected = MUTATIONS[kind]
    seen: Counter = Counter()
    for i in range(CASES_PER_KIND):
        rng = random.Random(f"{kind}-{i}")
        header, body = _base_file(rng, tmp_path)
        path = tmp_path / f"{kind}-{i}.safetensors"
        path.write_bytes(mutate(rng, header, body))
        try:
            outcome = compare_with_official(str(path))
        except AssertionError as e:
            raise AssertionError(f"{kind} case {i} (random.Random({kind + '-' + str(i)!r})), file "
                                 f"{path.read_bytes()[:400]!r}: {e}") from None
        seen["rejected" if outcome.kind == "deviation" else outcome.kind] += 1
        path.unlink()
    if expected == "mixed":
        assert seen["accepted"] and seen["rejected"], f"{kind} does not exercise both outcomes: {dict(seen)}"
    elif expected != "any":
        assert seen[expected] == CASES_PER_KIND, f"{kind}: expected every case {expected}, got {dict(seen)}"


def test_base_files_are_valid(tmp_path):
    """The unmutated files: both readers accept them and read the same tensors."""
    for i in range(20):
        rng = random.Random(f"base-{i}")
        header, body = _base_file(rng, tmp_path)
        path = tmp_path / "b.safetensors"
        path.write_bytes(_pack(_dump(header), body))
        assert compare_with_official(str(path)).kind == "accepted"


# ---------------------------------------------------------------------------------------------------
# hand-written corpus
# ---------------------------------------------------------------------------------------------------

A = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
B8 = bytes(range(8))

#: (id, header text, data section, what velodiff must do: "accepted" / "rejected", the official verdict
#: being checked by compare_with_official; "deviation" where we refuse what the official library accepts)
CORPUS = [
    ("plain", "{" + A + "}", B8, "accepted"),
    ("leading-spaces", "  {" + A + "}", B8, "accepted"),
    ("trailing-whitespace", "{" + A + "}\n\t\r ", B8, "accepted"),
    ("empty-header", "{}", b"", "accepted"),
    ("empty-header-stray-byte", "{}", b"x", "rejected"),
    ("empty-text", "", b"", "rejected"),
    ("array-header", "[]", b"", "rejected"),
    ("metadata-only", '{"__metadata__":{"x":"1"}}', b"", "accepted"),
    ("metadata-null", '{"__metadata__":null,' + A + "}", B8, "accepted"),
    ("metadata-int-value", '{"__metadata__":{"x":1},' + A + "}", B8, "rejected"),
    ("metadata-string", '{"__metadata__":"s",' + A + "}", B8, "rejected"),
    ("metadata-nested", '{"__metadata__":{"k":{"z":"v"}},' + A + "}", B8, "rejected"),
    ("metadata-twice", '{"__metadata__":{"x":"1"},"__metadata__":{"y":"2"},' + A + "}", B8, "rejected"),
    ("metadata-key-twice", '{"__metadata__":{"x":"1","x":"2"},' + A + "}", B8, "deviation"),
    ("tensor-twice-identical", "{" + A + "," + A + "}", B8, "deviation"),
    ("tensor-twice-other-dtype", "{" + A + ',"a":{"dtype":"I32","shape":[2],"data_offsets":[0,8]}}', B8,
     "deviation"),
    ("two-names-one-range", "{" + A + ',"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', B8, "rejected"),
    ("field-twice", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"dtype":"I32"}}', B8, "rejected"),
    ("extra-field", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"extra":[1,{"y":null}]}}', B8,
     "accepted"),
    ("extra-field-nan", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":NaN}}', B8, "rejected"),
    ("extra-field-1e400", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1e400}}', B8, "rejected"),
    ("extra-field-huge-int", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "9" * 400 + "}}", B8,
     "rejected"),
    ("extra-field-big-int", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "9" * 300 + "}}", B8,
     "accepted"),
    ("extra-field-lone-surrogate", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":"\\udc00"}}', B8,
     "rejected"),
    ("extra-field-list-lone-surrogate", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":[1,"\\udc00"]}}',
     B8, "rejected"),
    ("extra-field-key-lone-surrogate", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":{"\\ud800":1}}}',
     B8, "rejected"),
    ("name-escaped-backslash-not-surrogate", '{"\\\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', B8,
     "accepted"),
    ("extra-field-key-twice", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":{"y":1,"y":2}}}', B8,
     "deviation"),
    ("shape-float", '{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', B8, "rejected"),
    ("shape-bool", '{"a":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', B8[:4], "rejected"),
    ("shape-minus-zero", '{"a":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b"", "rejected"),
    ("shape-2**64", '{"a":{"dtype":"F32","shape":[0,18446744073709551616],"data_offsets":[0,0]}}', b"",
     "rejected"),
    ("shape-overflow-before-zero", '{"a":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}',
     b"", "rejected"),
    ("shape-zero-before-big", '{"a":{"dtype":"F32","shape":[0,2147483648,2147483648],"data_offsets":[0,0]}}',
     b"", "accepted"),
    ("shape-strides-overflow", '{"a":{"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}}',
     b"", "rejected"),
    ("shape-storage-overflow", '{"a":{"dtype":"F32","shape":[0,4611686018427387904,2],"data_offsets":[0,0]}}',
     b"", "rejected"),
    ("shape-above-int64", '{"a":{"dtype":"F32","shape":[18446744073709551615,0],"data_offsets":[0,0]}}', b"",
     "rejected"),
    ("bytes-overflow", '{"a":{"dtype":"U8","shape":[4611686018427387904],'
     '"data_offsets":[0,4611686018427387904]}}', b"", "rejected"),
    ("scalar", '{"a":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', B8[:4], "accepted"),
    ("offsets-three", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,9]}}', B8, "rejected"),
    ("offsets-reversed", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}', B8, "rejected"),
    ("offsets-exponent", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8E0]}}', B8, "rejected"),
    ("offsets-leading-zero", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,08]}}', B8, "rejected"),
    ("out-of-order-entries", '{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]},'
     '"b":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', B8, "accepted"),
    ("empty-tensors-share-offsets", '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
     '"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"c":{"dtype":"I8","shape":[0,3],"data_offsets":[0,0]}}',
     B8, "accepted"),
    ("empty-tensor-at-end", "{" + A + ',"b":{"dtype":"F32","shape":[0],"data_offsets":[8,8]}}', B8, "accepted"),
    ("empty-tensor-inside", '{"a":{"dtype":"F32","shape":[0],"data_offsets":[3,3]},'
     '"b":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', B8, "rejected"),
    ("gap", '{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
     '"b":{"dtype":"F32","shape":[1],"data_offsets":[5,9]}}', B8 + b"\0", "rejected"),
    ("overlap", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
     '"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', B8, "rejected"),
    ("stray-byte", "{" + A + "}", B8 + b"\0", "rejected"),
    ("short-body", "{" + A + "}", B8[:7], "rejected"),
    ("dtype-as-map", '{"a":{"dtype":{"F32":null},"shape":[2],"data_offsets":[0,8]}}', B8, "deviation"),
    ("dtype-lowercase", '{"a":{"dtype":"f32","shape":[2],"data_offsets":[0,8]}}', B8, "rejected"),
    ("dtype-null", '{"a":{"dtype":null,"shape":[2],"data_offsets":[0,8]}}', B8, "rejected"),
    ("dtype-F4", '{"a":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}', B8[:1], "deviation"),
    ("dtype-F6", '{"a":{"dtype":"F6_E2M3","shape":[4],"data_offsets":[0,3]}}', B8[:3], "rejected"),
    ("dtype-F8_E8M0", '{"a":{"dtype":"F8_E8M0","shape":[2],"data_offsets":[0,2]}}', B8[:2], "accepted"),
    ("dtype-C64", '{"a":{"dtype":"C64","shape":[1],"data_offsets":[0,8]}}', B8, "accepted"),
    ("dtype-F8_E4M3FNUZ", '{"a":{"dtype":"F8_E4M3FNUZ","shape":[2],"data_offsets":[0,2]}}', B8[:2], "accepted"),
    ("name-escaped", '{"\\u00e9\\ud83d\\ude00":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', B8, "accepted"),
    ("name-nul", '{"a\\u0000":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', B8, "accepted"),
    ("name-empty", '{"":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', B8, "accepted"),
    ("name-lone-surrogate", '{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', B8, "rejected"),
    ("bom", "\ufeff{" + A + "}", B8, "rejected"),
    ("trailing-nul", "{" + A + "}\u0000", B8, "rejected"),
    ("trailing-nbsp", "{" + A + "}\u00a0", B8, "rejected"),
    ("entry-int", "{" + A + ',"b":1}', B8, "rejected"),
    ("entry-empty", "{" + A + ',"b":{}}', B8, "rejected"),
    ("depth-127", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "[" * 125 + "]" * 125 + "}}",
     B8, "accepted"),
    ("depth-128", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "[" * 126 + "]" * 126 + "}}",
     B8, "rejected"),
    ("depth-10000", '{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "[" * 10000 + "]" * 10000
     + "}}", B8, "rejected"),
]


@pytest.mark.parametrize("name, header, body, expected", CORPUS, ids=[c[0] for c in CORPUS])
def test_corpus(tmp_path, name, header, body, expected):
    path = tmp_path / "corpus.safetensors"
    path.write_bytes(_pack(header, body))
    outcome = compare_with_official(str(path))
    assert outcome.kind == expected, f"{name}: {outcome.kind}, expected {expected}: {outcome.velodiff.error}"


def test_header_size_limit(tmp_path):
    """The format's cap: a header of exactly MAX_HEADER_BYTES reads; one byte more is refused before reading
    (the file is sparse beyond the length field, so nothing large is written)."""
    at_limit = tmp_path / "limit.safetensors"
    with open(at_limit, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES) + b"{}")
        f.write(b" " * (MAX_HEADER_BYTES - 2))
    assert compare_with_official(str(at_limit)).kind == "accepted"
    at_limit.unlink()
    over = tmp_path / "over.safetensors"
    with open(over, "wb") as f:
        f.write(struct.pack("<Q", MAX_HEADER_BYTES + 1) + b"{}")
        f.truncate(8 + MAX_HEADER_BYTES + 1)
    outcome = compare_with_official(str(over))
    assert outcome.kind == "rejected" and "above the format's limit" in outcome.velodiff.error
