"""The study's results tables, from run directories (config.yaml + metrics.json)."""

from __future__ import annotations

import re

from tfcovid import metrics

_BACKBONE_NAMES = {"vgg16": "VGG16", "resnet18": "ResNet18", "resnet50": "ResNet50"}
_LOSS_NAMES = {"ce": "cross-entropy", "bce": "BCE with logits", "focal": "focal"}


def freeze_label(policy: str) -> str:
    """The study's wording: all -> 'all conv (head only)', first7 -> 'first 7 conv'."""
    match = re.fullmatch(r"first(\d+)", policy)
    if match:
        return f"first {match.group(1)} conv"
    return {"all": "all conv (head only)", "none": "none"}.get(policy, policy)


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


def table_row(config: dict, summary: dict) -> list[str]:
    """One row of the study's table for a finished run.

    Part 1 (binary): backbone, frozen, epochs, time, then acc/F1 per split with the F1 of the
    disease class. Part 2 (multilabel): backbone, loss, epochs, time, acc/F1 (percent).
    """
    task = summary["task"]
    row = metrics.study_row(summary["splits"], task)
    backbone = _BACKBONE_NAMES.get(config["model"]["backbone"], config["model"]["backbone"])
    time_cell = format_duration(summary["train_seconds"])
    if task == "binary":
        cells = [backbone, freeze_label(config["model"]["freeze"]), str(summary["epochs"]), time_cell]
        for split in ("train", "validation", "test"):
            s = summary["splits"].get(split)
            cells.append(_cell(s and f"{s['accuracy'] * 100:.0f}/{s['f1']:.3f}"))
        return cells
    cells = [backbone, _LOSS_NAMES.get(config["train"]["loss"], config["train"]["loss"]),
             str(summary["epochs"]), time_cell]
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
        study = metrics.study_row(summary["splits"], "binary")
        positive = next(iter(summary["splits"].values()))
        text += (f"\nF1 above is of the disease class '{positive['positive_class']}'. The study's "
                 f"F1 (positive class '{positive['f1_study_positive_class']}'): "
                 + ", ".join(f"{k} {v[1]:.3f}" for k, v in study.items()))
    return text
