"""The train/eval pipeline: working resolution, the decoded-image cache, epochs and ranges."""

import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from tfcovid import config
from tfcovid.data import cache, datasets, pipeline, sizes, types, working
from tfcovid.data import decode as data_decode
from tfcovid.data.opencv import images

AUG = config.AugmentConfig()


def _write(path, array, fmt=None, quality=95):
    Image.fromarray(array).save(path, fmt, quality=quality) if fmt == "JPEG" else Image.fromarray(array).save(path)
    return str(path)


def _smooth(h, w, channels=1, seed=0):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = 128 + 80 * np.sin(6 * x + rng.uniform(0, 3)) * np.cos(4 * y) + rng.normal(0, 3, (h, w))
    img = np.clip(base, 0, 255).astype(np.uint8)
    return img if channels == 1 else np.stack([img, img[::-1], 255 - img], -1)


@pytest.fixture(scope="module")
def mixed_split(tmp_path_factory):
    """Six files: grayscale and RGB, JPEG and PNG, different sizes; label = index."""
    root = tmp_path_factory.mktemp("mixed")
    specs = [(200, 160, 1, "JPEG"), (130, 170, 3, "JPEG"), (150, 150, 1, "PNG"), (96, 120, 3, "PNG"),
             (260, 200, 1, "JPEG"), (40, 50, 1, "PNG")]
    paths = [_write(root / f"img{i}.{'jpg' if fmt == 'JPEG' else 'png'}", _smooth(h, w, c, i), fmt)
             for i, (h, w, c, fmt) in enumerate(specs)]
    labels = np.arange(len(paths), dtype=np.int64)
    return types.Split("train", str(root), tuple(paths), labels, ("x",) * len(paths))


def _bytes(path):
    return tf.io.read_file(path)


def test_decode_base_jpeg_uses_dct_scaling(tmp_path):
    path = _write(tmp_path / "big.jpg", _smooth(1000, 1200), "JPEG")
    image = working.decode_base(_bytes(path), 200).numpy()
    assert image.shape == (250, 300, 1) and image.dtype == np.uint8  # 1/4 scale: 250 >= 200 > 125
    full = data_decode.decode_image(_bytes(path)).numpy().astype(np.float32)
    box = full.reshape(250, 4, 300, 4, 1).mean(axis=(1, 3))
    assert np.abs(image - box).mean() < 2  # libjpeg's scaled IDCT is a proper 4x downscale
    np.testing.assert_array_equal(working.decode_base(_bytes(path), None), data_decode.decode_image(_bytes(path)))


def test_decode_base_png_box_average_and_never_upscales(tmp_path):
    rgb = _smooth(203, 161, 3)
    path = _write(tmp_path / "x.png", rgb)
    image = working.decode_base(_bytes(path), 40).numpy()
    assert image.shape == (50, 40, 3)  # 161 / 4 >= 40: halved twice, odd rows dropped
    expected = rgb[:200, :160].astype(np.float64).reshape(50, 4, 40, 4, 3).mean(axis=(1, 3))
    assert np.abs(image - expected).max() <= 1
    small = working.decode_base(_bytes(path), 400).numpy()
    np.testing.assert_array_equal(small, rgb)


def test_working_side():
    assert working.working_side(224, 2.0) == 448
    assert working.working_side(224, 0) is None


@pytest.mark.parametrize("resampler", ["opencv", "tensorflow"])
@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cache_holds_exactly_a_fresh_decode(mixed_split, mode, resampler, tmp_path, monkeypatch):
    """OpenCV's path keeps NumPy arrays (ArrayStore), TensorFlow's a table or tensor files
    (ImageStore); either way the cache holds exactly what decode_base gives."""
    from tfcovid.data import augment

    monkeypatch.setattr(augment, "resampler", lambda: resampler)
    policy = cache.Cache(mode, directory=str(tmp_path / "c"))
    ds = datasets.dataset(mixed_split, 32, 4, training=True, aug=AUG, cache=policy, decode_scale=2.0)
    first = [lab for _, y in ds for lab in y.numpy()]
    store = policy.stores[0]
    assert isinstance(store, cache.ArrayStore if resampler == "opencv" else cache.ImageStore)
    assert sorted(first) == list(range(len(mixed_split))) and store.count() == len(mixed_split)
    total = 0
    for i, path in enumerate(mixed_split.paths):
        found, cached = store.lookup(tf.constant(i, tf.int64))
        fresh = working.decode_base(_bytes(path), 64)
        assert bool(found)
        np.testing.assert_array_equal(cached.numpy(), fresh.numpy())
        total += cached.numpy().size
    assert cached.shape[-1] == 1  # grayscale stays one channel in the cache
    assert total <= store.nbytes() <= total + 1024 * len(mixed_split)
    if mode == "disk":
        assert len(os.listdir(store.directory)) == len(mixed_split)
        assert os.path.dirname(store.directory) == str(tmp_path / "c")
    assert mode in policy.usage()


def test_every_epoch_is_a_full_reshuffle_with_fresh_views(mixed_split):
    ds = datasets.dataset(mixed_split, 32, 3, training=True, aug=AUG, cache="memory", seed=3)
    epochs = [[(x.numpy(), y.numpy()) for x, y in ds] for _ in range(3)]
    orders = []
    for batches in epochs:
        labels = np.concatenate([y for _, y in batches])
        assert sorted(labels) == list(range(6))  # every image exactly once
        orders.append(tuple(labels))
        for x, _ in batches:
            assert x.shape[1:] == (32, 32, 3) and x.dtype == np.uint8
    assert len(set(orders)) > 1  # reshuffled
    views = [{int(lab): x[k] for x, y in b for k, lab in enumerate(y)} for b in epochs]
    # Later epochs come from the cache yet are new random views of the same image.
    assert all(not np.array_equal(views[0][i], views[1][i]) for i in range(6))


