"""Command line: each command parses its flags, resolves the config and calls one library function."""

from __future__ import annotations

import os
import sys

import click

NOT_CLINICAL = "Not for clinical use: a research tool, not a medical device."


def _quiet_tensorflow() -> None:
    # TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) buries the messages users
    # need; keep errors. A user's own setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _tensorflow() -> None:
    """Import TensorFlow before the modules that need it, with the lines it writes before its
    logging starts filtered at that level too (``tfcovid.utils.tf_import``)."""
    from tfcovid.utils import tf_import

    tf_import.import_tensorflow()


def _fail(err: Exception) -> None:
    click.echo(f"Error: {err}", err=True)
    sys.exit(1)


# The errors a user can fix; anything else is a bug and keeps its traceback.
def _user_errors():
    from tfcovid.config import ConfigError
    from tfcovid.data.types import DataError
    from tfcovid.training.preflight import PreflightError
    from tfcovid.training.train import TrainingError
    from tfcovid.weights.assign import WeightsError

    return (ConfigError, DataError, PreflightError, TrainingError, WeightsError, FileExistsError,
            FileNotFoundError)


@click.group(help=f"Fine-tune ImageNet backbones to classify chest X-rays. {NOT_CLINICAL}")
@click.version_option(package_name="tfcovid")
def main() -> None:
    _quiet_tensorflow()


@main.command("demo-data")
@click.argument("out", type=click.Path(file_okay=False))
@click.option("--task", type=click.Choice(["binary", "multilabel"]), default="binary", show_default=True)
@click.option("--per-class", type=click.IntRange(min=1), default=None,
              help="Train images per class (validation and test get a quarter each).")
@click.option("--seed", type=int, default=0, show_default=True)
def demo_data(out, task, per_class, seed):
    """Write a synthetic chest-X-ray-like ImageFolder tree (with lesion masks) to OUT."""
    from tfcovid.data import demo

    try:
        path = demo.make_demo_data(out, task=task, per_class=per_class, seed=seed)
    except (ValueError, FileExistsError) as err:
        _fail(err)
    click.echo(f"Wrote the {task} demo dataset to {path} (lesion masks in {path / 'masks'}).")


@main.command()
@click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
              help="YAML config (e.g. configs/part1/vgg16_first7.yaml); flags override it.")
@click.option("--data", "data__dir", default=None, help="ImageFolder tree, prepared TFRecords, or 'demo'.")
@click.option("--task", "data__task", type=click.Choice(["binary", "multilabel"]), default=None)
@click.option("--backbone", "model__backbone", default=None, help="vgg16 | resnet18 | resnet50")
@click.option("--freeze", "model__freeze", default=None, help="all | none | firstN (N conv layers)")
@click.option("--weights", "model__weights", default=None,
              help="imagenet | none | FILE (.keras, .weights.h5, keras.applications .h5, "
                   "torchvision .safetensors/.pth)")
@click.option("--preprocessing", "model__preprocessing", default=None,
              help="auto (follows the weights) | caffe | torch | none")
@click.option("--loss", "train__loss", type=click.Choice(["ce", "bce", "focal"]), default=None)
@click.option("--focal-alpha", "train__focal_alpha", type=float, default=None)
@click.option("--focal-gamma", "train__focal_gamma", type=float, default=None)
@click.option("--epochs", "train__epochs", type=int, default=None)
@click.option("--batch-size", "train__batch_size", type=int, default=None,
              help="Global batch size (all replicas together).")
@click.option("--lr", "train__lr", type=float, default=None)
@click.option("--optimizer", "train__optimizer", type=click.Choice(["sgd", "adam"]), default=None)
@click.option("--image-size", "data__image_size", type=int, default=None)
@click.option("--precision", "train__precision", default=None,
              help="auto | float32 | mixed_float16 | mixed_bfloat16")
@click.option("--strategy", "train__strategy", default=None,
              help="auto | one | mirrored | multiworker. auto: multiworker when TF_CONFIG names a "
                   "cluster, mirrored with more than one GPU, else one device.")
