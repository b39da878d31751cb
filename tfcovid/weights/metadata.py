"""What a trained model needs besides its weights: task, output names, input size, threshold.

A ``.keras`` file is a zip archive and Keras ignores members it does not know, so tfcovid
writes this as a small JSON member, ``tfcovid.json``, into every checkpoint it saves (see
``run_state.RunState``). A model file copied away from its run directory therefore still knows its
labels. For files without it (older runs, foreign models) :func:`load` falls back to the run
directory's ``config.yaml`` + ``metrics.json`` beside the file, then to names given by the user.

Used by ``predict`` and by every command that takes ``RUN_DIR|MODEL``.
"""
from __future__ import annotations

import json
import math
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import keras
import yaml

import tfcovid.models  # noqa: F401  (registers the Preprocess layer that load_model needs)
from tfcovid.models.outputs import temperatures
from tfcovid.weights import keras_files

INFO_MEMBER = "tfcovid.json"


FORMAT_VERSION = 1


CHECKPOINTS = ("last", "best")


class ModelInfoError(ValueError):
    """A model or run directory cannot be used; the message says which file and what to do."""


@dataclass
class Trained:
    """A loaded model and what it predicts."""

    model: keras.Model
    path: Path  # the .keras file
    run_dir: Path | None  # its run directory, when it has one
    task: str  # "binary" | "multilabel"
    outputs: tuple[str, ...]  # one name per model output (binary: class folders, sorted)
    positive: str | None  # binary: the disease class; None for multilabel
    image_size: int
    threshold: float  # train.threshold as recorded (before issue 23 the only decision threshold)
    source: str  # where task/outputs came from, for messages
    # The decision rule's thresholds (models.outputs.decisions): binary one, on the disease class;
    # three-label one per label. A model without a recorded operating point: its threshold.
    thresholds: tuple[float, ...] = ()
    operating_point: dict = field(default_factory=dict)  # how they were chosen (results.operating_point)
    # Temperature scaling (results.calibration): the logits are divided by these before the
    # softmax/sigmoid (binary one, three-label one per label); () when not calibrated.
    temperature: tuple[float, ...] = ()
    calibration: dict = field(default_factory=dict)  # its record: method, fitted_on, NLL/ECE

    @property
    def positive_index(self) -> int:
        """The disease class's output index (binary); 0 for the three-label task."""
        return self.outputs.index(self.positive) if self.task == "binary" else 0


def info_for(exp, manifest, point: dict | None = None, calibration: dict | None = None) -> dict:
    """The info to embed for a run of ``exp`` on ``manifest`` (JSON-ready); ``point``: the
    operating point chosen at the end of fit (None while training: train.threshold);
    ``calibration``: the temperature fitted at the end of fit (None: not calibrated)."""
    positive = exp.data.positive if exp.data.task == "binary" else None
    if positive is not None and positive not in manifest.class_names:
        positive = manifest.class_names[0]
    return {
        "format": FORMAT_VERSION,
        "task": exp.data.task,
        "outputs": list(manifest.output_names),
        "class_names": list(manifest.class_names),
        "positive": positive,
        "image_size": exp.data.image_size,
        "threshold": exp.train.threshold,
        "backbone": exp.model.backbone,
        **({"operating_point": point} if point else {}),
        **({"calibration": calibration} if temperatures(calibration) else {}),
    }


def read_embedded(path: str | Path) -> dict | None:
    """The embedded info of a .keras file, or None when it has none."""
    try:
        with zipfile.ZipFile(path) as zf:
            if INFO_MEMBER not in zf.namelist():
                return None
            return json.loads(zf.read(INFO_MEMBER))
    except (zipfile.BadZipFile, json.JSONDecodeError, OSError):
        return None


def embed(path: str | Path, info: dict) -> None:
    """Write ``info`` into the .keras file at ``path`` (replacing any earlier info)."""
    path = Path(path)
    current = read_embedded(path)
    if current == info:
        return
    if current is None:  # the usual case: a fresh checkpoint; appending is cheap
        with zipfile.ZipFile(path, "a") as zf:
            zf.writestr(INFO_MEMBER, json.dumps(info, indent=1))
        return
    # zipfile cannot replace a member in place: copy the others to a new archive.
    tmp = path.with_name(path.name + ".tmp")
    with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w") as dst:
        for item in src.infolist():
            if item.filename != INFO_MEMBER:
                dst.writestr(item, src.read(item.filename))
        dst.writestr(INFO_MEMBER, json.dumps(info, indent=1))
    tmp.replace(path)


