"""Model configs: the dict a model was built from, and building a model from a diffusers ``config.json``."""
from __future__ import annotations

import inspect
from typing import Any, Callable, Dict, Mapping, Union


class ModelConfig(dict):
    """The keyword arguments a model was built with, readable as ``config.key`` or ``config["key"]``."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None


def init_config(frame_locals: Mapping[str, Any]) -> ModelConfig:
    """Capture an ``__init__``'s keyword arguments (call first thing with ``locals()``)."""
    return ModelConfig({k: v for k, v in frame_locals.items() if k not in ("self", "__class__")})


def _norm(value: Any) -> Any:
    """JSON gives lists where Python defaults are tuples: compare them as tuples."""
    return tuple(_norm(v) for v in value) if isinstance(value, (list, tuple)) else value


Foreign = Mapping[str, Union[Any, Callable[[Dict[str, Any]], Any]]]


def kwargs_from_config(cls: type, config: Mapping[str, Any], foreign: Foreign) -> Dict[str, Any]:
    """``__init__`` keyword arguments of ``cls`` from a diffusers config dict.

    Keys starting with ``_`` are dropped; keys naming an ``__init__`` argument are passed on (``__init__``
    validates their values). ``foreign`` lists keys that diffusers writes but we do not implement, each with the one
    value under which it does not change the model (or a callable ``(kwargs) -> value`` for derived keys); any
    other key, or a foreign key with another value, raises ValueError naming it.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict, got {type(config).__name__}")
    params = set(inspect.signature(cls.__init__).parameters) - {"self"}
    kwargs = {k: v for k, v in config.items() if not k.startswith("_") and k in params}
    for key, value in config.items():
        if key.startswith("_") or key in params:
            continue
        if key not in foreign:
            raise ValueError(f"{cls.__name__}: unsupported config key {key!r} (value {value!r})")
        expected = foreign[key](kwargs) if callable(foreign[key]) else foreign[key]
        if _norm(value) != _norm(expected):
            raise ValueError(f"{cls.__name__}: config key {key!r} = {value!r} is not supported "
                             f"(only {expected!r} is implemented)")
    return kwargs


def build_from_config(cls, config: Mapping[str, Any], foreign: Foreign):
    """``cls(**kwargs_from_config(cls, config, foreign))``."""
    return cls(**kwargs_from_config(cls, config, foreign))
