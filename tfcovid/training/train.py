"""Training: ``fit(experiment)`` reads top to bottom in phases, each announced in one log line."""
from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from tfcovid.config import Experiment
from tfcovid.data import datasets, records, types
from tfcovid.data import folders as data_folders
from tfcovid.models import FreezeSummary, apply_freeze, get_backbone, is_head_layer
from tfcovid.models.outputs import probabilities
from tfcovid.results import operating_point, plots, scores, tables
from tfcovid.training import callbacks as training_callbacks
from tfcovid.training import devices, distribute, inputs, preflight, run_state, stops
from tfcovid.training.callbacks import NaNGuard
from tfcovid.training.compile import compile_model
from tfcovid.training.stops import Interrupted, TrainingError
from tfcovid.utils import atomic, run_lock, signals
from tfcovid.utils.text import plural
from tfcovid.weights import loading, metadata

NOT_CLINICAL = "tfcovid is a research tool, not a medical device: not for clinical use."


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


def evaluate_split(model, split: types.Split, exp: Experiment, manifest: types.Manifest,
                   batch_size: int | None = None) -> np.ndarray:
    """Predict one labeled split: its probabilities (n, outputs)."""
    ds = datasets.dataset(split, exp.data.image_size, batch_size or exp.train.batch_size)
    return probabilities(model.predict(ds.map(lambda x, y: x), verbose=0), exp.data.task)


def positive_class(exp: Experiment, manifest: types.Manifest) -> str | None:
    """The binary task's disease class as the run records it; None for the three-label task."""
    return metadata.info_for(exp, manifest)["positive"]


def choose_operating_point(exp: Experiment, manifest: types.Manifest, validation_probs) -> dict:
    """train.operating_point on the validation split (never on test): the thresholds and the
    validation figures at them (results.operating_point)."""
    return operating_point.choose(manifest.splits["validation"].labels, validation_probs, exp.data.task,
                                  exp.train.operating_point, manifest.output_names,
                                  positive_class(exp, manifest), exp.train.threshold)


@dataclasses.dataclass(frozen=True)
class _Run:
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
class _Model:
    """Phase 4's compiled model."""
    model: keras.Model
    preprocessing: str  # the preprocessing mode inside the model
    frozen: FreezeSummary


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
            exp, data = inputs.input_pipeline(run.exp, run.dir, run.workers, run.log, run.manifest)  # [3/6]
            run = dataclasses.replace(run, exp=exp)
            built = _build_model(run, data)  # [4/6]
            train_seconds = _train(run, data, built)  # [5/6]
            results = _evaluate(run, data, built.model)  # [6/6]
            return _write_results(run, data, built, train_seconds, results)
    except Exception as err:
        _clean_up_after(run, err)
        raise
    finally:  # a disk cache of decoded images is only worth keeping while the run trains
        shutil.rmtree(run.dir / "cache", ignore_errors=True)
        if run.lock:
            run.lock.release()


def _run_directory(exp: Experiment, run_dir, t0: float, log) -> _Run:
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
            manifest = inputs.load_manifest(exp, log)
            preflight.check_batch_size(inputs.split_sizes(manifest), exp.train.batch_size)
            _check_operating_point(exp, manifest)
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
    return _Run(exp, run, run_dir, scratch, strategy, strategy_desc, t0, log, manifest, lock)


def _check_operating_point(exp: Experiment, manifest: types.Manifest) -> None:
    """Before training: the validation split can choose train.operating_point (both classes of
    every label), so that [6/6] does not fail after hours of training."""
    validation = manifest.splits["validation"]
    try:
        choose_operating_point(exp, manifest, np.zeros((len(validation.labels), len(manifest.output_names))))
    except operating_point.OperatingPointError as err:
        raise TrainingError(f"{err} (train.operating_point)") from None


