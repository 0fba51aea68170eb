"""Real-time image-to-image on streams of frames: StreamDiffusion's stream batch, residual CFG, stochastic
similarity filter and I/O queues (:class:`StreamPipeline`, :class:`StreamWorker`)."""
from velodiff.stream.pipeline import StreamOutput, StreamPipeline
from velodiff.stream.schedule import CFG_TYPES
from velodiff.stream.similarity import SimilarityFilter, skip_probability
from velodiff.stream.worker import StreamWorker

__all__ = ["CFG_TYPES", "SimilarityFilter", "StreamOutput", "StreamPipeline", "StreamWorker", "skip_probability"]
