"""velodiff's CLIP text encoders against transformers' (the oracle) on the same weights: every output the pipelines
read is bit-identical in fp32 (and in fp16 / bf16) across configs (the tiny test ones, digits, SD 1.5's, SD 2's
gelu widths, SDXL's projection model; eos_token_id 2 and not 2; with and without a padding mask); config and input
errors name the key or argument; folders and single-file weights load into velodiff's classes, and the generate
path of a CLIP pipeline never imports transformers."""
import json
import os
import subprocess
import sys

import pytest
import torch

import velodiff as vd
from velodiff.loading import BUILTIN_MODELS, CheckpointError, default_text_encoder_configs, write_safetensors
from velodiff.loading.modules import load_transformers_component, text_encoder_from_state_dict
from velodiff.models.clip_text import CLIPTextModel, CLIPTextModelWithProjection, clip_text_config

transformers = pytest.importorskip("transformers")

TINY = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1, vocab_size=1000, hidden_size=32, intermediate_size=37,
            num_attention_heads=4, num_hidden_layers=5, hidden_act="gelu", projection_dim=32)  # tests/fixtures.py
DIGITS_CONFIG = os.path.join(BUILTIN_MODELS["digits"], "text_encoder", "config.json")


def _config(name: str) -> dict:
    """(transformers CLIPTextConfig kwargs) for the configs under test; the large ones are the real SD configs
    (SD 2 and SDXL-bigG with fewer layers: the per-layer arithmetic is what is compared, and 23 / 32 full-width
    layers would cost CI seconds for nothing more)."""
    if name == "digits":
        with open(DIGITS_CONFIG) as f:
            cfg = json.load(f)
        return {k: v for k, v in cfg.items() if k not in ("architectures", "dtype", "transformers_version")}
    if name == "sd15":
        return {k: v for k, v in default_text_encoder_configs("sd1")["text_encoder"].items() if k != "architectures"}
    if name == "sd2":
        cfg = default_text_encoder_configs("sd2")["text_encoder"]
        return {**{k: v for k, v in cfg.items() if k != "architectures"}, "num_hidden_layers": 4}
    if name == "sdxl_g":
        cfg = default_text_encoder_configs("sdxl")["text_encoder_2"]
        return {**{k: v for k, v in cfg.items() if k != "architectures"}, "num_hidden_layers": 3}
    base = {"tiny": TINY, "tiny_eos": {**TINY, "eos_token_id": 999, "bos_token_id": 998},
            "tiny_quick": {**TINY, "hidden_act": "quick_gelu", "num_hidden_layers": 2}}
    return dict(base[name])


def _randomize(model, seed: int, std: float):
    """Random weights everywhere (LayerNorm weights around 1), so no zero or identity layer hides a mistake."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            p.copy_(noise + 1 if "layer_norm" in name and name.endswith("weight") else noise)
    return model


def _pair(name: str, projection: bool, seed: int = 0, std: float = 0.05):
    """(transformers' model with random weights, velodiff's built from its config and state dict the way the
    loaders build it: meta device, tensors assigned)."""
    cfg = transformers.CLIPTextConfig(**_config(name))
    cls = transformers.CLIPTextModelWithProjection if projection else transformers.CLIPTextModel
    with torch.device("meta"):
        theirs = cls(cfg)
    theirs = theirs.to_empty(device="cpu")  # no init: every parameter is drawn below
    for buf_name, buf in theirs.named_buffers():
        assert buf_name.endswith("position_ids"), buf_name
        buf.copy_(torch.arange(buf.shape[-1]).expand_as(buf))
    _randomize(theirs, seed, std).eval()
    arch = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    ours = text_encoder_from_state_dict(cfg.to_dict(), dict(theirs.state_dict()), source=name, class_name=arch)
    assert type(ours).__name__ == arch and type(ours).__module__ == "velodiff.models.clip_text"
    return theirs, ours


def _ids(cfg: dict, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """Token rows as a tokenizer writes them (start token, words, end token, padding), plus a row whose end token
    comes early and another with a word id above the end token's: the two pooling rules pick different rows."""
    g = torch.Generator().manual_seed(seed)
    bos, eos, pad = cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]
    words = [i for i in range(cfg["vocab_size"]) if i not in (bos, eos, pad)]
    rows = []
    for b in range(batch):
        n = 1 + (b * 3) % max(1, length - 2)
        body = [words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g)]
        row = ([bos] + body + [eos] + [pad] * length)[:length]
        rows.append(row)
    rows[-1][-1] = eos  # a second end token (padding with the end token, as SD 1.5's tokenizer does)
    return torch.tensor(rows)