def _lock(run) -> run_lock.RunLock:
    """The run directory's lock: one process trains in a run at a time (see utils.run_lock)."""
    try:
        return run_lock.RunLock(run).acquire()
    except run_lock.RunLocked as err:
        raise TrainingError(str(err)) from None
    except OSError as err:
        raise TrainingError(f"Cannot lock {run} for training ({err.strerror or err}): is it a "
                            "writable folder?") from None


def _clean_up_after(run: _Run, err: Exception) -> None:
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


def _where_it_runs(run: _Run) -> _Run:
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


def _build_model(run: _Run, data: inputs.Inputs) -> _Model:
    """Phase 4: model, weights, freeze policy, compile — inside the strategy scope."""
    exp, m, log = run.exp, run.exp.model, run.log
    with devices.dtype_policy(run.precision), run.strategy.scope():
        model, mode, origin = loading.initial_model(
            m.backbone, len(data.manifest.output_names), exp.data.image_size, m.weights,
            m.preprocessing, m.head_units, name=f"tfcovid_{m.backbone}_{exp.data.task}")
        frozen = apply_freeze(model, m.freeze, is_head_layer, get_backbone(m.backbone).stages)
        compile_model(model, exp, data.positive_index)
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
    return _Model(model, mode, frozen)


def _train(run: _Run, data: inputs.Inputs, built: _Model) -> list[float]:
    """Phase 5: restore the backup when resuming, then Keras's fit, checkpointing each epoch.

    Returns each completed epoch's seconds, across resumes.
    """
    exp, log, model = run.exp, run.log, built.model
    info = metadata.info_for(exp, data.manifest)
    signature = run_state.data_signature(data.manifest)
    state = run_state.RunState(run.dir, embed=lambda path: metadata.embed(path, info), data=signature)
    with run.strategy.scope():
        first = state.restore(model)
    changes = run_state.data_changes(state.state.get("data"), signature)
    if changes:  # --resume --data is for the same data in a new place, not for other data
        raise TrainingError(
            f"The data at {data.manifest.root} is not what {run.dir} trained on: {'; '.join(changes)}. "
            "Resume with the run's own data (--data where it is now), or start a new run for "
            "this data."
        )
    guard, stop = NaNGuard(), run_state.StopOnSignal()
    callbacks = _callbacks(run, data, state, guard, stop)
    batch = distribute.per_replica_batches(exp.train.batch_size, run.replicas)
    resuming = f", resuming after epoch {first}" if first else ""
    epochs = plural(exp.train.epochs, "epoch")
    if first >= exp.train.epochs:  # resumed after training ended (e.g. stopped in [6/6])
        log(f"[5/6] Training: done before ({epochs}); nothing left to train")
    else:
        log(f"[5/6] Training {epochs}, batch {batch}, {exp.train.optimizer} lr {exp.train.lr:g}, "
            f"loss {exp.train.loss}{resuming}")
    if not run.scratch and first < exp.train.epochs:
        log(f"      if interrupted, resume with: tfcovid fit --resume {run.dir}")
    try:
        with stop:
            model.fit(data.train, validation_data=data.validation, epochs=exp.train.epochs,
                      initial_epoch=first, callbacks=callbacks,
                      shuffle=False, verbose=1 if sys.stdout.isatty() else 2)
    except records.READ_ERRORS as err:
        records.raise_if_damaged(data.manifest, err)  # names the damaged shard of a prepared dataset
        raise
    except signals.Interrupted as err:
        raise stops.stopped_in_training(run.dir, err, state.state["epochs_done"], exp.train.epochs) from None
    if run.workers > 1:
        log(f"      weights fingerprint {distribute.weights_fingerprint(model)} (equal on every worker)")
    if guard.bad is not None:
        bad_batch, value = guard.bad
        raise TrainingError(
            f"The training loss became {value} at batch {bad_batch}; training stopped. Try a lower "
            f"--lr (now {exp.train.lr:g}) or --precision float32. Checkpoints so far are in {run.dir}."
        )
    return state.seconds


