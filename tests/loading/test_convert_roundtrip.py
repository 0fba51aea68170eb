"""diffusers folder -> single file -> diffusers folder, checked by diffusers' and transformers' own loaders."""
import json
import os

import pytest
import torch
from loading_fixtures import CLIP, UNET, assert_same_state_dict, tiny_pipeline_folder

from velodiff.loading import (CheckpointError, convert_diffusers_to_single_file, convert_single_file_to_diffusers,
                              detect_family, family_of_diffusers_folder, read_component, read_model_index,
                              read_safetensors, write_safetensors)

#: what the weights cannot tell about the tiny models (head counts, activation)
TE_OVERRIDES = {"num_attention_heads": CLIP["num_attention_heads"], "hidden_act": CLIP["hidden_act"]}


def _overrides(family):
    u = UNET[family]
    out = {"unet": {"attention_head_dim": u["attention_head_dim"], "sample_size": u["sample_size"]},
           "vae": {"sample_size": 16}}
    for name in ("text_encoder", "text_encoder_2"):
        out[name] = dict(TE_OVERRIDES)
    return out


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_round_trip(tmp_path, family):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    src = tiny_pipeline_folder(family, str(tmp_path / "src"))
    assert family_of_diffusers_folder(src) == family
    single = convert_diffusers_to_single_file(src, tmp_path / "model.safetensors")
    sd = read_safetensors(single)
    assert detect_family(sd) == family
    index = convert_single_file_to_diffusers(single, tmp_path / "out", configs=_overrides(family))
    assert read_model_index(tmp_path / "out") == index
    out = tmp_path / "out"
    # diffusers and transformers load the written folder with their own from_pretrained
    assert_same_state_dict(UNet2DConditionModel.from_pretrained(out / "unet").state_dict(),
                           read_component(os.path.join(src, "unet")))
    assert_same_state_dict(AutoencoderKL.from_pretrained(out / "vae").state_dict(),
                           read_component(os.path.join(src, "vae")))
    import transformers
    names = ["text_encoder", "text_encoder_2"] if family == "sdxl" else ["text_encoder"]
    for name in names:
        cls = getattr(transformers, index[name][1])
        assert index[name][1] == json.load(open(os.path.join(src, name, "config.json")))["architectures"][0]
        got = cls.from_pretrained(out / name).state_dict()
        want = cls.from_pretrained(os.path.join(src, name)).state_dict()
        assert_same_state_dict(got, want)
    # and back to the same single file
    again = convert_diffusers_to_single_file(out, tmp_path / "again.safetensors")
    assert_same_state_dict(read_safetensors(again), sd)


def test_fp16_conversion_and_errors(tmp_path):
    src = tiny_pipeline_folder("sd1", str(tmp_path / "src"))
    single = convert_diffusers_to_single_file(src, tmp_path / "half.safetensors", dtype=torch.float16)
    sd = read_safetensors(single)
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*\.safetensors only"):
        convert_diffusers_to_single_file(src, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"not a diffusers pipeline folder"):
        convert_diffusers_to_single_file(tmp_path, tmp_path / "x.safetensors", family="sd1")
    torch.save({"state_dict": sd}, tmp_path / "model.ckpt")
    with pytest.raises(CheckpointError, match=r"model\.ckpt.*allow_pickle=True"):
        convert_single_file_to_diffusers(tmp_path / "model.ckpt", tmp_path / "out")
    index = convert_single_file_to_diffusers(tmp_path / "model.ckpt", tmp_path / "out", allow_pickle=True,
                                             configs=_overrides("sd1"))
    assert index["scheduler"] == ["diffusers", "PNDMScheduler"]
    write_safetensors({"pos_embed": torch.zeros(1), "t_block.1.weight": torch.zeros(1),
                       "blocks.0.scale_shift_table": torch.zeros(1)}, tmp_path / "pixart.safetensors")
    with pytest.raises(CheckpointError, match=r"pixart\.safetensors.*cannot infer the pixart structure"):
        convert_single_file_to_diffusers(tmp_path / "pixart.safetensors", tmp_path / "out2")
