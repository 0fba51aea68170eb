"""A whole denoising loop makes no host sync: it can be captured in one CUDA graph and replayed."""
import pytest
import torch

from velodiff.sampling import NoiseSchedule, build_plan, run_plan


def model(x, t):
    # t is a Python float baked into the capture, as a real pipeline's per-step timestep embedding would be.
    return (torch.tanh(x) * (t / 1000.0) + 0.1 * x).half()


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "heun"])
def test_loop_captures_in_a_cuda_graph(name):
    plan = build_plan(name, NoiseSchedule.sd(), 12)
    x_static = torch.randn(2, 4, 32, 32, device="cuda") * plan.init_noise_scale
    cfg = lambda x, t: (model(x, t), model(0.5 * x, t))  # noqa: E731
    table = plan.coefficient_table(7.5, 1.0, device="cuda")
    eager = run_plan(plan, cfg, x_static.clone(), guidance_scale=7.5, table=table)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the capture
        run_plan(plan, cfg, x_static.clone(), guidance_scale=7.5, table=table)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_static = run_plan(plan, cfg, x_static, guidance_scale=7.5, table=table)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out_static, eager)
    x_static.copy_(torch.randn_like(x_static) * plan.init_noise_scale)
    graph.replay()
    fresh = run_plan(plan, cfg, x_static.clone(), guidance_scale=7.5, table=table)
    assert torch.equal(out_static, fresh)
