"""LoRA adapters on a pipeline: load (from a safetensors file or a state dict), several at once, strengths per
adapter and per call, fuse / unfuse (exact restore), unload. One implementation for plain and quantized layers
(:mod:`velodiff.lora.branch`)."""
from __future__ import annotations

import contextlib
import json
import os
import threading
from concurrent.futures import Future
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple, Union

import torch
from torch import nn

from velodiff.lora.branch import LoraBranch
from velodiff.lora.formats import LoraFactors, lora_components, parse_lora

LoraSource = Union[str, os.PathLike, Mapping[str, torch.Tensor]]


def _registry(pipe) -> Dict[str, Dict]:
    if not hasattr(pipe, "_loras"):
        pipe._loras = {}
    return pipe._loras


def _is_quantized(layer: nn.Module) -> bool:
    """A quantized layer with a low-rank branch (velodiff.quant.linear.QuantizedLinear: its add_lora / loras),
    recognised by that interface so that velodiff.lora needs no import of velodiff.quant."""
    return callable(getattr(layer, "add_lora", None)) and isinstance(getattr(layer, "loras", None), dict)


#: where a model folder keeps the LoRAs it ships (loaded by name: ``pipe.load_lora("digits-lcm")``)
LORA_FOLDER = "loras"


def find_lora(source: LoraSource, model_folder: Optional[str]) -> LoraSource:
    """A bare adapter name that is no file (``"digits-lcm"``) is the model folder's ``loras/<name>.safetensors`` when
    that exists; anything else is returned as it is."""
    if isinstance(source, Mapping) or model_folder is None:
        return source
    path = os.fspath(source)
    if os.path.exists(path) or os.sep in path or path.endswith(".safetensors"):
        return source
    shipped = os.path.join(model_folder, LORA_FOLDER, path + ".safetensors")
    return shipped if os.path.isfile(shipped) else source


def read_lora_file(source: LoraSource) -> Tuple[Dict[str, torch.Tensor], Dict[str, Any]]:
    """(state dict, call defaults) of a LoRA ``.safetensors`` file (pickled formats are refused), or of a state dict
    (no defaults). Defaults: the file metadata's ``velodiff_lora_defaults`` JSON (e.g. an LCM-LoRA's
    ``{"guidance_scale": 1.0}``), the keys of a model folder's defaults."""
    if isinstance(source, Mapping):
        return dict(source), {}
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"LoRA file {path!r} does not exist")
    if not path.endswith(".safetensors"):
        raise ValueError(f"LoRA file {path!r}: only .safetensors files are read (pickled .bin / .pt / .ckpt files "
                         "can run code when loaded; convert them first)")
    from velodiff.loading.safetensors_io import read_safetensors, read_safetensors_header
    _, metadata, _ = read_safetensors_header(path)
    try:
        defaults = json.loads((metadata or {}).get("velodiff_lora_defaults", "{}"))
    except json.JSONDecodeError as e:
        raise ValueError(f"LoRA file {path!r}: bad velodiff_lora_defaults metadata ({e})") from None
    return read_safetensors(path), defaults


def _attach(layer: nn.Module, name: str, f: LoraFactors, strength: float, capacity: int) -> None:
    if _is_quantized(layer):
        layer.add_lora(name, f.down.reshape(f.rank, -1), f.up.reshape(f.up.shape[0], f.rank), strength,
                       scale=f.factor)
        return
    branch = getattr(layer, "_velodiff_lora", None)
    if branch is None:
        branch = LoraBranch(layer)
        layer._velodiff_lora = branch
    branch.add(name, f, strength, capacity)


def _detach(layer: nn.Module, name: str) -> None:
    if _is_quantized(layer):
        layer.remove_lora(name)
        return
    branch = layer._velodiff_lora
    branch.remove(name)
    if not branch.adapters:
        branch.detach()
        del layer._velodiff_lora


def load_lora(pipe, source: LoraSource, name: Optional[str] = None, strength: float = 1.0,
              strict: bool = True, capacity: int = 0) -> str:
    """Add a LoRA to ``pipe`` (see :meth:`velodiff.pipelines.base.BasePipeline.load_lora`); returns its name."""
    source = find_lora(source, getattr(pipe, "name_or_path", None))
    name = _name_of(source, name)
    return _apply(pipe, name, _parse(pipe, source, strict), strength, capacity)


def _parse(pipe, source: LoraSource, strict: bool):
    """(factors by layer, call defaults) of a LoRA source for ``pipe``."""
    components, denoiser = lora_components(pipe)
    state, defaults = read_lora_file(source)
    return parse_lora(state, components, denoiser, strict=strict), defaults


def _name_of(source: LoraSource, name: Optional[str]) -> str:
    if name is not None:
        return name
    if isinstance(source, Mapping):
        raise ValueError("name= is required for a LoRA given as a state dict")
    return os.path.basename(os.fspath(source)).rsplit(".", 1)[0]


def _apply(pipe, name: str, parsed, strength: float, capacity: int = 0) -> str:
    """Attach parsed factors under ``name``, all or nothing; the LoRA's call defaults replace the pipeline's until
    it is unloaded."""
    factors, defaults = parsed
    if defaults:
        try:
            defaults = pipe.check_defaults(defaults)
        except ValueError as e:
            raise ValueError(f"LoRA {name!r}: bad velodiff_lora_defaults metadata ({e})") from None
    loras = _registry(pipe)
    if name in loras:
        raise ValueError(f"a LoRA named {name!r} is loaded already; unload_lora({name!r}) first or pick another name")
    if _fused(pipe):
        raise RuntimeError("the LoRAs are fused into the weights; unfuse_lora() before loading another")
    components, _ = lora_components(pipe)
    done = []
    try:
        for (component, module), f in factors.items():
            layer = components[component].get_submodule(module)
            _attach(layer, name, f, strength, capacity)
            done.append(layer)
    except Exception:
        for layer in done:
            _detach(layer, name)
        raise
    loras[name] = {"layers": done, "strength": float(strength), "components": sorted({c for c, _ in factors}),
                   "replaced_defaults": {k: pipe.defaults.get(k) for k in defaults}}
    pipe.defaults.update(defaults)
    return name


