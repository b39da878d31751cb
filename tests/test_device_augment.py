"""data.augment_on device (issue 26): the planned augmentation resampled with keras.ops in the
train step gives the CPU path's pixels, from the same plans, on TensorFlow and on JAX."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from tfcovid.data import augment, batches, pipeline, resident, working
from tfcovid.data.folders import scan
from tfcovid.data.opencv import images as opencv_images
from tfcovid.training import device_augment
from tfcovid.training.device_augment import resample

SIZE = 32


def _smooth(h, w, seed):
    """An X-ray-like smooth picture (gradients and soft blobs), uint8 (h, w, 1)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 40 + 100 * (x / w) + 40 * (y / h) ** 2
    for _ in range(3):
        cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(6, 20)
        img += 60 * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    return np.clip(img, 0, 255).astype(np.uint8)[..., None]


def _batch(sides, seed=0):
    """Images of the given (h, w), padded into one uint8 batch, and their plans at SIZE."""
    images = [_smooth(h, w, seed + i) for i, (h, w) in enumerate(sides)]
    hw = np.array(sides, np.int32)
    source = np.full((len(sides), hw[:, 0].max(), hw[:, 1].max(), 1), 77, np.uint8)  # padding: masked
    for i, image in enumerate(images):
        source[i, : image.shape[0], : image.shape[1]] = image
    u = augment.draws(tf.constant([seed, 1], tf.int64), len(sides))
    transforms, k = augment.plan(hw.astype(np.float32), u, SIZE)
    return images, source, hw, transforms.numpy(), k.numpy()


def _cpu_views(images, transforms, k):
    tf_views = np.stack([augment.apply_uint8(im, transforms[i], k[i], SIZE).numpy() for i, im in enumerate(images)])
    cv_views = np.stack([opencv_images._warp(im, transforms[i], int(k[i]), SIZE) for i, im in enumerate(images)])
    return tf_views, cv_views


def test_device_views_are_the_cpu_paths_pixels():
    """Same images, same plans. k = 1 (no pre-shrink, most views): TensorFlow's resampler's
    pixels exactly, OpenCV's within one grey level. k >= 2 on sides divisible by k: the same
    k x k box average, exact. Sides not divisible by k: the device averages exact k x k blocks
    (geometrically exact), the CPU's area resize stretches the image by h / (h // k): a shift of
    under a source pixel, within 4 grey levels on average on these smooth pictures."""
    rng = np.random.default_rng(1)
    divisible = [tuple(int(v) for v in rng.integers(12, 22, 2) * 6) for _ in range(40)]
    images, source, hw, transforms, k = _batch(divisible)
    levels = batches.max_shrink(hw, SIZE)
    device = resample(source, hw, transforms, k, SIZE, levels).numpy()
    assert device.shape == (40, SIZE, SIZE, 3) and np.all(device[..., :1] == device)  # grey repeated
    tf_views, cv_views = _cpu_views(images, transforms, k)
    assert (k == 1).any() and (k >= 2).any()
    np.testing.assert_array_equal(device[..., :1], tf_views)
    assert np.abs(device[..., :1] - cv_views).max() <= 1

    odd = [tuple(int(v) for v in rng.integers(70, 130, 2)) for _ in range(40)]
    images, source, hw, transforms, k = _batch(odd, seed=5)
    device = resample(source, hw, transforms, k, SIZE, batches.max_shrink(hw, SIZE)).numpy()[..., :1]
    tf_views, _ = _cpu_views(images, transforms, k)
    np.testing.assert_array_equal(device[k == 1], tf_views[k == 1])
    diff = np.abs(device[k > 1] - tf_views[k > 1])
    assert (k > 1).sum() >= 5 and diff.mean() < 4, diff.mean()


def test_device_layer_clips_shrink_to_its_levels_and_masks_padding():
    """Padding never shows (whatever it holds), and a k above the layer's levels uses the
    largest level it has instead of failing."""
    images, source, hw, transforms, k = _batch([(60, 60), (96, 120)], seed=3)
    a = resample(source, hw, transforms, k, SIZE, 3).numpy()
    other = np.full_like(source, 200)
    for i, (h, w) in enumerate(hw):
        other[i, :h, :w] = source[i, :h, :w]
    b = resample(other, hw, transforms, k, SIZE, 3).numpy()
    np.testing.assert_array_equal(a, b)
    big = resample(source, hw, transforms, np.full(2, 9, np.int32), SIZE, 2).numpy()
    two = resample(source, hw, transforms, np.full(2, 2, np.int32), SIZE, 2).numpy()
    np.testing.assert_array_equal(big, two)


