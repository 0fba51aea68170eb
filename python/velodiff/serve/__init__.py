"""Serving: an HTTP server with dynamic batching (``velodiff serve``), the same engine as a Ray Serve application,
and classifier-free-guidance parallelism over torch.distributed."""
