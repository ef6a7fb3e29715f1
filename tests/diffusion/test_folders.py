"""Model and input folders: layouts (ours, ComfyUI's, A1111's), configuration, listing and safe lookup."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodegraph_diffusion.nodes import folders


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch) -> Path:
    """Run in an empty working directory with no environment or user configuration."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config-home"))
    for name in (folders.MODELS_ENV, folders.INPUTS_ENV, folders.CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)
    return work


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_default_folder_lists_model_files_recursively_sorted_and_filtered(isolated):
    root = isolated / "models" / "checkpoints"
    for name in ("b.safetensors", "a.ckpt", "sub/deep/c.pt", "d.pth", "e.bin", "Upper.SAFETENSORS"):
        touch(root / name)
    touch(root / "notes.txt")
    touch(root / ".hidden.safetensors")
    touch(root / ".cache" / "f.safetensors")
    assert folders.list_files("checkpoints") == [
        "Upper.SAFETENSORS", "a.ckpt", "b.safetensors", "d.pth", "e.bin", "sub/deep/c.pt"]
    assert folders.resolve("checkpoints", "sub/deep/c.pt") == Path("models/checkpoints/sub/deep/c.pt")
    assert folders.list_files("loras") == []


def test_a1111_layout_through_the_environment(isolated, tmp_path, monkeypatch):
    webui = tmp_path / "webui"
    touch(webui / "models" / "Stable-diffusion" / "v1-5.safetensors")
    touch(webui / "models" / "Lora" / "style.safetensors")
    touch(webui / "models" / "ControlNet" / "canny.pth")
    touch(webui / "models" / "VAE" / "ft-mse.ckpt")
    touch(webui / "embeddings" / "bad-hands.pt")
    monkeypatch.setenv(folders.MODELS_ENV, str(webui / "models"))
    assert folders.list_files("checkpoints") == ["v1-5.safetensors"]
    assert folders.list_files("loras") == ["style.safetensors"]
    assert folders.list_files("controlnet") == ["canny.pth"]
    assert folders.list_files("vae") == ["ft-mse.ckpt"]
    assert folders.list_files("embeddings") == ["bad-hands.pt"]
    assert folders.resolve("embeddings", "bad-hands.pt").resolve() == (webui / "embeddings" / "bad-hands.pt").resolve()
    assert [f.resolve() for f in folders.search_folders("embeddings")] == [(webui / "embeddings").resolve()]


def test_comfyui_layout_from_the_working_directory_config_with_relative_paths(isolated, tmp_path):
    comfy = tmp_path / "ComfyUI" / "models"
    touch(comfy / "checkpoints" / "sdxl" / "base.safetensors")
    touch(comfy / "loras" / "detail.safetensors")
    touch(isolated / "more-loras" / "extra.safetensors")
    (isolated / "nodegraph.toml").write_text(
        '[models]\nroots = ["../ComfyUI/models"]\n[models.folders]\nloras = "more-loras"\n'
        '[inputs]\ndir = "pictures"\n')
    assert folders.list_files("checkpoints") == ["sdxl/base.safetensors"]
    assert folders.list_files("loras") == ["detail.safetensors", "extra.safetensors"]
    extra = folders.resolve("loras", "extra.safetensors")
    assert extra.resolve() == (isolated / "more-loras" / "extra.safetensors").resolve()
    assert folders.inputs_dir().resolve() == (isolated / "pictures").resolve()


def test_user_config_file_is_used_when_the_working_directory_has_none(tmp_path):
    touch(tmp_path / "shared-models" / "vae" / "kl.safetensors")
    config = tmp_path / "config-home" / "nodegraph" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text(f'[models]\nroots = ["{(tmp_path / "shared-models").as_posix()}"]\n')
    assert folders.config_path() == config
    assert folders.list_files("vae") == ["kl.safetensors"]


