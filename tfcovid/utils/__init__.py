"""Small shared helpers with no tfcovid imports: atomic file writes (``atomic``), signals as
exceptions (``signals``) and TensorFlow's import with its start-up lines filtered
(``tf_import``).

May import: the standard library (and TensorFlow in ``tf_import`` only).
"""
