"""Training: ``train.fit(experiment)`` reads top to bottom in phases (data, checks, model, train,
metrics, evaluation), with the pieces it uses: ``context`` (the run every phase shares),
``loop`` (phase 5, Keras's fit), ``finish`` (phase 6: evaluation, metrics.json, plots), ``compile`` (optimizer, loss, metrics),
``callbacks``, ``run_state`` (what a run keeps on disk to survive a kill), ``distribute``
(tf.distribute strategies and TF_CONFIG), ``devices`` (device line, precision, determinism),
``preflight`` (checks that would fail an hour in), ``losses`` and ``epoch_metrics``, and
``keras_classes`` (registers the loss, metrics and Preprocess layer with Keras when it loads).

May import: ``results``, ``data``, ``weights``, ``models``, ``config``, ``utils``; never
``inference`` or ``cli``.
"""
