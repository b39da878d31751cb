"""Sharded TFRecords: prepare -> manifest -> scan/dataset round trip, worker sharding, damage."""

import hashlib
import json
import os
import re
import shutil

import numpy as np
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tfcovid import cli, config, data, records, train
from tfcovid.data import DataError


@pytest.fixture(scope="module")
def prepared(binary_tree, tmp_path_factory):
    """The binary demo tree at its own size (max_side 0: lossless), 2 shards per split."""
    out = tmp_path_factory.mktemp("records") / "binary"
    manifest = records.prepare(binary_tree, out, shards=2, max_side=0, log=lambda s: None)
    return out, manifest


def _relative(split, root):
    return [os.path.relpath(p, root) for p in split.paths]


def test_manifest_counts_shards_and_checksums(binary_tree, prepared):
    out, manifest = prepared
    source = data.scan(binary_tree, "binary")
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
    source, streamed = data.scan(binary_tree, "binary"), data.scan(out, "binary")
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
    batches = list(data.dataset(val, 32, 3))
    images = np.concatenate([x.numpy() for x, _ in batches])
    labels = np.concatenate([y.numpy() for _, y in batches])
    assert images.shape == (len(val), 32, 32, 3) and labels.tolist() == val.labels.tolist()
    for image, name in zip(images, val.paths):
        np.testing.assert_array_equal(image, data.load_image(str(binary_tree / name), 32).numpy())


def test_multilabel_labels_follow_the_label_map(multilabel_tree, tmp_path):
    out = tmp_path / "ml"
    records.prepare(multilabel_tree, out, shards=3, max_side=32, encoding="jpeg", log=lambda s: None)
    source = data.scan(multilabel_tree, "multilabel", config.STUDY_LABELS, config.STUDY_LABEL_MAP)
    streamed = data.scan(out, "multilabel", config.STUDY_LABELS, config.STUDY_LABEL_MAP)
    split, got = source.splits["train"], streamed.splits["train"]
    assert dict(zip(got.paths, got.labels.tolist())) == dict(zip(_relative(split, multilabel_tree),
                                                                 split.labels.tolist()))
    assert {tuple(v) for v in got.labels.tolist()} == {(1, 0, 1), (0, 1, 0), (0, 0, 1)}
    # Re-encoded at max side 32: every stored image is a JPEG no larger than 32 px.
    for raw in tf.data.TFRecordDataset(list(got.shards)).take(5):
        example = tf.io.parse_single_example(raw, records._FEATURES)
        assert example["image"].numpy()[:3] == b"\xff\xd8\xff"
        assert max(tf.io.decode_image(example["image"]).shape[:2]) <= 32
    with pytest.raises(DataError, match="exactly 2 classes"):
        data.scan(out, "binary")


def test_every_path_goes_through_gfile(binary_tree):
    """ram:// is TensorFlow's in-memory filesystem: a stand-in for gs:// that needs no network."""
    root = "ram://tfcovid-test/prepared"
    records.prepare(binary_tree, root, shards=2, max_side=32, log=lambda s: None)
    assert records.is_prepared(root) and records.verify(root) == []
    manifest = data.scan(root, "binary")
    assert manifest.root == root and manifest.splits["train"].shards[0].startswith(root + "/train-")
    val = manifest.splits["validation"]
    labels = np.concatenate([y.numpy() for _, y in data.dataset(val, 32, 3)])
    assert labels.tolist() == val.labels.tolist()


def test_unlabeled_split_and_undecodable_image(binary_tree, tmp_path):
    tree = tmp_path / "tree"
    shutil.copytree(binary_tree, tree, ignore=shutil.ignore_patterns("masks"))
    for image in list((tree / "test").glob("*/*")):  # the study's Part 2 test set: no classes
        image.rename(tree / "test" / image.name)
    for folder in (tree / "test").iterdir():
        if folder.is_dir():
            folder.rmdir()
    records.prepare(tree, tmp_path / "out", shards=2, max_side=32, log=lambda s: None)
    test = data.scan(tmp_path / "out", "binary").splits["test"]
    assert not test.labeled and test.folders == ("",) * 4 and all(p.startswith("test/") for p in test.paths)
    batch = next(iter(data.dataset(test, 32, 4)))
    assert batch.shape == (4, 32, 32, 3)  # images only
    victim = sorted((tree / "train" / "normal").iterdir())[0]
    victim.write_bytes(victim.read_bytes()[:60])  # the header is fine, the pixels are gone
    with pytest.raises(DataError, match=re.escape(f"1 file under {tree} cannot be used:\n"
                                                  f"  train/normal/{victim.name}: cannot be decoded as")):
        records.prepare(tree, tmp_path / "out2", log=lambda s: None)


