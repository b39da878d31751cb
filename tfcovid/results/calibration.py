"""Temperature scaling (issue 23.5): one number T that divides a model's logits before the
softmax/sigmoid, fitted on the validation split by minimising its negative log-likelihood.

T > 1 softens over-confident probabilities, T < 1 sharpens them; the ranking of images, and so
the ROC curve and its AUC, do not move. The binary task has one T (its two softmax logits share
it: only their difference matters); the three-label task one T per label, because each label
is its own sigmoid classifier with its own operating point, and a shared T would let the
labels' different miscalibration pull each other's fit (the NLL splits into one term per label,
so one T per label is the exact minimum of each). The record goes into the model's embedded
tfcovid.json and into metrics.json as ``calibration`` (docs/operating-points.md).
"""
from __future__ import annotations

import math

import numpy as np
import scipy.optimize
import scipy.special

from tfcovid.models.outputs import probabilities, temperatures
from tfcovid.results.operating_point import columns
from tfcovid.results.uncertainty import ECE_BINS
from tfcovid.results.uncertainty import expected_calibration_error as ece

# log T is searched in [log 0.01, log 100]: wider than any trained network needs (Guo et al.
# 2017 report 1-3); a fit at a bound says the validation split cannot pin T down.
LOG_T_BOUNDS = (math.log(0.01), math.log(100.0))


class CalibrationError(ValueError):
    """Temperature scaling cannot be fitted; the message says which split and what to do."""


def nll(logits, y_true, task: str, temperature: float = 1.0) -> np.ndarray:
    """Mean negative log-likelihood of ``logits / temperature``: the binary task's softmax
    cross-entropy (one value), the three-label task's binary cross-entropy per label (L,)."""
    z = np.asarray(logits, dtype=np.float64) / temperature
    y = np.asarray(y_true)
    if task == "binary":
        y = y.reshape(-1).astype(int)
        return np.atleast_1d(np.mean(scipy.special.logsumexp(z, axis=1) - z[np.arange(len(z)), y]))
    return np.mean(np.logaddexp(0.0, z) - y * z, axis=0)  # -log sigmoid(z) or -log(1 - sigmoid(z))


def _fit_one(logits, y_true, task: str) -> float:
    """The T in the bounds with the lowest NLL (unimodal in log T: the NLL is convex in 1/T).
    Brent's method stops short of a bound where the NLL flattens towards it; the bound itself
    is taken then, so that :func:`describe` can say T was not pinned down."""
    def loss(u):
        return float(nll(logits, y_true, task, math.exp(u))[0])

    best = scipy.optimize.minimize_scalar(loss, bounds=LOG_T_BOUNDS, method="bounded", options={"xatol": 1e-7})
    near = min(LOG_T_BOUNDS, key=lambda bound: abs(bound - best.x))
    return float(math.exp(near if loss(near) <= loss(best.x) else best.x))


def at_bound(temperature: float) -> bool:
    """Whether a fitted T is a search bound (0.01 or 100): the validation NLL kept falling
    towards it (every image on the right side, or a model no better than chance there)."""
    return any(math.isclose(math.log(temperature), bound, abs_tol=1e-9) for bound in LOG_T_BOUNDS)


def fit_temperature(logits, y_true, task: str, split: str = "validation") -> list[float]:
    """One T (binary) or one per label (three-label) minimising ``split``'s NLL.

    Raises:
        CalibrationError: no images, or logits that are not finite (a diverged model).
    """
    logits, y = np.asarray(logits, dtype=np.float64), np.asarray(y_true)
    if len(logits) == 0:
        raise CalibrationError(f"Cannot fit the temperature on the {split} split: it has no images.")
    if not np.isfinite(logits).all():
        raise CalibrationError(f"Cannot fit the temperature on the {split} split: the model gives "
                               "non-finite outputs (a diverged model). Train it again.")
    if task == "binary":
        return [_fit_one(logits, y, task)]
    return [_fit_one(logits[:, [i]], y[:, [i]], task) for i in range(logits.shape[1])]


def _one_or_list(values) -> float | list[float]:
    values = [float(v) for v in values]
    return values[0] if len(values) == 1 else values


def record(logits, y_true, task: str, outputs, positive: str | None,
           split: str = "validation") -> dict:
    """Fit T on one split's logits and describe it: the ``calibration`` record of metrics.json
    and the model (a number for the binary task, one per label for the three-label one)."""
    temps = fit_temperature(logits, y_true, task, split)
    logits = np.asarray(logits, dtype=np.float64)
    before, after = probabilities(logits, task), probabilities(logits, task, temps)

    def eces(probs):
        return [ece(is_pos, score) for _, is_pos, score in columns(y_true, probs, task, outputs, positive)]

    nll_after = (nll(logits, y_true, task, temps[0]) if task == "binary"
                 else [nll(logits[:, [i]], np.asarray(y_true)[:, [i]], task, t)[0] for i, t in enumerate(temps)])
    return {"method": "temperature", "temperature": _one_or_list(temps), "fitted_on": split,
            "images": len(logits), "nll_before": _one_or_list(nll(logits, y_true, task)),
            "nll_after": _one_or_list(np.ravel(nll_after)), "ece_before": _one_or_list(eces(before)),
            "ece_after": _one_or_list(eces(after)), "ece_bins": ECE_BINS}


def fit_probabilities(task: str, method: str, validation_labels, logits: dict, outputs,
                      positive: str | None) -> tuple[dict, dict | None]:
    """Fit's calibration step: ``train.calibrate`` on the validation logits, then every split's
    probabilities with it. Returns ({split: probabilities}, the record or None for "none")."""
    found = record(logits["validation"], validation_labels, task, outputs, positive) \
        if method == "temperature" else None
    temps = temperatures(found)
    return {name: probabilities(z, task, temps) for name, z in logits.items()}, found


def describe(calibration: dict | None) -> str:
    """One line: the temperature(s) and validation NLL/ECE before -> after, or nothing."""
    if not calibration or calibration.get("method") != "temperature":
        return ""

    def show(v, fmt):
        return ", ".join(format(x, fmt) for x in (v if isinstance(v, list) else [v]))

    c = calibration  # a record written by hand may hold the temperature alone
    line = f"Calibration: temperature {show(c['temperature'], '.4g')}"
    if c.get("fitted_on") and all(k in c for k in ("nll_before", "nll_after", "ece_before", "ece_after")):
        line += (f", fitted on {c['fitted_on']}; NLL {show(c['nll_before'], '.4f')} -> "
                 f"{show(c['nll_after'], '.4f')}, ECE {show(c['ece_before'], '.4f')} -> {show(c['ece_after'], '.4f')}")
    temps = c["temperature"] if isinstance(c["temperature"], list) else [c["temperature"]]
    if any(isinstance(t, (int, float)) and t > 0 and at_bound(t) for t in temps):
        line += ("; T at the search bound (0.01 or 100): the validation split cannot pin it down "
                 "(its NLL keeps falling towards the bound), so check the model and that split")
    return line
