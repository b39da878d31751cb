"""Evaluate a trained model on any labeled split: metrics JSON, plots, and what clinicians read.

``evaluate(RUN_DIR|MODEL, data=None, split="test")`` loads the model (with its task and label
names, see :mod:`tfcovid.weights.metadata`), scans the data (the run's own by default), predicts the
split with the evaluation transform and recomputes the scikit-learn report of either task
(:mod:`tfcovid.results.scores`). It writes ``<split>.json``, ``<split>_predictions.csv`` and the
split's confusion-matrix and ROC plots (``<split>_confusion.png``, ``<split>_roc.png``) to
``RUN/eval/`` (or ``<model>-eval/`` beside any other ``.keras`` file), and returns the result.
The run's best checkpoint writes ``<split>-best.json``, ``<split>-best_predictions.csv``, ... so
that its results and the last checkpoint's sit side by side; files it replaces are counted.

Sensitivity and specificity are reported by name for the disease classes: the binary task's
positive class, and every label of the three-label task except "normal".
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tfcovid import config
from tfcovid.data import (  # `data` is evaluate()'s argument, as in the CLI
    checks,
    datasets,
    demo,
    label_files,
    records,
    types,
)
from tfcovid.data import folders as data_folders
from tfcovid.data import splits as data_splits
from tfcovid.models import tta as test_time
from tfcovid.models.outputs import decide, probabilities
from tfcovid.results import plots, scores, uncertainty
from tfcovid.utils.atomic import atomic_write_csv, atomic_write_text
from tfcovid.utils.text import csv_text, plural
from tfcovid.weights import metadata

SPLITS = ("train", "validation", "test")


class EvaluateError(ValueError):
    """The evaluation cannot run as asked; the message says what to pass instead."""


def disease_classes(task: str, outputs, positive: str | None) -> list[str]:
    """The outputs that name a disease: the binary positive class, or every label but "normal"."""
    if task == "binary":
        return [positive if positive in outputs else outputs[0]]
    diseases = [o for o in outputs if o.lower() != "normal"]
    return diseases or list(outputs)


_DISEASE_KEYS = ("sensitivity", "specificity", "f1", "roc_auc", "average_precision", "brier", "ece")


def disease_summary(report: dict, task: str, diseases) -> dict:
    """{disease: {sensitivity, specificity, f1, roc_auc, average_precision, brier, ece, support,
    intervals}} from a metrics report."""
    out = {}
    for name in diseases:
        if task == "binary":
            cm = np.asarray(report["confusion_matrix"])
            intervals = {k: v for k, v in report["intervals"].items() if k != "accuracy"}
            out[name] = {**{key: report[key] for key in _DISEASE_KEYS},
                         "support": int(cm[report["positive_index"]].sum()), "intervals": intervals}
        else:
            m = report["per_label"][name]
            out[name] = {key: m[key] for key in (*_DISEASE_KEYS, "support", "intervals")}
    return out


def run_config(run_dir: Path | None):
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    return config.from_dict(config.load_yaml(run_dir / "config.yaml"))


def data_root(data_dir, exp, trained) -> Path:
    if data_dir is None:
        if exp is None:
            raise EvaluateError(
                f"{trained.path} has no run directory with a config.yaml, so its data is unknown. "
                "Pass --data DIR (an ImageFolder tree with the split to evaluate)."
            )
        data_dir = exp.data.dir
    if str(data_dir) == "demo":
        per_class = exp.data.demo_per_class if exp is not None else None
        return demo.ensure_demo_data(trained.task, per_class=per_class, log=lambda s: None)
    return Path(data_dir).expanduser()


def scan_split(root: Path, split: str, trained, exp=None,
               log=print, max_pixels: int | None = None) -> tuple[types.Manifest, types.Split]:
    """Scan ``root`` for one labeled split whose classes match what the model predicts.

    Every file of the split is checked first, as ``fit`` checks them (``tfcovid.data.checks``):
    unusable ones stop the evaluation with their full list, or are left out when the run
    was trained with ``data.skip_bad``. Problems in other splits do not matter here.
    ``max_pixels``: the limit (``--max-pixels``); None: the run's ``data.max_pixels``.
    """
    if split not in SPLITS:
        raise EvaluateError(f"Unknown split {split!r}. Valid splits: {', '.join(SPLITS)}.")
    label_map = exp.data.label_map if exp is not None else config.STUDY_LABEL_MAP
    try:
        if label_files.is_label_file(root):  # the run's splits.csv repeats its splits exactly
            manifest = _label_file_split(root, trained, exp, label_map)
        else:
            manifest = data_folders.scan(root, trained.task, trained.outputs, label_map, required=(split,),
                                         strict=False)
    except types.ClassCountError as err:  # its advice (--task multilabel) is fit's, not ours
        raise EvaluateError(
            f"{trained.path} is a binary model with outputs {list(trained.outputs)}, but "
            f"{err.root} has {len(err.class_names)} class folders: {list(err.class_names)}. "
            f"Evaluate it on data with the class folders {list(trained.outputs)}."
        ) from None
    except types.DataError as err:
        folders = data_folders.find_splits(Path(root)) if Path(root).is_dir() else {}
        present = [name for name in ("validation", "train") if name in folders]
        if split in folders or not present:
            raise
        raise types.DataError(f"{err} Evaluate another split with --split {present[0]}.") from None
    chosen = manifest.splits[split]
    if not chosen.labeled:
        raise EvaluateError(
            f"The {split} split in {chosen.dir} has no class folders, so there are no labels to "
            "evaluate against. Use `tfcovid predict` for unlabeled images."
        )
    if trained.task == "binary" and tuple(manifest.class_names) != tuple(trained.outputs):
        raise EvaluateError(
            f"{root} has class folders {list(manifest.class_names)} but the model predicts "
            f"{list(trained.outputs)}. Evaluate it on data with the same class folders."
        )
    for problem in manifest.problems:  # ignored system files, linked folders not followed
        log(f"note: {problem}")
    return manifest, _usable(checks.only_split(manifest, split), exp, log, max_pixels)


def _label_file_split(root, trained, exp, label_map) -> types.Manifest:
    """A label file's images in the splits the run used (its splits.csv), else made as fit makes
    them from the run's settings (or the defaults)."""
    manifest = label_files.read(root, trained.task, trained.outputs, label_map)
    saved = trained.run_dir / data_splits.FILE if trained.run_dir else None
    settings = exp if exp is not None else config.Experiment()
    return data_splits.assign(manifest, settings.data, settings.train.seed, saved)


