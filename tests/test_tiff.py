"""TIFF input (issue 24.3): 8/16-bit grey and 8-bit RGB TIFFs on every decode path, 16-bit
scaled by the 16-bit PNG rule, multi-page and odd kinds refused, the size bound from the header.
Tiny files written with Pillow, or by hand where Pillow cannot write them (12-bit, lying headers).
"""
import io
import struct

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from fake_run import make_run, reference_probs
from PIL import Image

from tfcovid.cli import main
from tfcovid.data import bounds, checks, decode, headers, tiff, working
from tfcovid.inference import predict

COMPRESSIONS = [None, "tiff_lzw", "tiff_adobe_deflate"]


def _tiff(pixels: np.ndarray, compression=None, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "TIFF", compression=compression, **kw)
    return buf.getvalue()


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue()


def _by_hand(width, height, bits, pixels: bytes, photometric=1, strip=None) -> bytes:
    """A little-endian, uncompressed, one-strip grey TIFF; ``strip``: a StripByteCounts that lies."""
    entries = [(256, 4, width), (257, 4, height), (258, 3, bits), (259, 3, 1), (262, 3, photometric),
               (273, 4, 8 + 2 + 12 * 9 + 4), (277, 3, 1), (278, 4, height),
               (279, 4, len(pixels) if strip is None else strip)]
    out = b"II*\0" + struct.pack("<IH", 8, len(entries))
    for tag, kind, value in entries:
        out += struct.pack("<HHI", tag, kind, 1) + struct.pack("<HH" if kind == 3 else "<I", *(
            (value, 0) if kind == 3 else (value,)))
    return out + struct.pack("<I", 0) + pixels


def _pack12(values) -> bytes:
    """12-bit samples packed as TIFF packs them: two in three bytes, high bits first."""
    return b"".join(bytes((a >> 4, ((a & 15) << 4) | (b >> 8), b & 255))
                    for a, b in zip(values[::2], values[1::2]))


def _decode(raw: bytes) -> np.ndarray:
    """Through the TensorFlow decode every pipeline uses (tf.numpy_function for TIFF)."""
    return decode.decode_image(tf.constant(raw)).numpy()


def _all_paths(raw: bytes) -> list[np.ndarray]:
    """The image from the pipelines' decode and the direct one (predict, explain, checks)."""
    return [_decode(raw), tiff.to_uint8(raw)]


rng = np.random.default_rng(24)
GREY8 = rng.integers(0, 256, (12, 10)).astype(np.uint8)
RGB8 = rng.integers(0, 256, (12, 10, 3)).astype(np.uint8)


@pytest.mark.parametrize("compression", COMPRESSIONS)
def test_8_bit_grey_and_rgb_decode_to_the_written_pixels(compression):
    for pixels in (GREY8, RGB8):
        raw = _tiff(pixels, compression)
        assert headers.sniff(raw[:headers.HEAD_BYTES]) == "TIFF"
        for got in _all_paths(raw):
            np.testing.assert_array_equal(got, pixels.reshape(12, 10, -1))
    rgba = np.dstack([RGB8, np.full((12, 10), 7, np.uint8)])  # alpha dropped, as for PNG
    np.testing.assert_array_equal(_decode(_tiff(rgba, compression)), RGB8)


@pytest.mark.parametrize("compression", COMPRESSIONS)
@pytest.mark.parametrize("largest", [4095, 1023, 65535])
def test_16_bit_tiff_scaled_like_the_same_16_bit_png(compression, largest):
    """12 bits used in 16: 4095 -> 255 (not 15); the same pixels as the PNG path gives."""
    pixels = np.linspace(0, largest, 12 * 10).round().astype(np.uint16).reshape(12, 10)
    raw = _tiff(pixels, compression)
    png = _decode(_png(pixels))
    bits = {4095: 12, 1023: 10, 65535: 16}[largest]
    np.testing.assert_array_equal(png[..., 0], (pixels >> (bits - 8)).astype(np.uint8))
    for got in _all_paths(raw):
        np.testing.assert_array_equal(got, png)
    # The train side's working resolution (halved once) as for the PNG.
    np.testing.assert_array_equal(working.decode_base(tf.constant(raw), 5).numpy(),
                                  working.decode_base(tf.constant(_png(pixels)), 5).numpy())


