"""Same pictures as the study's RandomResizedCrop (issue 26.2): tfcovid's crop + resize (the device
resampler and the OpenCV path, one behaviour) against torch's ``F.interpolate(antialias=True)``,
the op torchvision's tensor ``resized_crop`` calls, and PIL's ``resize(BILINEAR)``, the one it
calls on the study's PIL images, on a chest-X-ray-like picture at shrink factors 0.5 .. 7.5.

tfcovid interpolates bilinearly and, when the crop is k >= 2 times the output, box-averages
k x k first; the references widen a triangle filter by the scale on every shrink. The bounds
are just above what was measured (docs/performance.md, "Against torchvision's
RandomResizedCrop"); ``python tests/test_resample_reference.py`` prints that table.
"""

import numpy as np
import pytest
import tensorflow as tf
import torch
from PIL import Image

from tfcovid.data import augment, demo
from tfcovid.data.opencv import images as opencv_images
from tfcovid.training import device_augment

SIZE = 100  # output side S
SIDE = 840  # the picture's side: divisible by every k below (2, 3, 4, 7), so the two paths agree
FACTORS = (0.5, 1.0, 1.5, 1.99, 2.0, 3.0, 4.0, 7.5)  # crop side / S

# factor: (mean, max) |tfcovid - torch antialias|, then (mean, max) |tfcovid - PIL|, grey levels.
BOUNDS = {
    0.5: (0.1, 7, 0.4, 7),  # upscale: the same bilinear; only the crop's edge rows differ (below)
    1.0: (0.0, 0, 0.0, 0),  # the crop itself
    1.5: (1.35, 7, 1.35, 8),  # 1x .. 2x: plain bilinear, no anti-aliasing, detail aliases a little
    1.99: (2.05, 15, 2.05, 15),
    2.0: (1.25, 6, 1.25, 6),  # k = 2: 2 x 2 box, then bilinear
    3.0: (0.85, 5, 0.85, 5),
    4.0: (0.7, 4, 0.7, 4),
    7.5: (0.35, 3, 0.35, 3),
}


def _picture():
    """A demo chest X-ray (body, ribs, lungs, an opacity, pixel noise), uint8 (SIDE, SIDE)."""
    image, _ = demo._render(np.random.default_rng([7, 0, 0, 0]), "binary", "infected", SIDE, SIDE)
    return np.round(image * 255).astype(np.uint8)


