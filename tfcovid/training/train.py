"""Training: ``fit(experiment)`` reads top to bottom in phases, each announced in one log line."""
from __future__ import annotations
import dataclasses
import json
import os
import shutil
import sys
import time
from datetime import datetime
from pathlib import Path
import keras
import tensorflow as tf
import yaml
from tfcovid.utils import atomic, signals
from tfcovid.data import augment, datasets, folders as data_folders, types, demo, checks, records
from tfcovid.results import scores, plots, tables
from tfcovid.weights import metadata, loading
from tfcovid.training import callbacks as training_callbacks, preflight, run_state, devices, distribute
from tfcovid.data.cache import Cache
from tfcovid.config import Experiment
from tfcovid.models import apply_freeze, is_head_layer
from tfcovid.data.opencv.process_pool import WorkerStore, available as can_use_workers, usable_cores
from tfcovid.data.folders import disease_class
from tfcovid.models.outputs import probabilities
from tfcovid.training.callbacks import NaNGuard
from tfcovid.training.compile import compile_model


NOT_CLINICAL = "tfcovid is a research tool, not a medical device: not for clinical use."


class TrainingError(RuntimeError):
    """Training could not go on (e.g. the loss became NaN); the message says what to try."""


class Interrupted(TrainingError):
    """SIGTERM or Ctrl-C stopped training; the message holds the command that resumes it."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


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


def load_manifest(exp: Experiment, log=print) -> types.Manifest:
    """Scan the experiment's data (generating the demo set once, when asked for)."""
    d = exp.data
    root = d.dir
    if root == "demo":
        root = demo.ensure_demo_data(d.task, per_class=d.demo_per_class, log=log)
    # Unusable files come back in manifest.bad; fit() checks every file (filecheck.verify).
    return data_folders.scan(root, d.task, d.labels, d.label_map, strict=False)


def evaluate_split(model, split: types.Split, exp: Experiment, manifest: types.Manifest,
                   batch_size: int | None = None) -> dict:
    """Predict one labeled split and return its scikit-learn report."""
    ds = datasets.dataset(split, exp.data.image_size, batch_size or exp.train.batch_size)
    probs = probabilities(model.predict(ds.map(lambda x, y: x), verbose=0), exp.data.task)
    if exp.data.task == "binary":
        return scores.binary_report(split.labels, probs, manifest.class_names, exp.data.positive)
    return scores.multilabel_report(split.labels, probs, manifest.output_names, exp.train.threshold)


def fit(exp: Experiment, run_dir: str | Path | None = None, log=print) -> Path | None:
    """Train one experiment and write its run directory; return the run directory.

    Under ``--strategy multiworker`` every worker runs this; only the chief (worker 0) writes
    and returns the run directory, the others return None.

    Args:
        exp: the resolved experiment.
        run_dir: an existing run directory to resume (its backup/ is used); None for a new run.
        log: where progress lines go.

    Raises:
        TrainingError: the loss became NaN/inf.
    """
    t0 = time.perf_counter()
    log(NOT_CLINICAL)
    if exp.data.dir == "demo":
        log("Data: the built-in synthetic demo set (chest-X-ray-like pictures, not patient data).")
    # Phase 1: run directory and the resolved config, before anything can fail halfway.
    if run_dir and (Path(run_dir) / "metrics.json").exists():
        raise TrainingError(f"{run_dir} has finished (it has metrics.json); nothing to resume. "
                            "Start a new run instead.")
    # Resolving the weights (preprocessing mode, absolute file path) here records them in
    # config.yaml, and a missing weights file fails before a run directory exists.
    exp = loading.resolve_experiment_weights(exp)
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
    run = scratch or (Path(run_dir) if run_dir else new_run_dir(exp))
    atomic.atomic_write_text(run / "config.yaml", yaml.safe_dump(exp.to_dict(), sort_keys=False))
    log(f"[1/6] Run directory: {run}" + (" (scratch; the chief writes the run)" if scratch else ""))
    keras.utils.set_random_seed(exp.train.seed)
    try:
        # A signal before training (the file check, building the model) stops at once; phase 5
        # stops at a batch boundary instead, and a second signal there stops at once.
        with devices.op_determinism(exp.train.deterministic), distribute.forget_traced_gradients(), \
                signals.RaiseOnSignal():
            return _fit(exp, run, run_dir, strategy, strategy_desc, scratch, t0, log)
    except Exception as err:
        # Anything found before training started (data, free disk, the weights file; phase 5
        # makes backup/): leave no half-made run behind. A stop in training keeps its run.
        before = not run_dir and not scratch and not (run / "backup").exists()
        if isinstance(err, signals.Interrupted):  # not one of training's own stops
            if before:
                shutil.rmtree(run, ignore_errors=True)
            raise Interrupted(
                f"Stopped by {err.name} before training started"
                + (f"; nothing to keep: removed {run}." if before else
                   f". Resume with:\n  tfcovid fit --resume {run_dir or run}"), err.exit_code) from None
        if not isinstance(err, Interrupted) and before:
            shutil.rmtree(run, ignore_errors=True)
            log(f"      removed {run}: stopped before training")
        raise
    finally:  # a disk cache of decoded images is only worth keeping while the run trains
        shutil.rmtree(run / "cache", ignore_errors=True)