def _assert_same(a, b):
    assert torch.equal(a[0], b[0])
    assert len(a.to_tuple()) == len(b.to_tuple())
    for x, y in zip(a.to_tuple(), b.to_tuple()):
        if isinstance(x, torch.Tensor):
            assert x.dtype == y.dtype and torch.equal(x, y)
        else:
            assert len(x) == len(y) and all(torch.equal(p, q) for p, q in zip(x, y))


CASES = [("tiny", False), ("tiny", True), ("tiny_eos", False), ("tiny_eos", True), ("tiny_quick", False),
         ("digits", False), ("sd15", False), ("sd2", False), ("sdxl_g", True)]


@pytest.mark.parametrize("name,projection", CASES)
def test_outputs_are_bit_identical_to_transformers(name, projection):
    theirs, ours = _pair(name, projection, std=0.02 if name in ("sd15", "sd2", "sdxl_g") else 0.05)
    cfg = _config(name)
    length = min(cfg.get("max_position_embeddings", 77), 8 if name in ("sd15", "sd2", "sdxl_g") else 77)
    ids = _ids({**transformers.CLIPTextConfig(**cfg).to_dict()}, 4, length)
    with torch.no_grad():
        for kwargs in ({}, {"output_hidden_states": True}):
            a, b = theirs(ids, **kwargs), ours(ids, **kwargs)
            _assert_same(a, b)
        if projection:
            assert torch.equal(a.text_embeds, b.text_embeds) and b[0].shape == (4, cfg["projection_dim"])
        else:
            assert torch.equal(a.pooler_output, b.pooler_output)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state)
        assert len(b.hidden_states) == cfg["num_hidden_layers"] + 1
        assert torch.equal(a.hidden_states[-2], b.hidden_states[-2])  # SDXL's penultimate layer
        assert b.hidden_states[0].abs().max() > 0 and not torch.equal(b.hidden_states[-1], b.last_hidden_state)


@pytest.mark.parametrize("name,projection", [("tiny", False), ("tiny_eos", True), ("digits", False)])
def test_padding_mask_and_single_token_match_transformers(name, projection):
    theirs, ours = _pair(name, projection)
    cfg = transformers.CLIPTextConfig(**_config(name)).to_dict()
    ids = _ids(cfg, 3, 12)
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[1, 9:] = 0
    with torch.no_grad():
        _assert_same(theirs(ids, attention_mask=mask, output_hidden_states=True),
                     ours(ids, attention_mask=mask, output_hidden_states=True))
        # an all-ones mask is the unmasked call (transformers then uses is_causal), a length-1 row too
        _assert_same(theirs(ids, attention_mask=torch.ones_like(ids)), ours(ids, attention_mask=torch.ones_like(ids)))
        _assert_same(theirs(ids), ours(ids, attention_mask=torch.ones_like(ids)))
        _assert_same(theirs(ids[:, :1]), ours(ids[:, :1]))