def _usable(manifest: types.Manifest, exp, log, max_pixels: int | None = None) -> types.Split:
    """The manifest's one split, without unusable files if the run's data.skip_bad says so."""
    settings = exp.data if exp is not None else config.DataConfig()
    limit = settings.max_pixels if max_pixels is None else max_pixels
    (name,) = manifest.splits
    if not settings.skip_bad:
        checks.require_usable(manifest, limit, log, setting="--max-pixels")
        return manifest.splits[name]
    bad = checks.check(manifest, limit, log, setting="--max-pixels")
    if bad:
        log(f"Left out {len(bad)} unusable file(s), as the run did (data.skip_bad):\n"
            + checks.describe(bad, manifest.root))
    return checks.leave_out(manifest, bad, required=(name,)).splits[name]


def run_checkpoint(trained) -> str | None:
    """"last" or "best" when the model is that checkpoint of its run directory, else None
    (a bare model file, or another .keras file inside a run directory)."""
    if trained.run_dir is None:
        return None
    for name in metadata.CHECKPOINTS:
        if trained.path.resolve() == (trained.run_dir / "checkpoints" / f"{name}.keras").resolve():
            return name
    return None


def default_out_dir(trained) -> Path:
    """``RUN/eval`` for a run's checkpoint, ``<model stem>-eval`` beside any other model file."""
    if run_checkpoint(trained) is not None:
        return trained.run_dir / "eval"
    return trained.path.with_name(trained.path.stem + "-eval")


def result_stem(trained, split: str, tta: str = "none") -> str:
    """What the result files of ``split`` start with: ``<split>``, or ``<split>-best`` for a
    run's best checkpoint, whose results must not replace the last checkpoint's; ``-tta``
    follows for test-time augmentation, beside the single-pass results."""
    stem = f"{split}-best" if run_checkpoint(trained) == "best" else split
    return stem + ("-tta" if tta != "none" else "")


def predict_logits(trained, split: types.Split, batch_size: int = 32, mirrored: bool = False) -> np.ndarray:
    """The model's logits (n, outputs) for every image of ``split``, in file order (``mirrored``:
    of each image's mirror, for test-time augmentation)."""

    ds = datasets.dataset(split, trained.image_size, batch_size)
    if split.labeled:
        ds = ds.map(lambda x, y: x)
    try:
        return trained.model.predict(ds.map(test_time.mirrored) if mirrored else ds, verbose=0)
    except records.READ_ERRORS as err:
        records.explain_read_error(split.dir, err)  # a damaged prepared shard, named
        raise


