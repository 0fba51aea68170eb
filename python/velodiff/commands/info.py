"""``velodiff info``: what this build contains."""
from __future__ import annotations

import argparse
import json


def add_parser(sub) -> None:
    p = sub.add_parser("info", help="what this build contains: versions, CUDA archs, CPU ISA, ops")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from velodiff.info import info

    data = info()
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    width = max(len(k) for k in data)
    for key, value in data.items():
        if isinstance(value, list):
            value = ", ".join(value) if value else "(none)"
        elif isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items()) if value else "(none)"
        print(f"{key:<{width}}  {value}")
    return 0 if data["native_module"] else 1
