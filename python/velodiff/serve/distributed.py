"""Classifier-free-guidance parallelism over ``torch.distributed``: two processes (two GPUs, or two CPU
processes) generate one image together, each computing one CFG branch of every guided denoiser evaluation.

Under classifier-free guidance every evaluation of the denoiser is really two: the conditional prediction and the
unconditional one, combined by the sampler as ``uncond + w * (cond - uncond)``. :func:`cfg_parallel` runs the two
on two ranks of a process group: rank 0 computes the conditional half, rank 1 the unconditional half, and one
``all_gather`` into a preallocated ``[2B, ...]`` buffer (rank r's output at rows ``[rB, (r+1)B)``) gives both
ranks both halves, so that both carry on with the same sampling loop (sampler update, noise, history) in
lockstep. Per rank, each evaluation costs one denoiser call on ``B`` rows instead of one on ``2B`` rows (batched
CFG) or two on ``B`` rows (split CFG), plus the exchange of one output (``B x C x h x w`` elements).

Usage (launch two processes, e.g. ``torchrun --nproc_per_node=2 script.py``; every rank runs the same script)::

    import torch, torch.distributed as dist
    from velodiff.pipelines import Pipeline
    from velodiff.serve.distributed import cfg_parallel

    dist.init_process_group("nccl")          # "gloo" on CPU; torchrun sets RANK / WORLD_SIZE / MASTER_ADDR
    rank = dist.get_rank()
    torch.cuda.set_device(rank)
    pipe = Pipeline.from_pretrained("...", device=f"cuda:{rank}")
    with cfg_parallel(pipe):                 # every rank: the same call, arguments and seed
        image = pipe("a photo of a cat", generator=torch.Generator().manual_seed(0)).images[0]
    if rank == 0:
        image.save("cat.png")

What it guarantees. Both ranks run the same pipeline call with the same arguments and seed, so every tensor the
sampler sees is the same on both ranks, and each rank's denoiser call has exactly the batch shape of one call of
split CFG (``pipe.cfg_mode = "split"``, :class:`velodiff.accel.SplitCFG`). The images are therefore
**bit-identical** to one process running the same call with ``cfg_mode="split"`` (same device kind, same
kernels, same thread count: CPU reductions may split differently with another ``torch.set_num_threads``). They
match the batched (default, non-split) single process only up to float rounding: there the denoiser's GEMMs see a
batch of ``2B`` rows instead of ``B``, which changes the kernels' summation order (about 1e-6 on the digits
models' [0, 1] images after a few steps). Without guidance (``guidance_scale <= 1``, or an LCM-distilled model)
there is nothing to split: both ranks run the call normally, each computing the whole (same) image.

Branch marking. The rank's denoiser call runs inside ``DenoiseContext.branch("cond")`` (rank 0) or
``branch("uncond")`` (rank 1), as :meth:`velodiff.pipelines.base.BasePipeline.split_cfg_calls` marks it, so the
caches that keep per-branch state (DeepCache, Faster Diffusion, FBCache, TeaCache, DBCache, TaylorSeer) behave on
each rank exactly as on that branch of a split-CFG single process. T-GATE is refused: after its gate it answers
the unconditional call with the conditional call's output, and each rank only has its own branch.

Rules. Both ranks must make the same calls (same pipeline, arguments, seed, techniques); a rank that errors or
makes a different call leaves the other waiting in the collective until the group's timeout
(``init_process_group(timeout=...)``). At the first exchange of every denoising loop the ranks swap a small
description of their output (shape, dtype, call index and count) and both raise a RuntimeError if they differ,
instead of exchanging mismatched tensors. The gathered half returned to the sampler is a view of the buffer,
overwritten at the next evaluation; the sampling loop consumes it at once. Only denoisers that go through
``split_cfg_calls`` (every velodiff text-to-image, image-to-image and DiT / PixArt pipeline) are split.

Going further (documentation only; none of this is implemented here). CFG parallelism stops at 2 devices and
does nothing for unguided or guidance-distilled models. Beyond it:

* Sequence (context) parallelism for DiTs: the image tokens are split across devices and attention exchanges
  keys/values (Ulysses all-to-all over heads, or Ring attention passing K/V blocks around a ring). diffusers has it
  as "context parallelism" (``ContextParallelConfig(ulysses_degree=..., ring_degree=...)`` enabled on the
  transformer), and xDiT (xfuser) combines Ulysses, Ring, CFG and PipeFusion parallel degrees for PixArt, SD3,
  Flux, HunyuanDiT and others. Exact up to rounding; scales with the token count, so it pays off at high
  resolution.
* PipeFusion (xDiT, Fang et al. 2024): the transformer's layers are split into pipeline stages on devices and the
  image into patches; a stage uses the other patches' activations from the previous diffusion step (stale but
  close, as consecutive steps differ little), which hides communication at a small approximation.
* DistriFusion (Li et al., CVPR 2024): patch parallelism for UNets / DiTs, each device denoising one patch and
  reusing the previous step's activations of the other patches for attention and group norm (displaced patch
  parallelism), the exchange overlapped with compute. Approximate, after a few synchronous warm-up steps.
These compose with CFG parallelism (xDiT's ``cfg_degree=2`` is this module's scheme): 2 x N devices run N-way
sequence or patch parallelism per branch.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Dict, Iterator, Tuple

import torch

#: the CFG branch that group rank ``r`` computes
BRANCH_OF_RANK: Tuple[str, str] = ("cond", "uncond")

#: techniques (``velodiff.optimize`` names) that cannot run under :func:`cfg_parallel`, and why
UNSUPPORTED_TECHNIQUES: Dict[str, str] = {
    "tgate": "T-GATE answers the unconditional call with the conditional call's output after its gate step, and "
             "under cfg_parallel each rank only computes its own branch",
}

_DTYPE_CODES = {dtype: i for i, dtype in enumerate((torch.float32, torch.float16, torch.bfloat16, torch.float64))}
_MAX_DIMS = 8


def _dist():
    import torch.distributed as dist
    return dist


def check_group(group=None) -> Tuple[Any, int]:
    """(process group, this process's rank in it) for ``group`` (None: the default group), checked: torch.distributed
    available and initialised, this process a member, exactly 2 ranks. RuntimeError / TypeError / ValueError naming
    what to do."""
    if not torch.distributed.is_available():
        raise RuntimeError("cfg_parallel needs torch.distributed, which this PyTorch build lacks; install a build "
                           "with distributed support (the PyPI wheels have it)")
    dist = _dist()
    if not dist.is_initialized():
        raise RuntimeError("cfg_parallel needs an initialised torch.distributed process group of 2 ranks: call "
                           "torch.distributed.init_process_group('nccl') (GPUs; 'gloo' on CPU) in every process "
                           "first, e.g. under `torchrun --nproc_per_node=2 script.py`")
    if group is not None and group != dist.GroupMember.NON_GROUP_MEMBER and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup (from torch.distributed.new_group) or None "
                        f"for the default group, got {type(group).__name__} {group!r}")
    if group == dist.GroupMember.NON_GROUP_MEMBER:
        raise ValueError("group: this process is not a member of the group given (torch.distributed.new_group "
                         "returns a placeholder on ranks outside its `ranks`); call cfg_parallel only on the group's "
                         "two ranks")
    pg = dist.group.WORLD if group is None else group
    size, rank = dist.get_world_size(pg), dist.get_rank(pg)
    if rank < 0:
        raise ValueError("group: this process is not a member of the group given; call cfg_parallel only on the "
                         "group's two ranks")
    if size != 2:
        what = "the default process group" if group is None else "group"
        raise ValueError(f"{what} has {size} ranks; cfg_parallel needs exactly 2 (rank 0 computes the conditional "
                         f"half, rank 1 the unconditional one): launch 2 processes, or pass "
                         f"group=torch.distributed.new_group([a, b]) with two ranks")
    return pg, rank


def _check_pipe(pipe) -> None:
    if not hasattr(pipe, "cfg_mode") or not callable(getattr(pipe, "split_cfg_calls", None)) \
            or not hasattr(pipe, "denoise_context"):
        raise TypeError(f"pipe must be a velodiff pipeline (with cfg_mode and split_cfg_calls), got "
                        f"{type(pipe).__name__}")
    current = pipe.__dict__.get("split_cfg_calls")
    if getattr(current, "_cfg_parallel", False):
        raise RuntimeError("pipe: cfg_parallel is already on for this pipeline; leave the first cfg_parallel "
                           "block (or call its undo) before starting another")
    _check_techniques(pipe)


def _check_techniques(pipe) -> None:
    for config in getattr(pipe, "_applied", ()):
        name = getattr(config, "name", "") or type(config).__name__
        if name in UNSUPPORTED_TECHNIQUES:
            raise ValueError(f"pipe: cfg_parallel cannot run with the technique {name!r} applied "
                             f"({UNSUPPORTED_TECHNIQUES[name]}); velodiff.restore(pipe) removes it")


def _describe(out: torch.Tensor, context) -> torch.Tensor:
    """[4 + _MAX_DIMS] int64: dtype code, call index, number of calls, ndim, shape (padded with -1)."""
    shape = list(out.shape) + [-1] * (_MAX_DIMS - out.dim())
    call_index = context.call_index if context is not None else -1
    num_calls = context.num_calls if context is not None else -1
    return torch.tensor([_DTYPE_CODES.get(out.dtype, 99), call_index, num_calls, out.dim()] + shape,
                        dtype=torch.int64, device=out.device)


def apply_cfg_parallel(pipe, group=None) -> Callable[[], None]:
    """Turn on CFG parallelism for ``pipe`` on a 2-rank process group; returns the undo (idempotent), which puts
    back the pipeline's previous ``cfg_mode`` and ``split_cfg_calls``. Prefer :func:`cfg_parallel` (a ``with``
    block that always undoes).

    Args:
        pipe: a velodiff pipeline (``velodiff.pipelines.Pipeline.from_pretrained``), the same on both ranks, on
            this rank's device (``cuda:<local rank>`` for NCCL).
        group: a ``torch.distributed`` process group of exactly 2 ranks (None: the default group, which must then
            have 2 ranks). Group rank 0 computes the conditional branch, rank 1 the unconditional one.

    While on, ``pipe.cfg_mode`` is ``"split"`` (so :class:`velodiff.pipelines.context.DenoiseContext.cfg` reads
    "split", as in a split-CFG single process) and ``pipe.split_cfg_calls(call, cond_args, uncond_args)`` computes
    ``out = call(<this rank's args>)`` (a tensor [B, C, h, w] in the denoiser's dtype: fp32 / fp16 / bf16) inside
    the context's branch mark, gathers both ranks' ``out`` into a preallocated [2B, C, h, w] buffer of that dtype
    on ``out``'s device with one collective (``all_gather_into_tensor`` on NCCL, ``all_gather`` into the buffer's
    two halves on gloo), and returns (cond, uncond), each [B, C, h, w]: this rank's own ``out`` and a view of the
    other rank's rows in the buffer. Once per denoising loop, before its first exchange, the ranks also swap a
    12-integer description of the call (see the module's "Rules").

    Errors: TypeError when ``pipe`` is not a velodiff pipeline or ``group`` not a process group; ValueError when
    the group does not have exactly 2 ranks, this process is not in it, or an unsupported technique (T-GATE) is
    applied; RuntimeError when torch.distributed is not initialised or cfg_parallel is already on."""
    _check_pipe(pipe)
    pg, rank = check_group(group)
    dist = _dist()
    backend = str(dist.get_backend(pg))
    device = getattr(pipe, "device", None)
    if backend == "nccl" and device is not None and torch.device(device).type != "cuda":
        raise ValueError(f"pipe is on {device} but the group's backend is NCCL, which exchanges CUDA tensors only: "
                         f"move the pipeline to cuda:<local rank>, or use a gloo group for CPU")
    mine = BRANCH_OF_RANK[rank]
    token = object()  # owner of the per-call state in the denoising context (the handshake flag)
    buffers: Dict[str, Any] = {"key": None, "gathered": None}

    if backend == "nccl":  # one flat collective into the buffer (all_gather_into_tensor, renamed in torch 2.13)
        single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

        def gather(buffer: torch.Tensor, tensor: torch.Tensor) -> None:
            single(buffer, tensor, group=pg)
    else:  # gloo (torch >= 2.4): the list form, into the buffer's two halves (views, no copy out)
        def gather(buffer: torch.Tensor, tensor: torch.Tensor) -> None:
            dist.all_gather(list(buffer.chunk(2)), tensor, group=pg)

    def exchange(out: torch.Tensor, context) -> torch.Tensor:
        """[2B, ...]: group rank r's ``out`` ([B, ...]) at rows [rB, (r+1)B) of a preallocated buffer, reused
        while the shape, dtype and device hold."""
        out = out.contiguous()
        shared = context.state_for(token, per_branch=False) if context is not None else {}
        if not shared.get("checked"):
            desc = _describe(out, context)
            both = torch.empty((2 * desc.shape[0],), dtype=desc.dtype, device=desc.device)
            gather(both, desc)
            ours, theirs = both.chunk(2)[rank], both.chunk(2)[1 - rank]
            if not torch.equal(ours, theirs):
                raise RuntimeError(
                    f"cfg_parallel: the two ranks are not running the same denoising call (this rank {rank}: "
                    f"{ours.tolist()}, the other: {theirs.tolist()}, as [dtype code, call index, calls, ndim, "
                    f"shape...]); both ranks must call the pipeline with the same arguments and seed")
            shared["checked"] = True
        key = (tuple(out.shape), out.dtype, out.device)
        if buffers["key"] != key:
            buffers["gathered"] = torch.empty((2 * out.shape[0],) + key[0][1:], dtype=out.dtype, device=out.device)
            buffers["key"] = key
        gathered = buffers["gathered"]
        gather(gathered, out)
        return gathered

    def split_cfg_calls(call, cond_args, uncond_args):
        """(cond, uncond), each [B, ...]: this rank computes ``call`` on its branch's args, the other half comes
        from the other rank."""
        _check_techniques(pipe)  # a technique applied inside the block
        context = pipe.denoise_context
        args = cond_args if mine == "cond" else uncond_args
        with (context.branch(mine) if context is not None else contextlib.nullcontext()):
            out = call(args)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"cfg_parallel: the denoiser returned {type(out).__name__}, expected a tensor")
        other = exchange(out, context).chunk(2)[1 - rank]
        return (out, other) if mine == "cond" else (other, out)

    split_cfg_calls._cfg_parallel = True
    had_own = "split_cfg_calls" in pipe.__dict__
    previous_calls = pipe.__dict__.get("split_cfg_calls")
    previous_mode = pipe.cfg_mode
    pipe.split_cfg_calls = split_cfg_calls
    pipe.cfg_mode = "split"
    done = []

    def undo() -> None:
        if done:
            return
        done.append(True)
        pipe.cfg_mode = previous_mode
        if had_own:
            pipe.split_cfg_calls = previous_calls
        else:
            pipe.__dict__.pop("split_cfg_calls", None)
        buffers.clear()
    return undo


@contextlib.contextmanager
def cfg_parallel(pipe, group=None) -> Iterator[Any]:
    """``with cfg_parallel(pipe, group):`` run ``pipe``'s guided calls with CFG parallelism on a 2-rank process group
    (see :func:`apply_cfg_parallel` for the arguments, shapes and errors); yields ``pipe`` and restores its previous
    state on exit, however the block ends. Every rank must enter the block and make the same calls."""
    undo = apply_cfg_parallel(pipe, group)
    try:
        yield pipe
    finally:
        undo()


__all__ = ["cfg_parallel", "apply_cfg_parallel", "check_group", "BRANCH_OF_RANK", "UNSUPPORTED_TECHNIQUES"]
