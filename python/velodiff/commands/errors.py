"""Bad input on the command line becomes one line naming the flag and the fix, exit code 2, never a traceback.

The CLI checks what it can before loading anything and raises :class:`UsageError` with its own message. The
library raises ValueError / TypeError / FileNotFoundError (velodiff's :class:`~velodiff.loading.CheckpointError`
is a ValueError) whose message names the *Python* argument (``num_inference_steps``, ``allow_pickle=True``, ...):
:func:`cli_message` rewrites those names into the subcommand's flags, and when the message names no flag it is
prefixed with the flag whose value the failing step was using (``--model x`` while loading, ``--outdir x`` while
writing images, ...) unless it names that flag already. Ctrl-C exits 130 after one line.
"""
from __future__ import annotations

import contextlib
import os
import re
import sys
import warnings
from typing import Iterator, Optional, Sequence, Tuple

#: exit codes: bad input, interrupted by Ctrl-C (128 + SIGINT), an internal error (a bug: please report it)
EXIT_USAGE, EXIT_INTERRUPTED, EXIT_INTERNAL = 2, 130, 1


class UsageError(Exception):
    """Bad input found by the CLI; the message names the flag and says what to do."""


class FlagError(Exception):
    """A library error during a step that used ``flag`` (e.g. ``--model x`` while loading)."""

    def __init__(self, flag: Optional[str], error: BaseException):
        super().__init__(str(error))
        self.flag, self.error = flag, error


#: phrases of library messages that mean something else on the command line
_PHRASES: Tuple[Tuple[str, str], ...] = (
    (r"\ballow_pickle=True\b", "--allow-pickle"),
    (r"\bforce=True\b", "--force"),
    (r" to Pipeline\.from_pretrained\b", ""),
    (r" to the loading call\b", ""),
)

#: library argument name -> flag, per subcommand (the longest names first, so ``tokenizer_2`` is not read as
#: ``tokenizer`` + ``_2``)
LIBRARY_NAMES = {
    "generate": (("num_inference_steps", "--steps"), ("num_images_per_prompt", "--num-images"),
                 ("guidance_scale", "--guidance"), ("negative_prompt", "--negative-prompt"),
                 ("class_labels", "--class-label"), ("class_label", "--class-label"), ("prediction_type",
                 "--prediction-type"), ("tokenizer_2", "--tokenizer-2"), ("tokenizer", "--tokenizer"),
                 ("configs", "--configs"), ("allow_pickle", "--allow-pickle"), ("sampler", "--sampler"),
                 ("height", "--height"), ("width", "--width"), ("prompt", "--prompt"), ("device", "--device"),
                 ("dtype", "--dtype")),
    "eval": (("num_inference_steps", "--steps"), ("guidance_scale", "--guidance"), ("prompt_template",
             "--prompt-template"), ("batch_size", "--batch-size"), ("per_class", "--per-class"),
             ("guidance", "--guidance"), ("sampler", "--sampler"), ("upsample", "--upsample"), ("steps", "--steps"),
             ("seed", "--seed"), ("device", "--device"), ("dtype", "--dtype")),
    "quantize": (("calibration_images", "--calibration-images"), ("calibration_steps", "--calibration-steps"),
                 ("memory_budget", "--memory-budget"), ("method", "--method"), ("layers", "--layers"),
                 ("rank", "--rank"), ("seed", "--seed"), ("device", "--device"), ("dtype", "--dtype")),
    "stream": (("num_inference_steps", "--steps"), ("guidance_scale", "--guidance"), ("t_index_list", "--t-index"),
               ("similarity_threshold", "--similarity"), ("max_skip_frame", "--max-skip-frame"),
               ("negative_prompt", "--negative-prompt"), ("cfg_type", "--cfg-type"), ("delta", "--delta"),
               ("prompt", "--prompt"), ("seed", "--seed"), ("device", "--device"), ("dtype", "--dtype")),
    "serve": (("max_wait_ms", "--max-wait-ms"), ("max_batch", "--max-batch"), ("max_queue", "--max-queue"),
              ("max_steps", "--max-steps"), ("max_side", "--max-side"), ("max_n", "--max-n"), ("device", "--device"),
              ("dtype", "--dtype")),
    "convert": (("prediction_type", "--prediction-type"), ("tokenizer_2", "--tokenizer-2"),
                ("tokenizer", "--tokenizer"), ("allow_pickle", "--allow-pickle"), ("configs", "--configs"),
                ("family", "--family"), ("dtype", "--dtype")),
}
#: characters that make a name part of a path, a longer identifier or a quoted value rather than an argument
_EDGE_BEFORE, _EDGE_AFTER = r"(?<![\w/.\-'\"])", r"(?![\w/\-'\"])"


