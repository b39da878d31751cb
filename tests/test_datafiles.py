"""Odd things in a data folder: linked subfolders, pipes and devices, Unicode folder names,
file names with tabs or newlines, and the numbers of the "Checked N files" line."""

import io
import os
import socket
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from tfcovid import config
from tfcovid.data import folders as data_folders, checks, headers
from tfcovid.inference import evaluate
from tfcovid.data.types import DataError


def _tree(root, n=3, classes=("a", "b")):
    """train/val with classes a, b: n small grayscale PNGs each (pixel value encodes class)."""
    for split in ("train", "val"):
        for c, value in zip(classes, (60, 190)):
            (root / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("L", (12, 10), value + i).save(root / split / c / f"{i}.png")
    return root


def _truncated_jpeg(path):
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 120, 30)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])


def _quiet(*_):
    pass


# --------------------------------------------------------------------------- linked folders


def test_linked_subfolder_of_a_class_folder_is_followed(tmp_path):
    root = _tree(tmp_path / "data")
    more = tmp_path / "more"
    more.mkdir()
    for i in range(2):
        Image.new("L", (12, 10), 70 + i).save(more / f"x{i}.png")
    (root / "train" / "a" / "real_sub").mkdir()
    Image.new("L", (12, 10), 80).save(root / "train" / "a" / "real_sub" / "r.png")
    os.symlink(more, root / "train" / "a" / "more_linked")

    m = data_folders.scan(root)
    train = m.splits["train"]
    assert len(train) == 3 + 2 + 1 + 3
    # Each folder's files first, then its subfolders by name; the linked images keep the
    # path they were reached by, and their class folder's label.
    assert [os.path.relpath(p, root) for p in train.paths[:6]] == [
        "train/a/0.png", "train/a/1.png", "train/a/2.png",
        "train/a/more_linked/x0.png", "train/a/more_linked/x1.png", "train/a/real_sub/r.png"]
    assert train.folders == ("a",) * 6 + ("b",) * 3
    assert train.labels.tolist() == [0] * 6 + [1] * 3
    assert m.problems == ()


def test_link_loops_and_second_links_are_not_followed_and_noted(tmp_path):
    root = _tree(tmp_path / "data")
    more = tmp_path / "more"
    more.mkdir()
    Image.new("L", (12, 10), 70).save(more / "x.png")
    a = root / "train" / "a"
    os.symlink(more, a / "more1")
    os.symlink(more, a / "more2")  # the same folder again
    os.symlink("..", a / "up")  # the split folder: it holds a itself (and class b's images)
    os.symlink(".", a / "self")
    os.symlink(root, more / "to_root")  # a loop through the linked folder

    m = data_folders.scan(root)
    assert [os.path.relpath(p, root) for p in m.splits["train"].paths if "/a/" in p] == [
        "train/a/0.png", "train/a/1.png", "train/a/2.png", "train/a/more1/x.png"]
    assert m.splits["train"].folders.count("b") == 3  # no image of b came in under a
    assert m.problems == (
        "did not follow 4 linked folder(s) that lead back to a folder already read (a link loop, "
        "or a second link to the same folder), so no image is read twice: "
        f"train/a/more1/to_root -> {root}; train/a/more2 -> {more}; "
        f"train/a/self -> {a}; train/a/up -> {root / 'train'}",)


def test_unreadable_subfolder_is_reported_not_skipped(tmp_path, monkeypatch):
    root = _tree(tmp_path / "data")
    locked = root / "train" / "b" / "sub"
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # chmod 000 does not stop root, who runs these tests in CI
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(DataError) as raised:
        data_folders.scan(root)
    assert str(raised.value) == (
        f"1 file under {root} cannot be used:\n"
        "  train/b/sub: folder cannot be read (Permission denied), so its images are unknown; "
        "give read permission (chmod a+rx) or remove it\nFix or remove these files.")


# ---------------------------------------------------------------- not regular files: never opened


def test_named_pipe_socket_and_device_are_refused_without_opening_them(tmp_path, monkeypatch):
    root = _tree(tmp_path / "data")
    pipe = root / "train" / "a" / "pipe.png"
    os.mkfifo(pipe)
    zero = root / "train" / "b" / "zero.png"
    os.symlink("/dev/zero", zero)
    sock_path = root / "val" / "a" / "s.png"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(sock_path))
    opened = []
    real_read = headers.read_bytes

    def read(path, limit=-1):
        opened.append(Path(path).name)
        return real_read(path, limit)

    monkeypatch.setattr(headers, "read_bytes", read)
    try:
        with pytest.raises(DataError) as raised:
            data_folders.scan(root)
        advice = "; replace it with the image file itself or remove it"
        assert str(raised.value).splitlines()[1:] == [
            f"  train/a/pipe.png: not a regular file: a named pipe (FIFO){advice}",
            "  train/b/zero.png: not a regular file: a character device, through the link to "
            f"/dev/zero{advice}",
            f"  val/a/s.png: not a regular file: a socket{advice}",
            "Fix or remove these files."]
        # The full check refuses them too (a file can be replaced after the scan).
        assert checks.check_file(pipe, 10**6) == f"not a regular file: a named pipe (FIFO){advice}"
        assert checks.check_file(tmp_path, 10**6) == f"not a regular file: a folder{advice}"
        assert not {"pipe.png", "zero.png", "s.png"} & set(opened)
        assert "0.png" in opened  # the real images were read

        # With skip_bad they are left out and the run goes on without them.
        m = data_folders.scan(root, strict=False)
        kept = checks.verify(m, config.DataConfig(skip_bad=True), tmp_path, log=_quiet)
        assert {k: len(v) for k, v in kept.splits.items()} == {"train": 6, "validation": 6}
    finally:
        sock.close()


