"""``tfcovid import-torch``: a PyTorch study checkpoint (torchvision VGG16/ResNet18 + the study's
head) -> a tfcovid ``.keras`` model with the same logits, checked by a reload.
"""
from __future__ import annotations

from pathlib import Path

import keras
import numpy as np

from tfcovid.models import build_model
from tfcovid.weights import metadata, torch_files
from tfcovid.weights.assign import WeightsError, assign
from tfcovid.weights.loading import STUDY_OUTPUTS, _existing


def import_torch(checkpoint: str | Path, backbone: str, task: str, out: str | Path,
                 image_size: int = 224, outputs: tuple[str, ...] | None = None,
                 head_units: int = 110, log=print) -> Path:
    """Convert the study's fine-tuned PyTorch checkpoint into a tfcovid ``.keras`` model.

    The model takes raw [0, 255] pixels and normalises them with ImageNet mean/std ("torch"
    preprocessing), as the study's transforms did; every weight comes from the checkpoint.

    Args:
        checkpoint: torchvision-layout state dict (.safetensors, or .pth with torch installed).
        backbone: "vgg16" or "resnet18".
        task: "binary" (2 outputs) or "multilabel" (one per label).
        out: the .keras file to write (must not exist).
        image_size: input side; VGG16's head needs 224-255 px (a 7x7 feature map).
        outputs: output names, in the checkpoint's order; defaults to the study's.

    Raises:
        WeightsError: unreadable checkpoint, any missing/unexpected key or shape mismatch.
    """

    checkpoint, out = _existing(str(checkpoint)), Path(out)
    if out.suffix != ".keras":
        raise WeightsError(f"--out must be a .keras file, got {out}.")
    if out.exists():
        raise WeightsError(f"{out} already exists; choose another --out or delete it first.")
    if task not in STUDY_OUTPUTS:
        raise WeightsError(f"Unknown task {task!r}. Valid tasks: {', '.join(STUDY_OUTPUTS)}.")
    outputs = tuple(outputs or STUDY_OUTPUTS[task])
    if task == "binary" and len(outputs) != 2:
        raise WeightsError(f"The binary task has 2 outputs; got names {list(outputs)}.")
    state = torch_files.read_state_dict(checkpoint)
    model = build_model(backbone, len(outputs), image_size, "torch", None, head_units,
                        name=f"tfcovid_{backbone}_{task}")
    converted = torch_files.convert(state, model, backbone, require_head=True, source=str(checkpoint))
    assign(model, converted.arrays, str(checkpoint), require_head=True)
    log(f"Converted {len(state)} tensors from {checkpoint} into {model.name} "
        f"({image_size}x{image_size} px, 'torch' preprocessing, outputs {', '.join(outputs)})")

    out.parent.mkdir(parents=True, exist_ok=True)
    model.save(out)
    _embed_info(out, {"task": task, "outputs": list(outputs), "class_names": list(outputs),
                      "image_size": image_size,
                      "positive": outputs[0] if task == "binary" else None, "backbone": backbone,
                      "threshold": 0.5, "source": f"import-torch {checkpoint.name}"})
    # A reload check, as for every export: the written file must give the same logits.
    probe = np.random.default_rng(0).uniform(0, 255, (1, image_size, image_size, 3)).astype("float32")
    reloaded = keras.models.load_model(out, compile=False, safe_mode=True)
    want = np.asarray(model(probe, training=False))
    got = np.asarray(reloaded(probe, training=False))
    if not np.allclose(want, got, rtol=1e-5, atol=1e-5 * float(np.abs(want).max() + 1e-12)):
        raise WeightsError(f"{out} reloads with different outputs; the file is damaged.")
    return out


def _embed_info(path: Path, info: dict) -> None:
    # predict/evaluate read the task and output names from inside the .keras file.
    metadata.embed(path, {"format": metadata.FORMAT_VERSION, **info})
