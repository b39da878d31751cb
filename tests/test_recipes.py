"""Issue 25's recipes: learning-rate schedules, early stopping, weight EMA, test-time
augmentation and the configs/beyond/ recipes (docs/beyond.md#recipes)."""

import json
import math
import shutil
from pathlib import Path

import keras
import numpy as np
import pytest

from tfcovid import config
from tfcovid.data import decode
from tfcovid.inference import evaluate, predict
from tfcovid.models import tta as test_time
from tfcovid.training import loop, recipes, run_state, schedules, train
from tfcovid.weights import metadata

BEYOND = Path(__file__).resolve().parents[1] / "configs" / "beyond"


def _train(**kw) -> config.TrainConfig:
    return config.from_dict({"train": {"epochs": 10, "lr": 0.1, **kw}}).train


# ----------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("key, good, bad", [
    ("warmup_epochs", [0, 9], [-1, 10]),  # 0 <= warmup < epochs (10)
    ("step_epochs", [1, 1000], [0, -1]),
    ("step_gamma", [1e-9, 1.0], [0.0, 1.0001]),
    ("patience", [1, 500], [0, -3]),
    ("ema", [0.0, 1e-6, 0.999999], [-1e-6, 1.0, 1.5]),
])
def test_recipe_ranges_at_both_ends_and_just_outside(key, good, bad):
    for value in good:
        assert getattr(_train(**{key: value}), key) == value
    for value in bad:
        with pytest.raises(config.ConfigError, match=rf"Bad value for 'train.{key}': {value}\. "):
            _train(**{key: value})


def test_recipe_choices_follow_the_task():
    assert _train(schedule="cosine", early_stopping="val_f1").schedule == "cosine"
    with pytest.raises(config.ConfigError, match="'train.schedule': 'linear'. Valid values: constant, cosine, step"):
        _train(schedule="linear")
    with pytest.raises(config.ConfigError, match="Valid values: none, val_loss, val_accuracy, val_f1"):
        _train(early_stopping="val_jaccard")  # a three-label metric on the binary task
    multilabel = {"data": {"task": "multilabel"}, "train": {"loss": "bce", "early_stopping": "val_jaccard"}}
    assert config.from_dict(multilabel).train.early_stopping == "val_jaccard"
    with pytest.raises(config.ConfigError, match="Valid values: none, val_loss, val_jaccard, val_f1"):
        config.from_dict({**multilabel, "train": {"loss": "bce", "early_stopping": "val_accuracy"}})


def test_defaults_keep_the_studys_recipe():
    t = config.TrainConfig()
    assert (t.schedule, t.warmup_epochs, t.early_stopping, t.ema) == ("constant", 0, "none", 0.0)
    assert schedules.learning_rate(t, 7) == t.lr  # a plain float: Keras's constant rate, as before
    opt = schedules.optimizer(t, 7)
    assert not opt.use_ema and float(opt.learning_rate) == pytest.approx(t.lr)
    assert recipes.monitor(config.Experiment()) == ("val_loss", "min")
    assert recipes.describe(config.Experiment()) == ""  # fit's [5/6] line as before
    recipe = config.from_dict({"train": {"schedule": "cosine", "warmup_epochs": 1, "ema": 0.99,
                                         "early_stopping": "val_f1"}})
    assert recipes.describe(recipe) == (", cosine schedule after 1 warm-up epoch, weight EMA 0.99, "
                                        "early stopping on val_f1 (patience 5)")
    assert recipes.monitor(recipe) == ("val_f1", "max")


# ----------------------------------------------------------------------------- schedules


def _rates(t, steps_per_epoch, steps):
    rate = schedules.learning_rate(t, steps_per_epoch)
    return np.array([float(rate(s)) for s in steps])


def test_cosine_with_warmup_rises_linearly_then_follows_the_cosine_to_zero():
    t = _train(schedule="cosine", warmup_epochs=2, epochs=10)  # 4 steps/epoch: 8 warm-up, 32 cosine
    got = _rates(t, 4, [0, 4, 8, 24, 40, 60])
    np.testing.assert_allclose(got, [0.0, 0.05, 0.1, 0.05, 0.0, 0.0], atol=1e-7)
    mid = _rates(_train(schedule="cosine", epochs=10), 4, [10])  # no warm-up: starts at lr
    np.testing.assert_allclose(mid, [0.1 * 0.5 * (1 + math.cos(math.pi * 10 / 40))], rtol=1e-6)


