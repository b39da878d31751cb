"""Phase 5 of fit: restore the backup when resuming, then Keras's fit with the callbacks that
checkpoint, log and stop it."""
from __future__ import annotations

import sys

import keras

from tfcovid.data import records
from tfcovid.training import callbacks as training_callbacks
from tfcovid.training import device_augment, distribute, inputs, recipes, run_state, stops
from tfcovid.training.callbacks import NaNGuard
from tfcovid.training.context import BuiltModel, Run
from tfcovid.training.stops import TrainingError
from tfcovid.utils import signals
from tfcovid.utils.text import plural
from tfcovid.weights import metadata


def train(run: Run, data: inputs.Inputs, built: BuiltModel) -> list[float]:
    """Phase 5: restore the backup when resuming, then Keras's fit, checkpointing each epoch.

    Returns each completed epoch's seconds, across resumes.
    """
    exp, log, model = run.exp, run.log, built.model
    info = metadata.info_for(exp, data.manifest)
    signature = run_state.data_signature(data.manifest)
    metric, mode = recipes.monitor(exp)  # best.keras: the early-stopping metric, else val_loss
    state = run_state.RunState(run.dir, embed=lambda path: metadata.embed(path, info), data=signature,
                               monitor=metric, mode=mode)
    with run.strategy.scope():
        first = state.restore(model)
        trainer = device_augment.trainer_for(model, exp, data)  # the model, or it behind the augmentation
    changes = run_state.data_changes(state.state.get("data"), signature)
    if changes:  # --resume --data is for the same data in a new place, not for other data
        raise TrainingError(
            f"The data at {data.manifest.root} is not what {run.dir} trained on: {'; '.join(changes)}. "
            "Resume with the run's own data (--data where it is now), or start a new run for "
            "this data."
        )
    guard, stop = NaNGuard(), run_state.StopOnSignal()
    callbacks = callbacks_for(run, data, state, guard, stop, resumed=first > 0)
    epochs = first if recipes.stopped_early(state) else exp.train.epochs  # an early stop is the end
    batch = distribute.per_replica_batches(exp.train.batch_size, run.replicas)
    resuming = f", resuming after epoch {first}" if first else ""
    if first >= epochs:  # resumed after training ended (e.g. stopped in [6/6])
        log(f"[5/6] Training: done before ({plural(first, 'epoch')}); nothing left to train")
    else:
        log(f"[5/6] Training {plural(epochs, 'epoch')}, batch {batch}, {exp.train.optimizer} lr {exp.train.lr:g}, "
            f"loss {exp.train.loss}{recipes.describe(exp)}{resuming}")
    if not run.scratch and first < epochs:
        log(f"      if interrupted, resume with: tfcovid fit --resume {run.dir}")
    try:
        with stop:
            trainer.fit(data.train, validation_data=data.validation, epochs=epochs,
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
    if (early := recipes.stopped_early(state)) is not None:
        log(f"      stopped early after epoch {early['stopped_epoch']}: {early['reason']}")
    recipes.restore_best(exp, run.dir, model, log)
    return state.seconds


def callbacks_for(run: Run, data: inputs.Inputs, state, guard, stop,
                  resumed: bool = False) -> list[keras.callbacks.Callback]:
    """Phase 5's callbacks, in the order Keras runs them at each epoch's end (the recipe's:
    early stopping, the weight average swapped in, the learning rate; before the commit)."""
    return [
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: data.epoch.assign(e)),
        keras.callbacks.TensorBoard(str(run.dir / "tensorboard"), update_freq="epoch", write_graph=False),
        training_callbacks.TensorBoardImages(run.dir / "tensorboard", run.exp, data.manifest, data.validation),
        guard,
        *recipes.callbacks(run.exp, state, resumed),
        state,  # checkpoints, backup, history.csv: atomically, at each epoch's end
        # Keras's own progress bar, placed before the stop so that an epoch committed just as a
        # signal came still prints its line (Keras would append it after every callback).
        keras.callbacks.ProgbarLogger(),
        stop,
    ]