def test_training_stream_is_sharded_by_file(tmp_path, binary_tree):
    """Two workers: each reads whole shards (3 shards of 3, 3, 2 images -> 5 and 3)."""
    from tensorflow.python.data.experimental.ops.distribute import _AutoShardDataset

    out = tmp_path / "three"
    records.prepare(binary_tree, out, shards=3, max_side=32, log=lambda s: None)
    split = data.scan(out, "binary").splits["train"]
    assert split.shard_counts == (3, 3, 2)
    ds = data.dataset(split, 32, 1, training=True, aug=None, seed=1)
    seen = []
    for worker in range(2):
        images = [x.numpy().tobytes() for x, _ in _AutoShardDataset(ds, 2, worker, num_replicas=2)]
        seen.append({hashlib.sha1(b).hexdigest() for b in images})
        assert len(images) == len(seen[-1])
    assert sorted(map(len, seen)) == [3, 5]  # element-wise (DATA) sharding would give 4 and 4
    assert not seen[0] & seen[1]
    everything = {hashlib.sha1(x.numpy().tobytes()).hexdigest()
                  for x, _ in data.dataset(split, 32, 1).unbatch().batch(1)}
    assert seen[0] | seen[1] == everything
    manifest = data.scan(out, "binary")
    assert records.check_workers(manifest, 1) == [] and "multiple of 2" in records.check_workers(manifest, 2)[0]
    with pytest.raises(DataError, match="--shards 4"):
        records.check_workers(manifest, 4)


