"""What a file decodes to is bounded before it is decoded, for every format and every command
(issue 22.1, 22.2): GIF frames past the canvas and every frame of an animation, PNG channels,
progressive JPEG coefficients; predict, explain, evaluate and bench apply data.max_pixels too.

The crafted files are a few kB (the PNG "bombs" are zeros, which deflate 1000:1).
"""

import io
import shutil
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

from fake_run import make_run
from tfcovid import cli, config
from tfcovid.data import bounds, checks, headers, sizes
from tfcovid.inference import evaluate, explain

_GIF_MARKS = {0x21, 0x2C}


def _gif_frame(width, height, value=0):
    """(header: signature, screen descriptor and colour table; one image block) of the GIF
    PIL writes for a ``width`` x ``height`` grey frame."""
    buf = io.BytesIO()
    Image.new("L", (width, height), value).save(buf, "GIF")
    data = buf.getvalue()
    start = 13 + (3 << ((data[10] & 7) + 1) if data[10] & 0x80 else 0)
    at = start
    while data[at] == 0x21:  # extensions before the image
        at = bounds._sub_blocks(data, at + 2)
    desc, flags = at, data[at + 9]
    at += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0)
    return data[:start], data[desc:bounds._sub_blocks(data, at + 1)]


def _gif(canvas, frames, descriptor=None):
    """A GIF with a ``canvas`` (width, height) screen and one full frame per (width, height) in
    ``frames``; ``descriptor``: (width, height) written into the first frame's descriptor
    instead (its data stays the small frame's: a header-only bomb)."""
    head = bytearray(_gif_frame(1, 1)[0])
    head[6:10] = struct.pack("<HH", *canvas)
    blocks = [bytearray(_gif_frame(*size)[1]) for size in frames]
    if descriptor is not None:
        blocks[0][5:9] = struct.pack("<HH", *descriptor)
    return bytes(head) + b"".join(blocks) + b"\x3b"


