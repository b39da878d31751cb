"""Commands around the runs: report (the study's tables), import-torch (the study's PyTorch
checkpoints) and bench. Library modules are imported inside the commands (see ``tfcovid.cli``).
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from tfcovid.cli.common import fail, names, tensorflow, user_errors
from tfcovid.config.checks import resample_processes
from tfcovid.config.schema import (AUGMENT_ON, BACKBONES, CACHES, JIT_COMPILE, MAX_DEVICE_CACHE_MB, PRECISIONS,
                                   TASKS, ConfigError, Experiment)

# The backbones of the study's PyTorch code: torchvision layouts that import-torch maps.
TORCH_BACKBONES = ("vgg16", "resnet18")


@click.command()
@click.argument("runs", metavar="RUN_DIR...", nargs=-1, required=True)
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False), default=None,
              help="Also write the tables to this Markdown file.")
def report(runs, markdown_file):
    """Print the study's Part 1 / Part 2 tables for finished runs (or folders of runs), and
    write each run's MODEL_CARD.md again from its metrics.json."""
    tensorflow()
    from tfcovid.results import model_card, tables  # heavy: TensorFlow

    try:
        text, skipped = tables.build_report(runs)
    except tables.ReportError as err:
        fail(err)
    for path, reason in skipped:
        click.echo(f"note: skipped {path}: {reason}", err=True)
    cards, failed = model_card.refresh(runs)  # MODEL_CARD.md again, from each run's metrics.json
    for path, reason in failed:
        click.echo(f"note: {path}: {reason}", err=True)
    if cards:
        click.echo(f"Wrote {model_card.FILENAME} in {len(cards)} run director{'y' if len(cards) == 1 else 'ies'}.",
                   err=True)
    click.echo(text)
    if markdown_file:
        Path(markdown_file).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_file).write_text("# Results\n\n" + text)
        click.echo(f"Wrote {markdown_file}")


@click.command("import-torch")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--backbone", type=click.Choice(TORCH_BACKBONES), required=True,
              help="The checkpoint's torchvision backbone.")
@click.option("--task", type=click.Choice(TASKS), required=True,
              help="binary: 2 outputs (infected, normal); multilabel: covid-19, normal, pneumonia.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The .keras file to write.")
@click.option("--image-size", type=click.IntRange(min=32), default=224, show_default=True,
              help="Input side in pixels; VGG16's head needs 224-255 (a 7x7 feature map).")
@click.option("--labels", default=None,
              help="Comma-separated output names in the checkpoint's order. Default: the study's.")
def import_torch(checkpoint, backbone, task, out, image_size, labels):
    """Convert the study's fine-tuned PyTorch checkpoint (torchvision VGG16/ResNet18 with the
    110-unit head; .safetensors, or .pth with the torch extra) into a tfcovid .keras model."""
    tensorflow()
    from tfcovid.weights import import_torch as weights_import_torch  # heavy: TensorFlow

    output_names = tuple(names(labels)) if labels else None
    try:
        path = weights_import_torch.import_torch(checkpoint, backbone, task, out, image_size, output_names,
                                                 log=lambda s: click.echo(s))
    except user_errors() as err:
        fail(err)
    click.echo(f"Wrote {path} (evaluate, predict, explain and export it like any run's model).")


_DATA = Experiment().data


@click.command()
@click.argument("kind", type=click.Choice(["pipeline", "model", "fit"]))
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Images to read: an ImageFolder tree (its train split) or any folder of images. "
                   "Default: generate grayscale 1024x1024 JPEGs in a temporary folder.")
@click.option("--images", type=click.IntRange(min=1), default=300, show_default=True,
              help="How many images to generate when --data is not given.")
@click.option("--backbone", type=click.Choice(BACKBONES), default="vgg16", show_default=True,
              help="The model to time (model, fit).")
@click.option("--image-size", type=click.IntRange(min=16), default=224, show_default=True,
              help="Input side in pixels.")
@click.option("--batch-size", type=click.IntRange(min=1), default=60, show_default=True,
              help="Global batch size.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="auto", show_default=True,
              help="As fit's --precision.")
@click.option("--jit-compile", type=click.Choice(JIT_COMPILE), default="auto",
              show_default=True, help="XLA; auto: on for GPUs, off on CPU (Keras's rule).")
@click.option("--steps-per-execution", type=click.IntRange(min=1), default=1, show_default=True,
              help="Training steps per compiled call (train.steps_per_execution).")
@click.option("--freeze", default="none", show_default=True,
              help="all | none | firstN | stagesN, as fit's --freeze.")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Training steps per timed repeat (model, fit).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed repeats after the warm-up; the median is reported.")
@click.option("--cache", type=click.Choice(CACHES), default=_DATA.cache, show_default=True,
              help="Decoded-image cache (pipeline, fit; data.cache).")
@click.option("--cache-budget-mb", type=click.IntRange(min=0), default=_DATA.cache_budget_mb,
              show_default=True, help="Memory for the decoded-image cache (data.cache_budget_mb).")
@click.option("--decode-scale", type=click.FloatRange(min=0), default=_DATA.decode_scale, show_default=True,
              help="Decode train images to a shorter side >= this x image size; 0: full size.")
@click.option("--resample-processes", "processes", default=_DATA.resample_processes, show_default=True,
              help="Decode and resample train images in this many worker processes (Linux; "
                   "data.resample_processes); 0: threads; auto: one per core but one on hosts "
                   "with 8 or more cores, else threads.")
@click.option("--augment-on", type=click.Choice(AUGMENT_ON), default=_DATA.augment_on, show_default=True,
              help="fit: where the augmentation resamples (data.augment_on); auto: the device on a GPU/TPU.")
@click.option("--device-cache-mb", type=click.IntRange(0, MAX_DEVICE_CACHE_MB), default=_DATA.device_cache_mb,
              show_default=True, help="fit on the device path: the train images stay on the device up "
                                      "to this many MB (data.device_cache_mb); 0: streamed in batches.")
@click.option("--max-pixels", type=click.IntRange(min=1), default=_DATA.max_pixels, show_default=True,
              help="Refuse --data images larger than this (data.max_pixels), before decoding them.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
def bench(kind, data_dir, images, as_json, **options):
    """Measure throughput: the input pipeline, the model's training step, or both (fit)."""
    options["budget_mb"] = options.pop("cache_budget_mb")
    if options["decode_scale"] != 0 and options["decode_scale"] < 1:
        fail(ConfigError(f"--decode-scale {options['decode_scale']}: use 0 (full size) or at least 1."))
    try:
        resample_processes(options["processes"])
    except ValueError:
        fail(ConfigError(f"--resample-processes {options['processes']!r}: use auto, 0 (threads) or a "
                         "number of worker processes."))
    tensorflow()
    from tfcovid import bench as benchmarks  # heavy: TensorFlow

    log = (lambda s: click.echo(s, err=True)) if as_json else click.echo
    try:
        result = benchmarks.run(kind, data_dir, images, log=log, **options)
    except user_errors() as err:
        fail(err)
    click.echo(json.dumps(result, indent=2) if as_json else benchmarks.summary(result))