def test_constant_with_warmup_and_step_schedules():
    np.testing.assert_allclose(_rates(_train(warmup_epochs=1), 4, [0, 2, 4, 39]), [0, 0.05, 0.1, 0.1], atol=1e-7)
    step = _train(schedule="step", step_epochs=3, step_gamma=0.5)  # x0.5 every 3 epochs, StepLR
    np.testing.assert_allclose(_rates(step, 4, [0, 11, 12, 23, 24]), [0.1, 0.1, 0.05, 0.05, 0.025], rtol=1e-6)
    warm = _train(schedule="step", step_epochs=3, step_gamma=0.5, warmup_epochs=1)  # counted after warm-up
    np.testing.assert_allclose(_rates(warm, 4, [0, 2, 4, 15, 16]), [0, 0.05, 0.1, 0.1, 0.05], rtol=1e-6, atol=1e-7)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(
        schedules.learning_rate(warm, 4)))  # saved with the optimizer in every .keras file
    assert float(again(16)) == pytest.approx(0.05)


# ----------------------------------------------------------------------------- early stopping


def _tiny(ema: float = 0.0):
    inputs = keras.Input((3,))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head_logits")(inputs))
    kw = {"use_ema": True, "ema_momentum": ema} if ema else {}
    model.compile(optimizer=keras.optimizers.SGD(0.1, **kw), loss="mse")
    return model


def _epochs(model, callbacks, values, first=0, epochs=10):
    """Run callbacks over epochs whose validation F1 is ``values``; the kernel holds the epoch."""
    for cb in callbacks:
        cb.set_model(model)
        cb.set_params({"epochs": epochs})
        cb.on_train_begin()
    for epoch, value in enumerate(values, start=first):
        for cb in callbacks:
            cb.on_epoch_begin(epoch)
        model.layers[-1].kernel.assign(np.full((3, 2), float(epoch), "float32"))
        logs = {"loss": 1.0, "val_loss": 1.0, "val_f1": value}
        for cb in callbacks:
            cb.on_epoch_end(epoch, logs)
        if model.stop_training:
            return epoch
    return None


def test_early_stopping_on_f1_stops_records_why_and_resumes_its_count(tmp_path):
    exp = config.from_dict({"train": {"early_stopping": "val_f1", "patience": 2}})
    metric, mode = recipes.monitor(exp)
    values = [0.5, 0.7, 0.6, 0.65, 0.9]  # best at epoch 2 (1-based); two worse epochs stop it
    model = _tiny()
    state = run_state.RunState(tmp_path / "a", monitor=metric, mode=mode)
    assert _epochs(model, [recipes.EarlyStop(exp, state), state], values) == 3
    why = json.loads((tmp_path / "a" / "backup" / "state.json").read_text())["early_stopping"]
    assert why == {"metric": "val_f1", "patience": 2, "stopped_early": True, "stopped_epoch": 4,
                   "best_epoch": 2, "best": 0.7,
                   "reason": "val_f1 did not improve for 2 epochs after epoch 2 (best 0.7)"}
    assert state.state["best"] == 0.7  # best.keras follows the metric, highest F1 first
    assert recipes.summary("val_loss", 1, 1, 0, 0.25)["reason"] == ("val_loss did not improve for 1 epoch "
                                                                    "after epoch 1 (best 0.25)")  # not "1 epochs"
    best = keras.saving.load_model(tmp_path / "a" / "checkpoints" / "best.keras")
    np.testing.assert_array_equal(best.layers[-1].kernel.numpy(), np.ones((3, 2)))

    # Killed after epoch 3, resumed: the count goes on from the committed history.
    model = _tiny()
    state = run_state.RunState(tmp_path / "b", monitor=metric, mode=mode)
    assert _epochs(model, [recipes.EarlyStop(exp, state), state], values[:3]) is None
    resumed = run_state.RunState(tmp_path / "b", monitor=metric, mode=mode)
    assert resumed.restore(model) == 3
    assert _epochs(model, [recipes.EarlyStop(exp, resumed), resumed], values[3:], first=3) == 3
    assert recipes.stopped_early(resumed)["stopped_epoch"] == 4
    assert recipes.results(exp, tmp_path / "b")["early_stopping"]["best_epoch"] == 2

    recipes.restore_best(exp, tmp_path / "b", model, log=lambda line: None)  # restore_best: true
    np.testing.assert_array_equal(model.layers[-1].kernel.numpy(), np.ones((3, 2)))
    last = keras.saving.load_model(tmp_path / "b" / "checkpoints" / "last.keras")
    np.testing.assert_array_equal(last.layers[-1].kernel.numpy(), np.ones((3, 2)))


