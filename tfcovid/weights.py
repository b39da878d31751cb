"""Starting weights: ImageNet, none, or a local file; and the preprocessing that goes with them."""

from __future__ import annotations

from pathlib import Path

import keras

from tfcovid.models import build_model, get_backbone


class WeightsError(RuntimeError):
    """Weights could not be found or loaded; the message says which file and what to do."""


def resolve_preprocessing(backbone: str, weights: str, preprocessing: str = "auto") -> str:
    """The normalisation the weights expect: Keras ImageNet -> caffe, torchvision -> torch.

    Training from scratch ("none") uses ImageNet mean/std ("torch"): standardised inputs are
    what random initialisation assumes.
    """
    if preprocessing != "auto":
        return preprocessing
    if weights == "imagenet":
        return get_backbone(backbone).imagenet_preprocessing
    return "torch"


def initial_model(backbone: str, num_outputs: int, image_size: int, weights: str = "none",
                  preprocessing: str = "auto", head_units: int = 110, name: str | None = None):
    """Build the model with its starting weights.

    Returns:
        (model, preprocessing mode, one-line description of where the weights came from).
    """
    mode = resolve_preprocessing(backbone, weights, preprocessing)
    spec = get_backbone(backbone)
    if weights == "none":
        model = build_model(backbone, num_outputs, image_size, mode, None, head_units, name)
        return model, mode, "random initialisation (training from scratch)"
    if weights == "imagenet":
        if not spec.keras_imagenet:
            raise WeightsError(
                f"ImageNet weights for {backbone} are not available yet in this version; "
                "use --weights none or --weights FILE."
            )
        try:
            model = build_model(backbone, num_outputs, image_size, mode, "imagenet", head_units, name)
        except Exception as err:  # keras.utils.get_file raises a bare Exception offline
            raise WeightsError(
                f"Could not get the Keras ImageNet weights for {backbone}: {err}\n"
                f"Put the file in {Path(keras.config.keras_home() if hasattr(keras.config, 'keras_home') else '~/.keras')}/models/ "
                "or pass --weights FILE (a local weights file)."
            ) from None
        return model, mode, f"Keras ImageNet weights ({mode} preprocessing)"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"Weights file not found: {path}. Use --weights imagenet, none, or an existing file.")
    model = build_model(backbone, num_outputs, image_size, mode, None, head_units, name)
    if path.name.endswith(".weights.h5"):
        model.load_weights(path)
    elif path.suffix == ".keras":
        source = keras.models.load_model(path, compile=False)
        model.set_weights(source.get_weights())
    else:
        raise WeightsError(f"Unsupported weights file {path}: use a .keras or .weights.h5 file.")
    return model, mode, f"weights from {path}"
