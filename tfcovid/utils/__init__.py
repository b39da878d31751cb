"""Small shared helpers with no tfcovid imports: atomic file writes (``atomic``), signals as
exceptions (``signals``), TensorFlow's import with its start-up lines filtered
(``tf_import``) and a one-shot hook that runs code after a module is first imported
(``post_import``: tfcovid's Keras classes are registered when Keras loads) and untrusted
text shown escaped and bounded (``text``).

May import: the standard library (and TensorFlow in ``tf_import`` only).
"""