def test_pooling_rules():
    """eos_token_id == 2: the largest id's position (legacy); otherwise the first eos_token_id position."""
    _, legacy = _pair("tiny", False)
    _, modern = _pair("tiny_eos", False)
    ids = torch.tensor([[0, 500, 2, 700, 2, 1]])
    with torch.no_grad():
        out = legacy(ids)
        assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, 3])
        ids = torch.tensor([[998, 500, 999, 700, 999, 999]])
        out = modern(ids)
        assert torch.equal(out.pooler_output[0], out.last_hidden_state[0, 2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name,projection", [("tiny", False), ("tiny_eos", True), ("digits", False)])
def test_half_precision_matches_transformers(name, projection, dtype):
    """The same ops in the same order: equal in fp16 and bf16 too (rounding included)."""
    theirs, ours = _pair(name, projection)
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    ids = _ids(transformers.CLIPTextConfig(**_config(name)).to_dict(), 3, 16)
    with torch.no_grad():
        a, b = theirs(ids, output_hidden_states=True), ours(ids, output_hidden_states=True)
    assert b[0].dtype == dtype
    _assert_same(a, b)


def test_config_object_and_output_access():
    _, ours = _pair("tiny", True)
    assert ours.config.hidden_size == 32 and ours.config.projection_dim == 32 and ours.config.eos_token_id == 2
    assert getattr(ours.config, "use_attention_mask", False) is False  # what the SD pipeline asks
    assert ours.dtype == torch.float32 and ours.device == torch.device("cpu")
    out = ours(torch.tensor([[0, 5, 2]]), output_hidden_states=True)
    assert out.keys() == ["text_embeds", "last_hidden_state", "hidden_states"]
    assert out["text_embeds"] is out.text_embeds and out[1] is out.last_hidden_state
    as_tuple = ours(torch.tensor([[0, 5, 2]]), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2 and torch.equal(as_tuple[0], out.text_embeds)
    assert clip_text_config({"hidden_size": 64, "num_attention_heads": 4}).intermediate_size == 2048  # default


@pytest.mark.parametrize("change,match", [
    ({"hidden_size": 30}, r"hidden_size 30 is not divisible by num_attention_heads 4"),
    ({"num_hidden_layers": 0}, r"num_hidden_layers must be a positive integer, got 0"),
    ({"vocab_size": 1.5}, r"vocab_size must be a positive integer, got 1\.5"),
    ({"max_position_embeddings": True}, r"max_position_embeddings must be a positive integer, got True"),
    ({"hidden_act": "gelu_10"}, r"hidden_act 'gelu_10' is not supported; supported: quick_gelu, gelu"),
    ({"layer_norm_eps": 0}, r"layer_norm_eps must be a positive number, got 0"),
    ({"eos_token_id": None}, r"eos_token_id must be an integer"),
    ({"eos_token_id": [2, 3]}, r"eos_token_id must be an integer"),
    ({"model_type": "t5"}, r"model_type 't5' is not a CLIP text encoder config"),
    ({"is_causal": False}, r"is_causal=False: velodiff's CLIP text encoder is causal only"),
    ({"projection_dim": 0}, r"projection_dim must be a positive integer, got 0"),
])
def test_config_errors_name_the_key(change, match):
    with pytest.raises(ValueError, match=r"CLIPTextModelWithProjection: " + match):
        CLIPTextModelWithProjection({**TINY, **change})
    if "projection_dim" not in change:
        with pytest.raises(ValueError, match=match):
            CLIPTextModel({**TINY, **change})
    else:
        CLIPTextModel({**TINY, **change})  # the plain model has no projection
    with pytest.raises(TypeError, match="must be a dict"):
        CLIPTextModel([("hidden_size", 32)])


def test_bad_inputs_are_clear_errors():
    _, ours = _pair("tiny", False)
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor"):
        ours([[0, 1, 2]])
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor \[batch, length\], got torch.float32"):
        ours(torch.zeros(1, 3))
    with pytest.raises(ValueError, match=r"input_ids must be an integer tensor .* \(3,\)"):
        ours(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids has 78 tokens per row; this text encoder reads 1 to 77"):
        ours(torch.zeros(1, 78, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids holds ids outside \[0, 1000\) \(vocab_size\): min 0, max 1000"):
        ours(torch.tensor([[0, 1000]]))
    with pytest.raises(ValueError, match=r"min -1"):
        ours(torch.tensor([[0, -1]]))
    with pytest.raises(ValueError, match=r"attention_mask must be a tensor \[batch, length\] = \(1, 3\)"):
        ours(torch.tensor([[0, 5, 2]]), attention_mask=torch.ones(1, 4))


# ---- loading -------------------------------------------------------------------------------------------------

def _save(model, folder: str) -> str:
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.mark.parametrize("projection", [False, True])
def test_folder_loads_velodiff_class_equal_to_transformers(tmp_path, projection):
    theirs, _ = _pair("tiny", projection)
    folder = _save(theirs, str(tmp_path / "te"))
    arch = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    for dtype in (torch.float32, torch.float16):
        ours = load_transformers_component(folder, arch, dtype, "cpu")
        ref = getattr(transformers, arch).from_pretrained(folder, dtype=dtype).eval()
        assert type(ours).__module__ == "velodiff.models.clip_text" and type(ours).__name__ == arch
        assert not ours.training and all(p.dtype == dtype and not p.requires_grad for p in ours.parameters())
        ids = _ids(TINY, 3, 77)
        with torch.no_grad():
            _assert_same(ref(ids, output_hidden_states=True), ours(ids, output_hidden_states=True))


def test_classic_names_and_a_stored_position_ids_buffer_load(tmp_path):
    """Files written by transformers < 5.6 name every key text_model.* and may hold the position_ids buffer."""
    theirs, _ = _pair("tiny", False)
    folder = tmp_path / "te"
    _save(theirs, str(folder))
    state = {"text_model." + k: v for k, v in theirs.state_dict().items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]
    write_safetensors(state, str(folder / "model.safetensors"))
    ours = load_transformers_component(str(folder), "CLIPTextModel", torch.float32, "cpu")
    ids = _ids(TINY, 2, 77)
    with torch.no_grad():
        _assert_same(theirs(ids), ours(ids))


def test_loading_errors_name_the_file_and_key(tmp_path):
    theirs, _ = _pair("tiny", False)
    folder = tmp_path / "te"
    _save(theirs, str(folder))
    weights = str(folder / "model.safetensors")
    state = dict(theirs.state_dict())
    del state["encoder.layers.1.mlp.fc2.bias"]
    write_safetensors(state, weights)
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*text_model\.encoder\.layers\.1\.mlp\.fc2\.bias"):
        load_transformers_component(str(folder), "CLIPTextModel", torch.float32, "cpu")
    write_safetensors({**theirs.state_dict(), "stray.weight": torch.zeros(1)}, weights)
    with pytest.raises(CheckpointError, match=r"stray\.weight"):
        load_transformers_component(str(folder), "CLIPTextModel", torch.float32, "cpu")
    write_safetensors(dict(theirs.state_dict()), weights)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "hidden_act": "mish"}))
    with pytest.raises(ValueError, match=r"te/config\.json: hidden_act 'mish' is not supported"):
        load_transformers_component(str(folder), "CLIPTextModel", torch.float32, "cpu")
    (folder / "config.json").write_text(json.dumps(cfg))
    # a pickled-only folder follows the pickle rule
    torch.save(dict(theirs.state_dict()), folder / "pytorch_model.bin")
    os.remove(weights)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*pickled.*allow_pickle=True"):
        load_transformers_component(str(folder), "CLIPTextModel", torch.float32, "cpu")
    ours = load_transformers_component(str(folder), "CLIPTextModel", torch.float32, "cpu", allow_pickle=True)
    with torch.no_grad():
        _assert_same(theirs(_ids(TINY, 2, 9)), ours(_ids(TINY, 2, 9)))


def test_variant_weights_are_read_when_present(tmp_path):
    theirs, _ = _pair("tiny", False)
    folder = tmp_path / "te"
    _save(theirs, str(folder))
    half = {k: v.half() for k, v in theirs.state_dict().items()}
    write_safetensors(half, str(folder / "model.fp16.safetensors"))
    ids = _ids(TINY, 2, 9)
    with torch.no_grad():
        plain = load_transformers_component(str(folder), "CLIPTextModel", torch.float32, "cpu")(ids)[0]
        variant = load_transformers_component(str(folder), "CLIPTextModel", torch.float32, "cpu", variant="fp16")
        assert torch.equal(variant.text_model.embeddings.token_embedding.weight,
                           half["embeddings.token_embedding.weight"].float())
        assert not torch.equal(variant(ids)[0], plain)
        os.remove(folder / "model.fp16.safetensors")  # no variant file: the plain weights, as before
        fallback = load_transformers_component(str(folder), "CLIPTextModel", torch.float32, "cpu", variant="fp16")
        assert torch.equal(fallback(ids)[0], plain)


def test_pipelines_and_single_files_get_velodiff_encoders(tmp_path):
    from fixtures import save_pipeline, tiny_sd_pipeline
    folder = save_pipeline(tiny_sd_pipeline("sdxl"), str(tmp_path / "sdxl"))
    pipe = vd.Pipeline.from_pretrained(folder)
    assert type(pipe.text_encoder) is CLIPTextModel and type(pipe.text_encoder_2) is CLIPTextModelWithProjection
    assert type(vd.Pipeline.from_pretrained("digits").text_encoder) is CLIPTextModel
    single = str(tmp_path / "sdxl.safetensors")
    vd.loading.convert_diffusers_to_single_file(folder, single)
    from_file = vd.Pipeline.from_pretrained(single, tokenizer=folder)
    assert type(from_file.text_encoder) is CLIPTextModel
    assert type(from_file.text_encoder_2) is CLIPTextModelWithProjection


def test_digits_images_equal_with_transformers_text_encoder_and_tokenizer():
    """The built-in model end to end: velodiff's encoder and tokenizer, then transformers' on the same folder."""
    folder = BUILTIN_MODELS["digits"]
    ours = vd.Pipeline.from_pretrained("digits")
    theirs = vd.Pipeline.from_pretrained("digits")
    theirs.text_encoder = transformers.CLIPTextModel.from_pretrained(os.path.join(folder, "text_encoder"),
                                                                     dtype=torch.float32).eval()
    theirs.tokenizer = transformers.AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    assert type(ours.tokenizer).__module__ == "velodiff.loading.fast_tokenizer"
    prompts = ["a handwritten 7", "the digit seven", "Number THREE!", "a purple 4 write", ""]
    images = []
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(prompts, num_inference_steps=4, output_type="pt",
                           generator=torch.Generator().manual_seed(0)).images)
    assert torch.equal(images[0], images[1])


def test_generate_path_of_a_clip_pipeline_imports_no_transformers():
    """Start-up: loading digits and generating imports neither transformers (nor scipy through it) nor
    torch._dynamo (which a meta-device nn.Embedding init would pull in, about 1 s)."""
    code = ("import sys, torch, velodiff as vd\n"
            "p = vd.Pipeline.from_pretrained('digits')\n"
            "p.set_progress_bar_config(disable=True)\n"
            "p('a handwritten 7', num_inference_steps=2)\n"
            "print(sorted(m for m in ('transformers', 'scipy', 'torch._dynamo') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
