"""MODEL_CARD.md (issue 23.7): the facts a reviewer asks for first about one run, from its
config.yaml and metrics.json: the data (images per split and class, how the splits were made),
the recipe, the operating point and how it was chosen, the figures with their 95 % intervals,
calibration, intended use and the not-for-clinical-use statement.

``fit`` writes it into the run directory (training.finish), ``tfcovid report`` and ``tfcovid
calibrate`` write it again from metrics.json, and ``tfcovid export`` copies it beside the
exported files. Nothing here reads images or models: a card is rendered from the two files alone.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from tfcovid.data import label_files
from tfcovid.results import operating_point, tables
from tfcovid.utils.atomic import atomic_write_text

NOT_CLINICAL = "tfcovid is a research tool, not a medical device: not for clinical use."

FILENAME = "MODEL_CARD.md"

INTENDED_USE = (
    "Research and teaching: reproducing and extending the study's experiments, comparing "
    "backbones, recipes and operating points on chest X-ray collections. It is not for "
    "diagnosis, triage, screening or any decision about a patient. The figures above hold for "
    "images like the test split's; on images from another hospital, scanner, population or "
    "disease mix they are unknown until measured there (`tfcovid evaluate RUN --data DIR`).")

_SPLITS = ("train", "validation", "test")


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _num(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_interval(value, shown: dict | None, percent: bool) -> str:
    """"86.0 % (82.1–89.5)" / "0.912 (0.881–0.940)": the figure and its 95 % interval."""
    cell = _pct(value) if percent else _num(value)
    if value is None or not shown:
        return cell
    scale, digits = (100, 1) if percent else (1, 3)
    return f"{cell} ({scale * shown['low']:.{digits}f}–{scale * shown['high']:.{digits}f})"


def _inline(value) -> str:
    """A name or value inside a line of prose or code: line breaks folded, backticks made quotes,
    so a folder name cannot start a heading or close a code span or block."""
    return " ".join(str(value).split()).replace("`", "'")


def _row(cells) -> str:
    # Names come from folders and config values: a | or a line break would break the table.
    return "| " + " | ".join(" ".join(str(c).split()).replace("|", "\\|") for c in cells) + " |"


def _table(header: Sequence[str], rows) -> list[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def _split_order(summary: dict) -> list[str]:
    names = list(summary.get("images") or {}) + list(summary.get("splits", {}))
    return sorted(dict.fromkeys(names), key=lambda s: (_SPLITS.index(s) if s in _SPLITS else 9, s))


def _how_split(data: dict, train: dict) -> str:
    """How the run's train/validation/test were formed: from a label file (data.split) or the
    split folders of a tree."""
    if not label_files.is_label_file(data.get("dir", "")):
        return ("the split folders found on disk (train/, validation/, test/ of the ImageFolder tree "
                "or prepared folder); tfcovid moved no image between splits")
    if data.get("split") == "given":
        return "as the label file gives them (`data.split: given`); listed in the run's splits.csv"
    how = ("from the label file: the splits it gives kept, the others made by patient (`data.split: "
           f"patient`, scikit-learn's StratifiedGroupKFold, seed {train.get('seed', 0)}, validation "
           f"{data.get('validation_fraction')}, test {data.get('test_fraction')} of the patients)")
    if data.get("folds"):
        how += f", fold {data.get('fold')} of {data.get('folds')} as validation"
    return how + "; no patient in two splits; listed in the run's splits.csv"


def _data(config: dict, summary: dict) -> list[str]:
    """Where the images came from, how the splits were made, images per split and class."""
    data, task, splits = config.get("data", {}), summary["task"], summary.get("splits", {})
    source = data.get("dir", "not recorded")
    lines = ["## Data", "", f"- Images: `{_inline(source)}`" + (" (the generated synthetic demo set, not X-rays)"
                                                      if source == "demo" else "")]
    how = _how_split(data, config.get("train", {}))
    lines.append(f"- Splits: {how}.")
    if data.get("skip_bad"):
        lines.append("- Unusable files were left out (`data.skip_bad`): listed in the run's skipped.txt.")
    outputs = [_inline(o) for o in summary.get("outputs") or summary.get("class_names") or []]
    if task == "binary":
        header = ["split", "images", *outputs]
        lines.append(f"- Classes (ImageFolder order): {', '.join(outputs) or 'not recorded'}.")
    else:
        header = ["split", "images", *(f"with {o}" for o in outputs)]
        lines.append(f"- Labels: {', '.join(outputs) or 'not recorded'}; an image may have several.")
    rows = []
    for split in _split_order(summary):
        report = splits.get(split)
        total = (summary.get("images") or {}).get(split, report["n"] if report else "–")
        if report is None:
            rows.append([split, total, *(["unlabeled"] * len(outputs))])
        elif task == "binary":
            rows.append([split, report["n"], *(sum(r) for r in report["confusion_matrix"])])
        else:
            rows.append([split, report["n"], *(report["per_label"][o]["support"] for o in outputs)])
    return lines + ["", *_table(header, rows), ""]


def _recipe(config: dict, summary: dict) -> list[str]:
    """The training recipe: one row per setting, as config.yaml and metrics.json record it."""
    model, train, data, aug = (config.get(k, {}) for k in ("model", "train", "data", "augment"))
    backbone = model.get("backbone", "?")
    loss = tables._LOSS_NAMES.get(train.get("loss"), train.get("loss", "?"))
    if train.get("loss") == "focal":
        loss += f" (alpha {train.get('focal_alpha')}, gamma {train.get('focal_gamma')})"
    optimizer = train.get("optimizer", "?") + (f" (momentum {train.get('momentum')})"
                                               if train.get("optimizer") == "sgd" else "")
    augment = "none"
    if aug.get("enabled", True) and aug:
        augment = (f"rotation ±{aug.get('rotation')}°, random resized crop (scale "
                   f"{'–'.join(map(str, aug.get('crop_scale', [])))}, ratio "
                   f"{'–'.join(f'{r:.2f}' for r in aug.get('crop_ratio', []))})"
                   + (", horizontal flip" if aug.get("flip") else ""))
    rows = [
        ("Backbone", tables._BACKBONE_NAMES.get(backbone, backbone)),
        ("Weights", model.get("weights", "?")),
        ("Frozen", tables.freeze_label(model.get("freeze", "?"), backbone)),
        ("Head", f"{model.get('head_units', '?')} hidden units"),
        ("Image size", f"{data.get('image_size', '?')} px, preprocessing {summary.get('preprocessing', model.get('preprocessing', '?'))}"),
        ("Loss", loss),
        ("Optimizer", optimizer),
        ("Learning rate", train.get("lr", "?")),
        ("Epochs", tables.epochs_cell(summary, train.get("epochs", "?"))),
        ("Batch size (global)", train.get("batch_size", "?")),
        ("Augmentation", augment),
        ("Precision", summary.get("precision", train.get("precision", "?"))),
        ("Seed", f"{train.get('seed', '?')}" + (", deterministic ops" if train.get("deterministic") else "")),
    ]
    rows += _beyond_rows(train, summary)
    rows += [(f"`{key}`", value) for key, value in (("train.class_weight", train.get("class_weight")),
                                                     ("data.sampling", data.get("sampling"))) if value is not None]
    if summary.get("trainable_params") is not None:
        rows.append(("Parameters", f"{summary['trainable_params']:,} trainable of {summary.get('total_params', 0):,}"))
    if summary.get("train_seconds") is not None:
        took = f"{tables.format_duration(summary['train_seconds'])} ({summary.get('replicas', 1)} replica(s))"
        rows.append(("Training time", took))
    return ["## Recipe", "", *_table(["setting", "value"], rows), ""]


def _beyond_rows(train: dict, summary: dict) -> list[tuple[str, str]]:
    """Rows for the recipes beyond the study (docs/beyond.md) a run used: schedule, warm-up,
    weight EMA, early stopping (metrics.json's outcome when it has one). None when all are off."""
    rows = []
    schedule, warmup = train.get("schedule", "constant"), train.get("warmup_epochs", 0) or 0
    if schedule != "constant" or warmup:
        what = {"cosine": "cosine to 0", "step": f"step: ×{train.get('step_gamma')} every "
                f"{train.get('step_epochs')} epochs"}.get(schedule, "constant")
        rows.append(("Learning-rate schedule", what + (f", after {warmup} warm-up epoch(s)" if warmup else "")))
    if train.get("ema"):
        rows.append(("Weight EMA", f"momentum {train['ema']} (the averaged weights are the model)"))
    stop = summary.get("early_stopping")
    if stop or train.get("early_stopping", "none") != "none":
        stop = stop or {"metric": train.get("early_stopping"), "patience": train.get("patience")}
        outcome = f"; {stop['reason']}" if stop.get("reason") else ""
        restored = "; the best epoch's weights restored" if stop.get("restored_best") else ""
        how = f"on {stop.get('metric')} (patience {stop.get('patience')})"
        rows.append(("Early stopping", how + outcome + restored))
    return rows


def _operating_point(summary: dict) -> list[str]:
    point = summary.get("operating_point")
    if not point:
        return ["## Operating point", "", ("Not recorded (a run from before operating points): the "
                                           "figures are at `train.threshold`, 0.5 unless set."), ""]
    how = ("Chosen on the validation split, never on test, with `train.operating_point` "
           f"(`{point['method']}`; docs/operating-points.md)." if point.get("chosen_on")
           else f"Fixed (`{point['method']}`), not chosen from data.")
    return ["## Operating point", "", how, "", "```text", operating_point.describe(point).replace("`", "'"), "```", ""]


def _binary_figures(summary: dict) -> list[str]:
    rows = []
    for split, r in summary["splits"].items():
        ci = r.get("intervals") or {}
        rows.append([split, r["n"], _with_interval(r["accuracy"], ci.get("accuracy"), True),
                     _with_interval(r["sensitivity"], ci.get("sensitivity"), True),
                     _with_interval(r["specificity"], ci.get("specificity"), True),
                     _with_interval(r["f1"], ci.get("f1"), False),
                     _with_interval(r.get("roc_auc"), ci.get("roc_auc"), False),
                     _num(r.get("average_precision")), _num(r.get("brier")), _num(r.get("ece"))])
    positive = next(iter(summary["splits"].values()))["positive_class"]
    return [(f"Disease class `{_inline(positive)}`: sensitivity, specificity, F1, ROC AUC, PR AUC (average "
             "precision), Brier score and ECE of its probability."), "",
            *_table(["split", "images", "accuracy", "sensitivity", "specificity", "F1", "ROC AUC",
                     "PR AUC", "Brier", "ECE"], rows)]


def _multilabel_figures(summary: dict) -> list[str]:
    overall, labels = [], []
    for split, r in summary["splits"].items():
        ci = r.get("intervals") or {}
        overall.append([split, r["n"], _with_interval(r["jaccard_samples"], ci.get("accuracy"), True),
                        _with_interval(r["f1"], ci.get("f1"), False), _pct(r.get("exact_match"))])
        for name, m in r["per_label"].items():
            lci = m.get("intervals") or {}
            labels.append([split, name, m["support"],
                           _with_interval(m["sensitivity"], lci.get("sensitivity"), True),
                           _with_interval(m["specificity"], lci.get("specificity"), True),
                           _with_interval(m["f1"], lci.get("f1"), False),
                           _with_interval(m.get("roc_auc"), lci.get("roc_auc"), False),
                           _num(m.get("average_precision")), _num(m.get("brier")), _num(m.get("ece"))])
    return [*_table(["split", "images", "accuracy (sample Jaccard)", "sample F1", "exact match"], overall),
            "", "Per label:", "",
            *_table(["split", "label", "positives", "sensitivity", "specificity", "F1", "ROC AUC",
                     "PR AUC", "Brier", "ECE"], labels)]


def _short_intervals(summary: dict) -> list[str]:
    """The intervals computed on fewer resamples than drawn (the others had one class only)."""
    out = []
    for split, r in summary["splits"].items():
        drawn = (r.get("uncertainty") or {}).get("bootstrap_resamples", 0)
        groups = [("", r.get("intervals") or {})]
        groups += [(f"{name} ", m.get("intervals") or {}) for name, m in r.get("per_label", {}).items()]
        for prefix, shown in groups:
            out += [f"{split} {prefix}{figure} on {i['resamples']}" for figure, i in shown.items()
                    if i and i["resamples"] < drawn]
    return out


def _figures(summary: dict) -> list[str]:
    """Every labeled split's figures at the operating point, with their 95 % intervals."""
    if not summary.get("splits"):
        return ["## Figures", "", "No labeled split was evaluated.", ""]
    body = (_binary_figures if summary["task"] == "binary" else _multilabel_figures)(summary)
    how = next(iter(summary["splits"].values())).get("uncertainty")
    if how and how.get("bootstrap_resamples"):
        note = (f"In brackets: 95 % confidence intervals, percentile bootstrap of the split's images "
                f"({how['bootstrap_resamples']} resamples, seed {how['seed']}); ECE over "
                f"{how['ece_bins']} equal-width bins (docs/operating-points.md).")
        short = _short_intervals(summary)
        if short:
            note += (" Resamples without both classes were skipped for: " + "; ".join(short) + ".")
    elif how:
        note = "No confidence intervals: `train.bootstrap_resamples` was 0."
    else:
        note = "No confidence intervals: the run's metrics.json is from before they were computed."
    return ["## Figures", "", "At the operating point above; figures without brackets have no interval.",
            "", *body, "", note, ""]


def _calibration(summary: dict) -> list[str]:
    cal = summary.get("calibration")
    if not cal:
        return ["## Calibration", "", ("Not calibrated: the probabilities are the trained model's "
                                       "softmax / sigmoid outputs. How far they are from observed "
                                       "frequencies: the ECE and Brier columns above."), ""]
    keys = [k for k in ("temperature", "nll_before", "nll_after", "ece_before", "ece_after") if k in cal]
    per_label = any(isinstance(cal[k], list) for k in keys)  # the three-label task: one T per label
    outputs = [_inline(o) for o in summary.get("outputs") or []] if per_label else ["value"]

    def cells(value):
        values = value if isinstance(value, list) else [value] * len(outputs)
        return [_num(v, 4) if isinstance(v, float) else v for v in values]

    how = f"Method: {_inline(cal.get('method', 'temperature'))}, fitted on the {_inline(cal.get('fitted_on', 'validation'))} split"
    rows = [[key.replace("_", " "), *cells(cal[key])] for key in keys]
    return ["## Calibration", "", how + (" (one temperature per label)." if per_label else "."), "",
            *_table(["", *outputs], rows), ""]


def render(config: dict, summary: dict, name: str) -> str:
    """The card of one run, from its config.yaml and metrics.json (as loaded dicts)."""
    outputs = [_inline(o) for o in summary.get("outputs") or []]
    task = ("binary (" + " / ".join(outputs) + ")" if summary["task"] == "binary"
            else "three-label (" + ", ".join(outputs) + ")")
    return "\n".join([
        f"# Model card: {_inline(name)}", "", f"**{NOT_CLINICAL}**", "",
        (f"Task: {task}. The model file is `checkpoints/last.keras`; the figures are of it "
         "(metrics.json). Written by tfcovid from config.yaml and metrics.json; `tfcovid report "
         "RUN` writes it again."), "",
        *_data(config, summary), *_recipe(config, summary), *_operating_point(summary),
        *_figures(summary), *_calibration(summary),
        "## Intended use", "", INTENDED_USE, "", f"**{NOT_CLINICAL}**", ""])


def write(run: Path) -> Path:
    """Write ``run``/MODEL_CARD.md from its config.yaml and metrics.json.

    Raises:
        tables.ReportError: the run has no readable metrics.json or config.yaml.
    """
    run = Path(run)
    config, summary = tables.load_run(run)
    atomic_write_text(run / FILENAME, render(config, summary, run.name))
    return run / FILENAME


def refresh(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Write the card of every finished run under ``paths`` again (``tfcovid report``):
    (cards written, [(run, why not)])."""
    found, _ = tables.find_runs(paths)
    written, failed = [], []
    for run in found:
        try:
            written.append(write(run))
        except tables.ReportError:
            continue  # the report already says why it skipped this run
        except OSError as err:
            failed.append((str(run), f"cannot write {FILENAME}: {err.strerror or err}"))
    return written, failed


def for_export(run: Path | None, model: Path) -> str | None:
    """The card an export of ``model`` carries: its run's, rendered from metrics.json (so also for
    a run from before cards), with a note when ``model`` is not the checkpoints/last.keras its
    figures describe; None without a finished run."""
    if run is None:
        return None
    try:
        config, summary = tables.load_run(Path(run))
    except tables.ReportError:
        return None
    card = render(config, summary, Path(run).name)
    if Path(model).resolve() != (Path(run) / "checkpoints" / "last.keras").resolve():
        shown = Path(model).relative_to(run) if Path(model).is_relative_to(run) else Path(model).name
        card += f"\nNote: this export is of `{shown}`; the figures above are of `checkpoints/last.keras`.\n"
    return card
