"""What every phase of one fit shares: the run (:class:`Run`), phase 4's compiled model
(:class:`BuiltModel`), and the new run directory."""
from __future__ import annotations

import dataclasses
from datetime import datetime
from pathlib import Path
from typing import Callable

import keras
import tensorflow as tf

from tfcovid.config import Experiment
from tfcovid.data import types
from tfcovid.models import FreezeSummary
from tfcovid.utils import run_lock


def new_run_dir(exp: Experiment) -> Path:
    """Create ``<out>/<time>-<backbone>-<freeze>-<loss>[-N]``; never reuse an existing folder."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = f"{stamp}-{exp.model.backbone}-{exp.model.freeze}-{exp.train.loss}"
    if exp.name:
        base += f"-{exp.name}"
    out = Path(exp.out)
    out.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        run = out / (base if n == 1 else f"{base}-{n}")
        try:
            run.mkdir()
            return run
        except FileExistsError:
            continue
    raise RuntimeError(f"Could not create a new run directory under {out}.")


@dataclasses.dataclass(frozen=True)
class Run:
    """What every phase of one fit needs: the experiment, where its files go and how it runs."""
    exp: Experiment
    dir: Path  # the run directory; a non-chief worker's scratch copy of it
    resume: str | Path | None  # the run directory given to resume, as given; None for a new run
    scratch: Path | None  # set on the non-chief workers of a multi-worker run
    strategy: tf.distribute.Strategy
    strategy_desc: str
    t0: float  # time.perf_counter() when fit started: metrics.json's total_seconds
    log: Callable[[str], None]
    manifest: types.Manifest  # the data as scanned in phase 1; phase 3 checks every file
    lock: run_lock.RunLock | None  # held on the run directory while this process trains in it
    precision: str = ""  # phase 2 sets these three
    replicas: int = 1
    workers: int = 1


@dataclasses.dataclass(frozen=True)
class BuiltModel:
    """Phase 4's compiled model."""
    model: keras.Model
    preprocessing: str  # the preprocessing mode inside the model
    frozen: FreezeSummary