def _callbacks(run: _Run, data: inputs.Inputs, state, guard, stop) -> list[keras.callbacks.Callback]:
    """Phase 5's callbacks, in the order Keras runs them at each epoch's end."""
    return [
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: data.epoch.assign(e)),
        keras.callbacks.TensorBoard(str(run.dir / "tensorboard"), update_freq="epoch", write_graph=False),
        training_callbacks.TensorBoardImages(run.dir / "tensorboard", run.exp, data.manifest, data.validation),
        guard,
        state,  # checkpoints, backup, history.csv: atomically, at each epoch's end
        # Keras's own progress bar, placed before the stop so that an epoch committed just as a
        # signal came still prints its line (Keras would append it after every callback).
        keras.callbacks.ProgbarLogger(),
        stop,
    ]


def _evaluate(run: _Run, data: inputs.Inputs, model) -> dict:
    """Phase 6: evaluate every labeled split with scikit-learn; return the reports by split."""
    exp, manifest = run.exp, data.manifest
    labeled = [name for name in data_folders.SPLIT_ALIASES if name in manifest.splits and manifest.splits[name].labeled]
    unlabeled = [name for name in data_folders.SPLIT_ALIASES if name in manifest.splits and name not in labeled]
    run.log("[6/6] Evaluating " + ", ".join(labeled) + "".join(
        f" ({name} has no class folders, so no labels: not evaluated; `tfcovid predict {run.dir} "
        f"{manifest.splits[name].dir}` predicts it)" for name in unlabeled))
    try:
        with signals.RaiseOnSignal():
            probs = {name: evaluate_split(model, manifest.splits[name], exp, manifest) for name in labeled}
    except records.READ_ERRORS as err:
        records.raise_if_damaged(manifest, err)
        raise
    except signals.Interrupted as err:
        raise stops.evaluation_interrupted(run.dir, err, exp.train.epochs) from None
    point = choose_operating_point(exp, manifest, probs["validation"])
    positive = positive_class(exp, manifest)
    reports = {name: scores.report(exp.data.task, manifest.splits[name].labels, probs[name],
                                   manifest.output_names, positive, point["thresholds"]) for name in labeled}
    return {"splits": reports, "operating_point": point}


def _write_results(run: _Run, data: inputs.Inputs, built: _Model, train_seconds: list[float],
                   results: dict) -> Path | None:
    """metrics.json, the plots and the results table; a non-chief worker's scratch copy is
    released instead of returned."""
    exp, manifest = run.exp, data.manifest
    summary = {
        "task": exp.data.task,
        "outputs": list(manifest.output_names),
        "class_names": list(manifest.class_names),
        "epochs": exp.train.epochs,
        "train_seconds": round(sum(train_seconds), 2),
        "total_seconds": round(time.perf_counter() - run.t0, 2),
        "images": data.counts,
        "trainable_params": built.frozen.trainable_params,
        "total_params": built.frozen.total_params,
        "preprocessing": built.preprocessing,
        "precision": run.precision,
        "replicas": run.replicas,
        "workers": run.workers,
        **results,  # splits, operating_point
    }
    # The chosen operating point goes into the model metrics.json describes (last.keras), and
    # into best.keras when that holds the same weights (a hard link or copy of the last epoch's).
    last, best = run.dir / "checkpoints" / "last.keras", run.dir / "checkpoints" / "best.keras"
    same = best.is_file() and (os.path.samefile(best, last) or filecmp.cmp(best, last, shallow=False))
    for path in (last, best) if same else (last,):
        metadata.embed(path, metadata.info_for(exp, manifest, results["operating_point"]))
    atomic.atomic_write_text(run.dir / "metrics.json", json.dumps(summary, indent=2))
    plots.write_run_plots(run.dir, built.model, exp, manifest, summary, run.log)
    run.log(tables.format_run(exp.to_dict(), summary))
    run.log(operating_point.describe(summary["operating_point"]))
    if run.scratch:  # a non-chief worker: its copy of the run is not needed
        distribute.release(run.scratch)
        return None
    return run.dir
