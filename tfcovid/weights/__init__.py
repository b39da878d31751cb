"""Weights: where a model's starting weights come from and how a trained model is read back.
``loading`` (imagenet | none | FILE and the preprocessing that goes with them), ``imagenet``
(Keras's and torchvision's ImageNet files, offline-first), ``keras_files`` (.keras read safely,
.weights.h5, legacy .h5), ``torch_files`` (torchvision state dicts -> Keras layers),
``import_torch`` (``tfcovid import-torch``), ``assign`` (arrays onto layers, shape checks) and
``metadata`` (task, output names, image size embedded in every .keras file).

May import: ``models``, ``config``, ``utils``; never ``data`` or higher layers.
"""
