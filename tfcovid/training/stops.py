"""How ``fit`` stops early: its errors, and messages saying what a stopped run kept and the
command that goes on (a signal, a full disk, a stop before training)."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from tfcovid.training import run_state
from tfcovid.utils import atomic, signals
from tfcovid.utils.text import plural


class TrainingError(RuntimeError):
    """Training could not go on (e.g. the loss became NaN); the message says what to try."""


class Interrupted(TrainingError):
    """SIGTERM or Ctrl-C stopped training; the message holds the command that resumes it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _saved(done: int, epochs: int) -> str:
    return f"Epoch 1 of {epochs} is" if done == 1 else f"Epochs 1-{done} of {epochs} are"


def remove_half_made(run: Path, log: Callable[[str], None], say: bool) -> None:
    """Remove a run that stopped before training (``say``: log that). The files --skip-bad left
    out, listed in its skipped.txt that goes with it, are logged, escaped as in that file."""
    try:
        skipped = [line.split("\t", 1) for line in (run / "skipped.txt").read_text().splitlines()
                   if line and not line.startswith("#")]
    except OSError:
        skipped = []
    shutil.rmtree(run, ignore_errors=True)
    if say:
        log(f"      removed {run}: stopped before training")
    if skipped:
        log(f"      the {plural(len(skipped), 'unusable file')} that --skip-bad left out "
            "(its skipped.txt went with the run):")
        for fields in skipped:
            log("        " + ": ".join(fields))


def disk_full(run: Path, err: Exception, epochs: int, removed: bool) -> TrainingError:
    """What a full disk (or quota) left in ``run``, read from its last commit, and how to go on."""
    name = getattr(err, "filename", None)
    if name:  # the file being replaced, not its temporary name
        name = Path(name).with_name(Path(name).name.removeprefix(atomic.PARTIAL_PREFIX))
    head = f"No space left on the device holding {run}" + (f" (writing {name})" if name else "")
    if removed:
        return TrainingError(f"{head}, before training started; nothing to keep: removed {run}. "
                             "Free space there (or choose another --out) and start again.")
    try:
        done = int((run_state.load_state(run) or {}).get("epochs_done", 0))
    except (ValueError, OSError):
        done = 0
    resume = f"\n  tfcovid fit --resume {run}"
    if (run / "metrics.json").is_file():  # the plots and the table come after it
        return TrainingError(f"{head}. Training and evaluation are saved in {run} (metrics.json); "
                             "plots written after it may be missing. Free space there.")
    if done >= epochs:
        return TrainingError(
            f"{head}. Training has finished ({plural(epochs, 'epoch')}, saved in {run}: "
            "checkpoints/, backup/), but metrics.json is not written. Free space there, then "
            f"finish the evaluation with:{resume}")
    if done:
        return TrainingError(
            f"{head}. {_saved(done, epochs)} saved in {run} (checkpoints/, backup/); the epoch "
            f"being written is discarded. Free space there, then resume with:{resume}")
    return TrainingError(f"{head}; no epoch was completed. Free space there, then start again "
                         f"with:{resume}")


def disk_full_at_start(where, resume) -> TrainingError:
    """A full disk before the run directory was complete (the demo set, a download, config.yaml):
    nothing was kept; ``resume`` is the run directory being resumed, or None."""
    return TrainingError(
        f"No space left on the device holding {where}, before training started; nothing was "
        "written. Free space there" + (f", then resume with:\n  tfcovid fit --resume {resume}" if resume
                                       else " (or choose another --out) and start again."))


def stopped_in_training(run: Path, err: signals.Interrupted, done: int, epochs: int) -> Interrupted:
    """What a signal during training kept (``done`` epochs) and the command that resumes it."""
    if not done:
        return Interrupted(f"Training {err} during epoch 1 of {epochs}; no epoch was completed. "
                           f"Start again with:\n  tfcovid fit --resume {run}", err.exit_code)
    return Interrupted(
        f"Training {err} during epoch {done + 1} of {epochs}. "
        + ("Epoch 1 is" if done == 1 else f"Epochs 1-{done} are")
        + f" saved in {run} (checkpoints/, backup/); the partial epoch is discarded. Resume with:\n"
        f"  tfcovid fit --resume {run}", err.exit_code)


def evaluation_interrupted(run: Path, err: signals.Interrupted, epochs: int) -> Interrupted:
    """A signal while [6/6] evaluates: training is saved, metrics.json is not written."""
    return Interrupted(
        f"Evaluation {err}. Training has finished ({plural(epochs, 'epoch')}, saved in {run}: "
        "checkpoints/, backup/), but metrics.json is not written. Finish the evaluation with:\n"
        f"  tfcovid fit --resume {run}", err.exit_code)


def results_interrupted(run: Path, err: signals.Interrupted, epochs: int) -> Interrupted:
    """A signal while [6/6] writes the results: as :func:`evaluation_interrupted` until
    metrics.json is written; after it the run is complete but for its card and plots."""
    if not (run / "metrics.json").exists():
        return evaluation_interrupted(run, err, epochs)
    return Interrupted(
        f"Writing the results {err}. The run is complete ({plural(epochs, 'epoch')}; metrics.json "
        f"written in {run}) but MODEL_CARD.md or plots/ may be missing: `tfcovid report {run}` writes "
        f"the card again, `tfcovid evaluate {run}` a split's plots.", err.exit_code)
