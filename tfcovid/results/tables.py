"""The study's results tables, from run directories (config.yaml + metrics.json)."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import yaml

from tfcovid.results import calibration, operating_point, scores

_BACKBONE_NAMES = {"vgg16": "VGG16", "resnet18": "ResNet18", "resnet50": "ResNet50"}


_LOSS_NAMES = {"ce": "cross-entropy", "bce": "BCE with logits", "focal": "focal"}


def freeze_label(policy: str, backbone: str = "vgg16") -> str:
    """The study's wording: all -> 'all conv (head only)' ('all but head' for ResNets),
    first7 -> 'first 7 conv'."""
    match = re.fullmatch(r"first(\d+)", policy)
    if match:
        return f"first {match.group(1)} conv"
    if policy == "all":
        return "all but head" if backbone.startswith("resnet") else "all conv (head only)"
    return policy


def format_duration(seconds: float) -> str:
    """'42 s', '3 min', '1 h 25' as in the study's tables."""
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60:02d}"


def _cell(values) -> str:
    return "–" if values is None else values


def epochs_cell(summary: dict, configured="?") -> str:
    """The run's epochs: "10", or "4 of 10" when early stopping ended it after epoch 4."""
    epochs = summary.get("epochs", configured)
    early = summary.get("early_stopping") or {}
    return f"{early['stopped_epoch']} of {epochs}" if early.get("stopped_early") else str(epochs)


def table_row(config: dict, summary: dict) -> list[str]:
    """One row of the study's table for a finished run.

    Part 1 (binary): backbone, frozen, epochs, time, then acc/F1 per split with the F1 of the
    disease class. Part 2 (multilabel): backbone, loss, epochs, time, acc/F1 (percent).
    """
    task = summary["task"]
    row = scores.study_row(summary["splits"], task)
    backbone = _BACKBONE_NAMES.get(config["model"]["backbone"], config["model"]["backbone"])
    time_cell = format_duration(summary["train_seconds"])
    if task == "binary":
        frozen = freeze_label(config["model"]["freeze"], config["model"]["backbone"])
        cells = [backbone, frozen, epochs_cell(summary), time_cell]
        for split in ("train", "validation", "test"):
            s = summary["splits"].get(split)
            cells.append(_cell(s and f"{s['accuracy'] * 100:.0f}/{s['f1']:.3f}"))
        return cells
    cells = [backbone, _LOSS_NAMES.get(config["train"]["loss"], config["train"]["loss"]),
             epochs_cell(summary), time_cell]
    for split in ("train", "validation"):
        cells.append(_cell(split in row and "{:.0f}/{:.0f}".format(*row[split])))
    return cells


PART1_HEADER = ["Backbone", "Frozen", "Epochs", "Time", "Train acc/F1", "Val acc/F1", "Test acc/F1"]


PART2_HEADER = ["Backbone", "Loss", "Epochs", "Time", "Train acc/F1", "Val acc/F1"]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def format_run(config: dict, summary: dict) -> str:
    """The run's row in the study's table format, with the study's normal-class F1 for Part 1."""
    header = PART1_HEADER if summary["task"] == "binary" else PART2_HEADER
    text = markdown_table(header, [table_row(config, summary)])
    if summary["task"] == "binary":
        study = scores.study_row(summary["splits"], "binary")
        positive = next(iter(summary["splits"].values()))
        text += (f"\nF1 above is of the disease class '{positive['positive_class']}'. The study's "
                 f"F1 (positive class '{positive['f1_study_positive_class']}'): "
                 + ", ".join(f"{k} {v[1]:.3f}" for k, v in study.items()))
    return text


class ReportError(ValueError):
    """No usable run was given; the message says what was found instead."""


BACKBONE_ORDER = ("vgg16", "resnet18", "resnet50")


LOSS_ORDER = ("ce", "bce", "focal")