@click.option("--out", "out", default=None, help="Parent folder of run directories (default runs/).")
@click.option("--name", "name", default=None, help="Suffix for the run directory's name.")
@click.option("--seed", "train__seed", type=int, default=None)
@click.option("--deterministic", "train__deterministic", is_flag=True, default=None,
              help="Bit-reproducible training on one machine (deterministic ops; slower).")
@click.option("--skip-bad", "data__skip_bad", is_flag=True, default=None,
              help="Leave out unusable image files (listed in the run's skipped.txt) instead of stopping.")
@click.option("--resume", "resume", type=click.Path(file_okay=False, exists=True), default=None,
              help="Continue an interrupted run from its backup/ with its config.yaml (only --data may "
                   "be given with it: where the run's data is now).")
@click.option("--set", "assignments", multiple=True, metavar="KEY=VALUE",
              help="Override any config key (repeatable), e.g. --set train.focal_reduction=mean "
                   "--set data.demo_per_class=8. Values are YAML; named flags win over --set.")
def fit(config_file, resume, assignments, **flags):
    """Train a model; writes a new run directory under --out."""
    _tensorflow()
    from tfcovid import config
    from tfcovid.training import train

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
    except _user_errors() as err:
        _fail(err)
    click.echo(f"Done: {run}" if run else "Done (this worker's files were temporary; the chief wrote the run).")


def _resume_config(run_dir, config_file, assignments, flags):
    """The run's own config.yaml; ``--data`` may say where its data is now (a moved folder),
    any other option would change the run halfway and is refused, not silently dropped."""
    from tfcovid import config

    given = [f"--{key.split('__')[-1].replace('_', '-')}" for key, value in flags.items()
             if value is not None and key != "data__dir"]
    given += ["--config"] * (config_file is not None) + ["--set"] * bool(assignments)
    if given:
        raise click.UsageError(
            f"--resume continues {run_dir} with its own config.yaml; {', '.join(given)} would change the "
            "run halfway. Leave them out (only --data may point to where its data is now), or start a "
            "new run.")
    return config.resolve(os.path.join(run_dir, "config.yaml"), {"data.dir": flags.get("data__dir")})


@main.command()
@click.argument("target", metavar="RUN_DIR|MODEL")
@click.argument("inputs", metavar="IMAGE_OR_DIR...", nargs=-1, required=True)
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False), default=None,
              help="Write the predictions here (binary: probabilities + predicted class; "
                   "three-label: the study's 0/1 per label).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Decision threshold (default: the run's train.threshold, 0.5).")
@click.option("--checkpoint", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help="Which checkpoint of a run directory: last (what metrics.json describes) or "
                   "best (lowest validation loss).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--task", type=click.Choice(["binary", "multilabel"]), default=None,
              help="Only for a .keras file that does not record its task.")
@click.option("--labels", default=None, help="Comma-separated output names, only for a .keras file "
                                             "that does not record them.")
@click.option("--table/--no-table", default=True, show_default=True, help="Print the predictions.")
def predict(target, inputs, csv_file, threshold, checkpoint, batch_size, task, labels, table):
    """Predict images and folders (walked recursively) with a run's model or a .keras file.

    Unreadable images are listed with the reason and the rest are still predicted; the exit
    status is 1 if any image failed. Not for clinical use.
    """
    _checkpoint_only_for_runs(target)
    _tensorflow()
    from tfcovid.weights import metadata
    from tfcovid.inference import predict as inference_predict
    from tfcovid.data.folders import IMAGE_EXTENSIONS

    try:
        trained = metadata.load(target, checkpoint, task,
                                 _names(labels))
    except metadata.ModelInfoError as err:
        _fail(err)
    result = inference_predict.predict(trained, inputs, threshold, batch_size)
    if result.skipped:
        click.echo(f"note: skipped {len(result.skipped)} file(s) without an image extension "
                   f"({', '.join(result.skipped[:3])}{', ...' if len(result.skipped) > 3 else ''})",
                   err=True)
    if not result.names and not result.failed:
        kinds = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        _fail(ValueError(f"No images ({kinds}) found in {', '.join(inputs)}."))
    if table and result.names:
        click.echo(inference_predict.format_table(result))
    if csv_file and result.names:
        path = inference_predict.write_csv(result, csv_file)
        click.echo(f"Wrote {len(result.names)} rows to {path}")
    if result.failed:
        click.echo(f"Could not read {len(result.failed)} of {len(result.failed) + len(result.names)} "
                   "image(s):", err=True)
        for name, reason in result.failed:
            click.echo(f"  {name}: {reason}", err=True)
        sys.exit(1)


