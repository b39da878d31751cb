"""Commands that use a trained model (a run directory or a .keras file): predict, evaluate,
export and explain. Library modules are imported inside the commands (see ``tfcovid.cli``).
"""

from __future__ import annotations

import sys

import click

from tfcovid.cli.common import (
    CHECKPOINT_HELP,
    checkpoint_only_for_runs,
    fail,
    max_pixels_option,
    model_options,
    names,
    tensorflow,
    trained_model_errors,
)
from tfcovid.config.schema import CALIBRATIONS, TASKS
from tfcovid.utils.text import escape, one_line, plural

# Test-time augmentation (issue 25.5; docs/beyond.md#recipes): one more pass per image.
tta_option = click.option("--tta", type=click.Choice(["none", "flip"]), default="none", show_default=True,
                          help="flip: average each image's probabilities with its left-right mirror's "
                               "(twice the passes); recorded with the results.")


@click.command()
@click.argument("target", metavar="RUN_DIR|MODEL")
@click.argument("inputs", metavar="IMAGE_OR_DIR...", nargs=-1, required=True)
@click.option("--csv", "csv_file", type=click.Path(dir_okay=False), default=None,
              help="Write the predictions here (binary: probabilities + predicted class; "
                   "three-label: the study's 0/1 per label).")
@click.option("--csv-format", type=click.Choice(["labels", "study"]), default="labels", show_default=True,
              help="labels: the model's label names as columns; study: the study's three-label file "
                   "(filename,covid,normal,pneumonia).")
@click.option("--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Decision threshold. Default: the model's operating point (train.threshold, 0.5, "
                   "unless chosen on validation: docs/operating-points.md).")
@click.option("--checkpoint", type=click.Choice(["last", "best"]), default="last", show_default=True,
              help=CHECKPOINT_HELP)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per prediction batch.")
@click.option("--task", type=click.Choice(TASKS), default=None,
              help="Only for a .keras file that does not record its task.")
@click.option("--labels", default=None, help="Comma-separated output names, only for a .keras file "
                                             "that does not record them.")
@click.option("--table/--no-table", default=True, show_default=True, help="Print the predictions.")
@max_pixels_option
@tta_option
def predict(target, inputs, csv_file, csv_format, threshold, checkpoint, batch_size, task, labels, table,
            max_pixels, tta):
    """Predict images and folders (walked recursively) with a run's model or a .keras file.

    Unreadable images are listed with the reason and the rest are still predicted; the exit
    status is 1 if any image failed. Not for clinical use.
    """
    checkpoint_only_for_runs(target)
    tensorflow()
    # heavy: TensorFlow
    from tfcovid.data.folders import IMAGE_EXTENSIONS
    from tfcovid.inference import predict as inference_predict
    from tfcovid.weights import metadata

    try:
        trained = metadata.load(target, checkpoint, task, names(labels))
    except metadata.ModelInfoError as err:
        fail(err)
    if csv_file and (problem := inference_predict.csv_format_problem(trained.task, trained.outputs,
                                                                      csv_format)):
        fail(ValueError(problem))
    result = inference_predict.predict(trained, inputs, threshold, batch_size, max_pixels=max_pixels, tta=tta)
    if tta != "none":
        click.echo("note: probabilities averaged over each image and its mirror image (--tta flip)", err=True)
    if result.skipped:
        click.echo(f"note: skipped {len(result.skipped)} file(s) without an image extension "
                   f"({', '.join(map(escape, result.skipped[:3]))}{', ...' if len(result.skipped) > 3 else ''})",
                   err=True)
    if not result.names and not result.failed:
        kinds = "/".join(e.lstrip(".") for e in IMAGE_EXTENSIONS)
        fail(ValueError(f"No images ({kinds}) found in {', '.join(map(escape, inputs))}."))
    path = None
    if csv_file and result.names:  # first: a closed pipe (`| head`) must not cost the file
        path = inference_predict.write_csv(result, csv_file, csv_format)
    if table and result.names:
        click.echo(inference_predict.format_table(result))
    if path is not None:
        click.echo(f"Wrote {plural(len(result.names), 'row')} to {path}")
    if result.failed:
        _list_failures(result.failed, len(result.failed) + len(result.names))
        sys.exit(1)


@click.command()
@click.argument("target", metavar="RUN_DIR|MODEL")
@click.option("--data", "data_dir", default=None,
              help="ImageFolder tree, label file (the run's splits.csv gives the split) or 'demo'. "
                   "Default: the run's own data.")
@click.option("--split", type=click.Choice(["train", "validation", "test"]), default="test",
              show_default=True, help="The labeled split to score.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Folder for <split>.json, predictions CSV and plots. Default: RUN/eval, or "
                   "<model>-eval/ beside a .keras file.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per prediction batch.")
