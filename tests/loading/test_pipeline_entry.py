"""velodiff.loading.load_pipeline_components, the one entry for whole pipelines: the device is checked before
anything is read, pickled folder weights follow the pickle rule, transformers' progress bar stays quiet."""
import os
import shutil

import pytest
import torch

import velodiff as vd
from velodiff.loading import BUILTIN_MODELS, CheckpointError, check_device, read_safetensors


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_clear_error_before_loading(monkeypatch):
    import velodiff.loading.pipeline as entry
    monkeypatch.setattr(entry, "resolve_model_path", lambda *a: (_ for _ in ()).throw(AssertionError("loaded")))
    with pytest.raises(ValueError, match=r"device='cuda': this torch is built without CUDA.*use device='cpu'"):
        vd.Pipeline.from_pretrained("digits", device="cuda")


def test_device_strings_are_checked():
    assert check_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match="device='gpu0' is not a device torch knows"):
        check_device("gpu0")


def _digits_latents(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(["a handwritten 4"], num_inference_steps=3, guidance_scale=3.0, output_type="latent",
                generator=torch.Generator().manual_seed(0)).images


def test_pickled_folder_weights_follow_the_pickle_rule(tmp_path):
    folder = str(tmp_path / "digits")
    shutil.copytree(BUILTIN_MODELS["digits"], folder)
    unet = os.path.join(folder, "unet")
    torch.save(read_safetensors(os.path.join(unet, "diffusion_pytorch_model.safetensors")),
               os.path.join(unet, "diffusion_pytorch_model.bin"))
    os.remove(os.path.join(unet, "diffusion_pytorch_model.safetensors"))
    with pytest.raises(CheckpointError, match=r"diffusion_pytorch_model\.bin.*pickled.*allow_pickle=True"):
        vd.Pipeline.from_pretrained(folder)
    pickled = vd.Pipeline.from_pretrained(folder, allow_pickle=True)
    assert torch.equal(_digits_latents(pickled), _digits_latents(vd.Pipeline.from_pretrained("digits")))


def test_loading_shows_no_transformers_progress_bar(capsys, tmp_path):
    """PixArt's T5 encoder is the text encoder that still loads through transformers (CLIP is velodiff's own)."""
    from fixtures import save_pipeline, tiny_pixart_pipeline
    from transformers.utils import logging as hf_logging
    folder = save_pipeline(tiny_pixart_pipeline(), str(tmp_path / "pixart"))
    before = hf_logging.is_progress_bar_enabled()
    capsys.readouterr()
    pipe = vd.Pipeline.from_pretrained(folder)
    assert type(pipe.text_encoder).__module__.startswith("transformers.")  # so the transformers load did run
    assert "Loading weights" not in capsys.readouterr().err
    assert hf_logging.is_progress_bar_enabled() == before  # the user's setting is put back