@main.command()
@click.argument("runs", metavar="RUN_DIR...", nargs=-1, required=True)
@click.option("--markdown", "markdown_file", type=click.Path(dir_okay=False), default=None,
              help="Also write the tables to this Markdown file.")
def report(runs, markdown_file):
    """Print the study's Part 1 / Part 2 tables for finished runs (or folders of runs)."""
    from pathlib import Path

    _tensorflow()
    from tfcovid.results import tables

    try:
        text, skipped = tables.build_report(runs)
    except tables.ReportError as err:
        _fail(err)
    for path, reason in skipped:
        click.echo(f"note: skipped {path}: {reason}", err=True)
    click.echo(text)
    if markdown_file:
        Path(markdown_file).parent.mkdir(parents=True, exist_ok=True)
        Path(markdown_file).write_text("# Results\n\n" + text)
        click.echo(f"Wrote {markdown_file}")


@main.command("import-torch")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False))
@click.option("--backbone", type=click.Choice(["vgg16", "resnet18"]), required=True)
@click.option("--task", type=click.Choice(["binary", "multilabel"]), required=True,
              help="binary: 2 outputs (infected, normal); multilabel: covid-19, normal, pneumonia.")
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="The .keras file to write.")
@click.option("--image-size", type=click.IntRange(min=32), default=224, show_default=True,
              help="Input side in pixels; VGG16's head needs 224-255 (a 7x7 feature map).")
@click.option("--labels", default=None,
              help="Comma-separated output names in the checkpoint's order (default: the study's).")
def import_torch(checkpoint, backbone, task, out, image_size, labels):
    """Convert the study's fine-tuned PyTorch checkpoint (torchvision VGG16/ResNet18 with the
    110-unit head; .safetensors, or .pth with the torch extra) into a tfcovid .keras model."""
    _tensorflow()
    from tfcovid.weights import import_torch as weights_import_torch

    names = tuple(_names(labels)) if labels else None
    try:
        path = weights_import_torch.import_torch(checkpoint, backbone, task, out, image_size, names,
                                    log=lambda s: click.echo(s))
    except _user_errors() as err:
        _fail(err)
    click.echo(f"Wrote {path} (evaluate, predict, explain and export it like any run's model).")


@main.command()
@click.argument("kind", type=click.Choice(["pipeline", "model", "fit"]))
@click.option("--data", "data_dir", type=click.Path(file_okay=False), default=None,
              help="Images to read: an ImageFolder tree (its train split) or any folder of images. "
                   "Default: generate grayscale 1024x1024 JPEGs in a temporary folder.")
@click.option("--images", type=click.IntRange(min=1), default=300, show_default=True,
              help="How many images to generate when --data is not given.")
@click.option("--backbone", type=click.Choice(["vgg16", "resnet18", "resnet50"]), default="vgg16",
              show_default=True)
@click.option("--image-size", type=click.IntRange(min=16), default=224, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=60, show_default=True)
@click.option("--precision", type=click.Choice(["auto", "float32", "mixed_float16", "mixed_bfloat16"]),
              default="auto", show_default=True)
@click.option("--jit-compile", type=click.Choice(["auto", "true", "false"]), default="auto",
              show_default=True, help="XLA; auto: on for GPUs, off on CPU (Keras's rule).")
@click.option("--steps-per-execution", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--freeze", default="none", show_default=True, help="all | none | firstN")
@click.option("--steps", type=click.IntRange(min=1), default=10, show_default=True,
              help="Training steps per timed repeat (model, fit).")
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True,
              help="Timed repeats after the warm-up; the median is reported.")
@click.option("--cache", type=click.Choice(["auto", "memory", "disk", "none"]), default="auto",
              show_default=True, help="Decoded-image cache (pipeline, fit).")