@pytest.mark.parametrize("setting,where,replicas,folders,opencv,expected", [
    ("auto", None, 1, True, True, "cpu"),  # a CPU trains: OpenCV stays the default
    ("auto", "GPU:0", 1, True, True, "device"),
    ("device", None, 1, True, True, "device"),  # asked for: also on a CPU (CI tests it)
    ("cpu", "GPU:0", 1, True, True, "cpu"),
    ("auto", "GPU:0", 2, True, True, "cpu"),  # two replicas
    ("device", "GPU:0", 1, False, True, "cpu"),  # a prepared TFRecord split
    ("device", "GPU:0", 1, True, False, "cpu"),  # no OpenCV to decode
])
def test_where_the_augmentation_runs(monkeypatch, setting, where, replicas, folders, opencv, expected):
    monkeypatch.setattr(device_augment.devices, "accelerator", lambda: where)
    chosen, line = device_augment.choose(setting, True, folders, replicas, opencv)
    assert chosen == expected
    if expected == "device":
        assert line.startswith(f"augmentation on {where or 'CPU:0'} (in the train step")
    else:
        assert line.startswith("augmentation on CPU (")
        assert ("not used" in line) == (setting == "device" or (setting == "auto" and where is not None))
    assert device_augment.choose(setting, False, folders, replicas, opencv) == ("cpu", "augmentation off")


def test_device_pipeline_carries_the_cpu_pipelines_plans(binary_tree):
    """Both pipelines over one split, one seed and epoch: the same images in the same order,
    and the device batches resampled give the CPU batches' views (OpenCV: within one grey level
    where no pre-shrink; the demo's odd sizes otherwise, as above)."""
    split = scan(binary_tree, "binary").splits["train"]
    epoch = tf.Variable(3, dtype=tf.int64)
    kw = dict(training=True, aug=_aug(), seed=4, cache="memory", epoch=epoch)
    cpu = list(pipeline.dataset(split, SIZE, 8, **kw))
    device = list(pipeline.dataset(split, SIZE, 8, augment_on="device", **kw))
    assert len(cpu) == len(device) == 1
    (views, labels), (x, device_labels) = cpu[0], device[0]
    np.testing.assert_array_equal(labels, device_labels)
    assert sorted(x) == sorted(device_augment.KEYS) and x["source"].dtype == tf.uint8
    pad = batches.device_pad(working.working_sizes(split, SIZE, 2.0), np.ones((len(split), 2), np.int32))
    assert tuple(x["source"].shape[1:3]) == pad[:2]  # one shape for the split: one compiled step
    levels = batches.max_shrink(working.working_sizes(split, SIZE, 2.0), SIZE)
    ours = resample(x["source"], x["hw"], x["transform"], x["k"], SIZE, levels).numpy()
    plain = x["k"].numpy() == 1
    assert plain.any()
    assert np.abs(ours[plain] - views.numpy()[plain]).max() <= 1
    assert np.abs(ours - views.numpy()).mean() < 4


def _aug():
    from tfcovid.config import AugmentConfig

    return AugmentConfig()


def test_fit_on_the_device_path_saves_the_plain_classifier(binary_tree, tmp_path):
    """One tiny fit with data.augment_on device: the log and metrics.json say where, and the
    checkpoint is the classifier alone (pixels in), as on the CPU path."""
    import keras

    from tfcovid import config
    from tfcovid.training.train import fit

    exp = config.from_dict({
        "data": {"dir": str(binary_tree), "image_size": 16, "augment_on": "device"},
        "model": {"backbone": "resnet18", "weights": "none"},
        "train": {"epochs": 1, "batch_size": 4},
        "out": str(tmp_path),
    })
    lines = []
    run = fit(exp, log=lines.append)
    held = resident.decode_all(scan(binary_tree, "binary").splits["train"], 16, 2.0)
    line = ("      augmentation on CPU:0 (in the train step; data.augment_on device); train images resident "
            f"on the device: {held.nbytes / 2**20:,.1f} MB of data.device_cache_mb 8,192")
    assert line in lines
    assert any(x.startswith("      decoded 8 train images once for the device in ") for x in lines)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["augment_on"] == line.strip()
    assert metrics["augmentation"] == {"on": "device", "images": "resident"}
    model = keras.saving.load_model(run / "checkpoints" / "last.keras", compile=False)
    assert model.input_shape == (None, 16, 16, 3)
    assert not any("device_augment" in layer.name for layer in model.layers)


