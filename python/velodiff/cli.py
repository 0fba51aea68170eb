"""The ``velodiff`` command line: ``info``, ``generate``, ``convert``, ``eval``, ``quantize``, ``bench``,
``calibrate-cache``, ``stream`` and ``serve`` (one module per subcommand in :mod:`velodiff.commands`).

Every subcommand reports bad input as one line naming the flag and the fix, exit code 2, no traceback; Ctrl-C
stops it with one line and exit code 130. Parsing imports no torch, so ``velodiff --help`` answers at once.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from velodiff.commands import bench, calibrate_cache, convert, evaluate, generate, info, quantize, serve, stream
from velodiff.commands.args import Parser
from velodiff.commands.errors import EXIT_INTERRUPTED, run_command
from velodiff.commands.generate import make_grid

SUBCOMMANDS = (info, generate, convert, evaluate, quantize, bench, calibrate_cache, stream, serve)


def build_parser() -> Parser:
    parser = Parser(prog="velodiff", description="Fast, correct diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser, metavar="COMMAND")
    for module in SUBCOMMANDS:
        module.add_parser(sub)
    parser.subcommands = dict(sub.choices)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``velodiff ARGV``; returns the exit code (0 ok, 1 an internal error, 2 bad input, 130 Ctrl-C). A bad
    argument that argparse finds (a wrong type or choice) raises SystemExit(2) after its one line, as argparse
    always does; ``--help`` raises SystemExit(0)."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)  # a bad argument: one line, then SystemExit(2)
        if extra:  # reported by the subcommand's parser, so the line names the subcommand
            parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(extra)}")
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return run_command(args.command, args.func, args)


__all__ = ["build_parser", "main", "make_grid"]

if __name__ == "__main__":
    sys.exit(main())
