"""The CPU fast path: OpenCV decodes and the fused augmentation's resample on NumPy images
(``images``), the worker processes that run them (``process_pool``: the cache they hold;
``processes``: starting and talking to them; ``worker``: what runs in each) and their raw pixel
files (``pixel_files``).

May import: NumPy, OpenCV, ``config.checks``, ``data.signatures``; never TensorFlow or Keras:
the worker processes start without them (an import-linter contract and a test).
"""
