"""The container image: its lock agrees with pyproject.toml, the lock check catches what it must, and
(slow) ``tools/build_image.py`` builds the image with buildah and passes its smoke test inside it."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "deploy" / "image" / "requirements.lock"


def _check_lock():
    spec = importlib.util.spec_from_file_location("check_lock", REPO / "deploy" / "image" / "check_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_lock_pins_what_pyproject_asks_for() -> None:
    check = _check_lock()
    pins = check.read_lock(LOCK)
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    build = tomllib.loads((REPO / "pyproject.toml").read_text())["build-system"]["requires"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["k8s"], *build]
    for text in wanted:
        requirement = Requirement(text)
        name = check.canonical(requirement.name)
        assert name in pins, f"{text}: not in {LOCK.name} (make image-lock)"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{text}: the lock pins {pins[name]}"
        )
    # torch from PyPI carries its CUDA libraries: the GPU image gets them at the lock's versions
    assert any(name.startswith("nvidia-") for name in pins) and "triton" in pins


def test_the_lock_check_catches_unlocked_and_other_versions(tmp_path: Path) -> None:
    check = _check_lock()
    installed = {check.canonical(d.metadata["Name"]): d.version for d in metadata.distributions()}
    pins = {name: version.split("+")[0] for name, version in installed.items()}
    assert check.mismatches(pins) == []  # this interpreter's own set, locked, passes
    wrong = {**pins, "pyyaml": "0.0.1"}
    del wrong["tqdm"]
    assert check.mismatches(wrong) == [
        f"pyyaml=={installed['pyyaml']} is installed; the lock pins 0.0.1",
        f"tqdm=={installed['tqdm']} is installed but not in the lock",
    ]
    bad = tmp_path / "bad.lock"
    bad.write_text("pyyaml>=6\n")
    with pytest.raises(ValueError, match=r"bad\.lock:1: not a 'name==version' pin"):
        check.read_lock(bad)


@pytest.mark.slow
def test_build_image_builds_and_smoke_tests_the_image(tmp_path: Path) -> None:
    if shutil.which("buildah") is None or os.geteuid() != 0:
        pytest.skip("needs buildah and root (apt-get install -y buildah debootstrap)")
    tag = f"localhost/vitadapter:test-{os.getpid()}"
    wheels = ["--wheels", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []
    try:
        built = subprocess.run(
            [
                sys.executable,
                str(REPO / "tools" / "build_image.py"),
                "--tag",
                tag,
                "--work",
                str(tmp_path),
                *wheels,
            ],
            capture_output=True,
            text=True,
            timeout=3600,
        )
        assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-6000:]
        report = json.loads((tmp_path / "image-report.json").read_text())
        assert report["image"] == tag and report["size_bytes"] > 0 and report["smoke_seconds"] is not None
        (smoke,) = tmp_path.glob("smoke-*")
        assert (smoke / "smoke" / "run" / "iter_0000002.pth").is_file()
        assert not list(
            (REPO / "deploy" / "image" / "build-extras").glob("*.whl")
        )  # the staged wheels are gone
    finally:
        subprocess.run(["buildah", "rmi", tag], capture_output=True)