def test_cached_eval_equals_uncached_and_load_image(mixed_split):
    plain = np.concatenate([x.numpy() for x, _ in datasets.dataset(mixed_split, 24, 4)])
    cached_ds = datasets.dataset(mixed_split, 24, 4, cache="memory")
    for _ in range(2):  # first pass fills, second reads back
        np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in cached_ds]), plain)
    for i, path in enumerate(mixed_split.paths):
        np.testing.assert_array_equal(plain[i], data_decode.load_image(path, 24).numpy())


def test_no_cache_matches_cached_first_epoch(mixed_split):
    """The cache changes nothing but speed: same seed, same images, with or without it."""
    def epoch(cache_mode):
        ds = datasets.dataset(mixed_split, 32, 6, training=True, aug=AUG, cache=cache_mode, seed=5)
        x, y = next(iter(ds))
        return x.numpy()[np.argsort(y.numpy())]
    np.testing.assert_array_equal(epoch(None), epoch("memory"))


def test_auto_cache_uses_memory_within_budget_and_disk_beyond(mixed_split, tmp_path):
    estimate = sizes.estimate_bytes(mixed_split.paths, 32, 64, training=True)
    roomy = cache.Cache("auto", budget_mb=1, directory=str(tmp_path))
    ds = datasets.dataset(mixed_split, 32, 6, training=True, aug=AUG, cache=roomy)
    for _ in ds:
        pass
    assert roomy.stores[0].mode == "memory"
    assert abs(roomy.nbytes() - estimate) <= 0.15 * roomy.nbytes()  # header-based estimate
    assert "memory budget 1 MB" in roomy.describe()
    tight = cache.Cache("auto", budget_mb=0, directory=str(tmp_path))
    datasets.dataset(mixed_split, 32, 6, training=True, aug=AUG, cache=tight)
    datasets.dataset(mixed_split, 32, 6, cache=tight)
    assert [s.mode for s in tight.stores] == ["disk", "disk"]
    assert "disk" in tight.describe()
    assert cache.Cache("none").describe().startswith("decoded-image cache off")


def test_cached_pixels_formula():
    # 1024 x 1024 gray JPEG at S = 224, decode_scale 2: 1/2 scale (512 >= 448 > 256).
    assert sizes.cached_pixels(1024, 1024, 1, True, 224, 448, True) == 512 * 512
    assert sizes.cached_pixels(1024, 1024, 1, True, 224, 448, False) == 224 * 224
    assert sizes.cached_pixels(203, 161, 3, False, 16, 40, True) == 50 * 40 * 3
    assert sizes.cached_pixels(203, 161, 3, False, 16, 50, True) == 101 * 80 * 3
    assert sizes.cached_pixels(100, 100, 1, True, 224, 448, True) == 100 * 100  # never upscaled


def test_bad_cache_arguments():
    with pytest.raises(ValueError, match="Valid modes: auto, memory, disk, none"):
        cache.Cache("ram")
    with pytest.raises(TypeError, match="cache must be None"):
        cache.as_cache(3)
    with pytest.raises(config.ConfigError, match="data.decode_scale"):
        config.from_dict({"data": {"decode_scale": 0.5}})
    assert config.from_dict({"data": {"decode_scale": 0, "cache": "disk"}}).data.decode_scale == 0


def test_full_resolution_decode_scale_zero(mixed_split):
    policy = cache.Cache("memory")
    ds = datasets.dataset(mixed_split, 16, 6, training=True, aug=AUG, cache=policy, decode_scale=0)
    for _ in ds:
        pass
    found, image = policy.stores[0].lookup(tf.constant(4, tf.int64))
    assert image.shape == (260, 200, 1)


def test_unlabeled_split_and_disabled_augmentation(mixed_split):
    unlabeled = types.Split("test", mixed_split.dir, mixed_split.paths, None, ("",) * 6)
    batches = list(datasets.dataset(unlabeled, 24, 4, cache="memory"))
    assert [b.shape for b in batches] == [(4, 24, 24, 3), (2, 24, 24, 3)]  # images only
    off = config.AugmentConfig(enabled=False)
    x, y = next(iter(datasets.dataset(mixed_split, 24, 6, training=True, aug=off, seed=1)))
    resized = np.stack([data_decode.load_image(p, 24).numpy() for p in mixed_split.paths])
    np.testing.assert_array_equal(x.numpy(), resized[y.numpy()])  # shuffled, resize only


def test_file_plan_sizes_and_decoders_match_decode_base(mixed_split, tmp_path):
    # Mixed formats: sizes from the headers equal the decoded working sizes; general decoder.
    shapes, decode, _ = working.file_plan(mixed_split.paths, 64)
    for path, shape in zip(mixed_split.paths, shapes):
        expected = working.decode_base(_bytes(path), 64)
        assert tuple(shape) == tuple(expected.shape[:2])
        np.testing.assert_array_equal(decode(_bytes(path)), expected)
    # One kind of JPEG (grey, 1/4 scale here): a single decode_jpeg, the same pixels.
    same = [_write(tmp_path / f"g{i}.jpg", _smooth(1000, 1200 - 8 * i, seed=i), "JPEG") for i in range(2)]
    shapes, decode, _ = working.file_plan(same, 200)
    for path, shape in zip(same, shapes):
        expected = working.decode_base(_bytes(path), 200)
        assert tuple(shape) == tuple(expected.shape[:2]) and expected.shape[0] == 250
        np.testing.assert_array_equal(decode(_bytes(path)), expected)
    # Powers of two exactly at the limit: halved while the shorter side stays >= min_side.
    assert sizes.working_shape(896, 1000, True, 448) == (448, 500)
    assert sizes.working_shape(895, 1000, True, 448) == (895, 1000)  # 447 < 448: not halved
    assert sizes.working_shape(897, 1001, True, 448) == (449, 501)  # libjpeg rounds up
    assert sizes.working_shape(897, 1001, False, 448) == (448, 500)  # pooling drops the odd row


