"""CFG parallelism over torch.distributed (``velodiff.serve.distributed.cfg_parallel``) on two gloo CPU processes.

One pair of processes (1 CPU thread each) runs every distributed scenario and saves what it saw; the tests below
read it. Each rank: the images of digits (text-to-image, two prompts, dpmpp_2m and euler_a) and digits-dit
(class-conditional) under cfg_parallel are bit-identical to the same process's single-process split-CFG run (and
to the other rank's), close to the batched run; the denoiser ran once per evaluation on B rows with this rank's
conditioning and branch mark; unguided calls run whole on both ranks; the pipeline is restored after the block;
bad groups, nesting and ranks making different calls raise. The argument checks that need no process group run
in this process.
"""
import datetime
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import velodiff as vd
from velodiff.accel.cache import TGate
from velodiff.pipelines import Pipeline
from velodiff.serve.distributed import apply_cfg_parallel, cfg_parallel, check_group

STEPS = 6
PROMPTS = ["a 3", "a 7"]
LABELS = [3, 7]
TIMEOUT_S = 120  # the whole two-process run takes ~10 s; a deadlock fails instead of hanging the suite


def _sd(pipe, sampler="dpmpp_2m", **kw):
    gens = [torch.Generator().manual_seed(i) for i in range(len(PROMPTS))]
    return pipe(PROMPTS, num_inference_steps=STEPS, sampler=sampler, generator=gens, output_type="pt", **kw)


def _dit(pipe, steps=STEPS, **kw):
    return pipe(LABELS, num_inference_steps=steps, generator=torch.Generator().manual_seed(0), output_type="pt",
                **kw)


def _recorder(pipe, module):
    """A list of (rows, branch, conditioning) per forward of ``module`` (the UNet's encoder_hidden_states, the
    DiT's class labels: the third positional argument) and the hook handle."""
    calls = []

    def hook(mod, args, kwargs):
        ctx = pipe.denoise_context
        calls.append((int(args[0].shape[0]), None if ctx is None else ctx.cfg_branch, args[2].detach().clone()))
    return calls, module.register_forward_pre_hook(hook, with_kwargs=True)


