"""Data: from folders on disk to batches of uint8 pixels.

``types`` (Split, Manifest, errors; no TensorFlow), ``folders`` (ImageFolder scan, labels),
``headers`` (a file's kind and size before decoding, the scan's quick checks), ``checks`` (every
file decoded before training, ``--skip-bad``), ``signatures`` (file magic), ``decode``,
``augment`` (the study's augmentation, fused), ``sizes`` (header sizes, cache estimates),
``cache`` (decoded images in memory or on disk), ``pipeline`` (tf.data), ``batches`` (its OpenCV
batch stage), ``records`` (the format, read back), ``record_stream`` (streamed) and ``prepare``
(written) TFRecord shards, ``datasets`` (the one entry point), ``demo`` (synthetic X-rays);
``opencv/`` is the CPU fast path and its worker processes.

May import: ``config``, ``utils``; never ``models``, ``weights`` or higher layers. Nothing is
re-exported here, so that the OpenCV worker processes can import their modules without
TensorFlow.
"""
