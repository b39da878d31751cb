"""tfcovid: fine-tune ImageNet backbones to classify chest X-rays (not for clinical use).

Python API (``tfcovid.api``, docs/python-api.md): ``load_config``, ``fit``, ``build_classifier``,
``load``, ``predict``, ``evaluate``, ``export``, ``load_model``.
"""
__version__ = "0.1.0"

# OpenCV before TensorFlow, whichever tfcovid module comes first: loaded after TensorFlow, OpenCV's
# libpng binds to TensorFlow's slower zlib (docs/performance.md, "OpenCV before TensorFlow").
# ``data.opencv.images`` imports OpenCV and NumPy only, and falls back quietly where OpenCV cannot load.
from tfcovid.data.opencv import images as _opencv_images  # noqa: E402,F401


# The Python API (docs/python-api.md). Cheap to import: TensorFlow loads when a function needs it.
from tfcovid.api import (FitResult, build_classifier, evaluate, export, fit, load, load_config,  # noqa: E402
                         load_model, predict)
from tfcovid.training.keras_classes import register_on_import as _register  # noqa: E402

# `import tfcovid` then `keras.saving.load_model(...)` finds tfcovid's layer, loss and metrics.
_register()

__all__ = ["FitResult", "build_classifier", "evaluate", "export", "fit", "load", "load_config",
           "load_model", "predict"]
