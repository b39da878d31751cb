"""Bad and unusual files: found before training, reported in one list or left out, never misread."""

import io
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfcovid import config
from tfcovid.data import datasets, decode, folders as data_folders, checks, headers, prepare as data_prepare
from tfcovid.inference import evaluate
from tfcovid.data.types import DataError

RNG = np.random.default_rng(0)


def _save(path, image, fmt=None, **kw):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kw)
    return path


def _gray(size=(12, 16), seed=0):
    return Image.fromarray((np.random.default_rng(seed).random(size) * 255).astype(np.uint8))


def _smooth_rgb(h=16, w=16):
    """A smooth colour image: JPEG keeps it within a few levels."""
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([40 + 10 * xx, 200 - 8 * yy, 90 + 4 * (xx + yy)], -1).astype(np.uint8)


def _tree(root, n=3):
    """train/val with classes a, b: n distinct grayscale PNGs each (pixel value encodes class)."""
    for split in ("train", "val"):
        for c, value in (("a", 60), ("b", 190)):
            for i in range(n):
                _save(root / split / c / f"{i}.png", Image.new("L", (12, 10), value + i))
    return root


def _truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.fromarray(_smooth_rgb(64, 64)).save(buffer, "JPEG")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def _bad_by_name(bad):
    return {Path(b.path).name: b.reason for b in bad}


def _quiet(*_):
    pass


# ------------------------------------------------------------------------------ scan: structure


def test_scan_collects_every_structural_problem_and_strict_raises_one_list(tmp_path):
    root = _tree(tmp_path)
    (root / "train" / "a" / "empty.png").write_bytes(b"")
    (root / "train" / "a" / "text.jpg").write_text("hello, not a picture\n")
    (root / "val" / "b" / "notes.txt").write_text("x")
    (root / "val" / "b" / "scan.webp").write_bytes(b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 128)  # TIFF is read now
    _save(root / "train" / "loose.png", _gray())  # next to the class folders
    os.symlink(root / "nowhere.png", root / "train" / "b" / "link.png")

    with pytest.raises(DataError) as raised:
        data_folders.scan(root)
    message = str(raised.value)
    assert message.startswith(f"6 files under {root} cannot be used:")
    for line in ("train/a/empty.png: empty file (0 bytes)",
                 "train/a/text.jpg: has a .jpg name but is not a JPEG/PNG/BMP/GIF image (it is text)",
                 "val/b/notes.txt: not an image file: tfcovid reads .jpg, .jpeg, .png, .bmp, .gif, .dcm, .dicom, "
                 ".tif, .tiff files",
                 "val/b/scan.webp: not an image file (convert it to PNG)",
                 f"train/loose.png: {checks.OUTSIDE_CLASS}",
                 "train/b/link.png: broken link to"):
        assert line in message, line
    assert message.endswith("Fix or remove these files.")

    m = data_folders.scan(root, strict=False)
    assert {Path(b.path).name: b.split for b in m.bad} == {
        "empty.png": "train", "text.jpg": "train", "loose.png": "train", "link.png": "train",
        "notes.txt": "validation", "scan.webp": "validation"}
    # None of them is in a split, and every label is still its own folder's.
    assert len(m.splits["train"]) == 6 and len(m.splits["validation"]) == 6
    for split in m.splits.values():
        assert [m.class_names[i] for i in split.labels] == [Path(p).parent.name for p in split.paths]


