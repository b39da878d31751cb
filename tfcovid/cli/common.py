"""Helpers the commands share: TensorFlow's start-up, user errors, the trained-model options."""

from __future__ import annotations

import os
import sys

import click
from click.core import ParameterSource

from tfcovid.config.schema import TASKS, ConfigError

NOT_CLINICAL = "Not for clinical use: a research tool, not a medical device."


def quiet_tensorflow() -> None:
    # TensorFlow's C++ start-up chatter (CUDA probing, oneDNN notes) buries the messages users
    # need; keep errors. A user's own setting wins.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def tensorflow() -> None:
    """Import TensorFlow before the modules that need it, with the lines it writes before its
    logging starts filtered at that level too, and for the rest of the command the image
    libraries' notes on damaged files and TensorFlow Lite's (``tfcovid.utils.tf_import``)."""
    from tfcovid.utils import tf_import  # heavy: TensorFlow

    ctx = click.get_current_context(silent=True)
    if ctx is not None and not ctx.meta.get("tfcovid.filtered"):
        ctx.meta["tfcovid.filtered"] = True  # meta is shared with the parent context
        ctx.with_resource(tf_import.filtered_command())  # until the command ends, errors included
    tf_import.import_tensorflow()


def fail(err: Exception) -> None:
    click.echo(f"Error: {err}", err=True)
    sys.exit(1)


# The errors a user can fix; anything else is a bug and keeps its traceback.
def user_errors():
    # heavy: these modules import TensorFlow
    from tfcovid.data.types import DataError
    from tfcovid.training.preflight import PreflightError
    from tfcovid.training.train import TrainingError
    from tfcovid.weights.assign import WeightsError

    return (ConfigError, DataError, PreflightError, TrainingError, WeightsError, FileExistsError,
            FileNotFoundError)


def trained_model_errors():
    # heavy: these modules import TensorFlow
    from tfcovid.inference.evaluate import EvaluateError
    from tfcovid.inference.explain import ExplainError
    from tfcovid.inference.export import ExportError
    from tfcovid.weights.metadata import ModelInfoError

    return user_errors() + (EvaluateError, ExplainError, ExportError, ModelInfoError)


CHECKPOINT_HELP = ("Which checkpoint of a run directory: last (what metrics.json describes) or best "
                   "(lowest validation loss).")


def model_options(command):
    """--checkpoint, --task and --labels, shared by evaluate, export and explain."""
    command = click.option("--labels", "model_labels", default=None,
                           help="Comma-separated output names, only for a .keras file that does "
                                "not record them.")(command)
    command = click.option("--task", type=click.Choice(TASKS), default=None,
                           help="Only for a .keras file that does not record its task.")(command)
    return click.option("--checkpoint", type=click.Choice(["last", "best"]), default="last",
                        show_default=True, help=CHECKPOINT_HELP)(command)


MAX_PIXELS_HELP = ("Refuse images larger than this many pixels (or whose decode would take "
                   "more bytes than as many RGB pixels), before decoding them. Default: the "
                   "run's data.max_pixels, 150,000,000 unless set.")


def max_pixels_option(command):
    """--max-pixels, shared by predict, explain and evaluate: the limit fit applies."""
    return click.option("--max-pixels", type=click.IntRange(min=1), default=None,
                        help=MAX_PIXELS_HELP)(command)


def checkpoint_only_for_runs(target) -> None:
    """--checkpoint picks a file in a run directory; given with a model file it was ignored."""
    ctx = click.get_current_context()
    if ctx.get_parameter_source("checkpoint") == ParameterSource.COMMANDLINE and os.path.isfile(target):
        raise click.UsageError(
            f"--checkpoint picks a checkpoint of a run directory, and {target} is a model file "
            "(the checkpoint itself). Leave out --checkpoint, or pass the run directory.")


def names(text):
    """--labels as a list: distinct, non-empty names (None when not given)."""
    if not text:
        return None
    items = [s.strip() for s in text.split(",")]
    if not all(items) or len(set(items)) != len(items):
        raise click.BadParameter(f"{text!r}: give distinct, non-empty names separated by commas, "
                                 "e.g. covid-19,normal,pneumonia.", param_hint="'--labels'")
    return items
