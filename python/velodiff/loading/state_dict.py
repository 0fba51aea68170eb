"""Loading a state dict into a module with errors that name the file and the keys."""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from velodiff.loading.errors import CheckpointError, list_keys


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                     strict: bool = True) -> None:
    """Raise :class:`CheckpointError` if ``state_dict`` does not fit ``module``.

    Checked: keys the module needs but the dict lacks (strict only), keys the dict has but the module does
    not (strict only), and shape mismatches (always). Up to ten keys are listed, then a count.
    """
    expected = module.state_dict()
    problems = []
    if strict:
        missing = [k for k in expected if k not in state_dict]
        unexpected = [k for k in state_dict if k not in expected]
        if missing:
            problems.append(f"{len(missing)} missing key(s): {list_keys(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {list_keys(unexpected)}")
    bad = [(k, tuple(expected[k].shape), tuple(v.shape)) for k, v in state_dict.items()
           if k in expected and tuple(expected[k].shape) != tuple(v.shape)]
    if bad:
        shown = "; ".join(f"{k!r}: expected {e}, found {f}" for k, e, f in bad[:10])
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        problems.append(f"{len(bad)} shape mismatch(es): {shown}{more}")
    if problems:
        raise CheckpointError(f"{source!r} does not fit {type(module).__name__}: " + "; ".join(problems))


def load_state_dict_into(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str,
                         strict: bool = True, assign: bool = False) -> nn.Module:
    """``module.load_state_dict(state_dict)`` after :func:`check_state_dict`; returns ``module``.

    ``source`` is the file (or folder) the weights came from; every error names it. With ``assign=True``
    the module takes the tensors themselves (their dtype and device) instead of copying into its own.
    """
    check_state_dict(module, state_dict, source=source, strict=strict)
    module.load_state_dict(dict(state_dict), strict=strict, assign=assign)
    return module
