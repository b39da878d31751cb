"""scripts/reproduce_tables.sh: argument errors, and the --smoke run of every config."""

import os
import subprocess
from fnmatch import fnmatch
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "reproduce_tables.sh"


def _run(*args, timeout=900):
    # The script calls `tfcovid`; put this interpreter's scripts folder first on PATH.
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.parametrize("args, message", [
    ([], "give DATA1 and DATA2"),
    (["/no/such/data1", "/no/such/data2"], "data folder not found: /no/such/data1"),
    (["--smoke", "/data"], "--smoke uses the generated demo data"),
    (["--frobnicate"], "unknown option --frobnicate"),
])
def test_argument_errors(args, message):
    result = _run(*args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_only_that_matches_nothing(tmp_path):
    result = _run("--smoke", "--only", "nomatch*", "--out", str(tmp_path))
    assert result.returncode == 2 and "no config matched --only 'nomatch*'" in result.stderr
    result = _run("--smoke", "--jobs", "0", "--out", str(tmp_path))
    assert result.returncode == 2 and "--jobs needs a number" in result.stderr


def test_help():
    result = _run("--help")
    assert result.returncode == 0 and "--smoke" in result.stdout and "DATA1" in result.stdout


def _check_smoke(out: Path, pattern: str = "*") -> str:
    configs = {p: sorted(q.stem for q in (ROOT / "configs" / p).glob("*.yaml") if fnmatch(q.stem, pattern))
               for p in ("part1", "part2")}
    for part, names in configs.items():
        runs = sorted(r for r in (out / part).iterdir() if r.name != "earlier-run")
        assert len(runs) == len(names)
        assert all((run / "metrics.json").is_file() for run in runs)
        assert sorted(run.name.split(f"{part}-")[-1] for run in runs) == names
    tables = (out / "tables.md").read_text()
    part1 = tables.split("## Part 1", 1)[1].split("like-for-like", 1)[0]
    part2 = tables.split("## Part 2", 1)[1]
    assert sum(line.startswith(("| VGG16 |", "| ResNet18 |")) for line in part1.splitlines()) == len(configs["part1"])
    assert sum(line.startswith(("| VGG16 |", "| ResNet18 |")) for line in part2.splitlines()) == len(configs["part2"])
    return tables


@pytest.mark.slow
def test_smoke_runs_both_backbones_of_both_parts(tmp_path):
    # Four tiny fits (32 px, 1 epoch, 2 images per class): VGG16 and ResNet18, Part 1 and Part 2.
    (tmp_path / "out" / "part1" / "earlier-run").mkdir(parents=True)  # from an earlier invocation
    result = _run("--smoke", "--only", "*_f[ou]*", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"note: tables.md leaves out the 1 earlier run(s) already in {tmp_path / 'out'}" in result.stdout
    tables = _check_smoke(tmp_path / "out", "*_f[ou]*")
    assert "earlier-run" not in tables
    assert "| ResNet18 | focal | 1 |" in tables and "| VGG16 | none | 1 |" in tables


@pytest.mark.soak
def test_smoke_runs_every_config_and_writes_both_tables(tmp_path):
    # All ten configs (about 2 minutes on 2 CPU cores): python -m pytest -m soak
    result = _run("--smoke", "--out", str(tmp_path / "out"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(list((ROOT / "configs").glob("part*/*.yaml"))) == 10
    tables = _check_smoke(tmp_path / "out")
    assert "| ResNet18 | focal | 1 |" in tables and "| VGG16 | first 4 conv | 1 |" in tables
