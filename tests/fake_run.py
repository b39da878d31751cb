"""Helper for tests of evaluate/export/explain: a run directory as fit() leaves it, minus training.

Training is covered by test_train.py and test_plots.py; these tests need a model file whose
numbers they can recompute independently, so an untrained model (optionally with a chosen
head bias, so its predictions are not all alike) in a real run directory layout is enough.
"""

from pathlib import Path

import keras
import numpy as np

from tfcovid import config
from tfcovid.data import decode, folders
from tfcovid.weights import metadata
from tfcovid.models import build_model


def make_run(tmp_path: Path, tree: Path, task: str = "binary", backbone: str = "resnet18",
             size: int = 32, bias=None, seed: int = 0) -> Path:
    """Write RUN/config.yaml and RUN/checkpoints/last.keras (with embedded label info)."""
    exp = config.resolve(None, {"data.dir": str(tree), "data.task": task, "data.image_size": size,
                                "model.backbone": backbone, "model.weights": "none",
                                "out": str(tmp_path)})
    manifest = folders.scan(tree, task, exp.data.labels, exp.data.label_map)
    keras.utils.set_random_seed(seed)
    model = build_model(backbone, len(manifest.output_names), size, "torch",
                        name=f"tfcovid_{backbone}_{task}")
    if bias is not None:
        model.get_layer("head_logits").bias.assign(np.asarray(bias, dtype="float32"))
    run = tmp_path / f"run-{backbone}-{task}"
    (run / "checkpoints").mkdir(parents=True)
    exp.save(run / "config.yaml")
    path = run / "checkpoints" / "last.keras"
    model.save(path)
    metadata.embed(path, metadata.info_for(exp, manifest))
    return run


def reference_probs(run: Path, paths, task: str) -> np.ndarray:
    """Probabilities computed without tfcovid.inference.evaluate/export: load, resize, predict, softmax/sigmoid."""
    model = keras.models.load_model(run / "checkpoints" / "last.keras", compile=False)
    size = model.input_shape[1]
    x = np.stack([decode.load_image(str(p), size).numpy() for p in paths]).astype("float32")
    logits = model.predict(x, verbose=0).astype("float64")
    if task == "binary":
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)
    return 1 / (1 + np.exp(-logits))