def test_header_sizes_are_only_a_shortcut(mixed_split, monkeypatch):
    """An epoch is planned from the files' headers; where a header is wrong or unreadable the
    image is planned from its decoded pixels instead, and the batches are the same."""
    def epoch():
        ds = datasets.dataset(mixed_split, 32, 6, training=True, aug=AUG, cache="memory", seed=9)
        x, y = next(iter(ds))
        return x.numpy()[np.argsort(y.numpy())]

    truth = epoch()
    real = sizes.header

    def lying(path):
        head = real(path)
        return None if path.endswith(".png") else head._replace(height=head.height + 64)

    monkeypatch.setattr(working, "header", lying)
    shapes, _, _ = working.file_plan(mixed_split.paths, 64)
    assert (shapes[[2, 3, 5]] == -1).all()  # the PNGs: unknown
    np.testing.assert_array_equal(epoch(), truth)


def test_opencv_and_tensorflow_pipelines_make_the_same_batches(mixed_split, monkeypatch):
    """With OpenCV the batch is resampled by OpenCV after batching; without it, per
    image by TensorFlow. Same images, same views, grey repeated to 3 channels either way."""
    from tfcovid.data import augment

    def epoch():
        ds = datasets.dataset(mixed_split, 32, 6, training=True, aug=AUG, cache="memory", seed=4)
        x, y = next(iter(ds))
        return x.numpy()[np.argsort(y.numpy())]

    assert augment.resampler() == "opencv"
    fast = epoch()
    monkeypatch.setattr(augment, "resampler", lambda: "tensorflow")
    plain = epoch()
    assert fast.shape == plain.shape == (6, 32, 32, 3) and fast.dtype == plain.dtype == np.uint8
    assert np.abs(fast.astype(int) - plain).max() <= 1
    assert (fast.std(axis=(1, 2)) > 1).all()  # real views, not blank
    gray = [0, 2, 4, 5]  # grey files: the three channels are equal
    assert (fast[gray, ..., 0] == fast[gray, ..., 2]).all() and (fast[1, ..., 0] != fast[1, ..., 2]).any()


def test_later_epochs_read_the_array_store_and_equal_fresh_decodes(mixed_split, tmp_path, monkeypatch):
    """With OpenCV the memory cache is an ArrayStore that the batch resampler fills and reads.
    An epoch decodes only what is not stored yet; later epochs read the store, not the files
    (they are moved away here), and give exactly the batches of an uncached run."""
    import dataclasses
    import shutil

    from tfcovid.data import augment

    assert augment.resampler() == "opencv"
    copies = [shutil.copy(p, tmp_path / os.path.basename(p)) for p in mixed_split.paths]
    split = dataclasses.replace(mixed_split, dir=str(tmp_path), paths=tuple(map(str, copies)))
    real = sizes.header
    # The first file's header is wrong: the store's true size must replace it in later plans.
    monkeypatch.setattr(working, "header", lambda p: real(p)._replace(height=999) if p == split.paths[0] else real(p))

    def uncached(e):  # (images, labels) of epoch e without a cache
        epoch = tf.Variable(e, dtype=tf.int64)
        got = list(datasets.dataset(split, 32, 4, training=True, aug=AUG, seed=2, epoch=epoch,
                                 deterministic=True))
        return np.concatenate([x for x, _ in got]), np.concatenate([y for _, y in got])

    truth = [uncached(e) for e in range(3)]
    policy = cache.Cache("memory")
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = datasets.dataset(split, 32, 4, training=True, aug=AUG, cache=policy, seed=2, epoch=epoch,
                      deterministic=True)
    store = policy.stores[0]
    assert isinstance(store, cache.ArrayStore)
    # As if an interrupted first pass had stored two images: this epoch decodes the others.
    for i in (1, 3):
        store.put(i, working.decode_base(_bytes(split.paths[i]), 64).numpy())
    assert np.flatnonzero(store.state()[0]).tolist() == [1, 3]
    for e in range(3):
        if e == 2:  # everything is stored now: the files are not needed any more
            for p in split.paths:
                os.rename(p, p + ".moved")
        epoch.assign(e)
        got = [(x.numpy(), y.numpy()) for x, y in ds]
        np.testing.assert_array_equal(np.concatenate([x for x, _ in got]), truth[e][0])
        np.testing.assert_array_equal(np.concatenate([y for _, y in got]), truth[e][1])
    assert store.count() == len(split)
    for i, path in enumerate(mixed_split.paths):
        np.testing.assert_array_equal(store.get(i), working.decode_base(_bytes(path), 64).numpy())
    assert store.state()[1][0].tolist() == list(store.get(0).shape[:2])  # not the header's
    assert store.nbytes() == sum(store.get(i).nbytes for i in range(len(split))) + cache._OVERHEAD * len(split)
    assert "6 images" in store.describe() and "in memory" in store.describe()
    # Without OpenCV the memory cache stays TensorFlow's table (the per-image path reads it).
    monkeypatch.setattr(augment, "resampler", lambda: "tensorflow")
    plain = cache.Cache("memory")
    datasets.dataset(mixed_split, 32, 4, training=True, aug=AUG, cache=plain)
    assert isinstance(plain.stores[0], cache.ImageStore)


@pytest.mark.parametrize("channels,options", [(1, {}), (3, {"subsampling": 0}), (3, {"subsampling": 2}),
                                              (1, {"progressive": True}), (3, {"progressive": True})])
