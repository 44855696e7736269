"""Packaging for the Comfy Registry / ComfyUI-Manager: metadata present, torch never required, one version."""

import re
import tomllib
from pathlib import Path

import histream_core

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def requirement_names(lines):
    return {re.split(r"[<>=!~ \[;]", line.strip(), maxsplit=1)[0].lower() for line in lines
            if line.strip() and not line.lstrip().startswith("#")}


def test_torch_is_never_a_requirement():
    """ComfyUI brings its own torch; a pack that asks for one can pull a multi-GB CUDA build over it."""
    assert not {"torch", "torchvision", "torchaudio"} & requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    assert not {"torch", "torchvision", "torchaudio"} & requirement_names(PYPROJECT["project"]["dependencies"])
    assert requirement_names((ROOT / "requirements.txt").read_text().splitlines()) == \
        requirement_names(PYPROJECT["project"]["dependencies"])


def test_registry_metadata():
    project, comfy = PYPROJECT["project"], PYPROJECT["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"]) and project["version"] == histream_core.__version__
    assert (ROOT / project["license"]["file"]).is_file() and project["urls"]["Repository"]
    assert comfy["PublisherId"] and comfy["DisplayName"] and (ROOT / comfy["Icon"]).is_file()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    command = next(line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
                   if line.startswith("python3 -m venv"))
    assert command in readme and "torch==2.13.0" in command