def test_earlier_roots_win_and_names_are_listed_once(isolated, tmp_path, monkeypatch):
    first = touch(tmp_path / "first" / "loras" / "same.safetensors", b"first")
    touch(isolated / "models" / "loras" / "same.safetensors", b"local")
    touch(isolated / "models" / "loras" / "only-local.safetensors")
    monkeypatch.setenv(folders.MODELS_ENV, str(tmp_path / "first"))
    assert folders.list_files("loras") == ["only-local.safetensors", "same.safetensors"]
    assert folders.resolve("loras", "same.safetensors").read_bytes() == first.read_bytes() == b"first"


def test_diffusers_pipeline_folder_is_one_checkpoint(isolated):
    pipeline = isolated / "models" / "checkpoints" / "tiny-pipe"
    touch(pipeline / "model_index.json", b"{}")
    touch(pipeline / "unet" / "diffusion_pytorch_model.safetensors")
    touch(isolated / "models" / "checkpoints" / "single.safetensors")
    assert folders.list_files("checkpoints") == ["single.safetensors", "tiny-pipe"]
    assert folders.resolve("checkpoints", "tiny-pipe") == Path("models/checkpoints/tiny-pipe")


@pytest.mark.parametrize("name", ["../secret.safetensors", "a/../../secret.safetensors", "/etc/passwd",
                                  "..\\secret.safetensors", "C:\\models\\x.safetensors", ""])
def test_names_that_leave_the_folder_are_refused(isolated, name):
    touch(isolated / "models" / "loras" / "ok.safetensors")
    touch(isolated / "models" / "secret.safetensors")
    with pytest.raises(folders.ModelFolderError, match="refused|invalid"):
        folders.resolve("loras", name)
    with pytest.raises(folders.ModelFolderError, match="refused|invalid"):
        folders.resolve_input(name)


def test_missing_file_error_names_the_kind_and_the_folders_searched(isolated, tmp_path, monkeypatch):
    touch(tmp_path / "elsewhere" / "controlnet" / "a.pth")
    touch(isolated / "models" / "controlnet" / "b.pth")
    monkeypatch.setenv(folders.MODELS_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(folders.ModelFolderError) as caught:
        folders.resolve("controlnet", "c.pth")
    message = str(caught.value)
    assert "controlnet" in message and "'c.pth'" in message
    assert str((tmp_path / "elsewhere" / "controlnet").absolute()) in message
    assert str((isolated / "models" / "controlnet").absolute()) in message


def test_no_folder_at_all_says_how_to_configure(isolated):
    with pytest.raises(folders.ModelFolderError, match="no vae folder exists.*NODEGRAPH_MODELS"):
        folders.resolve("vae", "x.safetensors")


def test_unknown_kind_is_an_error():
    with pytest.raises(folders.ModelFolderError, match="unknown model kind 'upscalers'"):
        folders.list_files("upscalers")


@pytest.mark.parametrize("text, match", [
    ("[models\n", "cannot read"),
    ('[models]\nroot = ["x"]\n', "unknown key"),
    ("[models]\nroots = [1]\n", "models.roots"),
    ('[models.folders]\nupscalers = "x"\n', "models.folders.upscalers: unknown kind"),
    ('[outputs]\ndir = "x"\n', "unknown section"),
])
def test_malformed_config_names_the_file_and_key(isolated, text, match):
    (isolated / "nodegraph.toml").write_text(text)
    with pytest.raises(folders.FolderConfigError, match=match) as caught:
        folders.list_files("checkpoints")
    assert "nodegraph.toml" in str(caught.value)


def test_inputs_folder_from_the_environment_lists_images_only(isolated, tmp_path, monkeypatch):
    assert folders.inputs_dir() == Path("inputs") and folders.list_inputs() == []
    pictures = tmp_path / "pictures"
    for name in ("b.png", "a.JPG", "sub/c.webp", "notes.txt", ".hidden.png"):
        touch(pictures / name)
    monkeypatch.setenv(folders.INPUTS_ENV, str(pictures))
    assert folders.list_inputs() == ["a.JPG", "b.png", "sub/c.webp"]
    assert folders.resolve_input("sub/c.webp") == pictures / "sub" / "c.webp"
    with pytest.raises(folders.ModelFolderError, match=f"no input file 'd.png' in {pictures}"):
        folders.resolve_input("d.png")
