"""tfcovid's Keras classes (the Preprocess layer, focal loss, F1 and Jaccard metrics, package
"tfcovid") made known to Keras, so that ``keras.saving.load_model`` reads tfcovid's .keras files.

Keras finds a "tfcovid>Preprocess" in a file only once the module defining it has run.
Importing them with tfcovid would load Keras (and TensorFlow) on every ``import tfcovid``, so
when Keras is not loaded yet they are imported right after it is (``utils.post_import``).
This module itself imports no Keras.
"""
from __future__ import annotations

import sys
import warnings

from tfcovid.utils import post_import


def register() -> None:
    """Import the modules that register tfcovid's Keras classes (package "tfcovid")."""
    import tfcovid.models.preprocess  # noqa: F401  heavy: Keras (the Preprocess layer)
    import tfcovid.training.epoch_metrics  # noqa: F401  (F1, Jaccard)
    import tfcovid.training.losses  # noqa: F401  (focal loss)
    import tfcovid.training.schedules  # noqa: F401  (the step schedule's warm-up)


def _register_or_warn() -> None:
    try:
        register()
    except Exception as err:  # never break the user's `import keras` over it
        warnings.warn(f"tfcovid could not register its Keras classes ({type(err).__name__}: {err}); "
                      "keras.saving.load_model will not find them in tfcovid's .keras files.", RuntimeWarning,
                      stacklevel=2)


def register_on_import() -> None:
    """Make tfcovid's Keras classes known to Keras now if it is loaded, else as soon as it is."""
    if "keras" in sys.modules:
        _register_or_warn()
    else:
        post_import.install("keras", _register_or_warn)
