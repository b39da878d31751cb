"""DICOM input (issue 24.1, 24.2) and 16-bit PNGs scaled by the bits they use (issue 24.3).

The real radiograph is pydicom-data's RG1_UNCR.dcm (CR chest PA, MONOCHROME1, 15 bits stored,
1955 x 1841) and its JPEG 2000 copies; the rest are small DICOMs written with pydicom here.
"""
import io
import re
import shlex
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner
from PIL import Image

pydicom = pytest.importorskip("pydicom")  # the dicom extra is in the test extra: always there in CI
from fake_run import make_run, reference_probs  # noqa: E402
from pydicom.data import get_testdata_file  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.pixels import apply_modality_lut, apply_voi_lut  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, generate_uid  # noqa: E402

from tfcovid import config  # noqa: E402
from tfcovid.cli import main  # noqa: E402
from tfcovid.config.schema import HIGH_BIT  # noqa: E402
from tfcovid.data import bounds, checks, decode, dicom, headers, highbit, working  # noqa: E402
from tfcovid.data.opencv import images  # noqa: E402
from tfcovid.inference import predict  # noqa: E402

RG1 = "RG1_UNCR.dcm"
DOC = Path(__file__).resolve().parents[1] / "docs" / "dicom.md"


def _decode(raw: bytes) -> np.ndarray:
    """tfcovid's image, through the TensorFlow decode every pipeline uses."""
    return decode.decode_image(tf.constant(raw)).numpy()


def _dicom_bytes(pixels, photometric="MONOCHROME2", bits_stored=None, signed=False, frames=1,
                 samples=1, pixel_data=True, **tags) -> bytes:
    """A DICOM Part 10 file's bytes: ``pixels`` (uint16/int16 or uint8) as its image."""
    pixels = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"  # CR image storage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape[-2 - (samples > 1)], pixels.shape[-1 - (samples > 1)]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = samples, photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8 * pixels.dtype.itemsize
    ds.BitsStored = bits_stored or ds.BitsAllocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in tags.items():
        setattr(ds, key, value)
    if pixel_data:
        ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rg1():
    return open(get_testdata_file(RG1), "rb").read()


# ------------------------------------------------------------------ the real chest radiograph


def _pydicoms_own(raw: bytes) -> np.ndarray:
    """RG1's 8-bit image from pydicom's own LUT functions: modality LUT, VOI (its window; the
    output spans pydicom's range 0 .. 2**BitsStored - 1), MONOCHROME1 inverted."""
    ds = pydicom.dcmread(io.BytesIO(raw))
    voi = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds)
    grey = voi / (2**ds.BitsStored - 1) * 255
    return 255 - grey if ds.PhotometricInterpretation == "MONOCHROME1" else grey


def test_real_radiograph_matches_pydicoms_own_luts(rg1):
    ds = pydicom.dcmread(io.BytesIO(rg1))
    assert (ds.PhotometricInterpretation, ds.BitsStored, ds.Rows, ds.Columns) == ("MONOCHROME1", 15, 1955, 1841)
    ours = _decode(rg1)
    assert ours.shape == (1955, 1841, 1) and ours.dtype == np.uint8
    expected = _pydicoms_own(rg1)
    assert np.abs(ours[..., 0].astype(float) - expected).max() <= 1.0
    # Not a flat or saturated picture: a real spread of grey levels, few clipped pixels.
    assert ours.std() > 20 and (ours == 0).mean() < 0.05 and (ours == 255).mean() < 0.05
    # MONOCHROME1: the lowest stored values (most attenuating: bone) come out brightest.
    arr = ds.pixel_array
    assert ours[..., 0][arr <= np.percentile(arr, 1)].mean() > ours[..., 0][arr >= np.percentile(arr, 99)].mean() + 100
    np.testing.assert_array_equal(ours, dicom.to_uint8(rg1))  # the direct path (predict, checks)


def test_jpeg2000_copies_decode_to_the_same_picture(rg1):
    """Lossless J2K: the same pixels exactly. Lossy J2K: measured max 3 grey levels, mean 0.43,
    1.5 % of pixels off by more than one (bounds: 6, 1.0 and 5 %)."""
    ours = _decode(rg1).astype(int)
    lossless = _decode(open(get_testdata_file("RG1_J2KR.dcm"), "rb").read())
    np.testing.assert_array_equal(lossless, ours)
    lossy = _decode(open(get_testdata_file("RG1_J2KI.dcm"), "rb").read()).astype(int)
    diff = np.abs(lossy - ours)
    assert 0 < diff.max() <= 6 and diff.mean() < 1.0 and (diff > 1).mean() < 0.05