def _fit(exp, run, run_dir, strategy, strategy_desc, scratch, t0, log):
    # Phase 2: where it runs.
    precision = devices.resolve_precision(exp.train.precision)
    replicas, workers = strategy.num_replicas_in_sync, distribute.worker_info(strategy)[1]
    if exp.train.batch_size < replicas:
        raise TrainingError(f"--batch-size {exp.train.batch_size} is the global batch; it must be at "
                            f"least the number of replicas ({replicas}).")
    log(f"[2/6] Device: {devices.describe_device()}; precision {precision}; strategy {strategy_desc}"
        + ("; deterministic ops" if exp.train.deterministic else ""))

    # Phase 3: input pipeline.
    manifest = checks.verify(load_manifest(exp, log), exp.data, run, lambda line: log(f"      {line}"))
    upsampled = records.upsampling_note(manifest, exp.data.image_size)
    for problem in manifest.problems + tuple(records.check_workers(manifest, workers)) + ((upsampled,) if upsampled else ()):
        log(f"      note: {problem}")
    counts = {name: len(split) for name, split in manifest.splits.items()}
    log(f"[3/6] Data: {manifest.root} ({exp.data.task}; outputs {', '.join(manifest.output_names)}; "
        f"images {counts})")
    preflight.check_batch_size(counts, exp.train.batch_size)
    if exp.data.task == "binary":
        positive, why = disease_class(exp.data.positive, manifest.class_names)
        if positive != exp.data.positive:  # recorded, so resume, evaluate and the model agree
            exp = dataclasses.replace(exp, data=dataclasses.replace(exp.data, positive=positive))
            atomic.atomic_write_text(run / "config.yaml", yaml.safe_dump(exp.to_dict(), sort_keys=False))
        if why:
            log(f"      note: {why}")
    positive_index = (manifest.class_names.index(exp.data.positive)
                      if exp.data.positive in manifest.class_names else 0)
    # One memory budget for both splits' decoded-image caches; a disk cache goes in the run
    # (a killed process's disk cache is stale: it is removed).
    shutil.rmtree(run / "cache", ignore_errors=True)
    # auto: worker processes from 8 cores, the host's cores shared by its training processes.
    cache = Cache(exp.data.cache, exp.data.cache_budget_mb, directory=str(run / "cache"),
                  processes=exp.data.resample_processes,
                  share=distribute.tasks_on_this_host(distribute.tf_config_cluster()))
    # The epoch about to run, set before each epoch: the train pipeline keys its shuffle and
    # augmentation on it, so a resumed run continues with the batches it would have seen.
    epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="tfcovid_epoch")
    train_ds = datasets.dataset(manifest.splits["train"], exp.data.image_size, exp.train.batch_size,
                            training=True, aug=exp.augment, seed=exp.train.seed, cache=cache,
                            decode_scale=exp.data.decode_scale, epoch=epoch,
                            deterministic=exp.train.deterministic, readers=workers)
    val_ds = datasets.dataset(manifest.splits["validation"], exp.data.image_size, exp.train.batch_size,
                          cache=cache)
    log(f"      {cache.describe()}")
    if exp.augment.enabled:
        log(f"      augmentation resampled with {augment.describe_resampler()}{_where_resampled(exp, cache)}")

    # Phase 4: model, weights, freeze policy, compile — inside the strategy scope.
    with devices.dtype_policy(precision), strategy.scope():
        m = exp.model
        model, mode, origin = loading.initial_model(
            m.backbone, len(manifest.output_names), exp.data.image_size, m.weights,
            m.preprocessing, m.head_units, name=f"tfcovid_{m.backbone}_{exp.data.task}")
        frozen = apply_freeze(model, m.freeze, is_head_layer)
        compile_model(model, exp, positive_index)
        synced = distribute.synchronize_batchnorm(model) if replicas > 1 else 0
        distribute.keras_multiworker_fixes(model, strategy)
        xla_note = distribute.fit_xla_to_strategy(model, strategy)
    preflight.check_free_disk(run, preflight.checkpoint_bytes(
        frozen.total_params, frozen.trainable_params, exp.train.optimizer, exp.train.momentum))
    if run_dir:  # the starting weights are replaced by the backup's at phase 5
        origin = f"the backup's weights (the run started from {origin})"
    log(f"[4/6] Model: {m.backbone}, {origin}; preprocessing '{mode}'")
    log(f"      {frozen.describe()}")
    log(f"      {devices.describe_compute(model)}")
    if synced:
        log(f"      {synced} BatchNorm layers use global-batch statistics (synchronised across replicas)")
    if xla_note:
        log(f"      note: {xla_note}")

    # Phase 5: train.
    info = metadata.info_for(exp, manifest)
    signature = run_state.data_signature(manifest)
    state = run_state.RunState(run, embed=lambda path: metadata.embed(path, info), data=signature)
    with strategy.scope():
        first = state.restore(model)
    changes = run_state.data_changes(state.state.get("data"), signature)
    if changes:  # --resume --data is for the same data in a new place, not for other data
        raise TrainingError(
            f"The data at {manifest.root} is not what {run} trained on: {'; '.join(changes)}. "
            "Resume with the run's own data (--data where it is now), or start a new run for "
            "this data."
        )
    guard, stop = NaNGuard(), run_state.StopOnSignal()
    callbacks = [
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epoch.assign(e)),
        keras.callbacks.TensorBoard(str(run / "tensorboard"), update_freq="epoch", write_graph=False),
        training_callbacks.TensorBoardImages(run / "tensorboard", exp, manifest, val_ds),
        guard,
        state,  # checkpoints, backup, history.csv: atomically, at each epoch's end
        # Keras's own progress bar, placed before the stop so that an epoch committed just as a
        # signal came still prints its line (Keras would append it after every callback).
        keras.callbacks.ProgbarLogger(),
        stop,
    ]
    batch = distribute.per_replica_batches(exp.train.batch_size, replicas)
    resuming = f", resuming after epoch {first}" if first else ""
    epochs = f"{exp.train.epochs} epoch{'s' if exp.train.epochs != 1 else ''}"
    if first >= exp.train.epochs:  # resumed after training ended (e.g. stopped in [6/6])
        log(f"[5/6] Training: done before ({epochs}); nothing left to train")
    else:
        log(f"[5/6] Training {epochs}, batch {batch}, {exp.train.optimizer} lr {exp.train.lr:g}, "
            f"loss {exp.train.loss}{resuming}")
    if not scratch and first < exp.train.epochs:
        log(f"      if interrupted, resume with: tfcovid fit --resume {run}")
    try:
        with stop:
            model.fit(train_ds, validation_data=val_ds, epochs=exp.train.epochs, initial_epoch=first,
                      callbacks=callbacks, shuffle=False, verbose=1 if sys.stdout.isatty() else 2)
    except records.READ_ERRORS as err:
        records.raise_if_damaged(manifest, err)  # names the damaged shard of a prepared dataset
        raise
    except signals.Interrupted as err:
        done = state.state["epochs_done"]
        raise Interrupted(
            f"Training {err} during epoch {done + 1} of {exp.train.epochs}. "
            + ("Epoch 1 is" if done == 1 else f"Epochs 1-{done} are")
            + f" saved in {run} (checkpoints/, backup/); the partial epoch is discarded. Resume with:\n"
            f"  tfcovid fit --resume {run}" if done else
            f"Training {err} during epoch 1 of {exp.train.epochs}; no epoch was completed. "
            f"Start again with:\n  tfcovid fit --resume {run}", err.exit_code) from None
    if workers > 1:
        log(f"      weights fingerprint {distribute.weights_fingerprint(model)} (equal on every worker)")
    if guard.bad is not None:
        batch, value = guard.bad
        raise TrainingError(
            f"The training loss became {value} at batch {batch}; training stopped. Try a lower "
            f"--lr (now {exp.train.lr:g}) or --precision float32. Checkpoints so far are in {run}."
        )

    # Phase 6: evaluate every labeled split with scikit-learn and write metrics.json.
    labeled = [name for name in data_folders.SPLIT_ALIASES if name in manifest.splits and manifest.splits[name].labeled]
    unlabeled = [name for name in data_folders.SPLIT_ALIASES if name in manifest.splits and name not in labeled]
    log("[6/6] Evaluating " + ", ".join(labeled) + "".join(
        f" ({name} has no class folders, so no labels: not evaluated; `tfcovid predict {run} "
        f"{manifest.splits[name].dir}` predicts it)" for name in unlabeled))
    try:
        with signals.RaiseOnSignal():
            results = {name: evaluate_split(model, manifest.splits[name], exp, manifest) for name in labeled}
    except records.READ_ERRORS as err:
        records.raise_if_damaged(manifest, err)
        raise
    except signals.Interrupted as err:
        raise Interrupted(
            f"Evaluation {err}. Training has finished ({exp.train.epochs} epoch"
            f"{'s' if exp.train.epochs != 1 else ''}, saved in {run}: checkpoints/, backup/), but "
            f"metrics.json is not written. Finish the "
            f"evaluation with:\n  tfcovid fit --resume {run}", err.exit_code) from None
    summary = {
        "task": exp.data.task,
        "outputs": list(manifest.output_names),
        "class_names": list(manifest.class_names),
        "epochs": exp.train.epochs,
        "train_seconds": round(sum(state.seconds), 2),
        "total_seconds": round(time.perf_counter() - t0, 2),
        "images": counts,
        "trainable_params": frozen.trainable_params,
        "total_params": frozen.total_params,
        "preprocessing": mode,
        "precision": precision,
        "replicas": replicas,
        "workers": workers,
        "splits": results,
    }
    atomic.atomic_write_text(run / "metrics.json", json.dumps(summary, indent=2))
    plots.write_run_plots(run, model, exp, manifest, summary, log)
    log(tables.format_run(exp.to_dict(), summary))
    if scratch:  # a non-chief worker: its copy of the run is not needed
        distribute.release(scratch)
        return None
    return run


def _where_resampled(exp, cache) -> str:
    """", in N worker processes" when data.resample_processes took effect; why not, when not
    (``auto`` on fewer than 8 cores means threads: nothing to say)."""
    n, setting = cache.processes, str(exp.data.resample_processes).strip().lower()
    if not n:
        return ""
    share = f" shared by {cache.share} training processes" if cache.share > 1 else ""
    how = f" (data.resample_processes auto: {usable_cores()} cores{share})" if setting == "auto" else ""
    if any(isinstance(s, WorkerStore) for s in cache.stores):
        return f", in {n} worker processes{how}"
    if cache.worker_error:
        return f" (the {n} worker processes of data.resample_processes {setting} could not start: " \
               f"{cache.worker_error}; threads instead)"
    why = ("needs the decoded-image cache (data.cache)" if exp.data.cache == "none"
           else "needs Linux and OpenCV" if not can_use_workers()
           else "needs OpenCV's resampler")
    return f" (data.resample_processes {setting} not used: it {why}; threads instead)"
