"""``velodiff convert`` round trips are lossless: folder -> single file -> folder gives the same images, bit for bit,
because the file records in its metadata what the original layout cannot hold (every config, the scheduler, the
model index's settings). Checked on the built-in ``digits`` (whose norm_num_groups=16 no family default has), on a
DiT pipeline, and refused with the reason for ``digits-dit``, whose per-block class embedders the original DiT
layout cannot hold.
"""
import json
import os
import shutil
import stat

import pytest
import torch
from loading_fixtures import randomize

import velodiff as vd
from velodiff.cli import main
from velodiff.loading import BUILTIN_MODELS, read_safetensors_header

COMPONENTS = ("unet", "vae", "text_encoder", "transformer")


def _settings(folder):
    """model_index.json without its component entries and its own bookkeeping."""
    index = json.load(open(os.path.join(folder, "model_index.json")))
    return {k: v for k, v in index.items() if not isinstance(v, list) and k not in ("_class_name",
                                                                                  "_diffusers_version")}


def _configs(folder):
    out = {}
    for name in COMPONENTS:
        path = os.path.join(folder, name, "config.json")
        if os.path.isfile(path):
            out[name] = {k: v for k, v in json.load(open(path)).items() if k not in ("_diffusers_version",
                                                                                  "transformers_version")}
    out["scheduler"] = json.load(open(os.path.join(folder, "scheduler", "scheduler_config.json")))
    return out


def _images(path, call, **load):
    pipe = vd.Pipeline.from_pretrained(path, **load)
    pipe.set_progress_bar_config(disable=True)
    return call(pipe)


def _digits_call(pipe):
    return pipe(["a handwritten 7", "the digit three"], num_inference_steps=4, guidance_scale=3.0,
                generator=torch.Generator().manual_seed(5), output_type="pt").images


@pytest.fixture
def digits_with_settings(tmp_path):
    """A copy of the built-in digits whose model index carries settings of its own (as `_velodiff_defaults`)."""
    folder = str(tmp_path / "digits")
    shutil.copytree(BUILTIN_MODELS["digits"], folder)
    path = os.path.join(folder, "model_index.json")
    index = json.load(open(path))
    index["_velodiff_defaults"] = {"guidance_scale": 2.5}
    index["_another_tool"] = {"note": "carried over"}
    index["force_zeros_for_empty_prompt"] = False
    json.dump(index, open(path, "w"), indent=2)
    return folder


def test_digits_round_trip_is_bit_exact(tmp_path, capsys):
    single, back = str(tmp_path / "digits.safetensors"), str(tmp_path / "back")
    assert main(["convert", "digits", single]) == 0  # a built-in name is accepted as SRC
    _, metadata, _ = read_safetensors_header(single)
    assert json.loads(metadata["velodiff_configs"])["unet"]["norm_num_groups"] == 16
    assert main(["convert", single, back, "--tokenizer", "digits"]) == 0
    assert "note:" not in capsys.readouterr().out
    assert _configs(back) == _configs(BUILTIN_MODELS["digits"])
    want = _images("digits", _digits_call)
    assert torch.equal(_images(back, _digits_call), want)
    # the single file itself loads too, given a tokenizer (single files hold none)
    assert torch.equal(_images(single, _digits_call, tokenizer="digits"), want)


def test_model_index_settings_travel_both_ways(digits_with_settings, tmp_path):
    single, back = str(tmp_path / "d.safetensors"), str(tmp_path / "back")
    assert main(["convert", digits_with_settings, single]) == 0
    assert main(["convert", single, back, "--tokenizer", "digits"]) == 0
    want = _settings(digits_with_settings)
    assert want["_velodiff_defaults"] == {"guidance_scale": 2.5} and want["_another_tool"]["note"] == "carried over"
    assert _settings(back) == want
    pipe = vd.Pipeline.from_pretrained(single, tokenizer="digits")
    assert {k: pipe.components["_model_index"][k] for k in want} == want


def test_written_files_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        single, back = str(tmp_path / "d.safetensors"), str(tmp_path / "back")
        assert main(["convert", "digits", single]) == 0
        assert main(["convert", single, back]) == 0
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(single).st_mode) == 0o640
    for folder, _, files in os.walk(back):
        assert stat.S_IMODE(os.stat(folder).st_mode) == 0o750, folder
        for name in files:
            assert stat.S_IMODE(os.stat(os.path.join(folder, name)).st_mode) == 0o640, name


def test_convert_refuses_an_existing_destination_and_force_keeps_other_files(tmp_path, capsys):
    single, back = str(tmp_path / "d.safetensors"), str(tmp_path / "back")
    assert main(["convert", "digits", single]) == 0
    before = open(single, "rb").read()
    assert main(["convert", "digits", single]) == 2
    assert "--force" in capsys.readouterr().err and open(single, "rb").read() == before
    assert main(["convert", "digits", single, "--force", "--dtype", "fp32"]) == 0
    assert open(single, "rb").read() != before
    os.makedirs(back)
    open(os.path.join(back, "notes.txt"), "w").write("the user's")
    assert main(["convert", single, back]) == 2
    assert os.listdir(back) == ["notes.txt"]
    assert main(["convert", single, back, "--force", "--tokenizer", "digits"]) == 0
    assert open(os.path.join(back, "notes.txt")).read() == "the user's"
    assert os.path.isfile(os.path.join(back, "unet", "diffusion_pytorch_model.safetensors"))


def test_digits_dit_is_refused_with_the_reason(tmp_path, capsys):
    out = str(tmp_path / "dit.safetensors")
    assert main(["convert", "digits-dit", out]) == 2
    err = capsys.readouterr().err
    assert "one shared embedder" in err and "keep it as a folder" in err and err.count("\n") == 1
    assert not os.listdir(tmp_path)


def test_dit_pipeline_round_trip_is_bit_exact(tmp_path):
    """A DiT whose blocks share one class embedder (as released DiT checkpoints do): the transformer in the
    original layout, the VAE under first_stage_model., the scheduler and settings in the metadata."""
    from fixtures import save_pipeline, tiny_dit_pipeline
    theirs = tiny_dit_pipeline()
    model = randomize(theirs.transformer)
    with torch.no_grad():
        shared = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    folder = save_pipeline(theirs, str(tmp_path / "dit"))
    single, back = str(tmp_path / "dit.safetensors"), str(tmp_path / "back")
    assert main(["convert", folder, single]) == 0
    assert main(["convert", single, back]) == 0
    assert json.load(open(os.path.join(back, "model_index.json")))["_class_name"] == "DiTPipeline"
    assert _configs(back)["scheduler"] == _configs(folder)["scheduler"]

    def call(pipe):
        return pipe([3, 7], num_inference_steps=3, guidance_scale=2.0, generator=torch.Generator().manual_seed(1),
                    output_type="pt").images
    assert torch.equal(_images(back, call), _images(folder, call))


def test_quantized_folder_has_no_single_file_layout(tmp_path, capsys):
    q = str(tmp_path / "q")
    assert main(["quantize", "--method", "w8a8", "--out", q, "--calibration-images", "1",
                 "--calibration-steps", "2"]) == 0
    assert main(["convert", q, str(tmp_path / "q.safetensors")]) == 2
    assert "no single-file layout" in capsys.readouterr().err