@click.option("--cache-budget-mb", type=click.IntRange(min=0), default=2048, show_default=True)
@click.option("--decode-scale", type=float, default=2.0, show_default=True,
              help="Decode train images to a shorter side >= this x image size; 0: full size.")
@click.option("--resample-processes", "processes", default="auto", show_default=True,
              help="Decode and resample train images in this many worker processes (Linux; "
                   "data.resample_processes); 0: threads; auto: one per core but one on hosts "
                   "with 8 or more cores, else threads.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a summary.")
def bench(kind, data_dir, images, as_json, **options):
    """Measure throughput: the input pipeline, the model's training step, or both (fit)."""
    import json

    _tensorflow()
    from tfcovid import bench as benchmarks
    from tfcovid.config import ConfigError
    from tfcovid.data.opencv.process_pool import processes_for

    options["budget_mb"] = options.pop("cache_budget_mb")
    if options["decode_scale"] != 0 and options["decode_scale"] < 1:
        _fail(ConfigError(f"--decode-scale {options['decode_scale']}: use 0 (full size) or at least 1."))
    try:
        processes_for(options["processes"])
    except ValueError:
        _fail(ConfigError(f"--resample-processes {options['processes']!r}: use auto, 0 (threads) or a "
                          "number of worker processes."))
    log = (lambda s: click.echo(s, err=True)) if as_json else click.echo
    try:
        result = benchmarks.run(kind, data_dir, images, log=log, **options)
    except _user_errors() as err:
        _fail(err)
    click.echo(json.dumps(result, indent=2) if as_json else benchmarks.summary(result))


def _model_options(command):
    """--checkpoint, --task and --labels, shared by evaluate, export and explain."""
    command = click.option("--labels", "model_labels", default=None,
                           help="Comma-separated output names, only for a .keras file that does "
                                "not record them.")(command)
    command = click.option("--task", type=click.Choice(["binary", "multilabel"]), default=None,
                           help="Only for a .keras file that does not record its task.")(command)
    return click.option("--checkpoint", type=click.Choice(["last", "best"]), default="last",
                        show_default=True, help="Which checkpoint of a run directory: last (what "
                        "metrics.json describes) or best (lowest validation loss).")(command)


