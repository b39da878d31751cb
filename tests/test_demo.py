"""Tests for the synthetic demo dataset (tiny images, a few per class)."""

import collections
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from tfcovid.data import demo

SMALL = (40, 64)
EXT_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".bmp": "BMP"}


def _images(root):
    """Yields (split, class, path) for every image of a generated dataset."""
    for split in demo.SPLITS:
        for path in sorted((root / split).glob("*/*")):
            yield split, path.parent.name, path


def _gray(path):
    """An image file as a float array in [0, 1], whatever its mode."""
    im = Image.open(path)
    if im.mode == "I;16":
        return np.asarray(im, np.float64) / 65535
    return np.asarray(im.convert("L"), np.float64) / 255


def _lung_core(h, w):
    """Central parts of both lung fields, inside them for any anatomy jitter."""
    yy, xx = np.mgrid[0:h, 0:w]
    x, y = (xx + 0.5) / w * 2 - 1, (yy + 0.5) / h * 2 - 1
    return sum(((x - s * 0.42) / 0.14) ** 2 + ((y + 0.05) / 0.35) ** 2 <= 1 for s in (-1, 1)) > 0


@pytest.mark.parametrize("task", sorted(demo.DEMO_CLASSES))
def test_layout_counts_and_metadata(tmp_path, task):
    out = demo.make_demo_data(tmp_path / "d", task=task, per_class=5, image_size=SMALL)
    assert out == tmp_path / "d"
    classes = demo.DEMO_CLASSES[task]
    expected = {"train": 5, "validation": 2, "test": 2}
    for split, n in expected.items():
        assert sorted(p.name for p in (out / split).iterdir()) == sorted(classes)
        for label in classes:
            files = sorted((out / split / label).iterdir())
            assert [f.stem for f in files] == [f"{label}_{split}_{i:04d}" for i in range(n)]
    meta = json.loads((out / "demo.json").read_text())
    assert meta["task"] == task and meta["seed"] == 0 and meta["per_class"] == 5
    assert meta["counts"] == {s: {c: n for c in classes} for s, n in expected.items()}
    assert "synthetic, not medical data" in (out / "README.txt").read_text()


def test_default_counts_and_eval_split_size(tmp_path):
    out = demo.make_demo_data(tmp_path / "d", per_class=12, image_size=16)
    counts = json.loads((out / "demo.json").read_text())["counts"]
    assert counts["validation"] == {"infected": 3, "normal": 3}
    assert demo.DEFAULT_PER_CLASS == {"binary": 200, "multilabel": 160}


@pytest.mark.parametrize("task", sorted(demo.DEMO_CLASSES))
def test_masks_match_images(tmp_path, task):
    out = demo.make_demo_data(tmp_path / "d", task=task, per_class=4, image_size=SMALL)
    for split, label, path in _images(out):
        image = Image.open(path)
        mask = Image.open(out / "masks" / split / label / f"{path.stem}.png")
        assert mask.mode == "L" and mask.size == image.size
        m = np.asarray(mask)
        assert set(np.unique(m)) <= {0, 255}
        if label == "normal":
            assert not m.any(), path
        else:
            assert 0.002 < (m > 0).mean() < 0.5, path


def test_same_seed_same_bytes_other_seed_differs(tmp_path):
    def read_all(root):
        return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}

    def images_by_stem(files):
        return {(k.parent, k.stem): v for k, v in files.items() if k.parts[0] in demo.SPLITS}

    a = read_all(demo.make_demo_data(tmp_path / "a", per_class=3, seed=7, image_size=SMALL))
    b = read_all(demo.make_demo_data(tmp_path / "b", per_class=3, seed=7, image_size=SMALL))
    c = read_all(demo.make_demo_data(tmp_path / "c", per_class=3, seed=8, image_size=SMALL))
    assert a == b
    a_images, c_images = images_by_stem(a), images_by_stem(c)
    assert a_images.keys() == c_images.keys() and len(a_images) == 14
    assert all(a_images[k] != c_images[k] for k in a_images)


