"""Models: one name -> one builder (``registry``), each backbone family in its own file (``vgg``,
``resnet``), the study's heads (``heads``), the raw-pixel preprocessing layer that travels with
every saved model (``preprocess``), freeze policies (``freeze``) and logits -> probabilities
(``outputs``).

May import: Keras and NumPy; no other tfcovid package but ``config``'s tables.
The registry's names are re-exported here: ``from tfcovid.models import build_model``.
"""
from tfcovid.models.freeze import FreezeSummary, apply_freeze, count_parameters
from tfcovid.models.preprocess import Preprocess
from tfcovid.models.registry import BACKBONES, Backbone, build_model, get_backbone, init_like_torchvision, is_head_layer

__all__ = [
    "BACKBONES", "Backbone", "FreezeSummary", "Preprocess", "apply_freeze", "build_model",
    "count_parameters", "get_backbone", "init_like_torchvision", "is_head_layer",
]