def test_early_stopping_off_never_stops_and_ran_every_epoch_is_recorded(tmp_path):
    exp = config.from_dict({"train": {"early_stopping": "val_f1", "patience": 5}})
    model = _tiny()
    state = run_state.RunState(tmp_path, monitor="val_f1", mode="max")
    assert _epochs(model, [recipes.EarlyStop(exp, state), state], [0.9, 0.1, 0.2]) is None
    got = recipes.results(exp, tmp_path)["early_stopping"]
    assert (got["stopped_early"], got["best_epoch"], got["reason"]) == (False, 1, "ran every epoch")
    assert recipes.results(config.Experiment(), tmp_path) == {}  # off: nothing in metrics.json


def test_patience_running_out_at_the_last_epoch_is_not_an_early_stop(tmp_path):
    """Keras's EarlyStopping stops on the last epoch too when patience runs out there; every
    configured epoch ran, so metrics.json says so (and fit does not log an early stop)."""
    exp = config.from_dict({"train": {"early_stopping": "val_f1", "patience": 1, "epochs": 2}})
    state = run_state.RunState(tmp_path / "last", monitor="val_f1", mode="max")
    _epochs(_tiny(), [recipes.EarlyStop(exp, state), state], [0.9, 0.1], epochs=2)
    got = recipes.results(exp, tmp_path / "last")["early_stopping"]
    assert (got["stopped_early"], got["stopped_epoch"], got["reason"]) == (False, None, "ran every epoch")
    state = run_state.RunState(tmp_path / "earlier", monitor="val_f1", mode="max")  # one epoch sooner: a stop
    assert _epochs(_tiny(), [recipes.EarlyStop(exp, state), state], [0.9, 0.1], epochs=3) == 1
    assert recipes.results(exp, tmp_path / "earlier")["early_stopping"]["stopped_epoch"] == 2


# ----------------------------------------------------------------------------- EMA


def test_ema_weights_are_the_ones_validated_and_saved(tmp_path):
    """The saved model holds the optimizer's average, not the raw weights, at every epoch."""
    model = _tiny(ema=0.5)
    seen = []

    class Record(keras.callbacks.Callback):  # runs before the swap: raw weights in the model
        def on_epoch_end(self, epoch, logs=None):
            opt = self.model.optimizer
            seen.append(([v.numpy().copy() for v in opt._model_variables_moving_average],
                         [v.numpy().copy() for v in self.model.trainable_variables]))

    class Keep(keras.callbacks.Callback):  # after RunState: each epoch's last.keras
        def on_epoch_end(self, epoch, logs=None):
            (tmp_path / f"epoch{epoch}.keras").write_bytes((tmp_path / "checkpoints" / "last.keras").read_bytes())

    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    y = np.random.default_rng(1).normal(size=(16, 2)).astype("float32")
    state = run_state.RunState(tmp_path)
    model.fit(x, y, batch_size=4, epochs=2, verbose=0,
              callbacks=[Record(), recipes.SwapEMA(resumed=False), state, Keep()])
    for epoch, (average, raw) in enumerate(seen):
        saved = keras.saving.load_model(tmp_path / f"epoch{epoch}.keras").trainable_variables
        for s, a, r in zip(saved, average, raw):
            np.testing.assert_allclose(s.numpy(), a, atol=1e-7)
            assert np.abs(a - r).max() > 1e-4  # the comparison can fail
    for v, a in zip(model.trainable_variables, seen[-1][0]):  # fit's end: the average stays
        np.testing.assert_allclose(v.numpy(), a, atol=1e-7)


