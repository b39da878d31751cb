"""Training: ``fit(experiment)`` reads top to bottom in phases, each announced in one log line:
[1/6] run directory and cheap checks, [2/6] where it runs, [3/6] data (``inputs``), [4/6] the
model, [5/6] training (``loop``), [6/6] evaluation and results (``finish``)."""
from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

import keras
import numpy as np

from tfcovid.config import Experiment
from tfcovid.data import sampling, types
from tfcovid.models import apply_freeze, get_backbone, is_head_layer
from tfcovid.results import operating_point
from tfcovid.results.model_card import NOT_CLINICAL  # the model card states it too
from tfcovid.training import (
    devices,
    distribute,
    finish,
    inputs,
    loop,
    preflight,
    recipes,
    schedules,
    stops,
)
from tfcovid.training.compile import compile_model
from tfcovid.training.context import BuiltModel, Run, new_run_dir
from tfcovid.training.stops import Interrupted, TrainingError
from tfcovid.utils import atomic, run_lock, signals
from tfcovid.weights import loading

__all__ = ["NOT_CLINICAL", "Interrupted", "TrainingError", "fit", "new_run_dir"]


def fit(exp: Experiment, run_dir: str | Path | None = None, log=print) -> Path | None:
    """Train one experiment and write its run directory; return the run directory.

    Under ``--strategy multiworker`` every worker runs this; only the chief (worker 0) writes
    and returns the run directory, the others return None.

    Args:
        exp: the resolved experiment.
        run_dir: an existing run directory to resume (its backup/ is used); None for a new run.
        log: where progress lines go.

    Raises:
        TrainingError: the loss became NaN/inf, the disk filled up, or another process is
            training in ``run_dir``.
    """
    t0 = time.perf_counter()
    log(NOT_CLINICAL)
    if exp.data.dir == "demo":
        log("Data: the built-in synthetic demo set (chest-X-ray-like pictures, not patient data).")
    run = _run_directory(exp, run_dir, t0, log)  # [1/6]; holds the run directory's lock
    try:
        keras.utils.set_random_seed(run.exp.train.seed)
        # A signal before training (the file check, building the model) stops at once; phase 5
        # stops at a batch boundary instead, and a second signal there stops at once.
        with devices.op_determinism(run.exp.train.deterministic), distribute.forget_traced_gradients(), \
                signals.RaiseOnSignal():
            run = _where_it_runs(run)  # [2/6]
            exp, data = inputs.input_pipeline(run.exp, run.dir, run.workers, run.log, run.manifest, run.replicas)  # [3/6]
            run = dataclasses.replace(run, exp=exp)
            built = _build_model(run, data)  # [4/6]
            train_seconds = loop.train(run, data, built)  # [5/6]
            results = finish.evaluate(run, data, built.model)  # [6/6]
            results.update(recipes.results(run.exp, run.dir))  # early stopping: when and why
            return finish.write_results(run, data, built, train_seconds, results)
    except Exception as err:
        _clean_up_after(run, err)
        raise
    finally:  # a disk cache of decoded images is only worth keeping while the run trains
        shutil.rmtree(run.dir / "cache", ignore_errors=True)
        if run.lock:
            run.lock.release()


def _run_directory(exp: Experiment, run_dir, t0: float, log) -> Run:
    """Phase 1: the strategy, the run directory (locked) and the resolved config, after every
    cheap check and before anything can fail halfway."""
    if run_dir and (Path(run_dir) / "metrics.json").exists():
        raise TrainingError(f"{run_dir} has finished (it has metrics.json); nothing to resume. "
                            "Start a new run instead.")
    # The data folder as an absolute path, so that --resume, evaluate and explain find it from
    # any working directory.
    if exp.data.dir != "demo" and "://" not in exp.data.dir:
        exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, dir=os.path.abspath(exp.data.dir)))
    # The strategy comes first: MultiWorkerMirroredStrategy must start before TensorFlow runs
    # anything, and only the chief of a multi-worker run writes the run directory; the other
    # workers write the same files to a scratch folder that is removed at the end.
    strategy, strategy_desc = distribute.make_strategy(exp.train.strategy)
    scratch = distribute.scratch_dir(strategy, run_dir)
    devices.check_determinism(exp.train.deterministic)
    if not scratch:
        preflight.check_output_dir(run_dir or exp.out)
    # Resolving the weights (preprocessing mode, absolute file path) here records them in
    # config.yaml, and a missing weights file fails before a run directory exists.
    exp = loading.resolve_experiment_weights(exp, fetch=False)
    lock = _lock(run_dir) if run_dir and not scratch else None  # a run being resumed
    made = None
    try:
        with signals.RaiseOnSignal():  # Ctrl-C in a long scan or download: a message, not a traceback
            # The cheap checks of the data (the folder, its splits, a batch that the train split
            # can fill) before ImageNet weights are fetched (a download); every file is checked
            # in [3/6].
            manifest = inputs.load_manifest(exp, log, run_dir)
            preflight.check_batch_size(inputs.split_sizes(manifest), exp.train.batch_size)
            _check_operating_point(exp, manifest)
            _check_imbalance(exp, manifest)
            if exp.model.weights == "imagenet":  # ... and before a run directory exists
                loading.fetch_imagenet(exp.model.backbone)
            made = None if scratch or run_dir else new_run_dir(exp)  # removed if phase 1 fails
            run = scratch or made or Path(run_dir)
            lock = lock or (None if scratch else _lock(run))
            inputs.write_config(run, exp)
    except BaseException as err:
        if lock:
            lock.release()
        if made:
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(err, signals.Interrupted):
            raise Interrupted(f"Stopped by {err.name} before training started; nothing was written"
                              + (f". Resume with:\n  tfcovid fit --resume {run_dir}" if run_dir else "."),
                              err.exit_code) from None
        if atomic.disk_full(err):
            raise stops.disk_full_at_start(getattr(err, "filename", None) or run_dir or exp.out,
                                           run_dir) from None
        raise
    log(f"[1/6] Run directory: {run}" + (" (scratch; the chief writes the run)" if scratch else ""))
    return Run(exp, run, run_dir, scratch, strategy, strategy_desc, t0, log, manifest, lock)


