"""The fused augmentation against torchvision's definitions: distributions, geometry, anti-aliasing."""

import math

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image
from scipy import stats

from tfcovid.data import augment
from tfcovid.data.opencv import images as opencv_images
from tfcovid.training import device_augment

N = 3000
SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


def torchvision_get_params(rng, height, width, scale=SCALE, ratio=RATIO):
    """RandomResizedCrop.get_params, transcribed from torchvision (transforms.py) to NumPy."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect_ratio = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = int(round(math.sqrt(target_area * aspect_ratio)))
        h = int(round(math.sqrt(target_area / aspect_ratio)))
        if 0 < w <= width and 0 < h <= height:
            i = int(rng.integers(0, height - h + 1))
            j = int(rng.integers(0, width - w + 1))
            return i, j, h, w
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def tf_params(height, width, n=N, max_angle=30.0, flip=True):
    seeds = tf.random.experimental.stateless_split(tf.constant([7, 11], tf.int64), n)

    @tf.function
    def sample(seeds):
        def one(seed):
            p = augment.sample_params(height, width, SCALE, RATIO, max_angle, flip, seed)
            return tf.stack([p["top"], p["left"], p["height"], p["width"], p["angle"],
                             tf.cast(p["flip"], tf.float32)])
        return tf.map_fn(one, seeds, fn_output_signature=tf.float32)

    # float64, as the reference: a float32 0.4 and a float64 0.4 are different atoms to KS.
    return sample(seeds).numpy().astype(np.float64)


def summaries(top, left, h, w, height, width):
    """Relative quantities whose distributions must match: area, log aspect, position."""
    rel_top = np.where(height > h, top / np.maximum(height - h, 1), 0.0)
    rel_left = np.where(width > w, left / np.maximum(width - w, 1), 0.0)
    return {"area": h * w / (height * width), "log_aspect": np.log(w / h), "top": rel_top, "left": rel_left}


@pytest.mark.parametrize("height,width", [(1024, 1024), (300, 1000), (900, 500)])
def test_crop_distribution_matches_torchvision(height, width):
    ours = tf_params(height, width)
    top, left, h, w = ours[:, 0], ours[:, 1], ours[:, 2], ours[:, 3]
    # Every box lies inside the image, with integer sides and corners.
    assert np.all(top >= 0) and np.all(left >= 0) and np.all(top + h <= height) and np.all(left + w <= width)
    assert np.all(ours[:, :4] == np.round(ours[:, :4]))
    rng = np.random.default_rng(0)
    ref = np.array([torchvision_get_params(rng, height, width) for _ in range(N)], dtype=np.float64)
    a = summaries(top, left, h, w, height, width)
    b = summaries(ref[:, 0], ref[:, 1], ref[:, 2], ref[:, 3], height, width)
    for key in a:
        d = stats.ks_2samp(a[key], b[key]).statistic
        assert d < 0.05, f"{key}: KS distance {d:.3f} from torchvision's distribution"
    # Accepted boxes obey the scale and ratio ranges (up to integer rounding of the sides).
    assert a["area"].min() >= 0.08 * 0.95 and a["area"].max() <= 1.0
    assert np.all(np.abs(a["log_aspect"]) <= math.log(4 / 3) + 0.02)


def test_fallback_is_torchvisions_centre_crop():
    # A 10 x 1000 strip: no random box of ratio 3/4..4/3 can have 8 % of its area, so all ten
    # tries fail and torchvision falls back to a centred crop narrowed to the ratio range.
    ours = tf_params(10, 1000, n=20)
    expected = torchvision_get_params(np.random.default_rng(0), 10, 1000)
    assert all(tuple(int(v) for v in row[:4]) == expected for row in ours)
    assert expected == (0, 493, 10, 13)


def test_angle_and_flip_distributions():
    p = tf_params(512, 512)
    degrees = p[:, 4] * 180 / math.pi
    assert degrees.min() >= -30 and degrees.max() <= 30
    assert stats.kstest(degrees, stats.uniform(-30, 60).cdf).statistic < 0.05
    assert abs(p[:, 5].mean() - 0.5) < 0.03
    still = tf_params(512, 512, n=200, max_angle=0.0, flip=False)
    assert np.all(still[:, 4] == 0) and np.all(still[:, 5] == 0)


def _resample(path, image, transform, k, size):
    """One image (H, W, C) through its plan on the CPU path's TensorFlow op or on the device
    path's keras.ops resampler (data.augment_on device): float32 (S, S, C)."""
    if path == "tensorflow":
        return augment.apply(image, transform, k, size).numpy()
    out = device_augment.resample(np.asarray(image)[None], np.array([image.shape[:2]], np.int32),
                                  np.asarray(transform, np.float32)[None], np.array([int(k)]), size,
                                  max(int(k), 1))
    return np.asarray(out)[0, ..., : image.shape[-1]]