def predict_split(trained, split: types.Split, batch_size: int = 32, tta: str = "none",
                  logits: np.ndarray | None = None) -> np.ndarray:
    """Probabilities (n, outputs) for every image of ``split``, in file order, with the model's
    temperature when it is calibrated; ``tta`` "flip": averaged with each mirror image's
    (models.tta). ``logits``: the split's, when already predicted."""
    if logits is None:
        logits = predict_logits(trained, split, batch_size)
    probs = probabilities(logits, trained.task, trained.temperature)
    if test_time.check(tta) == "flip":
        mirror = predict_logits(trained, split, batch_size, mirrored=True)
        probs = test_time.averaged(probs, probabilities(mirror, trained.task, trained.temperature))
    return probs


def _write_predictions(path: Path, split: types.Split, probs: np.ndarray, trained) -> None:
    """One row per image: its probabilities and the decision at the model's operating point
    (the class, or the labels joined by '+')."""
    decided = decide(probs, trained.task, trained.thresholds, trained.positive_index)
    # Names are data: a cell a spreadsheet would run as a formula gets a leading ' (OWASP).
    rows = [[csv_text(p), csv_text(folder), *(f"{v:.6f}" for v in row),
             csv_text("+".join(o for o, d in zip(trained.outputs, chosen) if d))]
            for p, folder, row, chosen in zip(split.paths, split.folders, probs, decided)]
    atomic_write_csv(path, [["path", "true_folder", *map(csv_text, trained.outputs), "predicted"], *rows])


def evaluate(run_or_model, data=None, split: str = "test", out=None, checkpoint: str = "last",
             batch_size: int = 32, task: str | None = None, labels=None, make_plots: bool = True,
             log=print, max_pixels: int | None = None, tta: str = "none") -> dict:
    """Recompute a trained model's metrics on one labeled split and save them with plots.

    Args:
        run_or_model: a run directory or a ``.keras`` file.
        data: ImageFolder tree (or "demo"); default the run's own data.
        split: "train", "validation" or "test".
        out: output folder; default ``RUN/eval`` or ``<model>-eval/`` beside a bare model.
        checkpoint: for a run directory, "last" (what metrics.json describes) or "best"; the
            best checkpoint's files are named ``<split>-best*`` (a run's best.keras given as a
            file too).
        batch_size: images per prediction batch.
        task, labels: for a bare model that does not carry them (see weights.metadata.load).
        make_plots: write the confusion-matrix and ROC PNGs.
        log: where progress lines go.
        max_pixels: larger images are refused before decoding; None: the run's
            ``data.max_pixels`` (the default for a bare model).
        tta: "flip" averages each image's probabilities with its mirror image's; the files
            are then named ``<split>[-best]-tta*`` and the JSON records ``tta``.

    Returns:
        The JSON written to ``<out>/<split>.json``: model, checkpoint ("last", "best" or None
        for another model file), data, split, task, outputs, ``report`` (binary_report /
        multilabel_report, with their 95 % intervals), ``diseases`` (per disease class:
        sensitivity, specificity, F1, ROC AUC, average precision, Brier score, ECE, support and
        ``intervals``), ``files`` and ``replaced`` (those of ``files`` that replaced a file of
        an earlier evaluation).

    Raises:
        EvaluateError, metadata.ModelInfoError, data.DataError: with what to do instead.
    """
    test_time.check(tta)
    trained = metadata.load(run_or_model, checkpoint, task, labels)
    exp = run_config(trained.run_dir)
    root = data_root(data, exp, trained)
    manifest, chosen = scan_split(root, split, trained, exp, log, max_pixels)
    log(f"Evaluating {trained.path} on {chosen.dir} ({plural(len(chosen), 'image')}, {trained.task})")
    logits = predict_logits(trained, chosen, batch_size)
    probs = predict_split(trained, chosen, batch_size, tta, logits)  # calibrated, as every path
    report = scores.report(trained.task, chosen.labels, probs, trained.outputs, trained.positive,
                           trained.thresholds, **uncertainty.settings(exp))  # at the model's operating point
    diseases = disease_classes(trained.task, trained.outputs, trained.positive)

    out = Path(out) if out is not None else default_out_dir(trained)
    out.mkdir(parents=True, exist_ok=True)
    stem = result_stem(trained, split, tta)
    earlier = {p for p in (out / f"{stem}.json", out / f"{stem}_predictions.csv",
                           *(out / f"{stem}_{kind}.png" for kind in ("confusion", "roc", "pr", "reliability")))
               if p.exists()}
    files = [out / f"{stem}.json", out / f"{stem}_predictions.csv"]
    _write_predictions(files[1], chosen, probs, trained)
    if make_plots:
        title = trained.run_dir.name if trained.run_dir else trained.path.stem
        files += plots.save_split_plots(out, stem, report, trained.task, chosen.labels, probs,
                                        trained.outputs, trained.positive, title,
                                        probabilities(logits, trained.task) if trained.temperature else None)
    replaced = [f for f in files if f in earlier]
    result = {
        "model": str(trained.path),
        "checkpoint": run_checkpoint(trained),
        "data": str(root),
        "split": split,
        "task": trained.task,
        "outputs": list(trained.outputs),
        "operating_point": trained.operating_point,
        "tta": tta,  # test-time augmentation: "flip" averages the image's and its mirror's
        "calibration": trained.calibration,
        "report": report,
        "diseases": disease_summary(report, trained.task, diseases),
        "files": [str(f) for f in files],
        "replaced": [str(f) for f in replaced],
    }
    atomic_write_text(files[0], json.dumps(result, indent=2))
    if replaced:
        log(f"Replaced {len(replaced)} file(s) of an earlier evaluation in {out}: "
            + ", ".join(f.name for f in replaced) + ".")
    return result


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _with_ci(value, shown: dict | None, percent: bool = True) -> str:
    """"80.0 % (61.5–95.2)" or "0.912 (0.871–0.950)": a figure and its 95 % interval."""
    if value is None:
        return "–"
    if not shown:
        return _pct(value) if percent else f"{value:.3f}"
    if percent:
        return f"{100 * value:.1f} % ({100 * shown['low']:.1f}–{100 * shown['high']:.1f})"
    return f"{value:.3f} ({shown['low']:.3f}–{shown['high']:.3f})"