def _worked_example():
    """docs/dicom.md's worked example: its shell lines and its Python block."""
    text = DOC.read_text().split("## Worked example", 1)[1]
    (_, shell), (_, code) = re.findall(r"```(\w*)\n(.*?)```", text, re.S)[:2]
    return shell.splitlines(), code


def test_worked_example_predicts_the_radiograph(rg1, binary_tree, tmp_path, monkeypatch):
    """docs/dicom.md's commands, run: the snippet finds the radiograph offline, predict gives
    the model's probabilities on it (as on decode.load_image's pixels), the Python block
    writes the 8-bit image; the file check passes it and the size bound refuses it one pixel
    under its Rows x Columns and one under its decoded bytes, from the header."""
    shell, code = _worked_example()
    snippet = re.search(r"python -c '(.*?)'\)", shell[1]).group(1)
    found = subprocess.run([sys.executable, "-c", snippet], capture_output=True, text=True, check=True)
    assert open(found.stdout.strip(), "rb").read() == rg1
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "chest.dcm"
    path.write_bytes(rg1)
    run = make_run(tmp_path, binary_tree, "binary", size=32, bias=[0.3, -0.2])
    command = shlex.split(shell[2])
    assert command[:2] == ["tfcovid", "predict"] and "chest.dcm" in command
    result = CliRunner().invoke(main, [str(run) if a == "runs/my-run" else a for a in command[1:]])
    assert result.exit_code == 0, result.output
    row = (tmp_path / "predictions.csv").read_text().splitlines()[1].split(",")
    assert row[0].endswith("chest.dcm") and len(row) == 4
    expected = reference_probs(run, [path], "binary")[0]  # the model on decode.load_image's pixels
    np.testing.assert_allclose([float(v) for v in row[1:3]], expected, atol=2e-6)
    exec(code, {})
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "chest.png"))[..., None], dicom.to_uint8(rg1))
    assert checks.check_file(path, 150_000_000) is None
    refused = predict.load(path, 1955 * 1841 - 1, "--max-pixels")
    assert refused[1] is None and "1841×1955 = 3,599,155 pixels: larger than the limit" in refused[2]
    # 10 bytes a pixel (16-bit samples, float32 working copies): 35,991,550 bytes decoded.
    assert "decodes to 35,991,550 bytes: larger than" in predict.load(path, 11_997_183)[2]
    assert predict.load(path, 11_997_184)[2] is None  # 35,991,552 bytes allowed: read


# ------------------------------------------------------------------ synthetic DICOM files


def test_window_modality_lut_and_monochrome1():
    """MONOCHROME2 with a LINEAR window on rescaled values: PS3.3 C.11.2.1.2's formula;
    the same file as MONOCHROME1 is its inverse."""
    stored = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    tags = {"RescaleSlope": 2, "RescaleIntercept": -1000, "WindowCenter": 2000, "WindowWidth": 4001}
    ours = dicom.to_uint8(_dicom_bytes(stored, bits_stored=12, **tags))[..., 0].astype(float)
    x = stored * 2.0 - 1000
    expected = np.clip((x - 1999.5) / 4000 + 0.5, 0, 1) * 255
    assert np.abs(ours - expected).max() <= 0.5 and ours.min() == 0 and ours.max() == 255
    inverse = dicom.to_uint8(_dicom_bytes(stored, "MONOCHROME1", bits_stored=12, **tags))[..., 0]
    np.testing.assert_array_equal(inverse.astype(float), 255 - ours)


def test_no_window_uses_the_percentile_window():
    """No VOI: 0.5th-99.5th percentile of the values to 0-255 (outliers clipped)."""
    stored = np.random.default_rng(0).integers(100, 900, (40, 50)).astype(np.uint16)
    stored[0, :5] = 4095  # a few hot pixels do not set the scale
    ours = dicom.to_uint8(_dicom_bytes(stored, bits_stored=12))[..., 0].astype(float)
    low, high = np.percentile(stored.astype(np.float32), dicom.PERCENTILES)
    expected = np.clip((stored - low) / (high - low), 0, 1) * 255
    assert np.abs(ours - expected).max() <= 0.5
    assert (ours == 255).mean() <= 0.01 and ours[5:].std() > 50