def _checkpoint_only_for_runs(target) -> None:
    """--checkpoint picks a file in a run directory; given with a model file it was ignored."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    if ctx.get_parameter_source("checkpoint") == ParameterSource.COMMANDLINE and os.path.isfile(target):
        raise click.UsageError(
            f"--checkpoint picks a checkpoint of a run directory, and {target} is a model file "
            "(the checkpoint itself). Leave out --checkpoint, or pass the run directory.")


def _names(text):
    """--labels as a list: distinct, non-empty names (None when not given)."""
    if not text:
        return None
    names = [s.strip() for s in text.split(",")]
    if not all(names) or len(set(names)) != len(names):
        raise click.BadParameter(f"{text!r}: give distinct, non-empty names separated by commas, "
                                 "e.g. covid-19,normal,pneumonia.", param_hint="'--labels'")
    return names


def _trained_model_errors():
    from tfcovid.inference.evaluate import EvaluateError
    from tfcovid.inference.explain import ExplainError
    from tfcovid.inference.export import ExportError
    from tfcovid.weights.metadata import ModelInfoError

    return _user_errors() + (EvaluateError, ExplainError, ExportError, ModelInfoError)


@main.command()
@click.argument("target", metavar="RUN_DIR|MODEL")
@click.option("--data", "data_dir", default=None,
              help="ImageFolder tree (or 'demo'); default: the run's own data.")
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test",
              show_default=True)
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for <split>.json, predictions CSV and plots (default RUN/eval, or "
                   "<model>-eval/ beside a .keras file).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@_model_options
def evaluate(target, data_dir, split, out, batch_size, checkpoint, task, model_labels):
    """Recompute a model's metrics on one labeled split; write JSON, confusion matrices and ROC.

    Reports sensitivity and specificity of each disease class by name. Not for clinical use.
    """
    _checkpoint_only_for_runs(target)
    _tensorflow()
    from tfcovid.inference import evaluate as inference_evaluate

    try:
        result = inference_evaluate.evaluate(target, data_dir, split, out, checkpoint, batch_size, task,
                                       _names(model_labels), log=click.echo)
    except _trained_model_errors() as err:
        _fail(err)
    click.echo(inference_evaluate.format_result(result))
    click.echo(f"Wrote {result['files'][0]} and {len(result['files']) - 1} more file(s).")


@main.command()
@click.argument("target", metavar="RUN_DIR|MODEL")
@click.argument("out_dir", metavar="[OUT_DIR]", required=False, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["saved_model", "tflite", "onnx"]),
              default="saved_model", show_default=True,
              help="saved_model: TF Serving (image bytes or pixels in); tflite / onnx: float32 "
                   "pixels of the model's size in. ONNX needs: pip install 'tfcovid[onnx]'.")
@_model_options
def export(target, out_dir, fmt, checkpoint, task, model_labels):
    """Export a model for serving, reload it and check it gives the model's probabilities.

    OUT_DIR must be new or empty (default RUN/saved_model, RUN/tflite or RUN/onnx).
    """
    _checkpoint_only_for_runs(target)
    _tensorflow()
    from tfcovid.inference import export as inference_export

    try:
        inference_export.export(target, out_dir, fmt, checkpoint, task, _names(model_labels),
                          log=click.echo)
    except _trained_model_errors() as err:
        _fail(err)


@main.command()
@click.argument("target", metavar="RUN_DIR|MODEL")
@click.argument("images", metavar="IMAGE_OR_DIR...", nargs=-1, required=True)
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for the overlay PNGs (<image>_<label>.png; <image>_<label>_<layer>.png "
                   "for another --layer).")
@click.option("--label", "labels", multiple=True,
              help="Output to explain (repeatable); default: the predicted class / labels.")
@click.option("--layer", default=None,
              help="Target layer (default: the backbone's last conv block, e.g. block5_conv3).")
@_model_options
def explain(target, images, out, labels, layer, checkpoint, task, model_labels):
    """Grad-CAM heatmaps over the input images: where the model looked. Not for clinical use."""
    _checkpoint_only_for_runs(target)
    _tensorflow()
    from tfcovid.inference import explain as inference_explain

    try:
        results = inference_explain.explain(target, images, out, list(labels) or None, layer, checkpoint,
                                      task, _names(model_labels), log=click.echo)
    except _trained_model_errors() as err:
        _fail(err)
    for r in results:
        click.echo(f"  {r['png']}  ({r['label']}, p = {r['probability']:.3f})")


@main.command()
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
                   "decoding: a decompression-bomb guard). Default: fit's (data.max_pixels).")
@click.option("--skip-bad", is_flag=True, default=False,
              help="Leave out unusable image files (listed, and kept in the manifest) instead of stopping.")
def prepare(data_dir, out_dir, shards, max_side, encoding, seed, max_pixels, skip_bad):
    """Write the ImageFolder tree DATA_DIR as sharded TFRecords to OUT_DIR (local or gs://).

    OUT_DIR then works wherever an ImageFolder tree does (fit --data OUT_DIR): it is streamed
    with parallel reads and split across workers by shard. A local OUT_DIR appears only when
    complete; SIGTERM or Ctrl-C removes the partial output.
    """
    _tensorflow()
    from tfcovid.data import prepare as data_prepare, records
    from tfcovid.utils import signals

    limits = {} if max_pixels is None else {"max_pixels": max_pixels}
    try:
        manifest = data_prepare.prepare(data_dir, out_dir, shards, max_side, encoding, seed=seed,
                                   log=lambda s: click.echo(s), skip_bad=skip_bad, **limits)
    except signals.Interrupted as err:  # SIGTERM / Ctrl-C: the partial output is already removed
        click.echo(f"tfcovid prepare stopped by {err.name}: nothing was written to {out_dir}.", err=True)
        sys.exit(err.exit_code)
    except _user_errors() as err:
        _fail(err)
    total = sum(split["images"] for split in manifest["splits"].values())
    click.echo(f"Wrote {total} images to {out_dir} (manifest {records.MANIFEST}).")


if __name__ == "__main__":  # pragma: no cover
    main()