_JAX_CHECK = r"""
import json, sys, types
import numpy as np
import keras
from tfcovid.training.device_augment import DeviceAugment, DeviceTrainer, resample
data = np.load(sys.argv[1])
views = np.asarray(resample(data["source"], data["hw"], data["transform"], data["k"], 32, 3))
held = types.SimpleNamespace(images=data["source"], hw=data["hw"])  # what data.resident.Resident holds
indexed = {"index": np.array([2, 0, 3, 1]), "transform": data["transform"][[2, 0, 3, 1]], "k": data["k"][[2, 0, 3, 1]]}
resident_views = np.asarray(DeviceAugment(32, 3, held)(indexed))
classifier = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Rescaling(1 / 255),
                               keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
trainer = DeviceTrainer(classifier, 32, 3)
trainer.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
x = {key: data[key] for key in ("source", "hw", "transform", "k")}
before = classifier.get_weights()[0].copy()
history = trainer.fit(x, np.array([0, 1, 0, 1]), batch_size=4, epochs=1, verbose=0)
moved = bool(np.abs(classifier.get_weights()[0] - before).max() > 0)
holding = DeviceTrainer(classifier, 32, 3, held)
holding.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=True)
before = classifier.get_weights()[0].copy()
resident_loss = holding.fit(indexed, np.array([0, 0, 1, 1]), batch_size=4, epochs=1, verbose=0).history["loss"][0]
print(json.dumps({"backend": keras.backend.backend(), "max_diff": float(np.abs(views - data["expected"]).max()),
                  "resident_diff": float(np.abs(resident_views - data["expected"][[2, 0, 3, 1]]).max()),
                  "moved": moved, "loss": history.history["loss"][0],
                  "resident_moved": bool(np.abs(classifier.get_weights()[0] - before).max() > 0),
                  "resident_loss": resident_loss}))
"""