def _kill_and_resume_tiny(tmp_path, swap_back: bool = True):
    """A Dense model with a cosine schedule and EMA: 3 epochs straight, and killed after epoch 1
    then resumed from its backup. Returns both models' weights and learning-rate columns."""
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    y = np.random.default_rng(1).normal(size=(16, 2)).astype("float32")
    t = _train(schedule="cosine", warmup_epochs=1, epochs=3, ema=0.5, optimizer="adam", lr=0.05)

    class Kill(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            raise RuntimeError("killed")

    def fit(run, kill=False):
        keras.utils.set_random_seed(0)
        model = _tiny()
        model.compile(optimizer=schedules.optimizer(t, 4), loss="mse")
        state = run_state.RunState(run)
        first = state.restore(model)
        callbacks = [recipes.SwapEMA(resumed=first > 0 and swap_back), recipes.LearningRateLog(), state]
        try:
            model.fit(x, y, batch_size=4, epochs=3, initial_epoch=first, shuffle=False, verbose=0,
                      callbacks=callbacks + ([Kill()] if kill else []))
        except RuntimeError:
            pass
        return model.get_weights(), [row["learning_rate"] for row in state.state["history"]]

    reference = fit(tmp_path / "ref")
    fit(tmp_path / "kill", kill=True)
    return reference, fit(tmp_path / "kill")


def test_resume_continues_the_schedule_and_the_average(tmp_path):
    (ref_w, ref_lr), (got_w, got_lr) = _kill_and_resume_tiny(tmp_path / "a")
    np.testing.assert_allclose(ref_lr, [0.05, 0.025, 0.0], atol=1e-7)  # cosine after 1 warm-up epoch
    np.testing.assert_allclose(got_lr, ref_lr, atol=1e-9)  # the step count came back
    for a, b in zip(got_w, ref_w):
        np.testing.assert_allclose(a, b, atol=1e-6)
    # Without swapping the raw weights back before the next epoch, training would go on from the
    # average: the resumed run ends elsewhere (so the comparison above can fail).
    _, (wrong_w, _) = _kill_and_resume_tiny(tmp_path / "b", swap_back=False)
    assert max(float(np.abs(a - b).max()) for a, b in zip(wrong_w, ref_w)) > 1e-4


# ----------------------------------------------------------------------------- a real fit, resumed


@pytest.mark.slow
def test_a_killed_cosine_ema_run_resumes_exactly(binary_tree, tmp_path, monkeypatch):
    """Cosine with warm-up and EMA, killed after epoch 1 and resumed: the learning-rate column,
    the losses and the final weights are the uninterrupted run's.

    The killed run is the reference run's folder as epoch 1 committed it (what a kill there
    leaves on disk: same seed, deterministic ops), copied by a callback after RunState's; so two
    fits instead of three (a third, killed fit trained the same first epoch again)."""
    def exp(out):
        return config.from_dict({
            "out": str(tmp_path / out), "data": {"dir": str(binary_tree), "image_size": 16},
            "model": {"backbone": "resnet18", "freeze": "none", "weights": "none"},
            "train": {"epochs": 3, "batch_size": 2, "optimizer": "adam", "lr": 1e-3, "seed": 3,
                      "deterministic": True, "schedule": "cosine", "warmup_epochs": 1, "ema": 0.9}})

    class KilledCopy(keras.callbacks.Callback):  # runs after RunState has committed the epoch
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 0:
                (source,) = (tmp_path / "ref").iterdir()
                shutil.copytree(source, tmp_path / "kill" / source.name,
                                ignore=shutil.ignore_patterns(".lock", "cache"))

    real = loop.callbacks_for
    monkeypatch.setattr(loop, "callbacks_for", lambda *a, **kw: [*real(*a, **kw), KilledCopy()])
    reference = train.fit(exp("ref"), log=lambda line: None)
    monkeypatch.setattr(loop, "callbacks_for", real)
    (run,) = (tmp_path / "kill").iterdir()
    assert json.loads((run / "backup" / "state.json").read_text())["epochs_done"] == 1
    assert not (run / "metrics.json").exists()
    assert train.fit(config.resolve(run / "config.yaml"), run_dir=run, log=lambda line: None) == run

    def history(r):
        rows = [line.split(",") for line in (r / "history.csv").read_text().strip().splitlines()]
        return {name: [float(row[i]) for row in rows[1:]] for i, name in enumerate(rows[0])}

    ref, got = history(reference), history(run)
    steps = 4  # 8 train images at batch 2; lr after each epoch's last step: 1e-3, then the cosine
    np.testing.assert_allclose(ref["learning_rate"], [1e-3, 1e-3 * 0.5 * (1 + math.cos(math.pi * steps / 8)), 0.0],
                               rtol=1e-5, atol=1e-9)
    for key in ("learning_rate", "loss", "val_loss"):
        np.testing.assert_allclose(got[key], ref[key], rtol=1e-5, atol=1e-7)
    a = keras.models.load_model(run / "checkpoints" / "last.keras", compile=False).get_weights()
    b = keras.models.load_model(reference / "checkpoints" / "last.keras", compile=False).get_weights()
    assert max(float(np.max(np.abs(x - y))) if x.size else 0.0 for x, y in zip(a, b)) < 1e-6


# ----------------------------------------------------------------------------- TTA


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory):
    """A small conv model (its kernels see left from right, so the mirror image scores otherwise)."""
    path = tmp_path_factory.mktemp("tta") / "bare.keras"
    keras.utils.set_random_seed(0)
    keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255), keras.layers.Conv2D(4, 3),
                      keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)],
                     name="tfcovid_tiny_binary").save(path)
    metadata.embed(path, {"task": "binary", "outputs": ["infected", "normal"], "positive": "infected",
                          "threshold": 0.5})
    return path