def _uncertainty_note(report: dict) -> str:
    """How the intervals and the ECE were computed, and the figures with fewer usable resamples."""
    how = report.get("uncertainty") or {}
    drawn = how.get("bootstrap_resamples", 0)
    if not drawn:
        return "No confidence intervals (train.bootstrap_resamples: 0)."
    groups = [("", report["intervals"])] + [(f"{k} ", m["intervals"]) for k, m in report.get("per_label", {}).items()]
    short = [f"{prefix}{figure} {i['resamples']}" for prefix, shown in groups for figure, i in shown.items()
             if i and i["resamples"] < drawn]
    return (f"In brackets: 95 % CI, percentile bootstrap, {drawn} resamples (seed {how['seed']})"
            + (f"; resamples with both classes, where fewer: {', '.join(short)}" if short else "")
            + f". Brier score and ECE ({how['ece_bins']} equal-width bins) of the class's probability.")


def format_result(result: dict) -> str:
    """A short text summary: headline metrics, then per disease class sensitivity, specificity,
    F1 and ROC AUC with their 95 % intervals, average precision, Brier score and ECE."""
    r, task = result["report"], result["task"]
    ci = r.get("intervals") or {}
    if task == "binary":
        head = (f"accuracy {_with_ci(r['accuracy'], ci.get('accuracy'))}, F1 ({r['positive_class']}) {r['f1']:.3f}, "
                f"study F1 ({r['f1_study_positive_class']}) {r['f1_study']:.3f}, "
                f"threshold {r['threshold']:.4g}")
    else:
        shown = r["threshold"] if isinstance(r["threshold"], list) else [r["threshold"]]
        head = (f"accuracy (sample Jaccard) {_with_ci(r['jaccard_samples'], ci.get('accuracy'))}, "
                f"sample F1 {_with_ci(r['f1'], ci.get('f1'), False)}, "
                f"exact match {_pct(r['exact_match'])}, threshold {', '.join(f'{t:.4g}' for t in shown)}")
    lines = [f"{result['split']}: {plural(r['n'], 'image')}; {head}",
             (f"{'disease class':<16} {'sensitivity':>22} {'specificity':>22} {'F1':>21} {'ROC AUC':>21} "
              f"{'PR AUC':>6} {'Brier':>6} {'ECE':>6} {'positives':>9}")]
    for name, d in result["diseases"].items():
        shown = d.get("intervals") or {}
        lines.append(f"{name:<16} {_with_ci(d['sensitivity'], shown.get('sensitivity')):>22} "
                     f"{_with_ci(d['specificity'], shown.get('specificity')):>22} "
                     f"{_with_ci(d['f1'], shown.get('f1'), False):>21} "
                     f"{_with_ci(d['roc_auc'], shown.get('roc_auc'), False):>21} "
                     + " ".join(f"{'–' if d[k] is None else format(d[k], '.3f'):>6}"
                                for k in ("average_precision", "brier", "ece")) + f" {d['support']:>9}")
    notes = [f"note: {n}" for n in r.get("notes", [])]  # e.g. a figure undefined in this split
    return "\n".join([*lines, _uncertainty_note(r), *notes])
