"""Sharded TFRecords: prepare -> manifest -> scan/dataset round trip, worker sharding, damage."""

import hashlib
import json
import os
import re
import shutil
import signal
import threading

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tfcovid import cli, config
from tfcovid.data import datasets, decode, folders as data_folders, prepare as data_prepare, record_stream, records
from tfcovid.utils import signals
from tfcovid.training import train
from tfcovid.data.types import DataError


@pytest.fixture(scope="module")
def prepared(binary_tree, tmp_path_factory):
    """The binary demo tree at its own size (max_side 0: lossless), 2 shards per split."""
    out = tmp_path_factory.mktemp("records") / "binary"
    manifest = data_prepare.prepare(binary_tree, out, shards=2, max_side=0, log=lambda s: None)
    return out, manifest


def _relative(split, root):
    return [os.path.relpath(p, root) for p in split.paths]


def test_manifest_counts_shards_and_checksums(binary_tree, prepared):
    out, manifest = prepared
    source = data_folders.scan(binary_tree, "binary")
    assert json.loads((out / records.MANIFEST).read_text()) == manifest
    assert manifest["class_names"] == ["infected", "normal"]
    assert manifest["labels"]["class_index"] == {"infected": 0, "normal": 1}
    for name, split in source.splits.items():
        info = manifest["splits"][name]
        assert info["images"] == len(split) and info["labeled"]
        assert info["classes"] == source.counts()[name]
        assert [s["file"] for s in info["shards"]] == [f"{name}-0000{i}-of-00002.tfrecord" for i in range(2)]
        assert sum(s["images"] for s in info["shards"]) == len(split)
        assert max(s["images"] for s in info["shards"]) - min(s["images"] for s in info["shards"]) <= 1
        for shard in info["shards"]:
            raw = (out / shard["file"]).read_bytes()
            assert len(raw) == shard["bytes"] and hashlib.sha256(raw).hexdigest() == shard["sha256"]
            assert sum(1 for _ in tf.data.TFRecordDataset(str(out / shard["file"]))) == shard["images"]
        index = json.loads((out / info["index"]).read_text())
        assert sorted(index["names"]) == sorted(_relative(split, binary_tree))


def test_round_trip_same_labels_and_pixels(binary_tree, prepared):
    out, _ = prepared
    source, streamed = data_folders.scan(binary_tree, "binary"), data_folders.scan(out, "binary")
    assert streamed.class_names == source.class_names and streamed.output_names == source.output_names
    assert streamed.counts() == source.counts()
    for name, split in source.splits.items():
        expected = dict(zip(_relative(split, binary_tree), split.labels.tolist()))
        got = streamed.splits[name]
        assert isinstance(got, records.RecordSplit)
        assert dict(zip(got.paths, got.labels.tolist())) == expected
    # Evaluation streams shards in order, so images line up with split.paths and split.labels;
    # PNG at the source size is lossless, so the pixels equal the ImageFolder loader's.
    val = streamed.splits["validation"]
    batches = list(datasets.dataset(val, 32, 3))
    images = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    assert images.shape == (len(val), 32, 32, 3) and labels.tolist() == val.labels.tolist()
    for image, name in zip(images, val.paths):
        np.testing.assert_array_equal(image, decode.load_image(str(binary_tree / name), 32).numpy())


def test_multilabel_labels_follow_the_label_map(multilabel_tree, tmp_path):
    out = tmp_path / "ml"
    data_prepare.prepare(multilabel_tree, out, shards=3, max_side=32, encoding="jpeg", log=lambda s: None)
    source = data_folders.scan(multilabel_tree, "multilabel", config.STUDY_LABELS, config.STUDY_LABEL_MAP)
    streamed = data_folders.scan(out, "multilabel", config.STUDY_LABELS, config.STUDY_LABEL_MAP)
    split, got = source.splits["train"], streamed.splits["train"]
    assert dict(zip(got.paths, got.labels.tolist())) == dict(zip(_relative(split, multilabel_tree),
                                                                 split.labels.tolist()))
    assert {tuple(v) for v in got.labels.tolist()} == {(1, 0, 1), (0, 1, 0), (0, 0, 1)}
    # Re-encoded at max side 32: every stored image is a JPEG no larger than 32 px.
    for raw in tf.data.TFRecordDataset(list(got.shards)).take(5):
        example = tf.io.parse_single_example(raw, records.FEATURES)
        assert example["image"].numpy()[:3] == b"\xff\xd8\xff"
        assert max(tf.io.decode_image(example["image"]).shape[:2]) <= 32
    with pytest.raises(DataError, match="exactly 2 classes"):
        data_folders.scan(out, "binary")


