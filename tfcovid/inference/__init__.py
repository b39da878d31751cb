"""Using a trained model: ``evaluate`` (metrics, predictions CSV and plots of a labeled split),
``predict`` (image files and folders -> probabilities and labels), ``explain`` (Grad-CAM
overlays) and ``export`` (SavedModel, TFLite, ONNX, each verified against ``predict``).

May import: ``training`` (for the model's probabilities and compile), ``results``, ``data``,
``weights``, ``models``, ``config``, ``utils``; never ``cli``.
"""