def test_opencv_jpeg_decode_is_tensorflows_exact_decode(tmp_path, channels, options):
    """OpenCV's JPEG decode (the batch resampler's) gives TensorFlow's pixels exactly, at every
    DCT scale, grey and colour, 4:4:4 and 4:2:0 chroma, baseline and progressive; a broken
    file gives None."""
    from tfcovid.data.opencv import images

    image = _smooth(301, 403, channels, seed=channels)
    path = tmp_path / "x.jpg"
    Image.fromarray(image).save(path, quality=90, **options)
    data = path.read_bytes()
    for halvings in range(4):
        ours = images.decode_jpeg(data, channels, halvings)
        theirs = tf.io.decode_jpeg(data, channels=channels, ratio=2**halvings, dct_method="INTEGER_ACCURATE")
        assert ours.shape == (-(-301 // 2**halvings), -(-403 // 2**halvings), channels)
        np.testing.assert_array_equal(ours, theirs.numpy())
    np.testing.assert_array_equal(images.decode_jpeg(data, channels, 1), working.decode_base(tf.constant(data), 150))
    assert images.decode_jpeg(data[: len(data) // 2], channels, 1) is None


@pytest.fixture()
def jpeg_split(tmp_path):
    """Five JPEGs only (grey and colour, different sizes): the OpenCV path without a per-image map."""
    specs = [(300, 260, 1), (200, 330, 3), (420, 400, 1), (150, 180, 1), (260, 260, 3)]
    paths = [_write(tmp_path / f"j{i}.jpg", _smooth(h, w, c, seed=i), "JPEG", quality=92)
             for i, (h, w, c) in enumerate(specs)]
    return types.Split("train", str(tmp_path), tuple(paths), np.arange(5, dtype=np.int64), ("x",) * 5)


def _epochs(split, count, cache_mode=None, policy=None, between=None):
    """[(images, labels)] of epochs 0 .. count - 1 of one dataset, in a fixed order."""
    epoch = tf.Variable(0, dtype=tf.int64)
    ds = datasets.dataset(split, 32, 2, training=True, aug=AUG, cache=policy or cache_mode, seed=6, epoch=epoch,
                      deterministic=True)
    out = []
    for e in range(count):
        if between is not None:
            between(e)
        epoch.assign(e)
        got = list(ds)
        out.append((np.concatenate([x.numpy() for x, _ in got]), np.concatenate([y.numpy() for _, y in got])))
    return out


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_all_jpeg_split_opencv_path_matches_tensorflow_and_its_cache(jpeg_split, mode, monkeypatch):
    from tfcovid.data import augment
    from tfcovid.data.opencv import images

    assert (working.file_plan(jpeg_split.paths, 64)[2][:, 0] > 0).all()  # all OpenCV-decodable
    decoded = []
    real_decode = images.decode_jpeg  # decode_file's decoder (augment.decode_file is cvops's)
    monkeypatch.setattr(images, "decode_jpeg", lambda *a: decoded.append(1) or real_decode(*a))
    policy = cache.Cache(mode)

    def move_files_away(e):  # epoch 2 must come from the cache alone
        if e == 2:
            for p in jpeg_split.paths:
                os.rename(p, p + ".moved")

    cached = _epochs(jpeg_split, 3, policy=policy, between=move_files_away)
    assert len(decoded) == 5  # each file decoded once, in the first epoch
    assert isinstance(policy.stores[0], cache.ArrayStore) and policy.stores[0].count() == 5
    assert policy.stores[0].mode == mode
    for p in jpeg_split.paths:
        os.rename(p + ".moved", p)
    plain = _epochs(jpeg_split, 3)  # OpenCV, no cache
    monkeypatch.setattr(augment, "resampler", lambda: "tensorflow")
    reference = _epochs(jpeg_split, 3, "memory")  # TensorFlow's decode and resampler
    for (x, y), (x2, y2), (x3, y3) in zip(cached, plain, reference):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
        np.testing.assert_array_equal(y, y3)
        assert x.shape == (5, 32, 32, 3) and np.abs(x.astype(int) - x3).max() <= 1


def test_opencv_path_wrong_header_and_broken_file(jpeg_split, monkeypatch):
    """A header that misleads OpenCV's scaled decode: the image is decoded and planned again by
    TensorFlow, same batches. A file that cannot be decoded is named in the error."""
    truth = _epochs(jpeg_split, 1, "memory")
    real = sizes.header
    monkeypatch.setattr(working, "header", lambda p: real(p)._replace(height=real(p).height * 2))
    shapes = []
    real_decode = images.decode_jpeg
    monkeypatch.setattr(images, "decode_jpeg", lambda *a: shapes.append(real_decode(*a).shape) or real_decode(*a))
    again = _epochs(jpeg_split, 1, "memory")
    planned = working.file_plan(jpeg_split.paths, 64)[0]
    assert any(tuple(s[:2]) != tuple(p) for s, p in zip(shapes, planned))  # the fallback ran
    np.testing.assert_array_equal(again[0][0], truth[0][0])
    monkeypatch.setattr(working, "header", real)
    monkeypatch.setattr(images, "decode_jpeg", real_decode)
    broken = jpeg_split.paths[3]
    with open(broken, "r+b") as f:
        f.truncate(os.path.getsize(broken) // 2)
    with pytest.raises(Exception, match=r"j3\.jpg: cannot be decoded"):
        _epochs(jpeg_split, 1)


def test_on_all_cores_runs_each_row_once_and_raises():
    from tfcovid.data import augment

    seen = []
    augment.on_all_cores(37, seen.append)
    assert sorted(seen) == list(range(37))
    augment.on_all_cores(0, seen.append)

    def fail(i):
        if i == 5:
            raise RuntimeError("row 5")

    with pytest.raises(RuntimeError, match="row 5"):
        augment.on_all_cores(9, fail)


def test_halve_is_avg_pool():
    """decode_base's 2 x 2 box average equals avg_pool2d exactly, odd sizes and twice included."""
    rng = np.random.default_rng(3)
    for shape in [(7, 9, 1), (10, 6, 3), (2, 2, 1), (33, 65, 3)]:
        x = tf.constant(rng.integers(0, 256, shape).astype(np.float32))
        pooled = tf.nn.avg_pool2d(x[None], 2, 2, "VALID")
        np.testing.assert_array_equal(working._halve(x).numpy(), pooled[0].numpy())
        if min(shape[:2]) >= 4:
            twice = tf.nn.avg_pool2d(pooled, 2, 2, "VALID")[0]
            np.testing.assert_array_equal(working._halve(working._halve(x)).numpy(), twice.numpy())


def _halved(path, halvings):
    """decode_image, then decode_base's 2 x 2 box average ``halvings`` times, rounded once."""
    x = tf.cast(data_decode.decode_image(_bytes(path)), tf.float32)
    for _ in range(halvings):
        x = working._halve(x)
    return tf.cast(tf.round(x), tf.uint8).numpy()


@pytest.mark.parametrize("channels", [1, 3])
def test_opencv_png_decode_is_decode_bases_box_average(tmp_path, channels):
    """OpenCV's PNG decode plus an area resize in float gives decode_base's pixels exactly, at
    every number of halvings (odd sizes: the last row/column dropped per halving); PNGs it
    does not take (16-bit, alpha, palette) and broken files give None."""
    from tfcovid.data.opencv import images

    image = _smooth(301, 403, channels, seed=channels)
    path = _write(tmp_path / "x.png", image)
    raw = open(path, "rb").read()
    for halvings in range(5):
        ours = images.decode_png(raw, channels, halvings)
        assert ours.shape == (301 // 2**halvings, 403 // 2**halvings, channels)
        np.testing.assert_array_equal(ours, _halved(path, halvings))
    # decode_base halves while the shorter side stays >= min_side: twice for 301 at 75.
    np.testing.assert_array_equal(images.decode_png(raw, channels, 2), working.decode_base(_bytes(path), 75))
    assert images.decode_png(raw[: len(raw) // 2], channels, 1) is None
    assert images.decode_png(raw, 4 - channels, 0) is None  # the header says otherwise
    # 16 bits per sample (the high byte, as TensorFlow's decode), and alpha (dropped).
    rng = np.random.default_rng(channels)
    wide = rng.integers(0, 65536, (45, 38, channels)).astype(">u2")
    alpha = np.dstack([_smooth(45, 38, channels), np.full((45, 38), 9, np.uint8)])
    kinds = {"x16.png": (wide, 16, {1: 0, 3: 2}[channels]), "xa.png": (alpha, 8, {1: 4, 3: 6}[channels]),
             "xa16.png": (np.dstack([wide, wide[..., :1]]), 16, {1: 4, 3: 6}[channels])}
    for name, (pixels, depth, colour_type) in kinds.items():
        path = _raw_png(tmp_path / name, 38, 45, depth, colour_type, pixels.tobytes(), rows=45)
        for halvings in (0, 1, 3):
            np.testing.assert_array_equal(images.decode_png(open(path, "rb").read(), channels, halvings),
                                          _halved(path, halvings), err_msg=name)
    Image.fromarray(_smooth(30, 40, 3)).convert("P").save(tmp_path / "xp.png")
    raw = (tmp_path / "xp.png").read_bytes()
    assert images.decode_png(raw, 1, 0) is None and images.decode_png(raw, 3, 0) is None  # palette


def test_one_channel_if_gray_numpy_and_tensorflow():
    """A grey X-ray saved as RGB is kept as its one channel (lossless); a single differing
    value keeps all three. NumPy (OpenCV path) and TensorFlow (eval cache) agree."""
    from tfcovid.data.opencv import images

    grey = _smooth(37, 53)
    same = np.dstack([grey] * 3)
    nearly = same.copy()
    nearly[36, 52, 2] += 1
    one = images.one_channel_if_gray(same)
    assert one.shape == (37, 53, 1) and one.flags.c_contiguous
    np.testing.assert_array_equal(one[..., 0], grey)
    assert images.one_channel_if_gray(nearly) is nearly
    assert images.one_channel_if_gray(grey[..., None]).shape == (37, 53, 1)
    assert data_decode.one_channel_if_gray(tf.constant(same)).shape == (37, 53, 1)
    np.testing.assert_array_equal(data_decode.one_channel_if_gray(tf.constant(nearly)), nearly)
    assert data_decode.one_channel_if_gray(tf.constant(grey[..., None])).shape == (37, 53, 1)


@pytest.fixture(scope="module")
def formats_split(tmp_path_factory):
    """What the batch resampler meets: files OpenCV decodes (grey and RGB JPEGs and PNGs,
    grey saved as RGB in both, a 16-bit and an RGBA PNG) and files TensorFlow decodes for it
    (a palette PNG, a BMP); label = index."""
    root = tmp_path_factory.mktemp("formats")
    grey = [_smooth(140 + 10 * i, 150 + 7 * i, 1, seed=i) for i in range(8)]
    items = [("grey.jpg", Image.fromarray(grey[0]), "JPEG"),
             ("rgb.jpg", Image.fromarray(_smooth(130, 170, 3, 1)), "JPEG"),
             ("grey_as_rgb.jpg", Image.fromarray(np.dstack([grey[2]] * 3)), "JPEG"),
             ("grey.png", Image.fromarray(grey[3]), None),
             ("rgb.png", Image.fromarray(_smooth(96, 120, 3, 4)), None),
             ("grey_as_rgb.png", Image.fromarray(np.dstack([_smooth(300, 280, 1, 5)] * 3)), None),
             ("grey16.png", Image.fromarray(grey[6].astype(np.uint16) * 257), None),
             ("rgba.png", Image.fromarray(np.dstack([_smooth(90, 110, 3, 7), np.full((90, 110), 99, np.uint8)])), None),
             ("palette.png", Image.fromarray(_smooth(100, 90, 3, 8)).convert("P"), None),
             ("grey.bmp", Image.fromarray(grey[1]), None)]
    paths = []
    for name, im, fmt in items:
        im.save(root / name, fmt, quality=92) if fmt else im.save(root / name)
        paths.append(str(root / name))
    labels = np.arange(len(paths), dtype=np.int64)
    return types.Split("train", str(root), tuple(paths), labels, ("x",) * len(paths))


def test_every_file_kind_on_the_opencv_path(formats_split, monkeypatch):
    """OpenCV decodes the JPEGs and PNGs in the batched call; TensorFlow decodes the rest
    (palette PNG, BMP) in the per-image map. The cache holds decode_base's pixels, grey saved as RGB as one
    channel; batches equal an uncached run exactly and TensorFlow's resampler within one
    grey level; eval caches grey saved as RGB as one channel too."""
    from tfcovid.data import augment
    from tfcovid.data.opencv import images

    readable = working.file_plan(formats_split.paths, 64)[2]
    assert (readable[:, 0] > 0).tolist() == [True] * 8 + [False] * 2
    assert readable[5].tolist() == [3, 2]  # RGB PNG, shorter side 280 >= 4 * 64: halved twice
    decoded = []
    real = images.decode_file
    monkeypatch.setattr(images, "decode_file", lambda *a: decoded.append(1) or real(*a))
    policy = cache.Cache("memory")
    cached = _epochs(formats_split, 2, policy=policy)
    assert len(decoded) == 8  # the eight OpenCV files, once each
    store = policy.stores[0]
    assert isinstance(store, cache.ArrayStore) and store.count() == 10
    channels = [store.get(i).shape[-1] for i in range(10)]
    assert channels == [1, 3, 1, 1, 3, 1, 1, 3, 3, 1]
    for i, path in enumerate(formats_split.paths):
        expected = working.decode_base(_bytes(path), 64).numpy()
        np.testing.assert_array_equal(store.get(i), expected[..., : channels[i]])
        if channels[i] == 1 and expected.shape[-1] == 3:  # lossless: the channels were equal
            assert (expected == expected[..., :1]).all()
    plain = _epochs(formats_split, 2)
    monkeypatch.setattr(augment, "resampler", lambda: "tensorflow")
    reference = _epochs(formats_split, 2, "memory")
    for (x, y), (x2, y2), (x3, y3) in zip(cached, plain, reference):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y3)
        assert x.shape == (10, 32, 32, 3) and np.abs(x.astype(int) - x3).max() <= 1
        grey_rows = np.isin(y, [0, 2, 3, 5, 6, 9])
        assert (x[grey_rows] == x[grey_rows][..., :1]).all()
    evaluation = cache.Cache("memory")
    batches = np.concatenate([x.numpy() for x, _ in datasets.dataset(formats_split, 24, 4, cache=evaluation)])
    for i, path in enumerate(formats_split.paths):
        np.testing.assert_array_equal(batches[i], data_decode.load_image(path, 24).numpy())
    found, pixels = evaluation.stores[0].lookup(tf.constant(2, tf.int64))
    assert bool(found) and pixels.shape == (24, 24, 1)  # grey_as_rgb.jpg


def _raw_png(path, width, height, depth, colour_type, row, rows=None):
    """A PNG written byte by byte (PIL does not write 4-bit grey or 16-bit RGB): ``row``
    repeated ``height`` times or, with ``rows``, ``row`` is all rows' bytes."""
    import struct
    import zlib

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    size = len(row) // rows if rows else len(row)
    lines = [row[i * size:(i + 1) * size] for i in range(height)] if rows else [row] * height
    pixels = zlib.compress(b"".join(b"\x00" + line for line in lines))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))
    return str(path)


def test_png_bit_depth_decides_the_decoder(tmp_path):
    """PIL opens 4-bit grey PNGs as "L" like 8-bit ones; the PNG header's own bit depth keeps
    them off OpenCV's path (whose decode would refuse them every epoch); 16-bit PNGs (PIL:
    "RGB" or "I;16") are OpenCV's."""
    grey4 = _raw_png(tmp_path / "g4.png", 8, 6, 4, 0, bytes([0x0F, 0xF0, 0x5A, 0xA5]))
    rgb16 = _raw_png(tmp_path / "c16.png", 5, 4, 16, 2, bytes(range(30)))
    grey8 = _write(tmp_path / "g8.png", _smooth(6, 8))
    heads = [sizes.header(p) for p in (grey4, rgb16, grey8)]
    assert [(h.mode, h.depth) for h in heads] == [("L", 4), ("RGB", 16), ("L", 8)]
    readable = working.file_plan([grey4, rgb16, grey8], 2)[2]
    assert readable[:, 0].tolist() == [0, 3, 1]
    from tfcovid.data.opencv import images

    assert images.decode_png(open(grey4, "rb").read(), 1, 0) is None


def test_cache_estimate_counts_rgb_saved_grey_as_one_channel(tmp_path):
    """The cache plan's estimate (memory or disk) counts grey X-rays saved as RGB as the one
    channel the stores keep: decoded small, a sample of the RGB files is checked."""
    grey = [_write(tmp_path / f"g{i}.jpg", np.dstack([_smooth(200, 240, seed=i)] * 3), "JPEG") for i in range(4)]
    colour = [_write(tmp_path / f"c{i}.jpg", _smooth(200, 240, 3, seed=i), "JPEG") for i in range(4)]
    assert [sizes.looks_gray(p) for p in (grey[0], colour[0])] == [True, False]
    png = _write(tmp_path / "g.png", np.dstack([_smooth(50, 60)] * 3))
    assert sizes.looks_gray(png) and not sizes.looks_gray(str(tmp_path / "missing.png"))
    split = types.Split("train", str(tmp_path), tuple(grey + colour), np.zeros(8, np.int64), ("x",))
    plain = sizes.estimate_bytes(split.paths, 32, 64, training=True)
    estimate = sizes.estimate_bytes(split.paths, 32, 64, training=True, gray_as_one=True)
    policy = cache.Cache("memory")
    for _ in datasets.dataset(split, 32, 4, training=True, aug=AUG, cache=policy):
        pass
    held = policy.stores[0].nbytes()
    assert [policy.stores[0].get(i).shape[-1] for i in range(8)] == [1] * 4 + [3] * 4
    assert estimate == held and plain > 1.4 * held  # 100 x 120 working size: 1 + 3 channels vs 3 + 3


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_resample_processes_give_the_threads_batches(formats_split, mode):
    """data.resample_processes: the rows run in worker processes that hold the cache (split by
    image index); every file kind (OpenCV decodes in the workers, TensorFlow's per-image map
    for the rest) gives exactly the threads' batches, epoch after epoch, the later ones from
    the workers' cache; the parent knows each stored image's shape."""
    from tfcovid.data.opencv import process_pool

    assert process_pool.available()  # Linux with OpenCV, a dependency: what this project runs on
    threads = _epochs(formats_split, 3, policy=cache.Cache(mode))
    policy = cache.Cache(mode, processes=3)
    ours = _epochs(formats_split, 3, policy=policy)
    store = policy.stores[0]
    assert isinstance(store, process_pool.WorkerStore) and store.count() == 10 and store.nbytes() > 0
    stored, shapes = store.state()
    assert stored.all()
    reference = cache.Cache(mode)
    _epochs(formats_split, 1, policy=reference)
    assert shapes.tolist() == reference.stores[0].state()[1].tolist()
    assert store._pool.copy_out(0, 2, 32).ctypes.data % images.BATCH_ALIGN == 0  # no copy by tf.data
    for (x, y), (x2, y2) in zip(ours, threads):
        np.testing.assert_array_equal(x, x2)
        np.testing.assert_array_equal(y, y2)
    assert "3 resample processes" in store.describe()
    assert len(store._pool._procs) == 3 and all(p.poll() is None for p in store._pool._procs)
    import subprocess
    import sys

    light = subprocess.run([sys.executable, "-c", "import sys, tfcovid.data.opencv.worker, tfcovid.data.opencv.process_pool; "
                            "print(sorted(m for m in "
                            "('tensorflow', 'keras') if m in sys.modules))"], capture_output=True, text=True)
    assert light.stdout.strip() == "[]"  # the workers start without TensorFlow
    if mode == "disk":
        assert len([f for f in os.listdir(store.directory) if f.endswith(".uint8")]) == 10
    procs = store._pool._procs
    store.close()
    assert all(p.poll() is not None for p in procs) and store.count() == 0


def test_resample_processes_wrong_header_broken_file_and_a_dead_worker(jpeg_split, monkeypatch):
    """In the workers too: a header that misleads OpenCV's decode is decoded and planned again
    by TensorFlow (same batches); an undecodable file is named; a worker that dies stops the
    epoch with an error that says what to set."""
    from tfcovid.data.opencv import process_pool

    assert process_pool.available()  # Linux with OpenCV, a dependency: what this project runs on
    truth = _epochs(jpeg_split, 2, "memory")
    real = sizes.header
    monkeypatch.setattr(working, "header", lambda p: real(p)._replace(height=real(p).height * 2))
    policy = cache.Cache("memory", processes=2)
    again = _epochs(jpeg_split, 2, policy=policy)
    for (x, y), (x2, y2) in zip(again, truth):
        np.testing.assert_array_equal(x, x2)
    policy.stores[0].close()
    monkeypatch.setattr(working, "header", real)
    broken = jpeg_split.paths[3]
    with open(broken, "r+b") as f:
        f.truncate(os.path.getsize(broken) // 2)
    with pytest.raises(Exception, match=os.path.basename(broken)):
        _epochs(jpeg_split, 1, policy=cache.Cache("memory", processes=2))
    os.remove(broken)
    keep = [i for i, p in enumerate(jpeg_split.paths) if p != broken]
    split = types.Split("train", jpeg_split.dir, tuple(jpeg_split.paths[i] for i in keep),
                       jpeg_split.labels[keep], tuple(jpeg_split.folders[i] for i in keep))
    policy = cache.Cache("memory", processes=2)
    ds = datasets.dataset(split, 32, 2, training=True, aug=AUG, cache=policy, seed=6)
    assert sum(len(y) for _, y in ds) == 4
    pool = policy.stores[0]._pool
    pool._procs[1].kill()
    pool._procs[1].wait()
    with pytest.raises(Exception, match="resample_processes"):
        list(ds)


def test_fit_log_says_where_the_rows_are_resampled(formats_split):
    import dataclasses

    from tfcovid.training import inputs

    def exp(**data_):
        return dataclasses.replace(config.Experiment(), data=dataclasses.replace(config.DataConfig(), **data_))

    assert inputs._where_resampled(exp(), cache.Cache()) == ""
    policy = cache.Cache("memory", processes=2)
    datasets.dataset(formats_split, 32, 2, training=True, aug=AUG, cache=policy)
    assert ", in 2 worker processes" in inputs._where_resampled(exp(resample_processes=2), policy)
    off = inputs._where_resampled(exp(resample_processes=2, cache="none"), cache.Cache("none", processes=2))
    assert "needs the decoded-image cache" in off and "threads instead" in off
    # auto: threads below 8 cores (nothing to say), else one process per core but one.
    cores = len(os.sched_getaffinity(0))
    auto = cache.Cache("memory", processes="auto")
    assert auto.processes == (cores - 1 if cores >= 8 else 0)
    if cores < 8:
        assert inputs._where_resampled(exp(resample_processes="auto"), auto) == ""


def test_workers_that_cannot_start_leave_the_rows_to_threads(jpeg_split, tmp_path, monkeypatch):
    """No memfd, or a worker that ends at start: the pipeline is built with the threads' store
    (the same batches), the cache says why and fit's log says so; a worker that never answers
    is given up after the timeout."""
    import dataclasses
    import sys

    from tfcovid.data.opencv import process_pool
    from tfcovid.training import inputs

    truth = _epochs(jpeg_split, 2, "disk")

    def no_memfd(*args):
        raise OSError(38, "Function not implemented")

    exp = dataclasses.replace(config.Experiment(), data=dataclasses.replace(
        config.DataConfig(), resample_processes="auto"))
    with monkeypatch.context() as m:
        m.setattr(os, "memfd_create", no_memfd)
        (tmp_path / "c").mkdir()
        policy = cache.Cache("disk", directory=str(tmp_path / "c"), processes=2)
        again = _epochs(jpeg_split, 2, policy=policy)
    assert "Function not implemented" in policy.worker_error
    assert [type(s) for s in policy.stores] == [cache.ArrayStore] and policy.stores[0].count() == len(jpeg_split)
    # the workers' empty folder is gone; the plan names the threads' one
    assert os.listdir(tmp_path / "c") == [os.path.basename(policy.stores[0].directory)]
    assert policy.stores[0].directory in policy.describe()
    for (x, y), (x2, y2) in zip(again, truth):
        np.testing.assert_array_equal(x, x2)
    from tfcovid import bench
    from tfcovid.bench import pipeline as bench_pipeline

    fields = bench_pipeline.processes_fields(policy)
    assert fields["resample_processes"] == 0 and "Function not implemented" in fields["resample_processes_error"]
    assert "in threads: the worker processes could not start" in bench._processes(fields)
    log = inputs._where_resampled(exp, policy)
    assert "the 2 worker processes of data.resample_processes auto could not start" in log
    assert "threads instead" in log
    with monkeypatch.context() as m:
        m.setattr(sys, "executable", "/bin/false")  # each worker exits at once
        policy = cache.Cache("memory", processes=2)
        again = _epochs(jpeg_split, 1, policy=policy)
    assert "stopped (exit code 1)" in policy.worker_error and isinstance(policy.stores[0], cache.ArrayStore)
    np.testing.assert_array_equal(again[0][0], truth[0][0])
    silent = tmp_path / "silent"
    silent.write_text("#!/bin/sh\nexec sleep 30\n")
    silent.chmod(0o755)
    with monkeypatch.context() as m:
        m.setattr(sys, "executable", str(silent))
        store = process_pool.WorkerStore(4, "train", processes=1)
        with pytest.raises(RuntimeError, match="1 of 1 resample worker processes had not started after 1 s"):
            store.start(2, 32, timeout=1)
    assert store._pool is None  # stopped


def test_auto_resample_processes_follow_the_cores(monkeypatch):
    """``data.resample_processes: auto``: one worker per usable core but one from 8 cores (where
    the threads' lock hand-overs limit), threads below and where workers cannot run; numbers
    are taken as they are; anything else is refused with what to write."""
    from tfcovid.data.opencv import process_pool

    for cores, expected in ((1, 0), (2, 0), (4, 0), (7, 0), (8, 7), (16, 15), (64, 63)):
        monkeypatch.setattr(process_pool, "usable_cores", lambda c=cores: c)
        assert process_pool.processes_for("auto") == expected, cores
        assert process_pool.processes_for("AUTO ") == expected
    monkeypatch.setattr(process_pool, "usable_cores", lambda: 16)
    assert process_pool.processes_for("auto", share=2) == 7  # two training processes on the host
    assert process_pool.processes_for("auto", share=4) == 0  # 4 cores each: threads
    assert process_pool.processes_for(3) == 3 and process_pool.processes_for("0") == 0
    assert process_pool.processes_for(3, share=2) == 3  # a number is taken as it is
    monkeypatch.setattr(process_pool, "available", lambda: False)
    assert process_pool.processes_for("auto") == 0  # e.g. no OpenCV, not Linux: threads
    for bad in (-1, "-2", "many", 2.5, None, True):
        with pytest.raises(ValueError, match="auto, 0 \\(threads\\) or a number"):
            process_pool.processes_for(bad)


def test_opencv_is_loaded_before_tensorflow():
    """Any tfcovid module loads OpenCV before TensorFlow (``tfcovid/__init__.py``): loaded after
    it, OpenCV's libpng binds inflate() to TensorFlow's own zlib, ~10 % slower per PNG decode.
    A fresh interpreter, since this one has both already."""
    import subprocess
    import sys

    for module in ("tfcovid.data.pipeline", "tfcovid.training.train", "tfcovid.bench"):  # the CLI imports them lazily
        code = (f"import sys, {module}; m = list(sys.modules); "
                "print(m.index('cv2'), m.index('tensorflow'))")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        first_cv2, first_tf = map(int, out.stdout.split()[-2:])
        assert first_cv2 < first_tf, module