def test_bits_stored_is_respected_unsigned_and_signed():
    """12 bits stored in 16: bits above BitsStored are not part of the value (here: garbage),
    and a signed file's values are sign-extended from bit 11."""
    values = np.arange(0, 4096, 4, dtype=np.uint16)[:1024].reshape(32, 32)
    dirty = values | np.uint16(0xA000)  # garbage in the 4 unused high bits
    tags = {"WindowCenter": 2048, "WindowWidth": 4096}
    clean = dicom.to_uint8(_dicom_bytes(values, bits_stored=12, **tags))
    np.testing.assert_array_equal(dicom.to_uint8(_dicom_bytes(dirty, bits_stored=12, **tags)), clean)
    signed = (values.astype(np.int32) - 2048).astype(np.int16)  # -2048 .. 2044
    stored = signed.view(np.uint16) & np.uint16(0x0FFF)  # 12-bit two's complement, high bits 0
    tags = {"WindowCenter": 0, "WindowWidth": 4096}
    got = dicom.to_uint8(_dicom_bytes(stored.view(np.int16), bits_stored=12, signed=True, **tags))
    expected = np.clip((signed + 0.5) / 4095 + 0.5, 0, 1) * 255
    assert np.abs(got[..., 0] - expected).max() <= 0.5


@pytest.mark.parametrize("kind, reason", [
    ("frames", "DICOM file of 2 frames: tfcovid reads single-frame images"),
    ("colour", "colour DICOM image (RGB, 3 samples a pixel)"),
    ("no pixels", "DICOM file without pixel data"),
    ("cut", "cannot decode its pixel data (Explicit VR Little Endian): The number of bytes"),
])
def test_unusable_dicom_files_get_one_line_reasons(kind, reason, tmp_path):
    """Several frames, colour, no pixel data, pixel data cut short: one line each, naming why."""
    grey = np.zeros((2, 8, 8), np.uint16)
    raw = {"frames": lambda: _dicom_bytes(grey, frames=2),
           "colour": lambda: _dicom_bytes(np.zeros((8, 8, 3), np.uint8), "RGB", samples=3),
           "no pixels": lambda: _dicom_bytes(grey[0], pixel_data=False),
           "cut": lambda: _dicom_bytes(grey[0])[:-20]}[kind]()
    path = tmp_path / "x.dcm"
    path.write_bytes(raw)
    # A header's problem is found before decoding (bounds); cut pixel data when decoding.
    assert (bounds.problem(raw, 10**6) is None) == (kind == "cut")
    for got in (checks.check_file(path, 10**6), predict.load(path, 10**6)[2]):
        assert got is not None and got.startswith(reason) and "\n" not in got, got


def test_compressed_without_a_decoder_says_what_would_read_it():
    """JPEG Lossless (process 14), which neither Pillow nor pylibjpeg-openjpeg decodes: the
    reason names the transfer syntax and pydicom's own list of decoders for it."""
    raw = open(get_testdata_file("JPEG-LL.dcm"), "rb").read()
    assert bounds.problem(raw, 10**8) is None  # the header is fine
    with pytest.raises(dicom.DicomError) as raised:
        dicom.to_uint8(raw)
    assert str(raised.value).startswith("its pixel data is compressed as JPEG Lossless, Non-Hierarchical")
    assert "pydicom can use: gdcm" in str(raised.value)


def test_missing_pydicom_names_the_extra(monkeypatch, tmp_path):
    raw = _dicom_bytes(np.zeros((4, 4), np.uint16))
    monkeypatch.setattr(dicom, "pydicom", None)
    path = tmp_path / "x.dcm"
    path.write_bytes(raw)
    for got in (bounds.problem(raw, 10**6), checks.check_file(path, 10**6), predict.load(path, 10**6)[2]):
        assert got == dicom.MISSING and 'pip install "tfcovid[dicom]"' in got


def test_dicom_size_bound_at_both_edges():
    """16 bits + 8 working bytes a pixel: a 10 x 10 file is 1000 bytes decoded, so 334 pixels
    (1002 bytes) pass and 333 (999) are refused; pixels alone: 99 refused."""
    raw = _dicom_bytes(np.zeros((10, 10), np.uint16))
    assert bounds.problem(raw, 334) is None
    assert "decodes to 1,000 bytes: larger than the limit of 999 bytes" in bounds.problem(raw, 333)
    assert "10×10 = 100 pixels: larger than the limit of 99 pixels" in bounds.problem(raw, 99)


