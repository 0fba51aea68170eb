"""``velodiff serve``: the HTTP image API (OpenAI's ``/v1/images/generations``) with dynamic batching, on one
machine (:mod:`velodiff.serve`)."""
from __future__ import annotations

import argparse
import os

from velodiff.commands import args as A
from velodiff.commands.errors import UsageError, step


def add_parser(sub) -> None:
    p = sub.add_parser("serve", help="serve the model over HTTP (OpenAI images API) with dynamic batching",
                       description="Serve a model over HTTP: POST /v1/images/generations (OpenAI's images request "
                                   "plus negative_prompt, steps, sampler, guidance, seed, class_label, lora, "
                                   "optimize, stream), GET /v1/models, /health, /metrics. Requests with the same "
                                   "settings are batched.", epilog=A.epilog())
    A.add_model(p)
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: %(default)s)")
    p.add_argument("--port", type=A.nonnegative_int, default=8000, metavar="N",
                   help="the port (default: %(default)s)")
    p.add_argument("--max-batch", type=A.positive_int, default=8, metavar="N",
                   help="images per batch (default: %(default)s)")
    p.add_argument("--max-wait-ms", type=A.nonnegative_float, default=20.0, metavar="MS",
                   help="how long a request waits for others to batch with (default: %(default)s)")
    p.add_argument("--max-queue", type=A.positive_int, default=64, metavar="N",
                   help="requests waiting at most; more are answered 429 (default: %(default)s)")
    p.add_argument("--max-n", type=A.positive_int, default=None, metavar="N",
                   help="images per request (default: --max-batch)")
    p.add_argument("--max-side", type=A.positive_int, default=None, metavar="PX",
                   help="largest image side in pixels (default: the model's limit)")
    p.add_argument("--max-steps", type=A.positive_int, default=100, metavar="N",
                   help="denoising steps per request at most (default: %(default)s)")
    p.add_argument("--allow-optimize", metavar="SPEC", action="append", default=[],
                   help="a technique (NAME[:key=value,...], as --optimize) requests may ask for; repeatable")
    p.add_argument("--no-pad", action="store_true",
                   help="run partial batches at their size (lower latency when idle; an image then depends on its "
                        "batch in the last bits)")
    A.add_device_dtype(p)
    A.add_lora(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    A.check_model_path(args.model)
    A.parse_optimize(args.allow_optimize, "--allow-optimize")
    loras = A.parse_loras(args.lora, args.model)
    if args.port > 65535:
        raise UsageError(f"--port {args.port}: must be from 0 to 65535")
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise UsageError("velodiff serve needs fastapi and uvicorn: pip install fastapi uvicorn") from None

    import torch

    from velodiff.serve.config import ServeConfig
    from velodiff.serve.server import load_pipeline, serve

    with step(None):
        config = ServeConfig(model=args.model, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                             max_queue=args.max_queue, max_n=args.max_n, max_side=args.max_side,
                             max_steps=args.max_steps, allowed_optimize=tuple(args.allow_optimize),
                             pad_batches=not args.no_pad)
    device = A.check_device(args.device)
    names = [os.path.basename(path).rsplit(".", 1)[0] for path, _ in loras]
    with step(f"--model {args.model}"):
        pipe = load_pipeline(config, [(p, n, s) for (p, s), n in zip(loras, names)], device=device,
                             dtype=getattr(torch, A.DTYPES[args.dtype]))
    print(f"velodiff serve: {config.model_id} on http://{args.host}:{args.port} (max batch {config.max_batch}, "
          f"max wait {config.max_wait_ms:g} ms, queue {config.max_queue})", flush=True)
    serve(config, host=args.host, port=args.port, pipe=pipe)
    return 0
