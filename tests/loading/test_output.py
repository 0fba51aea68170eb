"""velodiff.loading.output: an existing destination is refused unless force, force never deletes a file the command
did not write, an interrupted write leaves the old model intact, and files get the umask's modes (not 0600)."""
import os
import stat

import pytest

from velodiff.loading.output import DestinationExistsError, output_file, output_folder


@pytest.fixture
def umask_027():
    """A umask that differs from the usual 022, so the test sees that the umask (not a fixed mode) is used."""
    old = os.umask(0o027)
    yield 0o027
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _tree(root):
    out = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, root)] = open(path).read()
    return out


def _old_model(root):
    _write(root, "model_index.json", "old index")
    _write(root, "unet/config.json", "old config")
    _write(root, "unet/diffusion_pytorch_model.safetensors", "old weights")
    _write(root, "notes.txt", "the user's notes")
    _write(root, "extra/mine.bin", "the user's file")


def _new_model(tmp):
    _write(tmp, "model_index.json", "new index")
    _write(tmp, "unet/config.json", "new config")
    _write(tmp, "unet/diffusion_pytorch_model.safetensors", "new weights")
    _write(tmp, "vae/config.json", "new vae")


def _no_leftovers(parent):
    assert not [n for n in os.listdir(parent) if ".velodiff-" in n], os.listdir(parent)


def test_new_folder_gets_umask_modes(tmp_path, umask_027):
    dst = str(tmp_path / "model")
    with output_folder(dst) as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)  # written beside the destination (same file system)
        _new_model(tmp)
    assert _tree(dst)["unet/config.json"] == "new config"
    assert _mode(dst) == _mode(os.path.join(dst, "unet")) == 0o750
    assert _mode(os.path.join(dst, "unet", "diffusion_pytorch_model.safetensors")) == 0o640
    _no_leftovers(tmp_path)


def test_existing_folder_is_refused_without_force(tmp_path):
    dst = str(tmp_path / "model")
    _old_model(dst)
    before = _tree(dst)
    with pytest.raises(DestinationExistsError, match="exists; nothing was written.*force=True"):
        with output_folder(dst):
            raise AssertionError("never reached: refused before any work")
    assert _tree(dst) == before
    _no_leftovers(tmp_path)


def test_empty_folder_counts_as_absent(tmp_path):
    dst = tmp_path / "model"
    dst.mkdir()
    with output_folder(str(dst)) as tmp:
        _new_model(tmp)
    assert _tree(str(dst))["model_index.json"] == "new index"


def test_force_replaces_what_it_writes_and_keeps_every_other_file(tmp_path):
    dst = str(tmp_path / "model")
    _old_model(dst)
    with output_folder(dst, force=True) as tmp:
        _new_model(tmp)
    assert _tree(dst) == {"model_index.json": "new index", "unet/config.json": "new config",
                          "unet/diffusion_pytorch_model.safetensors": "new weights", "vae/config.json": "new vae",
                          "notes.txt": "the user's notes", "extra/mine.bin": "the user's file"}
    _no_leftovers(tmp_path)


@pytest.mark.parametrize("error", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_interrupted_write_leaves_the_old_model_intact(tmp_path, error):
    dst = str(tmp_path / "model")
    _old_model(dst)
    before = _tree(dst)
    with pytest.raises(type(error)):
        with output_folder(dst, force=True) as tmp:
            _write(tmp, "unet/config.json", "half-written")
            raise error
    assert _tree(dst) == before
    _no_leftovers(tmp_path)


def test_a_stale_weights_file_that_would_be_read_with_the_new_model_is_refused(tmp_path):
    """With force, a file this did not write stays; if a loader would read it beside the new weights (here an old
    quantized denoiser in unet/), nothing is replaced and the error names it."""
    dst = str(tmp_path / "model")
    _old_model(dst)
    _write(dst, "unet/velodiff_quantized.safetensors", "old quantized weights")
    before = _tree(dst)
    with pytest.raises(FileExistsError, match=r"unet/velodiff_quantized\.safetensors.*nothing was replaced"):
        with output_folder(dst, force=True) as tmp:
            _new_model(tmp)
    assert _tree(dst) == before
    _no_leftovers(tmp_path)


def test_a_file_is_never_replaced_by_a_folder_or_the_reverse(tmp_path):
    a_file, a_folder = tmp_path / "f", tmp_path / "d"
    a_file.write_text("x")
    (a_folder / "sub").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="is a file"):
        with output_folder(str(a_file), force=True):
            pass
    with pytest.raises(FileExistsError, match="is a folder"):
        with output_file(str(a_folder), force=True):
            pass
    assert a_file.read_text() == "x" and (a_folder / "sub").is_dir()


def test_output_file(tmp_path, umask_027):
    dst = str(tmp_path / "model.safetensors")
    with output_file(dst) as tmp:
        assert tmp.endswith(".safetensors") and os.path.dirname(tmp) == str(tmp_path)
        open(tmp, "w").write("new")
    assert open(dst).read() == "new" and _mode(dst) == 0o640
    with pytest.raises(DestinationExistsError):
        with output_file(dst):
            pass
    with pytest.raises(KeyboardInterrupt):
        with output_file(dst, force=True) as tmp:
            open(tmp, "w").write("half")
            raise KeyboardInterrupt
    assert open(dst).read() == "new"
    with output_file(dst, force=True) as tmp:
        open(tmp, "w").write("newer")
    assert open(dst).read() == "newer"
    _no_leftovers(tmp_path)
