"""Grad-CAM: where in the image the model looked for a class (Selvaraju et al., 2017).

For a target output c and a convolutional layer with activations A (H', W', K), Grad-CAM
weights each channel by the spatial mean of d logit_c / d A and keeps the positive part of
the weighted sum: ``relu(sum_k mean(dy_c/dA_k) * A_k)``. The logit (before softmax/sigmoid)
is the score, as in the paper, so a saturated probability still gives a gradient.

The target layer defaults to the backbone's last convolutional block
(``tfcovid.models.BACKBONES[name].gradcam_layer``: VGG16 ``block5_conv3``, ResNet18
``layer4_1_out``, ResNet50 ``conv5_block3_out``) and can be any layer with a 4-D output.
The heatmap is computed on the model's input (the image resized to S x S, as in evaluation)
and stretched back over the original image for the overlay.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import keras
import numpy as np
import tensorflow as tf

from tfcovid.inference.predict import find_images, load, pixel_limit, resizer
from tfcovid.models import BACKBONES
from tfcovid.models.outputs import decide, probabilities
from tfcovid.utils.text import escape
from tfcovid.weights import metadata


class ExplainError(ValueError):
    """Grad-CAM cannot run as asked (unknown layer or label, no image given)."""


class Explanations(list):
    """One dict per overlay written (see :func:`explain`), and ``failed``: (name, reason) of
    every image that could not be read, sorted, as ``predict`` lists them."""

    def __init__(self, results=(), failed=()):
        super().__init__(results)
        self.failed = sorted(failed)


def conv_layers(model: keras.Model) -> list[str]:
    """Names of the layers with a 4-D (N, H, W, C) output, in forward order."""
    names = []
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        try:
            shape = layer.output.shape
        except (AttributeError, ValueError):  # a layer used twice has no single output
            continue
        if len(shape) == 4:
            names.append(layer.name)
    return names


def default_layer(model: keras.Model) -> str:
    """The registered Grad-CAM layer of the first backbone whose layer the model has."""
    names = {layer.name for layer in model.layers}
    for backbone in BACKBONES.values():
        if backbone.gradcam_layer in names:
            return backbone.gradcam_layer
    candidates = conv_layers(model)
    if not candidates:
        raise ExplainError(f"Model {model.name} has no layer with a 4-D output to explain.")
    return candidates[-1]


def _grad_model(model: keras.Model, layer: str | None) -> tuple[keras.Model, str]:
    layer = layer or default_layer(model)
    try:
        target = model.get_layer(layer)
    except ValueError:
        valid = conv_layers(model)
        raise ExplainError(
            f"Model {model.name} has no layer {layer!r}. Layers with a feature map: "
            f"{', '.join(valid[-12:])}{' ...' if len(valid) > 12 else ''}."
        ) from None
    if len(target.output.shape) != 4:
        raise ExplainError(f"Layer {layer!r} has output shape {target.output.shape}; Grad-CAM "
                           "needs a 4-D (batch, height, width, channels) feature map.")
    return keras.Model(model.inputs, [target.output, model.outputs[0]]), layer


def gradcam(model: keras.Model, images, targets: Sequence[int], layer: str | None = None,
            softmax: bool = False, batch_size: int = 16) -> np.ndarray:
    """Grad-CAM heatmaps, one per (image, target output index).

    Args:
        model: the classifier (raw pixels in, logits out).
        images: (n, S, S, 3) uint8 or float pixels, as the model takes them.
        targets: n output indices to explain, one per image.
        layer: target layer name; default per backbone (see :func:`default_layer`).
        softmax: the outputs are softmax logits (binary task): the score is the target
            logit minus the log-sum-exp of the others; else the target logit (sigmoid).
        batch_size: images per gradient computation.

    Returns:
        (n, S, S) float32 heatmaps in [0, 1] (each divided by its maximum; all zeros where
        no location raises the logit).
    """
    grad_model, _ = _grad_model(model, layer)
    images = np.asarray(images, dtype=np.float32)
    targets = np.asarray(targets, dtype=np.int32).reshape(-1)
    if len(targets) != len(images):
        raise ExplainError(f"gradcam needs one target per image: {len(images)} images, {len(targets)} targets.")
    size = images.shape[1:3]
    maps = []
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(images[start:start + batch_size])
        t = tf.convert_to_tensor(targets[start:start + batch_size])
        with tf.GradientTape() as tape:
            features, logits = grad_model(x, training=False)
            features = tf.cast(features, tf.float32)  # mixed-precision models: float32 maps
            logits = tf.cast(logits, tf.float32)
            score = tf.gather(logits, t, axis=1, batch_dims=1)
            if softmax:
                # Softmax ignores what all logits share, so explain the target's margin over
                # the others (log-odds for 2 classes), not evidence common to every class.
                others = tf.reduce_logsumexp(
                    logits + tf.math.log(1.0 - tf.one_hot(t, tf.shape(logits)[1])), axis=1)
                score -= others
        grads = tape.gradient(score, features)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))[..., None]
        cam = tf.image.resize(cam, size, method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        maps.append(tf.math.divide_no_nan(cam, peak).numpy())
    return np.concatenate(maps).astype(np.float32) if maps else np.zeros((0, *size), np.float32)


def choose_targets(probs: np.ndarray, task: str, outputs, thresholds: Sequence[float],
                   labels: Sequence[str] | None = None, positive_index: int = 0) -> list[list[int]]:
    """Output indices to explain per image: the named ``labels``, else the prediction.

    The prediction is the model's decision at its operating point (``models.outputs.decide``):
    the predicted class (binary), or every label set (three-label task; the most probable one
    when none is).
    """
    if labels:
        unknown = [name for name in labels if name not in outputs]
        if unknown:
            raise ExplainError(f"Unknown label(s) {unknown}. The model predicts: {', '.join(outputs)}.")
        return [[list(outputs).index(name) for name in labels] for _ in probs]
    decided = decide(probs, task, thresholds, positive_index)
    return [[int(i) for i in np.flatnonzero(d)] or [int(p.argmax())] for p, d in zip(probs, decided)]


def _original_rgb(image, max_side: int = 512) -> np.ndarray:
    """A decoded image (``decode.decode_image``'s) as uint8 RGB, scaled down so its longer side
    is at most ``max_side``."""
    h, w = int(image.shape[0]), int(image.shape[1])
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        image = tf.image.resize(image, [round(h * scale), round(w * scale)], antialias=True)
    image = tf.cast(tf.clip_by_value(tf.round(tf.cast(image, tf.float32)), 0, 255), tf.uint8)
    if image.shape[-1] == 1:
        image = tf.tile(image, [1, 1, 3])
    return image.numpy()


def overlay_png(path: Path, original: np.ndarray, heat: np.ndarray, title: str,
                alpha: float = 0.45) -> Path:
    """Save [input | heatmap over input] side by side; the heatmap is stretched to the input."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h, w = original.shape[:2]
    big = tf.image.resize(heat[..., None], [h, w], method="bilinear")[..., 0].numpy()
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 3.9 * h / max(w, 1) + 0.5), layout="constrained")
    axes[0].imshow(original)
    axes[0].set_title("input", fontsize=9)
    axes[1].imshow(original)
    shown = axes[1].imshow(big, cmap="jet", alpha=alpha, vmin=0, vmax=1)
    axes[1].set_title("Grad-CAM", fontsize=9)
    for ax in axes:
        ax.axis("off")
    fig.colorbar(shown, ax=axes[1], fraction=0.046, pad=0.02)
    fig.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def coarse_note(model: keras.Model, layer: str) -> str | None:
    """A warning when ``layer``'s map is too coarse to localise much (under 4 x 4)."""
    side = model.get_layer(layer).output.shape[1]
    if side is None or side >= 4:
        return None
    finer = [n for n in conv_layers(model) if (model.get_layer(n).output.shape[1] or 0) >= 4
             and not isinstance(model.get_layer(n), keras.layers.ZeroPadding2D)]
    hint = f" or pass --layer {finer[-1]} ({model.get_layer(finer[-1]).output.shape[1]}x" \
           f"{model.get_layer(finer[-1]).output.shape[2]})" if finer else ""
    return (f"note: {layer} is a {side}x{model.get_layer(layer).output.shape[2]} map at "
            f"{model.input_shape[1]} px, so the heatmap can show "
            + ("no position at all (one cell); " if side == 1 else "little more than a quadrant; ")
            + f"train at a larger --image-size (the study's 224 px gives 7x7 or 14x14){hint}.")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def _read_all(found, size: int, max_pixels: int):
    """Decode every image once, within the limit: (paths, model pixels, small originals for
    the overlays) of the readable ones, and (name, reason) of the others."""
    resize, paths, pixels, originals, failed = resizer(size), [], [], [], []
    for name, path in found:
        _, image, problem = load(path, max_pixels)
        if problem is not None:
            failed.append((name, problem))
            continue
        paths.append(path)
        pixels.append(resize(image).numpy())
        originals.append(_original_rgb(image))
    return paths, pixels, originals, failed