def test_dicom_is_recognised_by_content_not_name(tmp_path):
    """The "DICM" magic decides: a DICOM preamble that looks like a JPEG's start is still DICOM;
    .dcm/.dicom names are image files; a file named .dcm that is not DICOM says what it is."""
    raw = bytearray(_dicom_bytes(np.full((6, 6), 7, np.uint16), WindowCenter=7, WindowWidth=10))
    raw[:3] = b"\xff\xd8\xff"
    assert headers.sniff(bytes(raw[:132])) == "DICOM"
    assert _decode(bytes(raw)).shape == (6, 6, 1)
    (tmp_path / "a.dicom").write_bytes(raw)
    assert headers.quick_check(tmp_path / "a.dicom") is None
    (tmp_path / "b.dcm").write_text("hello")
    assert "has a .dcm name but is not a" in headers.quick_check(tmp_path / "b.dcm")


@pytest.mark.slow
def test_fit_on_a_tree_with_dicom_files(binary_tree, tmp_path):
    """A tiny fit (1 epoch, 16 px, the backbone frozen: only the head trains, which is enough
    for the data path) on a tree whose images are partly DICOM: checked, decoded by the train
    and eval pipelines, evaluated."""
    from tfcovid.training import train

    tree = tmp_path / "tree"
    shutil.copytree(binary_tree, tree)
    rng = np.random.default_rng(1)
    for i, folder in enumerate(sorted(p for p in tree.glob("*/*") if p.is_dir())):
        stored = rng.integers(0, 4096, (48, 40)).astype(np.uint16)
        (folder / f"scan{i}.dcm").write_bytes(_dicom_bytes(stored, "MONOCHROME1", bits_stored=12))
    exp = config.resolve(None, {"data.dir": str(tree), "data.image_size": 16, "model.backbone": "resnet18",
                                "model.weights": "none", "model.freeze": "all", "train.epochs": 1, "train.batch_size": 2,
                                "train.optimizer": "adam", "out": str(tmp_path / "runs")})
    lines = []
    run = train.fit(exp, log=lines.append)
    assert (run / "metrics.json").is_file()
    assert "high_bit: used" in (run / "config.yaml").read_text()


# ------------------------------------------------------------------ 16-bit PNGs


