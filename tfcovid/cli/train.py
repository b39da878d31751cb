"""Commands that make data and models: demo-data, fit, prepare, and configs (the study's files).

Library modules are imported inside the commands (see ``tfcovid.cli``).
"""

from __future__ import annotations

import os
import sys

import click

from tfcovid import config
from tfcovid.cli.common import fail, tensorflow, user_errors
from tfcovid.config.schema import (
    BACKBONES,
    CALIBRATIONS,
    CLASS_WEIGHTS,
    DEMO_MULTILABEL,
    DEMO_PRESET,
    LOSSES,
    MAX_FOLDS,
    MAX_SEED,
    MIN_IMAGE_SIZE,
    OPTIMIZERS,
    PRECISIONS,
    PREPROCESSING,
    RESUME_SETTABLE,
    SAMPLINGS,
    STRATEGIES,
    TASKS,
    Experiment,
)
from tfcovid.utils.text import plural


def _show(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def _default(key: str) -> str:
    """A fit flag's default, read from the schema and the demo presets: fit's flags default to
    None so that they override a config only when given."""
    value = Experiment()
    for part in key.split("."):
        value = getattr(value, part)
    section, _, name = key.rpartition(".")
    demo = DEMO_PRESET.get(section, {}).get(name, value)
    multi = DEMO_MULTILABEL.get(section, {}).get(name, demo)
    text = f"Default: from --config, else {_show(value)}"
    if (demo, multi) != (value, value):
        text += f"; demo preset {_show(demo)}" + (f" ({_show(multi)} multilabel)" if multi != demo else "")
    return text + "."


def _preset(preset: dict) -> str:
    return ", ".join(f"{section}.{key} {_show(value)}" for section, keys in preset.items()
                     for key, value in keys.items() if f"{section}.{key}" != "data.dir")


FIT_HELP = f"""Train a model; writes a new run directory under --out.

Flags override the config file (--config: a path, or an installed config's name from `tfcovid
configs`, e.g. part1/vgg16_first7.yaml); --set reaches any other config key.

With no --config and no --data (or --data demo) the demo preset applies: synthetic images
made offline, trained from scratch, which is not the study's recipe. It sets {_preset(DEMO_PRESET)};
with --task multilabel also {_preset(DEMO_MULTILABEL)}. Flags still override it.
"""


@click.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--task", type=click.Choice(TASKS), default="binary", show_default=True,
              help="binary: infected/normal folders; multilabel: covid-19/normal/pneumonia.")
@click.option("--label-file", is_flag=True, default=False,
              help="Also write OUT/labels.csv: every image with a made-up patient id and no split, "
                   "for fit --data OUT/labels.csv (docs/own-data.md).")
@click.option("--per-class", type=click.IntRange(min=1), default=None,
              help="Train images per class (validation and test get a quarter each). "
                   f"Default: {DEMO_PRESET['data']['demo_per_class']} (binary), "
                   f"{DEMO_MULTILABEL['data']['demo_per_class']} (multilabel), as fit's demo preset.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the generated images.")
@click.option("--imbalance", default=None, metavar="M:N",
              help="Make the disease class (infected; covid-19 for multilabel) rare: M of its images "
                   "per N of each other class in every split, e.g. 1:9 (docs/imbalance.md).")
def demo_data(out, task, label_file, per_class, seed, imbalance):
    """Write a synthetic chest-X-ray-like ImageFolder tree (with lesion masks) to OUT."""
    # NumPy and Pillow: not needed for --help
    from tfcovid.data import demo, demo_labels

    try:
        ratio = None if imbalance is None else demo.parse_imbalance(imbalance)
        path = demo.make_demo_data(out, task=task, per_class=per_class, seed=seed, imbalance=ratio)
    except (ValueError, FileExistsError) as err:
        fail(err)
    click.echo(f"Wrote the {task} demo dataset to {path} (lesion masks in {path / 'masks'}).")
    if label_file:
        click.echo(f"Wrote {demo_labels.write_label_file(path, seed)} (made-up patient ids, no splits).")


@click.command(help=FIT_HELP)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML config: a file, or an installed config's name (tfcovid configs lists them), "
                   "e.g. part1/vgg16_first7.yaml. Default: none (the built-in defaults).")
