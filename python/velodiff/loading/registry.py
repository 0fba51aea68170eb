"""Loaders for component folders that are not plain diffusers folders (e.g. a quantized denoiser).

A loader is registered by the package that owns its format, when that package is imported
(:mod:`velodiff.quant.checkpoint` registers ``velodiff-quantized``), so :mod:`velodiff.loading` never imports
it. So that such a folder loads even when the caller never imported the owning package, the modules listed in
:data:`LOADER_MODULES` are imported on the first lookup: a name in a table, not an import edge, which keeps the
import graph acyclic (``quant`` imports ``loading``, never the reverse).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional

#: modules that register folder loaders when imported (imported by :func:`folder_loader_for` on first use)
LOADER_MODULES = ("velodiff.quant.checkpoint",)


@dataclass(frozen=True)
class FolderLoader:
    """``matches(folder) -> bool`` says whether this loader reads the component folder;
    ``load(folder, class_name, dtype, device) -> nn.Module`` builds the component (``class_name``: the diffusers
    class that ``model_index.json`` declares for it)."""

    name: str
    matches: Callable[[str], bool]
    load: Callable[..., Any]


_LOADERS: Dict[str, FolderLoader] = {}
_imported = False


def register_folder_loader(name: str, matches: Callable[[str], bool], load: Callable[..., Any]) -> FolderLoader:
    """Register (or replace, on a module reload) the loader ``name``; returns it."""
    loader = FolderLoader(name, matches, load)
    _LOADERS[name] = loader
    return loader


def folder_loaders() -> Dict[str, FolderLoader]:
    """Every registered loader by name, after importing :data:`LOADER_MODULES`."""
    global _imported
    if not _imported:
        for module in LOADER_MODULES:
            importlib.import_module(module)
        _imported = True
    return dict(_LOADERS)


def folder_loader_for(folder: str) -> Optional[FolderLoader]:
    """The registered loader that reads the component folder ``folder``, or None for a plain diffusers one."""
    for loader in folder_loaders().values():
        if loader.matches(folder):
            return loader
    return None
