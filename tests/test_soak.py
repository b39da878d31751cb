"""Soak: many short fits in a row with random valid configs leave nothing behind.

Checked after the fits: no child process still alive, no file written outside the run
directories (data folders, the working folder, TFCOVID_HOME and the temporary folder are
compared before and after), every run directory complete, and resident memory grown by less
than SOAK_MEMORY_BOUND_MB: the median over the last five fits against the median over the
five after the warm-up. (Measured on 2 CPU cores: flat at 1.0-1.35 GB over 20 fits; before
runtime.forget_traced_gradients it grew by ~100 MB per fit.)

`TFCOVID_SOAK_FITS` sets the number of fits (default 20; the bound is for that default).
About 5 minutes on 2 CPU cores, so it is left out of the default run:
``python -m pytest -m soak``.
"""

import gc
import os
import random
import shutil
import statistics
import tempfile
from pathlib import Path

import pytest
from test_bounds import _gif, _zeros_png

from tfcovid import config
from tfcovid.training import train

SOAK_FITS = int(os.environ.get("TFCOVID_SOAK_FITS", "20"))
WARM_UP = 3  # the first fits build TensorFlow's and Keras's one-time state
SOAK_MEMORY_BOUND_MB = 250


def _files(root: Path, skip: Path | None = None) -> set:
    out = set()
    for path in root.rglob("*"):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        if path.name.startswith("__autograph_generated_file"):
            continue  # TensorFlow's AutoGraph source for traced functions; it removes them at exit
        out.add(str(path.relative_to(root)))
    return out


def _children() -> set:
    pid = os.getpid()
    kids = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        kids |= set((task / "children").read_text().split())
    return {k for k in kids if Path(f"/proc/{k}").exists()}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _random_config(rng: random.Random, trees: dict, out: Path) -> dict:
    task = rng.choice(["binary", "binary", "multilabel"])
    backbone, freeze, size = rng.choice([("resnet18", "all", 16), ("resnet18", "none", 16),
                                         ("resnet18", "first5", 32), ("vgg16", "all", 32),
                                         ("vgg16", "first7", 32)])
    dirty = rng.random() < 0.5  # the tree with an unusable file, left out with skip_bad
    train_cfg = {"epochs": rng.choice([1, 2]), "batch_size": rng.choice([2, 4, 8]),
                 "optimizer": rng.choice(["sgd", "adam"]), "lr": rng.choice([1e-4, 1e-3]),
                 "seed": rng.randrange(1000), "deterministic": rng.random() < 0.3,
                 "steps_per_execution": rng.choice([1, 2])}
    if task == "multilabel":
        train_cfg["loss"] = rng.choice(["bce", "focal"])
    return {"out": str(out),
            "data": {"dir": str(trees[task, dirty]), "task": task, "image_size": size,
                     "cache": rng.choice(["memory", "disk", "none"]), "skip_bad": dirty},
            "augment": {"rotation": rng.choice([0.0, 10.0, 30.0])},
            "model": {"backbone": backbone, "freeze": freeze, "weights": "none"},
            "train": train_cfg}


@pytest.mark.soak
def test_many_fits_in_a_row_leak_no_processes_files_or_memory(binary_tree, multilabel_tree, tmp_path,
                                                              monkeypatch):
    trees = {}
    for task, tree in (("binary", binary_tree), ("multilabel", multilabel_tree)):
        trees[task, False] = tree
        dirty = tmp_path / "data" / task
        shutil.copytree(tree, dirty, ignore=shutil.ignore_patterns("masks"))
        first_class = sorted(p for p in (dirty / "train").iterdir() if p.is_dir())[0]
        # Left out, every config here skipping bad files: an empty file, decompression bombs
        # (a GIF frame past its canvas, a 20000 x 20000 16-bit RGBA PNG), a name that is not
        # UTF-8; a good image whose name holds a newline is trained on.
        (first_class / "broken.jpg").write_bytes(b"")
        (first_class / "frame.gif").write_bytes(_gif((16, 16), [(1, 1)], descriptor=(30000, 30000)))
        (first_class / "rgba16.png").write_bytes(_zeros_png(20000, 20000, depth=16, rows=10))
        good = sorted(first_class.glob("*.png"))[0]
        shutil.copy(good, first_class / os.fsdecode(b"bad\xff\xfe.png"))
        shutil.copy(good, first_class / "new\nline.png")
        trees[task, True] = dirty
    work, tmp, out = tmp_path / "work", tmp_path / "tmp", tmp_path / "runs"
    for folder in (work, tmp):
        folder.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    home = Path(os.environ["TFCOVID_HOME"])
    watched = [tmp_path, home, Path(binary_tree), Path(multilabel_tree)]
    before = {str(root): _files(root, skip=out) for root in watched}
    children = _children()

    rng = random.Random(20261126)
    rss = []
    for i in range(SOAK_FITS):
        tree = _random_config(rng, trees, out)
        run = train.fit(config.from_dict(tree), log=lambda s: None)
        assert (run / "metrics.json").is_file() and (run / "checkpoints" / "last.keras").is_file(), tree
        assert (run / "skipped.txt").is_file() == tree["data"]["skip_bad"], tree
        if tree["data"]["skip_bad"]:
            left_out = [line.split("\t")[0].rsplit("/", 1)[-1]
                        for line in (run / "skipped.txt").read_text().splitlines()[1:]]
            assert sorted(left_out) == ["bad\\xff\\xfe.png", "broken.jpg", "frame.gif", "rgba16.png"], left_out
        gc.collect()
        rss.append(_rss_mb())

    assert _children() <= children, "a fit left a child process running"
    after = {str(root): _files(root, skip=out) for root in watched}
    changed = {root: sorted(after[root] ^ before[root]) for root in before if after[root] != before[root]}
    assert not changed, f"files written or removed outside the run directories: {changed}"
    assert all(p.is_dir() for p in out.iterdir()) and len(list(out.iterdir())) == SOAK_FITS
    assert not list(out.glob("*/cache/*"))  # disk caches are removed after each fit
    # RSS swings by ~300 MB with the size of the last model; compare medians of five fits.
    early, late = rss[WARM_UP:WARM_UP + 5] or rss, rss[-5:]
    growth = statistics.median(late) - statistics.median(early)
    print(f"soak: {SOAK_FITS} fits, RSS after each (MB): {[round(r) for r in rss]}; growth {growth:.0f} MB")
    assert growth < SOAK_MEMORY_BOUND_MB, f"memory grew {growth:.0f} MB over {SOAK_FITS} fits: {rss}"