@click.option("--data", "data__dir", default=None,
              help=f"ImageFolder tree, prepared TFRecords, a label file (FILE.csv, COVIDx train.txt; "
                   f"docs/own-data.md) or 'demo' (the built-in synthetic set). "
                   f"{_default('data.dir')}")
@click.option("--task", "data__task", type=click.Choice(TASKS), default=None,
              help=f"binary: infected/normal; multilabel: covid-19, normal, pneumonia (sigmoid outputs). "
                   f"{_default('data.task')}")
@click.option("--backbone", "model__backbone", type=click.Choice(BACKBONES), default=None,
              help=f"ImageNet backbone under the study's 110-unit head. {_default('model.backbone')}")
@click.option("--freeze", "model__freeze", default=None,
              help=f"all (train the head only) | none | firstN (freeze up to the N-th conv layer) | stagesN "
                   f"(the first N stages). "
                   f"{_default('model.freeze')}")
@click.option("--weights", "model__weights", default=None,
              help="imagenet | none | FILE (.keras, .weights.h5, keras.applications .h5, "
                   f"torchvision .safetensors/.pth). {_default('model.weights')}")
@click.option("--preprocessing", "model__preprocessing", type=click.Choice(PREPROCESSING), default=None,
              help=f"Pixel normalisation; auto follows the weights. {_default('model.preprocessing')}")
@click.option("--loss", "train__loss", type=click.Choice(LOSSES), default=None,
              help="ce (binary task) | bce or focal (multilabel). Default: from --config, else ce "
                   "(binary) or bce (multilabel).")
@click.option("--operating-point", "train__operating_point", default=None, metavar="SPEC",
              help="Decision threshold(s), chosen at the end on the validation split: a number, youden, "
                   "sensitivity:S or specificity:S. Default: train.threshold (0.5).")
@click.option("--calibrate", "train__calibrate", type=click.Choice(CALIBRATIONS), default=None,
              help="temperature: fit temperature scaling on the validation split at the end, before "
                   f"the operating point is chosen (docs/operating-points.md). {_default('train.calibrate')}")
@click.option("--focal-alpha", "train__focal_alpha", type=click.FloatRange(0, 1), default=None,
              help=f"Focal loss's class balance. {_default('train.focal_alpha')}")
@click.option("--focal-gamma", "train__focal_gamma", type=click.FloatRange(min=0), default=None,
              help=f"Focal loss's focusing exponent. {_default('train.focal_gamma')}")
@click.option("--epochs", "train__epochs", type=click.IntRange(min=1), default=None,
              help=f"Passes over the train split. {_default('train.epochs')}")
@click.option("--batch-size", "train__batch_size", type=click.IntRange(min=1), default=None,
              help=f"Global batch size (all replicas together). {_default('train.batch_size')}")
@click.option("--lr", "train__lr", type=click.FloatRange(min=0, min_open=True), default=None,
              help=f"Learning rate. {_default('train.lr')}")
@click.option("--optimizer", "train__optimizer", type=click.Choice(OPTIMIZERS), default=None,
              help=f"SGD uses train.momentum. {_default('train.optimizer')}")
@click.option("--image-size", "data__image_size", type=click.IntRange(min=min(MIN_IMAGE_SIZE.values())),
              default=None, help=f"Input side in pixels (vgg16 and resnet50 need at least 32). "
                                 f"{_default('data.image_size')}")
@click.option("--precision", "train__precision", type=click.Choice(PRECISIONS), default=None,
              help=f"auto: bfloat16 on GPUs of compute capability 8+, float16 on 7.x, float32 on CPU. "
                   f"{_default('train.precision')}")
@click.option("--strategy", "train__strategy", type=click.Choice(STRATEGIES), default=None,
              help="auto: multiworker when TF_CONFIG names a cluster, mirrored with more than one GPU, "
                   f"else one device. {_default('train.strategy')}")
@click.option("--out", "out", default=None, help=f"Parent folder of run directories. {_default('out')}")
@click.option("--name", "name", default=None,
              help="Suffix for the run directory's name. Default: from --config, else none.")
@click.option("--seed", "train__seed", type=click.IntRange(0, MAX_SEED), default=None,
              help=f"Seed of the weights, shuffling and augmentation. {_default('train.seed')}")
@click.option("--deterministic", "train__deterministic", is_flag=True, default=None,
              help=f"Bit-reproducible training on one machine (deterministic ops; slower). "
                   f"{_default('train.deterministic')}")