def _run_dir_of(model_path: Path) -> Path | None:
    for folder in (model_path.parent, model_path.parent.parent):
        if (folder / "config.yaml").is_file():
            return folder
    return None


def info_from_run_dir(run_dir: Path) -> dict | None:
    """Rebuild the info from a run directory's config.yaml (+ metrics.json for class names)."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        data, train = config["data"], config.get("train", {})
        task = data["task"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None
    outputs, point, calibration = data.get("labels"), None, None
    metrics_file = run_dir / "metrics.json"
    if metrics_file.is_file():
        try:
            metrics = json.loads(metrics_file.read_text())
            outputs, point = metrics.get("outputs", outputs), metrics.get("operating_point")
            calibration = metrics.get("calibration")
        except json.JSONDecodeError:
            pass
    if task == "binary" and not metrics_file.is_file():
        return None  # the class folder names are only known once the run has scanned its data
    return {"format": FORMAT_VERSION, "task": task, "outputs": list(outputs),
            "positive": data.get("positive") if task == "binary" else None,
            "image_size": data.get("image_size"), "threshold": train.get("threshold", 0.5),
            **({"operating_point": point} if point else {}),
            **({"calibration": calibration} if calibration else {})}


def model_file(target: str | Path, checkpoint: str = "last") -> tuple[Path, Path | None]:
    """Resolve RUN_DIR|MODEL to (the .keras file, its run directory or None).

    A run directory gives ``checkpoints/<checkpoint>.keras``: "last" (the weights its
    metrics.json describes) or "best" (lowest validation loss).
    """
    if checkpoint not in CHECKPOINTS:
        raise ModelInfoError(f"Unknown checkpoint {checkpoint!r}. Valid: {', '.join(CHECKPOINTS)}.")
    target = Path(target).expanduser()
    if target.is_dir():
        path = target / "checkpoints" / f"{checkpoint}.keras"
        if not path.is_file():
            have = sorted(p.name for p in (target / "checkpoints").glob("*.keras")) \
                if (target / "checkpoints").is_dir() else []
            raise ModelInfoError(
                f"{target} is not a finished run directory: {path} is missing"
                + (f" (found: {', '.join(have)})" if have else "")
                + ". Pass a run directory written by `tfcovid fit`, or a .keras model file."
            )
        return path, target
    if not target.is_file():
        raise ModelInfoError(f"Model not found: {target}. Pass a run directory or a .keras file.")
    if target.suffix != ".keras":
        raise ModelInfoError(f"{target} is not a .keras model file. Pass a run directory or a .keras file.")
    return target, _run_dir_of(target)


def _name_task(model: keras.Model) -> str | None:
    match = re.fullmatch(r"tfcovid_\w+?_(binary|multilabel)", model.name)
    return match.group(1) if match else None


def _refuse_renaming(path: Path, source: str, info: dict, task: str | None, labels) -> None:
    """--task/--labels are for a model that does not say what it predicts: where it does, a
    different value would silently rename its outputs (a covid-19 probability shown as
    "normal"), so it is refused; the same value is harmless."""
    recorded_task, recorded = info.get("task"), info.get("outputs")
    if task and recorded_task and task != recorded_task:
        raise ModelInfoError(
            f"{path} is a {recorded_task} model (recorded in {source}), not {task}. Leave out "
            "--task: it is only for a model file that does not record its task."
        )
    if labels and recorded and [str(o) for o in recorded] != [str(x) for x in labels]:
        raise ModelInfoError(
            f"{path} records its outputs as {[str(o) for o in recorded]} (in {source}); --labels "
            f"{','.join(map(str, labels))} would rename them. Leave out --labels: it is only for "
            "a model file that does not record them."
        )


def load(target: str | Path, checkpoint: str = "last", task: str | None = None,
         labels: Sequence[str] | None = None) -> Trained:
    """Load a trained model and what it predicts.

    The task and output names come from the info embedded in the .keras file, else the run
    directory's config.yaml + metrics.json, else ``task``/``labels`` given by the caller (which
    may repeat what the model records, not change it).

    Raises:
        ModelInfoError: the file is missing, not a Keras model or holds Python code (a Lambda
            layer: refused, never run), or the task/labels cannot be found, do not match
            the model's outputs, or differ from those the model records.
    """
    path, run_dir = model_file(target, checkpoint)
    info, source = read_embedded(path), f"{path} (embedded {INFO_MEMBER})"
    if info is None and run_dir is not None:
        info, source = info_from_run_dir(run_dir), f"{run_dir / 'config.yaml'}"
    info = dict(info or {})
    model = keras_files.load_model(path, ModelInfoError)  # safe mode: no code from the file
    _refuse_renaming(path, source, info, task, labels)
    if labels:
        info["outputs"], source = list(labels), "--labels"
    if task:
        info["task"] = task
    info.setdefault("task", _name_task(model))
    n_out = int(model.output_shape[-1])
    if not info.get("task") or not info.get("outputs"):
        raise ModelInfoError(
            f"{path} does not say what it predicts (no {INFO_MEMBER} inside it and no run "
            "directory's config.yaml beside it). Pass --task binary|multilabel and --labels "
            f"NAME,NAME,... ({n_out} names, in the model's output order)."
        )
    outputs = tuple(str(o) for o in info["outputs"])
    if len(outputs) != n_out:
        raise ModelInfoError(
            f"{path} has {n_out} outputs but its labels from {source} are {list(outputs)} "
            f"({len(outputs)}). Pass --labels with {n_out} names."
        )
    if info["task"] not in ("binary", "multilabel") or (info["task"] == "binary" and n_out != 2):
        raise ModelInfoError(f"Task {info['task']!r} does not fit {path} ({n_out} outputs).")
    positive = info.get("positive") if info["task"] == "binary" else None
    if info["task"] == "binary" and positive not in outputs:
        positive = "infected" if "infected" in outputs else outputs[0]
    threshold = float(info.get("threshold") or 0.5)
    point = _operating_point(info.get("operating_point"), info["task"], n_out, path, source)
    thresholds = tuple(point["thresholds"]) if point else (threshold,) * (1 if info["task"] == "binary" else n_out)
    calibration = _calibration(info.get("calibration"), info["task"], n_out, path, source)
    return Trained(model=model, path=path, run_dir=run_dir, task=info["task"], outputs=outputs,
                   positive=positive, image_size=int(model.input_shape[1]),
                   threshold=threshold, source=source, thresholds=thresholds,
                   operating_point=point or {"method": "threshold", "chosen_on": None,
                                             "thresholds": list(thresholds), "split": None, "figures": {}},
                   temperature=temperatures(calibration), calibration=calibration or {"method": "none"})


def _operating_point(point, task: str, n_out: int, path: Path, source: str) -> dict | None:
    """The recorded operating point checked (the file is untrusted): one threshold in (0, 1)
    for binary, one per output for the three-label task."""
    if point is None:
        return None
    want = 1 if task == "binary" else n_out
    values = point.get("thresholds") if isinstance(point, dict) else None
    if not (isinstance(values, list) and len(values) == want
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                    and 0 < v < 1 for v in values)):
        raise ModelInfoError(
            f"{path} records a bad operating point in {source}: thresholds {values!r}; expected "
            f"{want} number(s) in (0, 1). Choose it again with `tfcovid calibrate`, or remove "
            f"{INFO_MEMBER} from the file and pass --task/--labels.")
    return {**point, "thresholds": [float(v) for v in values]}


def _calibration(record, task: str, n_out: int, path: Path, source: str) -> dict | None:
    """The recorded temperature checked (the file is untrusted): a finite number > 0, one for
    binary and one per output for the three-label task; method "none" or no record: None."""
    if record is None or (isinstance(record, dict) and record.get("method") == "none"):
        return None
    want = 1 if task == "binary" else n_out
    t = record.get("temperature") if isinstance(record, dict) and record.get("method") == "temperature" else None
    values = t if isinstance(t, list) else [t]
    if not (len(values) == want and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                        and math.isfinite(v) and v > 0 for v in values)):
        raise ModelInfoError(
            f"{path} records a bad calibration in {source}: temperature {t!r}; expected {want} "
            f"number(s) above 0. Use the run's own checkpoint, or remove {INFO_MEMBER} from the "
            "file and pass --task/--labels.")
    return record