def _softmax(logits):
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def test_tta_flip_is_the_mean_of_the_image_and_its_mirror(bare_model, binary_tree, tmp_path):
    images = sorted((binary_tree / "test").rglob("*.*"))
    trained = metadata.load(bare_model)
    model = trained.model
    pixels = np.stack([decode.load_image(str(p), 16).numpy() for p in images])
    single = _softmax(model.predict(pixels, verbose=0).astype(np.float64))
    mirror = _softmax(model.predict(np.stack([np.fliplr(p) for p in pixels]), verbose=0).astype(np.float64))
    expected = (single + mirror) / 2
    assert np.abs(expected - single).max() > 1e-4  # the comparison can fail

    result = predict.predict(trained, images, tta="flip")
    np.testing.assert_allclose(result.probs, expected, atol=2e-6)
    header, *rows = predict.write_csv(result, tmp_path / "p.csv").read_text().splitlines()
    assert header == "filename,infected,normal,predicted,tta" and rows[0].endswith(",flip")
    plain = predict.predict(trained, images)
    np.testing.assert_allclose(plain.probs, single, atol=2e-6)

    out = evaluate.evaluate(bare_model, data=binary_tree, split="test", out=tmp_path / "eval",
                            make_plots=False, log=lambda line: None, tta="flip")
    assert out["tta"] == "flip" and Path(out["files"][0]).name == "test-tta.json"
    csv_rows = (tmp_path / "eval" / "test-tta_predictions.csv").read_text().splitlines()[1:]
    by_path = {Path(r.split(",")[0]).name: [float(v) for v in r.split(",")[2:4]] for r in csv_rows}
    np.testing.assert_allclose([by_path[p.name] for p in images], expected, atol=2e-6)
    with pytest.raises(ValueError, match="Valid values: none, flip"):
        test_time.check("rotate")


# ----------------------------------------------------------------------------- configs/beyond


def test_every_beyond_recipe_loads_and_says_what_it_is():
    """Every configs/beyond/*.yaml resolves (densenet121 once the backbones branch is in) and
    starts with a one-line comment: the command and what it is."""
    files = sorted(BEYOND.glob("*.yaml"))
    assert len(files) >= 3
    for path in files:
        first = path.read_text().splitlines()[0]
        assert first.startswith(f"# tfcovid fit --config beyond/{path.name} --data DATA_DIR -- "), path
        exp = config.resolve(path)
        assert exp.name == f"beyond-{path.stem}" and exp.train.schedule != "constant", path
    assert {f"beyond/{p.name}" for p in files} <= set(config.installed_configs())


def test_beyond_recipes_resolve_with_a_study_backbone():
    """The recipes' own keys, checked before densenet121 is in the registry (issue 25.1)."""
    for path in sorted(BEYOND.glob("*.yaml")):
        exp = config.resolve(path, {"model.backbone": "resnet18"})
        assert exp.train.early_stopping in ("none", "val_f1") and exp.train.warmup_epochs == 1, path
