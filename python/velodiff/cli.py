"""The ``velodiff`` command line. Subcommands arrive with the issues that build them; ``info`` is first."""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _cmd_info(args: argparse.Namespace) -> int:
    from velodiff.info import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    width = max(len(k) for k in data)
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "(none)"
        print(f"{key:<{width}}  {value}")
    return 0 if data["native_module"] else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="velodiff", description="Fast, correct diffusion inference.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="what this build contains: versions, CUDA archs, CPU ISA, ops")
    p_info.add_argument("--json", action="store_true", help="print JSON for machines")
    p_info.set_defaults(func=_cmd_info)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
