"""diffusers folder conventions: component weights (single, fp16 variant, sharded), model_index.json."""
import json
import os

import pytest
import torch
from loading_fixtures import (assert_same_state_dict, tiny_clip, tiny_pipeline_folder, tiny_unet, tiny_vae,
                              UNET)

from velodiff.loading import (CheckpointError, find_weights, fit_clip_keys, load_state_dict_into, pipeline_components,
                              read_component, read_model_index)


def _fresh_unet():
    from diffusers import UNet2DConditionModel
    torch.manual_seed(1)
    return UNet2DConditionModel(**UNET["sd1"])


def test_unet_folder_loads_exactly(tmp_path):
    unet = tiny_unet("sd1")
    unet.save_pretrained(tmp_path, safe_serialization=True)
    files = find_weights(tmp_path)
    assert [os.path.basename(f) for f in files] == ["diffusion_pytorch_model.safetensors"]
    sd = read_component(tmp_path)
    model = load_state_dict_into(_fresh_unet(), sd, source=files[0])
    assert_same_state_dict(model.state_dict(), unet.state_dict())


def test_fp16_variant(tmp_path):
    vae = tiny_vae()
    vae.half().save_pretrained(tmp_path, safe_serialization=True, variant="fp16")
    with pytest.raises(CheckpointError, match="variant='fp16'"):
        find_weights(tmp_path)
    files = find_weights(tmp_path, variant="fp16")
    assert [os.path.basename(f) for f in files] == ["diffusion_pytorch_model.fp16.safetensors"]
    sd = read_component(tmp_path, variant="fp16", dtype=torch.float32)
    assert all(v.dtype == torch.float32 for v in sd.values())
    assert_same_state_dict(sd, {k: v.float() for k, v in vae.state_dict().items()})


def test_sharded_folder(tmp_path):
    unet = tiny_unet("sd1")
    unet.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    assert os.path.isfile(tmp_path / "diffusion_pytorch_model.safetensors.index.json")
    files = find_weights(tmp_path)
    assert len(files) > 1
    assert_same_state_dict(read_component(tmp_path), unet.state_dict())


def test_missing_shard_names_index_and_shard(tmp_path):
    tiny_unet("sd1").save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    shard = sorted(p for p in os.listdir(tmp_path) if p.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(CheckpointError, match=rf"index\.json.*{shard}.*missing"):
        find_weights(tmp_path)


def test_text_encoder_folder_into_flattened_or_wrapped_model(tmp_path):
    te = tiny_clip(with_projection=True)
    te.save_pretrained(tmp_path, safe_serialization=True)
    sd = read_component(tmp_path)
    fresh = tiny_clip(with_projection=True, initializer_range=0.5)
    load_state_dict_into(fresh, fit_clip_keys(sd, fresh), source=str(tmp_path))
    assert_same_state_dict(fresh.state_dict(), te.state_dict())
    # classic names ("text_model.*") also fit a flattened CLIPTextModel, and back
    plain = tiny_clip()
    classic = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in plain.state_dict().items()}
    load_state_dict_into(tiny_clip(), fit_clip_keys(classic, plain), source="classic")


def test_empty_folder_lists_what_it_holds(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match=r"no weights found.*diffusion_pytorch_model\.safetensors.*notes\.txt"):
        find_weights(tmp_path)


def test_model_index_of_a_real_pipeline_folder(tmp_path):
    tiny_pipeline_folder("sd1", str(tmp_path / "pipe"))
    index = read_model_index(tmp_path / "pipe")
    assert index["_class_name"] == "StableDiffusionPipeline"
    comps = pipeline_components(index)
    assert comps["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert comps["vae"] == ["diffusers", "AutoencoderKL"]
    assert comps["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert "safety_checker" not in comps  # saved as [null, null]
    for name in ("unet", "vae", "text_encoder"):
        assert find_weights(tmp_path / "pipe" / name)


def test_not_a_pipeline_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"not a diffusers pipeline folder \(no model_index\.json\)"):
        read_model_index(tmp_path)
    with pytest.raises(CheckpointError, match="not a folder"):
        read_model_index(tmp_path / "absent")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers"]}))
    with pytest.raises(CheckpointError, match=r"model_index\.json.*'unet'.*\[library, class name\]"):
        read_model_index(tmp_path)
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"model_index\.json.*not valid JSON"):
        read_model_index(tmp_path)