def one_line(text: str) -> str:
    """``text`` with its lines joined and runs of blanks collapsed."""
    return re.sub(r"\s+", " ", text).strip()


def rename_arguments(message: str, command: str) -> str:
    """``message`` with the library's argument names replaced by ``command``'s flags (``name=...`` by
    ``--flag ...``)."""
    for pattern, replacement in _PHRASES:
        message = re.sub(pattern, replacement, message)
    for name, flag in LIBRARY_NAMES.get(command, ()):
        message = re.sub(_EDGE_BEFORE + re.escape(name) + r"=(?=\.\.\.)", flag + " ", message)
        # a name with an underscore is an argument wherever it stands; a plain word (prompt, tokenizer, height)
        # only where it is used as one: followed by "=", ":" or "must" ("words the tokenizer does not know" stays)
        where = _EDGE_AFTER if "_" in name else r"(?=\s*(?:=|:|must\b))"
        message = re.sub(_EDGE_BEFORE + re.escape(name) + where, flag, message)
    return message


def cli_message(command: str, error: BaseException, flag: Optional[str] = None) -> str:
    """The one line printed for ``error`` under ``velodiff command`` (see the module docstring)."""
    text = one_line(str(error) or type(error).__name__)
    if not isinstance(error, UsageError):
        text = rename_arguments(text, command)
        if flag and not re.search(r"(?<![\w-])" + re.escape(flag.split()[0]) + r"(?![\w-])", text):
            text = f"{flag}: {text}"
    return f"velodiff {command}: {text}"


@contextlib.contextmanager
def step(flag: Optional[str]) -> Iterator[None]:
    """Attribute a library ValueError / TypeError / OSError raised inside the block to ``flag`` (which carries
    its value, e.g. ``"--model digits-q"``; None: the message alone)."""
    try:
        yield
    except (ValueError, TypeError, OSError) as e:
        raise FlagError(flag, e) from e


def show_warnings_as_lines(command: str, stderr):
    """A ``warnings.showwarning`` that prints each warning as one line, the library's names turned into flags
    (``velodiff generate: warning: --prompt: 2986 tokens cut ...``); the category is named unless it is
    velodiff's own."""
    def show(message, category, filename, lineno, file=None, line=None):
        text = rename_arguments(one_line(str(message)), command)
        kind = "" if category.__module__.startswith("velodiff") else f" ({category.__name__})"
        print(f"velodiff {command}: warning{kind}: {text}", file=stderr)
    return show


def run_command(command: str, func, args, stderr=None) -> int:
    """``func(args)`` with every input error turned into one line on ``stderr`` and exit code 2, Ctrl-C into 130,
    warnings into one line each. An unexpected exception is a bug: one line and exit 1 (``VELODIFF_TRACEBACK=1``
    shows the traceback)."""
    stderr = stderr or sys.stderr
    with warnings.catch_warnings():
        warnings.showwarning = show_warnings_as_lines(command, stderr)
        return _run(command, func, args, stderr)


def _run(command: str, func, args, stderr) -> int:
    try:
        return func(args)
    except UsageError as e:
        print(cli_message(command, e), file=stderr)
        return EXIT_USAGE
    except FlagError as e:
        print(cli_message(command, e.error, e.flag), file=stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, OSError) as e:
        print(cli_message(command, e), file=stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"velodiff {command}: interrupted (Ctrl-C); stopped cleanly", file=stderr)
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug, not bad input
        if os.environ.get("VELODIFF_TRACEBACK") == "1":
            raise
        print(f"velodiff {command}: internal error: {type(e).__name__}: {one_line(str(e))[:500]} (please report "
              "it; VELODIFF_TRACEBACK=1 shows the traceback)", file=stderr)
        return EXIT_INTERNAL


def flags_given(args, names: Sequence[str]) -> list:
    """The flags among ``names`` (argparse dests) whose value is not None / False."""
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) not in (None, False)]