def test_jax_backend_gives_the_same_views_and_trains(tmp_path):
    """KERAS_BACKEND=jax (Keras picks its backend at import: a subprocess): the layer's views
    equal TensorFlow's, streamed and with the images resident (indices in), and a jit-compiled
    train step through DeviceTrainer updates the classifier's own weights either way."""
    images, source, hw, transforms, k = _batch([(60, 60), (96, 120), (66, 90), (150, 100)], seed=9)
    expected = resample(source, hw, transforms, k, SIZE, 3).numpy()
    path = tmp_path / "batch.npz"
    np.savez(path, source=source, hw=hw, transform=transforms, k=k, expected=expected)
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run([sys.executable, "-c", _JAX_CHECK, str(path)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["backend"] == "jax"
    assert result["max_diff"] == 0.0  # float32 gathers and weights in the same order
    assert result["moved"] and np.isfinite(result["loss"])
    assert result["resident_diff"] == 0.0  # resident images gathered by index on JAX: the same views
    assert result["resident_moved"] and np.isfinite(result["resident_loss"])


@pytest.mark.parametrize("value", ["auto", "cpu", "device"])
def test_augment_on_takes_its_three_values(value):
    from tfcovid import config

    assert config.from_dict({"data": {"augment_on": value}}).data.augment_on == value


@pytest.mark.parametrize("value", ["gpu", "Device", ""])
def test_augment_on_refuses_anything_else_naming_the_key(value):
    from tfcovid import config

    with pytest.raises(config.ConfigError, match=r"'data.augment_on'.*Valid values: auto, cpu, device"):
        config.from_dict({"data": {"augment_on": value}})


def _resident_and_streamed(split, size=SIZE, batch=4, epoch=3):
    """The same epoch of ``split`` as streamed device batches and as resident ones, with the
    decoded images the resident ones index."""
    held = resident.decode_all(split, size, 2.0)
    kw = dict(training=True, aug=_aug(), seed=4, cache="memory", epoch=tf.Variable(epoch, dtype=tf.int64))
    streamed = list(pipeline.dataset(split, size, batch, augment_on="device", **kw))
    indexed = list(pipeline.dataset(split, size, batch, augment_on="resident", sizes=held.hw, **kw))
    return held, streamed, indexed


def test_resident_batches_carry_indices_and_give_the_streamed_views(binary_tree):
    """Resident images: a batch is each image's index, transform and shrink factor (no pixels);
    the layer gathers the images itself and gives exactly the streamed path's views, labels
    and order (same decode, same plans)."""
    split = scan(binary_tree, "binary").splits["train"]
    held, streamed, indexed = _resident_and_streamed(split)
    levels = batches.max_shrink(working.working_sizes(split, SIZE, 2.0), SIZE)
    plain, holding = device_augment.DeviceAugment(SIZE, levels), device_augment.DeviceAugment(SIZE, levels, held)
    assert len(streamed) == len(indexed) == 2
    seen = []
    for (x, labels), (r, resident_labels) in zip(streamed, indexed):
        assert sorted(r) == sorted(device_augment.RESIDENT_KEYS)
        assert r["index"].shape == (4,) and r["transform"].shape == (4, 8) and r["k"].shape == (4,)
        np.testing.assert_array_equal(labels, resident_labels)
        np.testing.assert_array_equal(r["transform"], x["transform"])
        np.testing.assert_array_equal(holding(r).numpy(), plain(x).numpy())
        seen += r["index"].numpy().tolist()
    assert sorted(seen) == list(range(len(split)))  # each image once per epoch


def test_decode_all_keeps_each_size_and_pads_with_zeros(binary_tree):
    """The resident array: each image at its working size in the top-left corner, zeros around,
    one channel for grey; its pixels are what decode_base gives the file."""
    split = scan(binary_tree, "binary").splits["train"]
    held = resident.decode_all(split, SIZE, 2.0)
    np.testing.assert_array_equal(held.hw, working.working_sizes(split, SIZE, 2.0))
    assert held.images.shape == (len(split), *held.hw.max(axis=0), 1) and held.images.dtype == np.uint8
    for i, path in enumerate(split.paths):
        h, w = held.hw[i]
        expected = working.decode_base(tf.io.read_file(path), working.working_side(SIZE, 2.0)).numpy()
        np.testing.assert_array_equal(held.images[i, :h, :w], expected[..., :1])
        assert not held.images[i, h:].any() and not held.images[i, :, w:].any()
    # From the headers, before decoding: these RGB-saved grey PNGs count three channels.
    assert resident.planned_bytes(split, SIZE, 2.0) == 3 * held.nbytes


def test_pack_repeats_grey_where_a_batch_has_colour():
    grey, colour = np.full((2, 3, 1), 7, np.uint8), np.arange(24, dtype=np.uint8).reshape(2, 4, 3)
    held = resident.pack([grey, colour])
    assert held.images.shape == (2, 2, 4, 3) and held.hw.tolist() == [[2, 3], [2, 4]]
    assert (held.images[0, :, :3] == 7).all() and not held.images[0, :, 3].any()
    np.testing.assert_array_equal(held.images[1], colour)


@pytest.mark.parametrize("nbytes, budget_mb, expected", [
    (1, 0, False),  # 0: always streamed
    (2**20, 1, True),  # exactly the budget
    (2**20 + 1, 1, False),  # one byte over
    (0, 1, True),
    (5 * 2**30, 8192, True),
    (8 * 2**30 + 1, 8192, False),
])
def test_resident_when_the_images_fit_the_budget(nbytes, budget_mb, expected):
    assert resident.fits(nbytes, budget_mb) is expected
    said = resident.describe(nbytes, budget_mb)
    assert said.startswith("train images resident on the device" if expected else "train images streamed")


@pytest.mark.parametrize("value", [0, 1, 8192, 2**20])
def test_device_cache_mb_takes_0_to_1_tib(value):
    from tfcovid import config

    assert config.from_dict({"data": {"device_cache_mb": value}}).data.device_cache_mb == value


@pytest.mark.parametrize("value, why", [(-1, "Use 0"), (2**20 + 1, "Use 0"), (True, "integer"), (1.5, "integer")])
def test_device_cache_mb_refuses_outside_its_range(value, why):
    from tfcovid import config

    with pytest.raises(config.ConfigError, match=rf"'data.device_cache_mb'.*{why}"):
        config.from_dict({"data": {"device_cache_mb": value}})


def test_resident_and_streamed_training_take_the_same_steps(binary_tree):
    """One epoch through DeviceTrainer from resident batches and from streamed ones, from the
    same start: the same views, so the same gradients and the same weights after."""
    import keras

    split = scan(binary_tree, "binary").splits["train"]
    held, streamed, indexed = _resident_and_streamed(split)
    levels = batches.max_shrink(working.working_sizes(split, SIZE, 2.0), SIZE)
    weights, start = [], None
    for batches_, images in ((streamed, None), (indexed, held)):
        keras.utils.set_random_seed(0)
        classifier = keras.Sequential([keras.Input((SIZE, SIZE, 3)), keras.layers.Rescaling(1 / 255),
                                       keras.layers.Conv2D(2, 3), keras.layers.GlobalAveragePooling2D(),
                                       keras.layers.Dense(2)])
        start = classifier.get_weights()
        trainer = device_augment.DeviceTrainer(classifier, SIZE, levels, images)
        trainer.compile(optimizer=keras.optimizers.SGD(0.1),
                        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        for x, y in batches_:
            trainer.train_on_batch(x, tf.cast(y, tf.int32))
        weights.append(classifier.get_weights())
        assert len(trainer.non_trainable_weights) == (2 if images else 0)  # the images and their sizes
    for ours, theirs in zip(*weights):
        np.testing.assert_array_equal(ours, theirs)
    assert np.abs(weights[1][1] - start[1]).max() > 0  # the steps did move the weights