def test_bits_per_sample_12_counts_like_sbit():
    """Packed 12-bit samples, largest 900: 12 bits (as sBIT 12), where the largest-value rule
    alone would say 10."""
    values = np.linspace(0, 900, 6 * 8).round().astype(np.uint16).reshape(6, 8)
    raw = _by_hand(8, 6, 12, _pack12(values.ravel().tolist()))
    for got in _all_paths(raw):
        np.testing.assert_array_equal(got[..., 0], (values >> 4).astype(np.uint8))


def test_min_is_white_is_inverted_so_that_bone_is_bright():
    """Photometric 0 (high values dark), 8 and 16 bits: 255 minus the MinIsBlack image."""
    values = np.linspace(0, 4000, 6 * 8).round().astype(np.uint16).reshape(6, 8)
    white16 = _by_hand(8, 6, 16, values.tobytes(), photometric=0)
    white8 = _by_hand(8, 6, 8, (values >> 4).astype(np.uint8).tobytes(), photometric=0)
    for raw in (white16, white8):
        for got in _all_paths(raw):
            np.testing.assert_array_equal(got[..., 0], 255 - (values >> 4).astype(np.uint8))


@pytest.mark.parametrize("kind, reason", [
    ("pages", "TIFF of 2 pages: tfcovid reads single-page images"),
    ("float", "TIFF of floating-point samples (32-bit grey)"),
    ("palette", "8-bit palette TIFF (1 sample a pixel): tfcovid reads 8- or 16-bit grey"),
    ("bilevel", "1-bit grey TIFF"),
    ("cmyk", "8-bit CMYK TIFF (4 samples a pixel)"),
    ("truncated", "cannot decode its TIFF pixel data"),
])
def test_unusable_tiffs_get_one_line_reasons(kind, reason, tmp_path):
    grey = Image.fromarray(GREY8)
    make = {"pages": lambda: _tiff(GREY8, save_all=True, append_images=[grey]),
            "float": lambda: _tiff(GREY8.astype(np.float32)),
            "palette": lambda: _save(grey.convert("P")), "bilevel": lambda: _save(grey.convert("1")),
            "cmyk": lambda: _save(grey.convert("CMYK")), "truncated": lambda: _tiff(GREY8)[:100]}
    path = tmp_path / "x.tif"
    path.write_bytes(make[kind]())
    for got in (checks.check_file(path, 10**6), predict.load(path, 10**6)[2]):
        assert reason in got and "\n" not in got, got
    if kind != "truncated":  # refused from the header, before any decode
        assert reason in bounds.problem(path.read_bytes(), 10**6)


def _save(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "TIFF")
    return buf.getvalue()


def test_tiff_size_bound_at_both_edges():
    """From the header: 8-bit grey 10 x 10 (3 bytes a pixel) at the pixel limit, 16-bit
    (6 bytes a pixel: Pillow's 2, its samples twice as NumPy gets them) at the byte limit; a header
    that claims 60000 x 60000 over 10 bytes is refused unread, one whose strip size lies is
    bounded by width x height x samples and reads its real pixels."""
    raw = _tiff(np.zeros((10, 10), np.uint8))
    assert bounds.problem(raw, 100) is None
    assert "10×10 = 100 pixels: larger than the limit of 99 pixels" in bounds.problem(raw, 99)
    raw16 = _tiff(np.zeros((10, 10), np.uint16))
    assert bounds.problem(raw16, 200) is None  # 600 bytes allowed
    assert "decodes to 600 bytes: larger than the limit of 597 bytes" in bounds.problem(raw16, 199)
    huge = _by_hand(60000, 60000, 8, b"x" * 10)
    assert "60000×60000 = 3,600,000,000 pixels: larger than" in bounds.problem(huge, 150_000_000)
    lying = _by_hand(10, 12, 8, GREY8.tobytes(), strip=2**31)
    assert bounds.problem(lying, 120) is None
    np.testing.assert_array_equal(tiff.to_uint8(lying)[..., 0], GREY8)