@click.option("--sampling", "data__sampling", type=click.Choice(SAMPLINGS), default=None,
              help=f"balanced: each epoch drawn equally from every class (folder); docs/imbalance.md. "
                   f"{_default('data.sampling')}")
@click.option("--class-weight", "train__class_weight", type=click.Choice(CLASS_WEIGHTS), default=None,
              help="balanced: weights from the train split's counts; by name: --set "
                   f"'train.class_weight={{covid-19: 9}}'. {_default('train.class_weight')}")
@click.option("--skip-bad", "data__skip_bad", is_flag=True, default=None,
              help="Leave out unusable image files (listed in the run's skipped.txt) instead of "
                   f"stopping. {_default('data.skip_bad')}")
@click.option("--folds", "data__folds", type=click.IntRange(2, MAX_FOLDS), default=None,
              help="Cross-validation: K folds by patient of a label file's non-test images (tfcovid cv "
                   "runs them all). Default: none.")
@click.option("--fold", "data__fold", type=click.IntRange(min=0), default=None,
              help="With --folds K: the fold (0..K-1) that is validation in this run. Default: 0.")
@click.option("--allow-duplicates", "data__allow_duplicates", is_flag=True, default=None,
              help="Train even though images with the same pixels are in two splits (listed). "
                   f"{_default('data.allow_duplicates')}")
@click.option("--resume", "resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue an interrupted run from its backup/ with its config.yaml (only --data may "
                   "be given with it: where the run's data is now).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override any config key (repeatable), e.g. --set train.focal_reduction=mean "
                   "--set data.demo_per_class=8. Values are YAML; named flags win over --set.")
def fit(config_file, resume, assignments, **flags):
    tensorflow()
    from tfcovid.training import train  # heavy: TensorFlow

    try:
        if resume:
            exp = _resume_config(resume, config_file, assignments, flags)
        else:
            exp = config.resolve(config_file, {k.replace("__", "."): v for k, v in flags.items()},
                                 config.parse_assignments(assignments))
        if not resume and config_file is None and exp.data.dir == "demo":
            click.echo(config.describe_demo_preset(exp))
        if not resume and exp.data.dir == "demo" and config.local_demo_folder():
            click.echo(f"Note: 'demo' is the built-in demo set; to train on the folder "
                       f"{config.local_demo_folder()} here, pass --data ./demo")
        run = train.fit(exp, run_dir=resume, log=lambda s: click.echo(s))
    except train.Interrupted as err:  # SIGTERM / Ctrl-C: a clean stop, not a failure to report
        click.echo(str(err), err=True)
        sys.exit(err.exit_code)
    except user_errors() as err:
        fail(err)
    click.echo(f"Done: {run}" if run else "Done (this worker's files were temporary; the chief wrote the run).")


def _cv(config_file, assignments, folds, **flags):
    """Cross-validation: fit once per fold of a label file's patients, then mean ± std."""
    tensorflow()
    from tfcovid.training import cv, train  # heavy: TensorFlow

    try:
        exp = config.resolve(config_file, {k.replace("__", "."): v for k, v in flags.items()},
                             config.parse_assignments(assignments))
        folder = cv.run(exp, folds, log=lambda s: click.echo(s))
    except train.Interrupted as err:
        click.echo(str(err), err=True)
        sys.exit(err.exit_code)
    except user_errors() as err:
        fail(err)
    click.echo(f"Done: {folder} (cv.json; one run per fold)")


cv = click.Command(
    "cv", callback=_cv,
    help="Cross-validate: `fit` once per fold (--folds K, by patient, from a label file given with "
         "--data), then the mean ± standard deviation of the validation and test figures, written "
         "to cv.json beside the fold runs. Other options as fit's.",
    params=[click.Option(["--folds"], type=click.IntRange(2, MAX_FOLDS), required=True,
                         help="Number of folds (patients of the non-test images).")]
    + [p for p in fit.params if p.name not in ("resume", "data__folds", "data__fold")])


