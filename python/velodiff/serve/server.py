"""``velodiff serve`` on one machine: load the model, start the engine, run the API under uvicorn.

Shutdown (SIGINT / SIGTERM) drains: uvicorn stops accepting connections and waits for the open requests, whose
jobs the engine finishes; then the engine stops.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

from velodiff.serve.config import ServeConfig
from velodiff.serve.engine import Engine


def load_pipeline(config: ServeConfig, loras: Sequence[Tuple[str, str, float]] = (), device: str = "cpu",
                  dtype=None):
    """The served pipeline with its LoRAs (``(path, name, strength)``) loaded."""
    import torch

    from velodiff.pipelines import Pipeline
    pipe = Pipeline.from_pretrained(config.model, dtype=dtype or torch.float32, device=device)
    for path, name, strength in loras:
        pipe.load_lora(path, name=name, strength=strength)
    return pipe


def build_app(config: ServeConfig, pipe=None, engine: Optional[Engine] = None, **load_kwargs):
    """(app, engine): the FastAPI app over a new engine on ``pipe`` (loaded from ``config`` when None)."""
    from velodiff.serve.app import create_app
    if engine is None:
        engine = Engine(pipe if pipe is not None else load_pipeline(config, **load_kwargs), config)
    app = create_app(lambda: engine, on_shutdown=lambda: engine.stop(drain=True))
    return app, engine


def serve(config: ServeConfig, host: str = "127.0.0.1", port: int = 8000, pipe=None, log_level: str = "info",
          **load_kwargs) -> None:
    """Serve until interrupted (blocking)."""
    import uvicorn
    app, engine = build_app(config, pipe, **load_kwargs)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=600)
    finally:
        engine.stop(drain=True)