def _error(fn):
    """(exception class name, message) of what ``fn()`` raises, or None."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001 - recorded for the parent's assertions
        return type(e).__name__, str(e)
    return None


def _worker(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    res = {}
    sd = Pipeline.from_pretrained("digits")
    dit = Pipeline.from_pretrained("digits-dit")
    for pipe in (sd, dit):
        pipe.set_progress_bar_config(disable=True)

    # --- digits (text-to-image): references in this process, then the two ranks together ---------------------
    for sampler in ("dpmpp_2m", "euler_a"):
        sd.cfg_mode = "split"
        res[f"sd_{sampler}_split"] = _sd(sd, sampler).images
        sd.cfg_mode = "batched"
        res[f"sd_{sampler}_batched"] = _sd(sd, sampler).images
        calls, handle = _recorder(sd, sd.unet)
        with cfg_parallel(sd) as same:
            res["yielded_pipe"] = same is sd
            res["mode_inside"] = sd.cfg_mode
            out = _sd(sd, sampler)
        handle.remove()
        res[f"sd_{sampler}_parallel"], res[f"sd_{sampler}_nfe"] = out.images, out.num_model_evaluations
        res[f"sd_{sampler}_calls"] = calls
    res["sd_restored"] = (sd.cfg_mode, "split_cfg_calls" in vars(sd))
    emb, neg = sd.encode_prompt(PROMPTS, None, 1, True)
    res["sd_emb"], res["sd_neg"] = emb, neg

    # --- unguided: both ranks run the whole call -------------------------------------------------------------------
    res["sd_unguided_ref"] = _sd(sd, guidance_scale=1.0).images
    calls, handle = _recorder(sd, sd.unet)
    with cfg_parallel(sd):
        res["sd_unguided_parallel"] = _sd(sd, guidance_scale=1.0).images
    handle.remove()
    res["sd_unguided_calls"] = calls

    # --- digits-dit (class-conditional, learned sigma) -------------------------------------------------------------
    dit.cfg_mode = "split"
    res["dit_split"] = _dit(dit, guidance_scale=4.0).images
    dit.cfg_mode = "batched"
    res["dit_batched"] = _dit(dit, guidance_scale=4.0).images
    undo = apply_cfg_parallel(dit)  # the apply / undo pair
    calls, handle = _recorder(dit, dit.transformer)
    try:
        out = _dit(dit, guidance_scale=4.0)
    finally:
        handle.remove()
        undo()
        undo()  # idempotent
    res["dit_parallel"], res["dit_nfe"], res["dit_calls"] = out.images, out.num_model_evaluations, calls
    res["dit_null"] = dit.transformer.config.num_embeds_ada_norm
    res["dit_restored"] = (dit.cfg_mode, "split_cfg_calls" in vars(dit))

    # --- errors ----------------------------------------------------------------------------------------------------
    solo = dist.new_group([0])  # every rank must call new_group; rank 1 gets the non-member placeholder
    res["err_group_of_one"] = _error(lambda: apply_cfg_parallel(sd, group=solo))
    res["err_group_type"] = _error(lambda: apply_cfg_parallel(sd, group=5))

    def nested():
        with cfg_parallel(sd):
            with cfg_parallel(sd):
                pass
    res["err_nested"] = _error(nested)
    res["after_errors"] = (sd.cfg_mode, "split_cfg_calls" in vars(sd))

    def mismatched():  # the ranks make different calls: both must raise at the first exchange, neither hang
        with cfg_parallel(dit):
            _dit(dit, steps=STEPS if rank == 0 else STEPS - 2, guidance_scale=4.0)
    res["err_mismatch"] = _error(mismatched)
    vd.optimize(sd, TGate(gate_step=2))
    try:
        res["err_tgate_applied"] = _error(lambda: apply_cfg_parallel(sd))
    finally:
        vd.restore(sd)

    def tgate_inside():  # applied after entering: refused at the first guided evaluation, before any exchange
        with cfg_parallel(sd):
            vd.optimize(sd, TGate(gate_step=2))
            try:
                _sd(sd)
            finally:
                vd.restore(sd)
    res["err_tgate_inside"] = _error(tgate_inside)

    dist.barrier()
    dist.destroy_process_group()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """The two ranks' recorded results, [rank 0's dict, rank 1's dict], and the run's wall time."""
    folder = tmp_path_factory.mktemp("cfg_parallel")
    init_file = str(folder / "init")
    start = time.perf_counter()
    context = mp.start_processes(_worker, args=(init_file, str(folder)), nprocs=2, join=False,
                                 start_method="spawn")
    try:
        while not context.join(timeout=1):
            if time.perf_counter() - start > TIMEOUT_S:
                pytest.fail(f"the two cfg_parallel processes did not finish in {TIMEOUT_S} s (a deadlock?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
                process.join(5)
    return [torch.load(folder / f"rank{r}.pt", weights_only=False) for r in range(2)], time.perf_counter() - start


def test_images_are_bit_identical_to_a_split_cfg_single_process(ranks):
    results, _ = ranks
    for res in results:
        for key in ("sd_dpmpp_2m", "sd_euler_a", "dit"):
            par, split = res[f"{key}_parallel"], res[f"{key}_split"]
            assert par.shape == split.shape and par.dtype == torch.float32
            assert torch.equal(par, split), (key, float((par - split).abs().max()))
            # the batched single process differs by float rounding only (the GEMMs see 2B rows instead of B)
            assert float((par - res[f"{key}_batched"]).abs().max()) < 1e-5, key
    for key in ("sd_dpmpp_2m_parallel", "sd_euler_a_parallel", "dit_parallel", "sd_dpmpp_2m_split"):
        assert torch.equal(results[0][key], results[1][key]), key  # both ranks have the same images
    assert not torch.equal(results[0]["sd_dpmpp_2m_parallel"], results[0]["sd_euler_a_parallel"])


def test_each_rank_runs_the_denoiser_on_its_half_only(ranks):
    results, _ = ranks
    for rank, res in enumerate(results):
        branch = ("cond", "uncond")[rank]
        for sampler in ("dpmpp_2m", "euler_a"):
            calls = res[f"sd_{sampler}_calls"]
            assert len(calls) == res[f"sd_{sampler}_nfe"] == STEPS  # one UNet call per evaluation, not two
            expected = res["sd_emb"] if rank == 0 else res["sd_neg"]
            for rows, mark, hidden in calls:
                assert rows == len(PROMPTS) and mark == branch  # B rows, never 2B
                assert torch.equal(hidden, expected)  # the prompt on rank 0, the negative prompt on rank 1
        assert not torch.equal(res["sd_emb"], res["sd_neg"])
        labels = LABELS if rank == 0 else [res["dit_null"]] * len(LABELS)
        assert len(res["dit_calls"]) == res["dit_nfe"] == STEPS
        for rows, mark, got in res["dit_calls"]:
            assert rows == len(LABELS) and mark == branch and got.tolist() == labels


def test_unguided_calls_run_whole_on_both_ranks(ranks):
    results, _ = ranks
    for res in results:
        assert torch.equal(res["sd_unguided_parallel"], res["sd_unguided_ref"])
        calls = res["sd_unguided_calls"]
        assert len(calls) == STEPS and all(rows == len(PROMPTS) and mark is None for rows, mark, _ in calls)
        assert all(torch.equal(hidden, res["sd_emb"]) for _, _, hidden in calls)


def test_the_pipeline_is_restored(ranks):
    results, _ = ranks
    for res in results:
        assert res["yielded_pipe"] and res["mode_inside"] == "split"
        for key in ("sd_restored", "dit_restored", "after_errors"):
            assert res[key] == ("batched", False), key


def test_bad_groups_and_calls_raise(ranks):
    results, _ = ranks
    kind, message = results[0]["err_group_of_one"]
    assert kind == "ValueError" and "group has 1 ranks" in message and "exactly 2" in message
    kind, message = results[1]["err_group_of_one"]
    assert kind == "ValueError" and "not a member" in message
    for res in results:
        kind, message = res["err_group_type"]
        assert kind == "TypeError" and "group must be" in message
        kind, message = res["err_nested"]
        assert kind == "RuntimeError" and "already on" in message
        kind, message = res["err_mismatch"]
        assert kind == "RuntimeError" and "same denoising call" in message
        for key in ("err_tgate_applied", "err_tgate_inside"):
            kind, message = res[key]
            assert kind == "ValueError" and "tgate" in message and "velodiff.restore" in message, key


def test_run_time(ranks):
    _, seconds = ranks
    assert seconds < TIMEOUT_S


def test_needs_an_initialised_process_group():
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        check_group()
    pipe = Pipeline.from_pretrained("digits")
    with pytest.raises(RuntimeError, match="init_process_group"):
        with cfg_parallel(pipe):
            pass
    assert pipe.cfg_mode == "batched" and "split_cfg_calls" not in vars(pipe)


def test_needs_a_velodiff_pipeline():
    with pytest.raises(TypeError, match="pipe must be a velodiff pipeline"):
        apply_cfg_parallel(object())
