"""Writing a model to its destination without losing anything: ``velodiff quantize``, ``velodiff convert`` and
the library functions behind them write here.

- An existing destination is refused unless ``force=True``; an empty folder counts as absent.
- Everything is written under a temporary name in the destination's parent folder (same file system) and renamed
  into place at the end, so an interrupted or failed run leaves an existing model as it was and removes only
  its own temporary files.
- Even with ``force=True`` no file that the command did not write is deleted: files of the destination folder at
  the paths the command writes are replaced, every other file stays. If a file that stays would be read as part
  of the new model (a weights file beside the new ones in a component folder), nothing is replaced and the error
  lists it.
- Files get the mode ``0o666`` and folders ``0o777`` less the process umask, like any file the user creates
  (temporary files are created ``0o600``).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator, List

#: suffixes of files that a loader reads from a component folder (a stale one could be read with a new model)
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".json")


class DestinationExistsError(FileExistsError):
    """The destination exists and ``force`` was not given; nothing was written."""


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(root: str) -> None:
    """Give ``root`` and everything under it the usual modes: files 0o666, folders 0o777, less the umask."""
    mask = current_umask()
    if os.path.isfile(root):
        os.chmod(root, 0o666 & ~mask)
        return
    for folder, _, files in os.walk(root):
        os.chmod(folder, 0o777 & ~mask)
        for name in files:
            path = os.path.join(folder, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def _is_empty_folder(path: str) -> bool:
    return os.path.isdir(path) and not os.listdir(path)


def check_destination(dst: str, *, folder: bool, force: bool = False) -> None:
    """Raise before any work if ``dst`` cannot be written: it exists and ``force`` is false
    (:class:`DestinationExistsError`), or it is a file where a folder is to go or the reverse (never replaced,
    even with ``force``)."""
    dst = os.fspath(dst)
    if not os.path.lexists(dst) or (folder and _is_empty_folder(dst)):
        return
    if folder and not os.path.isdir(dst):
        raise FileExistsError(f"{dst!r} is a file; a folder is to be written there (choose another destination)")
    if not folder and os.path.isdir(dst):
        raise FileExistsError(f"{dst!r} is a folder; a file is to be written there (choose another destination)")
    if not force:
        raise DestinationExistsError(f"{dst!r} exists; nothing was written (pass force=True to replace the files "
                                     "this writes; other files there are kept)")


def _files(root: str) -> List[str]:
    out = []
    for folder, _, files in os.walk(root):
        for name in files:
            out.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(out)


def _stale_model_files(new_root: str, old_root: str) -> List[str]:
    """Files of ``old_root`` that the new tree lacks but that sit in a subfolder the new tree writes and look
    like model files: a loader could read them with the new model."""
    new_files = set(_files(new_root))
    new_dirs = {os.path.dirname(f) for f in new_files if os.path.dirname(f)}
    return [f for f in _files(old_root) if f not in new_files and os.path.dirname(f) in new_dirs
            and f.endswith(MODEL_FILE_SUFFIXES)]


def _install_folder(tmp: str, dst: str, force: bool) -> None:
    """Put the finished tree ``tmp`` at ``dst`` (see the module docstring)."""
    if not os.path.lexists(dst):
        os.rename(tmp, dst)
        return
    if _is_empty_folder(dst):
        os.rmdir(dst)
        os.rename(tmp, dst)
        return
    check_destination(dst, folder=True, force=force)  # it may have appeared while this ran
    stale = _stale_model_files(tmp, dst)
    if stale:
        raise FileExistsError(f"{dst!r} holds {', '.join(stale[:5])}{' ...' if len(stale) > 5 else ''}, which this "
                              "did not write but a loader would read with the new model; nothing was replaced: "
                              "remove those files or choose another destination")
    kept = [f for f in _files(dst) if not os.path.lexists(os.path.join(tmp, f))]
    parent, base = os.path.split(os.path.abspath(dst))
    old = tempfile.mkdtemp(prefix=f".{base}.", suffix=".velodiff-old", dir=parent)
    os.rmdir(old)
    os.rename(dst, old)  # from here to the next rename (two system calls) the old model is at ``old``
    os.rename(tmp, dst)
    try:
        for rel in kept:
            target = os.path.join(dst, rel)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            os.rename(os.path.join(old, rel), target)
    except OSError as e:
        raise OSError(f"{dst!r}: the new model is in place, but moving the files it did not write back from "
                      f"{old!r} failed ({e}); they are still there") from e
    shutil.rmtree(old)  # what is left are the old versions of the files just written


@contextlib.contextmanager
def output_folder(dst, *, force: bool = False) -> Iterator[str]:
    """``with output_folder(dst, force=...) as tmp:`` write the model under ``tmp``; on success it is moved to
    ``dst`` (see the module docstring); on an exception (Ctrl-C included) ``tmp`` is removed and ``dst`` is
    untouched."""
    dst = os.path.abspath(os.fspath(dst))
    check_destination(dst, folder=True, force=force)
    parent, base = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{base}.", suffix=".velodiff-tmp", dir=parent)
    try:
        yield tmp
        apply_umask(tmp)
        _install_folder(tmp, dst, force)
    finally:
        if os.path.lexists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def output_file(dst, *, force: bool = False) -> Iterator[str]:
    """``with output_file(dst, force=...) as tmp:`` write one file at ``tmp`` (same folder and suffix as
    ``dst``); on success it replaces ``dst`` atomically; on an exception it is removed and ``dst`` untouched."""
    dst = os.path.abspath(os.fspath(dst))
    check_destination(dst, folder=False, force=force)
    parent, base = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    suffix = os.path.splitext(base)[1]
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=f".velodiff-tmp{suffix}", dir=parent)
    os.close(fd)
    try:
        yield tmp
        apply_umask(tmp)
        check_destination(dst, folder=False, force=force)  # it may have appeared while this ran
        os.replace(tmp, dst)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)