def test_system_and_hidden_files_are_ignored_and_counted(tmp_path):
    root = _tree(tmp_path)
    for name in (".DS_Store", "Thumbs.db", "desktop.ini", "._0.png", ".hidden.png"):
        (root / "train" / "a" / name).write_bytes(b"\0\1junk")
    (root / "train" / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    (root / "val" / ".DS_Store").write_bytes(b"junk")
    m = data_folders.scan(root)  # strict: none of these is a problem
    assert m.class_names == ("a", "b") and m.bad == ()
    assert len(m.splits["train"]) == 6
    assert m.problems == ("ignored 7 system or hidden file(s) and folder(s) "
                          "(.DS_Store, Thumbs.db, desktop.ini, names starting with '.')",)


def test_unlabeled_split_still_works_and_its_bad_files_are_listed(tmp_path):
    root = _tree(tmp_path)
    _save(root / "test" / "x.png", _gray())
    (root / "test" / "Thumbs.db").write_bytes(b"junk")
    assert data_folders.scan(root).splits["test"].paths == (str(root / "test" / "x.png"),)
    (root / "test" / "y.jpg").write_bytes(b"")
    m = data_folders.scan(root, strict=False)
    assert m.splits["test"].labels is None and len(m.splits["test"]) == 1
    assert [(Path(b.path).name, b.split) for b in m.bad] == [("y.jpg", "test")]


def test_class_folder_with_only_bad_files_is_reported_as_those_files(tmp_path):
    root = _tree(tmp_path)
    for p in (root / "val" / "b").iterdir():
        p.unlink()
    (root / "val" / "b" / "broken.png").write_text("oops")
    with pytest.raises(DataError, match=r"val/b/broken.png: has a .png name"):
        data_folders.scan(root)
    m = data_folders.scan(root, strict=False)  # fit decides: list it, or (skip_bad) name the empty folder
    assert m.splits["validation"].folders == ("a",) * 3


# ------------------------------------------------------------------------ formats: content check


def test_unreadable_files_give_the_os_reason(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    locked = root / "train" / "a" / "0.png"
    real_read = headers.read_bytes

    def read(path, limit=-1):
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_read(path, limit)

    monkeypatch.setattr(headers, "read_bytes", read)
    m = data_folders.scan(root, strict=False)
    assert _bad_by_name(m.bad) == {"0.png": "cannot be read (Permission denied); give read "
                                             "permission (chmod a+r) or remove it"}
    assert str(locked) not in m.splits["train"].paths
    # A file that becomes unreadable after the scan is caught by the content check too.
    assert checks.check_file(locked, 10**6).startswith("cannot be read (Permission denied)")


def test_chmod_000_file(tmp_path):
    root = _tree(tmp_path)
    locked = root / "train" / "b" / "1.png"
    locked.chmod(0)
    try:
        m = data_folders.scan(root, strict=False)
        if os.geteuid() == 0:  # root reads it anyway, so it is a usable image
            assert m.bad == () and str(locked) in m.splits["train"].paths
        else:
            assert _bad_by_name(m.bad)["1.png"].startswith("cannot be read (Permission denied)")
    finally:
        locked.chmod(0o644)


def test_broken_files_are_caught_by_the_content_check(tmp_path):
    root = _tree(tmp_path)
    _truncated_jpeg(root / "train" / "a" / "cut.jpg")
    png = io.BytesIO()
    _gray((40, 40)).save(png, "PNG")
    (root / "train" / "b" / "cut.png").write_bytes(png.getvalue()[:60])
    (root / "val" / "a" / "fake.gif").write_bytes(b"GIF89a" + b"\0" * 20)
    m = data_folders.scan(root, strict=False)
    assert m.bad == ()  # their signatures are right: only decoding finds them
    bad = checks.check(m, 10**6, log=_quiet)
    reasons = _bad_by_name(bad)
    assert set(reasons) == {"cut.jpg", "cut.png", "fake.gif"}
    assert reasons["cut.jpg"].startswith("cannot be decoded as JPEG, truncated or corrupt (")
    assert reasons["cut.png"].startswith("cannot be decoded as PNG, truncated or corrupt (")
    for reason in reasons.values():  # one line, no TensorFlow internals
        assert "\n" not in reason and "function_node" not in reason and "[Op:" not in reason
    assert [b.split for b in bad] == ["train", "train", "validation"]


def test_check_result_does_not_depend_on_threads(tmp_path):
    root = _tree(tmp_path)
    _truncated_jpeg(root / "train" / "a" / "cut.jpg")
    m = data_folders.scan(root, strict=False)
    lines = []
    one = checks.check(m, 10**6, log=lines.append, threads=1)
    assert checks.check(m, 10**6, log=_quiet, threads=4) == one and len(one) == 1
    assert len(lines) == 1
    assert lines[0].startswith("Checked 13 files in ") and lines[0].endswith(": 12 usable, 1 unusable")


def test_very_large_image_is_checked_from_its_header(tmp_path, monkeypatch):
    big = _save(tmp_path / "big.png", Image.new("L", (8000, 8000), 77))  # compresses to ~60 kB
    assert big.stat().st_size < 200_000
    assert checks.check_file(big, config.DataConfig().max_pixels) is None  # full decode works
    decoded = []
    monkeypatch.setattr(checks, "_decode", lambda data, kind: decoded.append(kind))
    assert checks.check_file(big, 1_000_000) == (
        "8000×8000 = 64,000,000 pixels: larger than the limit of 1,000,000 pixels "
        "(data.max_pixels); downscale it or raise data.max_pixels")
    assert decoded == []  # refused before any decode
    # A tiny file whose header claims 40000 x 40000 (a decompression bomb) never reaches a decode.
    small = io.BytesIO()
    Image.new("L", (4, 4)).save(small, "PNG")
    bomb = bytearray(small.getvalue())
    bomb[16:24] = (40000).to_bytes(4, "big") * 2
    (tmp_path / "bomb.png").write_bytes(bytes(bomb))
    reason = checks.check_file(tmp_path / "bomb.png", 150_000_000)
    assert reason.startswith("40000×40000 = 1,600,000,000 pixels: larger than the limit of "
                             "150,000,000 pixels (data.max_pixels)")
    assert decoded == []


def test_header_sizes_of_every_format():
    image = _gray((7, 13))  # height 7, width 13
    exif = Image.Exif()
    exif[0x010F] = "scanner"
    variants = [("JPEG", image, {}), ("PNG", image, {}), ("GIF", image, {}), ("BMP", image, {}),
                ("JPEG", image, {"progressive": True}), ("JPEG", image, {"exif": exif.tobytes()}),
                ("JPEG", image.convert("CMYK"), {}), ("BMP", image.convert("RGBA"), {})]
    for fmt, picture, options in variants:
        buffer = io.BytesIO()
        picture.save(buffer, fmt, **options)
        assert headers.image_size(buffer.getvalue(), fmt) == (13, 7), (fmt, options)
        if fmt == "JPEG":  # the same answer as TensorFlow's own header reader
            assert tf.io.extract_jpeg_shape(buffer.getvalue()).numpy()[:2].tolist() == [7, 13]
    jpeg = io.BytesIO()
    image.save(jpeg, "JPEG")
    frame = jpeg.getvalue().index(b"\xff\xc0")
    for cut in (3, 20, frame + 6):  # before and inside the frame header
        with pytest.raises(headers.Unusable, match="damaged JPEG header|truncated header"):
            headers.image_size(jpeg.getvalue()[:cut], "JPEG")


def _formats(tmp_path):
    """Valid but unusual files, with what PIL says their pixels are (as L or RGB)."""
    rgb = _smooth_rgb()
    gray = np.asarray(_gray((16, 16)))
    palette = Image.fromarray(rgb).quantize(colors=12)
    v16 = (np.random.default_rng(3).random((16, 16)) * 65535).astype(np.uint16)
    cases = {
        "png_named.jpg": (Image.fromarray(gray), "PNG", gray, 0),
        "cmyk.jpg": (Image.fromarray(rgb).convert("CMYK"), "JPEG", None, 4),
        "rgba.png": (Image.fromarray(np.dstack([rgb, np.full((16, 16), 9, np.uint8)]), "RGBA"),
                     "PNG", rgb, 0),
        "palette.png": (palette, "PNG", np.asarray(palette.convert("RGB")), 0),
        "palette.gif": (palette, "GIF", np.asarray(palette.convert("RGB")), 0),
        "gray_alpha.png": (Image.fromarray(np.dstack([gray, 255 - gray]), "LA"), "PNG", gray, 0),
        "gray16.png": (Image.fromarray(v16), "PNG", np.round(v16 / 257), 1),
        "gray8.bmp": (Image.fromarray(gray), "BMP", gray, 0),
        "rgb.bmp": (Image.fromarray(rgb), "BMP", rgb, 0),
    }
    out = {}
    for name, (image, fmt, expected, tolerance) in cases.items():
        path = _save(tmp_path / name, image, fmt)
        if expected is None:  # what PIL decodes the saved (lossy) file to
            expected = np.asarray(Image.open(path).convert("RGB"))
        out[name] = (path, np.asarray(expected, np.int64), tolerance)
    return out


def test_unusual_formats_pass_the_check_and_decode_as_pil_does(tmp_path):
    for name, (path, expected, tolerance) in _formats(tmp_path).items():
        assert checks.check_file(path, 10**6) is None, name
        pixels = decode.decode_image(tf.io.read_file(str(path))).numpy().astype(np.int64)
        channels = expected.shape[-1] if expected.ndim == 3 else 1
        assert pixels.shape == (16, 16, channels), name
        diff = np.abs(pixels - expected.reshape(16, 16, channels)).max()
        assert diff <= tolerance, (name, diff)
        # The eval pipeline (resize to the same size) hands the model the same pixels, as RGB.
        loaded = decode.load_image(str(path), 16).numpy().astype(np.int64)
        rgb = np.broadcast_to(expected.reshape(16, 16, channels), (16, 16, 3))
        assert np.abs(loaded - rgb).max() <= tolerance + 1, name


def test_cmyk_jpeg_decodes_to_its_rgb_colours(tmp_path):
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[...] = (200, 40, 120)
    path = _save(tmp_path / "cmyk.jpg", Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=95)
    assert Image.open(path).mode == "CMYK"
    pixels = decode.decode_image(tf.io.read_file(str(path))).numpy()
    assert pixels.shape == (16, 16, 3)
    assert np.abs(pixels.astype(int) - [200, 40, 120]).max() <= 3


def test_palette_bmp_is_refused_not_read_as_gray(tmp_path):
    rgb = _smooth_rgb()
    path = _save(tmp_path / "palette.bmp", Image.fromarray(rgb).quantize(colors=12), "BMP")
    # TensorFlow reads the colour indices as gray levels: nothing like the image.
    wrong = decode.decode_image(tf.io.read_file(str(path))).numpy()
    assert wrong.shape[-1] == 1 and wrong.max() < 12
    assert checks.check_file(path, 10**6) == (
        "8-bit colour-palette BMP: TensorFlow would read its palette indices as gray levels; "
        "convert it to PNG")
    one_bit = _save(tmp_path / "mono.bmp", Image.new("1", (8, 8), 1), "BMP")
    assert checks.check_file(one_bit, 10**6) == (
        "1-bit BMP, which TensorFlow cannot decode; convert it to PNG")


# ------------------------------------------------------------------ verify: stop, or leave out


def _broken_tree(root):
    """A tree with one of each kind of broken file, interleaved with good ones in sorted order."""
    _tree(root)
    (root / "train" / "a" / "0a.png").write_bytes(b"")
    _truncated_jpeg(root / "train" / "a" / "1a.jpg")
    (root / "train" / "b" / "0b.jpg").write_text("text")
    (root / "train" / "b" / "notes.txt").write_text("x")
    _save(root / "val" / "loose.png", _gray())
    _save(root / "val" / "b" / "1b.png", Image.new("L", (3000, 3000), 5))  # 9e6 > max_pixels
    return {"0a.png", "1a.jpg", "0b.jpg", "notes.txt", "loose.png", "1b.png"}


def test_verify_stops_with_every_problem_in_one_error(tmp_path):
    names = _broken_tree(tmp_path / "data")
    m = data_folders.scan(tmp_path / "data", strict=False)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(DataError) as raised:
        checks.verify(m, config.DataConfig(max_pixels=4_000_000), run, log=_quiet)
    message = str(raised.value)
    assert message.splitlines()[0] == f"6 files under {tmp_path / 'data'} cannot be used:"
    listed = [line.strip().split(":")[0] for line in message.splitlines()[1:-1]]
    assert sorted(Path(p).name for p in listed) == sorted(names)
    assert message.endswith("Fix or remove these files, or pass --skip-bad (data.skip_bad: true) "
                            "to leave them out of the run.")
    assert not (run / "skipped.txt").exists()


def test_verify_skip_bad_leaves_them_out_and_lists_them(tmp_path):
    names = _broken_tree(tmp_path / "data")
    m = data_folders.scan(tmp_path / "data", strict=False)
    run = tmp_path / "run"
    run.mkdir()
    lines = []
    kept = checks.verify(m, config.DataConfig(skip_bad=True, max_pixels=4_000_000), run, log=lines.append)
    assert lines[-1] == f"Left out 6 unusable files (listed in {run / 'skipped.txt'})"
    skipped = (run / "skipped.txt").read_text().splitlines()
    assert skipped[0].startswith("#")
    rows = dict(line.split("\t") for line in skipped[1:])
    assert {Path(p).name for p in rows} == names
    assert rows[str(tmp_path / "data" / "val" / "b" / "1b.png")].startswith("3000×3000 = 9,000,000 pixels")
    assert [p.name for p in run.iterdir()] == ["skipped.txt"]  # no temporary file left behind
    assert kept.bad == ()
    assert {k: len(v) for k, v in kept.splits.items()} == {"train": 6, "validation": 6}
    for split in kept.splits.values():
        assert not {Path(p).name for p in split.paths} & names
        # No label moved onto another image: each is its own folder's, and the pixels agree
        # (class a images are darker than 128, class b brighter).
        assert [kept.class_names[i] for i in split.labels] == list(split.folders)
        assert [Path(p).parent.name for p in split.paths] == list(split.folders)
        for path, label in zip(split.paths, split.labels):
            assert (np.asarray(Image.open(path)).mean() > 128) == (label == 1), path


def test_skip_bad_keeps_multilabel_vectors_aligned(tmp_path):
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in config.STUDY_LABEL_MAP:
            for i in range(2):
                _save(root / split / c / f"{i}.png", _gray(seed=i))
    (root / "train" / "covid-19" / "0.png").write_bytes(b"")
    m = data_folders.scan(root, "multilabel", config.STUDY_LABELS, config.STUDY_LABEL_MAP, strict=False)
    kept = checks.verify(m, config.DataConfig(skip_bad=True), tmp_path, log=_quiet)
    train = kept.splits["train"]
    assert len(train) == 5
    expected = {"covid-19": [1, 0, 1], "normal": [0, 1, 0], "pneumonia": [0, 0, 1]}
    assert [v.tolist() for v in train.labels] == [expected[Path(p).parent.name] for p in train.paths]


def test_skip_bad_that_empties_a_class_folder_names_it(tmp_path):
    root = _tree(tmp_path / "data", n=1)
    (root / "val" / "b" / "0.png").write_bytes(b"")
    m = data_folders.scan(root, strict=False)
    with pytest.raises(DataError) as raised:
        checks.verify(m, config.DataConfig(skip_bad=True), tmp_path, log=_quiet)
    assert str(raised.value) == (
        f"Leaving out the unusable files leaves no images in {root / 'val' / 'b'}:\n"
        "  val/b/0.png: empty file (0 bytes)\nFix or replace these files.")


def test_skip_bad_drops_an_optional_split_it_empties(tmp_path):
    root = _tree(tmp_path / "data")
    _truncated_jpeg(root / "test" / "only.jpg")
    m = data_folders.scan(root, strict=False)
    kept = checks.verify(m, config.DataConfig(skip_bad=True), tmp_path, log=_quiet)
    assert set(kept.splits) == {"train", "validation"}


def test_verify_returns_a_clean_manifest_unchanged(tmp_path):
    m = data_folders.scan(_tree(tmp_path / "data"), strict=False)
    assert checks.verify(m, config.DataConfig(), tmp_path, log=_quiet) is m
    assert not (tmp_path / "skipped.txt").exists()


# ------------------------------------------------------- commands that stay strict: fail up front


def test_prepare_fails_before_writing_with_the_full_list(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "train" / "a" / "e.png").write_bytes(b"")
    (root / "val" / "b" / "t.jpg").write_text("text")
    _truncated_jpeg(root / "val" / "a" / "cut.jpg")  # found only by decoding
    out = tmp_path / "records"
    with pytest.raises(DataError) as raised:
        data_prepare.prepare(root, out, log=_quiet)
    lines = str(raised.value).splitlines()
    assert lines[0] == f"3 files under {root} cannot be used:"
    assert lines[1] == "  train/a/e.png: empty file (0 bytes)"
    assert lines[2].startswith("  val/a/cut.jpg: cannot be decoded as JPEG, truncated or corrupt")
    # (the advice's wording after this is records.prepare's: it may offer --skip-bad)
    assert lines[3].startswith("  val/b/t.jpg: has a .jpg name") and lines[4].startswith("Fix or remove these files")
    assert len(lines) == 5
    assert not out.exists()


def test_evaluate_checks_its_split_first(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "train" / "a" / "e.png").write_bytes(b"")  # not the evaluated split: no matter
    _truncated_jpeg(root / "val" / "a" / "cut.jpg")
    (root / "val" / "b" / "t.jpg").write_text("text")
    trained = SimpleNamespace(task="binary", outputs=("a", "b"))
    with pytest.raises(DataError) as raised:
        evaluate.scan_split(root, "validation", trained, log=_quiet)
    lines = str(raised.value).splitlines()
    assert lines[0] == f"2 files under {root} cannot be used:"
    assert lines[1].startswith("  val/a/cut.jpg: cannot be decoded as JPEG")
    assert lines[2].startswith("  val/b/t.jpg: has a .jpg name") and len(lines) == 4
    # A run trained with data.skip_bad is evaluated without them, labels still aligned.
    run = SimpleNamespace(data=config.DataConfig(skip_bad=True))
    logged = []
    _, chosen = evaluate.scan_split(root, "validation", trained, run, log=logged.append)
    assert len(chosen) == 6 and chosen.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert [Path(p).parent.name for p in chosen.paths] == ["a"] * 3 + ["b"] * 3
    assert logged[-1].startswith("Left out 2 unusable file(s), as the run did (data.skip_bad):\n  val/a/cut.jpg")


def test_every_unusual_format_goes_through_both_pipelines(tmp_path):
    """What verify lets through never fails mid-epoch: one train and one eval pass over them all."""
    root = tmp_path / "data"
    for split in ("train", "val"):
        for c in ("a", "b"):
            _formats(root / split / c)
    _truncated_jpeg(root / "train" / "a" / "zz.jpg")
    m = checks.verify(data_folders.scan(root, strict=False), config.DataConfig(skip_bad=True),
                         tmp_path, log=_quiet)
    assert {k: len(v) for k, v in m.splits.items()} == {"train": 18, "validation": 18}
    aug = config.AugmentConfig()
    for training in (True, False):
        images, labels = [], []
        for x, y in datasets.dataset(m.splits["train"], 24, 8, training=training, aug=aug, decode_scale=0.5):
            images.append(x.numpy())
            labels.append(y.numpy())
        assert np.concatenate(images).shape == (18, 24, 24, 3)
        assert sorted(np.concatenate(labels).tolist()) == [0] * 9 + [1] * 9