@model_options
@max_pixels_option
@tta_option
def evaluate(target, data_dir, split, out, batch_size, checkpoint, task, model_labels, max_pixels, tta):
    """Recompute a model's metrics on one labeled split; write JSON, confusion matrices and ROC.

    Reports sensitivity and specificity of each disease class by name. Not for clinical use.
    """
    checkpoint_only_for_runs(target)
    tensorflow()
    from tfcovid.inference import evaluate as inference_evaluate  # heavy: TensorFlow

    try:
        result = inference_evaluate.evaluate(target, data_dir, split, out, checkpoint, batch_size, task,
                                             names(model_labels), log=click.echo, max_pixels=max_pixels,
                                             tta=tta)
    except trained_model_errors() as err:
        fail(err)
    click.echo(inference_evaluate.format_result(result))
    click.echo(f"Wrote {result['files'][0]} and {len(result['files']) - 1} more file(s).")


@click.command()
@click.argument("target", metavar="RUN_DIR|MODEL")
@click.option("--operating-point", "spec", default=None, metavar="SPEC",
              help="0.5 or another number in (0, 1), youden, sensitivity:S or specificity:S "
                   "(e.g. sensitivity:0.95), chosen on the validation split. Default with "
                   "--calibrate: the model's own, chosen again on the calibrated probabilities.")
@click.option("--calibrate", "method", type=click.Choice(CALIBRATIONS), default=None,
              help="temperature: fit temperature scaling on the validation split first; none: "
                   "remove it. Default: keep the model's.")
@click.option("--data", "data_dir", default=None,
              help="ImageFolder tree (or 'demo') with the validation split. Default: the run's own data.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per prediction batch.")
@model_options
@max_pixels_option
def calibrate(target, spec, method, data_dir, batch_size, checkpoint, task, model_labels, max_pixels):
    """Choose the model's decision threshold(s) on the validation split and record them in it.

    With --calibrate temperature, first fit temperature scaling there. For a run's last
    checkpoint, metrics.json is rescored. Never chooses on test.
    """
    if spec is None and method is None:
        raise click.UsageError("Give --operating-point SPEC, --calibrate temperature|none, or both.")
    checkpoint_only_for_runs(target)
    tensorflow()
    from tfcovid.inference import calibrate as inference_calibrate  # heavy: TensorFlow
    from tfcovid.results.calibration import CalibrationError
    from tfcovid.results.operating_point import OperatingPointError, describe

    try:
        point = inference_calibrate.calibrate(target, spec, data_dir, checkpoint, batch_size, task,
                                              names(model_labels), log=click.echo, max_pixels=max_pixels,
                                              method=method)
    except trained_model_errors() + (OperatingPointError, CalibrationError) as err:
        fail(err)
    click.echo(describe(point))


@click.command()
@click.argument("target", metavar="RUN_DIR|MODEL")
@click.argument("out_dir", metavar="[OUT_DIR]", required=False, type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["saved_model", "tflite", "onnx"]),
              default="saved_model", show_default=True,
              help="saved_model: TF Serving (image bytes or pixels in); tflite / onnx: float32 "
                   "pixels of the model's size in. ONNX needs: pip install 'tfcovid[onnx]'.")
@model_options
def export(target, out_dir, fmt, checkpoint, task, model_labels):
    """Export a model for serving, reload it and check it gives the model's probabilities.

    OUT_DIR must be new or empty (default RUN/saved_model, RUN/tflite or RUN/onnx).
    """
    checkpoint_only_for_runs(target)
    tensorflow()
    from tfcovid.inference import export as inference_export  # heavy: TensorFlow

    try:
        inference_export.export(target, out_dir, fmt, checkpoint, task, names(model_labels),
                                log=click.echo)
    except trained_model_errors() as err:
        fail(err)


@click.command()
@click.argument("target", metavar="RUN_DIR|MODEL")
@click.argument("images", metavar="IMAGE_OR_DIR...", nargs=-1, required=True)
@click.option("--out", type=click.Path(file_okay=False), required=True,
              help="Folder for the overlay PNGs (<image>_<label>.png; <image>_<label>_<layer>.png "
                   "for another --layer).")
@click.option("--label", "labels", multiple=True,
              help="Output to explain (repeatable). Default: the predicted class / labels.")
@click.option("--layer", default=None,
              help="Target layer. Default: the backbone's last conv block, e.g. block5_conv3.")
@model_options
@max_pixels_option
def explain(target, images, out, labels, layer, checkpoint, task, model_labels, max_pixels):
    """Grad-CAM heatmaps over the input images: where the model looked. Not for clinical use.

    Unreadable images are listed with the reason and the rest are still explained; the exit
    status is 1 if any image failed, as for predict.
    """
    checkpoint_only_for_runs(target)
    tensorflow()
    from tfcovid.inference import explain as inference_explain  # heavy: TensorFlow

    try:
        results = inference_explain.explain(target, images, out, list(labels) or None, layer, checkpoint,
                                            task, names(model_labels), log=click.echo,
                                            max_pixels=max_pixels)
    except trained_model_errors() as err:
        fail(err)
    for r in results:
        click.echo(f"  {r['png']}  ({r['label']}, p = {r['probability']:.3f})")
    if results.failed:
        explained = len({r["image"] for r in results})
        _list_failures(results.failed, explained + len(results.failed))
        sys.exit(1)


def _list_failures(failed, total: int) -> None:
    """The images that could not be read, one "name: reason" line each, on stderr."""
    click.echo(f"Could not read {len(failed)} of {total} image(s):", err=True)
    for name, reason in failed:
        click.echo(f"  {escape(name)}: {one_line(reason)}", err=True)