def explain(run_or_model, images: Sequence[str | Path], out: str | Path, labels=None,
            layer: str | None = None, checkpoint: str = "last", task: str | None = None,
            model_labels=None, log=print, max_pixels: int | None = None) -> Explanations:
    """Write one Grad-CAM overlay PNG per readable image and explained output.

    Args:
        run_or_model: a run directory or a ``.keras`` file.
        images: image files and folders (searched for image files, as ``predict`` does).
        out: folder for ``<image stem>_<label>.png`` (``_<layer>`` before ``.png`` for
            another layer than the default).
        labels: output names to explain for every image; default the predicted ones.
        layer: target layer; default the backbone's last conv block.
        checkpoint: "last" or "best" for a run directory.
        task, model_labels: for a bare model that does not carry them (see weights.metadata.load).
        log: where progress lines go.
        max_pixels: larger images are refused before decoding, as ``predict`` refuses them;
            None: the run's ``data.max_pixels``.

    Returns:
        :class:`Explanations`: one dict per PNG (image, label, probability, layer, png), and
        ``.failed``, the images that could not be read (missing, not an image, damaged, too
        large) with the reason; the others are explained all the same.

    Raises:
        ExplainError: unknown layer or label, or no image given at all.
    """

    trained = metadata.load(run_or_model, checkpoint, task, model_labels)
    layer = layer or default_layer(trained.model)
    _grad_model(trained.model, layer)  # fail on a bad layer or label before reading any image
    choose_targets(np.zeros((0, len(trained.outputs))), trained.task, trained.outputs,
                   trained.thresholds, labels, trained.positive_index)
    note = coarse_note(trained.model, layer)
    if note:
        log(note)

    found, missing, skipped = find_images(images)  # files, and image files in folders, as predict
    if skipped:
        log(f"Skipped {len(skipped)} file(s) without an image extension (e.g. {escape(skipped[0])}).")
    paths, pixels, originals, failed = _read_all(found, trained.image_size,
                                                 pixel_limit(trained, max_pixels))
    failed += missing
    if not pixels and not failed:
        raise ExplainError("No images given to explain" + (" (the folders hold none)." if images else "."))
    if not pixels:
        return Explanations(failed=failed)
    pixels = np.stack(pixels)
    probs = probabilities(trained.model.predict(pixels, verbose=0), trained.task, trained.temperature)
    targets = choose_targets(probs, trained.task, trained.outputs, trained.thresholds, labels,
                             trained.positive_index)
    flat = [(i, t) for i, ts in enumerate(targets) for t in ts]
    heat = gradcam(trained.model, pixels[[i for i, _ in flat]], [t for _, t in flat], layer,
                   softmax=trained.task == "binary")
    out = Path(out)
    # Another layer than the default is in the file name: its overlays sit beside the default's.
    suffix = "" if layer == default_layer(trained.model) else f"_{_safe(layer)}"
    results, used, replaced = [], set(), 0
    for (i, t), h in zip(flat, heat):
        name = trained.outputs[t]
        png = out / f"{_safe(paths[i].stem)}_{_safe(name)}{suffix}.png"
        if png in used:  # two inputs with the same file name (from different folders)
            png = out / f"{_safe(paths[i].stem)}_{i}_{_safe(name)}{suffix}.png"
        used.add(png)
        replaced += png.exists()
        title = f"{paths[i].name}: {name} (p = {probs[i, t]:.3f}); Grad-CAM on {layer}"
        overlay_png(png, originals[i], h, title)
        results.append({"image": str(paths[i]), "label": name, "probability": float(probs[i, t]),
                        "layer": layer, "png": str(png)})
    log(f"Wrote {len(results)} Grad-CAM overlay(s) to {out} (layer {layer})"
        + (f"; {replaced} replaced an earlier overlay of the same image, label and layer." if replaced else "."))
    return Explanations(results, failed)