def _boxes():
    """Centred square crops (top, left, height, width), side round(factor * S)."""
    sides = [round(f * SIZE) for f in FACTORS]
    return [((SIDE - s) // 2, (SIDE - s) // 2, s, s) for s in sides]


def _plans(boxes):
    """``augment.fused_transform`` of each box, no rotation, no flip ([n, 8]), and ``plan``'s
    shrink factor k = max(1, floor(min(crop side) / S))."""
    b = np.array(boxes, np.float32)
    n = len(boxes)
    params = {"top": tf.constant(b[:, 0]), "left": tf.constant(b[:, 1]), "height": tf.constant(b[:, 2]),
              "width": tf.constant(b[:, 3]), "angle": tf.zeros(n), "flip": tf.zeros(n, tf.bool)}
    transforms = augment.fused_transform(params, tf.fill([n], float(SIDE)), tf.fill([n], float(SIDE)), SIZE)
    k = np.maximum(1, np.floor(np.minimum(b[:, 2], b[:, 3]) / SIZE)).astype(np.int32)
    return transforms.numpy(), k


def _torch_antialias(crop):
    """torchvision's ``resize_image`` for a uint8 crop: interpolate in float32, round to uint8
    (its path off AVX2 and on GPUs; its native uint8 kernel differs by at most one level)."""
    x = torch.from_numpy(crop.astype(np.float32))[None, None]
    out = torch.nn.functional.interpolate(x, size=[SIZE, SIZE], mode="bilinear", align_corners=False,
                                          antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)[0, 0].numpy()


def _pil(image, box):
    top, left, h, w = box
    return np.asarray(Image.fromarray(image).crop((left, top, left + w, top + h)).resize((SIZE, SIZE), Image.BILINEAR))


def _views():
    """{factor: {"device", "opencv", "plain", "torch", "pil": uint8 (S, S)}}; "plain" is
    OpenCV's bilinear with no box pre-shrink (k forced to 1)."""
    image, boxes = _picture(), _boxes()
    transforms, k = _plans(boxes)
    n = len(boxes)
    source = np.broadcast_to(image[None, :, :, None], (n, SIDE, SIDE, 1))
    device = np.asarray(device_augment.resample(source, np.full((n, 2), SIDE, np.int32), transforms, k, SIZE,
                                                int(k.max())))[..., 0]
    views = {}
    for i, (factor, box) in enumerate(zip(FACTORS, boxes)):
        top, left, h, w = box
        views[factor] = {
            "k": int(k[i]),
            "device": device[i].astype(np.uint8),
            "opencv": opencv_images._warp(image[..., None], transforms[i], int(k[i]), SIZE)[..., 0],
            "plain": opencv_images._warp(image[..., None], transforms[i], 1, SIZE)[..., 0],
            "torch": _torch_antialias(image[top:top + h, left:left + w]),
            "pil": _pil(image, box),
        }
    return views


def _diff(a, b):
    """(mean, max) absolute grey-level difference."""
    d = np.abs(a.astype(np.float64) - b.astype(np.float64))
    return float(d.mean()), float(d.max())


@pytest.fixture(scope="module")
def views():
    return _views()


def test_the_plans_shrink_factors(views):
    """k is 1 below 2x, then floor(factor): the points the table is about."""
    assert [views[f]["k"] for f in FACTORS] == [1, 1, 1, 1, 2, 3, 4, 7]


def test_device_is_the_opencv_path_within_one_grey_level(views):
    for factor in FACTORS:
        _, worst = _diff(views[factor]["device"], views[factor]["opencv"])
        assert worst <= 1, f"factor {factor}: device vs OpenCV differ by {worst}"


@pytest.mark.parametrize("factor", FACTORS)
def test_against_torch_antialias_and_pil(views, factor):
    view = views[factor]
    torch_mean, torch_max = _diff(view["device"], view["torch"])
    pil_mean, pil_max = _diff(view["device"], view["pil"])
    bound = BOUNDS[factor]
    np.testing.assert_array_less([torch_mean, torch_max, pil_mean, pil_max], np.array(bound) + 1e-9,
                                 err_msg=f"factor {factor}: (mean, max) vs torch, vs PIL over {bound}")


def test_upscale_differs_only_at_the_crops_edge(views):
    """At 0.5x all three are bilinear; tfcovid reads the image beyond the crop's edge (the crop
    is a window of it), torch repeats the crop's edge pixel: inside, within one level."""
    inner = (slice(2, -2), slice(2, -2))
    _, worst = _diff(views[0.5]["device"][inner], views[0.5]["torch"][inner])
    assert worst <= 1


def test_the_references_agree(views):
    """torch's antialiased interpolate and PIL's resize are the same triangle filter (within one
    level), so either is the study's picture."""
    for factor in FACTORS:
        assert _diff(views[factor]["torch"], views[factor]["pil"])[1] <= 1, factor


def test_box_prefilter_is_what_brings_large_shrinks_close(views):
    """Dropping the k x k pre-shrink (plain bilinear) at k >= 3 is several times further from
    torch's antialiased pixels; at exactly 2x bilinear samples between pixel pairs, which is
    the 2 x 2 box already."""
    for factor in (3.0, 4.0, 7.5):
        ours, _ = _diff(views[factor]["device"], views[factor]["torch"])
        plain, _ = _diff(views[factor]["plain"], views[factor]["torch"])
        assert plain > 2.5 * ours and plain > BOUNDS[factor][0] + 1.0, (factor, ours, plain)
    assert _diff(views[2.0]["device"], views[2.0]["plain"])[1] <= 1


if __name__ == "__main__":  # the docs table: python tests/test_resample_reference.py
    print("| crop / S | k | vs torch antialias: mean, max | vs PIL: mean, max | plain bilinear vs torch: mean, max |")
    print("|---|---|---|---|---|")
    for f, v in _views().items():
        cells = [_diff(v["device"], v[ref]) for ref in ("torch", "pil")] + [_diff(v["plain"], v["torch"])]
        print(f"| {f} | {v['k']} | " + " | ".join(f"{m:.2f}, {x:.0f}" for m, x in cells) + " |")
