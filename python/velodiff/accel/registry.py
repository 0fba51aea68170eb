"""The technique registry, ``optimize`` / ``restore``, and technique specs of the command line.

A technique is a frozen dataclass deriving from :class:`Technique`, registered under a name with
:func:`register`. ``optimize(pipe, *configs)`` applies configs in order after checking that each fits: its own
``check(pipe)`` (a ValueError saying why it does not fit and what would), its ``group`` (two techniques of one
group, e.g. two caches, cannot be applied together) and ``conflicts_with`` (pairs that cannot work together, in
either order). ``restore(pipe)`` undoes them, newest first.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import typing
from typing import Any, Callable, ClassVar, Dict, Optional, Type

#: technique name -> config class
TECHNIQUES: Dict[str, Type["Technique"]] = {}


class Technique:
    """Base of technique configs: frozen dataclasses with ``apply(pipe) -> undo``.

    ``name``: the registry key (set by :func:`register`). ``group``: techniques of one group exclude each other
    on a pipeline (``"cache"``: every cache). Subclasses may override :meth:`check` (does it fit this pipeline?)
    and :meth:`validate` (are the fields valid? called at construction)."""

    name: ClassVar[str] = ""
    group: ClassVar[Optional[str]] = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise a ValueError naming the field when a field is invalid."""

    def check(self, pipe) -> None:
        """Raise a ValueError saying why this technique does not fit ``pipe`` and what fits instead."""

    def conflicts_with(self, other) -> Optional[str]:
        """Why this technique cannot be on one pipeline with ``other`` (another config, applied before or after this
        one), or None. :func:`optimize` asks both configs of every pair."""
        return None

    def apply(self, pipe) -> Callable[[], None]:  # pragma: no cover - every technique implements it
        raise NotImplementedError


def register(name: str):
    """Class decorator: register a :class:`Technique` dataclass under ``name``."""
    def wrap(cls):
        if name in TECHNIQUES and TECHNIQUES[name] is not cls:
            raise ValueError(f"technique name {name!r} is taken by {TECHNIQUES[name].__name__}")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass to be registered as a technique")
        cls.name = name
        TECHNIQUES[name] = cls
        return cls
    return wrap


def _name_of(config) -> str:
    return getattr(config, "name", "") or type(config).__name__


def _conflict(config, other) -> Optional[str]:
    method = getattr(config, "conflicts_with", None)
    return method(other) if method is not None else None


def optimize(pipe, *configs):
    """Apply each config to ``pipe`` in order; returns ``pipe``. Undo all of them with :func:`restore`.

    Before anything is applied, every config is checked: it must have ``apply``; it must fit the pipeline (its
    ``check``); and no two techniques of one ``group`` may be on the pipeline at once (already applied or in
    ``configs``), nor two configs either of which ``conflicts_with`` the other. A ValueError says which and why."""
    applied = list(getattr(pipe, "_applied", []))
    for config in configs:
        if not hasattr(config, "apply"):
            raise TypeError(f"{type(config).__name__} is not a velodiff technique config (it has no apply())")
        group = getattr(config, "group", None)
        if group is not None:
            clash = next((c for c in applied if getattr(c, "group", None) == group), None)
            if clash is not None:
                raise ValueError(f"{_name_of(config)} and {_name_of(clash)} are both {group} techniques and cannot "
                                 f"be applied together; keep one (velodiff.restore(pipe) removes what is applied)")
        for other in applied:
            reason = _conflict(config, other) or _conflict(other, config)
            if reason:
                raise ValueError(f"{_name_of(config)} and {_name_of(other)} cannot be applied together: {reason}; "
                                 f"keep one (velodiff.restore(pipe) removes what is applied)")
        check = getattr(config, "check", None)
        if check is not None:
            check(pipe)
        applied.append(config)
    for config in configs:
        pipe._restore_hooks.append(config.apply(pipe))
        if hasattr(pipe, "_applied"):
            pipe._applied.append(config)
    return pipe


def restore(pipe, keep: int = 0):
    """Undo the techniques applied with :func:`optimize`, newest first, until ``keep`` remain (default: all);
    returns ``pipe``."""
    while len(pipe._restore_hooks) > keep:
        pipe._restore_hooks.pop()()
        if getattr(pipe, "_applied", None):
            pipe._applied.pop()
    return pipe


@contextlib.contextmanager
def applied(pipe, *configs):
    """``optimize(pipe, *configs)`` for the block only: on leaving it those techniques are undone and the ones
    applied before stay (e.g. a server's per-request techniques)."""
    keep = len(pipe._restore_hooks)
    optimize(pipe, *configs)
    try:
        yield pipe
    finally:
        restore(pipe, keep)


# ----------------------------------------------------------------------------------------------------------------
# NAME[:key=value,...] specs (the command line's --optimize)
# ----------------------------------------------------------------------------------------------------------------

def _field_types(cls) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints.get(f.name, str) for f in dataclasses.fields(cls) if f.init}


def _parse_value(text: str, kind, key: str, name: str):
    """``text`` as the field type ``kind`` (int, float, bool, str, Optional[...], Tuple[X, ...])."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is typing.Union and type(None) in args:
        if text.lower() in ("none", "null", ""):
            return None
        kind = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(kind), typing.get_args(kind)
    try:
        if origin is tuple:
            item = args[0] if args else str
            return tuple(_parse_value(part, item, key, name) for part in text.split("/") if part != "")
        if kind is bool:
            low = text.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            value = float(text)
            if math.isnan(value):
                raise ValueError
            return value
        return str(text)
    except ValueError:
        expected = getattr(kind, "__name__", str(kind))
        raise ValueError(f"technique {name!r}: {key}={text!r} is not a valid {expected}") from None


def parse_technique(spec: str) -> "Technique":
    """A config from ``"NAME"`` or ``"NAME:key=value,key=value"`` (values parsed to the fields' types; a tuple
    field takes ``a/b/c``). ValueError naming the registered names, the config's fields or the bad key."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a technique spec is NAME[:key=value,...], got {spec!r}")
    name, _, rest = spec.strip().partition(":")
    name = name.strip()
    if name not in TECHNIQUES:
        known = ", ".join(sorted(TECHNIQUES)) or "(none)"
        raise ValueError(f"unknown technique {name!r}; registered: {known}")
    cls = TECHNIQUES[name]
    types = _field_types(cls)
    kwargs: Dict[str, Any] = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq:
            raise ValueError(f"technique {name!r}: {item!r} is not key=value")
        if key not in types:
            raise ValueError(f"technique {name!r} has no option {key!r}; its options: "
                             f"{', '.join(types) or '(none)'}")
        if key in kwargs:
            raise ValueError(f"technique {name!r}: {key} is given twice")
        kwargs[key] = _parse_value(value.strip(), types[key], key, name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # a required field left out
        raise ValueError(f"technique {name!r}: {e}") from None


def technique_help(name: str) -> str:
    """One line for ``--help``: the technique's options and defaults."""
    cls = TECHNIQUES[name]

    def show(value) -> str:
        return "/".join(map(str, value)) if isinstance(value, tuple) else str(value)

    parts = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            parts.append(f"{f.name}={show(f.default)}")
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            parts.append(f"{f.name}={show(f.default_factory())}")  # type: ignore[misc]
        else:
            parts.append(f"{f.name}=<required>")
    return f"{name}" + (f":{','.join(parts)}" if parts else "")
