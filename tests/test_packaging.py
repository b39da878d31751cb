"""Packaging: the wheel carries the study's configs, the package list is complete, pins live in
the constraints file that CI installs with."""

import configparser
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

ROOT = Path(__file__).resolve().parents[1]


def _setup_cfg():
    parser = configparser.ConfigParser()
    parser.read(ROOT / "setup.cfg")
    return parser


def test_setup_cfg_lists_every_package_and_the_configs():
    listed = _setup_cfg()["options"]["packages"].split()
    found = find_packages(str(ROOT), include=["tfcovid", "tfcovid.*"])
    assert sorted(listed) == sorted(found + ["tfcovid.configs"]), "add new packages to setup.cfg"


@pytest.mark.slow
def test_the_wheel_holds_the_configs_and_finds_them_installed(tmp_path):
    source = tmp_path / "src"  # a copy: the build writes build/ and *.egg-info beside its sources
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    for name in ("tfcovid", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                    "-w", str(tmp_path / "whl"), str(source)], check=True, timeout=300)
    wheel, = (tmp_path / "whl").glob("tfcovid-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    configs = sorted(p.relative_to(ROOT / "configs").as_posix() for p in (ROOT / "configs").rglob("*.yaml"))
    assert len(configs) >= 11 and {f"tfcovid/configs/{c}" for c in configs} <= names
    assert "tfcovid/cli/__main__.py" in names and "tfcovid/data/opencv/images.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names)

    # Installed, the package finds its own copy, by name, from a folder without configs/.
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(tmp_path / "site"), str(wheel)], check=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    code = "from tfcovid import config; print(config.find_config('part1/vgg16_first7'))"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "site" / "tfcovid" / "configs" / "part1" / "vgg16_first7.yaml")


def test_metadata_license_and_pins():
    cfg = _setup_cfg()
    assert cfg["metadata"]["license"] == "MIT" and "MIT License" in (ROOT / "LICENSE").read_text()
    assert "(VGG16, ResNet18, ResNet50)" in cfg["metadata"]["description"]
    requires = cfg["options"]["install_requires"]
    assert "keras>=3.13,<3.16" in requires
    test_extra = [line.strip() for line in cfg["options.extras_require"]["test"].splitlines()]
    # An exact torch pin in the extra pulled multi-GB CUDA wheels from the public index.
    assert "torch>=2.1" in test_extra and "import-linter>=2.0" in test_extra
    assert not any(line.startswith("torch==") for line in test_extra)
    pins = (ROOT / "constraints" / "ci.txt").read_text().splitlines()
    assert "torch==2.13.0" in pins
    ci = (ROOT / ".ci" / "run").read_text()
    assert 'pip install -q -e ".[test]" -c constraints/ci.txt' in ci
    assert ci.index("\nlint-imports\n") < ci.index("python -m pytest")