def test_modes_formats_and_sizes_vary_independently_of_class(tmp_path):
    out = demo.make_demo_data(tmp_path / "d", per_class=20, image_size=(24, 48))
    kinds = collections.defaultdict(set)
    sizes = set()
    for _, label, path in _images(out):
        with Image.open(path) as im:
            assert im.format == EXT_FORMAT[path.suffix], path
            kinds[label].add((im.mode, im.format))
            sizes.add(im.size)
            assert 24 <= im.height <= 48
            assert 0.8 <= im.width / im.height <= 1.2
    everything = set().union(*kinds.values())
    assert {"L", "RGB"} <= {m for m, _ in everything}
    assert {"PNG", "JPEG"} <= {f for _, f in everything}
    for label, seen in kinds.items():  # every class shows several encodings, not one each
        assert len({m for m, _ in seen}) >= 2 and len({f for _, f in seen}) >= 2, label
    assert len(sizes) > 10


def test_format_draw_does_not_depend_on_class():
    # Over many images, each class draws colour modes from the same distribution.
    freq = [collections.Counter(demo._draw_image(np.random.default_rng([0, 0, c, i]), SMALL)[2]
                                for i in range(400)) for c in range(2)]
    for mode in ("L", "RGB"):
        assert abs(freq[0][mode] - freq[1][mode]) < 60


@pytest.mark.parametrize("task", sorted(demo.DEMO_CLASSES))
def test_disease_makes_lungs_brighter(tmp_path, task):
    out = demo.make_demo_data(tmp_path / "d", task=task, per_class=6, image_size=(64, 80))
    lung_means = collections.defaultdict(list)
    for split, label, path in _images(out):
        img = _gray(path)
        lung_means[label].append(img[_lung_core(*img.shape)].mean())
        mask = np.asarray(Image.open(out / "masks" / split / label / f"{path.stem}.png")) > 0
        if label != "normal":  # the marked region is brighter than the rest of its image's lungs
            rest = _lung_core(*img.shape) & ~mask
            assert img[mask].mean() > img[rest].mean() + 0.05, path
    normal = np.mean(lung_means.pop("normal"))
    for label, means in lung_means.items():
        assert np.mean(means) > normal + 0.02, label


def test_disease_patterns_differ():
    """COVID-19 is bilateral and multifocal; pneumonia is one lesion in one lung."""
    for i in range(30):
        covid = demo._lesion_specs(np.random.default_rng(i), "multilabel", "covid-19")
        pneu = demo._lesion_specs(np.random.default_rng(i), "multilabel", "pneumonia")
        assert 3 <= len(covid) <= 6 and {s for s, *_ in covid} == {0, 1}
        assert len(pneu) == 1 and pneu[0][3] > max(r for *_, r, _, _ in covid)
        assert demo._lesion_specs(np.random.default_rng(i), "binary", "normal") == []


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="binary, multilabel"):
        demo.make_demo_data(tmp_path / "a", task="triple")
    with pytest.raises(ValueError, match="per_class"):
        demo.make_demo_data(tmp_path / "b", per_class=0)
    with pytest.raises(ValueError, match="per_class"):
        demo.make_demo_data(tmp_path / "c", per_class=2.5)
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="full"):
        demo.make_demo_data(full, per_class=1, image_size=SMALL)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert demo.make_demo_data(empty, per_class=1, image_size=SMALL) == empty


def test_ensure_demo_data_generates_once(tmp_path):
    lines = []
    path = demo.ensure_demo_data(per_class=3, seed=2, cache_dir=tmp_path, log=lines.append)
    assert path == tmp_path / "demo-binary-s2-n3"
    assert lines == [f"Generating the demo dataset (binary, 14 images) in {path} ..."]
    stamp = (path / "demo.json").stat().st_mtime_ns
    assert demo.ensure_demo_data(per_class=3, seed=2, cache_dir=tmp_path, log=lines.append) == path
    assert len(lines) == 1 and (path / "demo.json").stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp directory left


def test_interrupted_generation_leaves_nothing(tmp_path, monkeypatch):
    def broken(out, **kwargs):
        (pathlib.Path(out) / "train").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "make_demo_data", broken)
    with pytest.raises(KeyboardInterrupt):
        demo.ensure_demo_data(per_class=3, cache_dir=tmp_path, log=lambda _: None)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TFCOVID_HOME", str(tmp_path / "home"))
    assert demo.default_cache_dir() == tmp_path / "home"
    monkeypatch.delenv("TFCOVID_HOME")
    assert demo.default_cache_dir() == pathlib.Path("~/.cache/tfcovid").expanduser()
