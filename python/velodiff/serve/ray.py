"""The same server as a Ray Serve application: replicas of the engine behind Ray's HTTP proxy, the same API.

Each replica loads the model and runs its own :class:`velodiff.serve.engine.Engine` (its own queue and dynamic
batching); Ray routes requests to replicas, restarts a replica that dies, and scales their number with an
``autoscaling_config``. A request that was running on a replica when it died fails (the client retries); the
others are unaffected.

    import ray
    from ray import serve
    from velodiff.serve.config import ServeConfig
    from velodiff.serve.ray import build_ray_app

    ray.init()
    serve.start(http_options={"host": "0.0.0.0", "port": 8000})
    serve.run(build_ray_app(ServeConfig(model="digits"), num_replicas=2), route_prefix="/")

or, from a shell: ``serve run velodiff.serve.ray:app`` (the ``digits`` model, 2 replicas; set
``VELODIFF_SERVE_MODEL`` to serve another).
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Sequence, Tuple

from velodiff.serve.config import ServeConfig

#: this process's replica engine (each Ray Serve replica is its own process); the routes find it here, since the
#: FastAPI app and the deployment class reach the replica as separate pickles
_ENGINE = None


def replica_engine():
    """The engine of the replica running in this process."""
    if _ENGINE is None:
        raise RuntimeError("no velodiff replica runs in this process")
    return _ENGINE


def build_ray_app(config: ServeConfig, num_replicas: int = 2, autoscaling_config: Optional[Dict[str, Any]] = None,
                  ray_actor_options: Optional[Dict[str, Any]] = None, loras: Sequence[Tuple[str, str, float]] = (),
                  device: str = "cpu", torch_threads: Optional[int] = None):
    """A bound Ray Serve application of the velodiff API.

    Args:
        config: the server's limits (every replica the same).
        num_replicas: fixed replica count (ignored with ``autoscaling_config``, e.g. ``{"min_replicas": 1,
            "max_replicas": 4, "target_ongoing_requests": 8}``).
        ray_actor_options: per replica (default ``{"num_cpus": 1}``; on GPUs e.g. ``{"num_gpus": 1}``).
        loras: ``(path, name, strength)`` loaded on every replica.
        device: where each replica runs ("cuda": its Ray-assigned GPU).
        torch_threads: CPU threads per replica (default: its ``num_cpus``).
    """
    from ray import serve

    from velodiff.serve.app import create_app

    options = dict(ray_actor_options or {"num_cpus": 1})
    threads = torch_threads or max(1, int(options.get("num_cpus", 1)))
    app = create_app(replica_engine)
    scaling = {"autoscaling_config": autoscaling_config} if autoscaling_config else {"num_replicas": num_replicas}

    @serve.deployment(name="velodiff", ray_actor_options=options,
                      max_ongoing_requests=config.max_queue + config.max_batch, **scaling)
    @serve.ingress(app)
    class VelodiffReplica:
        def __init__(self):
            import torch

            from velodiff.serve.engine import Engine
            from velodiff.serve.server import load_pipeline
            from velodiff.serve import ray as module  # the real module (this class arrives pickled by value)
            torch.set_num_threads(threads)
            module._ENGINE = Engine(load_pipeline(config, loras, device=device), config)

        def __del__(self):
            from velodiff.serve import ray as module
            if module._ENGINE is not None:
                module._ENGINE.stop(drain=True, timeout=60)

    return VelodiffReplica.bind()


def _default_app():
    return build_ray_app(ServeConfig(model=os.environ.get("VELODIFF_SERVE_MODEL", "digits")))


def __getattr__(name):  # ``serve run velodiff.serve.ray:app`` builds the app on first access only
    if name == "app":
        return _default_app()
    raise AttributeError(name)