def test_tif_and_tiff_names_are_image_files(tmp_path):
    for name in ("a.tif", "b.TIFF"):
        (tmp_path / name).write_bytes(_tiff(GREY8))
        assert headers.quick_check(tmp_path / name) is None
        assert checks.check_file(tmp_path / name, 10**6) is None
    (tmp_path / "c.tif").write_text("hello")
    assert "has a .tif name but is not a" in headers.quick_check(tmp_path / "c.tif")
    (tmp_path / "d.tif").write_bytes(b"II+\0\x08\0\0\0" + b"\0" * 124)  # BigTIFF: not read
    assert "(it is a BigTIFF image)" in headers.quick_check(tmp_path / "d.tif")


def test_predict_on_a_tiff_gives_the_png_probabilities(binary_tree, tmp_path):
    """`tfcovid predict` on a 16-bit TIFF (12 bits used) and on the same image as a 16-bit PNG:
    the same probabilities, the model's on decode.load_image's pixels."""
    pixels = (rng.random((40, 36)) * 4095).round().astype(np.uint16)
    (tmp_path / "x.tiff").write_bytes(_tiff(pixels, "tiff_lzw"))
    (tmp_path / "x.png").write_bytes(_png(pixels))
    run = make_run(tmp_path, binary_tree, "binary", size=32, bias=[0.3, -0.2])
    out = tmp_path / "p.csv"
    result = CliRunner().invoke(main, ["predict", str(run), str(tmp_path / "x.tiff"),
                                       str(tmp_path / "x.png"), "--csv", str(out)])
    assert result.exit_code == 0, result.output
    rows = {r.split(",")[0].rsplit(".", 1)[-1]: [float(v) for v in r.split(",")[1:3]]
            for r in out.read_text().splitlines()[1:]}
    assert rows["tiff"] == rows["png"]
    expected = reference_probs(run, [tmp_path / "x.tiff"], "binary")[0]
    np.testing.assert_allclose(rows["tiff"], expected, atol=2e-6)


def test_prepare_and_bench_decode_a_tiff_as_the_pipelines_do(tmp_path):
    from tfcovid.bench import pipeline as bench_pipeline
    from tfcovid.data import prepare

    pixels = (rng.random((20, 24)) * 4095).round().astype(np.uint16)
    path = tmp_path / "x.tif"
    path.write_bytes(_tiff(pixels))
    encoded, channels = prepare._reencode(str(path), 0, "png", 95)
    assert int(channels) == 1
    np.testing.assert_array_equal(tf.io.decode_png(encoded).numpy()[..., 0], (pixels >> 4).astype(np.uint8))
    first = next(iter(bench_pipeline.decode_only([str(path)])))
    assert first.numpy().tolist() == [int(pixels[0, 0] >> 4)]  # a batch of one pixel


def test_train_plan_sizes_a_tiff_from_its_header(tmp_path):
    """fit's plan: a 16-bit TIFF's working size from Pillow's header read (one grey channel);
    OpenCV's batch decoder leaves it to TensorFlow's map (readable (0, 0)), which decodes it
    with data.tiff, as decode_base above."""
    path = tmp_path / "x.tif"
    path.write_bytes(_tiff(np.zeros((40, 36), np.uint16), "tiff_lzw"))
    shapes, _, readable = working.file_plan([str(path)], 16)
    assert shapes[0].tolist() == [20, 18] and readable[0].tolist() == [0, 0]