# ------------------------------------------------------------------- the "Checked N files" line


def test_checked_line_counts_every_file_it_looked_at(tmp_path):
    root = _tree(tmp_path / "data")  # 12 usable images
    _truncated_jpeg(root / "train" / "a" / "cut.jpg")  # found by decoding
    (root / "train" / "a" / "text.jpg").write_text("text")  # found by the scan
    (root / "train" / "b" / "zero.png").write_bytes(b"")
    (root / "train" / "notes.txt").write_text("x")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"x")  # ignored, in its own note
    lines = []
    bad = checks.check(data_folders.scan(root, strict=False), 10**6, log=lines.append)
    assert len(bad) == 4 and len(lines) == 1
    assert lines[0].startswith("Checked 16 files in ")
    assert lines[0].endswith(" s: 12 usable, 4 unusable")

    lines.clear()
    checks.check(data_folders.scan(_tree(tmp_path / "clean"), strict=False), 10**6, log=lines.append)
    assert lines[0].startswith("Checked 12 files in ") and lines[0].endswith(" s: all usable")


def test_evaluate_checked_line_adds_up(tmp_path):
    root = _tree(tmp_path / "data")
    (root / "val" / "b" / "t.jpg").write_text("text")  # refused by the scan, never decoded
    (root / "train" / "a" / "e.png").write_bytes(b"")  # another split: not counted
    trained = SimpleNamespace(task="binary", outputs=("a", "b"))
    lines = []
    run = SimpleNamespace(data=config.DataConfig(skip_bad=True))
    _, chosen = evaluate.scan_split(root, "validation", trained, run, log=lines.append)
    assert len(chosen) == 6
    assert lines[0].startswith("Checked 7 files in ") and lines[0].endswith(" s: 6 usable, 1 unusable")


# ------------------------------------------------------------------- Unicode normalization


def test_class_folders_differing_only_in_unicode_normalization(tmp_path):
    nfc, nfd = unicodedata.normalize("NFC", "normál"), unicodedata.normalize("NFD", "normál")
    assert nfc != nfd
    root = tmp_path / "U1"
    _tree(root, classes=("infected", nfc))
    os.rename(root / "val" / nfc, root / "val" / nfd)  # as a copy made on macOS spells it
    with pytest.raises(DataError) as raised:
        data_folders.scan(root)
    assert str(raised.value) == (
        "Class folders differ between splits only in Unicode normalization: "
        f"{root / 'val' / nfd} is spelled 'norma\\u0301l' (NFD) but {root / 'train' / nfc} is "
        "'norm\\xe1l' (NFC). The names look the same but are different folder names (a copy made "
        "on macOS often spells accented letters decomposed, NFD). Rename one of each pair so every "
        f"split spells the class the same way (`convmv -r -f utf8 -t utf8 --nfc --notest {root}` "
        "renames every name under it to NFC).")
    # Names that really differ keep the plain message.
    os.rename(root / "val" / nfd, root / "val" / "healthy")
    with pytest.raises(DataError, match=r"Class folders differ between splits: .*/val has "
                                        r"\['healthy', 'infected'\]"):
        data_folders.scan(root)


# --------------------------------------------------------------------------- skipped.txt


def _unescape(field):
    out, chars = [], iter(field)
    for c in chars:
        out.append({"t": "\t", "n": "\n", "r": "\r", "\\": "\\"}[next(chars)] if c == "\\" else c)
    return "".join(out)


def test_skipped_txt_escapes_tabs_newlines_and_backslashes(tmp_path):
    root = _tree(tmp_path / "data")
    names = ["tab\there.png", "new\nline.png", "back\\slash.png", "plain.png"]
    for name in names:
        (root / "train" / "a" / name).write_bytes(b"")
    m = data_folders.scan(root, strict=False)
    run = tmp_path / "run"
    run.mkdir()
    checks.verify(m, config.DataConfig(skip_bad=True), run, log=_quiet)
    lines = (run / "skipped.txt").read_text().split("\n")
    assert lines[0] == ("# files left out of this run (data.skip_bad): path<TAB>reason, with "
                        "backslash, tab, newline and carriage return in them written as \\\\, "
                        "\\t, \\n and \\r, other unprintable characters as \\uXXXX and bytes "
                        "that are not UTF-8 as \\xNN")
    assert lines[-1] == "" and len(lines) == 1 + len(names) + 1  # one line per file
    rows = [line.split("\t") for line in lines[1:-1]]
    assert all(len(row) == 2 for row in rows)
    a = root / "train" / "a"
    assert {_unescape(p): _unescape(r) for p, r in rows} == {
        str(a / name): "empty file (0 bytes)" for name in names}
    assert f"{a}/tab\\there.png\tempty file (0 bytes)" in lines
    assert f"{a}/new\\nline.png\tempty file (0 bytes)" in lines
    assert f"{a}/back\\\\slash.png\tempty file (0 bytes)" in lines