def test_augmented_stream_differs_per_epoch(prepared):
    out, _ = prepared
    split = data.scan(out, "binary").splits["train"]
    ds = data.dataset(split, 32, 8, training=True, aug=config.AugmentConfig(), seed=3)
    assert int(ds.cardinality()) == -(-len(split) // 8)  # one reader: its length is known
    shared = data.dataset(split, 32, 8, training=True, aug=config.AugmentConfig(), seed=3, readers=2)
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
    split = data.scan(copy, "binary").splits["train"]
    with pytest.raises(tf.errors.OpError) as caught:
        list(data.dataset(split, 32, 4))
    with pytest.raises(DataError, match=f"{shard.name}: sha256 differs"):
        records.raise_if_damaged(data.scan(copy, "binary"), caught.value)
    assert records.verify(out) == []
    shard.write_bytes(bytes(raw[:-10]))  # truncated: caught when the dataset is opened
    with pytest.raises(DataError, match=f"{shard.name}: {len(raw) - 10} bytes, the manifest says {len(raw)}"):
        data.scan(copy, "binary")


def test_prepare_refuses_bad_input(binary_tree, prepared, tmp_path):
    out, _ = prepared
    with pytest.raises(FileExistsError, match="never overwrites"):
        records.prepare(binary_tree, out)
    with pytest.raises(DataError, match="already a prepared dataset"):
        records.prepare(out, tmp_path / "again")
    with pytest.raises(DataError, match="--shards must be at least 1"):
        records.prepare(binary_tree, tmp_path / "x", shards=0)
    with pytest.raises(DataError, match="Data folder not found"):
        records.prepare(tmp_path / "missing", tmp_path / "y")
    runner = CliRunner()
    result = runner.invoke(cli.main, ["prepare", str(binary_tree), str(out)])
    assert result.exit_code == 1 and "never overwrites" in result.output and "Traceback" not in result.output


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
        shape = records.encoded_shape(tf.constant((tmp_path / name).read_bytes()))
        assert shape.numpy().tolist() == expected, name


def test_batch_decoder_is_the_per_image_path(tmp_path):
    """The training stream's batched OpenCV decode gives exactly the per-image path's views
    (TensorFlow's decode, a plan from the decoded size, OpenCV's resample), also where the
    header's size is wrong or OpenCV is not to decode (planned again from the pixels), and
    TensorFlow's resampler's views within one grey level."""
    from PIL import Image

    from tfcovid import augment

    rng = np.random.default_rng(0)
    files = []
    for i, (h, w, c, name) in enumerate([(60, 80, 1, "a.png"), (70, 50, 3, "b.jpg"), (90, 90, 1, "c.jpg"),
                                         (40, 64, 3, "d.png"), (50, 50, 3, "e.jpg")]):
        pixels = rng.integers(0, 255, (h, w, c), dtype=np.uint8).squeeze()
        image = Image.fromarray(pixels)
        (image.convert("CMYK") if name == "e.jpg" else image).save(tmp_path / name, quality=90)
        files.append((tmp_path / name).read_bytes())
    encoded = tf.constant(files)
    shapes = tf.stack([records.encoded_shape(e) for e in files])
    assert shapes[:, 2].numpy().tolist() == [1, 3, 1, 3, 0]
    shapes = tf.tensor_scatter_nd_update(shapes, [[2, 0]], [45])  # a wrong header
    draws = augment.draws(tf.constant([7, 1], tf.int64), len(files))
    args = (config.AugmentConfig().crop_scale, config.AugmentConfig().crop_ratio, 30.0, True)
    transforms, k = augment.plan(tf.maximum(shapes[:, :2], 1), draws, 32, *args)
    item = (encoded, shapes, transforms, k, draws, tf.range(5, dtype=tf.int64))
    batch = records._batch_decoder(32, args)(item).numpy()
    assert batch.shape == (5, 32, 32, 3)
    # With a store: the first call keeps what OpenCV decoded (not the wrong header's image,
    # nor the CMYK one: those are planned from TensorFlow's pixels each time); the second
    # takes them from it, decoding only the two others, and gives the same batch.
    from tfcovid.cache import ArrayStore

    store = ArrayStore(5, "train")
    np.testing.assert_array_equal(records._batch_decoder(32, args, store)(item).numpy(), batch)
    assert store.state()[0].tolist() == [True, True, False, True, False]
    decoded = []
    real = augment.decode_file
    try:
        augment.decode_file = lambda data_, c, h: decoded.append(data_) or real(data_, c, h)
        np.testing.assert_array_equal(records._batch_decoder(32, args, store)(item).numpy(), batch)
    finally:
        augment.decode_file = real
    assert decoded == [files[2]]  # the wrong header's file (CMYK's header says no channels)
    # In worker processes (data.resample_processes): the same batch, twice; they keep the
    # three OpenCV decodes and the two TensorFlow ones (planned again each time, as above).
    from tfcovid import workers

    in_workers = workers.WorkerStore(5, "train", processes=2)
    for _ in range(2):
        np.testing.assert_array_equal(records._batch_decoder(32, args, in_workers)(item).numpy(), batch)
    assert in_workers.stored(list(range(5))).tolist() == [True] * 5
    in_workers.close()
    for i, data_ in enumerate(files):
        image = records.train_decode(tf.constant(data_))
        t, kk = augment.plan(tf.shape(image)[None, :2], draws[i:i + 1], 32, *args)
        ours = augment._warp(image.numpy(), t[0].numpy(), int(kk[0]), 32)
        np.testing.assert_array_equal(batch[i], np.broadcast_to(ours, (32, 32, 3)))
        theirs = data.gray_to_rgb(augment.apply_uint8(image, t[0], kk[0], 32), 32).numpy()
        assert np.abs(batch[i].astype(int) - theirs).max() <= 1


def test_decoded_records_are_cached(prepared):
    """With a cache, later epochs decode no record: training keeps each record's pixels by
    its position in the split (``test_batch_decoder_is_the_per_image_path`` checks that the
    views from the store are those from a decode), evaluation its resized image (the same
    pixels as without a cache)."""
    from tfcovid import augment
    from tfcovid.cache import Cache

    out, _ = prepared
    splits = data.scan(out, "binary").splits
    train_split, val = splits["train"], splits["validation"]
    policy = Cache("memory", 64)
    cached = data.dataset(train_split, 32, 8, training=True, aug=config.AugmentConfig(), seed=5,
                          cache=policy)
    decoded, epochs = [], []
    real = augment.decode_file
    try:
        augment.decode_file = lambda data_, c, h: decoded.append(1) or real(data_, c, h)
        for _ in range(3):
            before = len(decoded)
            batches = list(cached)
            epochs.append(np.concatenate([x.numpy() for x, _ in batches]))
            labels = np.concatenate([y.numpy() for _, y in batches])
            assert sorted(labels.tolist()) == sorted(train_split.labels.tolist())
            assert len(decoded) - before == (len(train_split) if not before else 0)
    finally:
        augment.decode_file = real
    assert epochs[0].shape == (len(train_split), 32, 32, 3) and epochs[0].std() > 10
    assert not np.array_equal(epochs[1], epochs[2])  # fresh views every epoch, from the store
    store = policy.stores[0]
    assert store.count() == len(train_split) and store.nbytes() > 0
    assert policy.plans[0].startswith("train ~") and "in memory" in policy.plans[0]
    # Evaluation: filled in the first pass, the same pixels in both.
    policy = Cache("memory", 64)
    first = np.concatenate([x.numpy() for x, _ in data.dataset(val, 32, 3, cache=policy)])
    again = np.concatenate([x.numpy() for x, _ in data.dataset(val, 32, 3, cache=policy)])
    plain = np.concatenate([x.numpy() for x, _ in data.dataset(val, 32, 3)])
    np.testing.assert_array_equal(first, plain)
    np.testing.assert_array_equal(again, plain)
    assert policy.stores[0].count() == len(val)
    assert records.cache_estimate(val, 32, False) == 32 * 32 * (val.grayscale + 3 * (len(val) - val.grayscale))
