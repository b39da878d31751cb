"""tfcovid: fine-tune ImageNet backbones to classify chest X-rays (not for clinical use)."""
__version__ = "0.1.0"

# OpenCV before TensorFlow, whichever tfcovid module comes first: loaded after TensorFlow, OpenCV's
# libpng binds to TensorFlow's slower zlib (docs/performance.md, "OpenCV before TensorFlow").
# ``data.opencv.images`` imports OpenCV and NumPy only, and falls back quietly where OpenCV cannot load.
from tfcovid.data.opencv import images as _opencv_images  # noqa: E402,F401


def load_model(path, compile: bool = True):
    """Load a tfcovid ``.keras`` model (a run's ``checkpoints/last.keras`` or ``best.keras``, an
    ``import-torch`` output) as a Keras model, in your own code.

    ``keras.models.load_model`` alone cannot: the files name tfcovid's preprocessing layer,
    F1 metrics and focal loss, which Keras finds only once their modules are imported. This
    imports them, then loads with Keras's safe mode (no code from the file runs; a file with a
    ``Lambda`` layer, a missing or a damaged file is a ValueError that names it). ``compile=True`` restores the optimizer, loss and metrics
    (``model.evaluate`` reports accuracy and F1 as training did); False gives the bare model.
    """
    from tfcovid import models  # noqa: F401  (registers the classes)
    from tfcovid.training import epoch_metrics, losses  # noqa: F401
    from tfcovid.weights import keras_files

    return keras_files.load_model(path, ValueError, compile=compile)
