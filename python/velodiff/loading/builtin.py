"""velodiff's built-in models: pipeline folders shipped inside the package, reached by name."""
from __future__ import annotations

import os
from typing import Union

#: the package's data folder (trained by scripts/train_digits.py and scripts/train_digits_dit.py)
DATA_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data")
#: built-in model name -> its diffusers pipeline folder
BUILTIN_MODELS = {name: os.path.join(DATA_DIR, name) for name in ("digits", "digits-dit")}


def resolve_model_path(name_or_path: Union[str, os.PathLike]) -> str:
    """A built-in model's folder for its name (the name wins over a local folder of that name, which
    ``"./digits"`` reaches), else ``name_or_path`` itself as a string. Raises FileNotFoundError when a
    built-in model is missing from this installation."""
    path = os.fspath(name_or_path)
    if path not in BUILTIN_MODELS:
        return path
    folder = BUILTIN_MODELS[path]
    if not os.path.isfile(os.path.join(folder, "model_index.json")):
        raise FileNotFoundError(f"the built-in model {path!r} is missing from this installation (expected "
                                f"{folder}); reinstall velodiff or retrain it with scripts/train_digits.py")
    return folder
