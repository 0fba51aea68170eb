"""LinFusion (``linfusion``): the layer against a float64 hand computation of the reference formula, the linear
attention in half precision with large activations, LinFusion's published key layout (layer order taken from
diffusers' own UNet), bad files, apply / restore, the combination with hidiffusion, the command line, and the
built-in digits model's shipped weights against the README's claim."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import velodiff as vd
from velodiff.accel import parse_technique
from velodiff.accel.highres.hidiffusion import HiDiffusion
from velodiff.accel.highres.linfusion import (EPS, LinFusion, LinFusionAttention, _linear_attention, build_layer,
                                              linfusion_layer_names)
from velodiff.models.attention import Attention

from claims import assert_accuracy_claim
from fixtures import quiet_pipeline, run_cli

#: the README's claim for the shipped digits weights at 16x16 (bench/results/linfusion_digits.md)
CLAIMED_ACCURACY = 0.99


def randn(*shape, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ------------------------------------------------------------------------------------------------------------------
# the math
# ------------------------------------------------------------------------------------------------------------------

def hand_linear_attention(q, k, v, eps=EPS):
    """The sum form, per (batch, head) and query, in float64: o_i = sum_j (pq_i . pk_j) v_j / (sum_j pq_i . pk_j
    + Nk * eps) with p = elu + 1 (the reference's mean form multiplied through by Nk)."""
    pq, pk = F.elu(q.double()) + 1, F.elu(k.double()) + 1
    weights = torch.einsum("bhid,bhjd->bhij", pq, pk)
    return torch.einsum("bhij,bhjv->bhiv", weights, v.double()) / (weights.sum(-1, keepdim=True) + k.shape[2] * eps)


def hand_layer(x, p, heads):
    """LinFusion's GeneralizedLinearAttention on x [B, N, C] from a parameter dict, float64, written out."""
    def mlp(u, side):
        h = u @ p[f"{side}.0.weight"].T + p[f"{side}.0.bias"]
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
        h = h * p[f"{side}.1.weight"] + p[f"{side}.1.bias"]
        h = torch.where(h > 0, h, 0.01 * h)
        return h @ p[f"{side}.3.weight"].T + p[f"{side}.3.bias"]

    def split(t):
        b, n, c = t.shape
        return t.view(b, n, heads, c // heads).transpose(1, 2)
    q = split((x + mlp(x, "to_q_")) @ p["to_q.weight"].T)
    k = split((x + mlp(x, "to_k_")) @ p["to_k.weight"].T)
    v = split(x @ p["to_v.weight"].T)
    o = hand_linear_attention(q, k, v).transpose(1, 2).reshape(x.shape)
    return o @ p["to_out.0.weight"].T + p["to_out.0.bias"]


def random_layer(c=16, heads=2, mid=12, seed=0):
    """(LinFusionAttention with every parameter random, its parameters in float64)."""
    attn = Attention(c, heads=heads, dim_head=c // heads)
    layer = build_layer(attn, mid, mid, file_projections=True)
    params = {}
    with torch.no_grad():
        for i, (name, t) in enumerate(layer.state_dict(keep_vars=True).items()):
            value = randn(*t.shape, seed=100 + seed * 50 + i, scale=0.3)
            if name.endswith("1.weight"):  # LayerNorm scale around 1
                value = value + 1
            t.copy_(value)
            params[name] = t.detach().double().clone()  # the float32 values the layer holds
    return layer, params


@pytest.mark.parametrize("n, c, heads, mid", [(24, 16, 2, 12), (7, 8, 1, 8), (50, 24, 3, 24)])
def test_layer_matches_hand_computation(n, c, heads, mid):
    """float64: equal to rounding (1e-12); float32: the relative error of a few fp32 products and sums of length
    <= max(N, C) with magnitudes O(1), well under 1e-5."""
    layer, params = random_layer(c, heads, mid)
    x = randn(3, n, c, seed=1)
    want = hand_layer(x, params, heads)
    with torch.no_grad():
        got64 = layer.double()(x)
    assert torch.allclose(got64, want, rtol=0, atol=1e-12 * float(want.abs().max()))
    with torch.no_grad():
        got32 = layer.float()(x.float())
    assert got32.dtype == torch.float32
    assert float((got32.double() - want).norm() / want.norm()) < 1e-5


@pytest.mark.parametrize("nq, nk, d, dv", [(16, 16, 8, 8), (5, 33, 4, 6), (64, 1, 40, 40)])
def test_linear_attention_sum_form(nq, nk, d, dv):
    """Queries and keys of different lengths, v with its own head dim, against the sum form."""
    q, k, v = randn(2, 3, nq, d, seed=1), randn(2, 3, nk, d, seed=2), randn(2, 3, nk, dv, seed=3)
    got = _linear_attention(q, k, v)
    assert got.shape == (2, 3, nq, dv) and got.dtype == torch.float64
    assert torch.allclose(got, hand_linear_attention(q, k, v), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype, rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
def test_half_precision_with_large_activations(dtype, rtol):
    """Large activations (|k| ~ 300, |v| ~ 300, 4096 tokens: phi(K)^T V sums to ~1e8, past fp16's 65504): the fp32
    state keeps the result finite and within a few units of the dtype's rounding (2^-10 fp16, 2^-7 bf16 per
    input, relative Frobenius error)."""
    q, k, v = randn(1, 2, 4096, 8, seed=4, scale=300), randn(1, 2, 4096, 8, seed=5, scale=300), \
        randn(1, 2, 4096, 8, seed=6, scale=300)
    q16, k16, v16 = (t.to(dtype) for t in (q, k, v))
    got = _linear_attention(q16, k16, v16)
    assert got.dtype == dtype and torch.isfinite(got).all()
    want = hand_linear_attention(q16.double(), k16.double(), v16.double())  # the same rounded inputs
    assert float((got.double() - want).norm() / want.norm()) < rtol


@pytest.mark.parametrize("args, kwargs, message", [
    ((randn(2, 8, 4), randn(2, 8, 4), randn(2, 8, 4)), {}, "q, k and v must be \\[B, H, N, D\\]"),
    ((randn(1, 2, 8, 4), randn(1, 2, 8, 5), randn(1, 2, 8, 4)), {}, "must agree"),
    ((randn(1, 2, 8, 4), randn(1, 2, 8, 4), randn(1, 2, 7, 4)), {}, "must agree"),
    ((randn(1, 2, 8, 4),) * 3, {"kind": "sana"}, "kind must be 'linfusion'"),
    ((randn(1, 2, 8, 4),) * 3, {"eps": -1.0}, "eps must be"),
])
def test_linear_attention_bad_input(args, kwargs, message):
    with pytest.raises(ValueError, match=message):
        _linear_attention(*args, **kwargs)


def test_layer_refuses_masks_and_maps():
    layer, _ = random_layer()
    with pytest.raises(ValueError, match="attention_mask"):
        layer(torch.randn(1, 4, 16, dtype=torch.float64), attention_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="hidden_states must be \\[B, N, C\\]"):
        layer(torch.randn(1, 16, 2, 2, dtype=torch.float64))


# ------------------------------------------------------------------------------------------------------------------
# LinFusion's key layout on a tiny SD 1.5-like UNet
# ------------------------------------------------------------------------------------------------------------------

MLP_KEYS = ("0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers' tiny SD 1.5 pipeline, velodiff's pipeline of the same folder, its attn1 names in diffusers'
    module order: the order of LinFusion's indices)."""
    from fixtures import saved_and_loaded, tiny_sd_pipeline
    theirs, ours, _ = saved_and_loaded(tiny_sd_pipeline("sd15"), str(tmp_path_factory.mktemp("tiny") / "sd15"))
    order = [n for n, m in theirs.unet.named_modules() if n.endswith("attn1")]
    return ours, order


def linfusion_file(unet, order, folder, seed=0, drop=(), add=None, reshape=None, with_config=True, projections=True):
    """Write LinFusion's published layout for ``unet``'s attn1 layers (``order``: diffusers' names in index order):
    random MLPs (width C) and projections. Returns (folder, {key: tensor})."""
    modules = dict(unet.named_modules())
    tensors, s = {}, seed
    for i, name in enumerate(order):
        c = modules[name].to_q.weight.shape[1]
        shapes = {f"{side}.{p}": ((c, c) if p.endswith("weight") and p[0] in "03" else (c,))
                  for side in ("to_q_", "to_k_") for p in MLP_KEYS}
        if projections:
            shapes.update({"to_q.weight": (c, c), "to_k.weight": (c, c), "to_v.weight": (c, c),
                           "to_out.0.weight": (c, c), "to_out.0.bias": (c,)})
        for key, shape in shapes.items():
            s += 1
            tensors[f"{i}.{key}"] = randn(*shape, seed=s, scale=0.2).float()
    for key in drop:
        tensors.pop(key)
    tensors.update(add or {})
    for key, shape in (reshape or {}).items():
        tensors[key] = torch.zeros(shape)
    os.makedirs(folder, exist_ok=True)
    save_file(tensors, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    if with_config:
        config = {"_class_name": "LinFusion", "modules_list": [
            {"module_name": n, "dim_n": int(modules[n].to_q.weight.shape[1]), "heads": modules[n].heads,
             "projection_mid_dim": None} for n in order]}
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump(config, f)
    return folder, tensors


def test_layer_order_is_diffusers_order(tiny):
    pipe, order = tiny
    assert linfusion_layer_names(pipe.unet) == order


@pytest.mark.parametrize("how", ["folder", "file without config"])
def test_published_layout_loads(tiny, tmp_path, how):
    """Every tensor of the file lands in the layer diffusers' order names for its index (the MLPs and, as LinFusion
    does, the file's projections); restore puts the very same modules back."""
    pipe, order = tiny
    folder, tensors = linfusion_file(pipe.unet, order, str(tmp_path / "lf"), with_config=(how == "folder"))
    weights = folder if how == "folder" else os.path.join(folder, "diffusion_pytorch_model.safetensors")
    before = {n: m for n, m in pipe.unet.named_modules() if n.endswith("attn1")}
    vd.optimize(pipe, LinFusion(weights=weights))
    try:
        modules = dict(pipe.unet.named_modules())
        for i, name in enumerate(order):
            layer = modules[name]
            assert isinstance(layer, LinFusionAttention) and layer.heads == before[name].heads
            own = layer.state_dict()
            for key, value in tensors.items():
                index, _, rest = key.partition(".")
                if int(index) == i:
                    assert torch.equal(own[rest], value), (name, rest)
            assert layer.to_q is not before[name].to_q  # the file's projections, not the UNet's
    finally:
        vd.restore(pipe)
    assert all(m is before[n] for n, m in pipe.unet.named_modules() if n.endswith("attn1"))


def test_mlp_only_file_keeps_the_unets_projections_when_not_strict(tiny, tmp_path):
    pipe, order = tiny
    folder, _ = linfusion_file(pipe.unet, order, str(tmp_path / "mlp"), projections=False)
    with pytest.raises(ValueError, match=r"weights .*missing keys \[0\.to_q\.weight"):
        vd.optimize(pipe, LinFusion(weights=folder))
    before = {n: m for n, m in pipe.unet.named_modules() if n.endswith("attn1")}
    vd.optimize(pipe, LinFusion(weights=folder, strict=False))
    try:
        for name, layer in pipe.unet.named_modules():
            if name.endswith("attn1"):
                assert layer.to_q is before[name].to_q and layer.to_out is before[name].to_out
    finally:
        vd.restore(pipe)


@pytest.mark.parametrize("change, message", [
    (dict(drop=("2.to_k_.1.bias",)), r"missing keys \[2\.to_k_\.1\.bias\]"),
    (dict(add={"4.to_q_.0.weight": torch.zeros(2, 2)}), r"unexpected keys \[4\.to_q_\.0\.weight\]"),
    (dict(add={"text_model.foo": torch.zeros(1)}), r"unexpected keys \[text_model\.foo\]"),
    (dict(reshape={"1.to_v.weight": (64, 32)}),
     r"mis-shaped keys \[1\.to_v\.weight \[64, 32\] \(expected \[64, 64\]\)"),
    (dict(drop=("0.to_q.weight",)), r"missing keys \[0\.to_q\.weight\]"),  # partial projections: even not strict
])
@pytest.mark.parametrize("strict", [True, False])
def test_bad_files_name_the_keys(tiny, tmp_path, change, message, strict):
    pipe, order = tiny
    folder, _ = linfusion_file(pipe.unet, order, str(tmp_path / "bad"), **change)
    if not strict and "unexpected" in message:  # strict=False ignores keys it does not need
        vd.optimize(pipe, LinFusion(weights=folder, strict=False))
        vd.restore(pipe)
        return
    before = [m for n, m in pipe.unet.named_modules() if n.endswith("attn1")]
    with pytest.raises(ValueError, match="linfusion: weights .*" + message):
        vd.optimize(pipe, LinFusion(weights=folder, strict=strict))
    assert [m for n, m in pipe.unet.named_modules() if n.endswith("attn1")] == before  # nothing changed


def test_config_naming_other_layers_is_refused(tiny, tmp_path):
    pipe, order = tiny
    folder, _ = linfusion_file(pipe.unet, order, str(tmp_path / "cfg"))
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    config["modules_list"][0]["module_name"] = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    with pytest.raises(ValueError, match="linfusion: weights: .*config.json names the layers"):
        vd.optimize(pipe, LinFusion(weights=folder))


def test_pipelines_without_shipped_weights_or_without_unet(tiny):
    pipe, _ = tiny
    with pytest.raises(ValueError, match="linfusion: weights=None means the model's own LinFusion weights"):
        vd.optimize(pipe, LinFusion())
    with pytest.raises(ValueError, match="linfusion fits UNet pipelines.*transformer"):
        vd.optimize(quiet_pipeline("digits-dit"), LinFusion())


@pytest.mark.parametrize("kwargs, message", [
    (dict(weights="/no/such/linfusion.safetensors"), "linfusion: weights='/no/such/linfusion.safetensors' does not "
                                                     "exist"),
    (dict(weights=""), "linfusion: weights must be a path"),
    (dict(weights=3), "linfusion: weights must be a path"),
    (dict(strict="yes"), "linfusion: strict must be True or False"),
])
def test_bad_fields_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LinFusion(**kwargs)


def test_folder_without_weights_file(tmp_path):
    with pytest.raises(ValueError, match="linfusion: weights=.* is a folder without diffusion_pytorch_model"):
        LinFusion(weights=str(tmp_path))


def test_a_file_that_is_not_safetensors_is_named(tiny, tmp_path):
    """Text in place of the weights: a ValueError naming the field and the file, not safetensors' own error."""
    bad = tmp_path / "weights.safetensors"
    bad.write_text("not a checkpoint at all, just some text long enough to be read as a header size\n")
    with pytest.raises(ValueError, match=r"linfusion: weights: .*weights.safetensors"):
        vd.optimize(tiny[0], LinFusion(weights=str(bad)))


def test_specs_from_the_command_line(tmp_path):
    assert parse_technique("linfusion") == LinFusion()
    assert parse_technique("linfusion:strict=off") == LinFusion(strict=False)
    with pytest.raises(ValueError, match="linfusion: weights='/nope' does not exist"):
        parse_technique("linfusion:weights=/nope")


# ------------------------------------------------------------------------------------------------------------------
# the built-in digits model
# ------------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def digits():
    return quiet_pipeline("digits")


def generate(pipe, steps=2, size=16, prompts=("a 3", "a 7"), seed=0):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts))]
    return pipe(list(prompts), num_inference_steps=steps, sampler="dpmpp_2m", generator=gens, output_type="pt",
                height=size, width=size).images


def with_techniques(pipe, *configs, **kw):
    vd.optimize(pipe, *configs)
    try:
        return generate(pipe, **kw)
    finally:
        vd.restore(pipe)


def test_apply_and_restore_are_exact(digits):
    """Applied: every attn1 is a LinFusion layer and the images change; restored: the same modules and the plain
    images bit for bit; applying twice is refused."""
    before = {n: m for n, m in digits.unet.named_modules()}
    plain = generate(digits)
    vd.optimize(digits, LinFusion())
    try:
        layers = [m for n, m in digits.unet.named_modules() if n.endswith("attn1")]
        assert len(layers) == 4 and all(isinstance(m, LinFusionAttention) for m in layers)
        with pytest.raises(ValueError, match="linfusion is already applied"):
            vd.optimize(digits, LinFusion())
        got = generate(digits)
        assert torch.isfinite(got).all() and not torch.equal(got, plain)
    finally:
        vd.restore(digits)
    assert dict(digits.unet.named_modules()) == before
    assert torch.equal(generate(digits), plain)


def test_with_hidiffusion_either_order(digits):
    """LinFusion + HiDiffusion at 32x32 (5 steps: RAU-Net on for the first floor(0.4 * 5) = 2): runs, reproduces, and
    is the same in either order and with hidiffusion's MSW-MSA off (LinFusion layers are never windowed); RAU-Net
    still acts (differs from LinFusion alone)."""
    kw = dict(size=32, steps=5)
    a = with_techniques(digits, LinFusion(), HiDiffusion(), **kw)
    assert a.shape == (2, 3, 32, 32) and torch.isfinite(a).all()
    assert torch.equal(a, with_techniques(digits, LinFusion(), HiDiffusion(), **kw))
    assert torch.equal(a, with_techniques(digits, HiDiffusion(), LinFusion(), **kw))
    assert torch.equal(a, with_techniques(digits, LinFusion(), HiDiffusion(msw_msa=False), **kw))
    assert not torch.equal(a, with_techniques(digits, LinFusion(), **kw))


def test_cli_generate_writes_a_png(tmp_path, capsys):
    from PIL import Image
    code, out, err = run_cli(["generate", "--model", "digits", "--optimize", "linfusion", "--prompt", "a handwritten 4",
                              "--steps", "4", "--outdir", str(tmp_path)], capsys)
    assert code == 0, err
    image = np.asarray(Image.open(tmp_path / "000.png"))
    assert image.shape == (16, 16, 3) and image.std() > 0


def test_shipped_weights_draw_digits(digits):
    """The README's claim for digits + linfusion at 16x16 (20 steps of dpmpp_2m, guidance 3, prompt "a handwritten
    D"), checked on 5 images per digit by velodiff.eval.judge with a one-sided exact binomial test (tests/claims.py)."""
    from velodiff.eval import image_seeds, judge
    labels = np.repeat(np.arange(10), 5)
    seeds = image_seeds(1, len(labels))
    vd.optimize(digits, LinFusion())
    try:
        images = digits([f"a handwritten {d}" for d in labels], num_inference_steps=20, sampler="dpmpp_2m",
                        generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
    finally:
        vd.restore(digits)
    result = judge(images, labels, n_boot=10, fd_boot=10)
    correct = int(round(result["conditional_accuracy"] * len(labels)))
    assert_accuracy_claim(correct, len(labels), CLAIMED_ACCURACY, what="digits + linfusion at 16x16")


def test_distill_script_writes_what_the_loader_reads(digits, tmp_path, capsys):
    """scripts/distill_linfusion.py (2 steps of batch 2 here) writes LinFusion's full layout for digits (a strict
    load), its record, and the UNet's own projections (only the MLPs train by default)."""
    import importlib.util
    path = os.path.join(os.path.dirname(__file__), "..", "..", "scripts", "distill_linfusion.py")
    spec = importlib.util.spec_from_file_location("distill_linfusion", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        assert script.main(["--steps", "2", "--batch", "2", "--out", str(tmp_path / "a")]) == 0
    finally:
        torch.set_num_threads(threads)
    assert "step     1  loss" in capsys.readouterr().out
    record = json.loads((tmp_path / "a" / "distillation.json").read_text())
    assert record["steps"] == 2 and record["seed"] == 0 and record["trained"] == "MLPs"
    own = {n: m for n, m in digits.unet.named_modules() if n.endswith("attn1")}
    vd.optimize(digits, LinFusion(weights=str(tmp_path / "a")))
    try:
        for name, layer in digits.unet.named_modules():
            if name.endswith("attn1"):
                assert torch.equal(layer.to_q.weight, own[name].to_q.weight)
                assert torch.equal(layer.to_out[0].bias, own[name].to_out[0].bias)
                assert layer.to_q_[3].weight.abs().max() > 0  # trained away from its zero start
    finally:
        vd.restore(digits)


@pytest.mark.parametrize("nq, nk, d, dv", [(64, 64, 8, 8), (7, 333, 40, 24)])
def test_layer_runs_the_kernel_as_the_formula(nq, nk, d, dv):
    """In fp32 the layer calls velodiff::linear_attention: the same as the float64 formula to fp32 round-off."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, n, c, generator=g) for n, c in ((nq, d), (nk, d), (nk, dv)))
    from velodiff.ops import linear_attention
    got = linear_attention(q, k, v, kind="linfusion", eps=EPS)
    want = hand_linear_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, _linear_attention(q, k, v), rtol=1e-5, atol=1e-6)