def _check_operating_point(exp: Experiment, manifest: types.Manifest) -> None:
    """Before training: the validation split can choose train.operating_point (both classes of
    every label), so that [6/6] does not fail after hours of training."""
    validation = manifest.splits["validation"]
    try:
        finish.choose_operating_point(exp, manifest, np.zeros((len(validation.labels), len(manifest.output_names))))
    except operating_point.OperatingPointError as err:
        raise TrainingError(f"{err} (train.operating_point)") from None


def _check_imbalance(exp: Experiment, manifest: types.Manifest) -> None:
    """Before the weights and the run directory: train.class_weight's names and counts, and
    data.sampling against the data's form (docs/imbalance.md)."""
    inputs.resolve_class_weights(exp, manifest)
    sampling.refuse_records(manifest.splits["train"], exp.data.sampling)


def _lock(run) -> run_lock.RunLock:
    """The run directory's lock: one process trains in a run at a time (see utils.run_lock)."""
    try:
        return run_lock.RunLock(run).acquire()
    except run_lock.RunLocked as err:
        raise TrainingError(str(err)) from None
    except OSError as err:
        raise TrainingError(f"Cannot lock {run} for training ({err.strerror or err}): is it a "
                            "writable folder?") from None


def _clean_up_after(run: Run, err: Exception) -> None:
    """Leave no half-made run behind when fit stopped before training started (data, free disk,
    the weights file; phase 5 makes backup/); a stop in training keeps its run. A signal (not one
    of training's own stops) becomes :class:`Interrupted`, and a full disk a :class:`TrainingError`,
    each saying what was kept and how to go on."""
    before = not run.resume and not run.scratch and not (run.dir / "backup").exists()
    if before and not isinstance(err, Interrupted):  # the messages below say it was removed
        stops.remove_half_made(run.dir, run.log, say=not isinstance(err, signals.Interrupted)
                               and not atomic.disk_full(err))
    if isinstance(err, signals.Interrupted):
        raise Interrupted(
            f"Stopped by {err.name} before training started"
            + (f"; nothing to keep: removed {run.dir}." if before else
               f". Resume with:\n  tfcovid fit --resume {run.resume or run.dir}"), err.exit_code) from None
    if atomic.disk_full(err):
        raise stops.disk_full(run.dir, err, run.exp.train.epochs, removed=before) from None


def _where_it_runs(run: Run) -> Run:
    """Phase 2: precision, replicas and workers; the global batch must cover every replica."""
    exp = run.exp
    precision = devices.resolve_precision(exp.train.precision)
    replicas, workers = run.strategy.num_replicas_in_sync, distribute.worker_info(run.strategy)[1]
    if exp.train.batch_size < replicas:
        raise TrainingError(f"--batch-size {exp.train.batch_size} is the global batch; it must be at "
                            f"least the number of replicas ({replicas}).")
    run.log(f"[2/6] Device: {devices.describe_device()}; precision {precision}; strategy {run.strategy_desc}"
            + ("; deterministic ops" if exp.train.deterministic else ""))
    return dataclasses.replace(run, precision=precision, replicas=replicas, workers=workers)


def _build_model(run: Run, data: inputs.Inputs) -> BuiltModel:
    """Phase 4: model, weights, freeze policy, compile — inside the strategy scope."""
    exp, m, log = run.exp, run.exp.model, run.log
    with devices.dtype_policy(run.precision), run.strategy.scope():
        model, mode, origin = loading.initial_model(
            m.backbone, len(data.manifest.output_names), exp.data.image_size, m.weights,
            m.preprocessing, m.head_units, name=f"tfcovid_{m.backbone}_{exp.data.task}")
        frozen = apply_freeze(model, m.freeze, is_head_layer, get_backbone(m.backbone).stages)
        compile_model(model, exp, data.positive_index,
                      schedules.steps_per_epoch(data.train, data.counts["train"], exp.train.batch_size),
                      data.class_weight)
        synced = distribute.synchronize_batchnorm(model) if run.replicas > 1 else 0
        distribute.keras_multiworker_fixes(model, run.strategy)
        xla_note = distribute.fit_xla_to_strategy(model, run.strategy)
    preflight.check_free_disk(run.dir, preflight.checkpoint_bytes(
        frozen.total_params, frozen.trainable_params, exp.train.optimizer, exp.train.momentum),
        resume=bool(run.resume))
    if run.resume:  # the starting weights are replaced by the backup's at phase 5
        origin = f"the backup's weights (the run started from {origin})"
    log(f"[4/6] Model: {m.backbone}, {origin}; preprocessing '{mode}'")
    log(f"      {frozen.describe()}")
    log(f"      {devices.describe_compute(model)}")
    if synced:
        log(f"      {synced} BatchNorm layers use global-batch statistics (synchronised across replicas)")
    if xla_note:
        log(f"      note: {xla_note}")
    return BuiltModel(model, mode, frozen)