def _chunk(kind, body):
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _zeros_png(width, height, depth=8, colour=6, rows=None):
    """A PNG of zero pixels, its zlib stream built from one compressed block of rows repeated
    (a full flush makes each block independent); ``rows``: how many rows it holds (None: all)."""
    row = 1 + width * {0: 1, 2: 3, 4: 2, 6: 4}[colour] * depth // 8
    rows = height if rows is None else rows
    block = next(n for n in (1000, 500, 100, 10, 1) if rows % n == 0)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = c.compress(bytes(row * block)) + c.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15).flush()
    stream = b"\x78\xda" + segment * (rows // block) + end + struct.pack(">I", (row * rows % 65521) << 16 | 1)
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", stream) + _chunk(b"IEND", b"")


def _write(path, data):
    path.write_bytes(data)
    return path


def _encoded(array, ext, **params):
    ok, buf = cv2.imencode(ext, array, [v for kv in params.items() for v in kv])
    assert ok
    return buf.tobytes()


def _pil(image, fmt, **kw):
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def test_an_animated_gif_counts_every_frame_it_decodes(tmp_path):
    # 30 frames of 200 x 150 on a 200 x 150 canvas: the header says 30,000 pixels, but TensorFlow
    # (giflib) holds every frame's 1-byte indices and the 3-byte RGB canvas.
    gif = _write(tmp_path / "anim.gif", _gif((200, 150), [(200, 150)] * 30))
    assert gif.stat().st_size < 20_000
    image = bounds.decoded(gif.read_bytes(), "GIF")
    assert (image.width, image.height, image.frames) == (200, 150, 30)
    assert image.bytes == 30_000 * 3 + 30 * 30_000 == 990_000
    assert checks.check_file(gif, 330_000) is None  # 990,000 bytes: exactly at the limit
    assert checks.check_file(gif, 329_999) == (
        "200×150 GIF of 30 frames (every frame is decoded, though tfcovid uses the first) "
        "decodes to 990,000 bytes: larger than the limit of 989,997 bytes (data.max_pixels = "
        "329,999 pixels of 3 bytes); save its first frame as a PNG or raise data.max_pixels")


def test_a_gif_frame_larger_than_its_canvas_is_its_size(tmp_path):
    gif = _write(tmp_path / "wide.gif", _gif((16, 16), [(1000, 800)]))
    assert gif.stat().st_size < 10_000
    # TensorFlow's canvas grows to the frame: the decoded image is the frame's size.
    decoded = tf.io.decode_image(gif.read_bytes(), channels=0, expand_animations=False)
    assert decoded.shape == (800, 1000, 3)
    assert bounds.decoded(gif.read_bytes(), "GIF").bytes == 800_000 * 3 + 800_000
    assert checks.check_file(gif, 799_999) == (
        "1000×800 = 800,000 pixels (a frame reaches past its 16×16 canvas): larger than the "
        "limit of 799,999 pixels (data.max_pixels); downscale it or raise data.max_pixels")
    assert "decodes to 3,200,000 bytes: larger than the limit of 3,199,998 bytes" in \
        checks.check_file(gif, 1_066_666)
    assert checks.check_file(gif, 1_066_667) is None


def test_a_gif_frame_past_pils_limit_is_refused_in_the_check_not_a_traceback(tmp_path):
    # A 16 x 16 canvas whose one frame descriptor says 15000 x 15000 (its data is 1 x 1's):
    # PIL's open raises DecompressionBombError (over 2 x 89,478,485 pixels).
    gif = _write(tmp_path / "bomb.gif", _gif((16, 16), [(1, 1)], descriptor=(15000, 15000)))
    assert gif.stat().st_size < 1000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(gif)
    assert checks.check_file(gif, config.DataConfig().max_pixels).startswith(
        "15000×15000 = 225,000,000 pixels (a frame reaches past its 16×16 canvas): larger than "
        "the limit of 150,000,000 pixels (data.max_pixels)")
    assert sizes.header(str(gif)) is None  # the pipeline's planning: no traceback either


def test_gif_frames_are_read_to_the_trailer_or_what_giflib_would_stop_at():
    two = _gif((4, 4), [(4, 4), (2, 3)])
    assert bounds.gif_frames(two) == [(0, 0, 4, 4), (0, 0, 2, 3)]
    assert bounds.gif_frames(two[:-1] + b"\x2c\x00") == [(0, 0, 4, 4), (0, 0, 2, 3)]  # cut descriptor
    assert bounds.gif_frames(two[:-1] + b"\x00" + two[13:]) == [(0, 0, 4, 4), (0, 0, 2, 3)]  # giflib stops
    assert bounds.gif_frames(two + two[13:]) == [(0, 0, 4, 4), (0, 0, 2, 3)]  # after the trailer
    assert len(bounds.gif_frames(two[:-3])) == 2  # cut inside the last frame's data: counted


# (file, kind, bytes a pixel in TensorFlow's uint8 output, bytes a pixel held besides it)
@pytest.mark.parametrize("make, kind, output, held", [
    (lambda: _pil(Image.new("L", (30, 20)), "PNG"), "PNG", 1, 0),
    (lambda: _pil(Image.new("LA", (30, 20)), "PNG"), "PNG", 2, 0),
    (lambda: _pil(Image.new("RGB", (30, 20)), "PNG"), "PNG", 3, 0),
    (lambda: _pil(Image.new("RGBA", (30, 20)), "PNG"), "PNG", 4, 0),
    (lambda: _encoded(np.zeros((20, 30), np.uint16), ".png"), "PNG", 1, 0),  # 16 bits decode to 8
    (lambda: _encoded(np.zeros((20, 30, 4), np.uint16), ".png"), "PNG", 4, 0),
    (lambda: _pil(Image.new("P", (30, 20)), "PNG"), "PNG", 3, 0),
    (lambda: _pil(Image.new("P", (30, 20)), "PNG", transparency=0), "PNG", 4, 0),
    (lambda: _pil(Image.new("L", (30, 20)), "JPEG"), "JPEG", 1, 0),
    (lambda: _pil(Image.new("RGB", (30, 20)), "JPEG"), "JPEG", 3, 0),
    (lambda: _pil(Image.new("RGB", (30, 20)), "JPEG", progressive=True), "JPEG", 3, 6),  # coefficients
    (lambda: _pil(Image.new("RGB", (30, 20)), "BMP"), "BMP", 3, 0),
    (lambda: _pil(Image.new("L", (30, 20)), "GIF"), "GIF", 3, 1),  # giflib's 1-byte indices
])
def test_decoded_bytes_per_format_are_what_tensorflow_decodes(make, kind, output, held):
    data = make()
    image = bounds.decoded(data, kind)
    assert (image.width, image.height, image.bytes) == (30, 20, 600 * (output + held))
    out = tf.io.decode_image(data, channels=0, dtype=tf.uint8, expand_animations=False)
    assert (out.shape, out.dtype) == ((20, 30, output), tf.uint8)


def test_channels_count_against_the_limit_at_both_edges(tmp_path):
    rgba = _write(tmp_path / "rgba.png", _pil(Image.new("RGBA", (100, 100)), "PNG"))
    assert checks.check_file(rgba, 13_334) is None  # 40,000 bytes <= 40,002
    assert checks.check_file(rgba, 13_333) == (
        "100×100 8-bit RGBA PNG decodes to 40,000 bytes: larger than the limit of 39,999 bytes "
        "(data.max_pixels = 13,333 pixels of 3 bytes); downscale it or raise data.max_pixels")
    rgb = _write(tmp_path / "rgb.png", _pil(Image.new("RGB", (100, 100)), "PNG"))
    assert checks.check_file(rgb, 10_000) is None
    assert "10,000 pixels: larger than the limit of 9,999 pixels" in checks.check_file(rgb, 9_999)
    progressive = _write(tmp_path / "p.jpg", _pil(Image.new("RGB", (100, 100)), "JPEG", progressive=True))
    assert checks.check_file(progressive, 30_000) is None  # 90,000 bytes
    assert "progressive JPEG (3 components" in checks.check_file(progressive, 29_999)


def test_a_png_bomb_within_the_pixel_limit_is_refused_by_its_bytes(tmp_path):
    # 12000 x 12000 RGBA zeros in 560 kB: 144 M pixels (under the default 150 M) but 576 MB
    # decoded (over 450 MB); predict took 2.9 GB with it before the limit.
    bomb = _write(tmp_path / "rgba.png", _zeros_png(12000, 12000))
    assert bomb.stat().st_size < 600_000
    assert checks.check_file(bomb, config.DataConfig().max_pixels) == (
        "12000×12000 8-bit RGBA PNG decodes to 576,000,000 bytes: larger than the limit of "
        "450,000,000 bytes (data.max_pixels = 150,000,000 pixels of 3 bytes); downscale it or "
        "raise data.max_pixels")
    assert headers.image_size(bomb.read_bytes(), "PNG") == (12000, 12000)


def _bomb_folder(folder, tree):
    """Two good images, and four bombs: header-only ones (20000 x 20000 16-bit RGBA PNG, a GIF
    frame of 30000 x 30000, a 60000 x 60000 JPEG frame header) and a real one (the RGBA PNG)."""
    folder.mkdir()
    good = sorted((tree / "test").rglob("*.*"))[:2]
    for path in good:
        shutil.copy(path, folder / path.name)
    _write(folder / "rgba16.png", _zeros_png(20000, 20000, depth=16, rows=10))
    _write(folder / "frame.gif", _gif((16, 16), [(1, 1)], descriptor=(30000, 30000)))
    sof = bytearray(_pil(Image.new("RGB", (8, 8)), "JPEG"))
    at = headers.jpeg_frame(bytes(sof))
    sof[at + 5:at + 9] = struct.pack(">HH", 60000, 60000)
    _write(folder / "sof.jpg", bytes(sof))
    _write(folder / "real.png", _zeros_png(12000, 12000))
    return sorted(p.name for p in good)


_PEAK = ("import resource, subprocess, sys; done = subprocess.run(sys.argv[1:], capture_output=True, "
         "text=True); print(done.returncode); print(resource.getrusage(resource.RUSAGE_CHILDREN)"
         ".ru_maxrss); sys.stdout.write(done.stdout); sys.stderr.write(done.stderr)")


@pytest.mark.slow
def test_predict_refuses_bombs_in_bounded_memory_and_predicts_the_rest(binary_tree, tmp_path):
    run = make_run(tmp_path, binary_tree, "binary")
    good = _bomb_folder(tmp_path / "in", binary_tree)
    out = tmp_path / "p.csv"
    # The predict process's own peak RSS (kB), from a parent of its own.
    done = subprocess.run([sys.executable, "-c", _PEAK, sys.executable, "-m", "tfcovid.cli", "predict",
                           str(run), str(tmp_path / "in"), "--csv", str(out)],
                          capture_output=True, text=True, timeout=600)
    status, peak_kb, *table = done.stdout.splitlines()
    assert int(status) == 1, done.stderr[-2000:]
    assert int(peak_kb) < 2 * 1024 * 1024, peak_kb  # 0.9 GB here; 2.9 GB (real.png alone) before
    print(f"predict peak RSS: {int(peak_kb) / 1024:.0f} MB")
    assert "Traceback" not in done.stderr and "damaged image data" not in done.stderr
    for name, size in (("rgba16.png", "20000×20000 = 400,000,000 pixels"),
                       ("frame.gif", "30000×30000 = 900,000,000 pixels"),
                       ("sof.jpg", "60000×60000 = 3,600,000,000 pixels"),
                       ("real.png", "12000×12000 8-bit RGBA PNG decodes to 576,000,000 bytes")):
        line = next(line for line in done.stderr.splitlines() if f"{name}:" in line)
        assert size in line and "larger than the limit" in line and "--max-pixels" in line, line
    assert [row.split(",")[0] for row in out.read_text().splitlines()[1:]] == good
    # --max-pixels sets the limit: here low enough to refuse the good (about 70 x 70) images too.
    low = CliRunner().invoke(cli.main, ["predict", str(run), str(tmp_path / "in"), "--max-pixels", "100"])
    assert low.exit_code == 1 and "Could not read 6 of 6 image(s)" in low.stderr
    for name in good:
        line = next(line for line in low.stderr.splitlines() if f"{name}:" in line)
        assert line.endswith("pixels: larger than the limit of 100 pixels (--max-pixels); downscale "
                             "it or raise --max-pixels"), line


def test_explain_lists_every_bad_image_and_explains_the_rest(binary_tree, tmp_path):
    run = make_run(tmp_path, binary_tree, "binary", bias=[5.0, -5.0])
    good = _bomb_folder(tmp_path / "in", binary_tree)
    (tmp_path / "in" / "empty.jpg").write_bytes(b"")
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    results = explain.explain(run, [tmp_path / "in", tmp_path / "gone.png"], tmp_path / "cam",
                              log=lambda s: None)
    assert sorted(r["image"].rsplit("/", 1)[-1] for r in results) == good
    assert [name for name, _ in results.failed] == sorted([
        "broken.png", "empty.jpg", "frame.gif", str(tmp_path / "gone.png"), "real.png",
        "rgba16.png", "sof.jpg"])
    reasons = dict(results.failed)
    assert reasons["empty.jpg"] == "empty file (0 bytes)"
    assert reasons["broken.png"] == "damaged PNG header (no IHDR chunk first)"
    assert "larger than the limit of 150,000,000 pixels (--max-pixels)" in reasons["rgba16.png"]
    assert reasons[str(tmp_path / "gone.png")] == "no such file or folder"
    cam = CliRunner().invoke(cli.main, ["explain", str(run), str(tmp_path / "in"), "--out", str(tmp_path / "c2")])
    assert cam.exit_code == 1 and "Traceback" not in cam.output
    assert "Could not read 6 of 8 image(s):" in cam.stderr
    assert "  empty.jpg: empty file (0 bytes)" in cam.stderr.splitlines()
    assert len(list((tmp_path / "c2").iterdir())) == 2
    # Every image bad: nothing written, every one listed, status 1.
    none = CliRunner().invoke(cli.main, ["explain", str(run), str(tmp_path / "in" / "sof.jpg"),
                                         "--out", str(tmp_path / "c3")])
    assert none.exit_code == 1 and "Could not read 1 of 1 image(s):" in none.stderr
    assert not (tmp_path / "c3").exists()


def test_evaluate_and_bench_take_max_pixels(binary_tree, tmp_path):
    run = make_run(tmp_path, binary_tree, "binary")
    with pytest.raises(checks.DataError, match=r"(?s)4 files .* pixels: larger than the limit of "
                                               r"100 pixels \(--max-pixels\); downscale it or raise --max-pixels"):
        evaluate.evaluate(run, max_pixels=100, make_plots=False, log=lambda s: None)
    assert evaluate.evaluate(run, max_pixels=10_000, make_plots=False, log=lambda s: None)["report"]
    result = CliRunner().invoke(cli.main, ["bench", "pipeline", "--data", str(binary_tree / "train"),
                                           "--max-pixels", "100"])
    assert result.exit_code == 1 and "larger than the limit of 100 pixels (--max-pixels)" in result.output


@pytest.mark.slow
def test_fit_leaves_out_gifs_that_decode_past_the_limit(binary_tree, tmp_path):
    # Before: both passed the check (their screens are 30,000 and 256 pixels) and were decoded
    # whole in every epoch: 60 frames, and a frame 3,000 times its canvas.
    from tfcovid.training import train

    tree = tmp_path / "data"
    shutil.copytree(binary_tree, tree)
    _write(tree / "train" / "infected" / "anim.gif", _gif((200, 150), [(200, 150)] * 60))
    _write(tree / "train" / "normal" / "wide.gif", _gif((16, 16), [(1000, 800)]))
    exp = config.resolve(None, {
        "data.dir": str(tree), "data.image_size": 16, "data.max_pixels": 500_000,
        "data.skip_bad": True, "model.backbone": "resnet18", "model.weights": "none", "model.freeze": "all",
        "train.epochs": 1, "train.batch_size": 4, "out": str(tmp_path / "runs")})
    run = train.fit(exp, log=lambda line: None)
    skipped = (run / "skipped.txt").read_text().splitlines()[1:]
    assert sorted(line.split("\t")[0].rsplit("/", 1)[-1] for line in skipped) == ["anim.gif", "wide.gif"]
    assert all("larger than the limit" in line and "data.max_pixels" in line for line in skipped)