def _resume_config(run_dir, config_file, assignments, flags):
    """The run's own config.yaml; ``--data`` may say where its data is now (a moved folder) and
    ``--set`` the keys of RESUME_SETTABLE (how the same pixels are fed: caches, device memory);
    any other option would change the run halfway and is refused, not silently dropped."""
    parsed = config.parse_assignments(assignments)
    keys = [f"{section}.{key}" for section, values in parsed.items()
            for key in (values if isinstance(values, dict) else {None: None})]
    given = [f"--{key.split('__')[-1].replace('_', '-')}" for key, value in flags.items()
             if value is not None and key != "data__dir"]
    given += ["--config"] * (config_file is not None) + [f"--set {k}" for k in keys if k not in RESUME_SETTABLE]
    if given:
        raise click.UsageError(
            f"--resume continues {run_dir} with its own config.yaml; {', '.join(given)} would change the "
            "run halfway. Leave them out (--data may point to where its data is now, --set may change "
            f"{', '.join(RESUME_SETTABLE)}), or start a new run.")
    return config.resolve(os.path.join(run_dir, "config.yaml"), {"data.dir": flags.get("data__dir")},
                          parsed)


@click.command()
@click.argument("data_dir", type=click.Path(file_okay=False))
@click.argument("out_dir")
@click.option("--shards", type=click.IntRange(min=1), default=16, show_default=True,
              help="Shards per split (fewer for small splits). Multi-worker training needs at "
                   "least one train shard per worker; a multiple of the worker count is even.")
@click.option("--max-side", type=click.IntRange(min=0), default=512, show_default=True,
              help="Longest image side after re-encoding (aspect kept, never upscaled); 0 keeps sizes.")
@click.option("--format", "encoding", type=click.Choice(["png", "jpeg"]), default="png",
              show_default=True, help="png: lossless; jpeg: quality 95, smaller and slightly lossy.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the image-to-shard order.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=None,
              help="Refuse images with more pixels than this (read from their headers, before "
                   f"decoding: a decompression-bomb guard). Default: fit's data.max_pixels, "
                   f"{Experiment().data.max_pixels:,}.")
@click.option("--skip-bad", is_flag=True, default=False, show_default=True,
              help="Leave out unusable image files (listed, and kept in the manifest) instead of stopping.")
def prepare(data_dir, out_dir, shards, max_side, encoding, seed, max_pixels, skip_bad):
    """Write the ImageFolder tree DATA_DIR as sharded TFRecords to OUT_DIR (local or gs://).

    OUT_DIR then works wherever an ImageFolder tree does (fit --data OUT_DIR): it is streamed
    with parallel reads and split across workers by shard. A local OUT_DIR appears only when
    complete; SIGTERM or Ctrl-C removes the partial output.
    """
    tensorflow()
    from tfcovid.data import prepare as data_prepare  # heavy: TensorFlow
    from tfcovid.data import records
    from tfcovid.utils import signals

    limits = {} if max_pixels is None else {"max_pixels": max_pixels}
    try:
        manifest = data_prepare.prepare(data_dir, out_dir, shards, max_side, encoding, seed=seed,
                                        log=lambda s: click.echo(s), skip_bad=skip_bad, **limits)
    except signals.Interrupted as err:  # SIGTERM / Ctrl-C: the partial output is already removed
        click.echo(f"tfcovid prepare stopped by {err.name}: nothing was written to {out_dir}.", err=True)
        sys.exit(err.exit_code)
    except user_errors() as err:
        fail(err)
    total = sum(split["images"] for split in manifest["splits"].values())
    click.echo(f"Wrote {plural(total, 'image')} to {out_dir} (manifest {records.MANIFEST}).")


@click.command()
def configs():
    """List the study's configs installed with tfcovid: fit --config NAME --data DIR runs one."""
    rows, broken = [("NAME", "BACKBONE", "FREEZE", "LOSS", "EPOCHS")], []
    for name in config.installed_configs():  # one bad file is named; it does not hide the others
        try:
            exp = config.resolve(name)
        except config.ConfigError as err:
            broken.append(f"{name}: {err}")
            continue
        rows.append((name, exp.model.backbone, exp.model.freeze, exp.train.loss, str(exp.train.epochs)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    click.echo(f"Installed in {config.configs_folder()}:")
    for row in rows:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
    click.echo("Train one: tfcovid fit --config NAME --data DIR (a file of that name here wins).")
    if broken:
        fail(ValueError(f"{len(broken)} installed config(s) cannot be loaded (reinstall tfcovid, or "
                        "report it):\n  " + "\n  ".join(broken)))
