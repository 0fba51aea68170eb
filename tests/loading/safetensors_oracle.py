"""The safetensors package as an outside oracle for velodiff's safetensors reader.

``compare_with_official(path)`` reads one file three ways: ``safetensors.safe_open`` (every tensor and the
metadata), ``safetensors.torch.load`` (the file's bytes) and velodiff's ``read_safetensors`` /
``read_safetensors_header``. What both official readers reject we must reject with a CheckpointError naming
the file; what both accept we must read to the same names, dtypes, shapes, bytes and metadata. Any other
exception from our reader is a crash and fails the test.

Documented deviations (checked by this module, independently of the reader under test, on the header's
JSON):

* a name repeated inside one JSON object: the official library keeps the last entry silently (two
  different tensors under one name load as the second); JSON object names should be unique (RFC 8259) and
  the format is a map from names, so we refuse it;
* a dtype written as a JSON map, e.g. ``{"F32": null}``: serde's enum encoding, accepted by the official
  library, not the format's string; we refuse it;
* ``F4`` (packed fp4): ``safe_open`` reads it (as float4_e2m1fn_x2 with the last dimension halved),
  ``safetensors.torch.load`` rejects it (its dtype table lacks it); velodiff refuses it as unsupported.

Two places where the official readers disagree with each other:

* ``safetensors.torch.load`` lacks ``F8_E8M0`` (KeyError), which ``safe_open`` and the format accept; there we
  follow ``safe_open``;
* an empty tensor whose contiguous strides overflow torch's int64, e.g. shape [0, 2**32, 2**32] F32:
  ``load`` raises torch's "Stride calculation overflowed", ``safe_open`` returns a tensor with a zero
  stride; we refuse it ("torch cannot hold a tensor of this shape").
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import safetensors.torch
import torch
from safetensors import safe_open

from velodiff.loading import CheckpointError, read_safetensors, read_safetensors_header


@dataclass
class Verdict:
    """One reader's answer: the tensors and metadata it read, or the error it raised."""

    tensors: Optional[Dict[str, torch.Tensor]] = None
    metadata: Optional[Dict[str, str]] = None
    error: Optional[str] = None

    @property
    def accepted(self) -> bool:
        return self.error is None


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:300]}"


def official_safe_open(path: str) -> Verdict:
    """``safe_open`` + ``get_tensor`` for every key; any exception (a panic included) is a rejection."""
    try:
        with safe_open(path, framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
            metadata = f.metadata() or {}
        return Verdict(tensors, dict(metadata))
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # pyo3's PanicException derives from BaseException
        return Verdict(error=_describe(e))


def official_load(data: bytes) -> Verdict:
    """``safetensors.torch.load`` on the bytes (it returns no metadata)."""
    try:
        return Verdict(safetensors.torch.load(data), None)
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:
        return Verdict(error=_describe(e))


def ours(path: str) -> Verdict:
    """velodiff's reader; only CheckpointError counts as a rejection, anything else propagates."""
    try:
        tensors = read_safetensors(path)
        _, metadata, _ = read_safetensors_header(path)
        return Verdict(tensors, metadata)
    except CheckpointError as e:
        assert os.path.basename(path) in str(e), f"the error does not name the file: {e}"
        return Verdict(error=str(e))


def _raw_header(data: bytes) -> Optional[str]:
    """The header text of a file the official library accepted (so it is well formed)."""
    n = int.from_bytes(data[:8], "little")
    return data[8:8 + n].decode("utf-8")


def _pairs_with_duplicates(text: str) -> List[str]:
    """Names repeated inside one JSON object, anywhere in ``text``."""
    repeated: List[str] = []

    def hook(pairs):
        names = [k for k, _ in pairs]
        repeated.extend(k for k in set(names) if names.count(k) > 1)
        return dict(pairs)

    json.loads(text, object_pairs_hook=hook)
    return repeated


def documented_deviation(data: bytes) -> Optional[str]:
    """If the official library accepted ``data`` only through a documented deviation, a regex our error
    message must match; else None."""
    text = _raw_header(data)
    if _pairs_with_duplicates(text):
        return r"appears twice"
    header = json.loads(text)
    dtypes = [e.get("dtype") for k, e in header.items() if k != "__metadata__" and isinstance(e, dict)]
    if any(isinstance(d, dict) for d in dtypes):
        return r"corrupt dtype"
    if "F4" in dtypes:
        return r"unsupported dtype 'F4'"
    return None


def _same(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor], who: str) -> None:
    assert set(a) == set(b), f"names differ from {who}: {sorted(a)} vs {sorted(b)}"
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype, f"{k!r}: dtype {x.dtype} vs {who}'s {y.dtype}"
        assert tuple(x.shape) == tuple(y.shape), f"{k!r}: shape {tuple(x.shape)} vs {who}'s {tuple(y.shape)}"
        if x.numel():  # (an empty tensor's strides can be anything)
            xb = x.contiguous().reshape(-1).view(torch.uint8)
            yb = y.contiguous().reshape(-1).view(torch.uint8)
            assert torch.equal(xb, yb), f"{k!r}: bytes differ from {who}'s"


@dataclass
class Outcome:
    """What happened to one file: 'accepted', 'rejected' or 'deviation', and the three verdicts."""

    kind: str
    official: Verdict
    loaded: Verdict
    velodiff: Verdict
    notes: List[str] = field(default_factory=list)


def compare_with_official(path: str) -> Outcome:
    """Read ``path`` with both official readers and ours; assert we agree (see the module docstring)."""
    with open(path, "rb") as f:
        data = f.read()
    so, ld, me = official_safe_open(path), official_load(data), ours(path)
    context = f"\n  safe_open: {so.error or 'accepted'}\n  load: {ld.error or 'accepted'}\n  velodiff: {me.error or 'accepted'}"
    if so.accepted:
        deviation = documented_deviation(data)
        if deviation is not None:
            assert not me.accepted and re.search(deviation, me.error), \
                f"documented deviation ({deviation}) not refused as documented{context}"
            return Outcome("deviation", so, ld, me)
        if not ld.accepted and "Stride calculation overflowed" in ld.error:
            assert not me.accepted and "torch cannot hold" in me.error, \
                f"an empty tensor torch cannot hold (safe_open returns it with a zero stride){context}"
            return Outcome("rejected", so, ld, me)
        if not ld.accepted:  # load's torch dtype table lacks F8_E8M0: follow safe_open
            assert "KeyError: 'F8_E8M0'" in ld.error, f"the official readers disagree{context}"
    else:
        assert not ld.accepted, f"the official readers disagree{context}"
    if not so.accepted:
        assert not me.accepted, f"the official library rejects this file, velodiff accepted it{context}"
        return Outcome("rejected", so, ld, me)
    assert me.accepted, f"the official library accepts this file, velodiff rejected it{context}"
    _same(me.tensors, so.tensors, "safe_open")
    assert me.metadata == so.metadata, f"metadata {me.metadata} vs safe_open's {so.metadata}"
    if ld.accepted:
        _same(me.tensors, ld.tensors, "safetensors.torch.load")
    return Outcome("accepted", so, ld, me)