def test_every_path_goes_through_gfile(binary_tree):
    """ram:// is TensorFlow's in-memory filesystem: a stand-in for gs:// that needs no network."""
    root = "ram://tfcovid-test/prepared"
    data_prepare.prepare(binary_tree, root, shards=2, max_side=32, log=lambda s: None)
    assert records.is_prepared(root) and records.verify(root) == []
    manifest = data_folders.scan(root, "binary")
    assert manifest.root == root and manifest.splits["train"].shards[0].startswith(root + "/train-")
    val = manifest.splits["validation"]
    labels = np.concatenate([y.numpy() for _, y in datasets.dataset(val, 32, 3)])
    assert labels.tolist() == val.labels.tolist()


def test_unlabeled_split_and_undecodable_image(binary_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(binary_tree, tree, ignore=shutil.ignore_patterns("masks"))
    for image in list((tree / "test").glob("*/*")):  # the study's Part 2 test set: no classes
        image.rename(tree / "test" / image.name)
    for folder in (tree / "test").iterdir():
        if folder.is_dir():
            folder.rmdir()
    data_prepare.prepare(tree, tmp_path / "out", shards=2, max_side=32, log=lambda s: None)
    test = data_folders.scan(tmp_path / "out", "binary").splits["test"]
    assert not test.labeled and test.folders == ("",) * 4 and all(p.startswith("test/") for p in test.paths)
    batch = next(iter(datasets.dataset(test, 32, 4)))
    assert batch.shape == (4, 32, 32, 3)  # images only
    victim = sorted((tree / "train" / "normal").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])  # the header is fine, the pixels are gone
    with pytest.raises(DataError, match=re.escape(f"1 file under {tree} cannot be used:\n"
                                                  f"  train/normal/{victim.name}: cannot be decoded as")):
        data_prepare.prepare(tree, tmp_path / "out2", log=lambda s: None)


def test_training_stream_is_sharded_by_file(tmp_path, binary_tree):
    """Two workers: each reads whole shards (3 shards of 3, 3, 2 images -> 5 and 3)."""
    from tensorflow.python.data.experimental.ops.distribute import _AutoShardDataset

    out = tmp_path / "three"
    data_prepare.prepare(binary_tree, out, shards=3, max_side=32, log=lambda s: None)
    split = data_folders.scan(out, "binary").splits["train"]
    assert split.shard_counts == (3, 3, 2)
    ds = datasets.dataset(split, 32, 1, training=True, aug=None, seed=1)
    seen = []
    for worker in range(2):
        images = [x.numpy().tobytes() for x, _ in _AutoShardDataset(ds, 2, worker, num_replicas=2)]
        seen.append({hashlib.sha1(b).hexdigest() for b in images})
        assert len(images) == len(seen[-1])
    assert sorted(map(len, seen)) == [3, 5]  # element-wise (DATA) sharding would give 4 and 4
    assert not seen[0] & seen[1]
    everything = {hashlib.sha1(x.numpy().tobytes()).hexdigest()
                  for x, _ in datasets.dataset(split, 32, 1).unbatch().batch(1)}
    assert seen[0] | seen[1] == everything
    manifest = data_folders.scan(out, "binary")
    assert records.check_workers(manifest, 1) == [] and "multiple of 2" in records.check_workers(manifest, 2)[0]
    with pytest.raises(DataError, match="--shards 4"):
        records.check_workers(manifest, 4)


