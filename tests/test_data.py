"""ImageFolder scanning and the tf.data pipeline on tiny images."""

import shutil

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfcovid import config
from tfcovid.data import datasets, decode, folders as data_folders
from tfcovid.data.types import DataError


def _tree(root, splits=("train", "val"), classes=("infected", "normal"), n=2, size=(20, 30)):
    rng = np.random.default_rng(0)
    for split in splits:
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.fromarray((rng.random(size) * 255).astype("uint8")).save(root / split / c / f"{i}.png")
    return root


def test_scan_demo_tree(binary_tree):
    m = data_folders.scan(binary_tree, "binary")
    assert m.class_names == ("infected", "normal")
    assert {k: len(v) for k, v in m.splits.items()} == {"train": 8, "validation": 4, "test": 4}
    train = m.splits["train"]
    assert train.labels.dtype == np.int64
    # Every label is the index of the image's class folder in sorted order.
    for path, label in zip(train.paths, train.labels):
        assert m.class_names[label] in path
    assert m.counts()["train"] == {"infected": 4, "normal": 4}


def test_scan_multilabel_vectors(multilabel_tree):
    m = data_folders.scan(multilabel_tree, "multilabel", config.STUDY_LABELS, config.STUDY_LABEL_MAP)
    assert m.output_names == ("covid-19", "normal", "pneumonia")
    expected = {"covid-19": [1, 0, 1], "normal": [0, 1, 0], "pneumonia": [0, 0, 1]}
    split = m.splits["train"]
    for folder, vector in zip(split.folders, split.labels):
        assert vector.tolist() == expected[folder]


def test_split_names_case_insensitive(tmp_path):
    _tree(tmp_path, splits=("Train", "Validation", "TEST"))
    assert set(data_folders.scan(tmp_path).splits) == {"train", "validation", "test"}


def test_missing_split_is_named(tmp_path):
    _tree(tmp_path, splits=("train",))
    with pytest.raises(DataError, match="has no validation split folder"):
        data_folders.scan(tmp_path)


def test_empty_class_folder_is_named(tmp_path):
    _tree(tmp_path)
    (tmp_path / "val" / "normal").joinpath("0.png").unlink()
    (tmp_path / "val" / "normal").joinpath("1.png").unlink()
    with pytest.raises(DataError, match=r"val/normal holds no images"):
        data_folders.scan(tmp_path)


def test_class_folders_must_match(tmp_path):
    _tree(tmp_path)
    shutil.move(tmp_path / "val" / "normal", tmp_path / "val" / "healthy")
    with pytest.raises(DataError, match=r"Class folders differ between splits: .*/val has \['healthy', "
                                         r"'infected'\] but .*/train has \['infected', 'normal'\]\."):
        data_folders.scan(tmp_path)


