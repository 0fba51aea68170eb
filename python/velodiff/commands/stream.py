"""``velodiff stream``: a folder of frames through StreamDiffusion (:class:`velodiff.stream.StreamPipeline`) as a
stream, one output PNG per input frame (same name, ``.png``), and the frames per second.

Output frame j is the result of input frame j (the stream's lag of n - 1 frames is undone here: the frames still in
flight at the end are flushed); a frame the similarity filter skips repeats the previous output frame.
"""
from __future__ import annotations

import argparse
import os
import time

from velodiff.commands import args as A
from velodiff.commands.errors import UsageError, step

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def t_index_list(text: str) -> list:
    """argparse type: comma-separated integers >= 0, e.g. ``32,45``."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be comma-separated step indices such as 32,45, got {text!r}") \
            from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"must be step indices >= 0, got {text!r}")
    return values


def add_parser(sub) -> None:
    p = sub.add_parser("stream", help="run a folder of frames through StreamDiffusion image-to-image",
                       description="Process a folder of frames as a stream (StreamDiffusion: stream batch, residual "
                                   "CFG, similarity filter); writes one PNG per input frame to --outdir and prints "
                                   "the frames per second.", epilog=A.epilog())
    A.add_model(p)
    p.add_argument("--input", metavar="DIR", required=True,
                   help=f"the folder of frames ({', '.join(FRAME_EXTENSIONS)}), processed in name order; all of "
                        "one size")
    p.add_argument("--outdir", metavar="DIR", required=True, help="the folder to write (created if needed)")
    p.add_argument("--prompt", metavar="TEXT", default="", help="the text prompt (default: empty)")
    p.add_argument("--negative-prompt", metavar="TEXT", default=None,
                   help="what to steer away from (--cfg-type full / initialize)")
    p.add_argument("--t-index", metavar="I,J", type=t_index_list, default=[32, 45],
                   help="the denoising steps: indices into the --steps-point LCM schedule, strictly increasing "
                        "(default: 32,45, i.e. t = 359, 99)")
    p.add_argument("--steps", metavar="N", type=A.positive_int, default=50,
                   help="points of the schedule --t-index indexes (default: %(default)s)")
    p.add_argument("--cfg-type", choices=["none", "full", "self", "initialize"], default="self",
                   help="guidance: none, full (true negative prompt, twice the batch), self (residual CFG, "
                        "self-negative) or initialize (residual CFG, one-time negative) (default: %(default)s)")
    p.add_argument("--guidance", metavar="G", type=A.nonnegative_float, default=1.2,
                   help="guidance scale gamma (default: %(default)s)")
    p.add_argument("--delta", metavar="D", type=A.nonnegative_float, default=1.0,
                   help="residual CFG's scale of the virtual negative (default: %(default)s)")
    p.add_argument("--similarity", metavar="ETA", type=float, default=None,
                   help="skip frames similar to the last processed one (stochastic similarity filter), threshold "
                        "in [0, 1], e.g. 0.98 (default: off)")
    p.add_argument("--max-skip-frame", metavar="N", type=A.nonnegative_int, default=10,
                   help="the longest run of skipped frames (default: %(default)s)")
    p.add_argument("--no-batch", action="store_true",
                   help="run each frame's steps one after another instead of in the stream batch")
    p.add_argument("--tiny-vae", metavar="DIR", default=None,
                   help="an AutoencoderTiny (TAESD) folder to encode and decode with")
    p.add_argument("--seed", metavar="S", type=A.nonnegative_int, default=2,
                   help="seed of the stream's fixed noise (default: %(default)s)")
    A.add_device_dtype(p)
    A.add_lora(p)
    p.set_defaults(func=run)


def list_frames(folder: str) -> list:
    """The frame files of ``folder`` in name order, all of one size (checked from their headers)."""
    if not os.path.isdir(folder):
        raise UsageError(f"--input {folder!r} is not a folder; name a folder of frames")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(FRAME_EXTENSIONS)
                   and os.path.isfile(os.path.join(folder, n)))
    if not names:
        raise UsageError(f"--input {folder!r} has no frames ({', '.join(FRAME_EXTENSIONS)} files)")
    from PIL import Image, UnidentifiedImageError
    size = None
    for name in names:
        try:
            with Image.open(os.path.join(folder, name)) as im:
                this = im.size
        except (OSError, UnidentifiedImageError) as e:
            raise UsageError(f"--input {folder!r}: {name} is not a readable image ({e})") from None
        if size is None:
            size, first = this, name
        elif this != size:
            raise UsageError(f"--input {folder!r}: frame {name} is {this[0]}x{this[1]} but {first} is "
                             f"{size[0]}x{size[1]}; all frames of a stream must have one size")
    return names


def _check_args(args) -> None:
    if args.similarity is not None and not 0 <= args.similarity <= 1:
        raise UsageError(f"--similarity {args.similarity}: must be a threshold in [0, 1] (e.g. 0.98)")
    if args.steps > 1000:
        raise UsageError(f"--steps {args.steps}: must be at most 1000 (the training schedule's timesteps)")
    indices = args.t_index
    outside = [i for i in indices if i >= args.steps]
    if outside:
        raise UsageError(f"--t-index {','.join(map(str, indices))}: {outside} outside the schedule of --steps "
                         f"{args.steps} (indices 0 .. {args.steps - 1})")
    if any(b <= a for a, b in zip(indices, indices[1:])):
        raise UsageError(f"--t-index {','.join(map(str, indices))}: must be strictly increasing (noisiest first)")
    if args.tiny_vae is not None and not os.path.isdir(args.tiny_vae):
        raise UsageError(f"--tiny-vae {args.tiny_vae!r} is not a folder; name an AutoencoderTiny folder")


class AlignedWriter:
    """Writes output j as the result of input j: results arrive late (the stream's lag) and skipped inputs repeat
    the output before them."""

    def __init__(self, outdir: str, names: list):
        self.outdir, self.names = outdir, names
        self.skipped = [None] * len(names)   # per input: True / False once its output arrived
        self.results = {}                    # input index -> its result image, until written
        self.next = 0
        self.previous = None

    def add(self, position: int, output) -> None:
        """The stream's output for input ``position`` (a :class:`velodiff.stream.StreamOutput`)."""
        self.skipped[position] = output.skipped
        if not output.skipped:
            self.results[output.index] = output.image
        self.write_ready()

    def add_result(self, output) -> None:
        self.results[output.index] = output.image
        self.write_ready()

    def write_ready(self) -> None:
        while self.next < len(self.names):
            j = self.next
            if self.skipped[j] is None:
                return
            if self.skipped[j]:
                image = self.previous
            elif j in self.results:
                image = self.results.pop(j)
            else:
                return
            base = os.path.splitext(self.names[j])[0]
            image.save(os.path.join(self.outdir, base + ".png"))
            self.previous = image
            self.next += 1


def run(args: argparse.Namespace) -> int:
    A.check_model_path(args.model)
    _check_args(args)
    names = list_frames(args.input)
    A.check_outdir(args.outdir)
    loras = A.parse_loras(args.lora, args.model)

    import torch
    from PIL import Image

    from velodiff.pipelines import Pipeline
    from velodiff.stream import StreamPipeline, StreamWorker

    device = A.check_device(args.device)
    dtype = getattr(torch, A.DTYPES[args.dtype])
    with step(f"--model {args.model}"):
        pipe = Pipeline.from_pretrained(args.model, dtype=dtype, device=device)
    pipe.set_progress_bar_config(disable=True)
    A.load_loras(pipe, args.lora, loras)
    vae = None
    if args.tiny_vae is not None:
        from velodiff.loading.modules import load_diffusers_model
        with step(f"--tiny-vae {args.tiny_vae}"):
            vae = load_diffusers_model(args.tiny_vae, "AutoencoderTiny", dtype, device)
    with step(f"--model {args.model}"):
        stream = StreamPipeline(pipe, args.t_index, prompt=args.prompt, negative_prompt=args.negative_prompt,
                                num_inference_steps=args.steps, guidance_scale=args.guidance, delta=args.delta,
                                cfg_type=args.cfg_type, seed=args.seed, use_denoising_batch=not args.no_batch,
                                similarity_threshold=args.similarity, max_skip_frame=args.max_skip_frame, vae=vae)
    os.makedirs(args.outdir, exist_ok=True)
    writer = AlignedWriter(args.outdir, names)
    received = 0

    def record(out) -> None:
        nonlocal received
        if received < len(names):
            writer.add(received, out)
        else:  # the frames still in flight at the end, flushed
            writer.add_result(out)
        received += 1

    start = time.perf_counter()
    worker = StreamWorker(stream, max_queue=4)
    try:
        with step(f"--input {args.input}"):
            for name in names:
                with Image.open(os.path.join(args.input, name)) as im:
                    worker.put(im.convert("RGB"))
                for out in worker.ready():
                    record(out)
            worker.stop(drain=True)
            while (out := worker.get()) is not None:
                record(out)
    finally:
        worker.stop()
    seconds = time.perf_counter() - start
    skipped = stream.filter.skipped if stream.filter is not None else 0
    batch = "no stream batch" if args.no_batch else f"stream batch of {stream.batch_size}"
    print(f"wrote {writer.next} frames to {args.outdir}: {len(names)} frames in {seconds:.2f} s, "
          f"{len(names) / seconds:.1f} fps ({stream.slots} denoising steps per frame, {batch}, "
          f"{stream.model_calls} model calls, {skipped} frames skipped by the similarity filter)")
    return 0