def test_augmented_stream_differs_per_epoch(prepared):
    out, _ = prepared
    split = data_folders.scan(out, "binary").splits["train"]
    ds = datasets.dataset(split, 32, 8, training=True, aug=config.AugmentConfig(), seed=3)
    assert int(ds.cardinality()) == -(-len(split) // 8)  # one reader: its length is known
    shared = datasets.dataset(split, 32, 8, training=True, aug=config.AugmentConfig(), seed=3, readers=2)
    assert int(shared.cardinality()) == tf.data.UNKNOWN_CARDINALITY  # each reader gets some shards
    first, second = (next(iter(ds)) for _ in range(2))
    assert first[0].shape == (8, 32, 32, 3) and first[0].dtype == tf.uint8
    assert sorted(first[1].numpy().tolist()) == sorted(split.labels.tolist())
    assert not np.array_equal(first[0].numpy(), second[0].numpy())


def test_damaged_shards_are_named(prepared, tmp_path):
    out, manifest = prepared
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    shard = copy / manifest["splits"]["train"]["shards"][1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # same size, one flipped byte: only the checksum sees it up front
    shard.write_bytes(bytes(raw))
    split = data_folders.scan(copy, "binary").splits["train"]
    with pytest.raises(tf.errors.OpError) as caught:
        list(datasets.dataset(split, 32, 4))
    with pytest.raises(DataError, match=f"{shard.name}: sha256 differs"):
        records.raise_if_damaged(data_folders.scan(copy, "binary"), caught.value)
    assert records.verify(out) == []
    shard.write_bytes(bytes(raw[:-10]))  # truncated: caught when the dataset is opened
    with pytest.raises(DataError, match=f"{shard.name}: {len(raw) - 10} bytes, the manifest says {len(raw)}"):
        data_folders.scan(copy, "binary")


def test_prepare_refuses_bad_input(binary_tree, prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(FileExistsError, match="never overwrites"):
        data_prepare.prepare(binary_tree, out)
    with pytest.raises(DataError, match="already a prepared dataset"):
        data_prepare.prepare(out, tmp_path / "again")
    with pytest.raises(DataError, match="--shards must be at least 1"):
        data_prepare.prepare(binary_tree, tmp_path / "x", shards=0)
    with pytest.raises(DataError, match="Data folder not found"):
        data_prepare.prepare(tmp_path / "missing", tmp_path / "y")
    with pytest.raises(DataError, match="--max-pixels must be at least 1, got 0"):
        data_prepare.prepare(binary_tree, tmp_path / "z", max_pixels=0)
    runner = CliRunner()
    result = runner.invoke(cli.main, ["prepare", str(binary_tree), str(out)])
    assert result.exit_code == 1 and "never overwrites" in result.output and "Traceback" not in result.output


def _fit_args(data_dir, tmp_path, *more):
    return ["fit", "--data", str(data_dir), "--backbone", "resnet18", "--freeze", "none", "--weights",
            "none", "--image-size", "32", "--epochs", "1", "--batch-size", "4",
            "--out", str(tmp_path / "runs"), *more]


def _needs_main_thread():
    # Signal handlers live there; pytest (and each xdist worker) runs tests in it.
    assert threading.current_thread() is threading.main_thread()


def test_output_appears_only_when_complete(binary_tree, tmp_path):
    """A local OUT_DIR is written as OUT_DIR.partial and renamed; an empty OUT_DIR is fine, a
    leftover .partial (a killed prepare) is refused by name."""
    out, seen = tmp_path / "out", []

    def log(line):
        if line.startswith("train:"):  # the train split is written, not yet the manifest
            partial = os.listdir(tmp_path / "out.partial")
            seen.append((os.listdir(out), "train.index.json" in partial, records.MANIFEST in partial))

    out.mkdir()  # new or empty: an empty one is replaced by the complete folder
    manifest = data_prepare.prepare(binary_tree, out, shards=2, max_side=32, log=log)
    assert seen == [([], True, False)]
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert json.loads((out / records.MANIFEST).read_text()) == manifest and records.verify(out) == []
    (tmp_path / "again.partial").mkdir()
    with pytest.raises(FileExistsError, match=re.escape(
            f"{tmp_path}/again.partial exists: a tfcovid prepare into {tmp_path}/again is running, or one "
            f"was killed (SIGKILL, power loss). If none is running, delete {tmp_path}/again.partial")):
        data_prepare.prepare(binary_tree, tmp_path / "again", log=lambda s: None)
    assert not (tmp_path / "again").exists()


def test_sigterm_removes_the_partial_output(binary_tree, tmp_path):
    _needs_main_thread()
    before = signal.getsignal(signal.SIGTERM)

    def log(line):
        if line.startswith("train:"):  # a real signal, mid-write: shards of one split are on disk
            assert (tmp_path / "out.partial" / "train.index.json").exists()
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(signals.Interrupted) as caught:
        data_prepare.prepare(binary_tree, tmp_path / "out", shards=2, max_side=32, log=log)
    assert caught.value.name == "SIGTERM" and caught.value.exit_code == 143
    assert os.listdir(tmp_path) == []  # neither out nor out.partial
    assert signal.getsignal(signal.SIGTERM) is before


def test_cli_ctrl_c_says_nothing_was_written(binary_tree, tmp_path, monkeypatch):
    _needs_main_thread()
    write_split = data_prepare._write_split

    def interrupted(*args, **kwargs):
        entry = write_split(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGINT)
        return entry

    monkeypatch.setattr(data_prepare, "_write_split", interrupted)
    out = tmp_path / "PK"
    result = CliRunner().invoke(cli.main, ["prepare", str(binary_tree), str(out), "--max-side", "32"])
    assert result.exit_code == 130, result.output
    said = f"tfcovid prepare stopped by SIGINT: nothing was written to {out}."
    assert result.output.strip().splitlines()[-1] == said
    assert "Traceback" not in result.output and os.listdir(tmp_path) == []


def test_incomplete_or_damaged_output_is_named(prepared, binary_tree, tmp_path):
    """Shards without a manifest (a prepare killed before this version, or on gs://) and a
    missing or damaged index file stop with errors naming the folder or file, never a
    traceback, also through fit."""
    out, manifest = prepared
    incomplete = tmp_path / "PK"
    shutil.copytree(out, incomplete)
    (incomplete / records.MANIFEST).unlink()
    said = (f"{incomplete} is an incomplete tfcovid prepare output (no manifest tfcovid-records.json: "
            "the prepare was interrupted): delete it and run tfcovid prepare again.")
    assert records.is_prepared(incomplete) and not records.is_prepared(binary_tree)
    with pytest.raises(DataError, match=re.escape(said)):
        data_folders.scan(incomplete, "binary")
    with pytest.raises(DataError, match=re.escape(said)):  # not "never overwrites"
        data_prepare.prepare(binary_tree, incomplete, log=lambda s: None)
    with pytest.raises(DataError, match=re.escape(said)):  # not "already a prepared dataset"
        data_prepare.prepare(incomplete, tmp_path / "new", log=lambda s: None)
    runner = CliRunner()
    result = runner.invoke(cli.main, _fit_args(incomplete, tmp_path))
    assert result.exit_code == 1 and f"Error: {said}" in result.output, result.output
    assert "Traceback" not in result.output

    damaged = tmp_path / "P1"
    shutil.copytree(out, damaged)
    index = damaged / "train.index.json"
    text = index.read_text()
    index.write_text(text.replace('"names"', '"nameZ"'))  # same size, one letter off
    assert records.verify(damaged) == [f"{index}: sha256 differs from the manifest (damaged)"]
    with pytest.raises(DataError, match=re.escape(f"Cannot read the index {index} (no 'names' list): the "
                                                  "prepared dataset is damaged.")):
        data_folders.scan(damaged, "binary")
    index.unlink()
    assert records.verify(damaged) == [f"{index}: missing"]
    result = runner.invoke(cli.main, _fit_args(damaged, tmp_path))
    assert result.exit_code == 1, result.output
    assert (f"Error: The prepared dataset {damaged} is damaged:\n  {index}: missing\nCopy it again or run "
            "tfcovid prepare again.") in result.output
    assert "Traceback" not in result.output and "NotFoundError" not in result.output


def test_max_pixels_and_skip_bad(binary_tree, tmp_path):
    """prepare's --max-pixels is what its message points to; --skip-bad leaves files out and
    lists them in the log and the manifest."""
    from PIL import Image

    tree = tmp_path / "tree"
    shutil.copytree(binary_tree, tree, ignore=shutil.ignore_patterns("masks"))
    Image.fromarray(np.full((100, 120), 99, np.uint8)).save(tree / "train" / "normal" / "big.png")
    (tree / "validation" / "infected" / "notes.png").write_text("not an image")
    too_big = ("120×100 = 12,000 pixels: larger than the limit of 6,000 pixels (--max-pixels); "
               "downscale it or raise --max-pixels")
    not_image = "not a JPEG/PNG/BMP/GIF image (it is text)"  # after filecheck's words on the name
    with pytest.raises(DataError) as caught:
        data_prepare.prepare(tree, tmp_path / "out", max_side=32, max_pixels=6000, log=lambda s: None)
    message = str(caught.value)
    lines = message.splitlines()
    assert lines[:2] == [f"2 files under {tree} cannot be used:", f"  train/normal/big.png: {too_big}"]
    assert lines[2].startswith("  validation/infected/notes.png: ") and lines[2].endswith(not_image)
    assert lines[3:] == ["Fix or remove these files, or pass --skip-bad to leave them out (listed in the manifest)."]
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    runner = CliRunner()
    result = runner.invoke(cli.main, ["prepare", str(tree), str(tmp_path / "out"), "--max-pixels", "6000"])
    assert result.exit_code == 1 and "larger than the limit of 6,000 pixels (--max-pixels)" in result.output, result.output
    result = runner.invoke(cli.main, ["prepare", str(tree), str(tmp_path / "out"), "--max-pixels", "6000",
                                      "--skip-bad", "--max-side", "32", "--shards", "2"])
    assert result.exit_code == 0, result.output
    assert ("Left out 2 unusable files (listed in the manifest's \"skipped\"):\n"
            f"  train/normal/big.png: {too_big}\n") in result.output
    assert "Wrote 16 images" in result.output
    manifest = json.loads((tmp_path / "out" / records.MANIFEST).read_text())
    skipped = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert sorted(skipped) == ["train/normal/big.png", "validation/infected/notes.png"]
    assert skipped["train/normal/big.png"] == too_big and skipped["validation/infected/notes.png"].endswith(not_image)
    assert manifest["splits"]["train"]["images"] == 8 and manifest["splits"]["validation"]["images"] == 4
    assert "train/normal/big.png" not in data_folders.scan(tmp_path / "out", "binary").splits["train"].paths
    # Without --max-pixels, fit's default applies: the 120x100 image is fine.
    result = runner.invoke(cli.main, ["prepare", str(tree), str(tmp_path / "out2"), "--skip-bad",
                                      "--max-side", "32"])
    assert result.exit_code == 0 and "Left out 1 unusable file " in result.output, result.output
    assert "Wrote 17 images" in result.output


def test_upsampling_note(binary_tree, prepared, tmp_path):
    out = tmp_path / "small"
    data_prepare.prepare(binary_tree, out, shards=1, max_side=32, log=lambda s: None)
    small = data_folders.scan(out, "binary")
    assert records.upsampling_note(small, 64) == (
        f"the records in {out} were prepared at most 32 px on the longer side; training at 64 px "
        "upsamples them (prepare with --max-side 128 or more for 64 px: the random crops zoom in)")
    assert records.upsampling_note(small, 32) is None and records.upsampling_note(small, 16) is None
    assert records.upsampling_note(data_folders.scan(prepared[0], "binary"), 999) is None  # sizes kept
    assert records.upsampling_note(data_folders.scan(binary_tree, "binary"), 999) is None  # ImageFolder


@pytest.mark.slow
def test_cli_prepare_then_fit_and_a_damaged_shard(binary_tree, tmp_path):
    out = tmp_path / "prepared"
    runner = CliRunner()
    result = runner.invoke(cli.main, ["prepare", str(binary_tree), str(out), "--shards", "2",
                                      "--max-side", "48"])
    assert result.exit_code == 0, result.output
    assert "train: 8 images in 2 shard(s)" in result.output and "Wrote 16 images" in result.output
    exp = config.resolve(None, {
        "data.dir": str(out), "data.image_size": 32, "model.backbone": "vgg16", "model.freeze": "all",
        "model.weights": "none", "train.epochs": 1, "train.batch_size": 4, "train.optimizer": "adam",
        "train.lr": 1e-4, "train.jit_compile": "false", "out": str(tmp_path / "runs")})
    lines = []
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = train.fit(exp, log=lines.append)
    assert not [w for w in caught if "ran out of data" in str(w.message)]  # the stream states its length
    summary = json.loads((run / "metrics.json").read_text())
    manifest = json.loads((out / records.MANIFEST).read_text())
    assert summary["images"] == {k: v["images"] for k, v in manifest["splits"].items()}
    for name, split in summary["splits"].items():
        rows = [sum(row) for row in split["confusion_matrix"]]
        assert rows == [manifest["splits"][name]["classes"][c] for c in summary["class_names"]]
    assert any(f"[3/6] Data: {out}" in line for line in lines)
    assert any(line.strip().startswith("Prepared records: their images were checked by `tfcovid prepare`")
               for line in lines) and not any("Checked 0 files" in line for line in lines)
    assert "[6/6] Evaluating train, validation, test" in lines
    # One flipped byte in a train shard: fit stops with an error naming that shard.
    shard = out / manifest["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[40] ^= 0xFF
    shard.write_bytes(bytes(raw))
    result = runner.invoke(cli.main, ["fit", "--data", str(out), "--image-size", "32", "--backbone",
                                      "vgg16", "--freeze", "all", "--weights", "none", "--epochs", "1",
                                      "--batch-size", "4", "--out", str(tmp_path / "runs2")])
    assert result.exit_code == 1, result.output
    assert f"{shard.name}: sha256 differs from the manifest (damaged)" in result.output
    assert "Traceback" not in result.output


def test_encoded_shape_reads_jpeg_and_png_headers(tmp_path):
    """Sizes and OpenCV channel counts from the headers alone; 0 channels where OpenCV's
    decode is not to be tried."""
    from PIL import Image

    grey = np.full((13, 21), 90, np.uint8)
    cases = {"g.jpg": (Image.fromarray(grey), [13, 21, 1]),
             "c.jpg": (Image.fromarray(np.dstack([grey, grey + 9, grey])), [13, 21, 3]),
             "k.jpg": (Image.fromarray(np.dstack([grey] * 3)).convert("CMYK"), [13, 21, 0]),
             "g.png": (Image.fromarray(grey), [13, 21, 1]),
             "a.png": (Image.fromarray(np.dstack([grey] * 4)), [13, 21, 3]),
             "la.png": (Image.fromarray(np.dstack([grey] * 2), "LA"), [13, 21, 1]),
             "p.png": (Image.fromarray(np.dstack([grey] * 3)).convert("P"), [13, 21, 0]),
             "g.bmp": (Image.fromarray(grey), [-1, -1, 0])}
    for name, (image, expected) in cases.items():
        image.save(tmp_path / name)
        shape = record_stream.encoded_shape(tf.constant((tmp_path / name).read_bytes()))
        assert shape.numpy().tolist() == expected, name


def test_batch_decoder_is_the_per_image_path(tmp_path):
    """The training stream's batched OpenCV decode gives exactly the per-image path's views
    (TensorFlow's decode, a plan from the decoded size, OpenCV's resample), also where the
    header's size is wrong or OpenCV is not to decode (planned again from the pixels), and
    TensorFlow's resampler's views within one grey level."""
    from PIL import Image

    from tfcovid.data import augment
    from tfcovid.data.opencv import images as opencv_images

    rng = np.random.default_rng(0)
    files = []
    for i, (h, w, c, name) in enumerate([(60, 80, 1, "a.png"), (70, 50, 3, "b.jpg"), (90, 90, 1, "c.jpg"),
                                         (40, 64, 3, "d.png"), (50, 50, 3, "e.jpg")]):
        pixels = rng.integers(0, 255, (h, w, c), dtype=np.uint8).squeeze()
        image = Image.fromarray(pixels)
        (image.convert("CMYK") if name == "e.jpg" else image).save(tmp_path / name, quality=90)
        files.append((tmp_path / name).read_bytes())
    encoded = tf.constant(files)
    shapes = tf.stack([record_stream.encoded_shape(e) for e in files])
    assert shapes[:, 2].numpy().tolist() == [1, 3, 1, 3, 0]
    shapes = tf.tensor_scatter_nd_update(shapes, [[2, 0]], [45])  # a wrong header
    draws = augment.draws(tf.constant([7, 1], tf.int64), len(files))
    args = (config.AugmentConfig().crop_scale, config.AugmentConfig().crop_ratio, 30.0, True)
    transforms, k = augment.plan(tf.maximum(shapes[:, :2], 1), draws, 32, *args)
    item = (encoded, shapes, transforms, k, draws, tf.range(5, dtype=tf.int64))
    batch = record_stream._batch_decoder(32, args)(item).numpy()
    assert batch.shape == (5, 32, 32, 3)
    # With a store: the first call keeps what OpenCV decoded (not the wrong header's image,
    # nor the CMYK one: those are planned from TensorFlow's pixels each time); the second
    # takes them from it, decoding only the two others, and gives the same batch.
    from tfcovid.data.cache import ArrayStore

    store = ArrayStore(5, "train")
    np.testing.assert_array_equal(record_stream._batch_decoder(32, args, store)(item).numpy(), batch)
    assert store.state()[0].tolist() == [True, True, False, True, False]
    decoded = []
    real = opencv_images.decode_file
    try:
        opencv_images.decode_file = lambda data_, c, h: decoded.append(data_) or real(data_, c, h)
        np.testing.assert_array_equal(record_stream._batch_decoder(32, args, store)(item).numpy(), batch)
    finally:
        opencv_images.decode_file = real
    assert decoded == [files[2]]  # the wrong header's file (CMYK's header says no channels)
    # In worker processes (data.resample_processes): the same batch, twice; they keep the
    # three OpenCV decodes and the two TensorFlow ones (planned again each time, as above).
    from tfcovid.data.opencv import process_pool

    in_workers = process_pool.WorkerStore(5, "train", processes=2)
    for _ in range(2):
        np.testing.assert_array_equal(record_stream._batch_decoder(32, args, in_workers)(item).numpy(), batch)
    assert in_workers.stored(list(range(5))).tolist() == [True] * 5
    in_workers.close()
    for i, data_ in enumerate(files):
        image = record_stream.train_decode(tf.constant(data_))
        t, kk = augment.plan(tf.shape(image)[None, :2], draws[i:i + 1], 32, *args)
        ours = opencv_images._warp(image.numpy(), t[0].numpy(), int(kk[0]), 32)
        np.testing.assert_array_equal(batch[i], np.broadcast_to(ours, (32, 32, 3)))
        theirs = decode.gray_to_rgb(augment.apply_uint8(image, t[0], kk[0], 32), 32).numpy()
        assert np.abs(batch[i].astype(int) - theirs).max() <= 1


def test_decoded_records_are_cached(prepared):
    """With a cache, later epochs decode no record: training keeps each record's pixels by
    its position in the split (``test_batch_decoder_is_the_per_image_path`` checks that the
    views from the store are those from a decode), evaluation its resized image (the same
    pixels as without a cache)."""
    from tfcovid.data.opencv import images as opencv_images
    from tfcovid.data.cache import Cache

    out, _ = prepared
    splits = data_folders.scan(out, "binary").splits
    train_split, val = splits["train"], splits["validation"]
    policy = Cache("memory", 64)
    cached = datasets.dataset(train_split, 32, 8, training=True, aug=config.AugmentConfig(), seed=5,
                          cache=policy)
    decoded, epochs = [], []
    real = opencv_images.decode_file
    try:
        opencv_images.decode_file = lambda data_, c, h: decoded.append(1) or real(data_, c, h)
        for _ in range(3):
            before = len(decoded)
            batches = list(cached)
            epochs.append(np.concatenate([x.numpy() for x, _ in batches]))
            labels = np.concatenate([y.numpy() for _, y in batches])
            assert sorted(labels.tolist()) == sorted(train_split.labels.tolist())
            assert len(decoded) - before == (len(train_split) if not before else 0)
    finally:
        opencv_images.decode_file = real
    assert epochs[0].shape == (len(train_split), 32, 32, 3) and epochs[0].std() > 10
    assert not np.array_equal(epochs[1], epochs[2])  # fresh views every epoch, from the store
    store = policy.stores[0]
    assert store.count() == len(train_split) and store.nbytes() > 0
    assert policy.plans[0].startswith("train ~") and "in memory" in policy.plans[0]
    # Evaluation: filled in the first pass, the same pixels in both.
    policy = Cache("memory", 64)
    first = np.concatenate([x.numpy() for x, _ in datasets.dataset(val, 32, 3, cache=policy)])
    again = np.concatenate([x.numpy() for x, _ in datasets.dataset(val, 32, 3, cache=policy)])
    plain = np.concatenate([x.numpy() for x, _ in datasets.dataset(val, 32, 3)])
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(again, plain)
    assert policy.stores[0].count() == len(val)
    assert record_stream.cache_estimate(val, 32, False) == 32 * 32 * (val.grayscale + 3 * (len(val) - val.grayscale))