def test_fake_image_is_named(tmp_path):
    _tree(tmp_path)
    (tmp_path / "train" / "normal" / "broken.jpg").write_text("not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        data_folders.scan(tmp_path)


def test_non_images_are_listed_not_used(tmp_path):
    _tree(tmp_path)
    (tmp_path / "train" / "normal" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"train/normal/notes.txt: not an image file"):
        data_folders.scan(tmp_path)
    m = data_folders.scan(tmp_path, strict=False)
    assert len(m.splits["train"]) == 4
    assert [b.path for b in m.bad] == [str(tmp_path / "train" / "normal" / "notes.txt")]


def test_binary_needs_two_classes(tmp_path):
    _tree(tmp_path, classes=("a", "b", "c"))
    with pytest.raises(DataError, match="exactly 2 class folders"):
        data_folders.scan(tmp_path)


def test_unmapped_multilabel_folder(tmp_path):
    _tree(tmp_path, classes=("covid-19", "normal", "tuberculosis"))
    with pytest.raises(DataError, match=r"\['tuberculosis'\] have no entry in data.label_map"):
        data_folders.scan(tmp_path, "multilabel", config.STUDY_LABELS, config.STUDY_LABEL_MAP)


def test_unlabeled_test_split(tmp_path):
    _tree(tmp_path)
    (tmp_path / "test").mkdir()
    Image.new("L", (10, 10)).save(tmp_path / "test" / "a.png")
    m = data_folders.scan(tmp_path)
    assert m.splits["test"].labels is None and len(m.splits["test"]) == 1


def _encode(tmp_path, name, array, mode=None):
    path = tmp_path / name
    Image.fromarray(array, mode).save(path)
    return tf.io.read_file(str(path))


def test_decode_every_format_to_uint8(tmp_path):
    gray = np.full((6, 8), 200, np.uint8)
    rgb = np.zeros((6, 8, 3), np.uint8)
    rgb[..., 0] = 255
    cases = {
        "g.png": (gray, None, [200]),
        "g.bmp": (gray, None, [200]),
        "g.gif": (gray, None, [200, 200, 200]),  # GIF decodes as RGB
        "rgb.jpg": (rgb, None, None),
        "rgba.png": (np.dstack([rgb, np.full((6, 8), 7, np.uint8)]), "RGBA", [255, 0, 0]),
        "g16.png": (np.full((6, 8), 65535 // 2, np.uint16), None, [127]),
    }
    for name, (array, mode, expected) in cases.items():
        image = decode.decode_image(_encode(tmp_path, name, array, mode))
        assert image.dtype == tf.uint8 and image.shape[:2] == (6, 8), name
        if expected is not None:
            assert image.shape[-1] == len(expected), name
            assert np.abs(image.numpy()[2, 3].astype(int) - expected).max() <= 1, name
    square = np.full((6, 6), 200, np.uint8)
    rgb_out = decode.to_rgb_uint8(tf.cast(decode.decode_image(_encode(tmp_path, "s.png", square)), tf.float32), 6)
    assert rgb_out.shape == (6, 6, 3) and np.all(rgb_out.numpy() == 200)


def test_pipeline_shapes_and_ranges(binary_tree):
    m = data_folders.scan(binary_tree)
    ds = datasets.dataset(m.splits["train"], 32, 4, training=True, aug=config.AugmentConfig())
    batches = list(ds)
    assert [b[0].shape[0] for b in batches] == [4, 4]
    images, labels = batches[0]
    assert images.shape == (4, 32, 32, 3) and images.dtype == tf.uint8
    assert labels.dtype == tf.int64
    assert 0 <= images.numpy().min() and images.numpy().max() <= 255 and images.numpy().std() > 5


def test_augmentation_changes_train_not_eval(binary_tree):
    m = data_folders.scan(binary_tree)
    split = m.splits["validation"]
    aug = config.AugmentConfig()
    evaluated = [np.concatenate([x.numpy() for x, _ in datasets.dataset(split, 32, 8)]) for _ in range(2)]
    np.testing.assert_array_equal(evaluated[0], evaluated[1])
    trained = datasets.dataset(split, 32, 8, training=True, aug=aug, seed=1)
    x1 = np.concatenate([x.numpy() for x, _ in trained])
    x2 = np.concatenate([x.numpy() for x, _ in trained])
    # Two epochs give different random views; no augmented view equals an eval image.
    assert not any(np.array_equal(a, b) for a in x1 for b in x2)
    assert not any(np.array_equal(a, b) for a in x1 for b in evaluated[0])


def test_eval_resize_matches_reference(tmp_path):
    array = (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)
    Image.fromarray(array).save(tmp_path / "x.png")
    image = decode.load_image(str(tmp_path / "x.png"), 32)
    reference = tf.image.resize(array[..., None].astype(np.float32), [32, 32], antialias=True)
    np.testing.assert_allclose(image.numpy()[..., 0], np.clip(np.round(reference.numpy()[..., 0]), 0, 255), atol=1)
    assert np.array_equal(image.numpy()[..., 0], image.numpy()[..., 2])