PATHS = ["tensorflow", "device"]


def _smooth_image(h=180, w=150):
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    img = 40 + 120 * (x / w) + 60 * np.exp(-((x - 0.3 * w) ** 2 + (y - 0.25 * h) ** 2) / (2 * 18.0 ** 2))
    return np.clip(img + 30 * (y / h) ** 2, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("angle,flip", [(17.0, False), (-25.0, True), (0.0, True)])
def test_fused_transform_equals_sequential_torchvision_ops(angle, flip, path):
    """One fused resample == rotate -> crop -> resize -> flip, each done by PIL as torchvision does."""
    image = _smooth_image()
    h, w = image.shape
    top, left, ch, cw, size = 30, 20, 100, 90, 64  # zoom < 2: no pre-shrink on either side
    seq = Image.fromarray(image).rotate(angle, resample=Image.BILINEAR)  # torchvision's F.rotate
    seq = seq.crop((left, top, left + cw, top + ch)).resize((size, size), Image.BILINEAR)
    if flip:
        seq = seq.transpose(Image.FLIP_LEFT_RIGHT)
    params = {"top": tf.constant(float(top)), "left": tf.constant(float(left)),
              "height": tf.constant(float(ch)), "width": tf.constant(float(cw)),
              "angle": tf.constant(angle * math.pi / 180), "flip": tf.constant(flip)}
    fused = _resample(path, image[..., None], augment.fused_transform(params, h, w, size), 1, size)
    diff = np.abs(fused[..., 0] - np.asarray(seq, np.float32))[4:-4, 4:-4]
    assert diff.mean() < 1.5 and np.percentile(diff, 99) < 6


@pytest.mark.parametrize("path", PATHS)
def test_large_downscale_is_antialiased(path):
    # A 1-pixel checkerboard shrunk 8x must average to mid-grey; plain bilinear sampling
    # would alias it into black and white.
    board = ((np.indices((512, 512)).sum(0) % 2) * 255).astype(np.uint8)[..., None]
    transforms, k = augment.plan(tf.constant([[512, 512]]), augment.draws(tf.constant([1, 2], tf.int64))[None],
                                 64, (1.0, 1.0), (1.0, 1.0), 0.0, False)
    assert int(k[0]) == 8
    out = _resample(path, board, transforms[0].numpy(), int(k[0]), 64)
    assert out.shape == (64, 64, 1) and out.dtype == np.float32
    assert abs(out.mean() - 127.5) < 2 and out.std() < 3


@pytest.mark.parametrize("path", PATHS)
def test_output_shape_channels_and_range(path):
    for channels in (1, 3):
        image = np.random.default_rng(channels).integers(0, 256, (97, 131, channels), dtype=np.uint8)
        transforms, k = augment.plan(tf.constant([[97, 131]]), augment.draws(tf.constant([3, channels], tf.int64))[None], 48)
        out = _resample(path, image, transforms[0].numpy(), int(k[0]), 48)
        assert out.shape == (48, 48, channels)
        assert out.min() >= 0 and out.max() <= 255 and out.std() > 10


def test_same_seed_same_view_different_seed_different_view():
    image = _smooth_image()[..., None]
    a = augment.random_resized_crop_rotate_flip(image, tf.constant([1, 1], tf.int64), 32).numpy()
    b = augment.random_resized_crop_rotate_flip(image, tf.constant([1, 1], tf.int64), 32).numpy()
    c = augment.random_resized_crop_rotate_flip(image, tf.constant([1, 2], tf.int64), 32).numpy()
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_epoch_plan_equals_per_image_sampling():
    """The pipeline plans a whole epoch at once; image i's row equals sampling it alone."""
    hw = tf.constant([[512, 512], [300, 1000], [10, 1000], [900, 500]], tf.float32)
    seeds = [tf.constant([5, i], tf.int64) for i in range(4)]
    u = tf.stack([augment.draws(s) for s in seeds])
    together = augment.params_from_draws(hw, u, SCALE, RATIO, 30.0, True)
    transforms, k = augment.plan(hw, u, 64)
    for i, seed in enumerate(seeds):
        alone = augment.sample_params(int(hw[i, 0]), int(hw[i, 1]), SCALE, RATIO, 30.0, True, seed)
        for key in alone:
            assert together[key][i].numpy() == alone[key].numpy(), key
        one = augment.fused_transform(alone, hw[i, 0], hw[i, 1], 64)
        np.testing.assert_array_equal(transforms[i].numpy(), one.numpy())
        zoom = min(float(alone["height"]), float(alone["width"])) / 64
        assert int(k[i]) == max(1, math.floor(zoom))


def test_opencv_resampler_matches_tensorflow():
    """OpenCV's resampler and TensorFlow's op make the same views: same map,
    same pre-shrink, black outside; OpenCV's fixed-point weights move a few pixels by one grey level."""
    import cv2  # noqa: F401  (a dependency: the fast path must be tested, not skipped)

    rng = np.random.default_rng(0)
    board = ((np.indices((512, 512)).sum(0) % 2) * 255).astype(np.uint8)[..., None]
    images = [np.repeat(_smooth_image(), 1, 0)[..., None], board,
              rng.integers(0, 256, (97, 131, 3), dtype=np.uint8), _smooth_image(400, 380)[..., None]]
    shrunk = 0
    for j, image in enumerate(images):
        for s in range(8):
            hw = tf.constant([image.shape[:2]])
            transforms, k = augment.plan(hw, augment.draws(tf.constant([j, s], tf.int64))[None], 64)
            ours = opencv_images._warp(image, transforms[0].numpy(), int(k[0]), 64)  # warp_rows's per-image work
            ref = augment.apply_uint8(image, transforms[0], k[0], 64).numpy()
            assert ours.shape == ref.shape == (64, 64, image.shape[-1]) and ours.dtype == np.uint8
            diff = np.abs(ours.astype(int) - ref)
            assert diff.max() <= 1 and diff.mean() < 0.05, (j, s, diff.max(), diff.mean())
            shrunk += int(k[0]) > 1
    assert shrunk > 0  # the k x k pre-shrink was compared too
    # Anti-aliased on the OpenCV path as well: an 8x-shrunk 1-pixel checkerboard is mid-grey.
    transform = tf.constant([8.0, 0, 3.5, 0, 8.0, 3.5, 0, 0])
    out = opencv_images._warp(board, transform.numpy(), 8, 64)
    assert abs(out.mean() - 127.5) < 2 and out.std() < 3


def test_warp_rows_is_each_rows_warp_grey_repeated():
    """The batch: grey rows (resampled in place into a grey batch, or pre-shrunk first) and
    colour rows, each exactly ``_warp``'s view of it, grey repeated to three channels."""
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (90, 70, 1), np.uint8), rng.integers(0, 256, (120, 100, 3), np.uint8),
              rng.integers(0, 256, (200, 180, 1), np.uint8), rng.integers(0, 256, (50, 60, 1), np.uint8)]
    transforms = [np.array([0.9, 0.2, 3.0, -0.1, 1.1, 2.0, 0, 0], np.float32),
                  np.array([1.2, 0.0, 5.0, 0.0, 1.2, 1.0, 0, 0], np.float32),
                  np.array([3.1, 0.4, 1.0, -0.3, 2.9, 4.0, 0, 0], np.float32),
                  np.array([-0.7, 0.0, 49.0, 0.0, 0.7, 0.0, 0, 0], np.float32)]
    ks = [1, 1, 3, 1]
    rows = [(images[i % 4], transforms[i % 4], ks[i % 4]) for i in range(11)]
    expected = np.stack([np.broadcast_to(opencv_images._warp(*row[:2], row[2], 32), (32, 32, 3)) for row in rows])
    batch = augment.warp_rows(len(rows), 32, lambda i: rows[i])
    assert batch.shape == (11, 32, 32, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(batch, expected)
    grey_only = augment.warp_rows(3, 32, lambda i: rows[[0, 2, 3][i]])
    np.testing.assert_array_equal(grey_only, expected[[0, 2, 3]])
    assert batch[:, :, :, 0].std() > 0  # real views, not an empty batch
    assert batch.ctypes.data % opencv_images.BATCH_ALIGN == 0  # tf.data takes it without a copy


def test_an_aligned_batch_reaches_tf_data_without_a_copy():
    """A ``batch_buffer`` returned by a ``tf.numpy_function`` inside tf.data is the tensor's own
    memory (no 38 MB copy under Python's lock per batch of 256); an unaligned array is copied.
    Shows that ``BATCH_ALIGN`` still matches this TensorFlow's rule."""
    held = {}

    def batch(offset):
        raw = opencv_images.batch_buffer((1000 + opencv_images.BATCH_ALIGN,))
        held["array"] = array = raw[int(offset):int(offset) + 1000]
        array[:] = 1
        return array

    for offset, shared in ((0, True), (16, False)):
        ds = tf.data.Dataset.from_tensors(offset).map(lambda o: tf.numpy_function(batch, [o], tf.uint8))
        for tensor in ds:
            held["array"][:] = 7  # after tf.data made its tensor
            assert (int(tensor[0]) == 7) is shared, offset


def test_batch_buffers_come_back_only_when_nothing_reads_them():
    """``batch_buffer`` recycles a batch's memory (no page faults per batch), but never while any
    array made from it, or a memoryview of it, is alive; free buffers are capped."""
    from tfcovid.data.opencv import images as opencv_images

    pool = opencv_images._Recycled()
    shape = (3, 8, 8, 3)
    first = pool.take(shape)
    address = first.ctypes.data
    assert first.shape == shape and first.dtype == np.uint8 and address % opencv_images.BATCH_ALIGN == 0
    rows = first[1:]  # a view of a view: must keep the memory
    exported = memoryview(first.reshape(-1))
    del first
    second = pool.take(shape)
    assert second.ctypes.data != address
    del rows
    third = pool.take(shape)
    assert third.ctypes.data != address  # the memoryview still reads it
    del exported
    assert pool.kept_bytes() == math.prod(shape)
    assert pool.take(shape).ctypes.data == address  # nothing reads it now: reused
    other = pool.take((2, 5))
    assert other.shape == (2, 5) and other.ctypes.data not in (address, second.ctypes.data)

    pool.KEEP_BYTES = 2 * math.prod(shape)
    buffers = [pool.take(shape) for _ in range(4)]
    del buffers, second, third
    assert pool.kept_bytes() == 2 * math.prod(shape)  # the rest were unmapped


def test_pre_shrink_scratch_is_recycled_across_image_sizes():
    """The k x k pre-shrink's float images are recycled scratch (a fresh multi-megabyte array
    per image cost more in page faults than the shrink): ``_warp`` gives exactly the view of
    the freshly allocated float shrink, grey and colour, sizes that k does not divide; float
    scratch is aligned and typed; images of nearby sizes share one buffer (size buckets)."""
    import cv2

    from tfcovid.data.opencv import images as opencv_images

    rng = np.random.default_rng(5)
    transform = np.array([2.3, 0.4, 6.0, -0.3, 2.2, 9.0, 0, 0], np.float32)
    for shape, k in (((301, 257, 1), 2), ((300, 256, 1), 2), ((211, 190, 3), 3), ((150, 160, 1), 4)):
        image = rng.integers(0, 256, shape, np.uint8)
        h, w = shape[:2]
        small = cv2.resize(image.astype(np.float32), (w // k, h // k), interpolation=cv2.INTER_AREA)
        fresh = opencv_images._affine(small, np.array(opencv_images._rescaled(transform, h / (h // k), w / (w // k))), 48)
        expected = np.clip(np.rint(fresh), 0, 255).astype(np.uint8).reshape(48, 48, -1)
        for _ in range(2):  # the second time from recycled (dirty) scratch
            np.testing.assert_array_equal(opencv_images._warp(image, transform, k, 48), expected)

    pool = opencv_images._Recycled()
    addresses = set()
    for side in range(702, 725, 2):  # 12 sizes of 1.97-2.10 MB: one bucket (8 per doubling)
        scratch = pool.take((side, side, 1), np.float32, bucket=True)
        assert scratch.dtype == np.float32 and scratch.shape == (side, side, 1)
        assert scratch.ctypes.data % opencv_images.BATCH_ALIGN == 0
        addresses.add(scratch.ctypes.data)
        del scratch
    assert len(addresses) == 1 and pool.kept_bytes() == 2 << 20


def test_tf_data_keeps_a_recycled_batch_until_its_tensor_is_dropped():
    """Batches tf.data shares with ``batch_buffer`` (no copy) stay intact while their tensors are
    held, however many batches come after; once dropped, their memory serves later batches."""
    addresses = []

    def batch(index):
        out = opencv_images.batch_buffer((4, 16, 16, 3))
        out[:] = index % 251
        addresses.append(out.ctypes.data)
        return out

    def dataset():
        return tf.data.Dataset.range(40).map(
            lambda i: tf.numpy_function(batch, [i], tf.uint8), num_parallel_calls=2).prefetch(4)

    held = list(dataset())
    assert len(set(addresses)) == 40  # all alive at once: 40 buffers
    for index, tensor in enumerate(held):
        assert tensor.shape == (4, 16, 16, 3)
        assert int(tf.reduce_min(tensor)) == int(tf.reduce_max(tensor)) == index
    del held, tensor
    addresses.clear()
    for index, tensor in enumerate(dataset()):
        assert int(tf.reduce_min(tensor)) == int(tf.reduce_max(tensor)) == index
    assert len(set(addresses)) < 20  # dropped batches' buffers served the later ones