def _png16(pixels: np.ndarray, sbit: int | None = None) -> bytes:
    """A 16-bit grey PNG, with an sBIT chunk when given (PIL writes none)."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    h, w = pixels.shape
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 0, 0, 0, 0)
    rows = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    extra = chunk(b"sBIT", bytes([sbit])) if sbit else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


@pytest.mark.parametrize("largest, sbit, bits", [
    (4095, None, 12),    # 12 bits used: 4095 -> 255, not 15
    (2048, None, 12),    # 12 bits (the even count at or above 11)
    (2047, None, 12),    # 11 bits rounds up to 12
    (1023, None, 10),    # under a quarter of 12 bits: 10
    (255, None, 8),      # 8 bits: the values as they are
    (256, None, 10),     # one above: 9 bits rounds up to 10
    (65535, None, 16),   # full range: the high byte, as before
    (32768, None, 16),
    (900, 12, 12),       # sBIT says 12 (without it: 10)
    (5000, 12, 16),      # values past sBIT's 12 bits: scaled as PNG's spec scales them, by 16
    (300, 9, 9),
])
def test_16_bit_png_scaled_by_the_bits_it_uses(largest, sbit, bits):
    pixels = np.linspace(0, largest, 12 * 10).round().astype(np.uint16).reshape(12, 10)
    assert highbit.used_bits(largest, sbit) == bits
    raw = _png16(pixels, sbit)
    assert highbit.png_sbit(raw) == sbit
    expected = (pixels >> (bits - 8)).astype(np.uint8)[..., None]
    np.testing.assert_array_equal(_decode(raw), expected)  # TensorFlow's decode
    np.testing.assert_array_equal(images.decode_png(raw, 1, 0), expected)  # OpenCV's
    # The train side's working resolution: OpenCV's halved decode = decode_base's.
    np.testing.assert_array_equal(images.decode_png(raw, 1, 1), working.decode_base(tf.constant(raw), 5).numpy())


def test_16_bit_png_rule_is_recorded_in_the_config(tmp_path):
    assert HIGH_BIT == (highbit.RULE,)
    exp = config.resolve(None, {"out": str(tmp_path)})
    exp.save(tmp_path / "config.yaml")
    assert "high_bit: used" in (tmp_path / "config.yaml").read_text()
    with pytest.raises(config.ConfigError, match="data.high_bit"):
        config.resolve(None, {"data.high_bit": "full"})


def test_full_range_16_bit_pngs_keep_their_pixels():
    """A full-range 16-bit PNG written by PIL decodes as before: its high byte."""
    v16 = (np.random.default_rng(3).random((16, 16)) * 65535).astype(np.uint16)
    v16[0, 0] = 65535
    buf = io.BytesIO()
    Image.fromarray(v16).save(buf, "PNG")
    np.testing.assert_array_equal(_decode(buf.getvalue())[..., 0], (v16 >> 8).astype(np.uint8))


def test_prepare_and_bench_decode_dicom_as_the_pipelines_do(tmp_path):
    """`tfcovid prepare` stores a DICOM file's image (as a lossless PNG) and `tfcovid bench`'s
    decode reads it: the same pixels as dicom.to_uint8."""
    from tfcovid.bench import pipeline as bench_pipeline
    from tfcovid.data import prepare

    stored = np.random.default_rng(2).integers(0, 4096, (20, 24)).astype(np.uint16)
    raw = _dicom_bytes(stored, "MONOCHROME1", bits_stored=12, WindowCenter=2000, WindowWidth=3000)
    path = tmp_path / "x.dcm"
    path.write_bytes(raw)
    encoded, channels = prepare._reencode(str(path), 0, "png", 95)
    assert int(channels) == 1
    np.testing.assert_array_equal(tf.io.decode_png(encoded).numpy(), dicom.to_uint8(raw))
    first = next(iter(bench_pipeline.decode_only([str(path)])))
    assert first.numpy().tolist() == [dicom.to_uint8(raw)[0, 0, 0]]  # a batch of one pixel


def test_the_first_of_several_windows_is_used():
    """A file offering two windows (as many CR/DX files do): the first one."""
    stored = np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)
    two = dicom.to_uint8(_dicom_bytes(stored, bits_stored=12, WindowCenter=[1000, 3000], WindowWidth=[801, 2001]))
    first = dicom.to_uint8(_dicom_bytes(stored, bits_stored=12, WindowCenter=1000, WindowWidth=801))
    np.testing.assert_array_equal(two, first)
    assert (two == 255).mean() > 0.5  # 1000 +- 400 of 0..4080: most pixels above the window


def test_voi_lut_sequence_is_applied_before_a_window():
    """A VOI LUT Sequence (its first LUT, scaled by its output bits) is preferred to a window,
    as pydicom's apply_voi_lut prefers it; stored values past the LUT take its last entry."""
    from pydicom.sequence import Sequence

    stored = np.arange(0, 256, 1, dtype=np.uint16).reshape(16, 16)
    entries = (np.arange(128) * 2 % 1024).astype(np.uint16)  # 10-bit output, values 0..254
    lut = Dataset()
    lut.LUTDescriptor = [128, 0, 10]
    lut.LUTData = entries.astype("<u2").tobytes()  # OW: 16-bit words
    raw = _dicom_bytes(stored, VOILUTSequence=Sequence([lut]), WindowCenter=9999, WindowWidth=2)
    got = dicom.to_uint8(raw)[..., 0].astype(float)
    mapped = entries[np.minimum(stored, 127)] / 1023 * 255
    assert np.abs(got - mapped).max() <= 0.5 and got.max() < 64


def test_quick_check_names_dicom_by_its_marker(tmp_path):
    """A .dcm name without the DICM marker is not called a non-JPEG/PNG; a DICOM file without a
    .dcm name (a PACS export) is told to be renamed; other names keep their reason."""
    part10 = bytes(128) + b"DICM" + bytes(64)
    files = {"text.dcm": b"hello, not a scan", "IM0001": part10, "notes.txt": b"hello",
             "ok.dcm": part10, "short": b"DI"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    reasons = {name: headers.quick_check(tmp_path / name) for name in files}
    assert reasons["text.dcm"] == ("has a .dcm name but is not a DICOM file (no 'DICM' marker at "
                                   "byte 128; it is text)")
    assert reasons["IM0001"] == "a DICOM file without a .dcm name: rename it to IM0001.dcm"
    assert reasons["notes.txt"].startswith("not an image file: tfcovid reads .jpg")
    assert reasons["short"].startswith("not an image file: tfcovid reads .jpg")
    assert reasons["ok.dcm"] is None