_READING = threading.Lock()  # background reads run one at a time


def _in_background(fn, *args) -> Future:
    """``fn(*args)`` on a daemon thread of its own (nothing lingers after it, nothing holds the interpreter at exit);
    reads queue on one lock, so one file is read at a time."""
    future: Future = Future()

    def run():
        with _READING:
            if not future.set_running_or_notify_cancel():
                return
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # handed to whoever waits on the future
                future.set_exception(e)
    threading.Thread(target=run, name="velodiff-lora", daemon=True).start()
    return future


def load_lora_background(pipe, source: LoraSource, name: Optional[str] = None, strength: float = 1.0,
                         strict: bool = True, capacity: int = 0) -> Future:
    """Read and parse a LoRA on a worker thread while the pipeline keeps generating (SwiftDiffusion's asynchronous
    LoRA loading); the adapter joins the layers between two calls, at the start of the first call after it is read
    (or at :func:`wait_loras`). Returns a Future of the parsed factors; a file that does not fit raises at that
    call. Bounded: one file is read at a time, so at most the files queued are held in memory."""
    source = find_lora(source, getattr(pipe, "name_or_path", None))
    name = _name_of(source, name)
    pending = getattr(pipe, "_lora_pending", [])
    if name in _registry(pipe) or any(p[0] == name for p in pending):
        raise ValueError(f"a LoRA named {name!r} is loaded or loading already")
    lora_components(pipe)  # a pipeline without a denoiser fails here, not on the worker
    future = _in_background(_parse, pipe, source, strict)
    pipe._lora_pending = pending + [(name, float(strength), capacity, future)]
    return future


def apply_pending(pipe, wait: bool = False) -> None:
    """Attach the background-loaded LoRAs that are ready (all of them, waiting, with ``wait``)."""
    pending = getattr(pipe, "_lora_pending", [])
    if not pending:
        return
    ready = [p for p in pending if wait or p[3].done()]
    pipe._lora_pending = [p for p in pending if p not in ready]  # a failed one raises once, then is gone
    for name, strength, capacity, future in ready:
        _apply(pipe, name, future.result(), strength, capacity)


def _entry(pipe, name: str) -> Dict:
    loras = _registry(pipe)
    if name not in loras:
        raise KeyError(f"no LoRA named {name!r} is loaded (loaded: {sorted(loras) or 'none'})")
    return loras[name]


def set_lora_strength(pipe, name: str, strength: float) -> None:
    """Re-weight LoRA ``name`` in place (no shape changes)."""
    entry = _entry(pipe, name)
    if _fused(pipe):
        raise RuntimeError("the LoRAs are fused into the weights; unfuse_lora() before changing a strength")
    for layer in entry["layers"]:
        if _is_quantized(layer):
            layer.set_lora_strength(name, strength)
        else:
            layer._velodiff_lora.set_strength(name, strength)
    entry["strength"] = float(strength)


def unload_lora(pipe, name: Optional[str] = None) -> None:
    """Remove LoRA ``name`` (None: every LoRA); the layers are as before it was loaded."""
    if _fused(pipe):
        raise RuntimeError("the LoRAs are fused into the weights; unfuse_lora() before unloading")
    for n in ([name] if name is not None else list(_registry(pipe))):
        entry = _entry(pipe, n)
        for layer in entry["layers"]:
            _detach(layer, n)
        for key, value in entry["replaced_defaults"].items():
            if value is None:
                pipe.defaults.pop(key, None)
            else:
                pipe.defaults[key] = value
        del _registry(pipe)[n]


def _branches(pipe) -> Iterator[LoraBranch]:
    seen = set()
    for entry in _registry(pipe).values():
        for layer in entry["layers"]:
            branch = getattr(layer, "_velodiff_lora", None)
            if branch is not None and id(branch) not in seen:
                seen.add(id(branch))
                yield branch


def _fused(pipe) -> bool:
    return any(b.fused_weight is not None for b in _branches(pipe))


def fuse_lora(pipe) -> None:
    """Add every loaded LoRA into the plain layers' weights (no per-call branch; the original weights are kept for
    :func:`unfuse_lora`). Quantized layers keep theirs on the low-rank branch, which their GEMM already fuses."""
    for branch in _branches(pipe):
        branch.fuse()


def unfuse_lora(pipe) -> None:
    """Restore the weights :func:`fuse_lora` changed, bit for bit."""
    for branch in _branches(pipe):
        branch.unfuse()


@contextlib.contextmanager
def lora_strengths(pipe, scales: Optional[Mapping[str, float]]):
    """Within the block, the LoRAs named in ``scales`` have those strengths (a call's ``lora_scales=``)."""
    if not scales:
        yield
        return
    loras = _registry(pipe)
    unknown = [n for n in scales if n not in loras]
    if unknown:
        raise KeyError(f"lora_scales names LoRAs that are not loaded: {unknown} (loaded: {sorted(loras) or 'none'})")
    before = {n: loras[n]["strength"] for n in scales}
    try:
        for n, s in scales.items():
            set_lora_strength(pipe, n, float(s))
        yield
    finally:
        for n, s in before.items():
            set_lora_strength(pipe, n, s)
