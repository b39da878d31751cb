"""A prepared dataset whose shards are framed correctly but hold a damaged image (issue 22.4):
named by shard and record before training (sha256 against the manifest), and named the same
way when it is met while reading (verification off, or a manifest rewritten to match), never
a TensorFlow traceback."""

import hashlib
import json
import re
import shutil
from types import SimpleNamespace

import keras
import pytest
import tensorflow as tf
from click.testing import CliRunner

from tfcovid import cli
from tfcovid.data import folders as data_folders
from tfcovid.data import prepare as data_prepare
from tfcovid.data import records
from tfcovid.data.types import DataError
from tfcovid.inference import evaluate


@pytest.fixture(scope="module")
def prepared(binary_tree, tmp_path_factory):
    """The binary demo tree as PNG records, 2 shards per split (train: 4 records each)."""
    out = tmp_path_factory.mktemp("records") / "binary"
    data_prepare.prepare(binary_tree, out, shards=2, max_side=0, log=lambda s: None)
    return out


def _damage(root, split, shard, damaged=(1,)):
    """Re-write one shard with the images of records ``damaged`` (0-based) broken in the middle
    and every record's framing (lengths, CRCs) valid, as tf.io.TFRecordWriter writes it; same
    record count, same names. Returns the shard's path and the damaged records' names."""
    manifest = json.loads((root / records.MANIFEST).read_text())
    path = root / manifest["splits"][split]["shards"][shard]["file"]
    out, names = [], []
    for i, raw in enumerate(tf.data.TFRecordDataset(str(path)).as_numpy_iterator()):
        example = tf.train.Example.FromString(raw)
        if i in damaged:
            image = example.features.feature["image"].bytes_list.value
            data = image[0]
            image[0] = data[:len(data) // 2] + bytes(255 - b for b in data[len(data) // 2:-12]) + data[-12:]
            names.append(example.features.feature["name"].bytes_list.value[0].decode())
        out.append(example.SerializeToString())
    with tf.io.TFRecordWriter(str(path)) as writer:
        for raw in out:
            writer.write(raw)
    assert sum(1 for _ in tf.data.TFRecordDataset(str(path))) == len(out)  # framing intact
    return path, names


def _copy(prepared, tmp_path):
    copy = tmp_path / "P"
    shutil.copytree(prepared, copy)
    return copy


def _fit(data, tmp_path, *more):
    args = ["fit", "--data", str(data), "--backbone", "resnet18", "--freeze", "none", "--weights", "none",
            "--image-size", "32", "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "runs"), *more]
    return CliRunner().invoke(cli.main, args)


def _rewrite_digest(root, path):
    """The manifest made to match the damaged shard (as a hostile or careless re-hash would)."""
    manifest = json.loads((root / records.MANIFEST).read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            if entry["file"] == path.name:
                entry["bytes"] = path.stat().st_size
                entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / records.MANIFEST).write_text(json.dumps(manifest))


def test_fit_names_the_shard_and_record_before_training(prepared, tmp_path):
    root = _copy(prepared, tmp_path)
    path, (name,) = _damage(root, "train", 0)
    assert records.verify(root) == [f"{path}: sha256 differs from the manifest (damaged)"]
    assert records.verify(root, checksums=False) == []  # same size: only the digest sees it
    result = _fit(root, tmp_path)
    assert result.exit_code == 1, result.output
    assert (f"Error: The prepared dataset {root} is damaged:\n  {path}: sha256 differs from the manifest "
            f"(damaged); record 2 of 4 ({name}): its image cannot be decoded (Invalid PNG data") in result.output
    assert "Copy it again or run tfcovid prepare again." in result.output
    assert "[5/6] Training" not in result.output  # stopped before the model was built
    assert "Traceback" not in result.output and "Error in user-defined function" not in result.output


def test_fit_without_verification_names_them_when_met(prepared, tmp_path):
    root = _copy(prepared, tmp_path)
    path, (name,) = _damage(root, "train", 1, damaged=(3,))
    result = _fit(root, tmp_path, "--set", "data.verify_records=false")
    assert result.exit_code == 1, result.output
    assert "[5/6] Training" in result.output and "Verified" not in result.output
    assert (f"  {path}: sha256 differs from the manifest (damaged); record 4 of 4 ({name}): its image "
            "cannot be decoded (Invalid PNG data") in result.output
    assert re.search(r"Copy it again or run tfcovid prepare again\. \(TensorFlow said: Invalid PNG data, "
                     r"size \d+\)", result.output), result.output
    assert "Traceback" not in result.output


def test_verified_shards_are_logged(prepared, tmp_path):
    manifest = data_folders.scan(prepared, "binary")
    lines = []
    records.check_digests(manifest, lines.append)
    total = sum(p.stat().st_size for p in prepared.glob("*.tfrecord")) / 2**20
    assert len(lines) == 1 and lines[0].startswith(f"Verified 6 shards ({total:,.1f} MiB) against the "
                                                   "manifest's sha256 in "), lines
    assert lines[0].endswith(" s (data.verify_records: false skips this)")


def test_matching_digests_still_name_an_undecodable_record(prepared, tmp_path):
    """A manifest re-hashed after the damage: the read error's decode message sends the search
    through every shard; an error that is not about an image is left as it was."""
    root = _copy(prepared, tmp_path)
    path, names = _damage(root, "validation", 0, damaged=(0, 1))
    _rewrite_digest(root, path)
    assert records.verify(root) == []
    err = tf.errors.InvalidArgumentError(None, None, "{{function_node x}} Invalid PNG data, size 9 [Op:DecodeImage]")
    with pytest.raises(DataError) as caught:
        records.explain_read_error(root, err)
    n = json.loads((root / records.MANIFEST).read_text())["splits"]["validation"]["shards"][0]["images"]
    assert str(caught.value).splitlines()[1] == (
        f"  {path}: record 1 of {n} ({names[0]}): its image cannot be decoded (Invalid PNG data, size "
        f"{_png_size(path, 0)}); record 2 of {n} ({names[1]}): its image cannot be decoded (Invalid PNG "
        f"data, size {_png_size(path, 1)})")
    assert str(caught.value).endswith("(TensorFlow said: Invalid PNG data, size 9)")
    records.explain_read_error(root, tf.errors.InvalidArgumentError(None, None, "Incompatible shapes"))
    records.explain_read_error(root, ValueError("Invalid PNG data"))  # not a read error: nothing


def _png_size(path, index):
    raw = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())[index]
    return len(tf.train.Example.FromString(raw).features.feature["image"].bytes_list.value[0])


def test_more_than_three_bad_records_are_counted(prepared, tmp_path):
    root = _copy(prepared, tmp_path)
    path, names = _damage(root, "train", 0, damaged=(0, 1, 2, 3))
    with pytest.raises(DataError) as caught:
        records.check_digests(data_folders.scan(root, "binary"), lambda line: None)
    line = str(caught.value).splitlines()[1]
    assert [f"({n})" in line for n in names] == [True, True, True, False]  # three named
    assert line.endswith("; record 3 of 4 (" + names[2] + "): its image cannot be decoded (Invalid PNG data, "
                         f"size {_png_size(path, 2)}); 1 more such records")


def test_evaluate_names_a_damaged_test_shard(prepared, tmp_path):
    root = _copy(prepared, tmp_path)
    path, (name,) = _damage(root, "test", 1, damaged=(0,))
    split = data_folders.scan(root, "binary").splits["test"]
    model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.GlobalAveragePooling2D(),
                              keras.layers.Dense(2, activation="softmax")])
    trained = SimpleNamespace(model=model, image_size=32, task="binary")
    with pytest.raises(DataError, match=re.escape(f"{path}: sha256 differs from the manifest (damaged); "
                                                  f"record 1 of 2 ({name}): its image cannot be decoded")):
        evaluate.predict_split(trained, split, batch_size=2)