def find_runs(paths: Sequence[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Run directories among ``paths``; a folder of runs (e.g. ``runs/``) gives its runs.

    Returns:
        (run directories in the order found, [(path, reason)] for paths that are not runs).
    """
    runs, skipped = [], []
    for arg in paths:
        path = Path(arg).expanduser()
        if (path / "config.yaml").is_file():
            runs.append(path)
        elif path.is_dir():
            inner = sorted(p for p in path.iterdir() if (p / "config.yaml").is_file())
            if inner:
                runs += inner
            else:
                skipped.append((str(arg), "not a run directory (no config.yaml) and holds none"))
        else:
            skipped.append((str(arg), "no such folder"))
    return list(dict.fromkeys(runs)), skipped


def load_run(run: Path) -> tuple[dict, dict]:
    """(config, metrics summary) of a finished run.

    Raises:
        ReportError: config.yaml or metrics.json is missing or unreadable.
    """
    if not (run / "metrics.json").is_file():
        raise ReportError("no metrics.json: the run has not finished (or failed)")
    try:
        config = yaml.safe_load((run / "config.yaml").read_text())
        summary = json.loads((run / "metrics.json").read_text())
        _ = config["model"]["backbone"], config["train"]["loss"], summary["task"], summary["splits"]
    except (OSError, yaml.YAMLError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise ReportError(f"unreadable config.yaml or metrics.json ({type(err).__name__}: {err})") from None
    return config, summary


def _order(items: Sequence[str], value: str) -> int:
    return items.index(value) if value in items else len(items)


def _freeze_order(policy: str) -> tuple[int, int]:
    # The study's row order: head only, first 7, first 4, none (most frozen first).
    match = re.fullmatch(r"first(\d+)", policy)
    if match:
        return (1, -int(match.group(1)))
    return ({"all": 0, "none": 2}.get(policy, 3), 0)


def _sort_key(item):
    run, config, summary = item
    model, train = config["model"], config["train"]
    return (_order(BACKBONE_ORDER, model["backbone"]), _freeze_order(model["freeze"]),
            _order(LOSS_ORDER, train["loss"]), run.name)


def _study_f1_cells(summary: dict) -> list[str]:
    splits = summary["splits"]
    return [f"{splits[s]['f1_study']:.3f}" if s in splits and "f1_study" in splits[s] else "–"
            for s in ("train", "validation", "test")]


def tables(runs: Sequence[tuple[Path, dict, dict]]) -> str:
    """The study's Part 1 and Part 2 tables (Markdown) for loaded runs, in the study's order."""
    runs = sorted(runs, key=_sort_key)
    part1 = [r for r in runs if r[2]["task"] == "binary"]
    part2 = [r for r in runs if r[2]["task"] == "multilabel"]
    out = []
    if part1:
        positive = next(iter(part1[0][2]["splits"].values()), {})
        out += ["## Part 1: binary (infected / normal)", "",
                markdown_table(PART1_HEADER + ["Run"],
                               [table_row(c, s) + [f"`{r.name}`"] for r, c, s in part1]), "",
                f"Acc is accuracy in %; F1 is the F1 of the disease class "
                f"'{positive.get('positive_class', 'infected')}'. The study's own F1 was of the "
                f"class '{positive.get('f1_study_positive_class', 'normal')}' (ImageFolder index 1); "
                "for a like-for-like comparison with its table:", "",
                markdown_table(["Backbone", "Frozen", "Train F1 (study's)", "Val F1 (study's)",
                                "Test F1 (study's)", "Run"],
                               [table_row(c, s)[:2] + _study_f1_cells(s) + [f"`{r.name}`"]
                                for r, c, s in part1]), ""]
    if part2:
        out += [f"## Part 2: {_labels_heading([s.get('outputs') for _, _, s in part2])}", "",
                markdown_table(PART2_HEADER + ["Run"],
                               [table_row(c, s) + [f"`{r.name}`"] for r, c, s in part2]), "",
                "Acc is the sample-averaged Jaccard index in % (the study's \"accuracy\"), F1 the "
                "sample-averaged F1 in %, both at each run's threshold. " + _test_note(part2), ""]
    out += _operating_points(runs)
    if out:
        out += ["Time is the training time (sum of epoch durations, validation included) on the "
                "machine each run used; the study's times are on a Colab T4.", ""]
    return "\n".join(out)


def _operating_points(runs) -> list[str]:
    """The runs that decide at an operating point other than the study's 0.5, with how it was
    chosen and the validation figures at it (their tables' numbers are at that point)."""
    lines = []
    for run, _, summary in runs:
        point, calibrated = summary.get("operating_point") or {}, calibration.describe(summary.get("calibration"))
        if calibrated or point.get("chosen_on") or any(t != 0.5 for t in point.get("thresholds", [0.5])):
            lines.append(f"- `{run.name}`: " + operating_point.describe(point).removeprefix("Operating point: ").replace("\n  ", "; ")
                         + (f"; {calibrated}" if calibrated else ""))
    intro = ("Runs that decide at other thresholds than 0.5, or on calibrated probabilities (temperature "
             "scaling); their numbers above are at these:")
    return ["## Operating points", "", intro, "", *lines, ""] if lines else []


def _test_note(part2) -> str:
    """What the Part 2 table says about the test split: unlabeled as in the study, or where the
    numbers of the runs whose metrics.json holds a labeled test split are."""
    labeled = [r.name for r, _, s in part2 if "test" in s["splits"]]
    if not labeled:
        return ("The test split is unlabeled, as in the study: use "
                "`tfcovid predict RUN_DIR DATA/Test --csv FILE`.")
    which = "" if len(labeled) == len(part2) else " for " + ", ".join(f"`{n}`" for n in labeled)
    rest = "" if not which else (" The other runs' test split is unlabeled: use "
                                 "`tfcovid predict RUN_DIR DATA/Test --csv FILE`.")
    return (f"The test split is labeled{which} (the study's was not, so its table has no test "
            "column): the test numbers are in the run's metrics.json, and `tfcovid evaluate "
            f"RUN_DIR` prints them.{rest}")


def _labels_heading(outputs: list) -> str:
    """``three labels (covid-19, normal, pneumonia)`` when every run has the same labels."""
    kinds = {tuple(o) for o in outputs if o}
    if len(kinds) != 1:
        return "multi-label runs (their labels differ)" if kinds else "three labels (covid-19, normal, pneumonia)"
    labels = next(iter(kinds))
    count = {2: "two", 3: "three", 4: "four", 5: "five"}.get(len(labels), str(len(labels)))
    return f"{count} labels ({', '.join(labels)})"


def build_report(paths: Sequence[str | Path]) -> tuple[str, list[tuple[str, str]]]:
    """Markdown tables for the runs under ``paths``, and [(path, reason)] for what was skipped.

    Raises:
        ReportError: none of ``paths`` holds a finished run.
    """
    found, skipped = find_runs(paths)
    runs = []
    for run in found:
        try:
            runs.append((run, *load_run(run)))
        except ReportError as err:
            skipped.append((str(run), str(err)))
    if not runs:
        why = "; ".join(f"{p}: {r}" for p, r in skipped) or "no paths given"
        raise ReportError(f"No finished runs to report ({why}). Pass run directories written by "
                          "`tfcovid fit`, or the folder that holds them.")
    return tables(runs), skipped
